"""sapid as operators deploy it: real nginx terminating TLS (examples/nginx.conf, with only its
paths and port changed) and proxying to the Unix socket; clients are curl over HTTPS."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from conftest import ROOT, make_csr, openssl_verify, run, save_certificate, write_hooks

# Reports what the hooks see, through the refusal message.
REPORTING_HOOKS = """
import base64
import json
import sapid

class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        if self.client_id == "report":
            seen = {name: self.headers.get(name) for name in (
                "x-forwarded-for", "x-ssl-client-verify", "x-ssl-client-cert", "x-ssl-client-serial")}
            raise sapid.NotAuthorized(json.dumps(seen))
        if self.client_id == "refused":
            raise sapid.NotAuthorized("not on the list")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_conf(folder: Path, http: str) -> Path:
    """``folder/nginx.conf`` for an nginx of the test's own, all its files in ``folder``, with
    ``http`` in its http block."""
    path = folder / "nginx.conf"
    path.write_text(f"""
daemon off;
user root;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    {http}
}}
""")
    return path


class Nginx:
    """nginx on a loopback port with examples/nginx.conf in front of a daemon's socket."""

    def __init__(self, folder: Path, sapid_socket: str, certificate: Path, key: Path, ca: Path):
        self.folder, self.port, self.http_port = folder, free_port(), free_port()
        site = (ROOT / "examples" / "nginx.conf").read_text()
        site = site.replace("unix:/run/sapid/sapid.sock", f"unix:{sapid_socket}")
        site = re.sub(r"listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;", site)
        site = re.sub(r"\n\s*listen \[::\]:443 ssl;", "", site)
        site = re.sub(r"listen 80;", f"listen 127.0.0.1:{self.http_port};", site)
        site = re.sub(r"\n\s*listen \[::\]:80;", "", site)
        site = site.replace("/etc/ssl/certs/ca.example.com.pem", str(certificate))
        site = site.replace("/etc/ssl/private/ca.example.com.key", str(key))
        site = site.replace("/etc/nginx/sapid-ca.pem", str(ca))
        # EST's passwords (test_est.py writes some): name:crypt lines, as openssl passwd -6.
        self.passwords = folder / "est.htpasswd"
        self.passwords.touch()
        site = site.replace("/etc/nginx/sapid-est.htpasswd", str(self.passwords))
        assert str(certificate) in site and f":{self.port} ssl" in site
        (folder / "site.conf").write_text(site)
        nginx_conf(folder, f"include {folder}/site.conf;")
        run(["nginx", "-t", "-p", str(folder), "-c", str(folder / "nginx.conf")])
        self.process = subprocess.Popen(["nginx", "-p", str(folder), "-c",
                                         str(folder / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nginx did not start: " + (folder / "error.log").read_text())

    def curl(self, path, method="GET", data=None, cert=None, key=None, headers=None, ca=None):
        args = ["curl", "-sS", "--cacert", str(ca), "-X", method, "-w", "\n%{http_code}",
                "--resolve", f"ca.example.com:{self.port}:127.0.0.1"]
        if data is not None:
            if isinstance(data, bytes):
                body = self.folder / f"body-{time.monotonic_ns()}"
                body.write_bytes(data)
                data = body
            args += ["--data-binary", f"@{data}"]
        if cert:
            args += ["--cert", str(cert), "--key", str(key)]
        for name, value in (headers or {}).items():
            args += ["-H", f"{name}: {value}"]
        done = run([*args, f"https://ca.example.com:{self.port}{path}"], check=False)
        assert done.returncode == 0, done.stderr
        text, _, status = done.stdout.rpartition("\n")
        return int(status), json.loads(text) if text.startswith("{") else text

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def deployment(daemon_factory, tmp_path):
    """(daemon, nginx, CA file) for hooks ``REPORTING_HOOKS`` and a trusted proxy."""
    def deploy(trusted_proxy="yes"):
        hooks = write_hooks(tmp_path, REPORTING_HOOKS)
        daemon = daemon_factory(hooks=str(hooks), trusted_proxy=trusted_proxy)
        # nginx's own certificate comes from sapid too.
        server_csr = make_csr(tmp_path, "p256", "/CN=ca.example.com", "DNS:ca.example.com",
                              name="server")
        status, reply = daemon.sign(server_csr, "nginx")
        assert status == 200, reply
        certificate = save_certificate(tmp_path, reply, "server.pem")
        ca = daemon.ca_pem()
        folder = tmp_path / f"nginx-{trusted_proxy}"
        folder.mkdir()
        nginx = Nginx(folder, daemon.socket, certificate, tmp_path / "server.key", ca)
        started.append(nginx)
        return daemon, nginx, ca
    started = []
    yield deploy
    for nginx in started:
        nginx.stop()


def test_sign_through_nginx(deployment, tmp_path):
    daemon, nginx, ca = deployment()
    status, reply = nginx.curl("/api/csr/device1", "PUT", make_csr(tmp_path, "rsa2048"), ca=ca)
    assert status == 200, reply
    assert openssl_verify(ca, save_certificate(tmp_path, reply)).returncode == 0
    status, health = nginx.curl("/api/health", ca=ca)
    assert status == 200 and health["status"] == "ok"
    status, text = nginx.curl("/api/ca", ca=ca)
    assert status == 200 and text == ca.read_text()


def test_refusal_bad_input_and_unknown_paths_are_json(deployment, tmp_path):
    daemon, nginx, ca = deployment()
    status, reply = nginx.curl("/api/csr/refused", "PUT", make_csr(tmp_path), ca=ca)
    assert (status, reply) == (403, {"error": "not_authorized", "message": "not on the list"})
    status, reply = nginx.curl("/api/csr/device1", "PUT", b"not a csr", ca=ca)
    assert (status, reply["error"]) == (400, "not_a_csr")
    status, reply = nginx.curl("/api/csr/bad-id", "PUT", make_csr(tmp_path), ca=ca)
    assert (status, reply["error"]) == (400, "bad_client_id")
    status, reply = nginx.curl("/index.html", ca=ca)
    assert (status, reply["error"]) == (404, "not_found")
    status, reply = nginx.curl("/api/nothing", ca=ca)
    assert (status, reply["error"]) == (404, "not_found")
    # Metrics stay on the socket.
    status, reply = nginx.curl("/api/metrics", ca=ca)
    assert (status, reply["error"]) == (403, "not_authorized")
    assert daemon.curl("/api/metrics")[0] == 200


def test_body_limits_agree(deployment, tmp_path):
    daemon, nginx, ca = deployment()
    # At the limit nginx passes the body on and sapid judges it; one byte more, nginx refuses.
    status, reply = nginx.curl("/api/csr/device1", "PUT", b"A" * 65536, ca=ca)
    assert (status, reply["error"]) == (400, "not_a_csr")
    status, reply = nginx.curl("/api/csr/device1", "PUT", b"A" * 65537, ca=ca)
    assert (status, reply["error"]) == (413, "too_large")


def test_sapid_down_is_json_503(deployment, tmp_path):
    daemon, nginx, ca = deployment()
    daemon.stop()
    status, reply = nginx.curl("/api/csr/device1", "PUT", make_csr(tmp_path), ca=ca)
    assert (status, reply["error"]) == (503, "unavailable")


def client_certificate(daemon, tmp_path):
    status, reply = daemon.sign(make_csr(tmp_path, "p256", "/CN=renewing-device",
                                         "DNS:renewing.example", name="client"), "device1")
    assert status == 200, reply
    return save_certificate(tmp_path, reply, "client.pem"), tmp_path / "client.key", reply


def test_client_certificate_reaches_hooks(deployment, tmp_path):
    daemon, nginx, ca = deployment("yes")
    cert, key, issued = client_certificate(daemon, tmp_path)
    status, reply = nginx.curl("/api/csr/report", "PUT", make_csr(tmp_path), cert=cert, key=key,
                               ca=ca)
    assert status == 403, reply
    seen = json.loads(reply["message"])
    assert seen["x-ssl-client-verify"] == "SUCCESS"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    forwarded = x509.load_pem_x509_certificate(urllib.parse.unquote(seen["x-ssl-client-cert"])
                                               .encode())
    assert format(forwarded.serial_number, "X").zfill(len(issued["serial"])) == issued["serial"]
    assert seen["x-ssl-client-serial"].upper().zfill(len(issued["serial"])) == issued["serial"]
    # No certificate shown, and a client forging the headers: the hooks see nginx's word.
    status, reply = nginx.curl("/api/csr/report", "PUT", make_csr(tmp_path), ca=ca, headers={
        "X-SSL-Client-Verify": "SUCCESS", "X-SSL-Client-Cert": "forged",
        "X-Forwarded-For": "10.9.9.9"})
    seen = json.loads(reply["message"])
    assert seen["x-ssl-client-verify"] == "NONE"
    assert seen["x-ssl-client-cert"] is None
    assert seen["x-forwarded-for"] == "127.0.0.1"


def test_an_unverified_client_certificate_tells_the_hooks_nothing(deployment, tmp_path):
    """ssl_verify_client optional_no_ca lets another CA's certificate through: hooks then
    see FAILED, and no serial, name or certificate that one could mistake for verified."""
    daemon, nginx, ca = deployment("yes")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "self.key"), "-out", str(tmp_path / "self.pem"),
         "-subj", "/CN=renewing-device", "-days", "2", "-set_serial", "0x3A5FC1"])
    status, reply = nginx.curl("/api/csr/report", "PUT", make_csr(tmp_path),
                               cert=tmp_path / "self.pem", key=tmp_path / "self.key", ca=ca)
    assert status == 403, reply
    seen = json.loads(reply["message"])
    assert seen["x-ssl-client-verify"].startswith("FAILED:"), seen
    assert (seen["x-ssl-client-cert"], seen["x-ssl-client-serial"]) == (None, None), seen


def test_untrusted_proxy_headers_are_hidden(deployment, tmp_path):
    daemon, nginx, ca = deployment("no")
    cert, key, _ = client_certificate(daemon, tmp_path)
    status, reply = nginx.curl("/api/csr/report", "PUT", make_csr(tmp_path), cert=cert, key=key,
                               ca=ca)
    assert status == 403
    assert json.loads(reply["message"]) == {"x-forwarded-for": None, "x-ssl-client-verify": None,
                                            "x-ssl-client-cert": None, "x-ssl-client-serial": None}


def test_crl_and_ocsp_are_served_to_anyone(deployment, tmp_path):
    """examples/nginx.conf: the CRL and OCSP over plain HTTP and over TLS without a client
    certificate; over plain HTTP nothing else, signing least of all."""
    daemon, nginx, ca = deployment()
    status, reply = nginx.curl("/api/csr/device1", "PUT", make_csr(tmp_path), ca=ca)
    leaf = save_certificate(tmp_path, reply, "leaf.pem")
    http = f"http://127.0.0.1:{nginx.http_port}"
    out = tmp_path / "crl.der"
    done = run(["curl", "-sS", "-o", str(out), "-w", "%{http_code} %{content_type}",
                f"{http}/api/crl"])
    assert done.stdout == "200 application/pkix-crl"
    crl = x509.load_der_x509_crl(out.read_bytes())
    assert crl.issuer == x509.load_pem_x509_certificate(ca.read_bytes()).subject
    status, text = nginx.curl("/api/crl.pem", ca=ca)          # TLS, no client certificate
    assert status == 200 and text.startswith("-----BEGIN X509 CRL-----")
    told = run(["openssl", "ocsp", "-issuer", str(ca), "-cert", str(leaf), "-CAfile", str(ca),
                "-url", f"{http}/ocsp"], check=False)
    assert f"{leaf}: good" in told.stdout and "Response verify OK" in told.stderr, told
    # GET with a base64 request that holds "//": it reaches sapid as sent.
    certificate = x509.load_pem_x509_certificate(leaf.read_bytes())
    issuer = x509.load_pem_x509_certificate(ca.read_bytes())
    for attempt in range(100_000):          # about one nonce in thirty gives a "//"
        der = (ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1())
               .add_extension(x509.OCSPNonce(os.urandom(16)), critical=False).build()
               .public_bytes(serialization.Encoding.DER))
        encoded = base64.b64encode(der).decode()
        if "//" in encoded:
            break
    assert "//" in encoded
    answer = tmp_path / "answer.der"
    done = run(["curl", "-sS", "--path-as-is", "-o", str(answer), "-w", "%{http_code}",
                f"{http}/ocsp/{encoded}"])
    assert done.stdout == "200"
    answered = ocsp.load_der_ocsp_response(answer.read_bytes())
    assert answered.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answered.serial_number == certificate.serial_number
    assert answered.extensions.get_extension_for_class(x509.OCSPNonce).value == (
        ocsp.load_der_ocsp_request(der).extensions.get_extension_for_class(x509.OCSPNonce).value)
    issuer.public_key().verify(answered.signature, answered.tbs_response_bytes,
                               ec.ECDSA(answered.signature_hash_algorithm))
    # Signing and revoking are not on plain HTTP.
    for method, path in (("PUT", "/api/csr/device1"), ("POST", "/api/revoke/device1"),
                         ("GET", "/api/health")):
        done = run(["curl", "-sS", "-X", method, "--data-binary", "x", "-w", " %{http_code}",
                    f"{http}{path}"])
        assert done.stdout.endswith(" 404") and "not_found" in done.stdout, done.stdout
