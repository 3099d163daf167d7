"""TLS peers for the interoperability tests: servers that listen on 127.0.0.1 on a port the OS
picks (never a guessed one), and the clients that talk to them, each a real TLS stack.

A server is a context manager: ``with OpenSSLServer(...) as server`` (or a fixture holding an
``ExitStack``) stops it whatever the test does. Clients return what they saw; the tests judge."""

from __future__ import annotations

import queue
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"
HOSTNAME = "localhost"          # the name the certificates carry; /etc/hosts maps it to HOST
REQUEST = "GET / HTTP/1.0\r\n\r\n"
TIMEOUT = 10.0


class OpenSSLServer:
    """``openssl s_server -www``: answers ``GET /`` with a status page once the handshake is
    through. With ``client_ca`` it demands a client certificate and verifies it (``-Verify 1``),
    so a refused client gets an alert instead of the page."""

    def __init__(self, cert: Path, key: Path, log: Path, client_ca: Path | None = None):
        self.command = ["openssl", "s_server", "-accept", f"{HOST}:0", "-cert", str(cert),
                        "-key", str(key), "-www", "-x509_strict"]
        if client_ca is not None:
            self.command += ["-Verify", "1", "-CAfile", str(client_ca), "-verify_return_error"]
        self.log = Path(log)
        self.process = None
        self.port = None

    def __enter__(self) -> Self:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        # s_server tells the port it bound: "ACCEPT 127.0.0.1:40459".
        deadline = time.monotonic() + TIMEOUT
        while self.port is None:
            for line in self.output().splitlines():
                if line.startswith("ACCEPT "):
                    self.port = int(line.rpartition(":")[2])
            if self.port is None:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise AssertionError(f"{self.command} did not start:\n{self.output()}")
                time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def s_client(port: int, ca: Path, cert: Path | None = None, key: Path | None = None):
    """``openssl s_client`` that verifies the server strictly (chain, hostname, RFC 5280) and
    fetches the status page; (exit code, everything it printed)."""
    command = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", HOSTNAME,
               "-verify_return_error", "-verify_hostname", HOSTNAME, "-x509_strict",
               "-CAfile", str(ca), "-ign_eof"]
    if cert is not None:
        command += ["-cert", str(cert), "-key", str(key)]
    done = subprocess.run(command, input=REQUEST, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    return done.returncode, done.stdout + done.stderr


def gnutls_cli(port: int, ca: Path):
    """``gnutls-cli`` connecting by name, verifying chain and hostname against ``ca`` only."""
    command = ["gnutls-cli", "--x509cafile", str(ca), "-p", str(port), HOSTNAME]
    done = subprocess.run(command, input="", capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
    return done.returncode, done.stdout + done.stderr


class PythonServer:
    """A server on the ``ssl`` module, in a thread: one connection at a time, a greeting after
    each handshake. ``outcome()`` is what the server saw of the next connection: the peer's
    certificate (as ``getpeercert()``) or the exception its handshake raised."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.outcomes = queue.Queue()
        self.stopping = threading.Event()

    def __enter__(self) -> Self:
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="tls-server", daemon=True)
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    peer = tls.getpeercert()
                    tls.sendall(b"hello\n")
                    self.outcomes.put(peer)
            except (ssl.SSLError, OSError) as e:
                connection.close()
                self.outcomes.put(e)

    def outcome(self):
        return self.outcomes.get(timeout=TIMEOUT)

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.listener.close()


def python_client(port: int, context: ssl.SSLContext) -> bytes:
    """Connect with ``context`` to ``localhost`` and read the greeting; exceptions propagate.
    With TLS 1.3 the server judges the client's certificate after the client's handshake is
    done, so a refusal shows as the read failing (an alert) or finding the connection closed."""
    with (socket.create_connection((HOST, port), timeout=TIMEOUT) as plain,
          context.wrap_socket(plain, server_hostname=HOSTNAME) as tls):
        return tls.recv(100)
