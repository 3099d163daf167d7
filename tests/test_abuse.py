"""Slow and abusive clients on the daemon's Unix socket (DESIGN.md "Configuration":
request_timeout, max_threads): slowloris on the head, the body and with empty lines, pipelined
floods that never read, a thousand idle connections, clients that leave mid-request. Meanwhile a
well-behaved client must be answered promptly, the daemon's threads stay bounded by max_threads
and its peak RSS stays small."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import threading
import time

import pytest

from conftest import make_csr

REQUEST_TIMEOUT = 2.0
MAX_THREADS = 8
# Threads beyond the request pool: the main (reception) thread and a few spare.
THREAD_SLACK = 8
RSS_LIMIT_KB = 150 * 1024
# A well-behaved client is answered within this under abuse; a daemon blocked by an abusive
# client would take about request_timeout (2 s) instead.
PROMPT = 1.0
SLOW_INTERVAL = 0.3


# A small HTTP/1.1 client -------------------------------------------------------------------------

def parse_response(data: bytes):
    """(status, headers, body) of one response; JSON bodies parsed."""
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, f"no whole response head in {data[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    assert len(body) >= length, f"short body: {data[:300]!r}"
    body = body[:length]
    if headers.get("content-type") == "application/json":
        body = json.loads(body)
    return status, headers, body


def request_bytes(method: str, target: str, body: bytes | None = None, close=True) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: sapid\r\n"
    if close:
        head += "Connection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/pkcs10\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def ask(path: str, method="GET", target="/api/health", body=None, timeout=10.0):
    """One request on a fresh connection: (status, body, seconds taken)."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request_bytes(method, target, body))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    status, _, reply = parse_response(b"".join(chunks))
    return status, reply, time.monotonic() - started


# Watching the daemon -----------------------------------------------------------------------------

class Watch:
    """Samples the daemon's thread count while the abuse runs; reads its peak RSS at the end."""

    def __init__(self, daemon):
        self.pid = daemon.process.pid
        self.peak_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def _sample(self):
        while not self._stop.wait(0.02):
            try:
                self.peak_threads = max(self.peak_threads, self.threads())
            except FileNotFoundError:
                return

    def peak_rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def check(self, what: str):
        self._stop.set()
        self._thread.join()
        rss = self.peak_rss_kb()
        print(f"\n{what}: peak {self.peak_threads} threads (bound {MAX_THREADS + THREAD_SLACK}), "
              f"peak RSS {rss / 1024:.1f} MB (bound {RSS_LIMIT_KB / 1024:.0f} MB)")
        assert self.peak_threads <= MAX_THREADS + THREAD_SLACK, self.peak_threads
        assert rss < RSS_LIMIT_KB, rss


class Bystander:
    """A well-behaved client asking for its health and a certificate, over and over, in a thread."""

    def __init__(self, daemon, csr: bytes):
        self.daemon, self.csr = daemon, csr
        self.latencies, self.failures = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for method, target, body in (("GET", "/api/health", None),
                                         ("PUT", "/api/csr/bystander", self.csr)):
                try:
                    status, reply, seconds = ask(self.daemon.socket, method, target, body)
                except OSError as e:
                    self.failures.append(f"{method} {target}: {e!r}")
                    continue
                self.latencies.append(seconds)
                if status != 200:
                    self.failures.append(f"{method} {target}: {status} {reply}")
            self._stop.wait(0.05)

    def check(self, at_least=4):
        # A short abuse may end before the bystander has asked that often: it then goes on
        # asking (a few more turns of its 50 ms loop), so that there is something to judge.
        deadline = time.monotonic() + 10
        while len(self.latencies) < at_least and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(15)
        worst = max(self.latencies, default=None)
        print(f"bystander: {len(self.latencies)} answers, slowest {worst and worst * 1000:.0f} ms")
        assert not self.failures, self.failures[:5]
        assert len(self.latencies) >= at_least, self.latencies
        assert worst < PROMPT, sorted(self.latencies)[-5:]


def assert_still_well(daemon, csr: bytes):
    """Alive, answering, and nothing in its log that a crash or a handler bug would leave."""
    assert daemon.process.poll() is None, daemon.output()
    status, reply, _ = ask(daemon.socket, "PUT", "/api/csr/after", csr)
    assert status == 200, reply
    log = daemon.output()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert ": ERROR:" not in log, log[-3000:]


@pytest.fixture
def abused(daemon_factory, tmp_path):
    """A daemon with request_timeout 2 and max_threads 8, a CSR, and a watch on the daemon."""
    daemon = daemon_factory(request_timeout=REQUEST_TIMEOUT, max_threads=MAX_THREADS)
    csr = make_csr(tmp_path).read_bytes()
    return daemon, csr, Watch(daemon)


# Slowloris ---------------------------------------------------------------------------------------

def trickle(sock: socket.socket, payload: bytes, give_up: float) -> dict:
    """Send ``payload`` a byte every 0.3 s, watching for an answer; what happened and when."""
    seen = {"answer": b"", "first_byte": time.monotonic(), "ended": None, "how": "still open"}
    for position in range(len(payload)):
        if time.monotonic() - seen["first_byte"] > give_up:
            return seen
        try:
            sock.send(payload[position:position + 1])
        except OSError as e:            # the daemon has closed it
            seen["ended"], seen["how"] = time.monotonic(), f"send: {e.strerror}"
            return seen
        readable, _, _ = select.select([sock], [], [], SLOW_INTERVAL)
        if readable:
            seen["ended"] = time.monotonic()
            sock.settimeout(5)
            chunks = []
            seen["how"] = "closed"
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except OSError as e:
                seen["how"] = f"recv: {e.strerror}"
            if chunks:
                seen["answer"], seen["how"] = b"".join(chunks), "answered"
            return seen
    raise AssertionError("payload too short for this test")


SLOW_HEAD = (b"PUT /api/csr/slowloris HTTP/1.1\r\nHost: sapid\r\nContent-Type: application/pkcs10"
             b"\r\nUser-Agent: a-very-slow-client/1.0\r\nContent-Length: 400\r\n\r\n")


@pytest.mark.parametrize("where", ["head", "body", "empty lines"])
def test_slowloris(abused, where):
    """Twelve clients (more than max_threads) send a byte every 0.3 s: each is refused with 408
    (or closed) about request_timeout after its first byte, and meanwhile others are served."""
    daemon, csr, watch = abused
    if where == "head":
        payload, lead = SLOW_HEAD, b""
    elif where == "body":
        payload, lead = csr, SLOW_HEAD.replace(b"400", str(len(csr)).encode())
    else:
        # An idle keep-alive connection kept busy with the empty lines RFC 9112 lets a server
        # ignore: the idle limit must still apply.
        payload, lead = b"\r\n" * 100, b""
    results = [None] * 12

    def slow(number):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(daemon.socket)
            sock.sendall(lead)          # the first bytes, at once; then the rest trickles
            results[number] = trickle(sock, payload, 3 * REQUEST_TIMEOUT)

    clients = [threading.Thread(target=slow, args=(n,)) for n in range(len(results))]
    for client in clients:
        client.start()
    bystander = Bystander(daemon, csr)
    for client in clients:
        client.join(20)
    bystander.check()
    for seen in results:
        assert seen is not None
        assert seen["ended"] is not None, (
            f"slow client ({where}) still connected {3 * REQUEST_TIMEOUT:g} s after its first "
            f"byte; request_timeout is {REQUEST_TIMEOUT:g} s")
        took = seen["ended"] - seen["first_byte"]
        assert REQUEST_TIMEOUT - 0.5 <= took <= REQUEST_TIMEOUT + 1.0, (where, took, seen["how"])
        if seen["answer"]:
            status, headers, reply = parse_response(seen["answer"])
            assert (status, reply["error"]) == (408, "request_timeout"), reply
            assert headers["content-type"] == "application/json"
        else:
            assert where == "empty lines", f"{where}: closed without a 408: {seen['how']}"
    watch.check(f"slowloris ({where})")
    assert_still_well(daemon, csr)


# Pipelined floods that never read ----------------------------------------------------------------

@pytest.mark.parametrize("flooders", [1, MAX_THREADS])
def test_pipelined_flood_that_never_reads(abused, flooders):
    """Clients pipeline thousands of requests and never read an answer. Others are still
    served promptly, and the daemon drops each flooder within a few request_timeouts instead of
    buffering answers for it without end. ``MAX_THREADS`` flooders at once: a client that does
    not read is a slow connection, and slow connections hold no request thread (DESIGN.md)."""
    daemon, csr, watch = abused
    flood = request_bytes("GET", "/api/health", close=False) * 4000
    flood += request_bytes("PUT", "/api/csr/flood", csr, close=False) * 200
    sockets, ended = [], [None] * flooders

    def send_flood(number):
        sock = sockets[number]
        try:
            sock.sendall(flood)
        except OSError:
            pass   # the daemon closed it: fine

    started = time.monotonic()
    for _ in range(flooders):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(8 * REQUEST_TIMEOUT)
        sock.connect(daemon.socket)
        sockets.append(sock)
    senders = [threading.Thread(target=send_flood, args=(n,), daemon=True)
               for n in range(flooders)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(0.5)            # the flooders' answers have filled their sockets by now
        bystander = Bystander(daemon, csr)
        time.sleep(REQUEST_TIMEOUT + 1.0)
        bystander.check()
        # Now read what each flooder was sent: a bounded number of answers, then the end.
        for number, sock in enumerate(sockets):
            sock.settimeout(1.0)
            total = 0
            try:
                while chunk := sock.recv(1 << 20):
                    total += len(chunk)
                ended[number] = time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                ended[number] = time.monotonic() - started
            print(f"flooder {number}: {total} bytes of answers, then "
                  + (f"closed {ended[number]:.1f} s after the flood began" if ended[number]
                     else "still open"))
    finally:
        for sock in sockets:
            sock.close()
    assert all(seconds is not None for seconds in ended), (
        f"the daemon kept non-reading flooders open: {ended}")
    watch.check(f"pipelined flood x{flooders}")
    assert_still_well(daemon, csr)


# A thousand idle connections ---------------------------------------------------------------------

IDLE = 1000


def test_thousand_idle_connections(abused):
    """1,000 connections that never send a byte: others are served, no thread is spent on them,
    and the daemon closes each about request_timeout (the keep-alive idle limit) after it came."""
    daemon, csr, watch = abused
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 1024), hard))
    idle, opened = [], []
    try:
        for _ in range(IDLE):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(daemon.socket)
            sock.setblocking(False)
            idle.append(sock)
            opened.append(time.monotonic())
        print(f"\n{IDLE} idle connections opened in {opened[-1] - opened[0]:.2f} s")
        latencies = []
        for _ in range(5):
            status, reply, seconds = ask(daemon.socket, "PUT", "/api/csr/busy", csr)
            assert status == 200, reply
            latencies.append(seconds)
            status, reply, seconds = ask(daemon.socket)
            assert status == 200, reply
            latencies.append(seconds)
        assert max(latencies) < PROMPT, latencies
        # Still open (they are within the idle limit), and costing no thread.
        early = time.monotonic()
        assert early < opened[0] + REQUEST_TIMEOUT - 0.3, "the clients above were too slow"
        readable, _, _ = select.select(idle, [], [], 0)
        assert not readable, f"{len(readable)} idle connections closed before request_timeout"
        assert watch.threads() <= MAX_THREADS + THREAD_SLACK
        # Then each is closed by the daemon.
        closed = [None] * IDLE
        position = {sock.fileno(): n for n, sock in enumerate(idle)}
        deadline = opened[-1] + REQUEST_TIMEOUT + 2.0
        waiting = list(idle)
        poller = select.poll()
        for sock in waiting:
            poller.register(sock, select.POLLIN)
        left = IDLE
        while left and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                n = position[fd]
                try:
                    data = idle[n].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                assert data == b"", f"an idle connection was sent {data[:200]!r}"
                closed[n] = time.monotonic()
                poller.unregister(fd)
                left -= 1
        assert left == 0, (f"{left} of {IDLE} idle connections still open "
                           f"{REQUEST_TIMEOUT + 2:g} s on")
        lives = [end - start for start, end in zip(opened, closed)]
        print(f"idle connections lived {min(lives):.2f} .. {max(lives):.2f} s")
        assert min(lives) >= REQUEST_TIMEOUT - 0.3 and max(lives) <= REQUEST_TIMEOUT + 1.0, (
            min(lives), max(lives))
    finally:
        for sock in idle:
            sock.close()
    # A new client after all that is served, and the daemon holds no connection any more.
    status, reply, seconds = ask(daemon.socket)
    assert status == 200 and seconds < PROMPT, reply
    watch.check("1,000 idle connections")
    fds = os.listdir(f"/proc/{daemon.process.pid}/fd")
    assert len(fds) < 32, f"{len(fds)} descriptors still open in the daemon"
    assert_still_well(daemon, csr)


# Clients that leave ------------------------------------------------------------------------------

def test_clients_that_leave_mid_request(abused):
    """Half a body then close; a whole request then close before the answer; a keep-alive client
    that leaves during its second request: no crash, no traceback, no descriptor leak."""
    daemon, csr, watch = abused
    pid = daemon.process.pid
    baseline = len(os.listdir(f"/proc/{pid}/fd"))
    whole = request_bytes("PUT", "/api/csr/leaver", csr, close=False)
    half_body = whole[:len(whole) - len(csr) // 2]
    bystander = Bystander(daemon, csr)
    for _ in range(30):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:     # half a body
            sock.connect(daemon.socket)
            sock.sendall(half_body)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:     # before the answer
            sock.connect(daemon.socket)
            sock.sendall(whole)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:     # the second request
            sock.settimeout(10)
            sock.connect(daemon.socket)
            sock.sendall(request_bytes("GET", "/api/health", close=False))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            sock.sendall(half_body)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:     # the head only
            sock.connect(daemon.socket)
            sock.sendall(whole[:20])
    bystander.check()
    # Every one of those connections is let go of: the daemon's descriptors come back down.
    deadline = time.monotonic() + REQUEST_TIMEOUT + 2.0
    while (count := len(os.listdir(f"/proc/{pid}/fd"))) > baseline + 2:
        assert time.monotonic() < deadline, f"{count} descriptors, {baseline} before"
        time.sleep(0.1)
    watch.check("clients that leave")
    assert_still_well(daemon, csr)
