"""ssl_api operators move to sapid unchanged: an ``sapi_custom_ca`` package written as ssl_api's
README says, its base class checked against the one in ssl_api's own sdist (from PyPI), and its
tool ``ca_create_identity``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509

import sapid
from conftest import make_csr, run, sapid_env, write_hooks

SSL_API = "ssl_api==0.2.34"

# sapi_custom_ca as ssl_api's README describes it: api.py defines API_CSR_HOOKS_FACTORY with a
# class derived from SigningHooksBase, ca.py CUSTOM_BOOT_CB and SERIAL_NUMBER_GENERATOR_CB;
# presign adds a CRL distribution point with M2Crypto, as the README suggests.
API_PY = '''\
import datetime
import json
import logging

import M2Crypto.X509

import sapi.config.api.signing_hooks_base
from sapi.exceptions import CsrNotAuthedError

from . import helpers

_logger = logging.getLogger(__name__)


class CustomHooks(sapi.config.api.signing_hooks_base.SigningHooksBase):
    def authorize(self, subject_alt_name_exts):
        _logger.info("authorizing %s", self.client_hash)
        if self.client_hash == "refused":
            raise CsrNotAuthedError(helpers.REFUSAL)
        if self.client_hash == "report":
            raise CsrNotAuthedError(json.dumps({
                "names": subject_alt_name_exts, "key": self.public_key_hash,
                "pem": self.csr_tuple.csr_pem.splitlines()[0]}))
        return datetime.timedelta(days=30)

    def presign(self, certificate):
        certificate.set_version(2)
        certificate.add_ext(M2Crypto.X509.new_extension(
            "crlDistributionPoints", "URI:http://ca.example.net/ca.crl"))
        certificate.add_ext(M2Crypto.X509.new_extension(
            "extendedKeyUsage", "critical,serverAuth"))
        assert not hasattr(certificate, "get_ext_count")
        if self.client_hash == "unported":
            certificate.set_pubkey(None)

    def postsign(self, certificate):
        _logger.warning("signed %X for %s: sha1 %s, %s", certificate.get_serial_number(),
                        certificate.get_subject().CN, certificate.get_fingerprint("sha1"),
                        certificate.as_pem().splitlines()[0].decode())


API_CSR_HOOKS_FACTORY = CustomHooks
'''
CA_PY = '''\
import hashlib
import os
import random
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def boot():
    with open(os.path.join(HERE, "booted"), "a") as file:
        file.write("booted\\n")


CUSTOM_BOOT_CB = boot          # ssl_api's name counts; "boot" is only this file's helper

# ssl_api's own default generator, in Python 3: 40 hex digits.
SERIAL_NUMBER_GENERATOR_CB = lambda: hashlib.sha1(
    (str(time.time()) + str(random.random())).encode()).hexdigest()
'''


@pytest.fixture(scope="session")
def ssl_api_source(tmp_path_factory) -> Path:
    """ssl_api's sdist from PyPI, unpacked: the base class to compare with, never copied."""
    folder = tmp_path_factory.mktemp("ssl_api")
    run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "--no-deps", "--no-binary", ":all:", "-d", str(folder), SSL_API], timeout=300)
    archive, = folder.glob("ssl_api-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    found, = folder.glob("ssl_api-*/sapi/config/api/signing_hooks_base.py")
    return found


def package(folder: Path) -> Path:
    made = folder / "sapi_custom_ca"
    made.mkdir()
    for name, text in (("__init__.py", ""), ("api.py", API_PY), ("ca.py", CA_PY),
                       ("helpers.py", 'REFUSAL = "not a customer"\n')):
        (made / name).write_text(text)
        (made / name).chmod(0o644)
    return made


def test_the_base_class_has_ssl_apis_methods_and_properties(ssl_api_source):
    tree = ast.parse(ssl_api_source.read_text())
    base, = [node for node in tree.body if isinstance(node, ast.ClassDef)
             and node.name == "SigningHooksBase"]
    methods = {node.name: [arg.arg for arg in node.args.args] for node in base.body
               if isinstance(node, ast.FunctionDef)}
    properties = {name for name, node in ((n.name, n) for n in base.body
                                          if isinstance(n, ast.FunctionDef))
                  if any(getattr(d, "id", None) == "property" for d in node.decorator_list)}
    assert properties == {"client_hash", "public_key_hash", "csr_tuple"}
    sapid.install_ssl_api_names()
    from sapi.config.api.signing_hooks_base import SigningHooksBase
    for name, args in methods.items():
        ours = getattr(SigningHooksBase, name)
        if name in properties:
            assert isinstance(ours, property), name
        else:
            import inspect
            assert list(inspect.signature(ours).parameters)[:len(args)] == args, name
    from sapi.exceptions import CsrNotAuthedError
    assert issubclass(CsrNotAuthedError, sapid.NotAuthorized)
    assert "sapi" not in {dist.metadata["Name"] for dist in
                          __import__("importlib.metadata").metadata.distributions()}


def test_an_ssl_api_package_signs_refuses_and_draws_serials(daemon_factory, tmp_path):
    hooks = package(tmp_path)
    daemon = daemon_factory(hooks=str(hooks))
    assert (hooks / "booted").read_text() == "booted\n"
    csr = make_csr(tmp_path, subject="/CN=www.example.net",
                   sans="DNS:www.example.net,IP:10.0.0.1")
    status, reply = daemon.sign(csr, "customer1")
    assert status == 200, reply
    certificate = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == (
        __import__("datetime").timedelta(days=30, seconds=300))
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert points.value[0].full_name[0].value == "http://ca.example.net/ca.crl"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert usage.critical and list(usage.value) == [x509.ExtendedKeyUsageOID.SERVER_AUTH]
    assert len(reply["serial"]) == 40          # a SHA-1 hex serial, masked to 159 bits
    assert certificate.serial_number < 2 ** 159
    # The hooks' own log lines, under sapid's prefix and level.
    log = daemon.output()
    assert "sapid: INFO: authorizing customer1" in log, log
    sha1 = certificate.fingerprint(__import__("cryptography.hazmat.primitives.hashes",
                                              fromlist=["SHA1"]).SHA1()).hex().upper()
    assert (f"sapid: WARNING: signed {certificate.serial_number:X} for www.example.net: "
            f"sha1 {sha1}, b'-----BEGIN CERTIFICATE-----'" in log
            or f"sha1 {sha1}, -----BEGIN CERTIFICATE-----" in log), log
    # CsrNotAuthedError: 403, as in ssl_api.
    status, reply = daemon.sign(csr, "refused")
    assert (status, reply) == (403, {"error": "not_authorized", "message": "not a customer"})
    # What authorize and the instance see: ssl_api's shapes.
    status, reply = daemon.sign(csr, "report")
    seen = json.loads(reply["message"])
    assert seen == {"names": [[["DNS", "www.example.net"], ["IP Address", "10.0.0.1"]]],
                    "key": seen["key"], "pem": "-----BEGIN CERTIFICATE REQUEST-----"}
    assert len(seen["key"]) == 40
    # An M2Crypto call sapid does not provide: the request fails, the log names the call and
    # what to write in sapid instead, and nothing is signed.
    count = len(daemon.stored())
    status, reply = daemon.sign(csr, "unported")
    assert (status, reply["error"]) == (500, "hook_error"), reply
    assert "M2Crypto X509.set_pubkey is not one of the calls sapid provides" in \
        daemon.output() and "the key is the CSR's" in daemon.output()
    assert len(daemon.stored()) == count
    # Nothing named sapi was installed: the names live in the daemon alone.
    done = run([sys.executable, "-c", "import sapi"], check=False)
    assert done.returncode == 1 and "No module named 'sapi'" in done.stderr


def test_a_broken_ssl_api_package_names_its_file_and_line(daemon_factory, tmp_path):
    hooks = package(tmp_path)
    (hooks / "api.py").write_text(API_PY.replace("class CustomHooks", "class CustomHooks(\n"))
    daemon = daemon_factory(hooks=str(hooks), start=False)
    done = subprocess.run([*sapid_cmd(), "check", "-c", str(daemon.config)], env=sapid_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith(f"sapid: error: {hooks / 'api.py'}:"), done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    daemon.config.write_text(daemon.config.read_text().replace(str(hooks), str(empty)))
    done = subprocess.run([*sapid_cmd(), "check", "-c", str(daemon.config)], env=sapid_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "ca.py and/or api.py" in done.stderr, done.stderr


def sapid_cmd() -> list:
    from conftest import SAPID
    return SAPID


def test_hooks_files_log_under_sapid(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import logging
        import sapid

        log = logging.getLogger(__name__)

        def boot(authority):
            log.info("booted with %s", authority.certificate.subject.rfc4514_string())
            log.warning("a warning")
            print("printed in boot")
        """)
    # As under systemd: standard output a file (here) or the journal's stream, not a terminal.
    daemon = daemon_factory(hooks=str(hooks), env={"PYTHONUNBUFFERED": ""})
    output = daemon.output()                # read while the daemon runs: nothing waits in a buffer
    assert "sapid: INFO: booted with " in output and "sapid: WARNING: a warning" in output, output
    assert "printed in boot\n" in output, output


def test_ca_create_identity_as_in_ssl_apis_readme(tmp_path):
    config = tmp_path / "sapid.conf"
    config.write_text(f"[sapid]\nidentity = {tmp_path / 'identity'}\n")
    tool = Path(sys.executable).parent / "ca_create_identity"
    done = run([str(tool), "-f", "C", "US", "-f", "CN", "ca.net", "-f", "L", "Palm Beach",
                "-v", "10"], env=sapid_env(SAPID_CONFIG=str(config)))
    assert "created CA" in done.stdout
    certificate = x509.load_pem_x509_certificate(
        (tmp_path / "identity" / "ca.cert.pem").read_bytes())
    assert certificate.subject.rfc4514_string() == "L=Palm Beach,CN=ca.net,C=US"
    years = certificate.not_valid_after_utc.year - certificate.not_valid_before_utc.year
    assert years == 10
    assert sorted(os.listdir(tmp_path / "identity")) == [
        "ca.cert.pem", "ca.csr.pem", "ca.private_key.pem", "ca.public_key.pem"]


def test_a_reload_runs_the_package_afresh(daemon_factory, tmp_path):
    import signal
    hooks = package(tmp_path)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    assert daemon.sign(csr, "refused")[1]["message"] == "not a customer"
    (hooks / "helpers.py").write_text('REFUSAL = "not a customer any more"\n')
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    assert daemon.sign(csr, "refused")[1]["message"] == "not a customer any more"
    # A helper others could write is refused, and the hooks in force stay.
    (hooks / "helpers.py").chmod(0o666)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    assert f"{hooks / 'helpers.py'}: writable by group or others" in daemon.output()
    assert daemon.sign(csr, "refused")[1]["message"] == "not a customer any more"


def test_a_single_hooks_file_may_use_ssl_apis_names(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        from sapi.exceptions import CsrNotAuthedError
        from sapi.config.api.signing_hooks_base import SigningHooksBase


        class Old(SigningHooksBase):
            def authorize(self, subject_alt_name_exts):
                raise CsrNotAuthedError(repr(subject_alt_name_exts))


        API_CSR_HOOKS_FACTORY = Old
        """)
    daemon = daemon_factory(hooks=str(hooks))
    status, reply = daemon.sign(make_csr(tmp_path))
    assert (status, reply["message"]) == (403, "[[['DNS', 'device1.example']]]")


def test_the_m2crypto_stand_in_translates_no_ca_powers():
    """What the profile forbids stays forbidden through new_extension: CA:TRUE, keyCertSign,
    cRLSign, OCSPSigning (a delegated responder could vouch for revoked certificates)."""
    for name, value in (("basicConstraints", "CA:TRUE"), ("keyUsage", "keyCertSign"),
                        ("keyUsage", "digitalSignature, cRLSign"),
                        ("extendedKeyUsage", "serverAuth, OCSPSigning"),
                        ("certificatePolicies", "1.2.3")):
        with pytest.raises(sapid.HookError):
            sapid.openssl_extension(name, value)
    usage = sapid.openssl_extension("keyUsage", "digitalSignature, keyEncipherment")
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
