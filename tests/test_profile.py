"""The default certificate profile of DESIGN.md, extension by extension with its criticality,
for each CA key type; the pipeline runs in process (Authority.issue), signing real CSRs."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

import sapid
from conftest import PASSPHRASE, make_csr

CA_KEYS = ["p256", "p384", "rsa2048", "ed25519"]
HASHES = {"p256": hashes.SHA256, "p384": hashes.SHA384, "rsa2048": hashes.SHA256,
          "ed25519": type(None)}


def issue(authority, csr_path, client_id="device1") -> x509.Certificate:
    return authority.wait(authority.issue(sapid.Signing(csr_path.read_bytes(),
                                                        client_id))).certificate


def extensions_of(certificate) -> dict:
    return {e.oid: e for e in certificate.extensions}


@pytest.mark.parametrize("ca_key", CA_KEYS)
@pytest.mark.parametrize("csr_key", ["rsa2048", "p256", "ed25519"])
def test_default_profile(authority_for, identities, tmp_path, ca_key, csr_key):
    authority = authority_for(identities(ca_key))
    ca = authority.identity.certificate
    certificate = issue(authority, make_csr(tmp_path, csr_key, "/CN=device1/O=Example",
                                            "DNS:device1.example,IP:192.0.2.7"))
    assert certificate.version == x509.Version.v3
    assert certificate.issuer == ca.subject
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device1"
    assert isinstance(certificate.signature_hash_algorithm, HASHES[ca_key])
    certificate.verify_directly_issued_by(ca)

    found = extensions_of(certificate)
    assert list(found) == [ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                           ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                           ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
                           ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    basic = found[ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical and basic.value.ca is False and basic.value.path_length is None
    usage = found[ExtensionOID.KEY_USAGE]
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is (csr_key == "rsa2048")
    assert not (usage.value.content_commitment or usage.value.data_encipherment
                or usage.value.key_agreement or usage.value.key_cert_sign or usage.value.crl_sign)
    eku = found[ExtensionOID.EXTENDED_KEY_USAGE]
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = found[ExtensionOID.SUBJECT_KEY_IDENTIFIER]
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())
    aki = found[ExtensionOID.AUTHORITY_KEY_IDENTIFIER]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert not aki.critical and aki.value.key_identifier == ca_ski.digest
    assert aki.value.authority_cert_issuer is None
    san = found[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["device1.example"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]


def test_empty_subject_makes_san_critical(authority_for, identities, tmp_path):
    authority = authority_for(identities("p256"))
    certificate = issue(authority, make_csr(tmp_path, subject="/", sans="DNS:only.example"))
    assert len(certificate.subject) == 0
    assert certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_no_san_no_extension(authority_for, identities, tmp_path):
    authority = authority_for(identities("p256"))
    certificate = issue(authority, make_csr(tmp_path, sans=None))
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_only_san_is_taken_from_the_csr(authority_for, identities, tmp_path):
    authority = authority_for(identities("p256"))
    csr = make_csr(tmp_path, extra=(
        "basicConstraints=critical,CA:TRUE,pathlen:3", "keyUsage=critical,keyCertSign",
        "extendedKeyUsage=codeSigning", "1.2.3.4.5=critical,ASN1:UTF8String:unknown",
        "crlDistributionPoints=URI:http://evil.example/crl"))
    certificate = issue(authority, csr)
    found = extensions_of(certificate)
    assert found[ExtensionOID.BASIC_CONSTRAINTS].value.ca is False
    assert not found[ExtensionOID.KEY_USAGE].value.key_cert_sign
    assert list(found[ExtensionOID.EXTENDED_KEY_USAGE].value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert x509.ObjectIdentifier("1.2.3.4.5") not in found
    assert ExtensionOID.CRL_DISTRIBUTION_POINTS not in found


def test_validity_and_backdate(authority_for, identities, tmp_path):
    authority = authority_for(identities("p256"), validity_days=30, backdate_seconds=60)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    certificate = issue(authority, make_csr(tmp_path))
    after = datetime.datetime.now(datetime.timezone.utc)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    assert before - datetime.timedelta(seconds=61) <= start <= after - datetime.timedelta(seconds=59)
    assert end - start == datetime.timedelta(days=30, seconds=60)


def test_validity_clamped_to_the_ca(authority_for, tmp_path):
    """A CA with 10 days left issues certificates that end when it does."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short-lived CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=10))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .sign(key, hashes.SHA256()))
    folder = tmp_path / "identity"
    folder.mkdir()
    (folder / "ca.cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "ca.private_key.pem"
    key_path.write_bytes(sapid.encrypt_private_key(key, PASSPHRASE))
    key_path.chmod(0o640)
    certificate = issue(authority_for(folder), make_csr(tmp_path))
    assert certificate.not_valid_after_utc == ca.not_valid_after_utc
    # The AKI comes from the CA's key when its certificate has no SKI.
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest


def test_serials_are_random_and_in_range(authority_for, identities, tmp_path):
    authority = authority_for(identities("p256"))
    csr = make_csr(tmp_path)
    serials = [issue(authority, csr).serial_number for _ in range(64)]
    assert len(set(serials)) == 64
    assert all(0 < s < 2 ** 159 for s in serials)
    # 64 draws of 159 random bits: the top byte is not constant, the bits are not all low.
    assert max(serials).bit_length() > 150 and len({s >> 151 for s in serials}) > 8


@pytest.mark.parametrize("value, expected", [
    (5, 5), ("0A", 10), (2 ** 160 - 1, 2 ** 159 - 1), ("F" * 40, 2 ** 159 - 1)])
def test_serial_normalization(value, expected):
    assert sapid.normalize_serial(value) == expected


@pytest.mark.parametrize("value", [0, -3, 1.5, "xyz", None, True])
def test_serial_normalization_refuses(value):
    with pytest.raises(sapid.HookError):
        sapid.normalize_serial(value)


def test_serial_hex_is_even_length_upper_case():
    assert sapid.serial_hex(0xABC) == "0ABC"
    assert sapid.serial_hex(0xABCD) == "ABCD"


def test_draft_editing(authority_for, identities, tmp_path):
    authority = authority_for(identities("p256"))
    checked = sapid.check_csr(sapid.parse_csr(make_csr(tmp_path).read_bytes()))
    draft = authority.draft(checked, datetime.timedelta(days=1))
    draft.add_extension(x509.OCSPNoCheck(), critical=False)
    draft.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
    draft.remove_extension(ExtensionOID.EXTENDED_KEY_USAGE)
    draft.remove_extension(ExtensionOID.NAME_CONSTRAINTS)   # absent: no error
    certificate = authority.sign(draft)
    found = extensions_of(certificate)
    assert ExtensionOID.OCSP_NO_CHECK in found
    assert found[ExtensionOID.BASIC_CONSTRAINTS].critical is False     # replaced, not doubled
    assert ExtensionOID.EXTENDED_KEY_USAGE not in found


def test_csr_key_policy_unit():
    sapid.check_csr_key(rsa.generate_private_key(65537, 2048).public_key())
    sapid.check_csr_key(ec.generate_private_key(ec.SECP521R1()).public_key())
    sapid.check_csr_key(ed25519.Ed25519PrivateKey.generate().public_key())
    for refused in (rsa.generate_private_key(3, 2048).public_key(),
                    rsa.generate_private_key(65537, 1024).public_key(),
                    ec.generate_private_key(ec.SECP256K1()).public_key(),
                    ec.generate_private_key(ec.SECP224R1()).public_key()):
        with pytest.raises(sapid.RequestError) as caught:
            sapid.check_csr_key(refused)
        assert caught.value.code == "key_refused"
