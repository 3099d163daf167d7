"""CA identities made by operators with openssl: what sapid adopts (``sapid check``, a real
daemon that signs) and what it refuses to start with, one line each."""

from __future__ import annotations

import datetime
import re
import shlex
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import (PASSPHRASE, SAPID, make_csr, make_identity, openssl_verify, run,
                      sapid_env, save_certificate)

# Extension sections for ``openssl req -x509`` and ``openssl x509 -req``; nothing comes from
# the system's openssl.cnf.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[sub_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[not_ca]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyCertSign
subjectKeyIdentifier = hash
[no_key_usage]
basicConstraints = critical, CA:TRUE
subjectKeyIdentifier = hash
[no_cert_sign]
basicConstraints = critical, CA:TRUE
keyUsage = critical, digitalSignature, cRLSign
subjectKeyIdentifier = hash
"""

PASS_OUT = ["-passout", "env:CA_PASSPHRASE"]
PASS_IN = ["-passin", "env:CA_PASSPHRASE"]


def openssl(*args, env=None):
    return run(["openssl", *map(str, args)], env=env or sapid_env())


def cnf(folder):
    path = folder / "openssl.cnf"
    if not path.exists():
        path.write_text(OPENSSL_CNF)
    return path


def write_key(path, kind):
    """An encrypted CA key as operators make them with openssl (passphrase PASSPHRASE)."""
    plain = path.with_name(path.name + ".plain")
    if kind == "rsa2048-pkcs8":
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-aes-256-cbc", "-pass", "env:CA_PASSPHRASE", "-out", path)
    elif kind == "ed25519-pkcs8":
        openssl("genpkey", "-algorithm", "ed25519", "-aes-256-cbc", "-pass", "env:CA_PASSPHRASE",
                "-out", path)
    elif kind == "p256-pkcs8":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-aes-256-cbc", "-pass", "env:CA_PASSPHRASE", "-out", path)
    elif kind in ("p521-pkcs8", "ed448-pkcs8", "dsa-pkcs8"):
        algorithm = {"p521-pkcs8": ["EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
                     "ed448-pkcs8": ["ed448"],
                     "dsa-pkcs8": ["DSA", "-pkeyopt", "dsa_paramgen_bits:2048"]}[kind]
        if kind == "dsa-pkcs8":
            openssl("genpkey", "-genparam", "-algorithm", *algorithm, "-out", plain)
            openssl("genpkey", "-paramfile", plain, "-aes-256-cbc", "-pass", "env:CA_PASSPHRASE",
                    "-out", path)
        else:
            openssl("genpkey", "-algorithm", *algorithm, "-aes-256-cbc", "-pass",
                    "env:CA_PASSPHRASE", "-out", path)
    elif kind == "rsa2048-traditional":
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", plain)
        openssl("rsa", "-in", plain, "-aes256", "-traditional", *PASS_OUT, "-out", path)
    elif kind == "p256-traditional":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                plain)
        openssl("ec", "-in", plain, "-aes256", *PASS_OUT, "-out", path)
    elif kind == "p256-plain":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                path)
    else:
        raise ValueError(kind)
    plain.unlink(missing_ok=True)
    path.chmod(0o640)
    return path


def operator_ca(folder, kind="p256-pkcs8", section="ca", cert_name="ca.cert.pem",
                subject=None):
    """An identity folder made with openssl alone: encrypted key and self-signed certificate."""
    folder.mkdir(parents=True)
    folder.chmod(0o750)
    key = write_key(folder / "ca.private_key.pem", kind)
    openssl("req", "-x509", "-new", "-key", key, *PASS_IN, "-subj",
            subject or f"/O=Operator/CN=Operator CA {kind}", "-days", "30",
            "-config", cnf(folder.parent), "-extensions", section,
            "-out", folder / cert_name)
    return folder


def load_key(folder):
    return serialization.load_pem_private_key((folder / "ca.private_key.pem").read_bytes(),
                                              PASSPHRASE.encode())


def write_certificate_with_dates(folder, not_before, not_after):
    """Replace the folder's certificate by one for the same key with the given dates."""
    key = load_key(folder)
    old = x509.load_pem_x509_certificate((folder / "ca.cert.pem").read_bytes())
    builder = x509.CertificateBuilder(
        issuer_name=old.subject, subject_name=old.subject, public_key=key.public_key(),
        serial_number=x509.random_serial_number(), not_valid_before=not_before,
        not_valid_after=not_after, extensions=list(old.extensions))
    cert = builder.sign(key, old.signature_hash_algorithm)
    (folder / "ca.cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_config(folder, identity, **settings):
    path = folder / "check.conf"
    lines = [f"identity = {identity}", f"state = {folder / 'check-state'}", "hooks ="]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path.write_text("[sapid]\n" + "\n".join(lines) + "\n")
    return path


def check(folder, identity, env=None):
    """``sapid check`` on a configuration that names ``identity``; stdin is not a terminal."""
    return run([*SAPID, "check", "-c", str(write_config(folder, identity))],
               env=env or sapid_env(), input="", check=False)


def serve_refused(daemon_factory, identity, env=None, timeout=30.0):
    """Start ``sapid serve`` on ``identity``: (exit status, everything it said); it must exit."""
    daemon = daemon_factory(identity=identity, env=env, start=False)
    daemon.start(wait=False)
    try:
        code = daemon.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"sapid serve kept running on {identity}:\n{daemon.output()}")
    ready = [m for m in daemon.messages(timeout=0.1) if "READY=1" in m.split("\n")]
    assert not ready, ready
    return code, daemon.output()


def one_error_line(code, text, *needles):
    assert code == 1, text
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sapid: error: "), text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def check_ok(done, decrypted=True):
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and ": ok;" in lines[0], done.stdout
    if decrypted:
        assert "key decrypted" in lines[0] and "not decrypted" not in lines[0]
    else:
        assert "key not decrypted" in lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


def sign_and_verify(daemon, tmp_path, ca_file, name="leaf"):
    csr = make_csr(tmp_path, "p256", subject=f"/CN={name}", sans=f"DNS:{name}.example",
                   name=name)
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    leaf = save_certificate(tmp_path, reply, f"{name}.pem")
    verified = openssl_verify(ca_file, leaf)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return reply, leaf


# Adoption ----------------------------------------------------------------------------------

ADOPTED = {
    # key as openssl makes it, certificate file name, what the weak-KDF warning says
    "rsa2048-pkcs8": ("rsa2048-pkcs8", "ca.cert.pem", "2,048 PBKDF2 iterations"),
    "rsa2048-traditional": ("rsa2048-traditional", "ca.cert.pem", "legacy key derivation"),
    "p256-traditional": ("p256-traditional", "ca.cert.pem", "legacy key derivation"),
    "ed25519-pkcs8": ("ed25519-pkcs8", "ca.cert.pem", "2,048 PBKDF2 iterations"),
    # Key types `sapid init` does not make: signed with SHA-512 and with Ed448.
    "p521-pkcs8": ("p521-pkcs8", "ca.cert.pem", "2,048 PBKDF2 iterations"),
    "ed448-pkcs8": ("ed448-pkcs8", "ca.cert.pem", "2,048 PBKDF2 iterations"),
    "ssl_api-ca.crt.pem": ("p256-pkcs8", "ca.crt.pem", "2,048 PBKDF2 iterations"),
}


@pytest.mark.parametrize("case", list(ADOPTED))
def test_adopts_operator_made_ca(daemon_factory, identities, tmp_path, case):
    kind, cert_name, warning = ADOPTED[case]
    folder = operator_ca(tmp_path / "identity", kind, cert_name=cert_name)
    cert_file = folder / cert_name
    assert not (folder / ("ca.crt.pem" if cert_name == "ca.cert.pem" else "ca.cert.pem")).exists()

    done = check(tmp_path, folder)
    assert "Operator CA" in check_ok(done)
    # openssl's default PBKDF2 cost (2,048) and traditional PEM are accepted, with a warning.
    assert warning in done.stderr

    daemon = daemon_factory(identity=folder)
    reply, leaf = sign_and_verify(daemon, tmp_path, cert_file)
    assert reply["ca_x509_pem"] == cert_file.read_text()
    assert warning in daemon.output()
    assert "re-wrap" in daemon.output() and "-iter 600000" in daemon.output()
    # The negative twin: a CA that did not sign it does not vouch for it.
    failed = openssl_verify(identities("p256") / "ca.cert.pem", leaf)
    assert failed.returncode != 0
    issued = x509.load_pem_x509_certificate(leaf.read_bytes())
    ca = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert issued.issuer == ca.subject
    assert issued.signature_algorithm_oid == SIGNED_WITH[kind.split("-")[0]]


SIGNED_WITH = {"rsa2048": x509.SignatureAlgorithmOID.RSA_WITH_SHA256,
               "p256": x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256,
               "p521": x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512,
               "ed25519": x509.SignatureAlgorithmOID.ED25519,
               "ed448": x509.SignatureAlgorithmOID.ED448}


REWRAPPED = {
    "pbkdf2-sha256-600000": ["-v2", "aes-256-cbc", "-iter", "600000"],
    "scrypt": ["-scrypt"],
}


@pytest.mark.parametrize("how", list(REWRAPPED))
def test_strong_kdf_gives_no_warning(tmp_path, how):
    """The twin of the weak-KDF warning: the documented re-wrap (or scrypt) silences it."""
    folder = operator_ca(tmp_path / "identity", "p256-pkcs8")
    key = folder / "ca.private_key.pem"
    openssl("pkcs8", "-topk8", *REWRAPPED[how], "-in", key, *PASS_IN, *PASS_OUT,
            "-out", folder / "rewrapped.pem")
    shutil.move(folder / "rewrapped.pem", key)
    key.chmod(0o640)
    done = check(tmp_path, folder)
    check_ok(done)
    assert done.stderr == ""


def test_sha1_prf_is_weak_too(tmp_path):
    """DESIGN asks for PBKDF2-*SHA256*: 600,000 rounds of HMAC-SHA1 (the PRF that PBES2 keys
    get when none is named, e.g. by OpenSSL 1.0) deserve the same warning as 2,048 rounds."""
    folder = operator_ca(tmp_path / "identity", "p256-pkcs8")
    key = folder / "ca.private_key.pem"
    openssl("pkcs8", "-topk8", "-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA1", "-iter", "600000",
            "-in", key, *PASS_IN, *PASS_OUT, "-out", folder / "sha1.pem")
    assert "hmacWithSHA256" not in openssl("asn1parse", "-in", folder / "sha1.pem").stdout
    shutil.move(folder / "sha1.pem", key)
    key.chmod(0o640)
    done = check(tmp_path, folder)
    check_ok(done)
    assert "SHA1" in done.stderr.replace("-", "") and "re-wrap" in done.stderr, done.stderr


def test_ca_cert_pem_wins_over_ca_crt_pem(tmp_path):
    """With both names present, ca.cert.pem is the one sapid uses."""
    folder = operator_ca(tmp_path / "identity", "p256-pkcs8", subject="/CN=Named cert")
    other = operator_ca(tmp_path / "other", "p256-pkcs8", subject="/CN=Named crt")
    shutil.copy(other / "ca.cert.pem", folder / "ca.crt.pem")
    line = check_ok(check(tmp_path, folder))
    assert "CN=Named cert" in line and "Named crt" not in line


def test_ca_without_key_usage_is_adopted(identities, tmp_path):
    """openssl's stock v3_ca has no keyUsage; RFC 5280 reads its absence as every use allowed."""
    folder = operator_ca(tmp_path / "identity", section="no_key_usage")
    ca = x509.load_pem_x509_certificate((folder / "ca.cert.pem").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        ca.extensions.get_extension_for_class(x509.KeyUsage)
    check_ok(check(tmp_path, folder))
    csr = make_csr(tmp_path, "p256")
    done = run([*SAPID, "sign", "-c", str(write_config(tmp_path, folder)), str(csr)],
               env=sapid_env(), input="", check=False)
    assert done.returncode == 0, done.stderr
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(done.stdout)
    assert openssl_verify(folder / "ca.cert.pem", leaf).returncode == 0
    assert openssl_verify(identities("p256") / "ca.cert.pem", leaf).returncode != 0


# Refusals: one line, non-zero exit, for check and for serve --------------------------------

def mismatched(tmp_path):
    folder = operator_ca(tmp_path / "identity")
    other = operator_ca(tmp_path / "other")
    shutil.copy(other / "ca.private_key.pem", folder / "ca.private_key.pem")
    return folder


def expired(tmp_path):
    folder = operator_ca(tmp_path / "identity")
    now = datetime.datetime.now(datetime.timezone.utc)
    write_certificate_with_dates(folder, now - datetime.timedelta(days=60),
                                 now - datetime.timedelta(days=1))
    return folder


def not_yet_valid(tmp_path):
    folder = operator_ca(tmp_path / "identity")
    now = datetime.datetime.now(datetime.timezone.utc)
    write_certificate_with_dates(folder, now + datetime.timedelta(days=1),
                                 now + datetime.timedelta(days=60))
    return folder


def with_key_mode(mode):
    def make(tmp_path):
        folder = operator_ca(tmp_path / "identity")
        (folder / "ca.private_key.pem").chmod(mode)
        return folder
    return make


def unencrypted(tmp_path):
    folder = operator_ca(tmp_path / "identity", "p256-plain")
    assert "ENCRYPTED" not in (folder / "ca.private_key.pem").read_text()
    return folder


REFUSED = {
    "key does not match": (mismatched, ["does not match"]),
    "not a CA": (lambda p: operator_ca(p / "identity", section="not_ca"), ["not a CA"]),
    "no keyCertSign": (lambda p: operator_ca(p / "identity", section="no_cert_sign"),
                       ["keyCertSign"]),
    "expired": (expired, ["not valid now"]),
    "not yet valid": (not_yet_valid, ["not valid now"]),
    "key 0644": (with_key_mode(0o644), ["0644", "chmod 0640"]),
    "key 0660": (with_key_mode(0o660), ["0660", "chmod 0640"]),
    "unencrypted key": (unencrypted, ["not encrypted", "openssl pkcs8"]),
    "DSA key": (lambda p: operator_ca(p / "identity", "dsa-pkcs8"),
                ["DSA key cannot sign certificates", "RSA, EC, Ed25519 or Ed448"]),
}


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_refuses_identity(daemon_factory, tmp_path, case, command):
    make, needles = REFUSED[case]
    folder = make(tmp_path)
    if command == "check":
        done = check(tmp_path, folder)
        assert done.stdout == ""
        code, text = done.returncode, done.stderr
    else:
        code, text = serve_refused(daemon_factory, folder)
    one_error_line(code, text, "ca.", *needles)


@pytest.mark.parametrize("case", ["key 0660", "unencrypted key", "expired"])
def test_check_refuses_without_a_passphrase_too(tmp_path, case):
    """What needs no decryption is checked even when the key stays encrypted."""
    make, needles = REFUSED[case]
    folder = make(tmp_path)
    env = sapid_env()
    env.pop("CA_PASSPHRASE")
    done = check(tmp_path, folder, env=env)
    one_error_line(done.returncode, done.stderr, *needles)


def test_refused_identities_have_working_twins(tmp_path):
    """The same openssl recipe with the right section, mode and key passes: the refusals above
    come from what each case changed."""
    folder = operator_ca(tmp_path / "identity")
    for mode in (0o640, 0o400):
        (folder / "ca.private_key.pem").chmod(mode)
        check_ok(check(tmp_path, folder))


def test_unencrypted_key_fix_from_the_message_works(tmp_path):
    """The command the refusal shows, run as printed (plus -passout for no terminal), fixes it."""
    folder = unencrypted(tmp_path)
    done = check(tmp_path, folder)
    line = one_error_line(done.returncode, done.stderr, "openssl pkcs8")
    command = re.search(r"'(openssl pkcs8 [^']+)'", line).group(1)
    run([*shlex.split(command), *PASS_OUT], env=sapid_env())
    key = folder / "ca.private_key.pem"
    shutil.move(f"{key}.new", key)
    key.chmod(0o640)
    done = check(tmp_path, folder)
    check_ok(done)
    assert done.stderr == ""          # 600,000 iterations: no weak-KDF warning either


def wrong_passphrase(key_file, padding_collision=False) -> str:
    """A wrong passphrase for ``key_file``.

    With CBC a wrong passphrase decrypts to noise whose padding is still valid about once in
    170 tries; the key parser then fails instead of the decryption.  ``padding_collision`` picks
    such a passphrase on purpose; otherwise one that fails the ordinary way, so that the tests
    below do not depend on the salt that openssl drew.
    """
    pem = key_file.read_bytes()
    for attempt in range(20000):
        candidate = f"Tr0ub4dor&3 is not it {attempt}"
        try:
            serialization.load_pem_private_key(pem, candidate.encode())
        except ValueError as e:
            if ("Incorrect password" in str(e)) != padding_collision:
                return candidate
    raise AssertionError("no suitable wrong passphrase found")


@pytest.mark.parametrize("command, kind", [
    ("check", "p256-pkcs8"), ("check", "rsa2048-traditional"), ("check", "p256-traditional"),
    ("serve", "p256-pkcs8"), ("serve", "p256-traditional"),
])
def test_wrong_passphrase(daemon_factory, tmp_path, command, kind):
    folder = operator_ca(tmp_path / "identity", kind)
    wrong = wrong_passphrase(folder / "ca.private_key.pem")
    if command == "check":
        done = check(tmp_path, folder, env=sapid_env(CA_PASSPHRASE=wrong))
        code, text = done.returncode, done.stdout + done.stderr
    else:
        code, text = serve_refused(daemon_factory, folder, env={"CA_PASSPHRASE": wrong})
    one_error_line(code, text, "wrong passphrase", "ca.private_key.pem")
    assert wrong not in text and PASSPHRASE not in text and "Tr0ub4dor" not in text


@pytest.mark.parametrize("kind", ["p256-pkcs8", "p256-traditional"])
def test_wrong_passphrase_whose_padding_happens_to_be_valid(tmp_path, kind):
    """About one wrong passphrase in 170 gets past the CBC padding check; it is still a wrong
    passphrase, and the operator must be told so rather than about ASN.1 lengths."""
    folder = operator_ca(tmp_path / "identity", kind)
    wrong = wrong_passphrase(folder / "ca.private_key.pem", padding_collision=True)
    done = check(tmp_path, folder, env=sapid_env(CA_PASSPHRASE=wrong))
    one_error_line(done.returncode, done.stderr, "wrong passphrase", "ca.private_key.pem")
    assert wrong not in done.stderr and "Tr0ub4dor" not in done.stderr


def test_sapid_init_identity_wrong_passphrase(identities, tmp_path):
    """sapid's own PBES2 key, decrypted by cryptography: the same clear line."""
    folder = identities("p256")
    wrong = wrong_passphrase(folder / "ca.private_key.pem")
    done = check(tmp_path, folder, env=sapid_env(CA_PASSPHRASE=wrong))
    one_error_line(done.returncode, done.stderr, "wrong passphrase")
    assert wrong not in done.stderr and "Tr0ub4dor" not in done.stderr
    # The twin: the right passphrase decrypts it.
    check_ok(check(tmp_path, folder))


def test_missing_identity_files(tmp_path, identities):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = check(tmp_path, empty)
    one_error_line(done.returncode, done.stderr, "ca.cert.pem")
    no_key = tmp_path / "no-key"
    no_key.mkdir()
    shutil.copy(identities("p256") / "ca.cert.pem", no_key)
    done = check(tmp_path, no_key)
    one_error_line(done.returncode, done.stderr, "ca.private_key.pem")
    done = check(tmp_path, tmp_path / "absent")
    one_error_line(done.returncode, done.stderr, "sapid init")


# Subordinate CA ----------------------------------------------------------------------------

def root_ca(folder):
    """A root made with openssl; its key is the test's and stays unencrypted."""
    folder.mkdir()
    write_key(folder / "root.key", "p256-plain")
    openssl("req", "-x509", "-new", "-key", folder / "root.key", "-subj",
            "/O=Operator/CN=Operator Root", "-days", "60", "-config", cnf(folder.parent),
            "-extensions", "ca", "-out", folder / "root.pem")
    return folder / "root.pem", folder / "root.key"


def sign_intermediate(csr, cert_out, root, root_key, folder):
    openssl("x509", "-req", "-in", csr, "-CA", root, "-CAkey", root_key, "-set_serial",
            "0x5A1D0001", "-days", "30", "-extfile", cnf(folder), "-extensions", "sub_ca",
            "-out", cert_out)


def subordinate(tmp_path):
    root, root_key = root_ca(tmp_path / "root")
    folder = tmp_path / "identity"
    folder.mkdir(mode=0o750)
    key = write_key(folder / "ca.private_key.pem", "p256-pkcs8")
    openssl("req", "-new", "-key", key, *PASS_IN, "-subj", "/O=Operator/CN=Operator Issuing CA",
            "-config", cnf(tmp_path), "-out", tmp_path / "intermediate.csr")
    sign_intermediate(tmp_path / "intermediate.csr", folder / "ca.cert.pem", root, root_key,
                      tmp_path)
    shutil.copy(root, folder / "ca.chain.pem")
    return folder, root


def test_subordinate_ca(daemon_factory, tmp_path):
    folder, root = subordinate(tmp_path)
    intermediate = folder / "ca.cert.pem"
    check_ok(check(tmp_path, folder))
    daemon = daemon_factory(identity=folder)
    csr = make_csr(tmp_path, "rsa2048", subject="/CN=leaf", sans="DNS:leaf.example")
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    leaf = save_certificate(tmp_path, reply)

    # The reply's CA part is the intermediate, then the root: issuer first.
    chain = x509.load_pem_x509_certificates(reply["ca_x509_pem"].encode())
    assert chain == [x509.load_pem_x509_certificate(intermediate.read_bytes()),
                     x509.load_pem_x509_certificate(root.read_bytes())]
    assert (daemon.ca_pem().read_text() == reply["ca_x509_pem"])

    accepted = openssl_verify(root, leaf, untrusted=intermediate)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # Without the intermediate there is no path to the root.
    refused = openssl_verify(root, leaf)
    assert refused.returncode != 0
    assert "unable to get local issuer certificate" in refused.stdout + refused.stderr
    # The reply's ca_x509_pem as the untrusted bundle works too (the root trusted separately).
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(reply["ca_x509_pem"])
    assert openssl_verify(root, leaf, untrusted=bundle).returncode == 0
    issued = x509.load_pem_x509_certificate(leaf.read_bytes())
    assert issued.issuer == chain[0].subject


def test_subordinate_from_sapid_init_csr(daemon_factory, tmp_path):
    """The CSR that init writes for a parent CA, signed by a root, makes a working subordinate."""
    root, root_key = root_ca(tmp_path / "root")
    folder = make_identity(tmp_path / "identity", "p256", "O", "Operator", "CN", "Issuing CA")
    signed = tmp_path / "issued-by-root.pem"
    sign_intermediate(folder / "ca.csr.pem", signed, root, root_key, tmp_path)
    shutil.move(signed, folder / "ca.cert.pem")
    shutil.copy(root, folder / "ca.chain.pem")
    check_ok(check(tmp_path, folder))
    daemon = daemon_factory(identity=folder)
    csr = make_csr(tmp_path, "p256")
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    leaf = save_certificate(tmp_path, reply)
    assert openssl_verify(root, leaf, untrusted=folder / "ca.cert.pem").returncode == 0
    assert openssl_verify(root, leaf).returncode != 0


@pytest.mark.parametrize("command, chain", [
    ("check", "unrelated"), ("serve", "unrelated"),
    ("check", "unrelated then root"), ("check", "itself then root"),
])
def test_chain_that_does_not_link_is_refused(daemon_factory, identities, tmp_path, command,
                                             chain):
    folder, root = subordinate(tmp_path)
    unrelated = (identities("p256") / "ca.cert.pem").read_text()
    own = (folder / "ca.cert.pem").read_text()
    (folder / "ca.chain.pem").write_text({
        "unrelated": unrelated,
        "unrelated then root": unrelated + root.read_text(),
        "itself then root": own + root.read_text(),
    }[chain])
    if command == "check":
        done = check(tmp_path, folder)
        code, text = done.returncode, done.stderr
    else:
        code, text = serve_refused(daemon_factory, folder)
    one_error_line(code, text, "ca.chain.pem", "certificate 1")


def test_chain_that_is_not_pem_is_refused(tmp_path):
    folder, _ = subordinate(tmp_path)
    (folder / "ca.chain.pem").write_text("not a certificate\n")
    done = check(tmp_path, folder)
    one_error_line(done.returncode, done.stderr, "ca.chain.pem")


def test_subordinate_chain_in_python_ssl(daemon_factory, tmp_path):
    """A server presenting its sapid certificate with the reply's chain: Python's ssl reaches the
    operator's root; trusting only another root, or without the chain, it does not."""
    import ssl

    from tls import PythonServer, python_client
    folder, root = subordinate(tmp_path)
    daemon = daemon_factory(identity=folder)
    csr = make_csr(tmp_path, "p256", subject="/CN=localhost", sans="DNS:localhost,IP:127.0.0.1",
                   name="server")
    status, reply = daemon.sign(csr)
    assert status == 200, reply
    chain = x509.load_pem_x509_certificates(reply["ca_x509_pem"].encode())
    full = tmp_path / "fullchain.pem"     # leaf + intermediate, as a server sends them
    full.write_text(reply["signed_x509_pem"] + chain[0].public_bytes(
        serialization.Encoding.PEM).decode())
    alone = save_certificate(tmp_path, reply, "alone.pem")

    def server_context(certificate):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, tmp_path / "server.key")
        return context

    def client_context(trusted):
        context = ssl.create_default_context(cafile=str(trusted))
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        return context

    with PythonServer(server_context(full)) as server:
        assert python_client(server.port, client_context(root)) == b"hello\n"
        other_root, _ = root_ca(tmp_path / "other")
        with pytest.raises(ssl.SSLCertVerificationError):
            python_client(server.port, client_context(other_root))
    with PythonServer(server_context(alone)) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            python_client(server.port, client_context(root))
