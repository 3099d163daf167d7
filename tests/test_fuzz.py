"""Odd and hostile input: the corpus of malformed and unusual CSRs in tests/data/csr (made by
tests/data/make_corpus.py, whose table says what each must get) against a real daemon; Hypothesis
mutations of valid CSRs through the pipeline in process; random HTTP requests over the Unix socket.

Whatever comes in, sapid answers a 4xx with a documented error code or a certificate of the
profile in DESIGN.md, never a 5xx, a traceback or silence, and keeps serving.
"""

from __future__ import annotations

import ast
import base64
import ipaddress
import json
import re
import socket
import string
import time
from pathlib import Path

import pytest
from conftest import Daemon, open_local_authority
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sapid

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "csr"

# DESIGN.md's error codes and the status each comes with.
ERROR_STATUS = {
    "bad_request": {400, 501, 505}, "bad_client_id": {400}, "not_a_csr": {400},
    "bad_csr_signature": {400}, "weak_csr_signature": {400}, "key_refused": {400},
    "name_refused": {400}, "not_authorized": {403}, "not_found": {404},
    "method_not_allowed": {405}, "length_required": {411}, "too_large": {413, 431},
    "unsupported_media_type": {415}, "request_timeout": {408}, "hook_error": {500},
    "internal_error": {500}, "hook_timeout": {503}, "store_failed": {503},
    "shutting_down": {503},
}
# What a CSR itself can be refused for.
CSR_CODES = {"not_a_csr", "bad_csr_signature", "weak_csr_signature", "key_refused",
             "name_refused"}
REPLY_KEYS = {"signed_x509_pem", "ca_x509_pem", "serial", "not_before", "not_after",
              "sha256_fingerprint"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
PROFILE_EXTENSIONS = [ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                      ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                      ExtensionOID.AUTHORITY_KEY_IDENTIFIER]


def corpus_table() -> dict[str, tuple[int, str | None]]:
    """file -> (status, error code or None) from the table in make_corpus.py's docstring."""
    doc = ast.get_docstring(ast.parse((DATA / "make_corpus.py").read_text()))
    table = {}
    for name, status, code in re.findall(r"^\| (\S+) \| (\d{3})(?: ([a-z_]+))? \|", doc, re.MULTILINE):
        assert name not in table, f"{name} is in the table twice"
        table[name] = (int(status), code or None)
    return table


TABLE = corpus_table()


# ---------------------------------------------------------------------------------------------
# The profile of DESIGN.md, for any certificate sapid returns
# ---------------------------------------------------------------------------------------------

def _tlv(data: bytes, pos: int) -> tuple[int, int]:
    """(start of content, end of element) of the DER element at ``pos``."""
    size, pos = data[pos + 1], pos + 2
    if size & 0x80:
        count = size & 0x7F
        size, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
    return pos, pos + size


def csr_spki(csr: x509.CertificateSigningRequest) -> bytes:
    """The SubjectPublicKeyInfo exactly as the CSR carries it."""
    data = csr.tbs_certrequest_bytes
    pos, _ = _tlv(data, 0)
    _, pos = _tlv(data, pos)            # version
    _, pos = _tlv(data, pos)            # subject
    _, end = _tlv(data, pos)
    return data[pos:end]


def assert_csr_allowed(csr: x509.CertificateSigningRequest) -> None:
    """The CSR policy of DESIGN.md, checked independently of sapid's own code."""
    assert csr.is_signature_valid
    assert not isinstance(csr.signature_hash_algorithm, (hashes.MD5, hashes.SHA1))
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        assert 2048 <= key.key_size <= 16384 and numbers.e >= 65537 and numbers.e % 2
    elif isinstance(key, ec.EllipticCurvePublicKey):
        assert key.curve.name in ("secp256r1", "secp384r1", "secp521r1")
        # RFC 5480 2.1.1: the parameters name the curve; specifiedCurve is not for PKIX.
        spki = csr_spki(csr)
        pos, _ = _tlv(spki, 0)
        pos, end = _tlv(spki, pos)          # AlgorithmIdentifier
        _, pos = _tlv(spki, pos)            # id-ecPublicKey
        assert pos < end and spki[pos] == 0x06, "EC key with explicit curve parameters"
    else:
        assert isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)), key
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    assert len(csr.subject) or names
    for general_name in names:
        assert isinstance(general_name, (x509.DNSName, x509.IPAddress, x509.RFC822Name,
                                         x509.UniformResourceIdentifier)), general_name
        if isinstance(general_name, x509.IPAddress):    # an address, never a network
            assert isinstance(general_name.value, (ipaddress.IPv4Address,
                                                   ipaddress.IPv6Address)), general_name


def assert_profile(certificate: x509.Certificate, csr: x509.CertificateSigningRequest,
                   ca: x509.Certificate) -> None:
    """``certificate`` is what DESIGN.md's default profile makes of ``csr``."""
    assert_csr_allowed(csr)
    assert certificate.version == x509.Version.v3
    certificate.verify_directly_issued_by(ca)
    assert certificate.issuer == ca.subject
    assert certificate.subject.public_bytes() == csr.subject.public_bytes()
    assert certificate.public_key() == csr.public_key()
    assert 0 < certificate.serial_number < 2 ** 159
    assert certificate.not_valid_before_utc < certificate.not_valid_after_utc
    assert certificate.not_valid_after_utc <= ca.not_valid_after_utc

    try:
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        requested = None
    found = {e.oid: e for e in certificate.extensions}
    assert list(found) == PROFILE_EXTENSIONS + (
        [ExtensionOID.SUBJECT_ALTERNATIVE_NAME] if requested is not None else [])
    basic = found[ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical and basic.value.ca is False and basic.value.path_length is None
    usage = found[ExtensionOID.KEY_USAGE]
    is_rsa = isinstance(certificate.public_key(), rsa.RSAPublicKey)
    assert usage.critical and usage.value == x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)
    eku = found[ExtensionOID.EXTENDED_KEY_USAGE]
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH,
                                                    ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = found[ExtensionOID.SUBJECT_KEY_IDENTIFIER]
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())
    aki = found[ExtensionOID.AUTHORITY_KEY_IDENTIFIER]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert not aki.critical and aki.value.key_identifier == ca_ski.digest
    if requested is not None:
        san = found[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
        assert list(san.value) == list(requested)
        assert san.critical is (len(certificate.subject) == 0)


def assert_reply(reply: dict, ca: x509.Certificate) -> x509.Certificate:
    """A 200 reply of PUT /api/csr/: its fields, formats, and the certificate they describe."""
    assert set(reply) == REPLY_KEYS, reply
    certificate = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
    assert reply["ca_x509_pem"].startswith(ca.public_bytes(serialization.Encoding.PEM).decode())
    assert reply["serial"] == sapid.serial_hex(certificate.serial_number)
    assert re.fullmatch(r"(?:[0-9A-F]{2})+", reply["serial"])
    assert reply["sha256_fingerprint"] == certificate.fingerprint(hashes.SHA256()).hex()
    assert TIME.match(reply["not_before"]) and TIME.match(reply["not_after"])
    return certificate


# ---------------------------------------------------------------------------------------------
# The corpus against a real daemon
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory, identities):
    """One daemon for the module, with a short request timeout so half-sent requests end fast."""
    daemon = Daemon(tmp_path_factory.mktemp("fuzz-daemon"), identities("p256"), "",
                    request_timeout=1)
    try:
        yield daemon.start()
    finally:
        daemon.close()


@pytest.fixture(scope="module")
def ca_certificate(identities) -> x509.Certificate:
    return x509.load_pem_x509_certificate((identities("p256") / "ca.cert.pem").read_bytes())


def log_since(daemon: Daemon, offset: int) -> str:
    return daemon.log_path.read_bytes()[offset:].decode(errors="replace")


def test_the_table_covers_the_corpus():
    on_disk = {path.name for path in CORPUS.iterdir()}
    assert on_disk == set(TABLE), (on_disk ^ set(TABLE))
    for name, (status, code) in TABLE.items():
        assert (status, code) == (200, None) or (code in CSR_CODES and status == 400), name
    assert (CORPUS / "subject-huge.der").stat().st_size <= 65536
    assert sum(path.stat().st_size for path in CORPUS.iterdir()) < 200_000


@pytest.mark.parametrize("name", sorted(TABLE))
def test_corpus(fuzz_daemon, ca_certificate, name):
    status, code = TABLE[name]
    body = (CORPUS / name).read_bytes()
    media = "application/pkcs10" if name.endswith(".der") else "application/x-pem-file"
    offset = fuzz_daemon.log_path.stat().st_size
    got, reply, head = fuzz_daemon.curl("/api/csr/corpus", "PUT", body, {"Content-Type": media})
    assert "Content-Type: application/json" in head
    assert isinstance(reply, dict), reply
    log = log_since(fuzz_daemon, offset)
    if code is not None:
        assert (got, reply.get("error")) == (status, code), (reply, log[-2000:])
        assert isinstance(reply["message"], str) and reply["message"]
        assert "Traceback" not in reply["message"] and "Traceback" not in log, log
        assert "audit outcome=refused" in log and f'code="{code}"' in log
        return
    assert got == 200, (reply, log[-2000:])
    assert "Traceback" not in log, log
    certificate = assert_reply(reply, ca_certificate)
    csr = sapid.parse_csr(body)
    assert_profile(certificate, csr, ca_certificate)
    assert "audit outcome=issued" in log
    if name == "ext-unknown-critical.der":
        assert x509.ObjectIdentifier("1.3.6.1.4.1.99999.1") not in {
            e.oid for e in certificate.extensions}
    if name == "subject-huge.der":
        assert len(certificate.subject.get_attributes_for_oid(
            NameOID.ORGANIZATIONAL_UNIT_NAME)) == 900
    if name == "subject-empty-with-san.der":
        assert len(certificate.subject) == 0
    if name == "name-bmpstring.pem":
        assert certificate.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value == "Grüße ☃"


def test_daemon_survived_the_corpus(fuzz_daemon):
    """After every corpus file (run before this test), the daemon serves, with a clean log."""
    status, reply, _ = fuzz_daemon.curl("/api/health")
    assert (status, reply["status"]) == (200, "ok")
    assert fuzz_daemon.process.poll() is None
    log = fuzz_daemon.output()
    assert "Traceback" not in log, log[-3000:]
    assert "internal error" not in log


# ---------------------------------------------------------------------------------------------
# Hypothesis, in process: mutated CSRs through Authority.issue
# ---------------------------------------------------------------------------------------------

FUZZ_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _fuzz_request_infos() -> list[bytes]:
    """CertificationRequestInfos of our fixed key, from plain to every extension cryptography
    writes, to mutate and sign again: the mutations get past the signature check."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device1"),
                         x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                         x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.com")])
    san = x509.SubjectAlternativeName([
        x509.DNSName("device1.example"), x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.RFC822Name("ops@example.com"), x509.UniformResourceIdentifier("https://d.example/"),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1"))])
    plain = x509.CertificateSigningRequestBuilder().subject_name(subject)
    rich = plain.add_extension(san, False)
    for value, critical in (
            (x509.KeyUsage(True, False, True, False, False, True, False, False, False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (x509.BasicConstraints(True, 2), True),
            (x509.NameConstraints([x509.DNSName("example")], None), True),
            (x509.CertificatePolicies([x509.PolicyInformation(
                x509.ObjectIdentifier("2.23.140.1.2.1"), ["https://cps.example/"])]), False),
            (x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier("http://crl.example/")], None, None, None)]),
             False),
            (x509.TLSFeature([x509.TLSFeatureType.status_request]), False),
            (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.3"),
                                        b"\x05\x00"), True)):
        rich = rich.add_extension(value, critical)
    return [builder.sign(FUZZ_KEY, None).tbs_certrequest_bytes
            for builder in (plain.add_extension(san, False), rich,
                            x509.CertificateSigningRequestBuilder().subject_name(
                                x509.Name([])).add_extension(san, True))]


REQUEST_INFOS = _fuzz_request_infos()
# Valid requests of every key type the policy allows, DER and PEM, from the corpus.
VALID_BODIES = [(CORPUS / name).read_bytes() for name in sorted(TABLE)
                if TABLE[name][0] == 200 and name != "subject-huge.der"]
VALID_DER = [sapid.parse_csr(body).public_bytes(serialization.Encoding.DER)
             for body in VALID_BODIES]


_der = sapid._der      # DER writing for inputs: sapid's own helper


def signed(info: bytes) -> bytes:
    """``info`` as a CertificationRequest signed by FUZZ_KEY (Ed25519)."""
    return _der(0x30, info + _der(0x30, b"\x06\x03\x2b\x65\x70")
                + _der(0x03, b"\x00" + FUZZ_KEY.sign(info)))


def to_pem(der: bytes) -> bytes:
    text = base64.b64encode(der).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines)
            + "\n-----END CERTIFICATE REQUEST-----\n").encode()


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """``data`` after a few byte flips, overwrites, insertions, deletions, truncations,
    duplications or splices with another valid request."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate",
                                          "duplicate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip":
            if data:
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            if data:
                data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF,
                                                 0x30, 0x31, 0x02, 0x05, 0x06, 0x0C, 0xA0]))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif operation == "truncate":
            del data[at:]
        elif operation == "duplicate":
            end = at + draw(st.integers(1, 64))
            data[end:end] = data[at:end]
        else:
            other = draw(st.sampled_from(VALID_DER))
            data = data[:at] + other[draw(st.integers(0, len(other) - 1)):]
    return bytes(data)


class Node:
    """A DER element: constructed (or an OCTET/BIT STRING holding DER) with children, else
    primitive with its content octets."""

    def __init__(self, tag: int, content: bytes | list, wrapped: bytes | None = None):
        self.tag, self.content, self.wrapped = tag, content, wrapped

    def encode(self) -> bytes:
        if isinstance(self.content, list):
            inner = b"".join(child.encode() for child in self.content)
            return _der(self.tag, (self.wrapped or b"") + inner)
        return _der(self.tag, self.content)


def parse_der(data: bytes) -> list[Node] | None:
    """Every element of ``data``, nested as far as DER goes; None unless all of it parses."""
    nodes, pos = [], 0
    try:
        while pos < len(data):
            tag, size, pos = data[pos], data[pos + 1], pos + 2
            if tag & 0x1F == 0x1F or size == 0x80:
                return None
            if size & 0x80:
                count = size & 0x7F
                size, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
            if pos + size > len(data):
                return None
            content, pos = data[pos:pos + size], pos + size
            children = None
            if tag & 0x20 or (tag == 0x04 and content):
                children = parse_der(content)
            elif tag == 0x03 and content[:1] == b"\x00" and len(content) > 1:
                children = parse_der(content[1:])
                if children is not None:
                    nodes.append(Node(tag, children, b"\x00"))
                    continue
            nodes.append(Node(tag, children) if children is not None else Node(tag, content))
    except IndexError:
        return None
    return nodes


def all_nodes(nodes: list[Node]) -> list[tuple[list, int]]:
    """(parent's list, index) of every element, depth first."""
    found = []
    for index, node in enumerate(nodes):
        found.append((nodes, index))
        if isinstance(node.content, list):
            found.extend(all_nodes(node.content))
    return found


DONORS = sorted({node.encode() for data in [*VALID_DER, *REQUEST_INFOS]
                 for parent, index in all_nodes(parse_der(data))
                 for node in [parent[index]] if len(node.encode()) < 300})
TAGS = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x12, 0x13, 0x14, 0x16, 0x17, 0x18, 0x1A,
        0x1C, 0x1E, 0x30, 0x31, 0x80, 0x81, 0x82, 0x86, 0x87, 0x88, 0xA0, 0xA3, 0xA4]
CONTENTS = [b"", b"\x00", b"\x01", b"\x02", b"\x7f", b"\x80", b"\xff", b"\x00" * 8,
            b"\xff" * 33, b"\xc3\x28", b"\x00a\x00", b"*.example", b"a@b", b"\x01\x00\x01",
            b"\x01\x00\x02", b"\xc0\x00\x02\x00\xff\xff\xff\x00"]


@st.composite
def der_mutations(draw, data: bytes) -> bytes:
    """``data`` with a few elements retagged, given new content, numbers changed, deleted,
    repeated, wrapped, or swapped for elements of other valid requests, lengths kept right."""
    for _ in range(draw(st.integers(1, 3))):
        nodes = parse_der(data)
        if not nodes:
            break
        places = all_nodes(nodes)
        parent, index = places[draw(st.integers(0, len(places) - 1))]
        node = parent[index]
        operation = draw(st.sampled_from(["tag", "content", "number", "delete", "repeat", "wrap",
                                          "swap"]))
        if operation == "tag":
            node.tag = draw(st.sampled_from(TAGS) | st.integers(0, 255))
        elif operation == "content":
            node.content = draw(st.sampled_from(CONTENTS) | st.binary(max_size=40))
            node.wrapped = None
        elif operation == "number":
            value = draw(st.sampled_from([0, 1, 2, 3, -1, 255, 65537, 65538, 2 ** 64, -2 ** 70]))
            node.tag, node.wrapped = 0x02, None
            node.content = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        elif operation == "delete":
            del parent[index]
        elif operation == "repeat":
            parent.insert(index, Node(node.tag, node.content, node.wrapped))
        elif operation == "wrap":
            parent[index] = Node(draw(st.sampled_from([0x30, 0x31, 0x04, 0xA0])), [node])
        else:
            parent[index] = parse_der(draw(st.sampled_from(DONORS)))[0]
        data = b"".join(node.encode() for node in nodes)
    return data


def mutations(data: bytes):
    return st.one_of(der_mutations(data), byte_mutations(data))


@st.composite
def mutated_bodies(draw) -> bytes:
    """A valid CSR mutated as DER, as the DER inside a PEM, or as PEM text."""
    how = draw(st.sampled_from(["der", "der-in-pem", "pem-text"]))
    if how == "pem-text":
        return draw(byte_mutations(draw(st.sampled_from(VALID_BODIES))))
    mutated = draw(mutations(draw(st.sampled_from(VALID_DER))))
    return to_pem(mutated) if how == "der-in-pem" else mutated


@st.composite
def resigned_bodies(draw) -> bytes:
    """A mutated CertificationRequestInfo, signed again: past the signature, into the policy,
    the names and the extensions."""
    der = signed(draw(mutations(draw(st.sampled_from(REQUEST_INFOS)))))
    return to_pem(der) if draw(st.booleans()) else der


@pytest.fixture(scope="module")
def authority(identities, tmp_path_factory) -> sapid.Authority:
    made, close = open_local_authority(identities("p256"), tmp_path_factory.mktemp("store"))
    yield made
    close()


def issue(authority: sapid.Authority, body: bytes) -> sapid.Issued:
    return authority.wait(authority.issue(sapid.Signing(body, "fuzz")))


def issue_or_refuse(authority: sapid.Authority, body: bytes) -> None:
    """Only a 4xx RequestError with a CSR code may come out; a certificate fits the profile."""
    try:
        issued = issue(authority, body)
    except sapid.RequestError as refused:
        assert 400 <= refused.status < 500, (refused.status, refused.code, refused.message)
        assert refused.code in CSR_CODES, refused.code
        assert refused.status in ERROR_STATUS[refused.code]
        assert refused.message and "Traceback" not in refused.message
        return
    assert_profile(issued.certificate, sapid.parse_csr(body), authority.identity.certificate)


IN_PROCESS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@IN_PROCESS
@given(body=mutated_bodies())
def test_mutated_csrs_in_process(authority, body):
    issue_or_refuse(authority, body)


@IN_PROCESS
@given(body=resigned_bodies())
def test_mutated_and_resigned_csrs_in_process(authority, body):
    issue_or_refuse(authority, body)


def test_mutation_controls(authority):
    """The fuzzers' inputs reach the checks they aim at: unmutated, every seed is signed."""
    for body in VALID_BODIES + [signed(info) for info in REQUEST_INFOS]:
        certificate = issue(authority, body).certificate
        assert_profile(certificate, sapid.parse_csr(body), authority.identity.certificate)
    with pytest.raises(sapid.RequestError) as refused:
        issue(authority, signed(REQUEST_INFOS[0])[:-1])
    assert refused.value.code == "not_a_csr"


# ---------------------------------------------------------------------------------------------
# Hypothesis over the Unix socket: random request lines, headers and bodies
# ---------------------------------------------------------------------------------------------

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\Z")
SOCKET_TIMEOUT = 10.0      # far beyond the daemon's request_timeout of 1 s


class Answer:
    """One response as read off the socket."""

    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self):
        return f"Answer({self.status}, {self.headers!r}, {self.body[:300]!r})"


def parse_head(raw: bytes) -> tuple[int, dict]:
    lines = raw.split(b"\r\n")
    match = STATUS_LINE.match(lines[0])
    assert match, f"not an HTTP/1.1 status line: {lines[0][:100]!r}"
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon and TOKEN.match(name), f"malformed response header {line[:100]!r}"
        assert name.lower() not in headers, f"repeated response header {name!r}"
        headers[name.lower().decode()] = value.strip().decode("latin-1")
    return int(match[1]), headers


def read_until(sock: socket.socket, buffer: bytearray, needed) -> bool:
    """Receive into ``buffer`` until ``needed(buffer)``; False at end of stream."""
    while not needed(buffer):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise AssertionError(f"no complete answer within {SOCKET_TIMEOUT} s; "
                                 f"so far {bytes(buffer[:300])!r}") from None
        if not chunk:
            return False
        buffer += chunk
    return True


def read_answer(sock: socket.socket, buffer: bytearray, head_request: bool) -> Answer | None:
    """The next final response (1xx skipped); None when the server closed without one."""
    while True:
        if not read_until(sock, buffer, lambda b: b"\r\n\r\n" in b):
            assert not buffer, f"the connection ended inside a response head: {bytes(buffer)!r}"
            return None
        end = buffer.index(b"\r\n\r\n")
        status, headers = parse_head(bytes(buffer[:end]))
        del buffer[:end + 4]
        if 100 <= status < 200:
            assert status == 100 and not headers, (status, headers)
            continue
        length = headers.get("content-length", "")
        assert length.isdigit(), f"no Content-Length in {headers}"
        length = int(length)
        closing = headers.get("connection", "").lower() == "close"
        if head_request and not closing:
            return Answer(status, headers, b"")
        # A HEAD that was understood gets no body and the server closes; one refused before
        # it was understood gets its body, sent with the head.
        if head_request and not read_until(sock, buffer, lambda b, size=length: len(b) >= size):
            assert not buffer, (status, headers, bytes(buffer[:200]))
            return Answer(status, headers, b"")
        complete = read_until(sock, buffer, lambda b, size=length: len(b) >= size)
        assert complete, f"body cut short: {length} announced, {len(buffer)} came"
        body = bytes(buffer[:length])
        del buffer[:length]
        return Answer(status, headers, body)


def parse_rest(data: bytes) -> list[Answer]:
    """Answers to pipelined requests, read to the end of the stream.  Their methods are not
    known here: a response whose announced body is not there (the next status line or the end
    follows) answered a HEAD."""
    answers = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"the connection ended inside a response head: {data[:300]!r}"
        status, headers = parse_head(data[:end])
        data = data[end + 4:]
        if 100 <= status < 200:
            assert status == 100 and not headers, (status, headers)
            continue
        assert headers.get("content-length", "").isdigit(), f"no Content-Length in {headers}"
        length = int(headers["content-length"])
        if not data or data.startswith(b"HTTP/1.1 "):
            answers.append(Answer(status, headers, b""))
            continue
        assert len(data) >= length, f"body cut short: {length} announced, {len(data)} came"
        answers.append(Answer(status, headers, data[:length]))
        data = data[length:]
    return answers


def first_request_line(request: bytes) -> tuple[bytes, bytes | None]:
    """(method, target) of the first request in ``request``, as the server splits it."""
    while request[:2] == b"\r\n":
        request = request[2:]
    parts = request.split(b"\r\n", 1)[0].split(b" ")
    return parts[0], parts[1] if len(parts) == 3 else None


def check_answer(answer: Answer, path: bytes | None, certificates: dict,
                 ca: x509.Certificate) -> None:
    """A well-formed answer: JSON (or the CA's PEM), a documented code, no 5xx but 503/505."""
    status, headers, body = answer.status, answer.headers, answer.body
    assert "date" in headers and headers.get("server", "").startswith("sapid/")
    media = headers.get("content-type", "")
    if media == "application/pem-certificate-chain":
        assert status == 200 and (path is None or path.split(b"?")[0] == b"/api/ca"), answer
        assert not body or body.startswith(b"-----BEGIN CERTIFICATE-----"), answer
        return
    assert media == "application/json", answer
    if not body:            # a HEAD
        assert status < 500 or status == 503, answer
        return
    document = json.loads(body)
    assert isinstance(document, dict), answer
    if status >= 400:
        code = document.get("error")
        assert code in ERROR_STATUS and status in ERROR_STATUS[code], answer
        assert isinstance(document.get("message"), str) and document["message"], answer
        assert "Traceback" not in document["message"], answer
        assert status < 500 or code in ("hook_timeout", "store_failed", "shutting_down") or (
            status in (501, 505) and code == "bad_request"), answer
        if status == 405:
            assert headers.get("allow") in ("PUT, POST", "GET, HEAD"), answer
        return
    assert status == 200, answer
    if "signed_x509_pem" in document:
        certificate = assert_reply(document, ca)
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        # Several corpus requests share a key; the one this certificate came from has its name.
        candidates = [csr for csr in certificates.get(spki, ())
                      if csr.subject.public_bytes() == certificate.subject.public_bytes()]
        assert candidates, "a certificate for a key and subject no request of this test held"
        failures = []
        for csr in candidates:
            try:
                assert_profile(certificate, csr, ca)
                break
            except AssertionError as e:
                failures.append(e)
        else:
            raise failures[0]
    else:
        assert document.get("status") == "ok", answer


def exchange(daemon: Daemon, request: bytes) -> tuple[Answer | None, list]:
    """Send ``request`` on a new connection; its first answer, then, once we have stopped
    sending, every further answer until the server closes."""
    head_request = first_request_line(request)[0] == b"HEAD"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(daemon.socket)
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass            # refused early and closed: its answer is already on its way
        buffer = bytearray()
        first = read_answer(sock, buffer, head_request)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        read_until(sock, buffer, lambda b: False)
        return first, parse_rest(bytes(buffer))


def assert_serving(daemon: Daemon) -> None:
    answer = daemon.raw(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert daemon.process.poll() is None


def _fuzz_csrs() -> dict:
    """SubjectPublicKeyInfo -> the valid requests with that key."""
    made = {}
    for body in VALID_BODIES:
        csr = sapid.parse_csr(body)
        made.setdefault(csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
            []).append(csr)
    return made


FUZZ_CSRS = _fuzz_csrs()

ALNUM = string.ascii_letters + string.digits
METHODS = st.one_of(
    st.sampled_from([b"PUT", b"POST", b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
                     b"CONNECT", b"put", b"PRI"]),
    st.text(alphabet="!#$%&'*+-.^_`|~" + ALNUM, min_size=1, max_size=10).map(str.encode),
    st.binary(max_size=8))
CLIENT_IDS = st.one_of(
    st.text(alphabet=ALNUM, min_size=1, max_size=130).map(str.encode),
    st.sampled_from([b"", b"%41", b"a-b", b"a.b", b"..", b"a/b", b"a%00", b"\xff\xfe", b"a" * 129,
                     b"abc?x=1", b"abc#frag", b"\xc3\xa9t\xc3\xa9"]),
    st.binary(max_size=40))
TARGETS = st.one_of(
    CLIENT_IDS.map(lambda client_id: b"/api/csr/" + client_id),
    st.sampled_from([b"/api/ca", b"/api/health", b"/api/health?full=1", b"/", b"*", b"/api/csr",
                     b"/api/csr/", b"http://sapid/api/csr/abc", b"//api/ca", b"/api/../api/ca",
                     b"/api/csr/abc/def", b"/API/CSR/abc", b"/api/ca%00"]),
    st.binary(max_size=40))
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9",
                            b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.10", b"HTTP/3", b"",
                            b"HTTP/1.1\x00"])
HEADER_NAMES = st.one_of(
    st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding", b"Content-Type",
                     b"Connection", b"Expect", b"Host", b"X-Forwarded-For", b"X-SSL-Client-DN",
                     b"Accept", b"Content-Length ", b" Host"]),
    st.binary(max_size=12))
HEADER_VALUES = st.one_of(
    st.sampled_from([b"0", b"1", b"5", b"64", b"65536", b"65537", b"99999999999999999999",
                     b"999999999999999999", b"-1", b"+5", b" 5 ", b"0x10", b"5, 5", b"\xb2",
                     b"chunked", b"Chunked", b"gzip, chunked", b"chunked, chunked", b"identity",
                     b"close", b"keep-alive", b"keep-alive, close", b"Upgrade",
                     b"100-continue", b"application/pkcs10", b"application/json",
                     b"text/plain; charset=utf-8", b"application/x-pem-file;;;", b"",
                     b"\xff\xfe", b"a" * 8000, b"a" * 20000]),
    st.binary(max_size=64))
HEADER_LINES = st.one_of(
    st.tuples(HEADER_NAMES, HEADER_VALUES).map(lambda pair: pair[0] + b": " + pair[1]),
    st.tuples(HEADER_NAMES, HEADER_VALUES).map(lambda pair: pair[0] + b":" + pair[1]),
    st.sampled_from([b" folded", b"\tfolded", b"no colon", b":", b"X: a\rb", b"X: a\nb"]))
BODIES = st.one_of(
    st.sampled_from(VALID_BODIES),
    st.sampled_from(VALID_BODIES).flatmap(byte_mutations),
    st.binary(max_size=300),
    st.just(b""))


@st.composite
def chunked(draw, body: bytes) -> bytes:
    """``body`` in chunks of random sizes, sometimes with extensions and trailers."""
    out, pos = [], 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        extension = draw(st.sampled_from([b"", b";name=value", b' ; n = "v \\" w"', b";=",
                                          b" "]))
        out.append(b"%x%s\r\n%s\r\n" % (size, extension, body[pos:pos + size]))
        pos += size
    trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


@st.composite
def http_requests(draw) -> bytes:
    """A request line, header lines and a body, framed by Content-Length, chunks, or not."""
    method, target, version = draw(METHODS), draw(TARGETS), draw(VERSIONS)
    headers = draw(st.lists(HEADER_LINES, max_size=6))
    if draw(st.integers(0, 3)):           # HTTP/1.1 asks for one Host: mostly there
        headers.append(b"Host: sapid")
    body = draw(BODIES)
    framing = draw(st.sampled_from(["length", "length", "length", "chunked", "chunked", "none",
                                    "as-is"]))
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        body = draw(chunked(body))
    elif framing == "none":
        body = b""
    headers = draw(st.permutations(headers))
    head = b"\r\n".join([b" ".join((method, target, version)), *headers])
    return head + b"\r\n\r\n" + body


OVER_THE_SOCKET = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.data_too_large,
                                                  HealthCheck.filter_too_much])


@OVER_THE_SOCKET
@given(request=st.lists(http_requests(), min_size=1, max_size=3).map(b"".join))
def test_random_http_requests(fuzz_daemon, ca_certificate, request):
    offset = fuzz_daemon.log_path.stat().st_size
    first, rest = exchange(fuzz_daemon, request)
    assert first is not None, "the daemon closed the connection without an answer"
    check_answer(first, first_request_line(request)[1], FUZZ_CSRS, ca_certificate)
    for answer in rest:
        check_answer(answer, None, FUZZ_CSRS, ca_certificate)
    log = log_since(fuzz_daemon, offset)
    assert "Traceback" not in log, log
    assert_serving(fuzz_daemon)


def test_http_controls(fuzz_daemon, ca_certificate):
    """The socket fuzzer's client and checks on known exchanges: a signing, a refusal, HEAD,
    pipelining and a half-sent request that times out."""
    body = VALID_BODIES[0]
    put = b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    first, rest = exchange(fuzz_daemon, put + b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first.status == 200 and b"signed_x509_pem" in first.body
    check_answer(first, b"/api/csr/abc", FUZZ_CSRS, ca_certificate)
    assert len(rest) == 1 and rest[0].status == 200 and rest[0].body == b""
    first, rest = exchange(fuzz_daemon, b"HEAD /api/csr/abc HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (first.status, first.body, rest) == (405, b"", [])
    first, _ = exchange(fuzz_daemon, b"HEAD /api/health HTTP/1.1\r\nHost: x\r\nX Y: z\r\n\r\n")
    assert first.status == 400 and json.loads(first.body)["error"] == "bad_request"
    started = time.monotonic()
    first, rest = exchange(fuzz_daemon, b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
    assert first.status == 408 and time.monotonic() - started < 5 and rest == []
    with pytest.raises(AssertionError):         # the checks can fail: a 500 is refused
        check_answer(Answer(500, {"date": "x", "server": "sapid/0", "content-type":
                                  "application/json"}, b'{"error": "internal_error", '
                                                       b'"message": "m"}'),
                     None, FUZZ_CSRS, ca_certificate)


def test_chunked_trailers_are_held_to_the_limit(fuzz_daemon):
    """Trailer fields after the last chunk count against the request limits: a client that
    keeps sending them is refused as soon as they pass the limit, not buffered until the
    request timeout."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(fuzz_daemon.socket)
        sock.sendall(b"PUT /api/csr/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n")
        line = b"X-Trailer: " + b"t" * 1000 + b"\r\n"
        try:
            for _ in range(200):                # 200 KB of trailer, three times the limit
                sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        buffer = bytearray()
        answer = read_answer(sock, buffer, False)
    assert answer is not None
    assert answer.status in (400, 413, 431), answer
    assert json.loads(answer.body)["error"] in ("bad_request", "too_large")
    assert_serving(fuzz_daemon)


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_close_wins_over_keep_alive(fuzz_daemon, version):
    """RFC 9112 9.3: with "close" among its options the connection ends after the response,
    whatever else the Connection header lists."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(fuzz_daemon.socket)
        sock.sendall(b"GET /api/health %s\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n"
                     % version)
        answer = read_answer(sock, bytearray(), False)
    assert answer.status == 200
    assert answer.headers.get("connection") == "close", answer


def test_daemon_survived_everything(fuzz_daemon):
    """Last in the module: after the corpus and the socket fuzzing, the daemon still serves and
    its log holds no traceback."""
    assert_serving(fuzz_daemon)
    log = fuzz_daemon.output()
    assert "Traceback" not in log, log[-3000:]
