"""Faults around a running daemon: hooks that hang or raise, reloads that cannot load, a full
disk, a read-only state folder, SIGKILL mid-signing. DESIGN.md: "nothing signed is lost", a failed
write gives 503 store_failed and no certificate, at reload the old setup stays."""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import KeepAliveClient as Client, PostgresCluster, make_csr, run, write_hooks

PEM_END = b"-----END CERTIFICATE-----\n"


# Reading the store as an auditor would ------------------------------------------------------

def clients(daemon) -> dict[str, str]:
    """SERIAL -> client id of every certificate in the daemon's store (each row checked whole
    by ``stored``)."""
    return {row["serial"]: row["client_id"] for row in daemon.stored()}


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
    recorded = sorted(clients(daemon).values())
    log = daemon.output()
    if phase == "postsign":
        assert recorded == ["hangpostsign", "other"]
        assert 'audit outcome=withheld client_id="hangpostsign"' in log
    else:
        assert recorded == ["other"]
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
    assert list(clients(daemon).values()) == (["boom"] if phase == "postsign" else [])
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


def assert_store_failed(daemon, csr: Path, before: dict, client_id: str = "refused") -> None:
    """One signing: 503 store_failed, no certificate in the answer, the store as it was."""
    status, reply = daemon.sign(csr, client_id)
    assert (status, reply.get("error")) == (503, "store_failed"), reply
    assert "signed_x509_pem" not in reply and "BEGIN" not in json.dumps(reply)
    assert reply["message"] == "the CA cannot record certificates right now"
    assert clients(daemon) == before
    assert re.search(rf'audit outcome=refused client_id="{client_id}" .*code="store_failed"',
                     daemon.output())


def assert_signs_again(daemon, csr: Path, before: dict) -> None:
    """Service is back without a restart: a signing is stored, the health check counts it."""
    status, reply = daemon.sign(csr, "later")
    assert status == 200, reply
    assert clients(daemon) == {**before, reply["serial"]: "later"}
    status, health, _ = daemon.curl("/api/health")
    assert (status, health["certificates_issued"]) == (200, len(before) + 1), health
    assert "Traceback" not in daemon.output()


def signed_before(daemon, csr: Path, count: int = 3) -> dict:
    for n in range(count):
        status, reply = daemon.sign(csr, f"early{n}")
        assert status == 200, reply
    before = clients(daemon)
    assert len(before) == count
    return before


def integrity(database: Path) -> str:
    return run(["sqlite3", str(database), "PRAGMA integrity_check;"]).stdout.strip()


def test_full_disk(daemon_factory, mounts, tmp_path):
    """The state folder on a small tmpfs, filled: 503 store_failed and nothing half-written
    (the database passes SQLite's integrity check); once there is room, signing resumes."""
    daemon = daemon_factory(start=False)
    daemon.state.mkdir()
    mounts.mount("-t", "tmpfs", "-o", "size=2m,mode=0750", "tmpfs", daemon.state)
    mounts.daemons.append(daemon)
    daemon.start()
    csr = make_csr(tmp_path)
    before = signed_before(daemon, csr)
    filler = daemon.state / "filler"
    fill(filler)
    # The first commits may still fit in pages the WAL already has: sign until the disk says no.
    for attempt in range(200):
        status, reply = daemon.sign(csr, f"filling{attempt}")
        if status != 200:
            break
        before[reply["serial"]] = f"filling{attempt}"
    assert (status, reply["error"]) == (503, "store_failed"), reply
    assert clients(daemon) == before
    assert_store_failed(daemon, csr, before)
    log = daemon.output()
    assert "not recorded, so not returned" in log and "database or disk is full" in log, log
    filler.unlink()
    assert integrity(daemon.state / "sapid.db") == "ok"
    assert_signs_again(daemon, csr, before)


def test_read_only_state(daemon_factory, mounts, tmp_path):
    """The state folder made read-only under the running daemon (bind-mounted on itself and
    that mount made read-only, as an operator would for maintenance): 503 store_failed and
    nothing written; read-write again: signing resumes without a restart."""
    daemon = daemon_factory()
    mounts.daemons.append(daemon)
    csr = make_csr(tmp_path)
    before = signed_before(daemon, csr)
    mounts.mount("--bind", daemon.state, daemon.state)
    mounts.mount("-o", "remount,bind,ro", daemon.state)
    assert_store_failed(daemon, csr, before)
    assert "Read-only file system" in daemon.output()
    status, health, _ = daemon.curl("/api/health")     # reading still works
    assert (status, health["certificates_issued"]) == (200, 3), health
    mounts.mount("-o", "remount,bind,rw", daemon.state)
    assert_signs_again(daemon, csr, before)


def hold_lock(daemon):
    """Another session holding the store's write lock: an operator's open transaction."""
    if daemon.store_uri:
        import psycopg
        connection = psycopg.connect(daemon.store_uri)
        connection.execute("LOCK TABLE certificates IN ACCESS EXCLUSIVE MODE")
        return connection
    connection = sqlite3.connect(daemon.state / "sapid.db", isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


def test_locked_store(daemon_factory, store, tmp_path):
    """A store another session keeps locked: after the 5 s a commit waits, 503 store_failed;
    once the lock is let go, signing resumes."""
    daemon = daemon_factory(**store)
    csr = make_csr(tmp_path)
    before = signed_before(daemon, csr)
    holder = hold_lock(daemon)
    try:
        started = time.monotonic()
        status, reply = daemon.sign(csr, "refused")
        waited = time.monotonic() - started
        assert (status, reply.get("error")) == (503, "store_failed"), reply
        assert "signed_x509_pem" not in reply
        assert 4.5 < waited < 15, waited
        assert "lock" in daemon.output().rsplit("not recorded, so not returned", 1)[1], \
            daemon.output()[-1000:]
    finally:
        holder.rollback() if daemon.store_uri else holder.execute("ROLLBACK")
        holder.close()
    assert clients(daemon) == before
    assert_signs_again(daemon, csr, before)


def test_a_store_file_replaced_by_a_broken_one(daemon, tmp_path):
    """The operator puts a broken file where the store was (a bad restore) and then the good
    one back, under the running daemon: 503 store_failed meanwhile, nothing written into the
    old file behind the operator's back, and signing resumes with the file put back."""
    csr = make_csr(tmp_path)
    before = signed_before(daemon, csr)
    database = daemon.state / "sapid.db"
    aside = tmp_path / "aside.db"
    run(["sqlite3", str(database), f".backup {aside}"])
    database.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.write_bytes(b"not a database, whatever its name says\n" * 200)
    status, reply = daemon.sign(csr, "refused")
    assert (status, reply.get("error")) == (503, "store_failed"), reply
    assert "file is not a database" in daemon.output()
    status, health, _ = daemon.curl("/api/health")
    assert (status, health["status"]) == (503, "store_failed"), health
    database.unlink()
    shutil.copy(aside, database)
    assert clients(daemon) == before
    assert_signs_again(daemon, csr, before)


def test_postgresql_goes_away_and_comes_back(daemon_factory, tmp_path):
    """The shared PostgreSQL stops (a restart, a failover) under the running daemon: 503
    store_failed, the health check says so; once it is back, signing resumes by itself."""
    cluster = PostgresCluster()
    try:
        daemon = daemon_factory(store=cluster.database())
        csr = make_csr(tmp_path)
        before = signed_before(daemon, csr)
        cluster.stop()
        status, reply = daemon.sign(csr, "refused")
        assert (status, reply.get("error")) == (503, "store_failed"), reply
        assert "signed_x509_pem" not in reply
        status, health, _ = daemon.curl("/api/health")
        assert (status, health["status"]) == (503, "store_failed"), health
        cluster.start()
        assert clients(daemon) == before
        assert_signs_again(daemon, csr, before)
    finally:
        cluster.close()


def test_postgresql_turns_read_only(daemon_factory, postgres, tmp_path):
    """The database turns read-only under the daemon (as a standby does after a failover):
    503 store_failed, nothing written; read-write again: signing resumes by itself."""
    uri = postgres.database()
    name = urllib.parse.urlsplit(uri).path.lstrip("/")
    daemon = daemon_factory(store=uri)
    csr = make_csr(tmp_path)
    before = signed_before(daemon, csr)

    def switch(read_only):
        import psycopg
        with psycopg.connect(uri, autocommit=True) as connection:
            connection.execute("SET default_transaction_read_only = off")
            connection.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = "
                               f"{'on' if read_only else 'off'}")
            connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                               "datname = %s AND pid <> pg_backend_pid()", (name,))

    switch(True)
    assert_store_failed(daemon, csr, before, "refused1")
    assert_store_failed(daemon, csr, before, "refused2")
    assert "read-only transaction" in daemon.output(), daemon.output()[-2000:]
    switch(False)
    assert_signs_again(daemon, csr, before)


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
        received[reply["serial"]] = reply["signed_x509_pem"]
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
    assert {row["serial"]: pem_of(row) for row in daemon.stored()} == received
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 3
    assert daemon.sign(csr, "after")[0] == 200
    assert "Traceback" not in daemon.output()


def pem_of(row: dict) -> str:
    return row["certificate"].public_bytes(serialization.Encoding.PEM).decode()


def test_sigkill_under_load(daemon_factory, store, tmp_path):
    """kill -9 at a random moment while 32 clients sign as fast as they can, three times: after
    each restart, every certificate a client received is in the store, byte for byte, and
    the count is what the store holds."""
    daemon = daemon_factory(**store)
    csrs = [make_csr(tmp_path, name=f"load{n}").read_bytes() for n in range(4)]
    received = {}
    chooser = random.Random(15)
    for round_ in range(3):
        failures, lock = [], threading.Lock()
        enough = threading.Event()
        target = len(received) + chooser.randint(50, 250)

        def client(number):
            try:
                connection = Client(daemon.socket, timeout=10)
                for i in range(100000):
                    status, reply = connection.sign(csrs[i % len(csrs)], f"r{round_}c{number}")
                    if status != 200:
                        failures.append((status, reply))
                        return
                    with lock:
                        received[reply["serial"]] = reply["signed_x509_pem"]
                        if len(received) >= target:
                            enough.set()
            except (OSError, ValueError):
                return          # killed under it

        threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        assert enough.wait(60), f"only {len(received)} signed"
        time.sleep(chooser.random() * 0.05)
        daemon.process.kill()
        assert daemon.process.wait(5) == -signal.SIGKILL
        for thread in threads:
            thread.join(10)
        assert not failures, failures[:3]
        daemon.start()
        rows = {row["serial"]: pem_of(row) for row in daemon.stored()}
        with lock:
            missing = set(received) - set(rows)
            assert not missing, f"{len(missing)} certificates received but not in the store"
            assert all(rows[serial] == pem for serial, pem in received.items())
        print(f"\nround {round_}: {len(received)} received, {len(rows)} in the store")
        assert daemon.curl("/api/health")[1]["certificates_issued"] == len(rows)
    status, reply = daemon.sign(tmp_path / "load0.pem", "after")
    assert status == 200, reply
    assert "Traceback" not in daemon.output()


def test_a_postgresql_restarted_while_idle_costs_no_request(daemon_factory, tmp_path):
    """The server restarted between two requests (nothing was in flight): the daemon's kept
    connections are dead, and the next signing and health check still succeed, each on a new
    connection."""
    cluster = PostgresCluster()
    try:
        daemon = daemon_factory(store=cluster.database())
        csr = make_csr(tmp_path)
        before = signed_before(daemon, csr)
        assert daemon.curl("/api/health")[0] == 200
        cluster.stop()
        cluster.start()
        status, reply = daemon.sign(csr, "after")
        assert status == 200, reply
        status, health, _ = daemon.curl("/api/health")
        assert (status, health["certificates_issued"]) == (200, len(before) + 1), health
    finally:
        cluster.close()
