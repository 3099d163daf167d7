"""Shared fixtures: CA identities made by ``sapid init``, a real daemon on a temporary socket
that reports READY=1 on a notify socket the test binds, and clients (curl, openssl) run as
separate processes, as operators and devices run them."""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import sqlite3
import tempfile
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


SAPID = [sys.executable, str(ROOT / "sapid")]
PASSPHRASE = "correct horse battery staple"
OPENSSL_KEYS = {
    "rsa2048": ["-newkey", "rsa:2048"],
    "rsa1024": ["-newkey", "rsa:1024"],
    "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "ed25519": ["-newkey", "ed25519"],
}


def run(command, *, env=None, input=None, check=True, timeout=120):
    """Run a command; its output as text. A failure shows what the command said."""
    done = subprocess.run(command, env=env, input=input, capture_output=True, timeout=timeout,
                          text=isinstance(input, str) or input is None)
    if check and done.returncode != 0:
        raise AssertionError(f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def sapid_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "CREDENTIALS_DIRECTORY",
                        "INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_USEC", "SAPID_CONFIG")}
    env["CA_PASSPHRASE"] = PASSPHRASE
    env.update(extra)
    return env


def make_identity(folder: Path, key: str = "p256", *fields: str) -> Path:
    fields = fields or ("CN", f"Test CA {key}", "O", "sapid tests")
    args = [*SAPID, "init", "-d", str(folder), "--key", key]
    for name, value in zip(fields[::2], fields[1::2]):
        args += ["-f", name, value]
    run(args, env=sapid_env())
    return folder


@pytest.fixture(scope="session")
def identities(tmp_path_factory):
    """Lazily made CA identities by key type, shared read-only by every test."""
    made = {}

    def get(key: str = "p256") -> Path:
        if key not in made:
            made[key] = make_identity(tmp_path_factory.mktemp(f"ca-{key}") / "identity", key)
        return made[key]
    return get


def make_csr(folder: Path, key: str = "p256", subject: str = "/CN=device1",
             sans: str | None = "DNS:device1.example", extra: tuple = (), der: bool = False,
             name: str = "req") -> Path:
    """A CSR made by ``openssl req`` (with a fresh key) in ``folder``."""
    out = folder / f"{name}.{'der' if der else 'pem'}"
    args = ["openssl", "req", "-new", *OPENSSL_KEYS[key], "-nodes", "-keyout",
            str(folder / f"{name}.key"), "-subj", subject, "-out", str(out)]
    if sans:
        args += ["-addext", f"subjectAltName={sans}"]
    for item in extra:
        args += ["-addext", item]
    if der:
        args += ["-outform", "DER"]
    run(args)
    return out


def stored(state: Path, uri: str | None = None) -> list[dict]:
    """Every certificate in a store, in the order added, read as an operator's script would:
    with sqlite3 from ``<state>/sapid.db``, or with psycopg from a postgresql:// ``uri``.  Each
    row's DER must parse, and its serial and fingerprint be the certificate's."""
    query = ("SELECT serial, client_id, subject, sans, not_before, not_after, sha256, der,"
             " issued_at, revoked_at, revocation_reason FROM certificates")
    if uri:
        import psycopg
        with psycopg.connect(uri, user="root") as connection:     # peer auth, as root
            cursor = connection.execute(query + " ORDER BY issued_at, serial")
            names = [column.name for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    else:
        path = state / "sapid.db"
        if not path.exists():
            return []
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cursor = connection.execute(query + " ORDER BY rowid")
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            connection.close()
    from cryptography import x509
    for row in rows:
        row["der"] = bytes(row["der"])
        certificate = x509.load_der_x509_certificate(row["der"])
        assert format(certificate.serial_number, "X").zfill(len(row["serial"])) == row["serial"]
        assert len(row["serial"]) % 2 == 0 and row["serial"].upper() == row["serial"]
        assert hashlib.sha256(row["der"]).hexdigest() == row["sha256"], row["serial"]
        row["certificate"] = certificate
    return rows


class Daemon:
    """A ``sapid serve`` process on a socket in a temporary folder."""

    def __init__(self, folder: Path, identity: Path, hooks: str | None = "", env=None,
                 **settings):
        self.folder = folder
        self.socket = str(folder / "sapid.sock")
        self.state = folder / "state"
        self.config = folder / "sapid.conf"
        self.log_path = folder / "sapid.log"
        lines = [f"identity = {identity}", f"state = {self.state}", f"socket = {self.socket}",
                 f"hooks = {hooks if hooks is not None else ''}"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        self.config.write_text("[sapid]\n" + "\n".join(lines) + "\n")
        self.identity = identity
        self.store_uri = settings.get("store")
        self.env = env or {}
        self.process = None
        self.notify = None

    def stored(self) -> list[dict]:
        """The rows of this daemon's store (see ``stored``)."""
        return stored(self.state, self.store_uri)

    def start(self, args=(), wait=True, command=None):
        notify_path = str(self.folder / "notify.sock")
        if self.notify is not None:          # a restart
            self.notify.close()
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        env = sapid_env(NOTIFY_SOCKET=notify_path, **self.env)
        self.log = open(self.log_path, "ab")
        command = command or [*SAPID, "serve", "-c", str(self.config), *args]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=self.log, start_new_session=True)
        if wait:
            self.wait_for("READY=1")
        return self

    def messages(self, timeout=10.0):
        """Yield notify messages as they come, until ``timeout`` passes without one."""
        self.notify.settimeout(timeout)
        while True:
            try:
                yield self.notify.recv(4096).decode()
            except socket.timeout:
                return

    def wait_for(self, field: str, timeout=20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"sapid exited {self.process.returncode}:\n{self.output()}")
            self.notify.settimeout(0.2)
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            if field in message.split("\n"):
                return message
        raise AssertionError(f"no {field} within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"sapid did not stop on {sig!r}:\n{self.output()}")

    def close(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if getattr(self, "log", None):
            self.log.close()

    # Clients ---------------------------------------------------------------------------------

    def curl(self, path: str, method: str = "GET", data: Path | bytes | None = None,
             headers: dict | None = None):
        """(status, parsed JSON or text, headers text) of one request made with curl."""
        return curl(self.socket, path, method, data, headers, self.folder)

    def sign(self, csr: Path, client_id: str = "device1"):
        status, body, _ = self.curl(f"/api/csr/{client_id}", "PUT", csr)
        return status, body

    def raw(self, data: bytes, timeout=10.0) -> bytes:
        """Send raw bytes on a fresh connection; everything the server says until it closes."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket)
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def ca_pem(self) -> Path:
        path = self.folder / "ca-from-api.pem"
        status, text, _ = self.curl("/api/ca")
        assert status == 200, text
        path.write_text(text)
        return path


def curl(sock: str, path: str, method: str = "GET", data=None, headers=None, folder=None):
    args = ["curl", "-sS", "--unix-socket", sock, "-X", method, "-D", "-",
            "-w", "\n%{http_code}"]
    if data is not None:
        if isinstance(data, bytes):
            tmp = Path(folder) / f"body-{time.monotonic_ns()}"
            tmp.write_bytes(data)
            data = tmp
        args += ["--data-binary", f"@{data}"]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    done = run([*args, f"http://sapid{path}"], check=False)
    assert done.returncode == 0, f"curl failed: {done.stderr}"
    text, _, status = done.stdout.rpartition("\n")
    head, _, body = text.partition("\n\n")      # text mode has turned CRLF into LF
    while head.startswith("HTTP/1.1 100"):
        head, _, body = body.partition("\n\n")
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body
    return int(status), parsed, head


def open_local_authority(folder: Path, state: Path, hooks=None, **settings):
    """An Authority in process, over a real SQLite store in ``state``; and what closes it."""
    import sapid
    store = sapid.SQLiteStore(str(state / "sapid.db"))
    store.prepare()
    committer = sapid.Committer(store)
    config = sapid.Config(identity=str(folder), state=str(state), **settings)
    identity = sapid.Identity.load(str(folder), PASSPHRASE)
    authority = sapid.Authority(config, identity, hooks or sapid.BUILTIN_HOOKS, committer,
                                sapid.HookRunner(1))

    def close():
        committer.close()
        store.close()
    return authority, close


@pytest.fixture
def authority_for(tmp_path):
    """``authority_for(identity folder, **settings)``: an in-process Authority (see above)."""
    closers = []

    def make(folder, **settings):
        authority, close = open_local_authority(folder, tmp_path / f"store{len(closers)}",
                                                **settings)
        closers.append(close)
        return authority
    yield make
    for close in closers:
        close()


# PostgreSQL --------------------------------------------------------------------------------------

def postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    assert found, f"{name} not found: .ci/run installs Debian's postgresql"
    return str(found[-1])


class PostgresCluster:
    """A PostgreSQL server of the tests' own (Debian's binaries, run as the postgres user) in
    a private folder, listening only on a Unix socket there; root, as which the tests and
    their daemons run, logs in by peer authentication as the role ``root``; the role
    ``sapidpw`` logs in with the password ``PASSWORD`` instead."""

    PASSWORD = "store password 42"

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="sapid-pg-"))
        self.data, self.sockets = self.folder / "data", self.folder / "run"
        self.sockets.mkdir()
        shutil.chown(self.folder, "postgres", "postgres")
        shutil.chown(self.sockets, "postgres", "postgres")
        self.as_postgres(postgres_bin("initdb"), "-D", self.data, "-A", "peer", "-U", "postgres",
                         "--no-sync")
        hba = self.data / "pg_hba.conf"
        hba.write_text("local all sapidpw scram-sha-256\n" + hba.read_text())
        self.start()
        self.as_postgres(postgres_bin("psql"), "-h", self.sockets, "-U", "postgres", "-d",
                         "postgres", "-c", "CREATE ROLE root SUPERUSER LOGIN", "-c",
                         f"CREATE ROLE sapidpw LOGIN PASSWORD '{self.PASSWORD}'")
        self.count = 0

    def as_postgres(self, *args, check=True):
        return run(["runuser", "-u", "postgres", "--", *map(str, args)], check=check)

    def start(self):
        self.as_postgres(postgres_bin("pg_ctl"), "-D", self.data, "-l", self.folder / "log",
                         "-w", "-o", f"-k {self.sockets} -c listen_addresses=''", "start")

    def stop(self):
        self.as_postgres(postgres_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop",
                         check=False)

    def database(self, owner: str | None = None) -> str:
        """A new, empty database (of ``owner``, who then logs in to it); its libpq URI."""
        self.count += 1
        name = f"sapid{self.count}"
        run(["psql", "-h", str(self.sockets), "-d", "postgres", "-c",
             f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else "")])
        return f"postgresql://{owner + '@' if owner else ''}/{name}?host={self.sockets}"

    def close(self):
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    cluster = PostgresCluster()
    yield cluster
    cluster.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request):
    """The ``store`` setting of each backend: unset (SQLite) or a new PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"store": request.getfixturevalue("postgres").database()}


@pytest.fixture
def daemon_factory(tmp_path, identities):
    """Start daemons with ``factory(key=..., hooks=..., **settings)``; all stopped after."""
    started = []

    def factory(key="p256", hooks="", identity=None, env=None, start=True, **settings):
        folder = tmp_path / f"d{len(started)}"
        folder.mkdir()
        daemon = Daemon(folder, identity or identities(key), hooks, env, **settings)
        started.append(daemon)
        return daemon.start() if start else daemon
    yield factory
    for daemon in started:
        daemon.close()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory()


def write_hooks(folder: Path, source: str, name="hooks.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    path.chmod(0o644)
    return path


def openssl_verify(ca: Path, *certs: Path, untrusted: Path | None = None):
    args = ["openssl", "verify", "-CAfile", str(ca)]
    if untrusted:
        args += ["-untrusted", str(untrusted)]
    return run([*args, *map(str, certs)], check=False)


def save_certificate(folder: Path, reply: dict, name="cert.pem") -> Path:
    path = folder / name
    path.write_text(reply["signed_x509_pem"])
    return path


class KeepAliveClient:
    """A keep-alive HTTP/1.1 client on the daemon's Unix socket."""

    def __init__(self, path: str, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the daemon")
        self.buffer += chunk

    def sign(self, csr: bytes, client_id: str):
        self.sock.sendall(
            f"PUT /api/csr/{client_id} HTTP/1.1\r\nHost: sapid\r\nContent-Type: "
            f"application/pkcs10\r\nContent-Length: {len(csr)}\r\n\r\n".encode() + csr)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)[1])
        self.buffer = rest
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, json.loads(body)

    def close(self):
        self.sock.close()
