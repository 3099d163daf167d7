#!/bin/sh
# A throwaway development CA: a virtual environment, a CA made by 'sapid init' and 'sapid serve'
# on a local socket, all under ./dev (or $SAPID_DEV). Ctrl-C stops it. Not for production: the
# passphrase of this CA sits in dev/passphrase. $SAPID_VENV names another virtual environment.
# Debian packages it needs and lacks (python3-venv, openssl, curl) are installed first: as root
# directly, otherwise with sudo.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
dev=${SAPID_DEV:-$top/dev}
venv=${SAPID_VENV:-$top/.venv}
missing=""
[ -x "$venv/bin/sapid" ] || python3 -c "import ensurepip, venv" 2>/dev/null ||
    missing="$missing python3-venv"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -n "$missing" ]; then
    as_root=""
    [ "$(id -u)" = 0 ] || as_root=sudo
    echo "installing$missing" >&2
    $as_root apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
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
# Written once: what you change in it (hooks = ..., say) stays.
[ -f "$dev/sapid.conf" ] || cat > "$dev/sapid.conf" <<CONF
[sapid]
identity = identity
state = state
# Your hooks file (see examples/hooks.py); empty: every valid CSR is signed.
hooks =
socket = sapid.sock
CONF
cat <<HELP

sapid development CA on $dev/sapid.sock. In another terminal:

  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key \\
      -subj /CN=device1 -addext subjectAltName=DNS:device1.example -out device.csr
  curl --unix-socket $dev/sapid.sock -T device.csr http://sapid/api/csr/device1 |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["signed_x509_pem"], end="")' \\
      > device.pem
  openssl verify -CAfile $dev/identity/ca.cert.pem device.pem

sapid is $venv/bin/sapid (not on PATH); with this CA's settings:

  CA_PASSPHRASE=\$(cat $dev/passphrase) $venv/bin/sapid check -c $dev/sapid.conf
  $venv/bin/sapid list -c $dev/sapid.conf
  $venv/bin/sapid revoke -c $dev/sapid.conf SERIAL

Edit $dev/sapid.conf (hooks = ..., say) and start this again: it is kept.

HELP
exec "$venv/bin/sapid" serve -c "$dev/sapid.conf"
