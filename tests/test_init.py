"""``sapid init``: the CA identity it writes, checked with openssl, and what it refuses."""

from __future__ import annotations

import datetime
import os
import re
import select
import stat
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

import sapid
from conftest import PASSPHRASE, SAPID, make_identity, run, sapid_env

FILES = ("ca.private_key.pem", "ca.cert.pem", "ca.csr.pem", "ca.public_key.pem")
SOURCES = ("CREDENTIALS_DIRECTORY", "CA_PASSPHRASE", "terminal", "systemd-ask-password")


def init(folder, *args, env=None, umask=None, fields=("CN", "Test CA")):
    """Run ``sapid init -d folder``; stdin is never a terminal here."""
    command = [*SAPID, "init", "-d", str(folder), *args]
    for name, value in zip(fields[::2], fields[1::2]):
        command += ["-f", name, value]
    if umask is not None:
        command = ["sh", "-c", f'umask {umask}; exec "$@"', "sh", *command]
    return run(command, env=env or sapid_env(), input="", check=False)


def assert_one_error(done, *needles):
    """Exit 1 and exactly one line ``sapid: error: ...`` on stderr, no traceback."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sapid: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def env_without_passphrase(**extra):
    env = sapid_env(**extra)
    env.pop("CA_PASSPHRASE")
    return env


def certificate(folder) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "ca.cert.pem").read_bytes())


def kdf_parameters(key_file) -> dict:
    """What ``openssl asn1parse`` shows of an encrypted PKCS#8 key's PBES2 parameters."""
    shown = run(["openssl", "asn1parse", "-in", str(key_file)]).stdout
    objects = re.findall(r"prim: OBJECT\s+:(\S+)", shown)
    integers = re.findall(r"prim: INTEGER\s+:([0-9A-F]+)", shown)
    return {"objects": objects, "iterations": int(integers[0], 16) if integers else None}


def public_der(path, *, private=False, env=None) -> bytes:
    """A key file's SubjectPublicKeyInfo in DER, as openssl reads it."""
    args = ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"]
    args += ["-passin", "env:CA_PASSPHRASE"] if private else ["-pubin"]
    done = subprocess.run(args, env=env or sapid_env(), capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def snapshot(folder):
    """Each file's bytes, modification time and mode."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns,
                        stat.S_IMODE(path.stat().st_mode))
            for path in sorted(folder.iterdir())}


# The files and their modes -----------------------------------------------------------------

@pytest.mark.parametrize("umask", ["000", "077"])
def test_writes_four_files_with_explicit_modes(tmp_path, umask):
    folder = tmp_path / "identity"
    folder.mkdir()
    folder.chmod(0o777)             # an existing folder gets 0750 too
    done = init(folder, umask=umask)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"ca.private_key.pem": 0o640, "ca.cert.pem": 0o644, "ca.csr.pem": 0o644,
                     "ca.public_key.pem": 0o644}
    # What it prints is the certificate's fingerprint.
    cert = certificate(folder)
    assert cert.fingerprint(hashes.SHA256()).hex() in done.stdout
    assert "Traceback" not in done.stderr


def test_creates_a_missing_folder_with_its_parents(tmp_path):
    folder = tmp_path / "a" / "b" / "identity"
    done = init(folder)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


def test_folder_defaults_to_the_configured_identity(tmp_path):
    config = tmp_path / "sapid.conf"
    config.write_text("[sapid]\nidentity = configured\n")
    done = run([*SAPID, "init", "-c", str(config), "-f", "CN", "Configured CA"],
               env=sapid_env(), input="", check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "configured" / "ca.cert.pem").exists()
    # The twin: a configuration that does not exist is an error, not a silent default.
    done = run([*SAPID, "init", "-c", str(tmp_path / "missing.conf"), "-f", "CN", "x"],
               env=sapid_env(), input="", check=False)
    assert_one_error(done, "missing.conf")


# Never overwrite ---------------------------------------------------------------------------

def test_refuses_to_overwrite_an_identity(tmp_path):
    folder = make_identity(tmp_path / "identity")
    before = snapshot(folder)
    time.sleep(0.01)
    done = init(folder, fields=("CN", "Another CA"))
    assert_one_error(done, "exists", str(folder))
    assert snapshot(folder) == before


@pytest.mark.parametrize("existing", [*FILES, "ca.crt.pem"])
def test_refuses_when_any_one_file_exists(tmp_path, existing):
    folder = tmp_path / "identity"
    folder.mkdir()
    (folder / existing).write_text("the operator's own file\n")
    done = init(folder)
    assert_one_error(done, existing, "exists")
    assert [p.name for p in folder.iterdir()] == [existing]
    assert (folder / existing).read_text() == "the operator's own file\n"


def test_refuses_a_dangling_symlink_too(tmp_path):
    folder = tmp_path / "identity"
    folder.mkdir()
    target = tmp_path / "elsewhere.pem"
    (folder / "ca.private_key.pem").symlink_to(target)
    done = init(folder)
    assert_one_error(done, "ca.private_key.pem")
    assert not target.exists()


def test_refuses_next_to_an_ssl_api_identity(tmp_path):
    """ssl_api named its certificate ca.crt.pem: sapid must not add a second CA beside it."""
    folder = tmp_path / "identity"
    folder.mkdir()
    (folder / "ca.crt.pem").write_text("ssl_api certificate\n")
    (folder / "ca.private_key.pem").write_text("ssl_api key\n")
    before = snapshot(folder)
    assert_one_error(init(folder), "exists")
    assert snapshot(folder) == before


# Each key type -----------------------------------------------------------------------------

KEY_TYPES = {
    "p256": (ec.EllipticCurvePublicKey, "ecdsa-with-SHA256", hashes.SHA256),
    "p384": (ec.EllipticCurvePublicKey, "ecdsa-with-SHA384", hashes.SHA384),
    "rsa2048": (rsa.RSAPublicKey, "sha256WithRSAEncryption", hashes.SHA256),
    "rsa3072": (rsa.RSAPublicKey, "sha256WithRSAEncryption", hashes.SHA256),
    "ed25519": (ed25519.Ed25519PublicKey, "ED25519", None),
    "rsa4096": (rsa.RSAPublicKey, "sha256WithRSAEncryption", hashes.SHA256),
}


@pytest.mark.parametrize("key", list(KEY_TYPES))
def test_key_type_gives_a_self_signed_ca(identities, tmp_path, key):
    folder = identities(key)
    other = identities("p384" if key == "p256" else "p256")
    cert_path = folder / "ca.cert.pem"
    key_class, algorithm, digest = KEY_TYPES[key]

    # openssl accepts it as its own trust anchor; another CA does not vouch for it.
    accepted = run(["openssl", "verify", "-CAfile", str(cert_path), str(cert_path)], check=False)
    assert accepted.returncode == 0 and ": OK" in accepted.stdout, accepted.stderr
    refused = run(["openssl", "verify", "-CAfile", str(other / "ca.cert.pem"), str(cert_path)],
                  check=False)
    assert refused.returncode != 0

    cert = certificate(folder)
    assert cert.issuer == cert.subject
    extensions = cert.extensions
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    flags = {name: getattr(usage.value, name) for name in (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign")}
    assert flags == {"digital_signature": False, "content_commitment": False,
                     "key_encipherment": False, "data_encipherment": False,
                     "key_agreement": False, "key_cert_sign": True, "crl_sign": True}
    shown = run(["openssl", "x509", "-in", str(cert_path), "-noout", "-ext",
                 "basicConstraints,keyUsage,subjectKeyIdentifier"]).stdout
    assert re.search(r"Basic Constraints: critical\s+CA:TRUE", shown), shown
    assert re.search(r"Key Usage: critical\s+Certificate Sign, CRL Sign\n", shown), shown
    ski = extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())

    # Signature hash: SHA-384 for P-384 (and only there), none for Ed25519.
    text = run(["openssl", "x509", "-in", str(cert_path), "-noout", "-text"]).stdout
    assert f"Signature Algorithm: {algorithm}" in text
    if digest is None:
        assert cert.signature_hash_algorithm is None
    else:
        assert isinstance(cert.signature_hash_algorithm, digest)

    # Default validity: 10 years.
    years = cert.not_valid_after_utc.year - cert.not_valid_before_utc.year
    assert years == 10
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.timezone.utc)

    # The key: PBES2 with PBKDF2-HMAC-SHA256 x 600,000 and AES-256-CBC, opened by openssl.
    key_file = folder / "ca.private_key.pem"
    assert key_file.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    kdf = kdf_parameters(key_file)
    assert kdf["objects"][:3] == ["PBES2", "PBKDF2", "hmacWithSHA256"]
    assert "aes-256-cbc" in kdf["objects"]
    assert kdf["iterations"] == 600_000
    key_der = public_der(key_file, private=True)
    assert isinstance(cert.public_key(), key_class)

    # The certificate, the CSR and the public key file all hold that key.
    cert_der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert_der == key_der
    assert public_der(folder / "ca.public_key.pem") == key_der
    assert public_der(other / "ca.public_key.pem") != key_der

    csr_path = folder / "ca.csr.pem"
    verified = run(["openssl", "req", "-in", str(csr_path), "-noout", "-verify"], check=False)
    assert verified.returncode == 0, verified.stderr
    assert "verify OK" in verified.stdout + verified.stderr
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject == cert.subject
    assert csr.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) == key_der
    other_csr = x509.load_pem_x509_csr((other / "ca.csr.pem").read_bytes())
    assert other_csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != key_der


def test_key_does_not_open_with_another_passphrase(identities):
    """The twin of ``openssl pkey -passin`` opening the key: it is the passphrase that does."""
    key_file = identities("p256") / "ca.private_key.pem"
    wrong = subprocess.run(["openssl", "pkey", "-in", str(key_file), "-passin",
                            "env:CA_PASSPHRASE", "-noout"],
                           env=sapid_env(CA_PASSPHRASE="not the passphrase"), capture_output=True,
                           check=False)
    assert wrong.returncode != 0
    private = serialization.load_pem_private_key(key_file.read_bytes(), PASSPHRASE.encode())
    assert isinstance(private, ec.EllipticCurvePrivateKey)


def test_an_altered_csr_fails_openssl_verification(identities, tmp_path):
    """The twin of the CSR check above: openssl does notice a CSR whose subject was changed."""
    pem = (identities("p256") / "ca.csr.pem").read_bytes()
    csr = x509.load_pem_x509_csr(pem)
    der = csr.public_bytes(serialization.Encoding.DER)
    name = b"Test CA p256"
    assert der.count(name) == 1
    altered = tmp_path / "altered.der"
    altered.write_bytes(der.replace(name, b"Test CA p257"))
    done = run(["openssl", "req", "-inform", "DER", "-in", str(altered), "-noout", "-verify"],
               check=False)
    # OpenSSL 3.0 exits 0 either way: what it says is the verdict.
    shown = done.stdout + done.stderr
    assert "verify failure" in shown and "verify OK" not in shown


# Subject and validity ----------------------------------------------------------------------

SUBJECT = ("C", "DE", "ST", "Berlin", "L", "Berlin", "O", "Acme GmbH", "OU", "Operations",
           "CN", "Acme Device CA", "emailAddress", "pki@acme.example")


def test_subject_fields_keep_their_order(tmp_path):
    forward = tmp_path / "forward"
    assert init(forward, fields=SUBJECT).returncode == 0
    pairs = list(zip(SUBJECT[::2], SUBJECT[1::2]))
    reverse_fields = tuple(item for pair in reversed(pairs) for item in pair)
    backward = tmp_path / "backward"
    assert init(backward, fields=reverse_fields).returncode == 0

    for folder, order in ((forward, pairs), (backward, list(reversed(pairs)))):
        cert = certificate(folder)
        csr = x509.load_pem_x509_csr((folder / "ca.csr.pem").read_bytes())
        expected = [(name, value) for name, value in order]
        got = [(attribute.oid, attribute.value) for attribute in cert.subject]
        assert got == [(sapid.NAME_FIELDS[name], value) for name, value in expected]
        assert all(len(rdn) == 1 for rdn in cert.subject.rdns)
        assert csr.subject == cert.subject
        shown = run(["openssl", "x509", "-in", str(folder / "ca.cert.pem"), "-noout",
                     "-subject", "-nameopt", "compat"]).stdout.strip()
        assert shown == "subject=" + "".join(f"/{n}={v}" for n, v in expected)
    # The order is part of the name: the two CAs have different subjects.
    assert certificate(forward).subject != certificate(backward).subject
    assert certificate(forward).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "Acme Device CA"


def test_validity_years(tmp_path):
    done = init(tmp_path / "three", "-v", "3")
    assert done.returncode == 0, done.stderr
    cert = certificate(tmp_path / "three")
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now
    assert now - cert.not_valid_before_utc < datetime.timedelta(hours=1)
    lifetime = cert.not_valid_after_utc - now
    assert datetime.timedelta(days=3 * 365 - 1) < lifetime < datetime.timedelta(days=3 * 366 + 1)
    shown = run(["openssl", "x509", "-in", str(tmp_path / "three" / "ca.cert.pem"), "-noout",
                 "-enddate"]).stdout
    assert str(now.year + 3) in shown
    # A CA valid for less than a year is refused, and nothing is written.
    done = init(tmp_path / "zero", "-v", "0")
    assert_one_error(done, "-v 0")
    assert not (tmp_path / "zero").exists()


def test_validity_beyond_year_9999_is_a_user_error(tmp_path):
    """X.509 times end in 9999: a typo like -v 8000 must give one line, not a traceback."""
    folder = tmp_path / "identity"
    done = init(folder, "-v", "8000")
    assert_one_error(done, "-v 8000")
    assert not folder.exists() or not any(folder.iterdir())


# Refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("passphrase", ["elevenchars", "ééééééééééé", "elevenchars\n"])
def test_short_passphrase_refused(tmp_path, passphrase):
    folder = tmp_path / "identity"
    done = init(folder, env=sapid_env(CA_PASSPHRASE=passphrase))
    assert_one_error(done, "12")
    assert not folder.exists() or not any(folder.iterdir())


def test_passphrase_that_is_not_utf8_is_a_user_error(tmp_path):
    """$CA_PASSPHRASE holding bytes that are not UTF-8 (Python sees surrogates) is refused in
    one line, before anything is written."""
    folder = tmp_path / "identity"
    done = init(folder, env=sapid_env(CA_PASSPHRASE="correct horse \udcff battery"))
    line = assert_one_error(done)
    assert "utf-8" in line.lower()
    assert not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("passphrase", ["éééééééééééé", "twelve chars\n"])
def test_twelve_characters_accepted(tmp_path, passphrase):
    folder = tmp_path / "identity"
    done = init(folder, env=sapid_env(CA_PASSPHRASE=passphrase))
    assert done.returncode == 0, done.stderr
    # The key opens with the passphrase as UTF-8, less one trailing newline.
    key = (folder / "ca.private_key.pem").read_bytes()
    serialization.load_pem_private_key(key, passphrase.rstrip("\n").encode("utf-8"))
    if passphrase.endswith("\n"):
        with pytest.raises(ValueError):
            serialization.load_pem_private_key(key, passphrase.encode("utf-8"))


def test_unknown_field_refused(tmp_path):
    folder = tmp_path / "identity"
    done = init(folder, fields=("CN", "Test CA", "XYZ", "value"))
    assert_one_error(done, "XYZ")
    assert not folder.exists()


def test_bad_field_value_refused(tmp_path):
    """A country name is two letters; cryptography's ValueError becomes one line."""
    folder = tmp_path / "identity"
    done = init(folder, fields=("CN", "Test CA", "C", "Germany"))
    assert_one_error(done, "-f C")
    assert not folder.exists()


def test_no_field_refused(tmp_path):
    folder = tmp_path / "identity"
    done = init(folder, fields=())
    assert_one_error(done, "-f CN")
    assert not folder.exists()


def test_unknown_key_type_refused(tmp_path):
    done = init(tmp_path / "identity", "--key", "rsa1024")
    assert done.returncode == 2 and "invalid choice" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "identity").exists()


def test_no_passphrase_source(tmp_path):
    folder = tmp_path / "identity"
    done = init(folder, env=env_without_passphrase())
    line = assert_one_error(done, *SOURCES)
    assert "passphrase" in line
    assert not folder.exists() or not any(folder.iterdir())


def test_credential_passphrase_wins(tmp_path):
    """The systemd credential is the first source; $CA_PASSPHRASE loses to it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "passphrase").write_text("from the credential\n")
    folder = tmp_path / "identity"
    done = init(folder, env=sapid_env(CREDENTIALS_DIRECTORY=str(credentials)))
    assert done.returncode == 0, done.stderr
    key = (folder / "ca.private_key.pem").read_bytes()
    serialization.load_pem_private_key(key, b"from the credential")
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(key, PASSPHRASE.encode())


# The terminal asks twice -------------------------------------------------------------------

def init_on_terminal(folder, answers, timeout=30.0):
    """Run ``sapid init`` with a pseudo-terminal as its controlling terminal (``setsid -c``
    makes standard input that terminal); answer its prompts."""
    master, slave = os.openpty()
    process = subprocess.Popen(
        ["setsid", "-c", *SAPID, "init", "-d", str(folder), "-f", "CN", "Terminal CA"],
        env=env_without_passphrase(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:         # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            prompts = seen.count(b"passphrase: ") + seen.count(b"Again: ")
            if pending and prompts > len(answers) - len(pending):
                os.write(master, pending.pop(0).encode() + b"\n")
            if process.poll() is not None and not ready:
                break
        code = process.wait(max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, seen.decode(errors="replace")


def test_terminal_asks_twice(tmp_path):
    folder = tmp_path / "identity"
    code, shown = init_on_terminal(folder, ["typed on a terminal", "typed on a terminal"])
    assert code == 0, shown
    assert "passphrase: " in shown and "Again: " in shown
    assert "typed on a terminal" not in shown          # no echo
    key = (folder / "ca.private_key.pem").read_bytes()
    serialization.load_pem_private_key(key, b"typed on a terminal")


def test_terminal_answers_that_differ_are_refused(tmp_path):
    folder = tmp_path / "identity"
    code, shown = init_on_terminal(folder, ["typed on a terminal", "typed on a terminal!"])
    assert code == 1, shown
    assert "sapid: error:" in shown and "differ" in shown and "Traceback" not in shown
    assert not folder.exists() or not any(folder.iterdir())
