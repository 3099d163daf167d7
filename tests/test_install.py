"""The README's install story, run step by step in a real Debian 12 booted with systemd: a root
made by debootstrap, booted by ``systemd-nspawn --boot`` with no network, each line of the
README's block run as written (sudo included), then nginx as the README says, ``nginx -t``,
``sapid check`` and a signing through the socket systemd activates.

Two things stand in for the operator at the keyboard: pip installs from wheels fetched on this
machine beforehand (the container has no network), and the passphrase comes from
$CA_PASSPHRASE, which sudo is told to keep, and from printf where the README has
systemd-ask-password (which needs a terminal)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PASSPHRASE, ROOT, run

PACKAGES = ("systemd", "systemd-sysv", "dbus", "sudo", "python3-venv", "nginx", "curl",
            "openssl", "ca-certificates")
# What `pip install .` needs, besides the checkout: fetched on this machine.
WHEELS = ("setuptools", "wheel", "cryptography>=47")


def mirror() -> str:
    """The Debian mirror this machine's apt uses."""
    for path in Path("/etc/apt").glob("sources.list.d/*.sources"):
        found = re.search(r"^URIs:\s*(\S+/debian)\s*$", path.read_text(), re.M)
        if found:
            return found[1]
    return "http://deb.debian.org/debian"


def readme_install_block() -> list[str]:
    """The commands of the README's install block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Installing under systemd, behind nginx", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        pending += line.strip()
        if pending.endswith(("\\", "|")):
            pending = pending.rstrip("\\").rstrip() + " "
            continue
        commands.append(pending)
        pending = ""
    return commands


class Machine:
    """A booted Debian in ``root``; ``sh(command)`` runs a shell command in it as root."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log = root, log
        self.process = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit",
             "--private-network", "--console=pipe", "-M", "sapidinstall"],
            stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        self.pid = None
        while self.pid is None:
            assert self.process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with open(children) as file:
                found = file.read().split()
            self.pid = int(found[0]) if found else None
            time.sleep(0.1)
        state = self.sh("systemctl is-system-running --wait", check=False).stdout.strip()
        assert state in ("running", "degraded"), state

    def sh(self, command: str, check: bool = True, timeout: float = 300):
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "LANG": "C.UTF-8", "CA_PASSPHRASE": PASSPHRASE}
        done = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "/bin/sh", "-c",
                               f"cd /root/sapid && {command}"], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{command!r} exited {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}\n{self.sh('journalctl -b --no-pager -n 25 _SYSTEMD_UNIT=sapid.service + UNIT=sapid.service', False).stdout if 'journalctl' not in command else ''}")
        return done

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("install")
    root = folder / "root"
    run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
         str(root), mirror()], timeout=1200)
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "--only-binary", ":all:", "-d", str(wheels), *WHEELS], timeout=600)
    # The operator's stand-ins (see the docstring).
    (root / "etc" / "pip.conf").write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    (root / "etc" / "sudoers.d" / "passphrase").write_text(
        'Defaults env_keep += "CA_PASSPHRASE"\n')
    (root / "etc" / "sudoers.d" / "passphrase").chmod(0o440)
    checkout = root / "root" / "sapid"
    files = run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others",
                 "--exclude-standard"]).stdout.split("\n")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    booted = Machine(root, folder / "console.log")
    yield booted
    booted.close()


def test_the_readme_install_story_works_as_written(machine):
    commands = readme_install_block()
    assert commands[0] == "sudo apt-get install -y python3-venv nginx"
    assert commands[-1] == "sudo curl --unix-socket /run/sapid/sapid.sock http://sapid/api/health"
    answered = 'printf "%s\\n" "$CA_PASSPHRASE"'
    for command in commands:
        if command.startswith("cd sapid"):
            continue                         # the checkout is the working folder already
        command = command.replace('sudo systemd-ask-password -n "CA key passphrase:"', answered)
        done = machine.sh(command)
    health = json.loads(done.stdout)
    assert health["status"] == "ok" and health["ca_subject"] == (
        "CN=Example Internal CA,O=Example Ltd,C=DE"), health
    # systemd started it from the socket, under the unit's user, with the credential.
    assert machine.sh("systemctl is-active sapid.service").stdout.strip() == "active"
    owner = machine.sh("stat -c %U /proc/$(systemctl show -p MainPID --value sapid)").stdout
    assert owner.strip() == "sapid", owner
    # A device signs through the socket, as the example hooks allow it.
    machine.sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "
               "/tmp/d.key -subj /CN=device1.devices.example.com -addext "
               "subjectAltName=DNS:device1.devices.example.com -out /tmp/d.csr 2>/dev/null")
    signed = machine.sh("curl -sS --unix-socket /run/sapid/sapid.sock -T /tmp/d.csr "
                        "http://sapid/api/csr/device1").stdout
    assert "signed_x509_pem" in json.loads(signed), signed
    # The day-to-day of the README: sapid check, a reload.
    checked = machine.sh("sudo /opt/sapid/bin/sapid check")
    assert ": ok; CA CN=Example Internal CA" in checked.stdout, checked.stdout
    machine.sh("sudo systemctl reload sapid")
    # The man pages the README links resolve (minbase has no man-db to read them with).
    machine.sh("for page in man8/sapid.8 man5/sapid.conf.5 man5/sapid-hooks.5; do "
               "test -s /usr/local/share/man/$page; done")

    # nginx as the README says after the block: the site, a server certificate, the CA file.
    machine.sh("install -m 0644 examples/nginx.conf /etc/nginx/sites-enabled/sapid")
    machine.sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 "
               "-subj /CN=ca.example.com -keyout /etc/ssl/private/ca.example.com.key "
               "-out /etc/ssl/certs/ca.example.com.pem 2>/dev/null")
    readme = (ROOT / "README.md").read_text()
    saved = re.search(r"`(sudo curl -fsS --unix-socket /run/sapid/sapid.sock http://sapid/api/ca "
                      r"\| sudo tee\s+/etc/nginx/sapid-ca.pem)`", readme)
    assert saved, "the README's command that saves the CA for nginx"
    machine.sh(" ".join(saved[1].split()) + " >/dev/null")
    tested = machine.sh("sudo nginx -t && sudo systemctl reload nginx")
    assert "syntax is ok" in tested.stderr, tested.stderr
    # nginx answers (once its reload has taken: new workers come up after systemctl returns):
    # the CRL to anyone over plain HTTP, health over TLS.
    deadline = time.monotonic() + 30
    while True:
        crl = machine.sh("curl -sS -o /tmp/crl.der -w '%{http_code} %{content_type}' "
                         "-H 'Host: ca.example.com' http://127.0.0.1/api/crl").stdout
        if crl == "200 application/pkix-crl" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert crl == "200 application/pkix-crl", crl
    health = machine.sh("curl -sS -k --resolve ca.example.com:443:127.0.0.1 "
                        "https://ca.example.com/api/health").stdout
    assert json.loads(health)["status"] == "ok", health
