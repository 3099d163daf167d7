"""Authority.sign builds each certificate with cryptography's CertificateBuilder.  A regression
test of the profile and of what sign adds (the CA as issuer, validity clamped, naive times as
UTC): for the same draft, a builder set up here by hand gives the same to-be-signed bytes, and
with an EdDSA CA (deterministic signatures) the same certificate; openssl must parse and verify
what comes out."""

from __future__ import annotations

import datetime
import subprocess

import pytest
from conftest import make_csr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

import sapid

UTC = datetime.UTC
CA_KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
}
# What openssl x509 -text calls the signature algorithm of each CA key type.
OPENSSL_NAMES = {"p256": "ecdsa-with-SHA256", "p384": "ecdsa-with-SHA384",
                 "p521": "ecdsa-with-SHA512", "rsa2048": "sha256WithRSAEncryption",
                 "ed25519": "ED25519", "ed448": "ED448"}


def make_authority(key, subject=None, years=40) -> sapid.Authority:
    """An Authority in process over a self-signed CA made here, without records."""
    subject = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Signing CA")])
    now = datetime.datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = x509.CertificateBuilder(
        issuer_name=subject, subject_name=subject, public_key=key.public_key(),
        serial_number=x509.random_serial_number(), not_valid_before=now,
        not_valid_after=now.replace(year=now.year + years),
        extensions=[x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True,
                                   x509.BasicConstraints(True, None)),
                    x509.Extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, ski)])
    digest = sapid.signature_hash(key)
    certificate = builder.sign(key, digest)
    identity = sapid.Identity("/nonexistent", certificate, (), key)
    return sapid.Authority(sapid.Config(), identity, sapid.BUILTIN_HOOKS, None,
                           sapid.HookRunner(1))


def reference(authority: sapid.Authority, draft: sapid.Draft) -> x509.Certificate:
    """The same draft through cryptography's CertificateBuilder."""
    ca = authority.identity.certificate
    builder = x509.CertificateBuilder(
        issuer_name=ca.subject, subject_name=draft.subject, public_key=draft.public_key,
        serial_number=sapid.normalize_serial(draft.serial_number),
        not_valid_before=draft.not_valid_before,
        not_valid_after=min(draft.not_valid_after, ca.not_valid_after_utc),
        extensions=list(draft.extensions.values()))
    return builder.sign(authority.identity.key, sapid.signature_hash(authority.identity.key))


def draft_for(authority, csr_path) -> sapid.Draft:
    checked = sapid.check_csr(sapid.parse_csr(csr_path.read_bytes()))
    return authority.draft(checked, datetime.timedelta(days=365))


def openssl_text(tmp_path, certificate: x509.Certificate, name="leaf.pem") -> str:
    path = tmp_path / name
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-text", "-serial"],
                          capture_output=True, text=True, check=True)
    return done.stdout


def openssl_verifies(tmp_path, authority, certificate) -> bool:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(authority.identity.certificate.public_bytes(serialization.Encoding.PEM))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(leaf)],
                          capture_output=True, text=True, check=False)
    return done.returncode == 0


@pytest.mark.parametrize("ca_key", list(CA_KEYS))
@pytest.mark.parametrize("csr_key", ["p256", "rsa2048", "ed25519"])
def test_same_bytes_as_the_reference_encoder(tmp_path, ca_key, csr_key):
    authority = make_authority(CA_KEYS[ca_key]())
    draft = draft_for(authority, make_csr(tmp_path, csr_key, "/CN=device1/O=Example/C=DE",
                                          "DNS:device1.example,IP:192.0.2.7,IP:2001:db8::1,"
                                          "email:ops@example.com,URI:https://device1.example/"))
    ours, theirs = authority.sign(draft), reference(authority, draft)
    assert ours.tbs_certificate_bytes == theirs.tbs_certificate_bytes
    if ca_key in ("ed25519", "ed448"):          # deterministic: the whole certificate
        assert ours.public_bytes(serialization.Encoding.DER) == theirs.public_bytes(
            serialization.Encoding.DER)
    assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
    ours.verify_directly_issued_by(authority.identity.certificate)
    text = openssl_text(tmp_path, ours)
    assert f"Signature Algorithm: {OPENSSL_NAMES[ca_key]}" in text, text
    assert openssl_verifies(tmp_path, authority, ours)
    # The negative twin: another CA of the same type and name does not vouch for it.
    assert not openssl_verifies(tmp_path, make_authority(CA_KEYS[ca_key]()), ours)


def test_hook_edited_drafts_encode_as_the_reference_does(tmp_path):
    """What presign can do: every field, naive times, extensions added, replaced, removed,
    critical or not, unknown ones; serials whose top bit is set."""
    authority = make_authority(ed25519.Ed25519PrivateKey.generate())
    csr = make_csr(tmp_path, "p256")
    other_key = ec.generate_private_key(ec.SECP384R1()).public_key()
    edits = [
        lambda d: setattr(d, "serial_number", 0x80),
        lambda d: setattr(d, "serial_number", 0xFF),
        lambda d: setattr(d, "serial_number", 1),
        lambda d: setattr(d, "serial_number", 2**159 - 1),
        lambda d: setattr(d, "serial_number", "00ABCDEF"),        # ssl_api's hex strings
        lambda d: setattr(d, "not_valid_before", datetime.datetime(2024, 2, 29, 12, 0, 59)),
        lambda d: setattr(d, "not_valid_after", datetime.datetime(2049, 12, 31, 23, 59, 59,
                                                                  tzinfo=UTC)),
        lambda d: setattr(d, "not_valid_after", datetime.datetime(2050, 1, 1, tzinfo=UTC)),
        lambda d: setattr(d, "not_valid_before", datetime.datetime(
            2026, 6, 1, 2, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))),
        lambda d: setattr(d, "subject", x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ümlaut ☃"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Printable",
                               x509.name._ASN1Type.PrintableString)])),
        lambda d: setattr(d, "subject", x509.Name([])),
        lambda d: setattr(d, "public_key", other_key),
        lambda d: d.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), critical=True),
        lambda d: d.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=False),
        lambda d: d.add_extension(x509.CertificatePolicies([x509.PolicyInformation(
            x509.ObjectIdentifier("2.23.140.1.2.1"), None)]), critical=False),
        lambda d: d.remove_extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME),
        lambda d: d.extensions.clear(),
    ]
    for number, edit in enumerate(edits):
        draft = draft_for(authority, csr)
        edit(draft)
        ours = authority.sign(draft)
        theirs = reference(authority, dataclass_utc(draft))
        assert ours.public_bytes(serialization.Encoding.DER) == theirs.public_bytes(
            serialization.Encoding.DER), f"edit {number}"
        assert ours.version == x509.Version.v3
    # The UTCTime/GeneralizedTime boundary of RFC 5280, as openssl reads it.
    draft = draft_for(authority, csr)
    draft.not_valid_after = datetime.datetime(2050, 1, 1, 0, 0, 1, tzinfo=UTC)
    certificate = authority.sign(draft)
    assert certificate.not_valid_after_utc == draft.not_valid_after
    assert "Not After : Jan  1 00:00:01 2050 GMT" in openssl_text(tmp_path, certificate)
    tbs = certificate.tbs_certificate_bytes
    assert b"\x18\x0f20500101000001Z" in tbs and b"\x17\x0d" in tbs   # one of each


def dataclass_utc(draft: sapid.Draft) -> sapid.Draft:
    """The reference builder compares times with the CA's: give it aware ones, as sapid does."""
    def aware(moment):
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return sapid.Draft(draft.subject, draft.public_key, draft.serial_number,
                       aware(draft.not_valid_before), aware(draft.not_valid_after),
                       dict(draft.extensions))


def _tlv_end(data: bytes, pos: int) -> int:
    """Where the DER element at ``pos`` ends."""
    size, pos = data[pos + 1], pos + 2
    if size & 0x80:
        count = size & 0x7F
        size, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
    return pos + size


def subject_der(certificate: x509.Certificate) -> bytes:
    """The subject of ``certificate`` as its own bytes encode it."""
    tbs = certificate.tbs_certificate_bytes
    pos = 4 if tbs[1] & 0x80 == 0 else 2 + (tbs[1] & 0x7F)
    if tbs[pos] == 0xA0:                      # [0] version
        pos = _tlv_end(tbs, pos)
    for _ in range(4):                        # serial, signature, issuer, validity
        pos = _tlv_end(tbs, pos)
    return tbs[pos:_tlv_end(tbs, pos)]


def test_issuer_is_the_ca_subject_byte_for_byte(tmp_path):
    """A CA whose name uses PrintableString and an odd attribute order: certificates name it
    with its own bytes, so chain building by name matches."""
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "Old CA", x509.name._ASN1Type.PrintableString),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Legacy Org",
                           x509.name._ASN1Type.T61String)])
    authority = make_authority(ec.generate_private_key(ec.SECP256R1()), subject)
    certificate = authority.sign(draft_for(authority, make_csr(tmp_path)))
    ca = authority.identity.certificate
    assert certificate.issuer.public_bytes() == ca.subject.public_bytes()
    assert subject_der(ca) in certificate.tbs_certificate_bytes
    assert b"\x14\x0aLegacy Org" in subject_der(ca)         # the T61String kept as it was
    assert openssl_verifies(tmp_path, authority, certificate)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: setattr(d, "not_valid_before", datetime.datetime(1949, 12, 31, tzinfo=UTC)),
     "before 1950"),
    (lambda d: setattr(d, "not_valid_after", d.not_valid_before), "not after"),
    (lambda d: setattr(d, "not_valid_after", "tomorrow"), "datetime"),
    (lambda d: setattr(d, "subject", "CN=device1"), "x509.Name"),
    (lambda d: setattr(d, "public_key", b"not a key"), "public_bytes"),
    (lambda d: d.extensions.update({ExtensionOID.KEY_USAGE: "digitalSignature"}),
     "x509.Extension"),
    (lambda d: setattr(d, "serial_number", 0), "1 .. 2**159-1"),
])
def test_unsignable_drafts_are_hook_errors(tmp_path, edit, needle):
    authority = make_authority(ec.generate_private_key(ec.SECP256R1()))
    draft = draft_for(authority, make_csr(tmp_path))
    edit(draft)
    with pytest.raises(sapid.HookError) as raised:
        authority.sign(draft)
    assert needle in str(raised.value), raised.value


def test_a_ca_key_sapid_cannot_sign_with_is_refused():
    from cryptography.hazmat.primitives.asymmetric import dsa
    key = dsa.generate_private_key(2048)
    with pytest.raises(ValueError, match="DSA"):
        sapid.check_ca_key(key)
    for make in CA_KEYS.values():
        sapid.check_ca_key(make())
