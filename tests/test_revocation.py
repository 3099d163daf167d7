"""Revocation as relying parties see it: ``sapid revoke`` and ``POST /api/revoke``, then the CRL
and the OCSP answers judged by real clients (openssl verify and ocsp, GnuTLS certtool, Python's
ssl, nginx as a TLS server, pkilint), each positive check beside its negative twin."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import re
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

import sapid
from conftest import (SAPID, make_csr, make_identity, open_local_authority, run, sapid_env,
                      write_hooks)

# Clients may revoke the certificates issued to their own client id; "raises" is told why not.
REVOKING_HOOKS = """
import sapid

class Hooks(sapid.SigningHooks):
    def authorize_revocation(self, certificate, reason):
        if self.client_id == "raises":
            raise sapid.NotAuthorized("ask the operator")
        if self.client_id == "odd":
            return "yes"
        return self.record.client_id == self.client_id and certificate.serial_number > 0
"""

# Certificates for clients "old" and "ancient" are expired when issued: a day, ten days ago.
EXPIRED_HOOKS = """
import datetime
import sapid

class Hooks(sapid.SigningHooks):
    def presign(self, draft):
        ago = {"old": 1, "ancient": 10}.get(self.client_id)
        if ago:
            now = datetime.datetime.now(datetime.timezone.utc)
            draft.not_valid_before = now - datetime.timedelta(days=ago + 2)
            draft.not_valid_after = now - datetime.timedelta(days=ago)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Site:
    """A daemon reached over TCP (``sapid serve --listen``), as relying parties reach it
    through nginx: curl for HTTP, openssl for OCSP."""

    def __init__(self, daemon):
        self.daemon, self.folder = daemon, daemon.folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.count = 0

    def start(self):
        self.daemon.start(args=("--listen", f"127.0.0.1:{self.port}"))
        return self

    def restart(self):
        assert self.daemon.stop() == 0
        return self.start()

    def web(self, path: str, method: str = "GET", data: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes, str]:
        """(status, body, Content-Type) of one request made with curl."""
        self.count += 1
        body_path = self.folder / f"web-{self.count}.out"
        args = ["curl", "-sS", "-X", method, "-o", str(body_path), "-w",
                "%{http_code} %{content_type}"]
        if data is not None:
            sent = self.folder / f"web-{self.count}.in"
            sent.write_bytes(data)
            args += ["--data-binary", f"@{sent}"]
        for name, value in (headers or {}).items():
            args += ["-H", f"{name}: {value}"]
        done = run([*args, self.url + path])
        status, _, media = done.stdout.partition(" ")
        return int(status), body_path.read_bytes(), media

    def sign(self, client_id: str = "device1", name: str | None = None) -> tuple[Path, str]:
        """A new certificate for ``client_id``: its PEM file and serial."""
        name = name or f"leaf{self.count}"
        csr = make_csr(self.folder, subject=f"/CN={name}.example", sans=f"DNS:{name}.example",
                       name=name)
        status, body, _ = self.web(f"/api/csr/{client_id}", "PUT", csr.read_bytes())
        reply = json.loads(body)
        assert status == 200, reply
        path = self.folder / f"{name}.cert.pem"
        path.write_text(reply["signed_x509_pem"])
        return path, reply["serial"]

    def crl(self) -> tuple[x509.CertificateRevocationList, Path]:
        """The CRL from GET /api/crl, and a PEM file of it for the clients."""
        status, der, media = self.web("/api/crl")
        assert (status, media) == (200, "application/pkix-crl"), der
        crl = x509.load_der_x509_crl(der)
        self.count += 1
        path = self.folder / f"crl-{self.count}.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return crl, path

    def revoke(self, serial: str, *reason: str) -> subprocess.CompletedProcess:
        return run([*SAPID, "revoke", "-c", str(self.daemon.config), serial, *reason],
                   env=sapid_env(), check=False)

    def ocsp(self, *args: str, ca: Path | None = None) -> str:
        """What ``openssl ocsp`` says, asking this site about ``args`` (-cert/-serial ...)."""
        ca = ca or self.daemon.identity / "ca.cert.pem"
        done = run(["openssl", "ocsp", "-url", f"{self.url}/ocsp", "-CAfile", str(ca),
                    "-resp_text", *args], check=False)
        return done.stdout + done.stderr


@pytest.fixture
def site(daemon_factory):
    """``site(key=..., hooks=..., **settings)``: a daemon on a loopback port."""
    def make(key="p256", start=True, **settings):
        made = Site(daemon_factory(key=key, start=False, **settings))
        return made.start() if start else made
    return make


def verify(ca: Path, crl: Path, cert: Path) -> subprocess.CompletedProcess:
    """``openssl verify -crl_check``; its stdout holds what it said on either stream."""
    done = run(["openssl", "verify", "-crl_check", "-CAfile", str(ca), "-CRLfile", str(crl),
                str(cert)], check=False)
    done.stdout += done.stderr
    return done


def no_crl_identity(folder: Path) -> Path:
    """An operator's own CA, adopted as it is, whose certificate has keyCertSign only."""
    folder.mkdir(mode=0o750)
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-subj", "/CN=No CRL CA", "-days", "30", "-keyout", str(folder / "plain.key"),
         "-nodes", "-out", str(folder / "ca.cert.pem"), "-addext",
         "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"])
    run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-iter", "600000", "-in",
         str(folder / "plain.key"), "-out", str(folder / "ca.private_key.pem"), "-passout",
         "env:CA_PASSPHRASE"], env=sapid_env())
    (folder / "plain.key").unlink()
    (folder / "ca.private_key.pem").chmod(0o640)
    return folder


def ca_of(site: Site) -> Path:
    return site.daemon.identity / "ca.cert.pem"


def ski(site: Site) -> bytes:
    certificate = x509.load_pem_x509_certificate(ca_of(site).read_bytes())
    return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


# The reasons and serials people type ----------------------------------------------------------

def test_reason_names_are_rfc_5280s():
    assert sapid.revocation_reason(None) == "unspecified"
    assert sapid.revocation_reason("KEYCOMPROMISE") == "keyCompromise"
    assert sapid.revocation_reason("cessationofoperation") == "cessationOfOperation"
    for refused, why in (("certificateHold", "final"), ("removeFromCRL", "delta"),
                         ("stolen", "keyCompromise")):
        with pytest.raises(ValueError, match=why):
            sapid.revocation_reason(refused)


def test_serials_as_people_write_them():
    assert sapid.parse_serial("0a:1b") == "0A1B"
    assert sapid.parse_serial("abc") == "0ABC"
    for bad in ("", "xyz", "1" * 41, "00", 12, None):
        with pytest.raises(ValueError):
            sapid.parse_serial(bad)


# The CRL --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["p256", "rsa2048", "ed25519"])
def test_openssl_verify_refuses_a_revoked_certificate(site, key):
    web = site(key, crl_days=3)
    ca = ca_of(web)
    revoked, serial = web.sign("device1", "lost")
    good, _ = web.sign("device2", "kept")
    before, before_path = web.crl()
    # Before the revocation both pass with the CRL; the CRL is checked (not merely present).
    assert verify(ca, before_path, revoked).returncode == 0
    assert len(before) == 0

    done = web.revoke(serial, "--reason", "keyCompromise")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"revoked {serial} (keyCompromise) at ")
    crl, path = web.crl()
    failed = verify(ca, path, revoked)
    assert failed.returncode != 0 and "certificate revoked" in failed.stdout
    assert verify(ca, path, good).returncode == 0
    # What the CRL says: v2, signed by the CA, its number from thisUpdate, the CA's key id.
    certificate = x509.load_pem_x509_certificate(ca.read_bytes())
    assert crl.is_signature_valid(certificate.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number // 1_000_000 == int(crl.last_update_utc.timestamp())
    assert number > before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=3)
    assert crl.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value.key_identifier == ski(web)
    assert crl.issuer == certificate.subject and len(crl) == 1

    # After a restart: the same verdicts, and the number went on up.
    web.restart()
    again, again_path = web.crl()
    assert "certificate revoked" in verify(ca, again_path, revoked).stdout
    assert verify(ca, again_path, good).returncode == 0
    assert again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number


def test_the_crl_is_cached_until_a_revocation(site):
    web = site()
    _, serial = web.sign("device1", "one")
    status, first, _ = web.web("/api/crl")
    status, second, _ = web.web("/api/crl")
    assert first == second                   # not rebuilt per request
    assert web.revoke(serial).returncode == 0
    _, third, _ = web.web("/api/crl")
    assert third != first
    assert x509.load_der_x509_crl(third).get_revoked_certificate_by_serial_number(
        int(serial, 16)) is not None
    # Reason unspecified: RFC 5280 5.3.1 wants no reason code rather than "unspecified".
    entry = x509.load_der_x509_crl(third).get_revoked_certificate_by_serial_number(
        int(serial, 16))
    assert len(entry.extensions) == 0
    # The PEM form says the same.
    status, pem, media = web.web("/api/crl.pem")
    assert (status, media) == (200, "application/x-pem-file")
    assert x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER) == third
    logged = web.daemon.output()
    assert len(re.findall(r"CRL \d+ built", logged)) == 2, logged


def test_expired_certificates_leave_the_crl(site, tmp_path):
    """RFC 5280 3.3: an entry stays until a CRL issued after the certificate expired has
    listed it: for crl_days (7) after the expiry, then it leaves."""
    web = site(hooks=write_hooks(tmp_path, EXPIRED_HOOKS))
    ancient, ancient_serial = web.sign("ancient", "ancient")
    _, old_serial = web.sign("old", "old")
    _, live_serial = web.sign("device1", "live")
    for serial in (ancient_serial, old_serial, live_serial):
        assert web.revoke(serial, "--reason", "superseded").returncode == 0
    crl, _ = web.crl()
    assert sorted(entry.serial_number for entry in crl) == sorted(
        int(serial, 16) for serial in (old_serial, live_serial))
    # OCSP still tells the truth about the one gone from the CRL.
    assert "Cert Status: revoked" in web.ocsp("-issuer", str(ca_of(web)), "-cert", str(ancient))


def test_crl_url_and_ocsp_url_go_into_certificates(site):
    web = site(start=False)
    url = web.url
    settings = f"crl_url = {url}/api/crl\nocsp_url = {url}/ocsp\n"
    web.daemon.config.write_text(web.daemon.config.read_text() + settings)
    web.start()
    cert, serial = web.sign("device1", "pointed")
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not points.critical
    assert points.value[0].full_name == [x509.UniformResourceIdentifier(f"{url}/api/crl")]
    access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    assert [(d.access_method, d.access_location.value) for d in access.value] == [
        (x509.AuthorityInformationAccessOID.OCSP, f"{url}/ocsp")]
    # openssl follows the distribution point itself.
    ca = ca_of(web)
    command = ["openssl", "verify", "-crl_check", "-crl_download", "-CAfile", str(ca), str(cert)]
    assert run(command, check=False).returncode == 0
    assert web.revoke(serial, "--reason", "affiliationChanged").returncode == 0
    failed = run(command, check=False)
    assert "certificate revoked" in failed.stdout + failed.stderr
    # And to the OCSP responder the certificate names.
    told = run(["openssl", "ocsp", "-issuer", str(ca), "-cert", str(cert), "-CAfile", str(ca),
                "-url", access.value[0].access_location.value], check=False)
    assert f"{cert}: revoked" in told.stdout and "affiliationChanged" in told.stdout, told


def test_bad_urls_and_a_ca_that_cannot_sign_crls_are_refused(tmp_path):
    config = tmp_path / "sapid.conf"
    config.write_text("[sapid]\ncrl_url = ftp://ca.example/crl\n")
    with pytest.raises(sapid.ConfigError, match="an http:// .* URL"):
        sapid.Config.load(str(config))
    folder = no_crl_identity(tmp_path / "identity")
    config.write_text(f"[sapid]\nidentity = {folder}\nstate = {tmp_path / 'state'}\nhooks =\n"
                      "crl_url = http://ca.example/api/crl\n")
    done = run([*SAPID, "check", "-c", str(config)], env=sapid_env(), check=False)
    assert done.returncode == 1 and "lacks the cRLSign key usage" in done.stderr, done.stderr
    config.write_text(config.read_text().replace("crl_url", "ocsp_url"))
    assert run([*SAPID, "check", "-c", str(config)], env=sapid_env(), check=False).returncode == 0


def test_a_ca_without_crl_sign_publishes_no_crl(site, tmp_path):
    """The negative twin of the CRL tests' CA: without cRLSign, GET /api/crl is 404 with the
    reason, and OCSP still answers."""
    folder = no_crl_identity(tmp_path / "nocrl")
    web = site(identity=folder)
    status, body, _ = web.web("/api/crl")
    assert status == 404 and b"cRLSign" in body, body
    cert, _ = web.sign("device1", "nocrl")
    assert f"{cert}: good" in web.ocsp("-issuer", str(folder / "ca.cert.pem"), "-cert", str(cert))


# OCSP -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["p256", "rsa2048", "ed25519"])
def test_openssl_ocsp_good_revoked_unknown(site, key, identities, tmp_path):
    web = site(key)
    ca = ca_of(web)
    good, _ = web.sign("device1", "good")
    lost, serial = web.sign("device1", "lost")
    assert web.revoke(serial, "--reason", "keyCompromise").returncode == 0

    told = web.ocsp("-issuer", str(ca), "-cert", str(good))
    assert "Response verify OK" in told and f"{good}: good" in told, told
    # The nonce openssl sent came back (openssl warns when it does not).
    assert "WARNING" not in told and "OCSP Nonce" in told, told
    told = web.ocsp("-issuer", str(ca), "-cert", str(lost))
    assert f"{lost}: revoked" in told and "Reason: keyCompromise" in told, told
    # A serial this CA never issued.
    told = web.ocsp("-issuer", str(ca), "-serial", "0x1234567890ABCDEF")
    assert "0x1234567890ABCDEF: unknown" in told, told
    # Verified against another CA, the response fails.
    other = identities("p384" if key != "p384" else "p256") / "ca.cert.pem"
    told = web.ocsp("-issuer", str(ca), "-cert", str(good), ca=other)
    assert "Response Verify Failure" in told and "Response verify OK" not in told, told
    # Another CA's certificate: unknown (its issuer hashes are not this CA's).
    foreign_ca = make_identity(tmp_path / "foreign", "p256")
    stranger_csr = make_csr(tmp_path, name="stranger")
    stranger_cert = tmp_path / "stranger.pem"
    run(["openssl", "x509", "-req", "-in", str(stranger_csr), "-CA",
         str(foreign_ca / "ca.cert.pem"), "-CAkey", str(foreign_ca / "ca.private_key.pem"),
         "-passin", "env:CA_PASSPHRASE", "-set_serial", f"0x{serial}", "-days", "2", "-out",
         str(stranger_cert)], env=sapid_env())
    told = web.ocsp("-issuer", str(foreign_ca / "ca.cert.pem"), "-cert", str(stranger_cert))
    assert f"{stranger_cert}: unknown" in told, told


def test_a_revocation_shows_in_the_next_ocsp_answer(site):
    """Answers without a nonce are reused for a minute; a revocation still shows at once."""
    web = site()
    ca = ca_of(web)
    cert, serial = web.sign("device1", "soon")
    request = web.folder / "request.der"
    run(["openssl", "ocsp", "-issuer", str(ca), "-cert", str(cert), "-no_nonce", "-reqout",
         str(request)])
    encoded = urllib.parse.quote(base64.b64encode(request.read_bytes()).decode(), safe="")

    def ask(method):
        if method == "GET":
            status, body, media = web.web(f"/ocsp/{encoded}")
        else:
            status, body, media = web.web("/ocsp", "POST", request.read_bytes(),
                                          {"Content-Type": "application/ocsp-request"})
        assert (status, media) == (200, "application/ocsp-response")
        return body

    first, again = ask("GET"), ask("POST")
    assert first == again                            # the reused answer, GET and POST alike
    answer = ocsp.load_der_ocsp_response(first)
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.next_update_utc - answer.this_update_utc == datetime.timedelta(hours=1)
    assert answer.responder_key_hash == ski(web)
    assert web.revoke(serial, "--reason", "superseded").returncode == 0
    answer = ocsp.load_der_ocsp_response(ask("GET"))
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.superseded
    # URL-safe base64 without padding, as some clients send it.
    unpadded = base64.urlsafe_b64encode(request.read_bytes()).decode().rstrip("=")
    status, body, _ = web.web(f"/ocsp/{unpadded}")
    assert ocsp.load_der_ocsp_response(body).certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_ocsp_bad_input_gets_ocsp_errors(site):
    web = site()
    cert, _ = web.sign("device1", "fine")
    malformed = ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    for body in (b"garbage", b"", b"\x30\x03\x02\x01\x01"):
        status, answer, media = web.web("/ocsp", "POST", body,
                                        {"Content-Type": "application/ocsp-request"})
        assert (status, media) == (200, "application/ocsp-response"), answer
        assert ocsp.load_der_ocsp_response(answer).response_status == malformed
    status, answer, media = web.web("/ocsp/not-base64!!")
    assert (status, media) == (200, "application/ocsp-response")
    assert ocsp.load_der_ocsp_response(answer).response_status == malformed
    # Two certificates in one request: cryptography answers one at a time.
    ca = ca_of(web)
    told = web.ocsp("-issuer", str(ca), "-cert", str(cert), "-cert", str(cert))
    assert "malformedrequest" in told, told
    # A nonce longer than RFC 8954's 32 octets.
    told = web.ocsp("-issuer", str(ca), "-cert", str(cert), "-nonce", "-text")
    assert f"{cert}: good" in told
    request = (ocsp.OCSPRequestBuilder()
               .add_certificate(x509.load_pem_x509_certificate(cert.read_bytes()),
                                x509.load_pem_x509_certificate(ca.read_bytes()), hashes.SHA256())
               .add_extension(x509.OCSPNonce(b"n" * 33), critical=False).build())
    status, answer, _ = web.web("/ocsp", "POST", request.public_bytes(serialization.Encoding.DER),
                                {"Content-Type": "application/ocsp-request"})
    assert status == 200
    assert ocsp.load_der_ocsp_response(answer).response_status == malformed
    # SHA-256 CertIDs are answered too (openssl sends SHA-1).
    request = (ocsp.OCSPRequestBuilder()
               .add_certificate(x509.load_pem_x509_certificate(cert.read_bytes()),
                                x509.load_pem_x509_certificate(ca.read_bytes()), hashes.SHA256())
               .build())
    status, answer, _ = web.web("/ocsp", "POST", request.public_bytes(serialization.Encoding.DER),
                                {"Content-Type": "application/ocsp-request"})
    assert status == 200
    assert ocsp.load_der_ocsp_response(answer).certificate_status == ocsp.OCSPCertStatus.GOOD
    # 10 MB: refused before it is read, still in OCSP's words, with HTTP's status.
    status, answer, media = web.web("/ocsp", "POST", b"\0" * 10_000_000,
                                    {"Content-Type": "application/ocsp-request"})
    assert (status, media) == (413, "application/ocsp-response")
    assert ocsp.load_der_ocsp_response(answer).response_status == malformed
    status, answer, media = web.web("/ocsp", "POST", b"x", {"Content-Type": "text/html"})
    assert (status, media) == (415, "application/ocsp-response")
    status, answer, media = web.web("/ocsp", "PUT", b"x")
    assert (status, media) == (405, "application/ocsp-response")
    status, answer, media = web.web("/ocsp?x=1", "POST", b"x", {"Content-Type": "text/html"})
    assert (status, media) == (415, "application/ocsp-response")
    status, answer, media = web.web("/ocsp", "POST", b"\0" * 200_000,
                                    {"Content-Type": "application/ocsp-request",
                                     "Transfer-Encoding": "chunked"})
    assert (status, media) == (413, "application/ocsp-response")
    assert ocsp.load_der_ocsp_response(answer).response_status == malformed
    # The daemon is fine afterwards.
    assert f"{cert}: good" in web.ocsp("-issuer", str(ca), "-cert", str(cert))


# Revoking -------------------------------------------------------------------------------------

def test_sapid_revoke_on_the_command_line(site):
    web = site()
    cert, serial = web.sign("device1", "cli")
    first = web.revoke(serial.lower(), "--reason", "cessationOfOperation")
    assert first.returncode == 0 and first.stdout.startswith(f"revoked {serial} ")
    when = re.search(r" at (\S+Z)", first.stdout)[1]
    # A second revocation keeps the first date and reason, and says so.
    second = web.revoke(serial, "--reason", "keyCompromise")
    assert second.returncode == 0
    assert second.stdout.strip() == (f"{serial} was revoked already, at {when} "
                                     "(cessationOfOperation); that date and reason stand")
    for args, said in (((serial, "--reason", "stolen"), "is not a revocation reason"),
                       (("0BADBEEF",), "no certificate with serial 0BADBEEF"),
                       (("xyz",), "is not a serial number"),
                       ((serial, "--reason", "certificateHold"), "is not offered")):
        done = web.revoke(*args)
        assert done.returncode == 1, done
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("sapid: error: ") and said in lines[-1], done.stderr
        assert "Traceback" not in done.stderr
    # list and show agree.
    config = str(web.daemon.config)
    listed = json.loads(run([*SAPID, "list", "-c", config, "--revoked", "--json"]).stdout)
    assert [(r["serial"], r["status"], r["revocation_reason"], r["revoked_at"])
            for r in listed] == [(serial, "revoked", "cessationOfOperation", when)]
    # Valid now, soon to expire: the revoked one is not.
    other, other_serial = web.sign("device1", "other")
    expiring = run([*SAPID, "list", "-c", config, "--expiring", "400"]).stdout
    assert other_serial in expiring and serial not in expiring, expiring
    shown = run([*SAPID, "show", "-c", config, serial]).stdout
    assert "status: revoked" in shown and "revocation_reason: cessationOfOperation" in shown
    # Each revocation is audited, the second too.
    audits = [line for line in (first.stderr + second.stderr).splitlines() if "audit" in line]
    assert len(audits) == 2 and 'outcome=revoked client_id="device1"' in audits[0], audits
    assert "outcome=already_revoked" in audits[1] and 'by="' in audits[1]


def test_sapid_revoke_without_a_store_creates_none(tmp_path, identities):
    config = tmp_path / "sapid.conf"
    config.write_text(f"[sapid]\nidentity = {identities('p256')}\nstate = {tmp_path / 'state'}\n"
                      "hooks =\n")
    done = run([*SAPID, "revoke", "-c", str(config), "0A"], env=sapid_env(), check=False)
    assert done.returncode == 1 and "no store here yet" in done.stderr, done.stderr
    assert not (tmp_path / "state").exists()


def test_revocation_over_the_api(site, tmp_path):
    web = site(hooks=write_hooks(tmp_path, REVOKING_HOOKS))
    mine, mine_serial = web.sign("device1", "mine")
    theirs, theirs_serial = web.sign("device2", "theirs")

    def revoke(client_id, document, content_type="application/json"):
        status, body, _ = web.web(f"/api/revoke/{client_id}", "POST",
                                  json.dumps(document).encode() if not isinstance(document, bytes)
                                  else document, {"Content-Type": content_type})
        return status, json.loads(body)

    # Another client's certificate: refused by the hook.
    status, body = revoke("device1", {"serial": theirs_serial, "reason": "keyCompromise"})
    assert (status, body["error"]) == (403, "not_authorized"), body
    status, body = revoke("raises", {"serial": theirs_serial})
    assert (status, body["message"]) == (403, "ask the operator")
    status, body = revoke("odd", {"serial": theirs_serial})
    assert status == 403                     # only True revokes
    # Its own: revoked, and the CRL and OCSP say so at once.
    status, body = revoke("device1", {"serial": mine_serial, "reason": "keyCompromise"})
    assert status == 200, body
    assert body["serial"] == mine_serial and body["status"] == "revoked"
    assert body["revocation_reason"] == "keyCompromise" and body["already_revoked"] is False
    status, again = revoke("device1", {"serial": mine_serial, "reason": "superseded"})
    assert status == 200 and again["already_revoked"] is True
    assert again["revoked_at"] == body["revoked_at"] and again["revocation_reason"] == (
        "keyCompromise")
    crl, path = web.crl()
    assert "certificate revoked" in verify(ca_of(web), path, mine).stdout
    assert verify(ca_of(web), path, theirs).returncode == 0
    # Bad input: each its status, code and words.
    for client_id, document, expected in (
            ("device1", {"serial": "0BADBEEF"}, (404, "not_found")),
            ("device1", {"serial": "not hex"}, (400, "bad_request")),
            ("device1", {"serial": mine_serial, "reason": "bored"}, (400, "bad_request")),
            ("device1", {"serial": mine_serial, "extra": 1}, (400, "bad_request")),
            ("device1", b"{not json", (400, "bad_request")),
            ("device1", b"\xff\xfe", (400, "bad_request")),
            ("device1", [mine_serial], (400, "bad_request")),
            ("bad-id", {"serial": mine_serial}, (400, "bad_client_id"))):
        status, body = revoke(client_id, document)
        assert (status, body["error"]) == expected, (document, body)
        assert "Traceback" not in body["message"] and "line 1 column" not in body["message"]
    status, body = revoke("device1", {"serial": mine_serial}, "text/html")
    assert (status, body["error"]) == (415, "unsupported_media_type")
    status, body, _ = web.web("/api/revoke/device1")
    assert status == 405
    audits = [line for line in web.daemon.output().splitlines() if "audit outcome=revo" in line
              or "outcome=already_revoked" in line]
    assert sum('outcome=revoked client_id="device1"' in line for line in audits) == 1, audits
    assert sum("outcome=already_revoked" in line for line in audits) == 1
    assert sum("outcome=revocation_refused" in line for line in audits) == 3 + 8 + 1, audits


def test_the_built_in_hooks_refuse_api_revocations(site):
    web = site()
    cert, serial = web.sign("device1", "kept")
    status, body, _ = web.web("/api/revoke/device1", "POST",
                              json.dumps({"serial": serial}).encode())
    reply = json.loads(body)
    assert (status, reply["error"]) == (403, "not_authorized"), reply
    assert "authorize_revocation" in reply["message"]
    # An unknown serial gets the same answer: it tells nothing of which serials exist.
    status, body, _ = web.web("/api/revoke/device1", "POST", b'{"serial": "0BADBEEF"}')
    assert status == 403, body
    assert f"{cert}: good" in web.ocsp("-issuer", str(ca_of(web)), "-cert", str(cert))
    assert 'outcome=revocation_refused client_id="device1"' in web.daemon.output()


def test_every_worker_sees_a_revocation(site):
    web = site(workers=3)
    cert, serial = web.sign("device1", "shared")
    for _ in range(6):                      # connections spread over the workers
        assert f"{cert}: good" in web.ocsp("-issuer", str(ca_of(web)), "-cert", str(cert))
        web.crl()
    assert web.revoke(serial).returncode == 0
    for _ in range(6):
        assert f"{cert}: revoked" in web.ocsp("-issuer", str(ca_of(web)), "-cert", str(cert))
        crl, _ = web.crl()
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


# Other TLS stacks -----------------------------------------------------------------------------

def test_gnutls_and_python_ssl_honour_the_crl(site):
    web = site()
    ca = ca_of(web)
    revoked, serial = web.sign("device1", "gnu")
    good, _ = web.sign("device1", "gnutls")
    assert web.revoke(serial, "--reason", "keyCompromise").returncode == 0
    _, crl = web.crl()

    def certtool(cert):
        return run(["certtool", "--verify", "--load-ca-certificate", str(ca), "--load-crl",
                    str(crl), "--infile", str(cert)], check=False)
    refused = certtool(revoked)
    assert refused.returncode != 0 and "revoked" in refused.stdout.lower(), refused.stdout
    assert certtool(good).returncode == 0, certtool(good).stdout

    # Python's ssl (OpenSSL underneath) as a TLS server that checks its clients' certificates
    # against the CRL, with the certificates sapid issued as client certificates.
    def handshake(cert: Path) -> str:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(good, web.folder / "gnutls.key")
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(ca)
        server.load_verify_locations(crl)
        server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.load_verify_locations(ca)
        client.load_cert_chain(cert, cert.with_name(cert.name.replace(".cert.pem", ".key")))
        listener = socket.create_server(("127.0.0.1", 0))
        outcome = {}

        def serve():
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    outcome["server"] = "ok"
                    tls.sendall(b"hello")
            except ssl.SSLError as e:
                outcome["server"] = getattr(e, "verify_message", e.reason)
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), 10) as raw, \
                    client.wrap_socket(raw) as tls:
                tls.recv(5)
        except (ssl.SSLError, ConnectionError):
            pass
        thread.join(10)
        listener.close()
        return outcome["server"]
    assert handshake(good) == "ok"
    assert handshake(revoked) == "certificate revoked"


def test_nginx_refuses_a_client_once_its_certificate_is_revoked(site, tmp_path):
    from test_nginx import free_port as nginx_port, nginx_conf
    web = site()
    ca = ca_of(web)
    server_cert, _ = web.sign("device1", "localhost")
    client_cert, serial = web.sign("device1", "client")
    _, crl = web.crl()
    port = nginx_port()
    folder = tmp_path / "nginx"
    folder.mkdir()
    nginx_conf(folder, f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {server_cert};
        ssl_certificate_key {web.folder / "localhost.key"};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_crl {folder}/crl.pem;
        location / {{ return 200 "in\\n"; }}
    }}""")
    (folder / "crl.pem").write_bytes(crl.read_bytes())
    nginx = subprocess.Popen(["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        def fetch():
            done = run(["curl", "-sS", "--cacert", str(ca), "--cert", str(client_cert), "--key",
                        str(web.folder / "client.key"), "--resolve",
                        f"localhost.example:{port}:127.0.0.1", "-w", " %{http_code}",
                        f"https://localhost.example:{port}/"], check=False)
            return done.stdout
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (folder / "error.log").read_text()
                time.sleep(0.05)
        assert fetch() == "in\n 200"
        assert web.revoke(serial, "--reason", "keyCompromise").returncode == 0
        _, crl = web.crl()
        (folder / "crl.pem").write_bytes(crl.read_bytes())
        run(["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-s", "reload"])
        for _ in range(200):                 # until the new workers answer
            said = fetch()
            if not said.endswith(" 200"):
                break
        assert said.endswith(" 400") and "certificate" in said.lower(), said
    finally:
        nginx.terminate()
        nginx.wait(10)


# pkilint --------------------------------------------------------------------------------------

PKILINT = """
import contextlib, io, json, sys
from pkilint.bin import lint_crl, lint_ocsp_response
reports = {}
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    args = ["lint", "--severity", "DEBUG", "--format", "JSON"]
    if kind == "crl":
        main, args = lint_crl.main, [*args, "-t", "CRL", "-p", "PKIX"]
    else:
        main = lint_ocsp_response.main
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main([*args, path])
    reports[path] = json.loads(out.getvalue())
print(json.dumps(reports))
"""


@pytest.mark.parametrize("key", ["p256", "p384", "rsa2048", "ed25519"])
def test_pkilint_finds_nothing_in_crls_and_ocsp_answers(site, key):
    web = site(key)
    ca = ca_of(web)
    good, _ = web.sign("device1", "lintgood")
    lost, serial = web.sign("device1", "lintlost")
    files = []
    empty, _ = web.crl()
    files += [("crl", web.folder / "empty.crl")]
    files[-1][1].write_bytes(empty.public_bytes(serialization.Encoding.DER))
    assert web.revoke(serial, "--reason", "keyCompromise").returncode == 0
    full, _ = web.crl()
    files += [("crl", web.folder / "full.crl")]
    files[-1][1].write_bytes(full.public_bytes(serialization.Encoding.DER))
    for cert, name in ((good, "good"), (lost, "revoked")):
        out = web.folder / f"{name}.ocsp"
        web.ocsp("-issuer", str(ca), "-cert", str(cert), "-respout", str(out))
        files.append(("ocsp", out))
    out = web.folder / "unknown.ocsp"
    web.ocsp("-issuer", str(ca), "-serial", "0x0123456789", "-respout", str(out))
    files.append(("ocsp", out))
    import sys
    done = run([sys.executable, "-c", PKILINT, *[str(part) for pair in files for part in pair]])
    reports = json.loads(done.stdout)
    for _, path in files:
        findings = [(f["severity"], f["code"]) for result in reports[str(path)]["results"]
                    for f in result["finding_descriptions"]]
        assert not findings, (path, findings)
    # The negative twin: pkilint does look (a CRL with no number draws an error).
    certificate = x509.load_pem_x509_certificate(ca.read_bytes())
    key_pem = (web.daemon.identity / "ca.private_key.pem").read_bytes()
    ca_key = serialization.load_pem_private_key(key_pem, b"correct horse battery staple")
    now = datetime.datetime.now(datetime.timezone.utc)
    bare = (x509.CertificateRevocationListBuilder().issuer_name(certificate.subject)
            .last_update(now).next_update(now + datetime.timedelta(days=1))
            .sign(ca_key, sapid.signature_hash(ca_key)))
    path = web.folder / "bare.crl"
    path.write_bytes(bare.public_bytes(serialization.Encoding.DER))
    reports = json.loads(run([sys.executable, "-c", PKILINT, "crl", str(path)]).stdout)
    codes = {f["code"] for result in reports[str(path)]["results"]
             for f in result["finding_descriptions"]}
    assert any("crl_number" in code or "authority_key_identifier" in code for code in codes), codes


# A fleet --------------------------------------------------------------------------------------

def test_a_revocation_on_one_host_shows_on_the_other(site, postgres):
    uri = postgres.database()
    one = site(store=uri)
    other = site(store=uri)
    ca = ca_of(one)
    cert, serial = one.sign("device1", "fleet")
    assert f"{cert}: good" in other.ocsp("-issuer", str(ca), "-cert", str(cert))
    before, _ = other.crl()
    assert len(before) == 0
    status, body, _ = one.web("/api/crl")     # the first host's CRL is built, then revoked
    assert one.revoke(serial, "--reason", "keyCompromise").returncode == 0
    assert f"{cert}: revoked" in other.ocsp("-issuer", str(ca), "-cert", str(cert))
    crl, path = other.crl()
    assert "certificate revoked" in verify(ca, path, cert).stdout
    mine, _ = one.crl()
    assert mine.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    # A store that goes away: the CRL built is served on, OCSP says tryLater; both recover.
    postgres.stop()
    try:
        status, der, _ = other.web("/api/crl")
        assert status == 200 and x509.load_der_x509_crl(der).public_bytes(
            serialization.Encoding.DER) == crl.public_bytes(serialization.Encoding.DER)
        told = other.ocsp("-issuer", str(ca), "-cert", str(cert))
        assert "trylater" in told.lower(), told
    finally:
        postgres.start()
    assert f"{cert}: revoked" in other.ocsp("-issuer", str(ca), "-cert", str(cert))


def test_a_crl_is_built_again_once_half_its_life_is_gone(identities, tmp_path):
    """In process, on a real store: the CRL is kept while it is young and nothing was revoked,
    and built anew (a higher number) once half of crl_days has passed since its thisUpdate."""
    from conftest import PASSPHRASE
    store = sapid.SQLiteStore(str(tmp_path / "sapid.db"))
    store.prepare()
    identity = sapid.Identity.load(str(identities("p256")), PASSPHRASE)
    authority = sapid.Authority(sapid.Config(crl_days=2), identity, sapid.BUILTIN_HOOKS, None,
                                sapid.HookRunner(1), store)
    revocations = authority.revocations
    try:
        first = revocations.crl()
        assert revocations.crl() is first
        aged = dataclasses.replace(first, this_update=first.this_update - datetime.timedelta(
            hours=23, minutes=59))
        revocations._crl = aged
        assert revocations.crl() is aged                    # not yet half of two days
        revocations._crl = dataclasses.replace(aged, this_update=aged.this_update
                                               - datetime.timedelta(minutes=2))
        fresh = revocations.crl()
        assert fresh.number > first.number and fresh.next_update - fresh.this_update == (
            datetime.timedelta(days=2))
    finally:
        store.close()


def test_a_store_put_back_from_a_backup_still_shows_new_revocations(identities, tmp_path):
    """The revocation count of a store restored from a backup is lower than the one the CRL
    was built at: a count that differs, not only a higher one, means the CRL is out of date."""
    authority, close = open_local_authority(identities("p256"), tmp_path)
    store = sapid.SQLiteStore(str(tmp_path / "sapid.db"))
    try:
        authority = sapid.Authority(authority.config, authority.identity, sapid.BUILTIN_HOOKS,
                                    authority.committer, sapid.HookRunner(1), store)
        serials = []
        for n in range(3):
            csr = make_csr(tmp_path, name=f"b{n}").read_bytes()
            issued = authority.wait(authority.issue(sapid.Signing(csr, "device1")))
            serials.append(issued.serial)
        for serial in serials[:2]:
            store.revoke(serial, "unspecified", sapid.utcnow())
        assert authority.revocations.crl().entries == 2
        with sqlite3.connect(tmp_path / "sapid.db") as connection:    # the backup's count
            connection.execute("UPDATE revocation_changes SET changes = 0")
        store.revoke(serials[2], "unspecified", sapid.utcnow())
        assert authority.revocations.crl().entries == 3
    finally:
        store.close()
        close()
