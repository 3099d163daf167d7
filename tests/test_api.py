"""The HTTP API of DESIGN.md, driven with curl over the Unix socket of a real daemon."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from conftest import make_csr, openssl_verify, run, save_certificate, write_hooks


@pytest.mark.parametrize("ca_key", ["p256", "rsa2048", "ed25519"])
@pytest.mark.parametrize("csr_key", ["rsa2048", "p256", "ed25519"])
def test_signs_and_verifies(daemon_factory, identities, tmp_path, ca_key, csr_key):
    daemon = daemon_factory(ca_key)
    csr = make_csr(tmp_path, csr_key)
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    cert_path = save_certificate(tmp_path, reply)
    ca = tmp_path / "ca.pem"
    ca.write_text(reply["ca_x509_pem"])
    assert openssl_verify(ca, cert_path).returncode == 0
    # The negative twin: another CA does not vouch for it.
    other = identities("p384") / "ca.cert.pem"
    failed = openssl_verify(other, cert_path)
    assert failed.returncode != 0 and "unable to get local issuer" in failed.stdout + failed.stderr

    certificate = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
    assert reply["serial"] == format(certificate.serial_number, "X").zfill(
        len(format(certificate.serial_number, "X")) + len(format(certificate.serial_number, "X")) % 2)
    assert re.fullmatch(r"(?:[0-9A-F]{2})+", reply["serial"])
    assert reply["sha256_fingerprint"] == certificate.fingerprint(hashes.SHA256()).hex()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reply["not_before"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reply["not_after"])
    # openssl agrees on the serial.
    shown = run(["openssl", "x509", "-in", str(cert_path), "-noout", "-serial"]).stdout
    assert shown.strip() == f"serial={reply['serial']}"


def test_der_body_and_content_types(daemon, tmp_path):
    der = make_csr(tmp_path, "p256", der=True)
    status, reply = daemon.sign(der)
    assert status == 200, reply
    pem = make_csr(tmp_path, "p256", name="pem")
    for media in ("application/pkcs10", "application/x-pem-file; charset=utf-8", "text/plain"):
        status, reply, _ = daemon.curl("/api/csr/abc", "POST", pem, {"Content-Type": media})
        assert status == 200, (media, reply)
    status, reply, _ = daemon.curl("/api/csr/abc", "PUT", pem, {"Content-Type": "application/json"})
    assert (status, reply["error"]) == (415, "unsupported_media_type")


def corrupt_signature(csr_pem: bytes) -> bytes:
    """The same CSR with the last byte of its signature flipped."""
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return der[:-1] + bytes([der[-1] ^ 0x01])


def pem_block(label: bytes, der: bytes) -> bytes:
    return (b"-----BEGIN %s-----\n" % label + base64.encodebytes(der)
            + b"-----END %s-----\n" % label)


def csr_der(csr: bytes) -> bytes:
    return x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)


def ca_der() -> bytes:
    return x509.load_pem_x509_certificate(CA_PLACEHOLDER).public_bytes(serialization.Encoding.DER)


# Each refusal of a body that is not a CSR, and the words its message must say.
BAD_CSR_CASES = {
    "empty": (lambda csr: b"", 400, "not_a_csr", "empty body"),
    "not a csr": (lambda csr: b"hello, I am not a CSR\n", 400, "not_a_csr", "neither PEM"),
    "binary garbage": (lambda csr: b"\x01\x02\x03" * 20, 400, "not_a_csr", "neither PEM"),
    "truncated pem": (lambda csr: csr[: len(csr) // 2], 400, "not_a_csr", "no END line"),
    "broken base64": (lambda csr: csr.replace(b"\n", b"\n*", 2), 400, "not_a_csr", "base64"),
    "truncated der": (lambda csr: csr_der(csr)[:-20], 400, "not_a_csr", "truncated DER"),
    "trailing bytes": (lambda csr: csr_der(csr) + b"\0\0", 400, "not_a_csr",
                       "2 bytes after the end"),
    "indefinite length": (lambda csr: b"\x30\x80" + csr_der(csr)[2:], 400, "not_a_csr",
                          "indefinite length"),
    "a DER sequence, not a csr": (lambda csr: b"\x30\x03\x02\x01\x00", 400, "not_a_csr",
                                  "not a CertificationRequest"),
    "broken signature": (corrupt_signature, 400, "bad_csr_signature", "does not verify"),
    "a certificate, not a csr": (lambda csr: CA_PLACEHOLDER, 400, "not_a_csr",
                                 "a certificate, not a certificate request"),
    "a DER certificate": (lambda csr: ca_der(), 400, "not_a_csr",
                          "a certificate, not a certificate request"),
    "a certificate labelled as a csr": (lambda csr: pem_block(b"CERTIFICATE REQUEST", ca_der()),
                                        400, "not_a_csr", "a certificate, not a certificate"),
    "a private key": (lambda csr: pem_block(b"PRIVATE KEY", b"\x30\x00"), 400, "not_a_csr",
                      "a private key, not a certificate request"),
    "an odd label": (lambda csr: pem_block(b"SOMETHING", b"\x30\x00"), 400, "not_a_csr",
                     "labelled 'SOMETHING'"),
    "two csrs": (lambda csr: csr + csr, 400, "not_a_csr", "2 PEM blocks"),
    "a csr and its key": (lambda csr: csr + pem_block(b"PRIVATE KEY", b"\x30\x00"), 400,
                          "not_a_csr", "2 PEM blocks"),
}
CA_PLACEHOLDER = b""


@pytest.mark.parametrize("case", list(BAD_CSR_CASES))
def test_bad_csr_bodies(daemon, tmp_path, case):
    global CA_PLACEHOLDER
    CA_PLACEHOLDER = (daemon.identity / "ca.cert.pem").read_bytes()
    mutate, status, code, words = BAD_CSR_CASES[case]
    body = mutate(make_csr(tmp_path).read_bytes())
    got, reply, head = daemon.curl("/api/csr/device1", "PUT", body)
    assert (got, reply["error"]) == (status, code), reply
    assert "application/json" in head and words in reply["message"], reply
    # Words, never a parser's internal representation.
    assert not re.search(r"ParseError|kind:|[{}]|Traceback", reply["message"]), reply
    assert_still_serving(daemon, tmp_path)


@pytest.mark.parametrize("form", ["openssl -text", "text after", "der", "pem", "new label",
                                  "crlf"])
def test_csr_forms_are_signed(daemon, tmp_path, form):
    """RFC 7468 2: explanatory text may stand before and after the PEM block."""
    if form == "openssl -text":
        path = tmp_path / "text.csr"
        run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(tmp_path / "k"), "-subj", "/CN=device1", "-text",
             "-out", str(path)])
        body = path.read_bytes()
        assert body.startswith(b"Certificate Request:")    # text first, then the PEM
    else:
        pem = make_csr(tmp_path, der=form == "der").read_bytes()
        body = {"text after": pem + b"\nThis request is for device 1.\n",
                "new label": pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"),
                "crlf": pem.replace(b"\n", b"\r\n")}.get(form, pem)
    status, reply, _ = daemon.curl("/api/csr/device1", "PUT", body)
    assert status == 200, reply
    assert x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())


def assert_still_serving(daemon, tmp_path):
    status, reply = daemon.sign(make_csr(tmp_path, name="after"))
    assert status == 200, reply


@pytest.mark.parametrize("key, subject, sans, extra, code", [
    ("rsa1024", "/CN=small", "DNS:small.example", (), "key_refused"),
    ("p256", "/", None, (), "name_refused"),
    ("p256", "/CN=x", "otherName:1.2.3.4;UTF8:hello", (), "name_refused"),
    ("p256", "/CN=x", "dirName:dir_sect", (), "name_refused"),
])
def test_csr_policy(daemon, tmp_path, key, subject, sans, extra, code):
    if sans and sans.startswith("dirName"):
        cnf = tmp_path / "dir.cnf"
        cnf.write_text("[req]\ndistinguished_name=dn\n[dn]\n[dir_sect]\nCN=inner\n")
        out = tmp_path / "req.pem"
        run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(tmp_path / "k"), "-subj", subject, "-config", str(cnf),
             "-addext", f"subjectAltName={sans}", "-out", str(out)])
        csr = out
    else:
        csr = make_csr(tmp_path, key, subject, sans, extra)
    status, reply = daemon.sign(csr)
    assert (status, reply["error"]) == (400, code), reply
    assert_still_serving(daemon, tmp_path)


def test_sha1_signed_csr_is_weak(daemon, tmp_path):
    key = tmp_path / "k.pem"
    run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
         "-out", str(key)])
    out = tmp_path / "sha1.pem"
    run(["openssl", "req", "-new", "-key", str(key), "-sha1", "-subj", "/CN=old",
         "-out", str(out)])
    status, reply = daemon.sign(out)
    assert (status, reply["error"]) == (400, "weak_csr_signature"), reply
    run(["openssl", "req", "-new", "-key", str(key), "-sha256", "-subj", "/CN=old",
         "-out", str(out)])
    assert daemon.sign(out)[0] == 200


def test_ca_true_request_gets_a_leaf(daemon, tmp_path):
    csr = make_csr(tmp_path, extra=("basicConstraints=critical,CA:TRUE",
                                    "keyUsage=critical,keyCertSign,cRLSign",
                                    "nameConstraints=permitted;DNS:example.com"))
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    certificate = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.NameConstraints)
    # openssl refuses to use it as a CA: a certificate it "issued" does not verify.
    leaf_key = tmp_path / "leaf.key"
    run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", str(leaf_key)])
    leaf = tmp_path / "leaf.pem"
    issued = save_certificate(tmp_path, reply, "fake-ca.pem")
    run(["openssl", "req", "-new", "-x509", "-key", str(leaf_key), "-subj", "/CN=victim",
         "-CA", str(issued), "-CAkey", str(tmp_path / "req.key"), "-out", str(leaf)])
    chain = tmp_path / "ca.pem"
    chain.write_text(reply["ca_x509_pem"])
    assert openssl_verify(chain, leaf, untrusted=issued).returncode != 0


@pytest.mark.parametrize("client_id", ["a-b", "a.b", "%41", "a" * 129, "a" * 200, ""])
def test_bad_client_ids(daemon, tmp_path, client_id):
    status, reply = daemon.sign(make_csr(tmp_path), client_id)
    assert (status, reply["error"]) == (400, "bad_client_id"), reply


def test_client_id_limits(daemon, tmp_path):
    assert daemon.sign(make_csr(tmp_path), "A" * 128)[0] == 200
    assert daemon.sign(make_csr(tmp_path), "0")[0] == 200


def test_body_over_the_limit(daemon_factory, tmp_path):
    daemon = daemon_factory(max_request_bytes=2048)
    status, reply, _ = daemon.curl("/api/csr/abc", "PUT", b"A" * 4096)
    assert (status, reply["error"]) == (413, "too_large")
    # Told before the body is read: the headers alone get the answer.
    answer = daemon.raw(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in answer
    # Chunked bodies are held to the same limit.
    chunked = b"800\r\n" + b"A" * 2048 + b"\r\n800\r\n" + b"A" * 2048 + b"\r\n0\r\n\r\n"
    answer = daemon.raw(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        b"\r\n" + chunked)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert_still_serving(daemon, tmp_path)


def test_chunked_body_is_signed(daemon, tmp_path):
    csr = make_csr(tmp_path).read_bytes()
    half = len(csr) // 2
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, csr[:half], len(csr) - half, csr[half:])
    answer = daemon.raw(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"signed_x509_pem" in answer


def test_missing_content_length(daemon, tmp_path):
    answer = daemon.raw(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411 ") and b'"length_required"' in answer
    assert_still_serving(daemon, tmp_path)


def test_oversized_head(daemon):
    answer = daemon.raw(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX: " + b"a" * 20000
                        + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_unknown_path_and_wrong_method(daemon):
    status, reply, _ = daemon.curl("/api/nothing")
    assert (status, reply["error"]) == (404, "not_found")
    status, reply, _ = daemon.curl("/", "POST", b"x")
    assert (status, reply["error"]) == (404, "not_found")
    status, reply, head = daemon.curl("/api/csr/abc", "GET")
    assert (status, reply["error"]) == (405, "method_not_allowed")
    assert "Allow: PUT, POST" in head
    status, reply, head = daemon.curl("/api/ca", "DELETE")
    assert status == 405 and "Allow: GET, HEAD" in head


def test_ca_and_health(daemon, tmp_path):
    status, text, head = daemon.curl("/api/ca")
    assert status == 200 and "application/pem-certificate-chain" in head
    assert text == (daemon.identity / "ca.cert.pem").read_text()
    status, reply, _ = daemon.curl("/api/health")
    assert status == 200 and reply["status"] == "ok" and reply["certificates_issued"] == 0
    daemon.sign(make_csr(tmp_path))
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 1
    answer = daemon.raw(b"HEAD /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")


def test_keep_alive_and_pipelining(daemon, tmp_path):
    csr = make_csr(tmp_path).read_bytes()
    one = b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(csr), csr)
    last = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = daemon.raw(one * 3 + last)
    assert answer.count(b"HTTP/1.1 200 ") == 4
    assert answer.count(b"signed_x509_pem") == 3
    # HTTP/1.0 without keep-alive is closed after one answer.
    answer = daemon.raw(b"GET /api/health HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer


@pytest.mark.parametrize("hooks", [False, True])
def test_signings_pipelined_behind_a_store_read(daemon_factory, tmp_path, hooks):
    """A health check (answered on a pool thread) with signings pipelined behind it: the
    pool thread answers them too, committed and, with hooks, through them."""
    source = write_hooks(tmp_path, """\
        import sapid
        class Hooks(sapid.SigningHooks):
            def postsign(self, certificate):
                pass
        """) if hooks else ""
    daemon = daemon_factory(hooks=str(source))
    csr = make_csr(tmp_path).read_bytes()
    health = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    one = b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(csr), csr)
    last = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = daemon.raw(health + one * 2 + last)
    assert answer.count(b"HTTP/1.1 200 ") == 4, answer[:300]
    assert answer.count(b"signed_x509_pem") == 2
    assert len(daemon.stored()) == 2


def test_pipelined_signings_do_not_wait_for_the_idle_tick(daemon, tmp_path):
    """Each answer reads the next pipelined request; its signing must join the next write at
    once, not after the reception loop's idle wait (0.25 s each, 10 s for these 40)."""
    import time
    csr = make_csr(tmp_path).read_bytes()
    one = b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(csr), csr)
    last = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    started = time.monotonic()
    answer = daemon.raw(one * 40 + last, timeout=30)
    assert answer.count(b"signed_x509_pem") == 40
    assert time.monotonic() - started < 5


def test_request_timeout(daemon_factory, tmp_path):
    daemon = daemon_factory(request_timeout=1)
    import socket
    import time
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket)
        sock.sendall(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\nhalf")
        started = time.monotonic()
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
        assert time.monotonic() - started < 5
    assert_still_serving(daemon, tmp_path)
