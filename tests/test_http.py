"""sapid's front door: HTTP/1.1 read to the letter of RFC 9110 and RFC 9112, over the Unix
socket of a real daemon, with raw bytes as an attacker would send them; the incremental
decoder in process, where its cost can be counted."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sapid
from conftest import make_csr

HEALTH = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def answer_of(data: bytes) -> tuple[int, dict, bytes]:
    """(status, lower-case headers, body) of the first final answer in ``data``."""
    while data.startswith(b"HTTP/1.1 1"):
        data = data.split(b"\r\n\r\n", 1)[1]
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body[:int(headers["content-length"])]


def put(target: bytes, body: bytes, *headers: bytes) -> bytes:
    lines = [b"PUT %s HTTP/1.1" % target, b"Host: x", b"Connection: close",
             b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked_put(chunks: bytes, *headers: bytes) -> bytes:
    lines = [b"PUT /api/csr/abc HTTP/1.1", b"Host: x", b"Connection: close",
             b"Transfer-Encoding: chunked", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + chunks


# Raw request -> (status, error code or None for a 200).  Each rule of RFC 9112 that sapid
# enforces, the classics of request smuggling, and a positive twin beside each refusal.
RAW = {
    # RFC 9112 2.2: CRLF, never a bare LF or CR
    "bare LF in the head": (b"GET /api/health HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    "bare LF line ends only": (b"GET /api/health HTTP/1.1\nHost: a\n\n", 400),
    "bare CR in the head": (b"GET /api/health HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    "empty lines before the request line": (b"\r\n\r\n" + HEALTH, 200),
    # RFC 9110 5.5: field values
    "NUL in a value": (b"GET /api/health HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
    "control character in a value": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
                                     400),
    "DEL in a value": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n", 400),
    "obs-text and tabs in a value": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: a\tb \xe9\r\n"
                                     b"Connection: close\r\n\r\n", 200),
    # RFC 9112 5.1, 5.2
    "obs-fold": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n", 400),
    "obs-fold with a tab": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX: a\r\n\tfolded\r\n\r\n",
                            400),
    "whitespace before the colon": (b"GET /api/health HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "a name that is not a token": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
                                   400),
    "a line without a colon": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400),
    # RFC 9112 3.2: exactly one valid Host in HTTP/1.1
    "HTTP/1.1 without Host": (b"GET /api/health HTTP/1.1\r\n\r\n", 400),
    "two Host headers": (b"GET /api/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "two Host headers in HTTP/1.0": (b"GET /api/health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
                                     400),
    "a Host that is no host": (b"GET /api/health HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    "HTTP/1.0 without Host": (b"GET /api/health HTTP/1.0\r\n\r\n", 200),
    "Host with a port and an IPv6 literal": (b"GET /api/health HTTP/1.1\r\nHost: [::1]:443\r\n"
                                             b"Connection: close\r\n\r\n", 200),
    # RFC 9112 3, 2.3: the request line
    "two spaces in the request line": (b"GET  /api/health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "a lower-case version": (b"GET /api/health http/1.1\r\nHost: x\r\n\r\n", 400),
    "HTTP/2.0": (b"GET /api/health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "HTTP/1.2 is read as HTTP/1.1": (b"GET /api/health HTTP/1.2\r\nHost: x\r\n"
                                     b"Connection: close\r\n\r\n", 200),
    "a quote in the target": (b'GET /api/he"alth HTTP/1.1\r\nHost: x\r\n\r\n', 400),
    "a target that is not a path": (b"GET api/health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "absolute-form": (b"GET http://sapid/api/health HTTP/1.1\r\nHost: sapid\r\n"
                      b"Connection: close\r\n\r\n", 200),
    # RFC 9110 8.6, RFC 9112 6.3: Content-Length
    "Content-Length: +5": (put(b"/api/csr/abc", b"hello").replace(b"Length: 5", b"Length: +5"),
                           400),
    "Content-Length: -1": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                           400),
    "Content-Length in hex": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5"
                              b"\r\n\r\nhello", 400),
    "two different Content-Lengths": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "a list of different Content-Lengths": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\n"
                                            b"Content-Length: 5, 6\r\n\r\nhello!", 400),
    "the same Content-Length twice": (put(b"/api/csr/abc", b"hello", b"Content-Length: 5"),
                                      (400, "not_a_csr")),
    "Content-Length over the limit": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 99999999999999999999999\r\n\r\n", 413),
    # Smuggling: RFC 9112 6.1, 6.3
    "CL.TE": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
    "TE.CL": (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              b"Content-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n", 400),
    "Transfer-Encoding: chunked, identity": (chunked_put(b"0\r\n\r\n").replace(
        b"Encoding: chunked", b"Encoding: chunked, identity"), 400),
    "Transfer-Encoding: xchunked": (chunked_put(b"0\r\n\r\n").replace(
        b"Encoding: chunked", b"Encoding: xchunked"), 400),
    "Transfer-Encoding: chunked, chunked": (chunked_put(b"0\r\n\r\n").replace(
        b"Encoding: chunked", b"Encoding: chunked, chunked"), 400),
    "Transfer-Encoding: gzip, chunked": (chunked_put(b"0\r\n\r\n").replace(
        b"Encoding: chunked", b"Encoding: gzip, chunked"), 501),
    "Transfer-Encoding in HTTP/1.0": (chunked_put(b"0\r\n\r\n").replace(
        b"HTTP/1.1", b"HTTP/1.0"), 400),
    "Transfer-Encoding: Chunked is chunked": (chunked_put(b"5\r\nhello\r\n0\r\n\r\n").replace(
        b"Encoding: chunked", b"Encoding: Chunked"), (400, "not_a_csr")),
    # RFC 9112 7.1: chunks
    "a chunk size overflowing 64 bits": (chunked_put(b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
                                         400),
    "a chunk size in 64 bits over the limit": (chunked_put(b"ffffffffffffffff\r\nhello\r\n"), 413),
    "a chunk size that is not hex": (chunked_put(b"zz\r\n"), 400),
    "a negative chunk size": (chunked_put(b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk data without its CRLF": (chunked_put(b"5\r\nhelloX\r\n0\r\n\r\n"), 400),
    "a chunk line with a bare LF": (chunked_put(b"5\nhello\r\n0\r\n\r\n"), 400),
    "chunk extensions are ignored": (chunked_put(b'2;name=value\r\nhe\r\n3 ; q = "a \\" b"\r\n'
                                                 b"llo\r\n0;last\r\n\r\n"), (400, "not_a_csr")),
    "a malformed chunk extension": (chunked_put(b"5;=x\r\nhello\r\n0\r\n\r\n"), 400),
    "trailer fields are read and ignored": (chunked_put(b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
                                            (400, "not_a_csr")),
    "a trailer line with NUL": (chunked_put(b"5\r\nhello\r\n0\r\nX-T: a\x00\r\n\r\n"), 400),
}
CODES = {400: "bad_request", 413: "too_large", 501: "bad_request", 505: "bad_request"}


@pytest.fixture(scope="module")
def front_door(tmp_path_factory, identities):
    from conftest import Daemon
    folder = tmp_path_factory.mktemp("front-door")
    daemon = Daemon(folder, identities("p256"), "", None, request_timeout=3).start()
    yield daemon
    daemon.close()


@pytest.mark.parametrize("case", list(RAW))
def test_raw_requests(front_door, case):
    request, expected = RAW[case]
    status, code = expected if isinstance(expected, tuple) else (expected, CODES.get(expected))
    started = time.monotonic()
    status_got, headers, body = answer_of(front_door.raw(request))
    document = json.loads(body)
    if status == 200:
        assert status_got == 200 and document["status"] == "ok", (case, body)
    else:
        assert (status_got, document["error"]) == (status, code), (case, body)
        assert document["message"] and "{" not in document["message"], document
        if code == "bad_request" and status == 400:
            assert "RFC 911" in document["message"], document   # it names the rule
            assert headers.get("connection") == "close"
    # Told at once, not after the request timeout of 3 s.
    assert time.monotonic() - started < 2.5, case
    # A new connection is answered normally afterwards.
    assert answer_of(front_door.raw(HEALTH))[0] == 200


def test_hooks_never_see_a_forbidden_value(daemon_factory, tmp_path):
    """What is refused never reaches a hook; what is accepted reaches it as sent."""
    from conftest import write_hooks
    seen = tmp_path / "seen.json"
    hooks = write_hooks(tmp_path, f"""
        import json, sapid
        class Hooks(sapid.SigningHooks):
            def authorize(self, names):
                open({str(seen)!r}, "w").write(json.dumps(dict(self.headers)))
    """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path).read_bytes()
    status, _, _ = answer_of(daemon.raw(put(b"/api/csr/abc", csr, b"X-Tag: a\x00b")))
    assert status == 400 and not seen.exists()
    status, _, _ = answer_of(daemon.raw(put(b"/api/csr/abc", csr, b"X-Tag: a\tb")))
    assert status == 200 and json.loads(seen.read_text())["x-tag"] == "a\tb"


# Chunked bodies, decoded incrementally ------------------------------------------------------

def drip_cost(chunks: int) -> float:
    """CPU seconds to decode a body of ``chunks`` one-byte chunks arriving one at a time."""
    reader = sapid.RequestReader(65536)
    started = time.process_time()
    reader.feed(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reader.read_head() is not None and not reader.read_body()
    for _ in range(chunks):
        reader.feed(b"1\r\nA\r\n")
        assert not reader.read_body()
    reader.feed(b"0\r\n\r\n")
    assert reader.read_body()
    _, body = reader.take()
    assert body == b"A" * chunks
    return time.process_time() - started


def test_chunked_decoding_is_linear():
    """Ten times the chunks cost about ten times as much (a decoder that starts again from the
    first chunk at every read costs a hundred times as much); the best of three, one run."""
    small = min(drip_cost(2_000) for _ in range(3))
    large = min(drip_cost(20_000) for _ in range(3))
    assert large / small < 30, (small, large)


def test_a_byte_at_a_time_is_the_same_request():
    """The head and the chunks cut at every byte decode to what arrives whole."""
    request = (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b'3;a="b"\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n'
               b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = sapid.RequestReader(1000)
    taken = []
    for byte in request:
        reader.feed(bytes((byte,)))
        if reader.head is None and reader.read_head() is None:
            continue
        if reader.read_body():
            taken.append(reader.take())
    assert [(head.method, body) for head, body in taken] == [("PUT", b"abcde"), ("GET", None)]
    assert not reader.pending


def test_health_while_sixteen_clients_drip(daemon, tmp_path):
    """Sixteen clients dripping one-byte chunks cost the others nothing measurable: the
    median time of /api/health stays near what it is without them."""
    def health_times(count=30):
        times = []
        for _ in range(count):
            started = time.perf_counter()
            assert daemon.raw(HEALTH).startswith(b"HTTP/1.1 200 ")
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    quiet = health_times()
    stop, answers = threading.Event(), []

    def drip():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(daemon.socket)
            sock.sendall(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            sent = 0
            while not stop.is_set() and sent < 8000:
                sock.sendall(b"1\r\nA\r\n")
                sent += 1
                time.sleep(0.0005)
            sock.sendall(b"0\r\n\r\n")
            answers.append(answer_of(sock.recv(65536))[0:3:2])

    drippers = [threading.Thread(target=drip) for _ in range(16)]
    for thread in drippers:
        thread.start()
    time.sleep(0.3)            # the drippers are under way
    busy = health_times()
    stop.set()
    for thread in drippers:
        thread.join(20)
    assert len(answers) == 16
    # Every drip was decoded to its end: the body of A's is no CSR.
    assert all(status == 400 and b"not_a_csr" in body for status, body in answers), answers
    assert busy < max(5 * quiet, 0.05), (quiet, busy)


# Expect: 100-continue ----------------------------------------------------------------------

def head_exchange(daemon, head: bytes, timeout=2.0) -> bytes:
    """Send only ``head`` and return what the daemon answers before any body is sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(daemon.socket)
    sock.sendall(head)
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return sock, data


def test_expect_continue_is_answered_before_the_body(daemon, tmp_path):
    csr = make_csr(tmp_path).read_bytes()
    sock, interim = head_exchange(daemon, b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\n"
                                  b"Expect: 100-continue\r\nConnection: close\r\n"
                                  b"Content-Length: %d\r\n\r\n" % len(csr))
    with sock:
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(csr)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, _, body = answer_of(data)
    assert status == 200 and "signed_x509_pem" in json.loads(body)


@pytest.mark.parametrize("head, status, code", [
    (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 500\r\n", 415, "unsupported_media_type"),
    (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n", 413, "too_large"),
    (b"PUT /api/csr/a-b HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n", 400, "bad_client_id"),
    (b"PUT /api/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n", 404, "not_found"),
    (b"PUT /api/ca HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n", 405, "method_not_allowed"),
    (b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: text/html\r\n", 415, "unsupported_media_type"),
])
def test_expect_continue_refused_from_the_head(daemon, head, status, code):
    """Refused with the final status, the body never sent, the connection closed."""
    sock, data = head_exchange(daemon, head + b"Expect: 100-continue\r\n\r\n")
    with sock:
        got, headers, body = answer_of(data)
        assert (got, json.loads(body)["error"]) == (status, code)
        assert headers["connection"] == "close"


def test_no_interim_answer_for_http_1_0(daemon):
    sock, data = head_exchange(daemon, b"PUT /api/csr/abc HTTP/1.0\r\nExpect: 100-continue\r\n"
                               b"Content-Length: 5\r\n\r\n", timeout=1.0)
    with sock:
        assert data == b""            # nothing until the body; the socket timed out


# The parser under Hypothesis ---------------------------------------------------------------

FIELD_BYTES = st.sampled_from([b"Host: x", b"Host: a\x00b", b"Content-Length: 5",
                               b"Content-Length: 5, 5", b"Content-Length: +5",
                               b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
                               b"Expect: 100-continue", b"Connection: close", b" folded",
                               b"X : y", b"X: a\rb", b"X: a\nb", b"X:", b":", b"\xff: x"])
HEADS = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([b"GET", b"PUT", b"G T", b"", b"\x00"]),
              st.sampled_from([b"/api/health", b"/api/csr/abc", b"*", b"http://a/b", b"http://",
                               b"/%zz", b"/\xff", b""]),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.9", b"HTTP/1",
                               b"HTTP/11.1", b""]),
              st.lists(st.one_of(FIELD_BYTES, st.binary(max_size=30)), max_size=6))
    .map(lambda t: b" ".join(t[:3]) + b"".join(b"\r\n" + line for line in t[3])))
STATUSES = {400, 413, 431, 501, 505}


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(head=HEADS, body=st.binary(max_size=40), cuts=st.lists(st.integers(0, 300), max_size=5))
def test_the_parser_answers_or_refuses(head, body, cuts):
    """Whatever the bytes, a Head, or a RequestError that becomes a 4xx (or 501/505) answer;
    and the same outcome whether the bytes come whole or cut into pieces."""
    data = head + b"\r\n\r\n" + body

    def outcome(pieces):
        reader = sapid.RequestReader(64)
        try:
            for piece in pieces:
                reader.feed(piece)
                if reader.head is None and reader.read_head() is None:
                    continue
                if reader.read_body():
                    return reader.take()
            return "partial"
        except sapid.RequestError as e:
            assert e.status in STATUSES and e.code in ("bad_request", "too_large"), e
            assert e.message and "{" not in e.message
            return e.status
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    assert outcome([data]) == outcome(pieces)
