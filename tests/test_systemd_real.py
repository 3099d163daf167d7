"""sapid under a real systemd: a Debian 12 root made by debootstrap (cached between runs, made
again when Debian's point release or the package list changes), booted by ``systemd-nspawn
--boot`` with no network over a throwaway overlay, sapid installed in it by running each line
of the README's install block as written (sudo included), then driven as an operator does:
``systemctl``, ``journalctl``, ``systemd-analyze``, curl on the socket systemd activates.

Two things stand in for the operator at the keyboard: pip installs from wheels fetched (or
built, for the ``systemd`` extra) on this machine beforehand, since the container has no
network; and the passphrase comes from $CA_PASSPHRASE, which sudo is told to keep, and from
printf where the README has systemd-ask-password (which needs a terminal)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import PASSPHRASE, ROOT, run

RELEASE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "sudo", "python3-venv", "nginx", "curl",
            "openssl", "ca-certificates")
# What `pip install .` and the systemd extra need, besides the checkout: fetched (systemd-python
# is built: PyPI has no wheel of it) on this machine.
WHEELS = ("setuptools", "wheel", "cryptography>=47")
BUILT = ("systemd-python",)
# The operator's stand-ins (see the docstring), written into the cached root.
STAND_INS = {
    "etc/pip.conf": "[global]\nno-index = true\nfind-links = /wheels\n",
    "etc/sudoers.d/passphrase": 'Defaults env_keep += "CA_PASSPHRASE"\n',
}
CACHE = Path(os.environ.get("SAPID_TEST_CACHE", Path.home() / ".cache" / "sapid-tests"))
UNIT = "sapid.service"


def mirror() -> str:
    """The Debian mirror this machine's apt uses."""
    for path in Path("/etc/apt").glob("sources.list.d/*.sources"):
        found = re.search(r"^URIs:\s*(\S+/debian)\s*$", path.read_text(), re.M)
        if found:
            return found[1]
    for path in Path("/etc/apt").glob("sources.list*"):
        if path.is_file():
            found = re.search(r"^deb\s+(\S+/debian)\s", path.read_text(), re.M)
            if found:
                return found[1]
    return "http://deb.debian.org/debian"


def point_release(url: str) -> str | None:
    """Debian's point release of RELEASE (``12.11``) as the mirror says, or None unreachable."""
    try:
        with urllib.request.urlopen(f"{url}/dists/{RELEASE}/Release", timeout=20) as answer:
            text = answer.read(4096).decode("latin-1")
    except OSError:
        return None
    found = re.search(r"^Version:\s*(\S+)", text, re.M)
    return found[1] if found else None


def debian_root() -> Path:
    """The cached root for today's point release and package list; made by debootstrap when
    there is none (about a minute), older ones removed.  With the mirror unreachable, the
    newest cached root serves.  ``<root>.done`` says a root is whole."""
    url = mirror()
    version = point_release(url)
    CACHE.mkdir(parents=True, exist_ok=True)
    whole = sorted((marker.parent / marker.name.removesuffix(".done")
                    for marker in CACHE.glob(f"{RELEASE}-*.done")),
                   key=lambda path: path.stat().st_mtime)
    if version is None and whole:
        return whole[-1]
    key = hashlib.sha256(repr((version, PACKAGES, STAND_INS)).encode()).hexdigest()[:12]
    root = CACHE / f"{RELEASE}-{version}-{key}"
    marker = root.parent / f"{root.name}.done"
    if marker.exists():
        return root
    building = root.parent / f"{root.name}.partial"
    for path in (building, root):
        shutil.rmtree(path, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", RELEASE,
         str(building), url], timeout=1200)
    for name, text in STAND_INS.items():
        (building / name).write_text(text)
    (building / "etc" / "sudoers.d" / "passphrase").chmod(0o440)
    building.rename(root)
    marker.touch()
    for old in whole:
        shutil.rmtree(old, ignore_errors=True)
        (old.parent / f"{old.name}.done").unlink(missing_ok=True)
    return root


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
    """A booted Debian over ``root`` (read-only below a tmpfs overlay: the cache stays as it
    was); ``sh(command)`` runs a shell command in it as root, in the checkout."""

    def __init__(self, root: Path, log: Path, checkout: Path, wheels: Path):
        self.process = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "--volatile=overlay", "--boot",
             "--register=no", "--keep-unit", "--private-network", "--console=pipe",
             "-M", "sapidtest", f"--bind={checkout}:/root/sapid", f"--bind-ro={wheels}:/wheels"],
            stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
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
        except BaseException:
            self.close()                # no container left running after a failed boot
            raise

    def sh(self, command: str, check: bool = True, timeout: float = 300):
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/root", "LANG": "C.UTF-8", "CA_PASSPHRASE": PASSPHRASE}
        done = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "/bin/sh", "-c",
                               f"cd /root/sapid && {command}"], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            journal = "" if "journalctl" in command else self.sh(
                f"journalctl -b --no-pager -n 25 _SYSTEMD_UNIT={UNIT} + UNIT={UNIT}",
                False).stdout
            raise AssertionError(f"{command!r} exited {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}\n{journal}")
        return done

    def show(self, *properties: str) -> dict:
        """``systemctl show`` of sapid.service: property -> value."""
        text = self.sh(f"systemctl show {UNIT} -p {','.join(properties)}").stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def until(self, what: str, test, timeout: float = 60.0):
        """Poll ``test()`` until it gives something true; that, or fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while not (result := test()):
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
            time.sleep(0.05)
        return result

    def sign(self, client_id: str = "device1", name: str | None = None) -> dict:
        """A CSR made in the container, signed through the socket: the reply."""
        name = name or f"{client_id}.devices.example.com"
        self.sh(f"openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "
                f"/tmp/{client_id}.key -subj /CN={name} -addext subjectAltName=DNS:{name} "
                f"-out /tmp/{client_id}.csr 2>/dev/null")
        reply = self.sh(f"curl -sS --unix-socket /run/sapid/sapid.sock -T /tmp/{client_id}.csr "
                        f"http://sapid/api/csr/{client_id}").stdout
        return json.loads(reply)

    def stored(self) -> set[str]:
        """The serials in the store, as ``sapid list --json`` prints them."""
        listed = json.loads(self.sh("/opt/sapid/bin/sapid list --json").stdout)
        return {row["serial"] for row in listed}

    def journal(self, *args: str) -> str:
        return self.sh(f"journalctl -b --no-pager -u {UNIT} {' '.join(args)}").stdout

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
    """Debian booted, sapid installed as the README says; ``machine.installed`` holds what
    the install showed (the unit's state before the first connection, the health answer)."""
    folder = tmp_path_factory.mktemp("systemd")
    root = debian_root()
    wheels = folder / "wheels"
    run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "--only-binary", ":all:", "-d", str(wheels), *WHEELS], timeout=600)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--no-deps", "-w", str(wheels), *BUILT], timeout=600)
    checkout = folder / "sapid"
    files = run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others",
                 "--exclude-standard"]).stdout.split("\n")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    booted = Machine(root, folder / "console.log", checkout, wheels)
    try:
        booted.installed = install_as_the_readme_says(booted)
        yield booted
    finally:
        booted.close()


def install_as_the_readme_says(machine: Machine) -> dict:
    commands = readme_install_block()
    assert commands[0] == "sudo apt-get install -y python3-venv nginx"
    assert commands[-1] == "sudo curl --unix-socket /run/sapid/sapid.sock http://sapid/api/health"
    answered = 'printf "%s\\n" "$CA_PASSPHRASE"'
    for command in commands[:-1]:
        if command.startswith("cd sapid"):
            continue                         # the checkout is the working folder already
        machine.sh(command.replace('sudo systemd-ask-password -n "CA key passphrase:"',
                                   answered))
    before = machine.sh(f"systemctl is-active {UNIT}", check=False).stdout.strip()
    health = json.loads(machine.sh(commands[-1]).stdout)
    return {"before": before, "health": health}


@contextlib.contextmanager
def replaced(machine: Machine, path: str, text: str):
    """``path`` in the container holds ``text`` (root's, 0644) until the block ends."""
    saved = f"/root/saved-{path.replace('/', '_')}"
    machine.sh(f"cp -p {path} {saved}")
    try:
        machine.sh(f"cat > {path} <<'EOF'\n{textwrap.dedent(text)}\nEOF\nchmod 0644 {path}")
        yield
    finally:
        machine.sh(f"cp -p {saved} {path}")


# Hooks for the tests that need sapid to take its time: a boot that waits for a flag file, and
# an authorize that leaves a mark where the test can see it (the state folder, the one place
# the sandbox lets sapid write) and then waits.
SLOW_HOOKS = """
import pathlib, time
import sapid

class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        if self.client_id == "slow":
            pathlib.Path("/var/lib/sapid/slow-started").touch()
            time.sleep(3)
        if self.client_id == "nobody":
            raise sapid.NotAuthorized("nobody is refused by the reloaded hooks")

def boot(authority):
    if pathlib.Path("/etc/sapid/slow-boot").exists():
        time.sleep(2)
"""


def test_the_readme_install_story_works_as_written(machine):
    # Socket activation: nothing ran until the README's curl, which started it.
    assert machine.installed["before"] == "inactive"
    health = machine.installed["health"]
    assert health["status"] == "ok" and health["ca_subject"] == (
        "CN=Example Internal CA,O=Example Ltd,C=DE"), health
    shown = machine.show("ActiveState", "Type", "StatusText", "TriggeredBy", "MainPID", "User")
    assert (shown["ActiveState"], shown["Type"], shown["User"]) == ("active", "notify", "sapid")
    assert shown["TriggeredBy"] == "sapid.socket"
    assert shown["StatusText"].startswith("serving on "), shown
    owner = machine.sh(f"stat -c %U /proc/{shown['MainPID']}").stdout
    assert owner.strip() == "sapid", owner
    # A device signs through the socket, as the example hooks allow it.
    assert "signed_x509_pem" in machine.sign("device1")
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
    crl = machine.until("the CRL through nginx", lambda: (text := machine.sh(
        "curl -sS -o /tmp/crl.der -w '%{http_code} %{content_type}' -H 'Host: ca.example.com' "
        "http://127.0.0.1/api/crl").stdout) == "200 application/pkix-crl" and text, 30)
    assert crl == "200 application/pkix-crl", crl
    health = machine.sh("curl -sS -k --resolve ca.example.com:443:127.0.0.1 "
                        "https://ca.example.com/api/health").stdout
    assert json.loads(health)["status"] == "ok", health


def test_active_only_once_ready(machine):
    """Type=notify: systemd calls sapid active when it says READY=1, not when it forks; here
    READY=1 comes 2 s after the process starts, once a slow ``boot`` hook returns."""
    with replaced(machine, "/etc/sapid/hooks.py", SLOW_HOOKS):
        machine.sh("touch /etc/sapid/slow-boot")
        try:
            machine.sh(f"systemctl restart --no-block {UNIT}")
            seen = set()

            def settled():
                shown = machine.show("ActiveState", "SubState")
                seen.add((shown["ActiveState"], shown["SubState"]))
                return shown["SubState"] == "running"
            machine.until("sapid running again", settled)
            times = machine.show("ExecMainStartTimestampMonotonic",
                                 "ActiveEnterTimestampMonotonic")
        finally:
            machine.sh("rm -f /etc/sapid/slow-boot")
        assert ("activating", "start") in seen, seen      # the process runs, not yet ready
        assert int(times["ActiveEnterTimestampMonotonic"]) - int(
            times["ExecMainStartTimestampMonotonic"]) >= 2_000_000, times
        assert machine.show("StatusText")["StatusText"].startswith("serving on ")
    machine.sh("systemctl reload sapid")


def test_reload_good_and_broken_hooks(machine):
    """``systemctl reload`` (without procps: the unit's ExecReload is the shell's kill):
    good hooks take over; broken ones leave the old in force, say so in StatusText and say
    why in the journal."""
    assert machine.sh("test -e /bin/kill || test -e /usr/bin/kill", check=False).returncode == 1
    with replaced(machine, "/etc/sapid/hooks.py", SLOW_HOOKS):
        machine.sh("systemctl reload sapid")
        assert machine.sh(f"systemctl is-active {UNIT}").stdout.strip() == "active"
        assert machine.sign("nobody") == {
            "error": "not_authorized", "message": "nobody is refused by the reloaded hooks"}
        assert machine.show("StatusText")["StatusText"].startswith("serving on ")
        with replaced(machine, "/etc/sapid/hooks.py", "import sapid\nclass Hooks(:\n"):
            machine.sh("systemctl reload sapid")
            assert machine.sh(f"systemctl is-active {UNIT}").stdout.strip() == "active"
            # Still signing, with the hooks that were in force.
            assert machine.sign("nobody")["error"] == "not_authorized"
            assert "signed_x509_pem" in machine.sign("other")
            status = machine.show("StatusText")["StatusText"]
            assert re.match(r"reload failed at \d\d:\d\d, serving with the previous setup on ",
                            status), status
            journal = machine.journal("-p", "err", "-n", "5")
            assert "reload failed" in journal and "/etc/sapid/hooks.py:2" in journal, journal
    machine.sh("systemctl reload sapid")
    assert machine.show("StatusText")["StatusText"].startswith("serving on ")


def test_stop_lets_requests_in_flight_finish(machine):
    with replaced(machine, "/etc/sapid/hooks.py", SLOW_HOOKS):
        machine.sh("systemctl reload sapid && rm -f /var/lib/sapid/slow-started")
        machine.sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                   "-keyout /tmp/slow.key -subj /CN=slow -out /tmp/slow.csr 2>/dev/null")
        machine.sh("curl -sS --unix-socket /run/sapid/sapid.sock -T /tmp/slow.csr "
                   "http://sapid/api/csr/slow > /tmp/slow.json 2>&1 &")
        machine.until("the slow request in its hook", lambda: machine.sh(
            "test -e /var/lib/sapid/slow-started", check=False).returncode == 0)
        machine.sh(f"systemctl stop {UNIT}")              # returns once sapid has exited
        reply = json.loads(machine.sh("cat /tmp/slow.json").stdout)
        assert "signed_x509_pem" in reply, reply
        shown = machine.show("Result", "ExecMainStatus", "ActiveState")
        assert shown == {"Result": "success", "ExecMainStatus": "0",
                         "ActiveState": "inactive"}, shown
        assert reply["serial"] in machine.stored()
    machine.sign("device1")                               # the socket starts it again


def test_restarted_after_sigkill_and_by_the_watchdog(machine):
    """Restart=on-failure after SIGKILL; with a short WatchdogSec= (a drop-in), a stopped
    sapid is killed and restarted.  Nothing signed before either is lost."""
    signed = machine.sign("device1")["serial"]
    restarts = int(machine.show("NRestarts")["NRestarts"])
    machine.sh(f"systemctl kill -s KILL {UNIT}")
    machine.until("a restart after SIGKILL", lambda: int(
        (shown := machine.show("NRestarts", "SubState"))["NRestarts"]) == restarts + 1
        and shown["SubState"] == "running", 30)
    assert signed in machine.stored()
    machine.sh("mkdir -p /etc/systemd/system/sapid.service.d && printf '[Service]\\n"
               "WatchdogSec=2s\\n' > /etc/systemd/system/sapid.service.d/watchdog.conf && "
               f"systemctl daemon-reload && systemctl restart {UNIT}")
    try:
        signed = machine.sign("device1")["serial"]
        shown = machine.show("NRestarts", "MainPID")
        time.sleep(3)     # past the watchdog's 2 s: sapid pings as it should while it runs
        assert machine.show("NRestarts", "MainPID", "SubState") == {**shown,
                                                                    "SubState": "running"}
        restarts = int(shown["NRestarts"])
        machine.sh(f"systemctl kill -s STOP {UNIT}")
        machine.until("a restart by the watchdog", lambda: int(
            (shown := machine.show("NRestarts", "SubState"))["NRestarts"]) == restarts + 1
            and shown["SubState"] == "running", 40)
        assert "Watchdog timeout" in machine.sh("journalctl -b --no-pager -u sapid.service "
                                                "-n 30").stdout
        assert signed in machine.stored()
    finally:
        machine.sh("rm -r /etc/systemd/system/sapid.service.d && systemctl daemon-reload && "
                   f"systemctl restart {UNIT}")


def test_the_passphrase_is_only_in_the_credential(machine):
    machine.sign("device1")
    pid = machine.show("MainPID")["MainPID"]
    environ = machine.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
    assert "CREDENTIALS_DIRECTORY=" in environ and PASSPHRASE not in environ
    assert "CA_PASSPHRASE" not in environ
    assert PASSPHRASE not in machine.sh(f"systemctl show {UNIT}").stdout
    assert PASSPHRASE not in machine.sh("journalctl -b --no-pager").stdout
    # Core dumps off: no core size, and not dumpable (so /proc/PID/environ is root's).
    limits = machine.sh(f"cat /proc/{pid}/limits").stdout
    assert re.search(r"Max core file size\s+0\s+0", limits), limits
    assert machine.sh(f"stat -c %U /proc/{pid}/environ").stdout.strip() == "root"


def test_journal_fields_with_and_without_the_systemd_extra(machine):
    serial = machine.sign("device1")["serial"]
    entries = [json.loads(line) for line in machine.journal("-o", "json").splitlines()]
    [entry] = [e for e in entries if f'serial="{serial}"' in e.get("MESSAGE", "")]
    assert "audit outcome=issued" in entry["MESSAGE"] and "SAPID_SERIAL" not in entry
    machine.sh("sudo /opt/sapid/bin/pip install -q '.[systemd]'")
    try:
        machine.sh(f"systemctl restart {UNIT}")
        serial = machine.sign("device1")["serial"]
        found = machine.sh(f"journalctl -b --no-pager -o json SAPID_SERIAL={serial}").stdout
        [entry] = [json.loads(line) for line in found.splitlines()]
        assert (entry["SAPID_CLIENT_ID"], entry["SAPID_OUTCOME"]) == ("device1", "issued"), entry
        assert entry["_SYSTEMD_UNIT"] == UNIT and serial in entry["MESSAGE"]
    finally:
        machine.sh("sudo /opt/sapid/bin/pip uninstall -q -y systemd-python && "
                   f"systemctl restart {UNIT}")


def test_security_exposure_under_the_real_manager(machine):
    done = machine.sh(f"systemd-analyze security {UNIT}")
    found = re.search(r"Overall exposure level for sapid\.service: (\d+\.\d+)", done.stdout)
    assert found and float(found[1]) <= 2.0, done.stdout[-400:]
