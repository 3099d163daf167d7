"""EST (RFC 7030) as devices speak it: Bouncy Castle's EST client, and curl with openssl as
operators script it, over TLS through nginx (examples/nginx.conf, only its paths and port
changed) to sapid's socket.  Each refusal has its twin that succeeds, and every error is text."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import signal
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from conftest import ROOT, SAPID, make_csr, make_identity, openssl_verify, run, sapid_env, \
    save_certificate, write_hooks
from test_nginx import Nginx

BC_JARS = ":".join(f"/usr/share/java/{name}.jar" for name in ("bcprov", "bcpkix", "bcutil"))
USER, PASSWORD = "device1", "enrol-secret-1"
TEXT = "text/plain; charset=utf-8"


@pytest.fixture(scope="session")
def bouncy_castle(tmp_path_factory):
    """``bouncy_castle(operation, site, out, *options)``: tests/data/EstClient.java, compiled
    once, run against ``site``'s nginx; (exit status, what it printed)."""
    classes = tmp_path_factory.mktemp("est-client")
    run(["javac", "-cp", BC_JARS, "-d", str(classes),
         str(Path(__file__).parent / "data" / "EstClient.java")])

    def client(operation: str, site: Site, out: Path, *options: str):
        done = run(["java", "-cp", f"{BC_JARS}:{classes}", "EstClient", operation,
                    f"localhost:{site.nginx.port}", str(site.ca), str(out), *options],
                   check=False)
        return done.returncode, done.stdout + done.stderr
    return client


@dataclasses.dataclass
class Site:
    daemon: object
    nginx: Nginx
    ca: Path
    folder: Path

    def https(self, path: str, *args: str):
        """(status, headers as a lower-case dict, body bytes) of curl over TLS via nginx."""
        head, body = self.folder / "head.txt", self.folder / "body.bin"
        command = ["curl", "-sS", "--cacert", str(self.ca), "-D", str(head), "-o", str(body),
                   "-w", "%{http_code}", "--resolve", f"ca.example.com:{self.nginx.port}:127.0.0.1"]
        done = run([*command, *args, f"https://ca.example.com:{self.nginx.port}{path}"])
        lines = head.read_bytes().decode("latin-1").split("\r\n")[1:]
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers.setdefault(name.lower(), value.strip())
        return int(done.stdout), headers, body.read_bytes()

    def enrol(self, csr_der: Path, *args: str, path: str = "/.well-known/est/simpleenroll"):
        encoded = self.folder / f"{csr_der.stem}.b64"
        encoded.write_bytes(base64.encodebytes(csr_der.read_bytes()))     # 76-column lines
        return self.https(path, "-H", "Content-Type: application/pkcs10", "--data-binary",
                          f"@{encoded}", *args)

    def count(self) -> int:
        return len(self.daemon.stored())


def p12(folder: Path, cert: Path, key: Path, name: str) -> Path:
    out = folder / f"{name}.p12"
    run(["openssl", "pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-out", str(out),
         "-passout", "pass:keystore", "-name", name])
    return out


def certs_only(body: bytes, folder: Path) -> list[x509.Certificate]:
    """What ``openssl base64 -d | openssl pkcs7 -inform DER -print_certs`` makes of a body."""
    source = folder / "certs-only.b64"
    source.write_bytes(body)
    done = run(["sh", "-c", f"openssl base64 -d < {source} | openssl pkcs7 -inform DER "
                "-print_certs"])
    return x509.load_pem_x509_certificates(done.stdout.encode())


@pytest.fixture
def est_site(daemon_factory, tmp_path):
    """``est_site(hooks="", trusted_proxy="yes")``: sapid behind examples/nginx.conf, with one
    EST password (USER, PASSWORD) in nginx's file."""
    started = []

    def deploy(hooks="", trusted_proxy="yes") -> Site:
        daemon = daemon_factory(hooks=hooks, trusted_proxy=trusted_proxy)
        server_csr = make_csr(tmp_path, "p256", "/CN=ca.example.com",
                              "DNS:ca.example.com,DNS:localhost", name="server")
        status, reply = daemon.sign(server_csr, "nginx")
        assert status == 200, reply
        certificate = save_certificate(tmp_path, reply, "server.pem")
        folder = tmp_path / f"nginx{len(started)}"
        folder.mkdir()
        nginx = Nginx(folder, daemon.socket, certificate, tmp_path / "server.key",
                      daemon.ca_pem())
        started.append(nginx)
        crypted = run(["openssl", "passwd", "-6", PASSWORD]).stdout.strip()
        nginx.passwords.write_text(f"{USER}:{crypted}\n")
        return Site(daemon, nginx, daemon.ca_pem(), folder)
    yield deploy
    for nginx in started:
        nginx.stop()


def issued_to(site: Site, client_id: str, tmp_path: Path, name: str, subject="/CN=renewing",
              sans="DNS:renewing.example"):
    """A certificate of this CA, signed over the API as ``client_id``: (cert, key, p12)."""
    status, reply = site.daemon.sign(make_csr(tmp_path, "p256", subject, sans, name=name),
                                     client_id)
    assert status == 200, reply
    cert = save_certificate(tmp_path, reply, f"{name}.pem")
    return cert, tmp_path / f"{name}.key", p12(tmp_path, cert, tmp_path / f"{name}.key", name)


def test_bouncy_castle_enrols_and_renews(est_site, bouncy_castle, tmp_path):
    site = est_site()
    # cacerts: the CA as GET /api/ca has it.
    out = tmp_path / "cacerts.pem"
    status, said = bouncy_castle("cacerts", site, out)
    assert status == 0, said
    assert x509.load_pem_x509_certificates(out.read_bytes()) == (
        x509.load_pem_x509_certificates(site.ca.read_bytes()))
    # simpleenroll with HTTP Basic, no label: client id "est".
    csr = make_csr(tmp_path, "p256", "/CN=bc-device", "DNS:bc-device.example", der=True,
                   name="bc")
    out = tmp_path / "basic.pem"
    status, said = bouncy_castle("simpleenroll", site, out, "--csr", str(csr),
                                 "--basic", USER, PASSWORD)
    assert status == 0, said
    assert openssl_verify(site.ca, out).returncode == 0
    enrolled = x509.load_pem_x509_certificate(out.read_bytes())
    assert enrolled.subject.rfc4514_string() == "CN=bc-device"
    assert [row["client_id"] for row in site.daemon.stored()
            if row["certificate"] == enrolled] == ["est"]
    # The twin: a wrong password is refused, and nothing is signed.
    before = site.count()
    status, said = bouncy_castle("simpleenroll", site, tmp_path / "no.pem", "--csr", str(csr),
                                 "--basic", USER, "not-the-password")
    assert (status, said.startswith("status 401")) == (3, True), said
    assert site.count() == before
    # simpleenroll with a client certificate of this CA (issued for enrolling), labelled.
    _, _, bootstrap = issued_to(site, "factory", tmp_path, "bootstrap", "/CN=bootstrap", None)
    csr2 = make_csr(tmp_path, "p256", "/CN=bc-device2", "DNS:bc-device2.example", der=True,
                    name="bc2")
    out = tmp_path / "certificate.pem"
    status, said = bouncy_castle("simpleenroll", site, out, "--csr", str(csr2), "--label",
                                 "line7", "--p12", str(bootstrap), "keystore")
    assert status == 0, said
    assert openssl_verify(site.ca, out).returncode == 0
    second = x509.load_pem_x509_certificate(out.read_bytes())
    assert [row["client_id"] for row in site.daemon.stored()
            if row["certificate"] == second] == ["line7"]
    # simplereenroll: the certificate from the Basic enrolment renews itself, with a new key.
    (tmp_path / "basic.key").write_bytes((tmp_path / "bc.key").read_bytes())
    current = p12(tmp_path, tmp_path / "basic.pem", tmp_path / "basic.key", "current")
    renewal = make_csr(tmp_path, "p256", "/CN=bc-device", "DNS:bc-device.example", der=True,
                       name="renewal")
    out = tmp_path / "renewed.pem"
    status, said = bouncy_castle("simplereenroll", site, out, "--csr", str(renewal),
                                 "--p12", str(current), "keystore")
    assert status == 0, said
    assert openssl_verify(site.ca, out).returncode == 0
    renewed = x509.load_pem_x509_certificate(out.read_bytes())
    assert renewed.subject == enrolled.subject and renewed.serial_number != (
        enrolled.serial_number)
    assert renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName) == (
        enrolled.extensions.get_extension_for_class(x509.SubjectAlternativeName))
    assert renewed.public_key() != enrolled.public_key()
    # The twin: re-enrolling without showing a certificate is refused.
    status, said = bouncy_castle("simplereenroll", site, tmp_path / "no.pem", "--csr",
                                 str(renewal), "--basic", USER, PASSWORD)
    assert (status, said.startswith("status 403")) == (3, True), said


def test_curl_and_openssl_as_operators_script_it(est_site, tmp_path):
    site = est_site()
    status, headers, body = site.https("/.well-known/est/cacerts")
    assert (status, headers["content-type"], headers["content-transfer-encoding"]) == (
        200, "application/pkcs7-mime", "base64")
    assert certs_only(body, tmp_path) == x509.load_pem_x509_certificates(site.ca.read_bytes())
    # The same under a label.
    assert site.https("/.well-known/est/line7/cacerts")[2] == body
    csr = make_csr(tmp_path, "rsa2048", "/CN=router1", "DNS:router1.example,IP:192.0.2.1",
                   der=True, name="router")
    status, headers, body = site.enrol(csr, "-u", f"{USER}:{PASSWORD}",
                                       path="/.well-known/est/routers/simpleenroll")
    assert status == 200, body
    assert headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    assert headers["content-transfer-encoding"] == "base64"
    [certificate] = certs_only(body, tmp_path)
    pem = tmp_path / "router.pem"
    pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    assert openssl_verify(site.ca, pem).returncode == 0
    assert [row["client_id"] for row in site.daemon.stored()
            if row["certificate"] == certificate] == ["routers"]
    assert certificate.public_key() == x509.load_der_x509_csr(csr.read_bytes()).public_key()
    # The twin: the same request without the password.
    status, headers, body = site.enrol(csr)
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="sapid EST"', body
    # csrattrs: nothing asked of a CSR.
    status, headers, body = site.https("/.well-known/est/csrattrs")
    assert (status, body, "content-length" in headers) == (204, b"", False)


def test_refusals_are_text_and_sign_nothing(est_site, tmp_path):
    """RFC 7030 4.2.3's errors, each with the request it refuses; the store is unchanged."""
    site = est_site()
    good = make_csr(tmp_path, "p256", "/CN=sensor", "DNS:sensor.example", der=True,
                    name="sensor")
    basic = ("-u", f"{USER}:{PASSWORD}")
    assert site.enrol(good, *basic)[0] == 200
    current, key, _ = issued_to(site, "sensors", tmp_path, "current")
    with_cert = ("--cert", str(current), "--key", str(key))
    renewal = make_csr(tmp_path, "p256", "/CN=renewing", "DNS:renewing.example", der=True,
                       name="renewal")
    before = site.count()

    def refused(status: int, words: str, response):
        got, headers, body = response
        assert (got, headers.get("content-type", "")[:10]) == (status, "text/plain"), body
        assert words in body.decode(), body
        assert not body.startswith(b"{")

    refused(401, "", site.enrol(good))                                         # no credentials
    refused(401, "", site.enrol(good, "-u", f"{USER}:wrong"))                  # wrong password
    garbage = tmp_path / "garbage"
    for body, words in ((b"%%% not a CSR %%%", "not base64"), (b"MIIB\r\nAB", "cut short"),
                        (b"", "cut short")):
        garbage.write_bytes(body)
        refused(400, words, site.https("/.well-known/est/simpleenroll", *basic, "-H",
                                       "Content-Type: application/pkcs10",
                                       "--data-binary", f"@{garbage}"))
    pem = make_csr(tmp_path, "p256", "/CN=sensor", name="pem")
    refused(400, "without PEM lines", site.https(
        "/.well-known/est/simpleenroll", *basic, "-H", "Content-Type: application/pkcs10",
        "--data-binary", f"@{pem}"))
    der = tmp_path / "raw.der"
    der.write_bytes(base64.b64decode(b"".join(
        pem.read_bytes().splitlines()[1:-1])))
    refused(400, "not base64", site.https("/.well-known/est/simpleenroll", *basic, "-H",
                                          "Content-Type: application/pkcs10",
                                          "--data-binary", f"@{der}"))
    refused(415, "application/pkcs10", site.https(
        "/.well-known/est/simpleenroll", *basic, "-H", "Content-Type: application/json",
        "--data-binary", "e30="))
    refused(405, "POST", site.https("/.well-known/est/simpleenroll", *basic))
    refused(501, "simpleenroll", site.enrol(good, *basic, path="/.well-known/est/serverkeygen"))
    refused(501, "simpleenroll", site.enrol(good, *basic, path="/.well-known/est/fullcmc"))
    refused(404, "no such EST resource", site.https("/.well-known/est/x/y/cacerts", *basic))
    # Re-enrolment: it must show a current certificate and keep its names.
    refused(403, "renews the certificate", site.enrol(renewal, *basic,
                                                      path="/.well-known/est/simplereenroll"))
    changed = make_csr(tmp_path, "p256", "/CN=someone-else", "DNS:renewing.example", der=True,
                       name="changed")
    refused(400, "keeps the subject", site.enrol(changed, *with_cert,
                                                  path="/.well-known/est/simplereenroll"))
    more = make_csr(tmp_path, "p256", "/CN=renewing", "DNS:renewing.example,DNS:more.example",
                    der=True, name="more")
    refused(400, "keeps the subjectAltName", site.enrol(more, *with_cert,
                                                         path="/.well-known/est/simplereenroll"))
    assert site.count() == before
    # A renewal under a label other than the certificate's client id.
    refused(403, "client id of the certificate it renews", site.enrol(
        renewal, *with_cert, path="/.well-known/est/victim/simplereenroll"))
    assert site.count() == before
    # The twin of the renewals: the same certificate renews with its names kept, under its
    # own client id (with or without the label that says it)...
    status, _, body = site.enrol(renewal, *with_cert, path="/.well-known/est/simplereenroll")
    assert status == 200, body
    [renewed] = certs_only(body, tmp_path)
    assert [row["client_id"] for row in site.daemon.stored()
            if row["certificate"] == renewed] == ["sensors"]
    status, _, body = site.enrol(renewal, *with_cert,
                                 path="/.well-known/est/sensors/simplereenroll")
    assert status == 200, body
    assert site.count() == before + 2
    # ...until it is revoked.
    serial = format(x509.load_pem_x509_certificate(current.read_bytes()).serial_number, "X")
    run([*SAPID, "revoke", "-c", str(site.daemon.config), serial], env=sapid_env())
    refused(403, "revoked", site.enrol(renewal, *with_cert,
                                       path="/.well-known/est/simplereenroll"))
    refused(403, "revoked", site.enrol(good, *with_cert))          # no password, revoked cert
    # nginx (without ssl_crl) still verifies it and asks no password; one sent anyway is not
    # passed on, and sapid refuses the certificate it knows is revoked.
    refused(403, "revoked", site.enrol(good, *with_cert, "-u", "anyone:anything"))
    refused(403, "revoked", site.enrol(good, *with_cert, *basic))
    # A client certificate from another CA is no credential: nginx asks for the password.
    other = make_identity(tmp_path / "other-ca")
    foreign = ("--cert", str(other_signed(other, tmp_path)), "--key",
               str(tmp_path / "foreign.key"))
    refused(401, "", site.enrol(good, *foreign))
    refused(401, "", site.enrol(good, *foreign, "-u", f"{USER}:wrong"))
    assert site.count() == before + 2
    # The twin: the password that goes with it.
    assert site.enrol(good, *foreign, *basic)[0] == 200
    # Every refusal was audited, with EST's client id.
    assert site.daemon.output().count('client_id="est" subject=null serial=null') >= 8


def other_signed(identity: Path, tmp_path: Path):
    """A client certificate from another CA (``sapid sign`` with that CA)."""
    csr = make_csr(tmp_path, "p256", "/CN=renewing", "DNS:renewing.example", name="foreign")
    config = tmp_path / "other.conf"
    config.write_text(f"[sapid]\nidentity = {identity}\nstate = {tmp_path / 'other-state'}\n"
                      "hooks =\n")
    done = run([*SAPID, "sign", "-c", str(config), str(csr)], env=sapid_env())
    out = tmp_path / "foreign.pem"
    out.write_text(done.stdout)
    return out


# sapid's own checks, on its socket: what a proxy forwards, and what hooks decide. -------------

def forwarded(cert: Path) -> dict:
    return {"X-SSL-Client-Verify": "SUCCESS",
            "X-SSL-Client-Cert": urllib.parse.quote(cert.read_text())}


def est_post(daemon, path: str, csr_der: Path, headers: dict):
    return daemon.curl(path, "POST", base64.encodebytes(csr_der.read_bytes()),
                       {"Content-Type": "application/pkcs10", **headers})


def test_sapid_checks_the_forwarded_certificate_itself(daemon_factory, tmp_path):
    """Whatever nginx lets through, a certificate counts only when this CA issued it."""
    daemon = daemon_factory(trusted_proxy="yes")
    csr = make_csr(tmp_path, "p256", "/CN=renewing", "DNS:renewing.example", der=True,
                   name="renewal")
    other = make_identity(tmp_path / "other-ca")
    foreign = other_signed(other, tmp_path)
    basic = {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}
    for path in ("/.well-known/est/simpleenroll", "/.well-known/est/simplereenroll"):
        for credentials in ({}, basic):
            status, body, head = est_post(daemon, path, csr, {**forwarded(foreign),
                                                              **credentials})
            assert (status, "not issued by this CA" in body) == (403, True), body
            assert f"Content-Type: {TEXT}" in head
    # The twin: a certificate of this CA, forwarded the same way.
    status, reply = daemon.sign(make_csr(tmp_path, "p256", "/CN=renewing",
                                         "DNS:renewing.example", name="mine"), "device1")
    mine = save_certificate(tmp_path, reply, "mine.pem")
    status, body, head = est_post(daemon, "/.well-known/est/simplereenroll", csr,
                                  forwarded(mine))
    assert status == 200 and "smime-type=certs-only" in head, body
    # Counted as an issuance, as /api/csr's are.
    status, metrics, _ = daemon.curl("/api/metrics")
    assert re.search(r"^sapid_certificates_issued_total 2(\.0)?$", metrics, re.M), metrics
    # Unverified by the proxy (X-SSL-Client-Verify other than SUCCESS): not counted.
    status, body, _ = est_post(daemon, "/.well-known/est/simplereenroll", csr, {
        **forwarded(mine), "X-SSL-Client-Verify": "FAILED:unable to get issuer certificate"})
    assert (status, "none was shown" in body) == (403, True), body
    # Neither credential: the challenge, with no body for clients to trip on.
    status, body, head = est_post(daemon, "/.well-known/est/simpleenroll", csr, {})
    assert (status, body) == (401, ""), body
    assert 'WWW-Authenticate: Basic realm="sapid EST"' in head
    assert 'code="not_authenticated"' in daemon.output()
    # A Basic header that is not base64 of user:password.
    status, body, _ = est_post(daemon, "/.well-known/est/simpleenroll", csr,
                               {"Authorization": "Basic ???"})
    assert (status, "RFC 7617" in body) == (400, True), body


def test_a_certificate_that_is_not_current_is_refused_whatever_the_hooks(daemon_factory,
                                                                        tmp_path):
    """Hooks that sign anyone (those written before EST, say) still never see an enrolment
    that shows a revoked or foreign certificate."""
    hooks = write_hooks(tmp_path, "import sapid\nclass Hooks(sapid.SigningHooks):\n"
                                  "    def authorize(self, names):\n        return None\n")
    daemon = daemon_factory(hooks=str(hooks), trusted_proxy="yes")
    csr = make_csr(tmp_path, "p256", "/CN=renewing", "DNS:renewing.example", der=True,
                   name="renewal")
    foreign = other_signed(make_identity(tmp_path / "other-ca"), tmp_path)
    status, reply = daemon.sign(make_csr(tmp_path, "p256", "/CN=renewing",
                                         "DNS:renewing.example", name="mine"), "device1")
    mine = save_certificate(tmp_path, reply, "mine.pem")
    run([*SAPID, "revoke", "-c", str(daemon.config), reply["serial"]], env=sapid_env())
    basic = {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}
    for cert, words in ((foreign, "not issued by this CA"), (mine, "is revoked")):
        for credentials in ({}, basic):
            status, body, _ = est_post(daemon, "/.well-known/est/simpleenroll", csr,
                                       {**forwarded(cert), **credentials})
            assert (status, words in body) == (403, True), body
    # The twin: the password alone, which these hooks take.
    status, body, _ = est_post(daemon, "/.well-known/est/simpleenroll", csr, basic)
    assert status == 200, body
    assert len(daemon.stored()) == 2


def test_without_a_trusted_proxy_builtin_hooks_refuse_est(daemon_factory, tmp_path):
    daemon = daemon_factory(trusted_proxy="no")
    status, reply = daemon.sign(make_csr(tmp_path, "p256", "/CN=renewing",
                                         "DNS:renewing.example", name="mine"), "device1")
    mine = save_certificate(tmp_path, reply, "mine.pem")
    csr = make_csr(tmp_path, "p256", "/CN=renewing", "DNS:renewing.example", der=True,
                   name="renewal")
    status, body, _ = est_post(daemon, "/.well-known/est/simpleenroll", csr, {
        "Authorization": "Basic " + base64.b64encode(b"a:b").decode(), **forwarded(mine)})
    assert (status, "trusted_proxy = yes" in body) == (403, True), body
    # Forwarded headers are not believed without a trusted proxy.
    status, body, _ = est_post(daemon, "/.well-known/est/simplereenroll", csr, forwarded(mine))
    assert (status, "only with trusted_proxy = yes" in body) == (403, True), body
    assert len(daemon.stored()) == 1


HOOKS_DECIDE = """
import sapid

PASSWORDS = {"meter1": "meter-secret"}

class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        est = self.est
        if est is None:
            raise sapid.NotAuthorized("api: " + str(self.headers.get("authorization")))
        if est.label == "show":                    # what a hook's log line would hold
            raise sapid.NotAuthorized(repr(est) + repr(self.headers))
        if est.username not in PASSWORDS or PASSWORDS[est.username] != est.password:
            raise sapid.NotAuthorized(f"{est.operation} {est.label} {est.username}: bad password")
        if self.client_id != (est.label or "est"):
            raise sapid.NotAuthorized("client id is not the label")
"""


def test_hooks_decide_with_self_est(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, HOOKS_DECIDE)
    daemon = daemon_factory(hooks=str(hooks), trusted_proxy="no")
    csr = make_csr(tmp_path, "p256", "/CN=meter1", "DNS:meter1.example", der=True, name="m")
    credentials = {"Authorization": "Basic " + base64.b64encode(b"meter1:meter-secret").decode()}
    status, body, head = est_post(daemon, "/.well-known/est/meters/simpleenroll", csr,
                                  credentials)
    assert status == 200, body
    der = base64.b64decode(body)
    [certificate] = pkcs7.load_der_pkcs7_certificates(der)
    assert [row["client_id"] for row in daemon.stored()] == ["meters"]
    # The twins: a wrong password; no password (asked for before the hooks are: the challenge
    # EST clients answer); and /api/csr, where self.est is None.
    status, body, _ = est_post(daemon, "/.well-known/est/meters/simpleenroll", csr, {
        "Authorization": "Basic " + base64.b64encode(b"meter1:guess").decode()})
    assert (status, body) == (403, "simpleenroll meters meter1: bad password\n")
    status, body, head = est_post(daemon, "/.well-known/est/simpleenroll", csr, {})
    assert (status, body, "WWW-Authenticate: Basic" in head) == (401, "", True), head
    status, body, _ = est_post(daemon, "/.well-known/est/show/simpleenroll", csr, credentials)
    assert status == 403 and "username='meter1'" in body and "(hidden)" in body, body
    assert "meter-secret" not in body and credentials["Authorization"][6:] not in body
    status, reply, _ = daemon.curl("/api/csr/meters", "PUT", csr, credentials)
    assert (status, reply["message"]) == (403, "api: " + credentials["Authorization"])
    assert len(daemon.stored()) == 1


def readme_est_hooks() -> str:
    """The hooks example of the README's section "EST enrolment"."""
    section = (ROOT / "README.md").read_text().split("## EST enrolment", 1)[1]
    return "import sapid\n" + section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_est_hook_ties_the_client_id_to_the_login(est_site, tmp_path):
    """The README's hook behind examples/nginx.conf: a device enrols under its own name, the
    one it logged in with or that of the certificate of this CA it shows."""
    site = est_site(hooks=str(write_hooks(tmp_path, readme_est_hooks())))
    csr = make_csr(tmp_path, "p256", "/CN=d1", "DNS:d1.example", der=True, name="d1")
    basic = ("-u", f"{USER}:{PASSWORD}")
    assert site.enrol(csr, *basic, path=f"/.well-known/est/{USER}/simpleenroll")[0] == 200
    got, _, body = site.enrol(csr, *basic, path="/.well-known/est/device2/simpleenroll")
    assert (got, b"enrol at" in body) == (403, True), body
    current, key, _ = issued_to(site, "sensors", tmp_path, "current")
    with_cert = ("--cert", str(current), "--key", str(key))
    assert site.enrol(csr, *with_cert, path="/.well-known/est/sensors/simpleenroll")[0] == 200
    got, _, body = site.enrol(csr, *with_cert, "-u", "device2:anything",
                              path="/.well-known/est/device2/simpleenroll")
    assert (got, b"enrol at" in body) == (403, True), body


def test_nginx_passes_no_password_it_did_not_check(est_site, tmp_path):
    """A verified certificate switches nginx's password check off; a password sent with it
    anyway never reaches the hooks as if it had been checked."""
    site = est_site(hooks=str(write_hooks(tmp_path, """
        import sapid
        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.est is not None:
                    raise sapid.NotAuthorized(f"login {self.est.username}")
        """)))
    csr = make_csr(tmp_path, "p256", "/CN=d1", "DNS:d1.example", der=True, name="d1")
    current, key, _ = issued_to(site, "sensors", tmp_path, "current")
    got, _, body = site.enrol(csr, "--cert", str(current), "--key", str(key),
                              "-u", "device2:anything")
    assert (got, body) == (403, b"login None\n")
    # The twin: without a certificate, nginx checks the password and passes it on.
    got, _, body = site.enrol(csr, "-u", f"{USER}:{PASSWORD}")
    assert (got, body) == (403, f"login {USER}\n".encode())


def test_est_errors_of_the_front_door_are_text(daemon, tmp_path):
    """Errors the HTTP layer and the router give under /.well-known/est/ are text too."""
    too_big = b"A" * 70000
    status, body, head = daemon.curl("/.well-known/est/simpleenroll", "POST", too_big,
                                     {"Content-Type": "application/pkcs10"})
    assert (status, f"Content-Type: {TEXT}" in head) == (413, True), head
    status, body, head = daemon.curl("/.well-known/est/bad-label/simpleenroll", "POST", b"x")
    assert (status, body) == (400, "the EST label must be 1 to 128 letters and digits\n")
    answer = daemon.raw(b"HEAD /.well-known/est/cacerts HTTP/1.1\r\nHost: ca\r\n"
                        b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/pkcs7-mime\r\n" in answer
    status, body, head = daemon.curl("/.well-known/est/cacerts", "POST", b"x")
    assert (status, "Allow: GET, HEAD" in head, body.startswith("POST not allowed")) == (
        405, True, True), head
    # The signed answer leaves as certs-only, the API's as JSON: one pipeline, two envelopes.
    status, reply = daemon.sign(make_csr(tmp_path), "device1")
    assert status == 200 and json.dumps(reply).startswith('{"signed_x509_pem"')



def test_the_base64_check_is_linear():
    """Whitespace is allowed between base64 lines; a body of it does not hold the reception
    thread (a backtracking pattern took 13 s on 64 KiB, this one a millisecond on 4 MiB)."""
    import sapid
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the base64 check is not linear"))
    signal.alarm(5)
    try:
        for body in (b" " * 4_000_000 + b"!", b"\r\n" * 2_000_000 + b"=!", b"A" * 4_000_001):
            with pytest.raises(sapid.RequestError):
                sapid.est_csr(body)
    finally:
        signal.alarm(0)


def test_a_late_est_request_is_answered_in_text(daemon_factory):
    daemon = daemon_factory(request_timeout=1)
    answer = daemon.raw(b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: ca\r\n"
                        b"Content-Length: 100\r\n\r\nMIIB")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert f"Content-Type: {TEXT}".encode() in answer and not answer.rstrip().endswith(b"}")
