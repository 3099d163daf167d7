#!/usr/bin/env python3
"""Closed-loop load generator for certificate-signing servers.

One ``selectors`` event loop (or, with ``--generator threads``, a thread per connection) drives
N keep-alive HTTP/1.1 connections. Each connection sends one signing request, waits for the
whole answer, then sends the next (a closed loop: the offered load is whatever the server can
take at concurrency N). The CSRs come from a pool made before the
clock starts, so client key generation is never timed. Answers are kept as raw bytes during the
timed phase; JSON parsing and certificate verification happen afterwards, while the server idles,
and count neither against the server's time nor against the generator's CPU figure.

Two dialects:

- sapid: ``PUT /api/csr/<client_id>`` over a Unix socket (or TCP), body the CSR in PEM; the reply's
  JSON field ``signed_x509_pem`` is the certificate.
- cfssl: ``POST /api/v1/cfssl/sign`` over TCP, body ``{"certificate_request": PEM}``; the reply is
  ``{"success": true, "result": {"certificate": PEM}}``.

Standard library only, apart from ``cryptography`` for making the CSR pool and for verifying.
Run ``python3 bench/loadgen.py --help`` to point it at a server started by hand.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import selectors
import socket
import sys
import threading
import time

KEY_TYPES = ("p256", "rsa2048", "ed25519")


# ---------------------------------------------------------------------------------------------
# The CSR pool
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CsrPool:
    key: str
    pems: list          # PEM bytes, one per CSR
    spkis: list         # DER SubjectPublicKeyInfo of each CSR's key, to match the certificates
    seconds: float      # how long making the pool took (not part of any measurement)


def make_pool(key: str, size: int) -> CsrPool:
    """``size`` CSRs, each with its own fresh key of type ``key`` and a DNS subjectAltName."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import NameOID

    started = time.perf_counter()
    pems, spkis = [], []
    for number in range(size):
        if key == "rsa2048":
            private = rsa.generate_private_key(65537, 2048)
        elif key == "p256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif key == "ed25519":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unknown key type {key!r}; one of {', '.join(KEY_TYPES)}")
        name = f"device{number}.bench.example"
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
               .sign(private, None if key == "ed25519" else hashes.SHA256()))
        pems.append(csr.public_bytes(serialization.Encoding.PEM))
        spkis.append(private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    return CsrPool(key, pems, spkis, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Targets: where to connect, how to ask, where the certificate is in the answer
# ---------------------------------------------------------------------------------------------

class Target:
    dialect = "?"

    def __init__(self, address):
        self.address = address      # a path (Unix socket) or a (host, port) tuple

    def connect(self) -> socket.socket:
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.address)
        else:
            sock = socket.create_connection(self.address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def host(self) -> str:
        return "localhost" if isinstance(self.address, str) else f"{self.address[0]}:{self.address[1]}"

    def requests(self, pool: CsrPool) -> list:
        """The complete HTTP request bytes for each CSR of the pool, made once."""
        raise NotImplementedError

    def certificate(self, body: bytes) -> str:
        """The certificate PEM in a 200 answer; ValueError when it is not there."""
        raise NotImplementedError

    def error_code(self, body: bytes) -> str:
        return body[:80].decode("latin-1", "replace")


class SapidTarget(Target):
    dialect = "sapid"

    def requests(self, pool: CsrPool) -> list:
        made = []
        for number, pem in enumerate(pool.pems):
            head = (f"PUT /api/csr/bench{number} HTTP/1.1\r\nHost: {self.host()}\r\n"
                    f"Content-Type: application/x-pem-file\r\nContent-Length: {len(pem)}\r\n\r\n")
            made.append(head.encode("ascii") + pem)
        return made

    def certificate(self, body: bytes) -> str:
        document = json.loads(body)
        pem = document.get("signed_x509_pem") if isinstance(document, dict) else None
        if not isinstance(pem, str):
            raise ValueError("no signed_x509_pem in the answer")
        return pem

    def error_code(self, body: bytes) -> str:
        try:
            return str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            return super().error_code(body)


class CfsslTarget(Target):
    dialect = "cfssl"

    def requests(self, pool: CsrPool) -> list:
        made = []
        for pem in pool.pems:
            body = json.dumps({"certificate_request": pem.decode("ascii")}).encode()
            head = (f"POST /api/v1/cfssl/sign HTTP/1.1\r\nHost: {self.host()}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            made.append(head.encode("ascii") + body)
        return made

    def certificate(self, body: bytes) -> str:
        document = json.loads(body)
        if not isinstance(document, dict) or document.get("success") is not True:
            raise ValueError("success is not true")
        pem = (document.get("result") or {}).get("certificate")
        if not isinstance(pem, str):
            raise ValueError("no result.certificate in the answer")
        return pem

    def error_code(self, body: bytes) -> str:
        try:
            errors = json.loads(body).get("errors") or [{}]
            return f"cfssl {errors[0].get('code')}: {errors[0].get('message')}"
        except (ValueError, AttributeError, TypeError, IndexError):
            return super().error_code(body)


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 response reader
# ---------------------------------------------------------------------------------------------

class ResponseReader:
    """Incremental reader of one response: Content-Length, chunked, or delimited by close."""

    __slots__ = ("body_start", "chunked", "close", "length", "status")

    def __init__(self):
        self.status = None

    def feed(self, buffer: bytearray):
        """(consumed, body) once ``buffer`` holds a whole response, else None."""
        if self.status is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    raise ValueError("response head over 64 KiB")
                return None
            lines = bytes(buffer[:end]).split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise ValueError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
            status = int(parts[1])
            if 100 <= status < 200:         # an interim answer: skip it
                del buffer[:end + 4]
                return self.feed(buffer)
            self.length, self.chunked = None, False
            self.close = parts[0] == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding":
                    self.chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    value = value.strip().lower()
                    self.close = value == b"close" or (self.close and value != b"keep-alive")
            self.status, self.body_start = status, end + 4
        if self.chunked:
            return self._dechunk(buffer)
        if self.length is not None:
            stop = self.body_start + self.length
            if len(buffer) < stop:
                return None
            return stop, bytes(buffer[self.body_start:stop])
        return None         # delimited by close: see at_eof

    def at_eof(self, buffer: bytearray):
        """The response when the server closed, if that ends it; else None."""
        if self.status is not None and self.length is None and not self.chunked:
            self.close = True
            return len(buffer), bytes(buffer[self.body_start:])
        return None

    def _dechunk(self, buffer: bytearray):
        pos, parts = self.body_start, []
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buffer[pos:line_end]).split(b";", 1)[0], 16)
            pos = line_end + 2
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", pos - 2)
                if trailer_end < 0:
                    return None
                return trailer_end + 4, b"".join(parts)
            if len(buffer) < pos + size + 2:
                return None
            parts.append(bytes(buffer[pos:pos + size]))
            pos += size + 2


# ---------------------------------------------------------------------------------------------
# The closed loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadResult:
    concurrency: int
    records: list             # (sent, done, status, body, pool index); status 0: transport error
    started: float
    window_end: float         # end of the throughput window
    cpu_seconds: float        # this process's CPU time during the timed phase
    stopped_by: str           # "duration", "requests" or "errors"
    connections: int = 0      # connections opened: more than the concurrency means reconnects

    @property
    def completed_in_window(self) -> int:
        return sum(1 for record in self.records if record[1] <= self.window_end)

    @property
    def rate(self) -> float:
        elapsed = self.window_end - self.started
        return self.completed_in_window / elapsed if elapsed > 0 else 0.0

    def latencies_ms(self, ok_only: bool = True) -> list:
        return sorted((done - sent) * 1e3 for sent, done, status, _, _ in self.records
                      if status == 200 or not ok_only)

    @property
    def cpu_per_request_us(self) -> float:
        return self.cpu_seconds / len(self.records) * 1e6 if self.records else float("nan")


class _Conn:
    __slots__ = ("buffer", "index", "pending", "reader", "sent", "sock")

    def __init__(self, sock):
        self.sock, self.buffer, self.reader = sock, bytearray(), ResponseReader()
        self.sent, self.index, self.pending = 0.0, -1, b""


def percentile(sorted_values: list, fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * fraction // 1))    # ceil
    return sorted_values[int(rank) - 1]


def run_load(target: Target, requests: list, concurrency: int, duration: float,
             max_requests: int, timeout: float = 30.0, max_errors: int = 1000) -> LoadResult:
    """Keep ``concurrency`` requests in flight until ``duration`` seconds have passed or
    ``max_requests`` have been sent; then wait (at most ``timeout``) for those in flight.

    Throughput counts the answers that arrived within the window: ``duration`` seconds, or up to
    the last answer when the request cap ended the run first.
    """
    selector = selectors.DefaultSelector()
    records = []
    append = records.append
    perf = time.perf_counter
    count = len(requests)
    state = {"issued": 0, "errors": 0, "stopped_by": "duration", "connections": 0}
    conns = []

    def fire(conn: _Conn) -> bool:
        """Send the next request on ``conn``, or say no when the run is over."""
        issued = state["issued"]
        if issued >= max_requests:
            state["stopped_by"] = "requests"
            return False
        if state["errors"] >= max_errors:
            state["stopped_by"] = "errors"
            return False
        now = perf()
        if now >= deadline:
            return False
        state["issued"] = issued + 1
        conn.index = issued % count
        data = requests[conn.index]
        conn.sent = now
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            fail(conn, e)
            return True
        if sent < len(data):
            conn.pending = data[sent:]
            selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        return True

    def fail(conn: _Conn, error) -> None:
        """Record a transport error for the request in flight and replace the connection."""
        append((conn.sent, perf(), 0, f"{type(error).__name__}: {error}".encode(), conn.index))
        state["errors"] += 1
        retire(conn)
        if perf() < deadline and state["errors"] < max_errors:
            try:
                fresh = open_conn()
            except OSError as e:        # the server is gone: this connection ends here
                state["errors"] += 1
                state["stopped_by"] = "errors"
                append((perf(), perf(), 0, f"connect: {e}".encode(), -1))
                return
            fire(fresh)

    def retire(conn: _Conn) -> None:
        try:
            selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn in conns:
            conns.remove(conn)

    def open_conn() -> _Conn:
        conn = _Conn(target.connect())
        state["connections"] += 1
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        conns.append(conn)
        return conn

    for _ in range(concurrency):         # connect before the clock starts
        open_conn()
    cpu_started = time.process_time()
    started = perf()
    deadline = started + duration
    for conn in list(conns):        # a copy: fire() may replace a connection that fails
        if not fire(conn):
            retire(conn)
    last_check = started
    while conns:
        events = selector.select(0.25)
        for key, mask in events:
            conn = key.data
            if conn.sock.fileno() < 0:
                continue            # retired earlier in this batch
            if mask & selectors.EVENT_WRITE and conn.pending:
                try:
                    sent = conn.sock.send(conn.pending)
                    conn.pending = conn.pending[sent:]
                    if not conn.pending:
                        selector.modify(conn.sock, selectors.EVENT_READ, conn)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    fail(conn, e)
                    continue
            if not mask & selectors.EVENT_READ:
                continue
            try:
                data = conn.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                fail(conn, e)
                continue
            try:
                if data:
                    conn.buffer += data
                    answer = conn.reader.feed(conn.buffer)
                else:
                    answer = conn.reader.at_eof(conn.buffer)
                    if answer is None:
                        fail(conn, ConnectionError("server closed the connection mid-answer"
                                                   if conn.buffer else
                                                   "server closed the connection"))
                        continue
            except ValueError as e:
                fail(conn, e)
                continue
            if answer is None:
                continue
            done = perf()
            consumed, body = answer
            status = conn.reader.status
            append((conn.sent, done, status, body, conn.index))
            if status != 200:
                state["errors"] += 1
            close = conn.reader.close
            del conn.buffer[:consumed]
            conn.reader = ResponseReader()
            if close or conn.buffer:    # the server is done with it, or it said too much
                retire(conn)
                if done < deadline:
                    try:
                        conn = open_conn()
                    except OSError as e:
                        state["errors"] += 1
                        state["stopped_by"] = "errors"
                        append((done, perf(), 0, f"connect: {e}".encode(), -1))
                        continue
                else:
                    continue
            if not fire(conn):
                retire(conn)
        now = perf()
        if now - last_check >= 0.25:
            last_check = now
            for conn in list(conns):
                if now - conn.sent > timeout:
                    fail(conn, TimeoutError(f"no answer within {timeout:g} s"))
    cpu_seconds = time.process_time() - cpu_started
    selector.close()
    return _result(concurrency, records, started, deadline, cpu_seconds, state)


def _result(concurrency: int, records: list, started: float, deadline: float,
            cpu_seconds: float, state: dict) -> LoadResult:
    """The run's result; its throughput window ends at the deadline, or at the last answer
    when the request cap (or errors) ended the run first."""
    if state["stopped_by"] == "duration" and records:
        window_end = deadline
    else:
        window_end = max((record[1] for record in records), default=started)
    return LoadResult(concurrency, records, started, window_end, cpu_seconds, state["stopped_by"],
                      state["connections"])


def run_load_threads(target: Target, requests: list, concurrency: int, duration: float,
                     max_requests: int, timeout: float = 30.0) -> LoadResult:
    """The same closed loop as ``run_load``, the other way: a thread per connection, each
    blocking in send and recv.  Its figures should agree with ``run_load``'s (``run.py
    --loadgen-check``): where they do not, one of the two generators is what was measured."""
    records, lock = [], threading.Lock()
    perf = time.perf_counter
    count = len(requests)
    issued = itertools.count()
    state = {"stopped_by": "duration", "connections": 0}
    socks = []
    for _ in range(concurrency):         # connect before the clock starts
        sock = target.connect()
        sock.setblocking(True)
        sock.settimeout(timeout)
        socks.append(sock)
    state["connections"] = len(socks)
    start_line = threading.Barrier(concurrency + 1)

    def client(sock: socket.socket) -> None:
        mine, buffer = [], bytearray()
        start_line.wait()
        try:
            while True:
                number = next(issued)
                if number >= max_requests:
                    state["stopped_by"] = "requests"
                    break
                sent = perf()
                if sent >= deadline:
                    break
                index = number % count
                reader = ResponseReader()
                try:
                    sock.sendall(requests[index])
                    while (answer := reader.feed(buffer)) is None:
                        data = sock.recv(262144)
                        if not data:
                            if (answer := reader.at_eof(buffer)) is None:
                                raise ConnectionError("server closed the connection")
                            break
                        buffer += data
                except (OSError, ValueError) as e:
                    mine.append((sent, perf(), 0, f"{type(e).__name__}: {e}".encode(), index))
                    break           # a failed connection ends its client
                consumed, body = answer
                mine.append((sent, perf(), reader.status, body, index))
                del buffer[:consumed]
                if reader.close:
                    break
        finally:
            sock.close()
            with lock:
                records.extend(mine)

    threads = [threading.Thread(target=client, args=(sock,), daemon=True) for sock in socks]
    for thread in threads:
        thread.start()
    cpu_started = time.process_time()
    started = perf()
    deadline = started + duration
    start_line.wait()
    for thread in threads:
        thread.join()
    cpu_seconds = time.process_time() - cpu_started
    records.sort(key=lambda record: record[0])
    return _result(concurrency, records, started, deadline, cpu_seconds, state)


LOAD_GENERATORS = {"loop": run_load, "threads": run_load_threads}


# ---------------------------------------------------------------------------------------------
# Verification, after the timed phase
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Verdict:
    verified: int
    errors: int
    reasons: collections.Counter
    seconds: float


def verify(result: LoadResult, target: Target, ca_certificate, pool: CsrPool) -> Verdict:
    """Every answer: HTTP 200, a certificate directly issued by the CA (signature checked with
    ``verify_directly_issued_by``), for the public key of the CSR that was sent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    started = time.perf_counter()
    verified, reasons = 0, collections.Counter()
    for _sent, _done, status, body, index in result.records:
        if status == 0:
            reasons[f"transport: {body.decode(errors='replace')[:100]}"] += 1
            continue
        if status != 200:
            reasons[f"HTTP {status} {target.error_code(body)}"] += 1
            continue
        try:
            certificate = x509.load_pem_x509_certificate(target.certificate(body).encode())
            certificate.verify_directly_issued_by(ca_certificate)
            key = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if key != pool.spkis[index]:
                raise ValueError("certificate is not for the CSR's key")
        except Exception as e:     # noqa: BLE001 - every failure is counted, by kind
            reasons[f"bad certificate: {type(e).__name__}: {str(e)[:80]}"] += 1
            continue
        verified += 1
    return Verdict(verified, sum(reasons.values()), reasons, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Command line, for a server started by hand (e.g. under a profiler)
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sapid-socket", metavar="PATH", help="sapid's Unix socket")
    where.add_argument("--sapid-tcp", metavar="HOST:PORT", help="sapid serve --listen address")
    where.add_argument("--cfssl", metavar="HOST:PORT", help="cfssl serve address")
    parser.add_argument("--ca", required=True, help="the CA certificate (PEM) to verify against")
    parser.add_argument("--key", default="p256", choices=KEY_TYPES, help="CSR key type")
    parser.add_argument("--pool", type=int, default=64, help="distinct CSRs (default 64)")
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--duration", "-d", type=float, default=10.0, help="seconds")
    parser.add_argument("--requests", "-n", type=int, default=100000, help="request cap")
    parser.add_argument("--generator", choices=sorted(LOAD_GENERATORS), default="loop",
                        help="one event loop (the default) or a thread per connection")
    args = parser.parse_args(argv)

    from cryptography import x509

    if args.sapid_socket:
        target = SapidTarget(args.sapid_socket)
    else:
        host, _, port = (args.sapid_tcp or args.cfssl).rpartition(":")
        target = (SapidTarget if args.sapid_tcp else CfsslTarget)((host, int(port)))
    with open(args.ca, "rb") as file:
        ca = x509.load_pem_x509_certificate(file.read())
    pool = make_pool(args.key, args.pool)
    result = LOAD_GENERATORS[args.generator](target, target.requests(pool), args.concurrency,
                                             args.duration, args.requests)
    verdict = verify(result, target, ca, pool)
    latencies = result.latencies_ms()
    print(f"{target.dialect} {args.key} c={args.concurrency}: {len(result.records)} answers, "
          f"{result.rate:.1f} req/s, p50 {percentile(latencies, 0.5):.1f} ms, "
          f"p99 {percentile(latencies, 0.99):.1f} ms, {verdict.errors} errors, "
          f"{verdict.verified} certificates verified; load generator "
          f"{result.cpu_per_request_us:.0f} us CPU per request; {result.connections} connections")
    for reason, number in verdict.reasons.most_common(10):
        print(f"  {number} x {reason}")
    return 1 if verdict.errors or not result.records else 0


if __name__ == "__main__":
    sys.exit(main())
