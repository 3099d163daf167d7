"""Hooks (DESIGN.md "Hooks"): loading checked with ``sapid.load_hooks`` itself, then every phase
driven through a real daemon with curl, as operators write hooks files and clients meet them."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

import sapid
from conftest import ROOT, make_csr, openssl_verify, run, save_certificate, write_hooks

BACKDATE = datetime.timedelta(seconds=300)     # backdate_seconds by default
DAY = datetime.timedelta(days=1)


# Helpers ---------------------------------------------------------------------------------------

def marked_line(path: Path, marker: str = "# <-") -> int:
    """The number of the one line of ``path`` that holds ``marker``."""
    numbers = [n for n, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert len(numbers) == 1, f"{marker!r} in {path}: lines {numbers}"
    return numbers[0]


def load_error(path: Path) -> str:
    """The message of the ConfigError that loading ``path`` raises."""
    with pytest.raises(sapid.ConfigError) as caught:
        sapid.load_hooks(str(path))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def certificate_of(reply: dict) -> x509.Certificate:
    return x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())


def public_key_hash(csr_path: Path) -> str:
    """ssl_api's public_key_hash: lower-case hex SHA-1 of the DER SubjectPublicKeyInfo."""
    data = csr_path.read_bytes()
    csr = (x509.load_pem_x509_csr(data) if data.startswith(b"-----")
           else x509.load_der_x509_csr(data))
    return hashlib.sha1(csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def issued(daemon) -> dict:
    """SERIAL -> client id of each certificate in the daemon's store."""
    return {row["serial"]: row["client_id"] for row in daemon.stored()}


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def refused_start(daemon, timeout=15.0) -> str:
    """Start ``daemon`` expecting it to exit non-zero without ever being ready; its output."""
    daemon.start(wait=False)
    try:
        code = daemon.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"sapid kept running:\n{daemon.output()}") from None
    output = daemon.output()
    assert code != 0, output
    assert not os.path.exists(daemon.socket), "a refused start left a socket behind"
    return output


# Loading: sapid.load_hooks ---------------------------------------------------------------------
# Each broken file marks with "# <-" the line its error must name.

LOAD_ERRORS = {  # what is wrong: (source, what the error says)
    "syntax error": ("""\
        import sapid

        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names)   # <-
                return None
        """, "syntax error"),
    "method autorize": ("""\
        import sapid

        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                pass

            def autorize(self, subject_alt_names):   # <-
                return False
        """, "'authorize'"),
    "SERIAL_NUMBER_CB": ("""\
        import secrets

        SERIAL_NUMBER_CB = lambda: secrets.randbits(120)   # <-
        """, "'SERIAL_NUMBER_CB' is not a hook name"),
    "serial_numbr": ("""\
        import secrets


        def serial_numbr():   # <-
            return secrets.randbits(120)
        """, "did you mean 'serial_number'"),
    "authorize without argument": ("""\
        import sapid

        class Hooks(sapid.SigningHooks):
            def authorize(self):   # <-
                return None
        """, "Hooks.authorize must take"),
    "serial_number with argument": ("""\
        import secrets

        def serial_number(bits):   # <-
            return secrets.randbits(bits)
        """, "serial_number must take 0"),
    "Hooks not a SigningHooks": ("""\
        import sapid

        class Hooks:   # <-
            def authorize(self, subject_alt_names):
                return None
        """, "subclass of sapid.SigningHooks"),
    "exception at import": ("""\
        import os

        HERE = os.path.dirname(os.path.abspath(__file__))
        ALLOWED = set(open(os.path.join(HERE, "clients.allow")).read().split())   # <-
        """, "FileNotFoundError"),
    "exception in a helper at import": ("""\
        def read_policy():
            raise ValueError("policy file is empty")   # <-

        POLICY = read_policy()
        """, "ValueError: policy file is empty"),
    "sys.exit at import": ("""\
        import sys

        sys.exit("hooks: no database configured")   # <-
        """, "SystemExit"),
    "serial_number returning 0": ("""\
        def serial_number():   # <-
            return 0
        """, "serial_number returned 0"),
    "serial_number returning a negative number": ("""\
        import secrets

        def serial_number():   # <-
            return -1 - secrets.randbits(64)
        """, "serial_number returned -"),
    "serial_number returning a float": ("""\
        import secrets

        def serial_number():   # <-
            return float(1 + secrets.randbits(64))
        """, "float"),
}


@pytest.mark.parametrize("source, expected", list(LOAD_ERRORS.values()),
                         ids=list(LOAD_ERRORS))
def test_load_error_names_file_and_line(tmp_path, source, expected):
    path = write_hooks(tmp_path, source)
    message = load_error(path)
    assert message.startswith(f"{path}:{marked_line(path)}: "), message
    assert expected in message, message


VALID_HOOKS = """\
    import datetime
    import secrets

    import sapid

    # Helper classes, functions and constants are the file's own business.
    ALLOWED_DOMAINS = ("devices.example.com", "lab.example.com")
    MAX_VALIDITY = datetime.timedelta(days=30)
    SERIAL_NUMBER_BITS = 64
    SERIAL_PREFIX = 0x5A


    class Policy:
        def allows(self, name):
            return name.value.endswith(ALLOWED_DOMAINS)


    def in_policy(names):
        return all(Policy().allows(name) for name in names)


    class BaseHooks(sapid.SigningHooks):
        def _refuse(self, why):
            raise sapid.NotAuthorized(why)


    class Hooks(BaseHooks):
        def authorize(self, subject_alt_names):
            if not in_policy(subject_alt_names):
                self._refuse("outside the allowed domains")
            return MAX_VALIDITY

        def postsign(self, certificate):
            pass


    def serial_number():
        return SERIAL_PREFIX << SERIAL_NUMBER_BITS | secrets.randbits(SERIAL_NUMBER_BITS)
    """


def test_valid_hooks_load_with_their_helpers(tmp_path):
    hooks = sapid.load_hooks(str(write_hooks(tmp_path, VALID_HOOKS)))
    assert hooks.path == str(tmp_path / "hooks.py")
    # The phases the file overrides run its code; the others stay built in.
    assert {"authorize", "postsign"} <= hooks.custom
    assert "presign" not in hooks.custom and "boot" not in hooks.custom
    assert hooks.boot is sapid.boot
    assert hooks.draw_serial() >> 64 == 0x5A
    instance = hooks.new("device1", "00" * 20, None, None)
    assert type(instance).__name__ == "Hooks" and isinstance(instance, sapid.SigningHooks)
    assert instance.authorize([x509.DNSName("a.devices.example.com")]) == DAY * 30
    with pytest.raises(sapid.NotAuthorized):
        instance.authorize([x509.DNSName("a.example.org")])
    # The negative twin: without a hooks file, nothing is custom.
    assert sapid.load_hooks(None).custom == frozenset()


def test_ssl_api_helper_class_is_not_a_near_miss(tmp_path):
    """ssl_api files name their class as they like and hand it over through the factory."""
    path = write_hooks(tmp_path, """\
        import sapid

        class MyHooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                return False

        API_CSR_HOOKS_FACTORY = lambda client_hash, public_key_hash, csr_tuple: MyHooks(
            client_hash, public_key_hash, csr_tuple)
        """)
    hooks = sapid.load_hooks(str(path))
    instance = hooks.new("device1", "00" * 20, None, None)
    assert type(instance).__name__ == "MyHooks" and instance.authorize([]) is False
    # Its twin: a misspelt Hooks class that nothing uses is refused.
    path = write_hooks(tmp_path, """\
        import sapid

        class Hoooks(sapid.SigningHooks):   # <-
            def authorize(self, subject_alt_names):
                return False
        """, name="misspelt.py")
    message = load_error(path)
    assert message.startswith(f"{path}:{marked_line(path)}: ") and "'Hooks'" in message, message


MINIMAL_HOOKS = """\
    import sapid

    class Hooks(sapid.SigningHooks):
        def authorize(self, subject_alt_names):
            return None
    """


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_writable_hooks_file_is_refused(tmp_path, mode):
    path = write_hooks(tmp_path, MINIMAL_HOOKS)
    path.chmod(mode)
    message = load_error(path)
    assert message.startswith(f"{path}: ") and "writable by group or others" in message
    path.chmod(0o644)           # the negative twin
    assert sapid.load_hooks(str(path)).path == str(path)


def test_symlinked_hooks_file_is_refused(tmp_path):
    real = write_hooks(tmp_path, MINIMAL_HOOKS)
    link = tmp_path / "link.py"
    link.symlink_to(real)
    message = load_error(link)
    assert message.startswith(f"{link}: ") and "symbolic link" in message
    assert sapid.load_hooks(str(real)).path == str(real)


@pytest.mark.parametrize("case", ["near miss", "group-writable"])
def test_daemon_refuses_to_start_with_a_broken_hooks_file(daemon_factory, tmp_path, case):
    if case == "near miss":
        path = write_hooks(tmp_path, LOAD_ERRORS["method autorize"][0])
    else:
        path = write_hooks(tmp_path, MINIMAL_HOOKS)
        path.chmod(0o664)
    output = refused_start(daemon_factory(hooks=str(path), start=False))
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sapid: error: "), output
    if case == "near miss":
        assert f"{path}:{marked_line(path)}: " in lines[0] and "'authorize'" in lines[0], output
    else:
        assert f"{path}: " in lines[0] and "writable by group" in lines[0], output


# Refusals and failures -------------------------------------------------------------------------

def test_authorize_refuses(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import datetime
        import sapid

        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_id == "banned":
                    raise sapid.NotAuthorized("client banned is on the deny list")
                if self.client_id == "unknown":
                    return False
                if self.client_id == "confused":
                    return "yes"
                if self.client_id == "backwards":
                    return datetime.timedelta(days=-1)
                return None
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    status, reply = daemon.sign(csr, "banned")
    assert (status, reply) == (403, {"error": "not_authorized",
                                     "message": "client banned is on the deny list"})
    status, reply = daemon.sign(csr, "unknown")
    assert status == 403 and reply["error"] == "not_authorized" and reply["message"], reply
    # Anything but None, a positive timedelta or False is the hook's own failure.
    for client in ("confused", "backwards"):
        status, reply = daemon.sign(csr, client)
        assert (status, reply["error"]) == (500, "hook_error"), reply
    assert issued(daemon) == {}
    # The negative twin: another client is signed.
    status, reply = daemon.sign(csr, "device1")
    assert status == 200, reply
    assert issued(daemon) == {reply["serial"]: "device1"}
    assert 'outcome=refused client_id="banned"' in daemon.output()


@pytest.mark.parametrize("phase", ["authorize", "presign", "postsign"])
def test_crashing_hook_is_a_hook_error(daemon_factory, tmp_path, phase):
    hooks = write_hooks(tmp_path, f"""\
        import sapid

        class Hooks(sapid.SigningHooks):
            def {phase}(self, value):
                if self.client_id == "crash":
                    raise RuntimeError("the inventory password is hunter2")
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    status, reply = daemon.sign(csr, "device1")
    assert status == 200, reply
    assert "Traceback" not in daemon.output()
    before = set(issued(daemon))

    status, reply, head = daemon.curl("/api/csr/crash", "PUT", csr)
    assert status == 500 and head.startswith("HTTP/1.1 500"), reply
    assert set(reply) == {"error", "message"} and reply["error"] == "hook_error", reply
    for secret in ("hunter2", "RuntimeError", "Traceback", str(hooks)):
        assert secret not in json.dumps(reply), reply
    log = daemon.output()
    assert "Traceback (most recent call last)" in log and \
        "RuntimeError: the inventory password is hunter2" in log, log

    rows = {row["serial"]: row for row in daemon.stored()}
    added = set(rows) - before
    if phase == "postsign":
        # Signed and recorded before postsign ran: withheld from the client, not lost.
        assert len(added) == 1, added
        serial = added.pop()
        assert rows[serial]["client_id"] == "crash"
        assert 'outcome=withheld client_id="crash"' in log and serial in log
        withheld = rows[serial]["certificate"]
        assert withheld.public_key() == x509.load_pem_x509_csr(csr.read_bytes()).public_key()
    else:
        assert added == set() and "crash" not in issued(daemon).values()
    # The daemon goes on signing.
    status, reply = daemon.sign(csr, "device2")
    assert status == 200, reply
    assert reply["serial"] in issued(daemon)


def test_hook_calling_sys_exit_is_a_hook_error(daemon_factory, tmp_path):
    """Operator code may call sys.exit(); that must neither hang the client nor the daemon."""
    hooks = write_hooks(tmp_path, """\
        import sys
        import sapid

        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_id == "quit":
                    sys.exit("inventory unreachable")
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    done = run(["curl", "-sS", "--max-time", "5", "--unix-socket", daemon.socket, "-X", "PUT",
                "--data-binary", f"@{csr}", "-w", "\n%{http_code}", "http://sapid/api/csr/quit"],
               check=False)
    assert done.returncode == 0, f"no answer within 5 s: {done.stderr}"
    body, _, status = done.stdout.rpartition("\n")
    assert status == "500" and json.loads(body)["error"] == "hook_error", done.stdout
    status, reply = daemon.sign(csr, "device1")
    assert status == 200, reply
    assert daemon.stop(timeout=5) == 0, daemon.output()


def test_hook_timeout(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import os
        import time
        import sapid

        HERE = os.path.dirname(os.path.abspath(__file__))

        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                if self.client_id == "slow":
                    time.sleep(5)
                    open(os.path.join(HERE, "presign-returned"), "w").close()

            def postsign(self, certificate):
                if self.client_id == "slowpost":
                    time.sleep(3)
        """)
    daemon = daemon_factory(hooks=str(hooks), hook_timeout=1)
    csr = make_csr(tmp_path)
    answers = {}

    def slow():
        started = time.monotonic()
        answers["slow"] = (*daemon.sign(csr, "slow"), time.monotonic() - started)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.3)
    # While the hook hangs, the daemon answers others.
    status, health, _ = daemon.curl("/api/health")
    assert status == 200 and health["status"] == "ok", health
    assert "slow" not in answers, "the health check waited for the hung hook"
    thread.join(10)
    assert "slow" in answers, "no answer to the request whose hook hangs"
    status, reply, elapsed = answers["slow"]
    assert (status, reply["error"]) == (503, "hook_timeout"), reply
    assert 0.9 < elapsed < 2.5, elapsed
    # The hook cannot be interrupted; when it returns at last, its draft is discarded.
    wait_for_file(tmp_path / "presign-returned", 8)
    time.sleep(0.3)
    assert issued(daemon) == {}

    # In postsign, the certificate is withheld and stays in the records.
    started = time.monotonic()
    status, reply = daemon.sign(csr, "slowpost")
    assert (status, reply["error"]) == (503, "hook_timeout") and time.monotonic() - started < 2.5
    assert list(issued(daemon).values()) == ["slowpost"]
    # The negative twin: a client whose hooks return in time.
    status, reply = daemon.sign(csr, "fast")
    assert status == 200, reply
    assert sorted(issued(daemon).values()) == ["fast", "slowpost"]


# What hooks decide and change ------------------------------------------------------------------

def test_presign_edits_and_postsign_sees_the_final_certificate(daemon_factory, tmp_path):
    daemon = daemon_factory(hooks=str(tmp_path / "hooks.py"), start=False)
    write_hooks(tmp_path, f"""\
        import json
        import os
        import sqlite3
        import sapid
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

        HERE = os.path.dirname(os.path.abspath(__file__))
        STATE = {str(daemon.state)!r}

        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                if self.client_id != "edited":
                    return
                draft.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                    [x509.UniformResourceIdentifier("http://crl.example/ca.crl")], None, None,
                    None)]), critical=False)
                draft.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier("http://ocsp.example"))]), critical=False)
                draft.add_extension(x509.CertificatePolicies([x509.PolicyInformation(
                    x509.ObjectIdentifier("2.23.140.1.2.1"), None)]), critical=True)
                # Replaces the default, critical, basicConstraints.
                draft.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                    critical=False)
                draft.remove_extension(ExtensionOID.EXTENDED_KEY_USAGE)
                draft.remove_extension(ExtensionOID.NAME_CONSTRAINTS)   # absent: no-op

            def postsign(self, certificate):
                serial = format(certificate.serial_number, "X")
                serial = "0" * (len(serial) % 2) + serial
                seen = {{
                    "is_certificate": isinstance(certificate, x509.Certificate),
                    "serial": serial,
                    "sha256": certificate.fingerprint(hashes.SHA256()).hex(),
                    "recorded": sqlite3.connect(os.path.join(STATE, "sapid.db")).execute(
                        "SELECT count(*) FROM certificates WHERE serial = ?", (serial,)
                    ).fetchone()[0] == 1,
                    "extensions": sorted(e.oid.dotted_string for e in certificate.extensions),
                }}
                with open(os.path.join(HERE, f"postsign-{{self.client_id}}.json"), "w") as f:
                    json.dump(seen, f)
        """)
    daemon.start()
    ca = daemon.ca_pem()
    found = {}
    for client in ("edited", "plain"):
        csr = make_csr(tmp_path, name=client)
        status, reply = daemon.sign(csr, client)
        assert status == 200, reply
        found[client] = certificate_of(reply)
        assert openssl_verify(ca, save_certificate(tmp_path, reply, f"{client}.pem")
                              ).returncode == 0
        seen = json.loads((tmp_path / f"postsign-{client}.json").read_text())
        assert seen == {
            "is_certificate": True, "serial": reply["serial"],
            "sha256": reply["sha256_fingerprint"], "recorded": True,
            "extensions": sorted(e.oid.dotted_string for e in found[client].extensions)}, seen

    edited, plain = found["edited"].extensions, found["plain"].extensions
    crl = edited.get_extension_for_class(x509.CRLDistributionPoints)
    assert not crl.critical
    assert crl.value[0].full_name == [x509.UniformResourceIdentifier("http://crl.example/ca.crl")]
    aia = edited.get_extension_for_class(x509.AuthorityInformationAccess)
    assert not aia.critical and aia.value[0].access_method == AuthorityInformationAccessOID.OCSP
    assert edited.get_extension_for_class(x509.CertificatePolicies).critical
    basic = edited.get_extension_for_class(x509.BasicConstraints)
    assert not basic.critical and not basic.value.ca
    assert [e.oid for e in edited].count(ExtensionOID.BASIC_CONSTRAINTS) == 1
    with pytest.raises(x509.ExtensionNotFound):
        edited.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE)
    # The negative twin: a certificate presign left alone has the default profile.
    assert plain.get_extension_for_class(x509.BasicConstraints).critical
    assert plain.get_extension_for_class(x509.ExtendedKeyUsage)
    for kind in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess,
                 x509.CertificatePolicies):
        with pytest.raises(x509.ExtensionNotFound):
            plain.get_extension_for_class(kind)


def test_validity_from_authorize_and_custom_serial_numbers(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import datetime
        import secrets
        import sapid

        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_id.startswith("short"):
                    return datetime.timedelta(days=3)
                return None

        def serial_number():
            return 0x5A9D << 128 | secrets.randbits(128)
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    serials = []
    for client, validity in (("short1", 3 * DAY), ("device1", 365 * DAY)):
        status, reply = daemon.sign(csr, client)
        assert status == 200, reply
        certificate = certificate_of(reply)
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        assert lifetime == validity + BACKDATE, (client, lifetime)
        shown = [datetime.datetime.strptime(reply[k], "%Y-%m-%dT%H:%M:%SZ")
                 for k in ("not_before", "not_after")]
        assert shown[1] - shown[0] == validity + BACKDATE
        assert re.fullmatch(r"5A9D[0-9A-F]{32}", reply["serial"]), reply["serial"]
        assert certificate.serial_number == int(reply["serial"], 16)
        assert issued(daemon)[reply["serial"]] == client
        serials.append(reply["serial"])
    # The hook is called per certificate, not once.
    assert serials[0] != serials[1]


def test_boot_sees_the_ca_and_raising_refuses_the_start(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import json
        import os

        HERE = os.path.dirname(os.path.abspath(__file__))


        def boot(authority):
            with open(os.path.join(HERE, "booted.json"), "w") as file:
                json.dump({"subject": authority.certificate.subject.rfc4514_string(),
                           "chain": len(authority.chain),
                           "validity_days": authority.config.validity_days,
                           "sees_a_key": any("key" in name.lower() for name in dir(authority))},
                          file)
            if authority.config.validity_days > 90:
                raise RuntimeError("certificates over 90 days are against policy")   # <-
        """)
    output = refused_start(daemon_factory(hooks=str(hooks), start=False))
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0] == (f"sapid: error: {hooks}:{marked_line(hooks)}: boot refused: "
                        "RuntimeError: certificates over 90 days are against policy"), output
    # The negative twin: a configuration the boot hook accepts starts and signs.
    daemon = daemon_factory(hooks=str(hooks), validity_days=90)
    status, reply = daemon.sign(make_csr(tmp_path))
    assert status == 200, reply
    booted = json.loads((tmp_path / "booted.json").read_text())
    ca = x509.load_pem_x509_certificate((daemon.identity / "ca.cert.pem").read_bytes())
    assert booted == {"subject": ca.subject.rfc4514_string(), "chain": 0, "validity_days": 90,
                      "sees_a_key": False}, booted


# What hooks see ----------------------------------------------------------------------------------

SEEING_HOOKS = """\
    import json
    import sapid
    from cryptography import x509


    class Hooks(sapid.SigningHooks):
        def authorize(self, subject_alt_names):
            try:
                self.headers["x-test"] = "changed"
                writable = True
            except TypeError:
                writable = False
            seen = {
                "client_id": self.client_id,
                "client_hash": self.client_hash,
                "public_key_hash": self.public_key_hash,
                "csr_is_a_csr": isinstance(self.csr, x509.CertificateSigningRequest),
                "csr_subject": self.csr.subject.rfc4514_string(),
                "csr_pem": self.csr_pem,
                "peer_is_a_tuple": isinstance(self.peer, tuple),
                "peer": self.peer,
                "x_test": [self.headers.get("X-Test"), self.headers.get("x-test"),
                           self.headers.get("X-TEST"), "X-tEsT" in self.headers],
                "absent": self.headers.get("X-Not-Sent"),
                "forwarded_for": self.headers.get("X-Forwarded-For"),
                "ssl_client": self.headers.get("X-SSL-Client-S-DN"),
                "headers_writable": writable,
                "sans": [name.value for name in subject_alt_names],
            }
            raise sapid.NotAuthorized(json.dumps(seen))
    """

PROXY_HEADERS = {"X-Test": "hello", "X-Forwarded-For": "203.0.113.7",
                 "X-SSL-Client-S-DN": "CN=laptop,O=Example"}


def seen_by_hooks(daemon, csr: Path, client_id: str) -> dict:
    status, reply, _ = daemon.curl(f"/api/csr/{client_id}", "PUT", csr, headers=PROXY_HEADERS)
    assert status == 403 and reply["error"] == "not_authorized", reply
    return json.loads(reply["message"])


def test_instance_attributes(daemon_factory, tmp_path):
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, SEEING_HOOKS)))
    pem = make_csr(tmp_path, subject="/CN=sensor7", sans="DNS:sensor7.example,DNS:s7.example")
    seen = seen_by_hooks(daemon, pem, "Sensor7")
    assert seen["client_id"] == seen["client_hash"] == "Sensor7"
    assert seen["public_key_hash"] == public_key_hash(pem)
    assert re.fullmatch(r"[0-9a-f]{40}", seen["public_key_hash"])
    assert seen["csr_is_a_csr"] and seen["csr_subject"] == "CN=sensor7"
    assert seen["csr_pem"] == pem.read_text()
    assert seen["sans"] == ["sensor7.example", "s7.example"]
    assert seen["peer_is_a_tuple"] and len(seen["peer"]) == 3
    pid, uid, gid = seen["peer"]
    assert uid == os.getuid() and gid == os.getgid()
    assert pid > 0 and pid not in (os.getpid(), daemon.process.pid)
    assert seen["x_test"] == ["hello", "hello", "hello", True]
    assert seen["absent"] is None and seen["headers_writable"] is False
    # Proxy headers are hidden: without trusted_proxy, a client could forge them.
    assert seen["forwarded_for"] is None and seen["ssl_client"] is None

    # Another key, sent in DER: its own hash, and csr_pem is still PEM.
    der = make_csr(tmp_path, subject="/CN=sensor8", sans="DNS:sensor8.example", der=True,
                   name="der")
    seen = seen_by_hooks(daemon, der, "Sensor8")
    assert seen["public_key_hash"] == public_key_hash(der) != public_key_hash(pem)
    assert seen["csr_pem"].startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    assert x509.load_pem_x509_csr(seen["csr_pem"].encode()).public_bytes(
        serialization.Encoding.DER) == der.read_bytes()


def test_proxy_headers_reach_hooks_only_behind_a_trusted_proxy(daemon_factory, tmp_path):
    hooks = str(write_hooks(tmp_path, SEEING_HOOKS))
    csr = make_csr(tmp_path)
    seen = seen_by_hooks(daemon_factory(hooks=hooks, trusted_proxy="yes"), csr, "device1")
    assert seen["forwarded_for"] == "203.0.113.7"
    assert seen["ssl_client"] == "CN=laptop,O=Example"
    assert seen["x_test"][0] == "hello" and seen["headers_writable"] is False
    seen = seen_by_hooks(daemon_factory(hooks=hooks, trusted_proxy="no"), csr, "device1")
    assert seen["forwarded_for"] is None and seen["ssl_client"] is None
    assert seen["x_test"][0] == "hello"


# ssl_api hooks files ---------------------------------------------------------------------------

def test_ssl_api_names(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import os
        import secrets
        import sapid

        HERE = os.path.dirname(os.path.abspath(__file__))


        class MyHooks(sapid.SigningHooks):
            def __init__(self, client_hash, public_key_hash, csr_tuple):
                super().__init__(client_hash, public_key_hash, csr_tuple)
                self.given = (client_hash, public_key_hash, csr_tuple)

            def authorize(self, subject_alt_names):
                # ssl_api's CsrTuple(csr_m, csr_o, csr_pem), in the order its code made it.
                client_hash, key_hash, (csr, _, pem) = self.given
                assert pem is self.given[2].csr_pem
                if client_hash == "stranger":
                    raise sapid.NotAuthorized(
                        f"{client_hash} {key_hash} {csr.subject.rfc4514_string()} "
                        f"{pem == self.csr_pem}")
                return None


        API_CSR_HOOKS_FACTORY = lambda client_hash, public_key_hash, csr_tuple: MyHooks(
            client_hash, public_key_hash, csr_tuple)


        def CUSTOM_BOOT_CB():
            with open(os.path.join(HERE, "booted"), "a") as file:
                file.write("booted\\n")


        def SERIAL_NUMBER_GENERATOR_CB():
            # ssl_api's shape: 40 hex digits, the top bit set, so 160 bits.
            return "F0CACC1A" + secrets.token_hex(16)
        """)
    daemon = daemon_factory(hooks=str(hooks))
    assert (tmp_path / "booted").read_text().startswith("booted\n")
    csr = make_csr(tmp_path)
    status, reply = daemon.sign(csr, "device1")
    assert status == 200, reply
    # Masked to 159 bits: the top bit of F0 is gone, the rest is the generator's.
    assert re.fullmatch(r"70CACC1A[0-9A-F]{32}", reply["serial"]), reply["serial"]
    assert certificate_of(reply).serial_number < 2 ** 159
    status, reply = daemon.sign(csr, "stranger")
    assert (status, reply) == (403, {
        "error": "not_authorized",
        "message": f"stranger {public_key_hash(csr)} CN=device1 True"}), reply


def test_ssl_api_hooks_factory_alias(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, """\
        import sapid


        class Gatekeeper(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_hash != "device1":
                    raise sapid.NotAuthorized("only device1 here")
                return None


        HOOKS_FACTORY = Gatekeeper
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    assert daemon.sign(csr, "device2") == (403, {"error": "not_authorized",
                                                 "message": "only device1 here"})
    status, reply = daemon.sign(csr, "device1")
    assert status == 200, reply


# The shipped example -------------------------------------------------------------------------

def test_example_hooks(daemon_factory, tmp_path):
    source = (ROOT / "examples" / "hooks.py").read_text()
    etc = tmp_path / "etc"
    etc.mkdir()
    hooks = write_hooks(etc, source)
    (etc / "clients.allow").write_text("# enrolled devices\nsensor42\nlab7   # bench 3\n")
    daemon = daemon_factory(hooks=str(hooks), trusted_proxy="yes")

    def csr(name, sans=None):
        return make_csr(tmp_path, subject=f"/CN={name}", sans=sans or f"DNS:{name}", name=name)

    allowed = csr("sensor42.devices.example.com")
    status, reply = daemon.sign(allowed, "sensor42")
    assert status == 200, reply
    certificate = certificate_of(reply)
    own = reply["serial"]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == 365 * DAY + BACKDATE
    assert f"issued serial {reply['serial']} to client sensor42" in daemon.output()
    assert "hooks: 2 enrolled clients" in daemon.output()
    # A lab device gets a week.
    status, reply = daemon.sign(csr("probe.lab.example.com"), "lab7")
    assert status == 200, reply
    certificate = certificate_of(reply)
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == 7 * DAY + BACKDATE

    # Refused: a client that is not enrolled, names outside the domains, a smuggled common name.
    refusals = [
        (allowed, "intruder", "not enrolled"),
        (csr("sensor42.example.org"), "sensor42", "outside"),
        (csr("devices.example.com"), "sensor42", "outside"),
        (csr("x.devices.example.com", "DNS:*.devices.example.com"), "sensor42", "wildcard"),
        (csr("y.devices.example.com", "DNS:y.devices.example.com,IP:192.0.2.1"), "sensor42",
         "DNS names only"),
        (csr("www.bank.example", "DNS:z.devices.example.com"), "sensor42", "common name"),
    ]
    count = len(issued(daemon))
    for path, client, why in refusals:
        status, reply = daemon.sign(path, client)
        assert status == 403 and reply["error"] == "not_authorized", (client, reply)
        assert why in reply["message"], reply
    assert len(issued(daemon)) == count == 2

    # A device revokes the certificate it shows (as nginx verified it), nothing else.
    def revoke(client, serial, shown=None, verify="SUCCESS"):
        headers = {"Content-Type": "application/json"}
        if shown:
            headers.update({"X-SSL-Client-Verify": verify, "X-SSL-Client-Serial": shown})
        return daemon.curl(f"/api/revoke/{client}", "POST",
                           json.dumps({"serial": serial, "reason": "keyCompromise"}).encode(),
                           headers)[:2]
    lab_serial, = [serial for serial, client in issued(daemon).items() if client == "lab7"]
    status, reply = revoke("sensor42", lab_serial, shown=own)
    assert (status, reply["message"]) == (403, "a client may revoke only the certificate it "
                                                "shows")
    status, reply = revoke("sensor42", own)
    assert status == 403 and "TLS client certificate" in reply["message"]
    status, reply = revoke("sensor42", own, shown=own, verify="FAILED:certificate revoked")
    assert status == 403
    status, reply = revoke("intruder", own, shown=own)
    assert status == 403 and "not enrolled" in reply["message"]
    status, reply = revoke("lab7", own, shown=own)          # its certificate, another's id
    assert status == 403
    status, reply = revoke("sensor42", own, shown=own.lstrip("0"))
    assert status == 200 and reply["revocation_reason"] == "keyCompromise", reply
    assert [row["serial"] for row in daemon.stored() if row["revoked_at"]] == [own]

    # Without its client list, the example refuses the start, saying which file is missing.
    bare = tmp_path / "bare"
    bare.mkdir()
    output = refused_start(daemon_factory(hooks=str(write_hooks(bare, source)), start=False))
    assert output.startswith(f"sapid: error: {bare / 'hooks.py'}:") and \
        f"No such file or directory: '{bare / 'clients.allow'}'" in output, output


def test_fast_hooks_share_threads_slow_hooks_get_more(daemon_factory, tmp_path):
    """Hook calls run on hook threads while the reading thread signs: fast hooks share one or
    two threads (each thread woken costs a hand-off of the GIL); hooks that take their time
    get a thread each, up to max_threads, so that none waits for another's."""
    hooks = write_hooks(tmp_path, """\
        import time
        import sapid

        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                if self.client_id.startswith("slow"):
                    time.sleep(0.5)
        """)
    daemon = daemon_factory(hooks=str(hooks), max_threads=16)
    csr = make_csr(tmp_path)

    def threads() -> int:
        return len(os.listdir(f"/proc/{daemon.process.pid}/task"))

    before = threads()
    sys.path.insert(0, str(ROOT / "bench"))
    import loadgen
    target = loadgen.SapidTarget(str(daemon.socket))
    result = loadgen.run_load(target, target.requests(loadgen.make_pool("p256", 16)), 16, 30.0,
                              400)
    assert [record[2] for record in result.records] == [200] * 400
    fast = threads() - before
    assert fast <= 3, f"{fast} threads started for hooks that return at once"
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda n: daemon.sign(csr, f"slow{n}"), range(8)))
    assert all(status == 200 for status, _ in replies), replies[:2]
    # Eight half-second hooks one after the other would take 4 s.
    assert time.monotonic() - started < 2.5
    assert threads() - before >= 6


def test_a_taken_serial_is_drawn_again_through_the_hook(daemon_factory, tmp_path):
    """serial_number repeating itself: the signing whose serial is taken asks the hook again
    (on a hook thread) and gets the next one; one that only ever draws taken serials gets
    503 store_failed, audited, and nothing is recorded twice."""
    hooks = write_hooks(tmp_path, """\
        import itertools

        # The first value is the one drawn at load, to check the hook.
        DRAWS = itertools.chain([1, 0x0A, 0x0A, 0x0B], itertools.repeat(0x0C))

        def serial_number():
            return next(DRAWS)
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    serials = []
    for client in ("first", "second", "third"):
        status, reply = daemon.sign(csr, client)
        assert status == 200, reply
        serials.append(reply["serial"])
    assert serials == ["0A", "0B", "0C"]
    status, reply = daemon.sign(csr, "fourth")
    assert (status, reply["error"]) == (503, "store_failed"), reply
    assert issued(daemon) == {"0A": "first", "0B": "second", "0C": "third"}
    log = daemon.output()
    assert log.count("drawing another") == 1 + 7, log     # second once, fourth 7 times
    assert re.search(r'audit outcome=refused client_id="fourth" .*code="store_failed"', log), log


def test_a_hook_raising_what_is_no_exception_is_a_hook_error(daemon_factory, tmp_path):
    """KeyboardInterrupt, asyncio's CancelledError, GeneratorExit out of a hook: 500
    hook_error for that request, and the daemon goes on signing."""
    hooks = write_hooks(tmp_path, """\
        import asyncio
        import sapid

        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_id == "interrupt":
                    raise KeyboardInterrupt
                if self.client_id == "cancelled":
                    raise asyncio.CancelledError()
            def postsign(self, certificate):
                if self.client_id == "exit":
                    raise GeneratorExit
        """)
    daemon = daemon_factory(hooks=str(hooks))
    csr = make_csr(tmp_path)
    for client in ("interrupt", "cancelled", "exit"):
        status, reply = daemon.sign(csr, client)
        assert (status, reply["error"]) == (500, "hook_error"), (client, reply)
        status, reply = daemon.sign(csr, "fine")
        assert status == 200, reply
    assert daemon.process.poll() is None


def test_a_hook_past_its_timeout_never_signs(daemon_factory, tmp_path):
    """A presign that returns just after hook_timeout: 503 hook_timeout every time, never a
    certificate, whatever the moment the reading thread next looks."""
    hooks = write_hooks(tmp_path, """\
        import time
        import sapid

        class Hooks(sapid.SigningHooks):
            def presign(self, draft):
                time.sleep(0.4)
        """)
    daemon = daemon_factory(hooks=str(hooks), hook_timeout=0.3)
    csr = make_csr(tmp_path)
    for number in range(4):
        started = time.monotonic()
        status, reply = daemon.sign(csr, f"late{number}")
        assert (status, reply.get("error")) == (503, "hook_timeout"), reply
        assert time.monotonic() - started < 2
    time.sleep(0.5)
    assert issued(daemon) == {}


def test_a_hook_call_answered_before_it_ran_does_not_run(daemon_factory, tmp_path):
    """One hook thread, held 3 s by a hanging authorize: the request queued behind it gets
    its 503 at the timeout, and its authorize never runs afterwards."""
    hooks = write_hooks(tmp_path, """\
        import os
        import time
        import sapid

        HERE = os.path.dirname(os.path.abspath(__file__))

        class Hooks(sapid.SigningHooks):
            def authorize(self, subject_alt_names):
                if self.client_id == "hang":
                    time.sleep(3)
                else:
                    open(os.path.join(HERE, f"ran-{self.client_id}"), "w").close()
        """)
    daemon = daemon_factory(hooks=str(hooks), hook_timeout=1, max_threads=1)
    csr = make_csr(tmp_path)
    hanging = threading.Thread(target=daemon.sign, args=(csr, "hang"))
    hanging.start()
    time.sleep(0.3)
    status, reply = daemon.sign(csr, "queued")
    assert (status, reply["error"]) == (503, "hook_timeout"), reply
    hanging.join(10)
    time.sleep(3)
    assert not (tmp_path / "ran-queued").exists(), "a timed-out call ran after its 503"
    status, reply = daemon.sign(csr, "after")
    assert status == 200 and (tmp_path / "ran-after").exists(), reply
