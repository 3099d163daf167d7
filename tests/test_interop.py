"""Interoperability: certificates issued by a real sapid daemon (CSR by ``openssl req``, signed
over the HTTP API with curl) work where they are used, in server and client roles, in OpenSSL,
GnuTLS, NSS, Python's ssl and pyca/cryptography's verifier; and they, with the CA certificates
``sapid init`` makes, pass pkilint's RFC 5280 linter.

Every positive check has its negative twin against "another CA": a second ``sapid init`` identity
with the same name and key type but its own key, so a peer that matched issuers by name alone
would wrongly accept its certificates; only the signature tells them apart."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import ssl
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from cryptography.x509.verification import (DNSName, IPAddress, PolicyBuilder, Store,
                                            VerificationError)

import tls
from conftest import PASSPHRASE, Daemon, make_csr, make_identity, run, save_certificate

# The CA key types the handshakes cover. Where a stack cannot take one, its test narrows this
# list and says why.
CA_KEYS = ["rsa2048", "p256", "ed25519"]
SERVER_SANS = "DNS:localhost,IP:127.0.0.1"


# Issuing through real daemons -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class Issuer:
    """A CA identity with its ``sapid serve``; issues with a CSR from ``openssl req``."""

    ca: Path                     # the CA certificate as GET /api/ca serves it
    daemon: Daemon

    def issue(self, name: str, key: str, subject: str, sans: str | None) -> Leaf:
        folder = self.daemon.folder
        csr = make_csr(folder, key, subject, sans, name=name)
        status, reply = self.daemon.sign(csr, name)
        assert status == 200, reply
        return Leaf(save_certificate(folder, reply, f"{name}.cert.pem"), folder / f"{name}.key")


@dataclasses.dataclass(frozen=True)
class PKI:
    """For one CA key type: sapid's CA with a server and a client certificate, and the same
    from another CA of the same name. Leaf keys are of the CA's key type."""

    ca: Path
    server: Leaf                 # CN=localhost, SAN DNS:localhost, IP:127.0.0.1
    client: Leaf                 # CN=client1
    other_ca: Path
    other_server: Leaf
    other_client: Leaf


@pytest.fixture(scope="module")
def issuers(tmp_path_factory, identities):
    """``issuers(key, other=False)``: a running daemon per CA, started once for this module
    (a daemon decrypts its key at start, which costs 600,000 PBKDF2 rounds)."""
    started, daemons = {}, []

    def get(key: str, other: bool = False) -> Issuer:
        if (key, other) not in started:
            folder = tmp_path_factory.mktemp(f"{'other' if other else 'sapid'}-{key}")
            # Same fields as the identities fixture's: the same issuer name, another key.
            identity = make_identity(folder / "identity", key) if other else identities(key)
            daemons.append(Daemon(folder, identity, hooks=""))
            started[key, other] = Issuer(daemons[-1].start().ca_pem(), daemons[-1])
        return started[key, other]
    yield get
    for daemon in daemons:
        daemon.close()


@pytest.fixture(scope="module")
def pki(issuers):
    made = {}

    def get(key: str) -> PKI:
        if key not in made:
            ours, other = issuers(key), issuers(key, other=True)
            made[key] = PKI(
                ours.ca, ours.issue("server", key, "/CN=localhost", SERVER_SANS),
                ours.issue("client", key, "/CN=client1", "DNS:client1.example"),
                other.ca, other.issue("server", key, "/CN=localhost", SERVER_SANS),
                other.issue("client", key, "/CN=client1", "DNS:client1.example"))
            assert ours.ca.read_bytes() != other.ca.read_bytes()
        return made[key]
    return get


@pytest.fixture
def servers():
    """``servers(server)`` starts a server of tls.py; all are stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield stack.enter_context


# OpenSSL ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ca_key", CA_KEYS)
def test_openssl_client_verifies_sapid_server(pki, servers, tmp_path, ca_key):
    p = pki(ca_key)
    server = servers(tls.OpenSSLServer(p.server.cert, p.server.key, tmp_path / "s_server.log"))
    code, out = tls.s_client(server.port, p.ca)
    assert code == 0 and "Verify return code: 0 (ok)" in out and "HTTP/1.0 200 ok" in out, out
    # The negative twin: trusting only the other CA, the same server fails verification.
    code, out = tls.s_client(server.port, p.other_ca)
    assert code != 0 and "unable to get local issuer certificate" in out, out
    assert "HTTP/1.0 200 ok" not in out


@pytest.mark.parametrize("ca_key", CA_KEYS)
def test_openssl_server_verifies_sapid_client(pki, servers, tmp_path, ca_key):
    p = pki(ca_key)
    server = servers(tls.OpenSSLServer(p.server.cert, p.server.key, tmp_path / "s_server.log",
                                       client_ca=p.ca))
    code, out = tls.s_client(server.port, p.ca, p.client.cert, p.client.key)
    assert code == 0 and "HTTP/1.0 200 ok" in out, out + server.output()
    assert "verify error" not in server.output()
    # The negative twin: a client certificate from the other CA is refused by the server.
    code, out = tls.s_client(server.port, p.ca, p.other_client.cert, p.other_client.key)
    assert "HTTP/1.0 200 ok" not in out, out
    assert "unable to get local issuer certificate" in server.output(), server.output()


# GnuTLS -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ca_key", CA_KEYS)    # Ed25519: GnuTLS signs with it in TLS 1.3
def test_gnutls_client_verifies_sapid_server(pki, servers, tmp_path, ca_key):
    p = pki(ca_key)
    server = servers(tls.OpenSSLServer(p.server.cert, p.server.key, tmp_path / "s_server.log"))
    code, out = tls.gnutls_cli(server.port, p.ca)
    assert code == 0 and "The certificate is trusted" in out, out
    assert "Handshake was completed" in out, out
    code, out = tls.gnutls_cli(server.port, p.other_ca)
    assert code != 0 and "The certificate is NOT trusted" in out, out
    assert "Handshake was completed" not in out, out


# NSS --------------------------------------------------------------------------------------------

def nss_db(folder: Path, ca: Path) -> Path:
    """A fresh NSS database trusting ``ca`` to issue SSL server ("C") and client ("T")
    certificates; with "C,," alone NSS rejects every client certificate (-u 0)."""
    folder.mkdir()
    run(["certutil", "-N", "--empty-password", "-d", f"sql:{folder}"])
    run(["certutil", "-A", "-d", f"sql:{folder}", "-n", "sapid CA", "-t", "CT,,", "-a",
         "-i", str(ca)])
    return folder


def vfychain(db: Path, cert: Path, usage: int):
    """``vfychain`` with libpkix (``-pp``); usage 1 is SSL server, 0 SSL client."""
    done = run(["vfychain", "-d", f"sql:{db}", "-pp", "-u", str(usage), "-a", str(cert)],
               check=False)
    return done.returncode, done.stdout + done.stderr


# No Ed25519: Debian 12's NSS (3.87) does not know the algorithm. certutil -A cannot even add an
# Ed25519 CA (SEC_ERROR_ADDING_CERT; vfychain -t says -8049 "Unrecognized Object Identifier"),
# and an Ed25519 leaf under a P-256 CA fails with -8102 "key usage inadequate". EdDSA came to
# NSS in 3.99 (2024): add "ed25519" here once Debian ships such an NSS.
@pytest.mark.parametrize("ca_key", ["rsa2048", "p256"])
def test_nss_verifies_server_and_client(pki, tmp_path, ca_key):
    p = pki(ca_key)
    db = nss_db(tmp_path / "nss", p.ca)
    for cert, usage in ((p.server.cert, 1), (p.client.cert, 0)):
        code, out = vfychain(db, cert, usage)
        assert code == 0 and "Chain is good!" in out, (usage, out)
    for cert, usage in ((p.other_server.cert, 1), (p.other_client.cert, 0)):
        code, out = vfychain(db, cert, usage)
        assert code != 0 and "Chain is bad!" in out, (usage, out)


# Python's ssl -------------------------------------------------------------------------------------

def server_context(leaf: Leaf, client_ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.cert, leaf.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_ca)
    context.verify_flags |= ssl.VERIFY_X509_STRICT    # Python 3.13's default
    return context


def client_context(ca: Path, leaf: Leaf) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(leaf.cert, leaf.key)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


@pytest.mark.parametrize("ca_key", CA_KEYS)
def test_python_ssl_mutual_tls(pki, servers, ca_key):
    p = pki(ca_key)
    server = servers(tls.PythonServer(server_context(p.server, p.ca)))
    assert tls.python_client(server.port, client_context(p.ca, p.client)) == b"hello\n"
    peer = server.outcome()
    assert isinstance(peer, dict), peer
    assert dict(name for rdn in peer["subject"] for name in rdn) == {"commonName": "client1"}

    # A client certificate from the other CA: the server's handshake fails on it.
    try:
        got = tls.python_client(server.port, client_context(p.ca, p.other_client))
    except (ssl.SSLError, ConnectionError) as e:
        got = e
    assert not isinstance(got, bytes) or got == b"", got
    refused = server.outcome()
    assert isinstance(refused, ssl.SSLCertVerificationError), refused
    assert refused.verify_message == "unable to get local issuer certificate", refused

    # The other direction: a client that trusts only the other CA refuses the server. OpenSSL
    # sends the server's CA along (it completes the chain from its verify store), so the
    # client's complaint is that CA being untrusted.
    with pytest.raises(ssl.SSLCertVerificationError,
                       match="self-signed certificate in certificate chain"):
        tls.python_client(server.port, client_context(p.other_ca, p.client))
    assert isinstance(server.outcome(), OSError)      # not a peer certificate: refused


# pyca/cryptography's verifier ---------------------------------------------------------------------

def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# No Ed25519: cryptography's verifier applies the Web PKI (CA/Browser Forum) algorithm policy,
# RSA and ECDSA only, and raises "Forbidden public key algorithm ... Ed25519" for such a CA or
# leaf. test_cryptography_checks_ed25519_signatures covers what cryptography does check there.
@pytest.mark.parametrize("ca_key", ["rsa2048", "p256"])
def test_cryptography_verifier(pki, ca_key):
    p = pki(ca_key)
    ours, other = Store([load(p.ca)]), Store([load(p.other_ca)])
    server, client = load(p.server.cert), load(p.client.cert)
    for name in (DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(ours).build_server_verifier(name).verify(server, [])
        assert chain == [server, load(p.ca)]
        with pytest.raises(VerificationError):
            PolicyBuilder().store(other).build_server_verifier(name).verify(server, [])
    with pytest.raises(VerificationError):       # a name the certificate does not carry
        PolicyBuilder().store(ours).build_server_verifier(DNSName("example.com")).verify(
            server, [])
    verified = PolicyBuilder().store(ours).build_client_verifier().verify(client, [])
    assert verified.chain == [client, load(p.ca)]
    assert verified.subjects == [DNSName("client1.example")]
    with pytest.raises(VerificationError):
        PolicyBuilder().store(other).build_client_verifier().verify(client, [])


def test_cryptography_checks_ed25519_signatures(pki):
    p = pki("ed25519")
    for leaf in (p.server, p.client):
        load(leaf.cert).verify_directly_issued_by(load(p.ca))
        with pytest.raises(InvalidSignature):
            load(leaf.cert).verify_directly_issued_by(load(p.other_ca))


# pkilint ----------------------------------------------------------------------------------------

# pkilint 0.13's lint_pkix_cert takes no certificate type: it tells a CA from an end entity by
# basicConstraints (the CA/B Forum linter lint_cabf_serverauth_cert is the one with -t). Its own
# main() runs once per certificate with the command's arguments, all in one Python process: the
# command spends ~0.8 s of CPU importing pkilint and ~0.1 s linting. It runs under this Python,
# so the venv's pkilint is used even when the venv's bin/ is not on PATH.
PKILINT = """
import contextlib, io, json, sys
from pkilint.bin.lint_pkix_cert import main
reports = {}
for path in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["lint", "--severity", "DEBUG", "--format", "JSON", path])
    reports[path] = json.loads(out.getvalue())
print(json.dumps(reports))
"""
# Every finding pkilint may report on sapid's certificates, with the reason it is fine. Any other
# finding, and any ERROR or FATAL whatsoever, fails the test.
EXPLAINED = {
    # INFO: the SKI (and so the issuer's AKI) is RFC 5280 4.2.1.2 method 1, the SHA-1 of the
    # subjectPublicKey bits: what cryptography's SubjectKeyIdentifier.from_public_key computes.
    "pkix.subject_key_identifier_method_1_identified",
}
CA_INIT_KEYS = ["p256", "p384", "rsa2048", "rsa3072", "rsa4096", "ed25519"]


def pkilint(*certs: Path) -> dict[Path, list[tuple[str, str, str]]]:
    """(severity, code, message) of every finding, per certificate. The exit status of
    lint_pkix_cert counts findings of any severity, INFO too: the report is what to judge."""
    done = run([sys.executable, "-c", PKILINT, *map(str, certs)])
    reports = json.loads(done.stdout)
    return {cert: [(f["severity"], f["code"], f["message"] or "")
                   for result in reports[str(cert)]["results"]
                   for f in result["finding_descriptions"]] for cert in certs}


def assert_lint_clean(findings: dict) -> None:
    for cert, found in findings.items():
        unexplained = [f for f in found if f[0] in ("FATAL", "ERROR") or f[1] not in EXPLAINED]
        assert not unexplained, f"{cert}: {unexplained}"
        # The SKI was looked at and recognised.
        assert ("INFO", "pkix.subject_key_identifier_method_1_identified", "") in found, found


@pytest.mark.parametrize("key", CA_INIT_KEYS)
def test_pkilint_ca_certificates(identities, key):
    assert_lint_clean(pkilint(identities(key) / "ca.cert.pem"))


# The SAN names are not "localhost": pkilint checks dNSName with the validators package, which
# wants a dot, and reports pkix.invalid_domain_name_syntax (ERROR) for "localhost" although RFC
# 1034's preferred name syntax allows a single label. That is pkilint's finding, not sapid's.
@pytest.mark.parametrize("ca_key", ["rsa2048", "p256", "p384", "ed25519"])
def test_pkilint_leaf_certificates(issuers, ca_key):
    issuer = issuers(ca_key)
    leaves = [issuer.issue(f"lint{key}", key, "/CN=device1.example/O=sapid tests",
                           "DNS:device1.example,IP:127.0.0.1,IP:::1").cert
              for key in ("rsa2048", "p256", "ed25519")]
    # An empty subject: the SAN carries the names and is critical. Every SAN type sapid takes.
    empty = issuer.issue("lintempty", "p256", "/", "DNS:device2.example,IP:192.0.2.7,"
                         "email:ops@example.com,URI:https://device2.example/").cert
    assert load(empty).extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert_lint_clean(pkilint(*leaves, empty))


def test_pkilint_finds_what_the_profile_avoids(issuers, tmp_path):
    """The negative twin: sapid's empty-subject certificate re-signed by the same CA with four
    criticality flags the profile sets the other way draws exactly the four findings."""
    issuer = issuers("p256")
    issued = load(issuer.issue("flipped", "p256", "/", "DNS:device3.example").cert)
    assert issued.subject == x509.Name([])
    flip = {ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.KEY_USAGE,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
    builder = x509.CertificateBuilder(
        issuer_name=issued.issuer, subject_name=issued.subject, public_key=issued.public_key(),
        serial_number=issued.serial_number, not_valid_before=issued.not_valid_before_utc,
        not_valid_after=issued.not_valid_after_utc)
    for extension in issued.extensions:
        builder = builder.add_extension(extension.value,
                                        extension.critical ^ (extension.oid in flip))
    key = serialization.load_pem_private_key(
        (issuer.daemon.identity / "ca.private_key.pem").read_bytes(), PASSPHRASE.encode())
    flipped = tmp_path / "flipped.pem"
    flipped.write_bytes(builder.sign(key, issued.signature_hash_algorithm).public_bytes(
        serialization.Encoding.PEM))
    original = issuer.daemon.folder / "flipped.cert.pem"
    findings = pkilint(original, flipped)
    assert_lint_clean({original: findings.pop(original)})
    found = findings[flipped]
    assert {(severity, code) for severity, code, _ in found if code not in EXPLAINED} == {
        ("ERROR", "pkix.san_extension_not_critical_empty_subject"),
        ("ERROR", "pkix.certificate_skid_extension_critical"),
        ("ERROR", "pkix.authority_key_identifier_critical"),
        ("WARNING", "pkix.key_usage_extension_not_critical"),
    }, found
