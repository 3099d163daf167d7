"""Faults around a running daemon: hooks that hang or raise, reloads that cannot load, a full
disk, a read-only state folder, SIGKILL mid-signing. DESIGN.md: "nothing signed is lost", a failed
write gives 503 store_failed and no certificate, at reload the old setup stays."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from conftest import KeepAliveClient as Client, make_csr, run, write_hooks

PEM_END = b"-----END CERTIFICATE-----\n"


# Reading the issued records as an auditor would ------------------------------------------------

def journal_records(daemon) -> list[tuple[str, str, x509.Certificate]]:
    """(serial, client id, certificate) of each journal record; every record must be whole."""
    data = (daemon.state / "issued.pem").read_bytes()
    assert not data or data.endswith(PEM_END), f"journal ends mid-record: {data[-200:]!r}"
    records = []
    for chunk in data.split(b"# serial ")[1:]:
        header, _, pem = chunk.partition(b"\n")
        match = re.fullmatch(rb"([0-9A-F]+) client ([A-Za-z0-9]+) at \S+Z", header)
        assert match, f"malformed journal header {header!r}"
        certificates = x509.load_pem_x509_certificates(pem)
        assert len(certificates) == 1 and pem.count(b"-----BEGIN") == 1, chunk[:200]
        serial = match[1].decode()
        assert int(serial, 16) == certificates[0].serial_number, serial
        records.append((serial, match[2].decode(), certificates[0]))
    assert data.count(b"-----BEGIN CERTIFICATE-----") == len(records)
    return records


def index_files(daemon, temporary_ok=False) -> dict[str, bytes]:
    """SERIAL -> PEM of ``<state>/issued``; no empty, partial or foreign file is allowed."""
    found = {}
    for path in (daemon.state / "issued").iterdir():
        if path.name.endswith(".tmp") and temporary_ok:
            continue
        assert re.fullmatch(r"[0-9A-F]+\.pem", path.name), f"stray file {path.name}"
        data = path.read_bytes()
        assert data.endswith(PEM_END), f"{path.name} is partial: {data[-100:]!r}"
        certificate = x509.load_pem_x509_certificate(data)
        assert format(certificate.serial_number, "X").zfill(len(path.stem)) == path.stem
        found[path.stem] = data
    return found


def records(daemon, temporary_ok=False) -> tuple[set, dict]:
    """Journal serials and index files (SERIAL -> PEM), each checked whole."""
    journal = {serial for serial, _, _ in journal_records(daemon)}
    index = index_files(daemon, temporary_ok)
    return journal, index


def validity(reply: dict) -> datetime.timedelta:
    certificate = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
    return certificate.not_valid_after_utc - certificate.not_valid_before_utc


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def timed_sign(daemon, csr: Path, client_id: str):
    started = time.monotonic()
    status, reply = daemon.sign(csr, client_id)
    return status, reply, time.monotonic() - started


# Hooks that hang ---------------------------------------------------------------------------------

HANGING_HOOKS = """\
    import os
    import time
    import sapid

    HERE = os.path.dirname(os.path.abspath(__file__))

    def hang(phase, client_id):
        if client_id == "hang" + phase:
            open(os.path.join(HERE, phase + "-started"), "w").close()
            time.sleep(4)
            open(os.path.join(HERE, phase + "-returned"), "w").close()

    class Hooks(sapid.SigningHooks):
        def authorize(self, subject_alt_names):
            hang("authorize", self.client_id)

        def presign(self, draft):
            hang("presign", self.client_id)

        def postsign(self, certificate):
            hang("postsign", self.client_id)
    """


@pytest.mark.parametrize("phase", ["authorize", "presign", "postsign"])
def test_hanging_hook(daemon_factory, tmp_path, phase):
    """hook_timeout = 1: the client gets 503 hook_timeout after about a second while others are
    served; before signing nothing is recorded (not even when the hook returns at last); in
    postsign the certificate is withheld but recorded."""
    hooks = write_hooks(tmp_path, HANGING_HOOKS)
    daemon = daemon_factory(hooks=str(hooks), hook_timeout=1)
    csr = make_csr(tmp_path)
    answers = []
    hanging = threading.Thread(
        target=lambda: answers.append(timed_sign(daemon, csr, "hang" + phase)))
    hanging.start()
    wait_for_file(tmp_path / f"{phase}-started", 5)
    # Meanwhile: health and a signing for someone else, promptly.
    started = time.monotonic()
    status, health, _ = daemon.curl("/api/health")
    assert (status, health["status"]) == (200, "ok"), health
    status, reply, seconds = timed_sign(daemon, csr, "other")
    assert status == 200 and seconds < 0.9, (status, reply, seconds)
    assert time.monotonic() - started < 0.9 and not answers
    hanging.join(10)
    status, reply, seconds = answers[0]
    assert (status, reply["error"]) == (503, "hook_timeout"), reply
    assert "signed_x509_pem" not in reply
    assert 0.9 <= seconds < 2.5, seconds
    # The hook returns at last; what it did is thrown away.
    wait_for_file(tmp_path / f"{phase}-returned", 6)
    time.sleep(0.5)
    journal, index = records(daemon)
    clients = [client for _, client, _ in journal_records(daemon)]
    log = daemon.output()
    if phase == "postsign":
        assert clients.count("hangpostsign") == 1 and len(journal) == len(index) == 2
        assert 'audit outcome=withheld client_id="hangpostsign"' in log
    else:
        assert clients == ["other"] and set(index) == journal and len(journal) == 1
        assert re.search(rf'audit outcome=refused client_id="hang{phase}" .*code="hook_timeout"',
                         log), log
        assert "outcome=issued client_id=\"hang" not in log
    assert daemon.sign(csr, "after")[0] == 200
    assert daemon.process.poll() is None


# Hooks that raise ---------------------------------------------------------------------------------

RAISING_HOOKS = {
    "authorize": """\
        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_id == "boom":
                    raise RuntimeError("inventory unreachable")
        """,
    "presign": """\
        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                if self.client_id == "boom":
                    raise RuntimeError("inventory unreachable")
        """,
    "postsign": """\
        class Hooks(sapid.SigningHooks):
            def postsign(self, certificate):
                if self.client_id == "boom":
                    raise RuntimeError("inventory unreachable")
        """,
    "__init__": """\
        class Hooks(sapid.SigningHooks):
            def __init__(self, client_hash, public_key_hash, csr_tuple):
                super().__init__(client_hash, public_key_hash, csr_tuple)
                if client_hash == "boom":
                    raise RuntimeError("inventory unreachable")
        """,
    # Called once at load to check it; at request time it fails while the flag file exists.
    "serial_number": """\
        FLAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "boom")

        def serial_number():
            if os.path.exists(FLAG):
                raise RuntimeError("inventory unreachable")
            return int.from_bytes(os.urandom(19), "big") >> 1 | 1
        """,
}


@pytest.mark.parametrize("phase", list(RAISING_HOOKS))
def test_raising_hook_is_a_hook_error(daemon_factory, tmp_path, phase):
    """A hooks file overriding just that phase, which raises: 500 hook_error with no detail, the
    traceback in the log, an audit line; the daemon goes on signing for others."""
    source = "import os\nimport sapid\n\n" + textwrap.dedent(RAISING_HOOKS[phase])
    hooks = write_hooks(tmp_path, source)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    if phase == "serial_number":
        (tmp_path / "boom").touch()
    status, reply = daemon.sign(csr, "boom")
    (tmp_path / "boom").unlink(missing_ok=True)
    assert (status, reply.get("error")) == (500, "hook_error"), reply
    assert "inventory" not in reply["message"] and "Traceback" not in reply["message"]
    assert "signed_x509_pem" not in reply
    log = daemon.output()
    assert "RuntimeError: inventory unreachable" in log and "Traceback" in log, log
    outcome = "withheld" if phase == "postsign" else "refused"
    assert re.search(rf'audit outcome={outcome} client_id="boom" .*code="hook_error"', log), log
    journal, index = records(daemon)
    assert len(journal) == len(index) == (1 if phase == "postsign" else 0)
    status, reply = daemon.sign(csr, "fine")
    assert status == 200, reply
    assert daemon.process.poll() is None


# Reloads that cannot load ------------------------------------------------------------------------

HOOKS_DAYS = textwrap.dedent("""\
    import datetime
    import sapid

    class Hooks(sapid.SigningHooks):
        def authorize(self, subject_alt_names):
            return datetime.timedelta(days=DAYS)
    """)
RELOAD_CASES = ["hooks deleted", "hooks syntax error", "boot raises", "boot exits",
                "identity moved away", "certificate garbage"]


@pytest.mark.parametrize("case", RELOAD_CASES)
def test_failed_reload_keeps_the_old_setup(daemon_factory, identities, tmp_path, case):
    """SIGHUP with a broken hooks file or identity: READY=1 comes back, the log says why, and the
    old hooks and identity keep signing. Then a good reload takes effect (the negative twin)."""
    identity = tmp_path / "identity"
    shutil.copytree(identities("p256"), identity)
    old_ca = x509.load_pem_x509_certificate((identity / "ca.cert.pem").read_bytes())
    hooks = write_hooks(tmp_path, HOOKS_DAYS.replace("DAYS", "7"))
    daemon = daemon_factory(hooks=str(hooks), identity=identity)
    csr = make_csr(tmp_path)

    def signed_by_old_setup():
        status, reply = daemon.sign(csr)
        assert status == 200, reply
        certificate = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
        certificate.verify_directly_issued_by(old_ca)
        assert validity(reply).days == 7, validity(reply)
    signed_by_old_setup()

    if case == "hooks deleted":
        hooks.unlink()
        why = f"{hooks}: No such file"
    elif case == "hooks syntax error":
        write_hooks(tmp_path, HOOKS_DAYS.replace("DAYS", "14") + "def broken(:\n")
        why = f"{hooks}:7: syntax error"
    elif case == "boot raises":
        write_hooks(tmp_path, HOOKS_DAYS.replace("DAYS", "14") +
                    "\ndef boot(authority):\n    raise RuntimeError('inventory unreachable')\n")
        why = "boot refused: RuntimeError: inventory unreachable"
    elif case == "boot exits":
        write_hooks(tmp_path, HOOKS_DAYS.replace("DAYS", "14") +
                    "\nimport sys\n\ndef boot(authority):\n    sys.exit('inventory unreachable')\n")
        why = "inventory unreachable"
    elif case == "identity moved away":
        identity.rename(tmp_path / "identity.away")
        why = f"{identity}: no identity folder"
    else:
        (identity / "ca.cert.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n"
                                              "-----END CERTIFICATE-----\n")
        why = f"{identity / 'ca.cert.pem'}: not a PEM certificate"
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    log = daemon.output()
    assert "reload failed" in log and why in log, log[-2000:]
    signed_by_old_setup()
    assert daemon.curl("/api/health")[1]["status"] == "ok"

    # The negative twin: a good reload changes what is signed, so the checks above can tell.
    if case.startswith(("identity", "certificate")):
        shutil.rmtree(identity, ignore_errors=True)
        shutil.copytree(identities("p384"), identity)
    write_hooks(tmp_path, HOOKS_DAYS.replace("DAYS", "14"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    assert validity(reply).days == 14
    new_ca = x509.load_pem_x509_certificate(reply["ca_x509_pem"].encode())
    assert (new_ca == old_ca) == (not case.startswith(("identity", "certificate")))
    assert daemon.output().count("reload failed") == 1


# The state folder: full, read-only ---------------------------------------------------------------

class Mounts:
    """Mounts made by a test, undone (after stopping the daemons using them) at teardown."""

    def __init__(self):
        self.points, self.daemons = [], []

    def mount(self, *args):
        run(["mount", *map(str, args)])
        if "remount" not in " ".join(map(str, args)):
            self.points.append(str(args[-1]))

    def undo(self):
        for daemon in self.daemons:
            daemon.close()
        for point in reversed(self.points):
            if run(["umount", point], check=False).returncode != 0:
                run(["umount", "-l", point], check=False)


@pytest.fixture
def mounts():
    made = Mounts()
    yield made
    made.undo()


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = b"\0" * 4096
    try:
        while True:
            os.write(fd, block)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)


def assert_store_failed(daemon, csr: Path, journal_before: set, journal_bytes: int):
    status, reply = daemon.sign(csr, "refused")
    assert (status, reply.get("error")) == (503, "store_failed"), reply
    assert "signed_x509_pem" not in reply and "BEGIN" not in json.dumps(reply)
    journal, index = records(daemon)
    assert journal == journal_before and set(index) == journal
    assert (daemon.state / "issued.pem").stat().st_size == journal_bytes
    assert daemon.curl("/api/health")[1]["status"] == "ok"


def test_full_disk(daemon_factory, mounts, tmp_path):
    """The state folder on a 384 KiB tmpfs. Full: 503 store_failed, no partial file in the index,
    the journal holds whole records only; with room for the index file but not for the journal's
    next page, the same. Once there is room again, signing works without a restart."""
    daemon = daemon_factory(start=False)
    daemon.state.mkdir()
    mounts.mount("-t", "tmpfs", "-o", "size=384k,mode=0750", "tmpfs", daemon.state)
    mounts.daemons.append(daemon)
    daemon.start()
    csr = make_csr(tmp_path)
    journal = daemon.state / "issued.pem"
    # Sign until the journal's last page has no room for another record.
    record = 0
    while True:
        before = journal.stat().st_size
        status, reply = daemon.sign(csr, "early")
        assert status == 200, reply
        record = max(record, journal.stat().st_size - before)
        if (-journal.stat().st_size) % 4096 < record:
            break
    signed, _ = records(daemon)
    size = journal.stat().st_size

    filler = daemon.state / "filler"
    fill(filler)
    assert_store_failed(daemon, csr, signed, size)
    log = daemon.output()
    assert "not recorded, so not returned" in log and "No space left on device" in log

    # One free page: the index file fits, the journal's append does not.
    os.truncate(filler, filler.stat().st_size - 4096)
    assert_store_failed(daemon, csr, signed, size)
    assert f"{journal}: No space left on device" in daemon.output(), daemon.output()[-2000:]

    filler.unlink()
    status, reply = daemon.sign(csr, "later")
    assert status == 200, reply
    journal_now, index = records(daemon)
    assert journal_now == signed | {reply["serial"]} and set(index) == journal_now


def test_read_only_state(daemon_factory, mounts, tmp_path):
    """The state folder made read-only under the running daemon: 503 store_failed and nothing
    written; read-write again: signing works without a restart. (A file system with a file open
    for writing cannot be remounted read-only, and the daemon holds its journal open: the state
    folder is bind-mounted on itself and that mount made read-only, as an operator would.)"""
    daemon = daemon_factory()
    mounts.daemons.append(daemon)
    csr = make_csr(tmp_path)
    status, reply = daemon.sign(csr, "early")
    assert status == 200, reply
    signed, _ = records(daemon)
    size = (daemon.state / "issued.pem").stat().st_size
    mounts.mount("--bind", daemon.state, daemon.state)
    mounts.mount("-o", "remount,bind,ro", daemon.state)
    assert_store_failed(daemon, csr, signed, size)
    assert "Read-only file system" in daemon.output()
    mounts.mount("-o", "remount,bind,rw", daemon.state)
    status, reply = daemon.sign(csr, "later")
    assert status == 200, reply
    journal, index = records(daemon)
    assert journal == signed | {reply["serial"]} and set(index) == journal


# SIGKILL -----------------------------------------------------------------------------------------

def test_sigkill_while_a_hook_sleeps(daemon_factory, tmp_path):
    """kill -9 while presign sleeps: the next start is clean, nothing half-made is left, and what
    was issued before is all there."""
    hooks = write_hooks(tmp_path, """\
        import os
        import time
        import sapid

        HERE = os.path.dirname(os.path.abspath(__file__))

        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                if self.client_id == "sleepy":
                    open(os.path.join(HERE, "sleeping"), "w").close()
                    time.sleep(30)
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    received = {}
    for n in range(3):
        status, reply = daemon.sign(csr, f"before{n}")
        assert status == 200, reply
        received[reply["serial"]] = reply["signed_x509_pem"].encode()
    answers = []

    def sleepy():
        try:
            answers.append(Client(daemon.socket).sign(csr.read_bytes(), "sleepy"))
        except OSError as e:
            answers.append(e)
    thread = threading.Thread(target=sleepy)
    thread.start()
    wait_for_file(tmp_path / "sleeping", 5)
    daemon.process.kill()
    assert daemon.process.wait(5) == -signal.SIGKILL
    thread.join(5)
    assert isinstance(answers[0], ConnectionError), answers
    daemon.start()
    journal, index = records(daemon)
    assert journal == set(received) and set(index) == journal
    assert all(index[serial] == pem for serial, pem in received.items())
    assert "sleepy" not in {client for _, client, _ in journal_records(daemon)}
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 3
    assert daemon.sign(csr, "after")[0] == 200
    assert "Traceback" not in daemon.output()


def test_sigkill_under_load(daemon_factory, tmp_path):
    """kill -9 while 32 clients sign as fast as they can: the next start is clean, and every
    certificate a client received is in the journal and in the index, byte for byte."""
    daemon = daemon_factory()
    csrs = [make_csr(tmp_path, name=f"load{n}").read_bytes() for n in range(4)]
    received, failures = {}, []
    lock = threading.Lock()
    enough = threading.Event()

    def client(number):
        try:
            connection = Client(daemon.socket, timeout=10)
            for i in range(100000):
                status, reply = connection.sign(csrs[i % len(csrs)], f"load{number}")
                if status != 200:
                    failures.append((status, reply))
                    return
                with lock:
                    received[reply["serial"]] = reply["signed_x509_pem"].encode()
                    if len(received) >= 300:
                        enough.set()
        except (OSError, ValueError):
            return          # killed under it

    threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    assert enough.wait(60), f"only {len(received)} signed"
    daemon.process.kill()
    assert daemon.process.wait(5) == -signal.SIGKILL
    for thread in threads:
        thread.join(10)
    assert not failures, failures[:3]
    with lock:
        received = dict(received)
    # Before the restart, as the kill left it (a torn journal tail is the restart's to cut).
    headers = set(re.findall(rb"# serial ([0-9A-F]+) ", (daemon.state / "issued.pem").read_bytes()))
    left = {path.stem.encode() for path in (daemon.state / "issued").glob("*.pem")}
    started = time.monotonic()
    daemon.start()
    journal, index = records(daemon)
    print(f"\n{len(received)} received before kill -9, {len(journal)} in the journal; index files "
          f"without a journal record: {len(left - headers)} after the kill, "
          f"{len(set(index) - journal)} after the restart, which took "
          f"{time.monotonic() - started:.1f} s")
    missing = set(received) - journal
    assert not missing, f"{len(missing)} certificates received but not in the journal"
    assert all(index.get(serial) == pem for serial, pem in received.items())
    assert daemon.curl("/api/health")[1]["certificates_issued"] == len(journal)
    status, reply = daemon.sign(tmp_path / "load0.pem", "after")
    assert status == 200, reply
    assert "Traceback" not in daemon.output()
    # The index is rebuilt from the journal: after the restart it holds nothing the journal
    # lacks (an index file written just before the kill, its journal append never made).
    orphans = set(index) - journal
    assert not orphans, (f"after the restart {len(orphans)} index files have no journal record: "
                         f"signed, never returned, not journaled: {sorted(orphans)[:3]}")
