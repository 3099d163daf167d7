#!/usr/bin/env python3
"""Build tests/data/csr/: malformed and unusual PKCS#10 requests for tests/test_fuzz.py.

Run once, from anywhere: ``python3 tests/data/make_corpus.py``; it rewrites csr/ next to itself and
its outputs are committed.  The awkward requests are assembled here from DER bytes (a tiny DER
writer below) and signed with cryptography's ``sign()`` over the hand-built
CertificationRequestInfo; three come from ``openssl req`` as real devices make them (DSA,
explicit-curve EC, RSA-PSS).  Keys are derived from fixed seeds (RSA primes from a seeded search,
EC scalars and EdDSA seeds from SHA-256 of a label) and RSA PKCS#1 v1.5 and EdDSA signatures are
deterministic, so most files come out byte-identical on every run; those signed with ECDSA, DSA or
PSS (random nonces and salts) and the DSA key differ from run to run, as the table says.

The table is the contract tests/test_fuzz.py checks, one row per file: ``200`` means a
certificate that satisfies the profile of DESIGN.md (and, where the row says so, something more),
otherwise the HTTP status and the error code of the JSON answer.

| file | expect | what it is |
|---|---|---|
| baseline-ed25519.der | 200 | a plain valid request (Ed25519, CN and a DNS SAN): the corpus's control |
| baseline-rsa2048.pem | 200 | a plain valid RSA-2048 request, PEM, PKCS#1 v1.5 SHA-256 |
| version-v2.der | 400 not_a_csr | version field 1 (v2): PKCS#10 knows only v1 (0) |
| version-v3.der | 400 not_a_csr | version field 2 (v3) |
| signature-bit-flipped.der | 400 bad_csr_signature | RSA-2048 request, one bit of the signature flipped |
| signature-other-key.der | 400 bad_csr_signature | RSA-2048 key in the request, signed by another RSA-2048 key |
| signature-unknown-algorithm.der | 400 bad_csr_signature | signatureAlgorithm OID 1.3.6.1.4.1.99999.7 |
| sig-ed25519-named-ecdsa.der | 400 bad_csr_signature | Ed25519 key and a valid Ed25519 signature, but signatureAlgorithm says ecdsa-with-SHA256 |
| sig-ed25519-named-ed448.der | 400 bad_csr_signature | Ed25519 key and signature; signatureAlgorithm says Ed448 |
| sig-rsa-named-ecdsa.der | 400 bad_csr_signature | RSA-2048 key, PKCS#1 v1.5 signature; signatureAlgorithm says ecdsa-with-SHA256 |
| sig-ecdsa-named-rsa.der | 400 bad_csr_signature | P-256 key, ECDSA signature; signatureAlgorithm says sha256WithRSAEncryption (random nonce) |
| key-dsa.pem | 400 key_refused | DSA-2048 key, dsa_with_SHA256 (openssl req; random) |
| key-rsa512.der | 400 key_refused | RSA-512 key |
| key-rsa1024.der | 400 key_refused | RSA-1024 key |
| key-rsa-e3.der | 400 key_refused | RSA-2048 key with public exponent 3 (validly signed) |
| key-rsa-even-e.der | 400 key_refused | RSA-2048 modulus with exponent 65538 (no key can sign for it) |
| key-ec-explicit.pem | 400 key_refused | P-256 key with explicit (specified) domain parameters (openssl; random) |
| key-secp256k1.der | 400 key_refused | EC key on secp256k1 (random ECDSA nonce) |
| key-p224.der | 400 key_refused | EC key on P-224 (random ECDSA nonce) |
| key-x25519.der | 400 key_refused | X25519 key (key agreement only), signed by an Ed25519 key |
| key-ed448.pem | 200 | Ed448 key: accepted; keyUsage digitalSignature only |
| key-p256-ecdsa.der | 200 | EC P-256 key, ecdsa-with-SHA256 (random nonce) |
| subject-huge.der | 200 | 900 OU attributes of 55 characters: a 60 KB request, under the 64 KiB limit; subject copied whole |
| subject-empty-no-san.der | 400 name_refused | empty subject and no extensions |
| subject-empty-with-san.der | 200 | empty subject with a DNS SAN: SAN copied and made critical |
| ext-unknown-critical.der | 200 | asks for an unknown critical extension 1.3.6.1.4.1.99999.1: not copied |
| ext-ca-true.der | 200 | asks for basicConstraints CA:TRUE, keyCertSign, codeSigning: a leaf all the same |
| ext-duplicate.der | 400 not_a_csr | basicConstraints twice in the extensionRequest |
| ext-duplicate-san.der | 400 not_a_csr | subjectAltName twice in the extensionRequest |
| ext-malformed-value.der | 400 name_refused | basicConstraints whose value is not DER (a sapid quirk: "names cannot be read") |
| ext-tls-feature-unknown.der | 400 name_refused | TLS feature extension (must-staple's) listing feature 95, unknown to cryptography |
| san-othername.der | 400 name_refused | SAN otherName (UPN) |
| san-dirname.der | 400 name_refused | SAN directoryName |
| san-registeredid.der | 400 name_refused | SAN registeredID |
| san-ip-with-mask.der | 400 name_refused | SAN iPAddress of 8 octets (address and mask): a network, not an address |
| san-dns-non-ascii.der | 400 name_refused | SAN dNSName with a byte over 0x7F in its IA5String |
| san-ip-and-email.der | 200 | SAN with IPv4, IPv6, email and URI names: all copied, in order |
| name-utf8-invalid.der | 400 name_refused | CN UTF8String holding the bytes C3 28 (not UTF-8) |
| name-bmpstring.pem | 200 | CN as a BMPString ("Grüße ☃"): kept as is |
| name-bmpstring-odd.der | 400 not_a_csr | CN as a BMPString of odd length (3 octets): cryptography refuses it on load |
| name-teletexstring.der | 200 | CN as a TeletexString: kept as is |
| name-empty-rdn.der | 400 name_refused | a subject with an empty RDN (SET of nothing) |
| name-integer-value.der | 400 name_refused | CN whose value is an INTEGER, not a string |
| name-bitstring-cn.der | 400 name_refused | CN whose value is a BIT STRING |
| name-unique-identifier.der | 200 | x500UniqueIdentifier (a BIT STRING attribute, as X.520 has it) besides the CN |
| sig-sha1.pem | 400 weak_csr_signature | RSA-2048, sha1WithRSAEncryption |
| sig-md5.der | 400 weak_csr_signature | RSA-2048, md5WithRSAEncryption |
| sig-ecdsa-sha1.der | 400 weak_csr_signature | P-256, ecdsa-with-SHA1 (random nonce) |
| sig-rsa-pss.pem | 200 | RSA-2048, RSASSA-PSS SHA-256 salt 32 (openssl req; random salt) |
| trailing-garbage.der | 400 not_a_csr | a valid DER request followed by 5 bytes |
| two-csrs.pem | 400 not_a_csr | two PEM requests in one body: the API takes one |
| certificate-label.pem | 400 not_a_csr | a request's DER under BEGIN CERTIFICATE |
| pem-new-label.pem | 200 | the "NEW CERTIFICATE REQUEST" label old tools (Netscape, MS) write |
| pem-crlf-indented.pem | 200 | PEM with CRLF line ends after leading blank lines |
| pem-bad-base64.pem | 400 not_a_csr | PEM armour around text that is not base64 |
| attr-challenge-password.der | 200 | attributes hold challengePassword and unstructuredName besides extensionRequest |
| attr-two-extension-requests.der | 400 not_a_csr | two extensionRequest attributes |
| ber-indefinite-length.der | 400 not_a_csr | the outer SEQUENCE in BER indefinite-length form (80 ... 00 00) |
| ber-long-form-length.der | 400 not_a_csr | the version INTEGER's length in non-minimal long form (81 01) |
| ber-length-overflow.der | 400 not_a_csr | the outer length says 0x7FFFFFFF octets |
| empty.der | 400 not_a_csr | zero bytes |
| whitespace.pem | 400 not_a_csr | only blank lines |
"""

from __future__ import annotations

import base64
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import (
    ec,
    ed448,
    ed25519,
    padding,
    rsa,
    x25519,
)

OUT = Path(__file__).resolve().parent / "csr"

# ---------------------------------------------------------------------------------------------
# A tiny DER writer
# ---------------------------------------------------------------------------------------------


def length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + length(len(content)) + content


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(parts)))     # DER orders a SET OF by encoding


def integer(value: int) -> bytes:
    size = value.bit_length() // 8 + 1
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    body = bytearray((40 * arcs[0] + arcs[1],))
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


NULL = b"\x05\x00"
TRUE = b"\x01\x01\xff"


def octets(data: bytes) -> bytes:
    return tlv(0x04, data)


def bits(data: bytes) -> bytes:
    return tlv(0x03, b"\x00" + data)


def utf8(text: str) -> bytes:
    return tlv(0x0C, text.encode())


def printable(text: str) -> bytes:
    return tlv(0x13, text.encode("ascii"))


def ia5(text: str) -> bytes:
    return tlv(0x16, text.encode("ascii"))


# Object identifiers
CN, OU, O = "2.5.4.3", "2.5.4.11", "2.5.4.10"
EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
UNSTRUCTURED_NAME = "1.2.840.113549.1.9.2"
BASIC_CONSTRAINTS, KEY_USAGE, EKU, SAN = "2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.17"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
ALGORITHMS = {      # (key kind, hash name) -> AlgorithmIdentifier
    ("rsa", "sha256"): seq(oid("1.2.840.113549.1.1.11"), NULL),
    ("rsa", "sha1"): seq(oid("1.2.840.113549.1.1.5"), NULL),
    ("rsa", "md5"): seq(oid("1.2.840.113549.1.1.4"), NULL),
    ("ec", "sha256"): seq(oid("1.2.840.10045.4.3.2")),
    ("ec", "sha1"): seq(oid("1.2.840.10045.4.1")),
    ("ed25519", None): seq(oid("1.3.101.112")),
    ("ed448", None): seq(oid("1.3.101.113")),
}
HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1, "md5": hashes.MD5}


def name(*rdns) -> bytes:
    """A Name from RDNs, each a list of (oid, encoded value)."""
    return seq(*(set_of(*(seq(oid(kind), value) for kind, value in rdn)) for rdn in rdns))


def cn(text: str) -> bytes:
    return name([(CN, utf8(text))])


def extension(kind: str, value: bytes, critical: bool = False) -> bytes:
    return seq(oid(kind), *((TRUE,) if critical else ()), octets(value))


def san(*general_names: bytes) -> bytes:
    return extension(SAN, seq(*general_names))


def dns(text: str) -> bytes:
    return tlv(0x82, text.encode("latin-1"))


def extension_request(*extensions: bytes) -> bytes:
    return seq(oid(EXTENSION_REQUEST), set_of(seq(*extensions)))


def request_info(subject: bytes, spki: bytes, attributes=(), version: int = 0) -> bytes:
    """CertificationRequestInfo; ``attributes`` is the [0] IMPLICIT SET OF Attribute."""
    return seq(integer(version), subject, spki, tlv(0xA0, b"".join(sorted(attributes))))


def spki_of(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(info: bytes, key, digest: str | None = "sha256", algorithm: bytes | None = None) -> bytes:
    """CertificationRequest: ``info`` signed by ``key`` (whatever key ``info`` holds)."""
    if isinstance(key, rsa.RSAPrivateKey):
        kind, signature = "rsa", key.sign(info, padding.PKCS1v15(), HASHES[digest]())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        kind, signature = "ec", key.sign(info, ec.ECDSA(HASHES[digest]()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        kind, digest, signature = "ed25519", None, key.sign(info)
    else:
        kind, digest, signature = "ed448", None, key.sign(info)
    return seq(info, algorithm or ALGORITHMS[kind, digest], bits(signature))


def pem(der: bytes, label: str = "CERTIFICATE REQUEST", newline: str = "\n") -> bytes:
    body = base64.b64encode(der).decode()
    lines = [f"-----BEGIN {label}-----", *(body[i:i + 64] for i in range(0, len(body), 64)),
             f"-----END {label}-----"]
    return (newline.join(lines) + newline).encode()


# ---------------------------------------------------------------------------------------------
# Deterministic keys
# ---------------------------------------------------------------------------------------------

def _seed(label: str) -> bytes:
    return hashlib.sha256(f"sapid corpus {label}".encode()).digest()


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while not d & 1:
        d, s = d >> 1, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(rng: random.Random, size: int, e: int) -> int:
    while True:
        candidate = rng.getrandbits(size) | (3 << (size - 2)) | 1
        if _is_prime(candidate) and (candidate - 1) % e:
            return candidate


def rsa_key(label: str, size: int = 2048, e: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA key from a seeded prime search: the same key on every run."""
    rng = random.Random(_seed(label))
    while True:
        p, q = _prime(rng, size // 2, e), _prime(rng, size // 2, e)
        if p != q and (p * q).bit_length() == size:
            break
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                 rsa.rsa_crt_iqmp(p, q), public).private_key()


def ec_key(label: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    order = {"secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
             "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
             "secp224r1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFF16A2E0B8F03E13DD29455C5C2A3D}[curve.name]
    return ec.derive_private_key(int.from_bytes(_seed(label), "big") % (order - 1) + 1, curve)


def ed25519_key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(_seed(label))


def ed448_key(label: str) -> ed448.Ed448PrivateKey:
    return ed448.Ed448PrivateKey.from_private_bytes((_seed(label) * 2)[:57])


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build(work: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    ed = ed25519_key("ed25519")
    rsa_a, rsa_b = rsa_key("rsa-a"), rsa_key("rsa-b")
    device = cn("device1")
    device_san = extension_request(san(dns("device1.example")))

    def plain(key, subject=device, attributes=(device_san,), **options) -> bytes:
        return sign(request_info(subject, spki_of(key), attributes), key, **options)

    files["baseline-ed25519.der"] = plain(ed)
    files["baseline-rsa2048.pem"] = pem(plain(rsa_a))

    # Version field: PKCS#10 v1 is 0; 1 and 2 are v2 and v3.
    for version, label in ((1, "v2"), (2, "v3")):
        info = request_info(device, spki_of(ed), (device_san,), version=version)
        files[f"version-{label}.der"] = sign(info, ed)

    # Signatures
    good = bytearray(plain(rsa_a))
    good[-1] ^= 0x01
    files["signature-bit-flipped.der"] = bytes(good)
    files["signature-other-key.der"] = sign(request_info(device, spki_of(rsa_a), (device_san,)),
                                            rsa_b)
    info = request_info(device, spki_of(ed), (device_san,))
    files["signature-unknown-algorithm.der"] = seq(info, seq(oid("1.3.6.1.4.1.99999.7")),
                                                   bits(ed.sign(info)))

    # A valid signature under another algorithm's name.
    files["sig-ed25519-named-ecdsa.der"] = sign(info, ed, algorithm=ALGORITHMS["ec", "sha256"])
    files["sig-ed25519-named-ed448.der"] = sign(info, ed, algorithm=ALGORITHMS["ed448", None])
    info_rsa = request_info(device, spki_of(rsa_a), (device_san,))
    files["sig-rsa-named-ecdsa.der"] = sign(info_rsa, rsa_a, algorithm=ALGORITHMS["ec", "sha256"])
    p256_named = ec_key("p256", ec.SECP256R1())
    files["sig-ecdsa-named-rsa.der"] = sign(
        request_info(device, spki_of(p256_named), (device_san,)), p256_named,
        algorithm=ALGORITHMS["rsa", "sha256"])

    # Keys
    for size in (512, 1024):
        files[f"key-rsa{size}.der"] = plain(rsa_key(f"rsa{size}", size))
    files["key-rsa-e3.der"] = plain(rsa_key("rsa-e3", e=3))
    n = rsa_a.public_key().public_numbers().n
    even = seq(seq(oid(RSA_ENCRYPTION), NULL), bits(seq(integer(n), integer(65538))))
    files["key-rsa-even-e.der"] = sign(request_info(device, even, (device_san,)), rsa_a)
    files["key-secp256k1.der"] = plain(ec_key("k1", ec.SECP256K1()))
    files["key-p224.der"] = plain(ec_key("p224", ec.SECP224R1()))
    agreement = x25519.X25519PrivateKey.from_private_bytes(_seed("x25519"))
    files["key-x25519.der"] = sign(request_info(device, spki_of(agreement), (device_san,)), ed)
    files["key-ed448.pem"] = pem(plain(ed448_key("ed448")))
    p256 = ec_key("p256", ec.SECP256R1())
    files["key-p256-ecdsa.der"] = plain(p256)

    # openssl-made requests: DSA, explicit-curve EC, RSA-PSS.
    dsa_params, dsa_key = work / "dsa.params", work / "dsa.key"
    openssl("genpkey", "-genparam", "-algorithm", "DSA", "-pkeyopt", "dsa_paramgen_bits:2048",
            "-pkeyopt", "dsa_paramgen_q_bits:256", "-out", str(dsa_params))
    openssl("genpkey", "-paramfile", str(dsa_params), "-out", str(dsa_key))
    named, explicit = work / "p256.key", work / "explicit.key"
    named.write_bytes(key_pem(p256))
    openssl("ec", "-in", str(named), "-param_enc", "explicit", "-out", str(explicit))
    rsa_path = work / "rsa.key"
    rsa_path.write_bytes(key_pem(rsa_a))
    for out, key, extra in (("key-dsa.pem", dsa_key, ["-sha256"]),
                            ("key-ec-explicit.pem", explicit, ["-sha256"]),
                            ("sig-rsa-pss.pem", rsa_path,
                             ["-sha256", "-sigopt", "rsa_padding_mode:pss",
                              "-sigopt", "rsa_pss_saltlen:32"])):
        path = work / out
        openssl("req", "-new", "-key", str(key), "-subj", "/CN=device1", "-addext",
                "subjectAltName=DNS:device1.example", *extra, "-out", str(path))
        files[out] = path.read_bytes()

    # Subjects
    units = [[(OU, utf8(f"unit {i:04d} " + "x" * 45))] for i in range(900)]
    files["subject-huge.der"] = plain(ed, name([(CN, utf8("huge"))], *units))
    files["subject-empty-no-san.der"] = plain(ed, name(), ())
    files["subject-empty-with-san.der"] = plain(ed, name())

    # Extensions
    unknown = extension("1.3.6.1.4.1.99999.1", utf8("please honour me"), critical=True)
    files["ext-unknown-critical.der"] = plain(
        ed, attributes=(extension_request(san(dns("device1.example")), unknown),))
    ca_true = extension(BASIC_CONSTRAINTS, seq(TRUE), critical=True)
    files["ext-ca-true.der"] = plain(ed, attributes=(extension_request(
        ca_true, extension(KEY_USAGE, tlv(0x03, b"\x01\x06"), critical=True),
        extension(EKU, seq(oid("1.3.6.1.5.5.7.3.3"))), san(dns("device1.example"))),))
    files["ext-duplicate.der"] = plain(ed, attributes=(extension_request(
        extension(BASIC_CONSTRAINTS, seq()), san(dns("device1.example")),
        extension(BASIC_CONSTRAINTS, seq(TRUE), critical=True)),))
    files["ext-duplicate-san.der"] = plain(ed, attributes=(extension_request(
        san(dns("device1.example")), san(dns("evil.example"))),))
    files["ext-malformed-value.der"] = plain(ed, attributes=(extension_request(
        extension(BASIC_CONSTRAINTS, b"\x30\x05\x01\x01"), san(dns("device1.example"))),))

    tls_feature = extension("1.3.6.1.5.5.7.1.24", seq(integer(95)))
    files["ext-tls-feature-unknown.der"] = plain(ed, attributes=(extension_request(
        san(dns("device1.example")), tls_feature),))

    # Subject alternative names
    upn = tlv(0xA0, oid("1.3.6.1.4.1.311.20.2.3") + tlv(0xA0, utf8("admin@example.com")))
    for label, general_name in (
            ("othername", upn),
            ("dirname", tlv(0xA4, cn("inner"))),
            ("registeredid", tlv(0x88, oid("1.3.6.1.4.1.99999.2")[2:])),
            ("ip-with-mask", tlv(0x87, bytes((192, 0, 2, 0, 255, 255, 255, 0)))),
            ("dns-non-ascii", dns("d\xe9vice.example"))):
        files[f"san-{label}.der"] = plain(ed, attributes=(extension_request(
            san(dns("device1.example"), general_name)),))
    files["san-ip-and-email.der"] = plain(ed, attributes=(extension_request(san(
        dns("device1.example"), tlv(0x87, bytes((192, 0, 2, 7))),
        tlv(0x87, bytes.fromhex("20010db8000000000000000000000001")),
        tlv(0x81, b"ops@example.com"), tlv(0x86, b"https://device1.example/"))),))

    # Name encodings
    files["name-utf8-invalid.der"] = plain(ed, name([(CN, tlv(0x0C, b"bad \xc3\x28 utf8"))]))
    files["name-bmpstring.pem"] = pem(plain(ed, name([(CN, tlv(0x1E, "Grüße ☃".encode(
        "utf-16-be")))])))
    files["name-bmpstring-odd.der"] = plain(ed, name([(CN, tlv(0x1E, b"\x00a\x00"))]))
    files["name-teletexstring.der"] = plain(ed, name([(CN, tlv(0x14, b"teletex device"))]))
    files["name-integer-value.der"] = plain(ed, name([(CN, integer(7))]))
    files["name-bitstring-cn.der"] = plain(ed, name([(CN, bits(b"device1"))]))
    files["name-unique-identifier.der"] = plain(ed, name([(CN, utf8("device1"))],
                                                         [("2.5.4.45", bits(b"\x01\x02"))]))
    files["name-empty-rdn.der"] = plain(ed, tlv(0x30, tlv(0x31, b"") + set_of(
        seq(oid(CN), utf8("device1")))))

    # Signature hashes
    files["sig-sha1.pem"] = pem(plain(rsa_a, digest="sha1"))
    files["sig-md5.der"] = plain(rsa_a, digest="md5")
    files["sig-ecdsa-sha1.der"] = plain(p256, digest="sha1")

    # Framing: DER and PEM
    files["trailing-garbage.der"] = plain(ed) + b"\x00\x01junk"
    files["two-csrs.pem"] = pem(plain(ed)) + pem(plain(ed, cn("device2"), (extension_request(
        san(dns("device2.example"))),)))
    files["certificate-label.pem"] = pem(plain(ed), "CERTIFICATE")
    files["pem-new-label.pem"] = pem(plain(ed), "NEW CERTIFICATE REQUEST")
    files["pem-crlf-indented.pem"] = b"\r\n\r\n" + pem(plain(ed), newline="\r\n")
    files["pem-bad-base64.pem"] = (b"-----BEGIN CERTIFICATE REQUEST-----\n"
                                   b"this is not base64 at all!\n"
                                   b"-----END CERTIFICATE REQUEST-----\n")

    # Attributes
    challenge = seq(oid(CHALLENGE_PASSWORD), set_of(printable("open sesame")))
    unstructured = seq(oid(UNSTRUCTURED_NAME), set_of(utf8("a device")))
    files["attr-challenge-password.der"] = plain(ed, attributes=(challenge, unstructured,
                                                                 device_san))
    files["attr-two-extension-requests.der"] = plain(ed, attributes=(
        device_san, extension_request(san(dns("device2.example")))))

    # BER and broken lengths
    der = plain(ed)
    header = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    files["ber-indefinite-length.der"] = b"\x30\x80" + der[header:] + b"\x00\x00"
    info = request_info(device, spki_of(ed), (device_san,))
    inner = info[2 + (info[1] & 0x7F if info[1] & 0x80 else 0):]
    assert inner[:3] == b"\x02\x01\x00"
    long_form = tlv(0x30, b"\x02\x81\x01\x00" + inner[3:])
    files["ber-long-form-length.der"] = seq(long_form, ALGORITHMS["ed25519", None],
                                            bits(ed.sign(long_form)))
    files["ber-length-overflow.der"] = b"\x30\x84\x7f\xff\xff\xff" + der[header:]
    files["empty.der"] = b""
    files["whitespace.pem"] = b"\n\n  \r\n\t\n"
    return files


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        files = build(Path(folder))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for file_name, data in sorted(files.items()):
        (OUT / file_name).write_bytes(data)
    print(f"{len(files)} files in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
