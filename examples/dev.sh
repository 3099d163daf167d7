#!/bin/sh
# A throwaway development CA: a virtual environment, a CA made by 'sapid init' and 'sapid serve'
# on a local socket, all under ./dev (or $SAPID_DEV). Ctrl-C stops it. Not for production: the
# passphrase of this CA sits in dev/passphrase. $SAPID_VENV names another virtual environment.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
dev=${SAPID_DEV:-$top/dev}
venv=${SAPID_VENV:-$top/.venv}
if [ ! -x "$venv/bin/sapid" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$top"
fi
mkdir -p "$dev"
chmod 0700 "$dev"
[ -f "$dev/passphrase" ] || (umask 077 && head -c 24 /dev/urandom | base64 > "$dev/passphrase")
CA_PASSPHRASE=$(cat "$dev/passphrase")
export CA_PASSPHRASE
[ -f "$dev/identity/ca.cert.pem" ] ||
    "$venv/bin/sapid" init -d "$dev/identity" -f CN "sapid development CA" -f O "Development" -v 1
cat > "$dev/sapid.conf" <<CONF
[sapid]
identity = identity
state = state
hooks =
socket = sapid.sock
CONF
cat <<HELP

sapid development CA on $dev/sapid.sock. In another terminal:

  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key \\
      -subj /CN=device1 -addext subjectAltName=DNS:device1.example -out device.csr
  curl --unix-socket $dev/sapid.sock -T device.csr http://sapid/api/csr/device1

HELP
exec "$venv/bin/sapid" serve -c "$dev/sapid.conf"
