"""The command line besides init: ``sapid sign``, ``sapid check``, configuration errors,
``--version`` and usage; user errors are one line, never a traceback."""

from __future__ import annotations

import re
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import sapid
from conftest import ROOT, SAPID, make_csr, openssl_verify, run, sapid_env, stored, write_hooks

SOURCES = ("CREDENTIALS_DIRECTORY", "CA_PASSPHRASE", "terminal", "systemd-ask-password")


def config_file(folder, identity, name="sapid.conf", **settings):
    settings = {"identity": identity, "state": folder / "state", "hooks": "", **settings}
    lines = [f"{key} = {value}" for key, value in settings.items()]
    path = folder / name
    path.write_text("[sapid]\n" + "\n".join(lines) + "\n")
    return path


def sapid_run(*args, env=None, input=""):
    """The real ``sapid`` command; stdin is never a terminal unless a test says so."""
    return run([*SAPID, *map(str, args)], env=env or sapid_env(), input=input, check=False)


def no_passphrase_env(**extra):
    env = sapid_env(**extra)
    env.pop("CA_PASSPHRASE")
    return env


def one_error(done, *needles, code=1):
    """Exit ``code``; stderr has exactly one ``sapid: error:`` line (log lines aside), no
    traceback; the line holds every needle."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    errors = [l for l in done.stderr.splitlines() if l.startswith("sapid: error: ")]
    others = [l for l in done.stderr.splitlines() if not l.startswith("sapid: error: ")]
    assert len(errors) == 1, done.stderr
    assert all(re.match(r"sapid: (INFO|WARNING): ", l) for l in others), done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def records(state):
    """(serial, client id, PEM) of each certificate in the store, in the order added."""
    return [(row["serial"], row["client_id"], row["certificate"].public_bytes(
        serialization.Encoding.PEM).decode()) for row in stored(state)]


# sapid sign --------------------------------------------------------------------------------

def test_sign_prints_a_certificate_that_verifies(identities, tmp_path):
    ca = identities("p256")
    config = config_file(tmp_path, ca)
    csr = make_csr(tmp_path, "p256", subject="/CN=offline1", sans="DNS:offline1.example")
    done = sapid_run("sign", "-c", config, csr)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    pem = done.stdout
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
    assert pem.endswith("-----END CERTIFICATE-----\n") and pem.count("BEGIN") == 1
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(pem)
    accepted = openssl_verify(ca / "ca.cert.pem", leaf)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # The twin: another CA does not vouch for it; an altered copy fails against the right one.
    assert openssl_verify(identities("p384") / "ca.cert.pem", leaf).returncode != 0
    certificate = x509.load_pem_x509_certificate(pem.encode())
    der = bytearray(certificate.tbs_certificate_bytes)
    name = b"offline1"
    at = bytes(der).index(name)
    whole = bytearray(certificate.public_bytes(serialization.Encoding.DER))
    offset = bytes(whole).index(bytes(der))
    whole[offset + at] ^= 0x01
    altered = tmp_path / "altered.der"
    altered.write_bytes(bytes(whole))
    altered_pem = tmp_path / "altered.pem"
    run(["openssl", "x509", "-inform", "DER", "-in", str(altered), "-out", str(altered_pem)])
    assert openssl_verify(ca / "ca.cert.pem", altered_pem).returncode != 0

    assert certificate.subject.rfc4514_string() == "CN=offline1"
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["offline1.example"]


def test_sign_records_the_certificate(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"))
    state = tmp_path / "state"
    printed = []
    for number in (1, 2):
        csr = make_csr(tmp_path, "p256", subject=f"/CN=rec{number}", sans=None, name=f"r{number}")
        done = sapid_run("sign", "-c", config, csr)
        assert done.returncode == 0, done.stderr
        printed.append(done.stdout)
    recorded = records(state)
    serials = []
    for pem in printed:
        certificate = x509.load_pem_x509_certificate(pem.encode())
        serial = run(["openssl", "x509", "-noout", "-serial"], input=pem).stdout.strip()
        serial = serial.removeprefix("serial=")
        assert re.fullmatch(r"(?:[0-9A-F]{2})+", serial)
        assert serial == sapid.serial_hex(certificate.serial_number)
        serials.append(serial)
    # In the order they were signed, each as printed; nothing but these two.
    assert recorded == [(serial, "local", pem) for serial, pem in zip(serials, printed)]


def test_sign_client_id(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"))
    csr = make_csr(tmp_path, "p256")
    done = sapid_run("sign", "-c", config, "--client-id", "rack42unit7", csr)
    assert done.returncode == 0, done.stderr
    journal = records(tmp_path / "state")
    assert [client for _, client, _ in journal] == ["rack42unit7"]
    # An id outside [A-Za-z0-9]{1,128} is refused before anything is signed.
    for bad in ("rack-42", "a" * 129):
        done = sapid_run("sign", "-c", config, "--client-id", bad, csr)
        one_error(done, "--client-id")
    assert records(tmp_path / "state") == journal


def test_sign_reads_stdin(identities, tmp_path):
    ca = identities("ed25519")
    config = config_file(tmp_path, ca)
    csr = make_csr(tmp_path, "rsa2048")
    done = sapid_run("sign", "-c", config, "-", input=csr.read_text())
    assert done.returncode == 0, done.stderr
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(done.stdout)
    assert openssl_verify(ca / "ca.cert.pem", leaf).returncode == 0
    # DER on stdin too, told apart by content.
    der = make_csr(tmp_path, "p256", der=True, name="der")
    done = run([*SAPID, "sign", "-c", str(config), "-"], env=sapid_env(),
               input=der.read_bytes(), check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"-----BEGIN CERTIFICATE-----")
    # The twin: an empty standard input is no CSR.
    done = sapid_run("sign", "-c", config, "-", input="")
    one_error(done, "not_a_csr")
    assert len(records(tmp_path / "state")) == 2


def bad_csr(folder, kind):
    if kind == "garbage":
        path = folder / "garbage.pem"
        path.write_text("-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n"
                        "-----END CERTIFICATE REQUEST-----\n")
        return path, "not_a_csr"
    if kind == "text":
        path = folder / "text.csr"
        path.write_text("hello\n")
        return path, "not_a_csr"
    if kind == "rsa1024":
        return make_csr(folder, "rsa1024"), "key_refused"
    if kind == "bad signature":
        csr = make_csr(folder, "p256", subject="/CN=tampered", name="tampered")
        der = x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER)
        path = folder / "tampered.der"
        path.write_bytes(der.replace(b"tampered", b"tamperee"))
        return path, "bad_csr_signature"
    if kind == "no names":
        return make_csr(folder, "p256", subject="/", sans=None, name="anonymous"), "name_refused"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["garbage", "text", "rsa1024", "bad signature", "no names"])
def test_sign_refuses_a_bad_csr(identities, tmp_path, kind):
    config = config_file(tmp_path, identities("p256"))
    csr, code = bad_csr(tmp_path, kind)
    done = sapid_run("sign", "-c", config, csr)
    one_error(done, code, csr.name)
    assert done.stdout == ""
    assert records(tmp_path / "state") == []


def test_sign_missing_csr_file(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"))
    done = sapid_run("sign", "-c", config, tmp_path / "absent.csr")
    one_error(done, "absent.csr")
    assert done.stdout == ""


def test_sign_without_a_passphrase_source(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"))
    csr = make_csr(tmp_path, "p256")
    done = sapid_run("sign", "-c", config, csr, env=no_passphrase_env())
    one_error(done, *SOURCES)
    assert done.stdout == ""


# sapid check -------------------------------------------------------------------------------

def check_line(done):
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert done.stderr == "", done.stderr
    return lines[0]


def test_check_decrypts_the_key_with_ca_passphrase(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"))
    line = check_line(sapid_run("check", "-c", config))
    assert "key decrypted" in line and "not decrypted" not in line
    assert str(config) in line and ": ok;" in line and "CN=Test CA p256" in line
    # check writes nothing: no state folder appears.
    assert not (tmp_path / "state").exists()


def test_check_without_a_passphrase_source(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"))
    line = check_line(sapid_run("check", "-c", config, env=no_passphrase_env()))
    assert "key not decrypted" in line


def test_check_never_prompts_even_under_systemd(identities, tmp_path):
    """No terminal, $INVOCATION_ID set: check must not run systemd-ask-password, and it says so."""
    config = config_file(tmp_path, identities("p256"))
    line = check_line(sapid_run("check", "-c", config,
                                env=no_passphrase_env(INVOCATION_ID="0123456789abcdef")))
    assert "key not decrypted" in line


def test_check_with_the_systemd_credential(identities, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "passphrase").write_text(sapid_env()["CA_PASSPHRASE"] + "\n")
    config = config_file(tmp_path, identities("p256"))
    line = check_line(sapid_run("check", "-c", config,
                                env=no_passphrase_env(CREDENTIALS_DIRECTORY=str(credentials))))
    assert "key decrypted" in line and "not decrypted" not in line
    # The credential wins over $CA_PASSPHRASE: a wrong credential fails even with the right
    # $CA_PASSPHRASE beside it.
    (credentials / "passphrase").write_text("this is not the passphrase\n")
    done = sapid_run("check", "-c", config,
                     env=sapid_env(CREDENTIALS_DIRECTORY=str(credentials)))
    line = one_error(done, "wrong passphrase")
    assert "this is not the passphrase" not in done.stderr


HOOKS_SEE_ENVIRONMENT = """\
import os

def boot(authority):
    with open({report!r}, "a") as report:
        report.write("%s %s\\n" % ("CA_PASSPHRASE" in os.environ,
                                   os.environ.get("SAPID_TEST_MARK")))
"""


@pytest.mark.parametrize("source", ["environment", "credential"])
def test_ca_passphrase_leaves_the_environment(identities, tmp_path, source):
    """Hooks (and anything they start) never see $CA_PASSPHRASE, whichever source won."""
    report = tmp_path / "environment.txt"
    hooks = write_hooks(tmp_path, HOOKS_SEE_ENVIRONMENT.format(report=str(report)))
    config = config_file(tmp_path, identities("p256"), hooks=hooks)
    extra = {"SAPID_TEST_MARK": "visible"}
    if source == "credential":
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "passphrase").write_text(sapid_env()["CA_PASSPHRASE"])
        extra["CREDENTIALS_DIRECTORY"] = str(credentials)
    line = check_line(sapid_run("check", "-c", config, env=sapid_env(**extra)))
    assert "key decrypted" in line and str(hooks) in line
    # The hook saw the environment (the twin: our marker is there), but not the passphrase.
    assert report.read_text() == "False visible\n"


def test_check_unknown_config_key(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"), validty_days=30)
    done = sapid_run("check", "-c", config)
    one_error(done, "validty_days", "validity_days", str(config.name))
    assert done.stdout == ""
    # The twin: the right spelling passes.
    config = config_file(tmp_path, identities("p256"), validity_days=30)
    check_line(sapid_run("check", "-c", config))


@pytest.mark.parametrize("text, needles", [
    ("[sapid]\nvalidity_days = 0\n", ["validity_days"]),
    ("[sapid]\ntrusted_proxy = perhaps\n", ["trusted_proxy", "perhaps"]),
    ("[sapid]\n[other]\nkey = 1\n", ["[other]"]),
    ("identity = /nowhere\n", ["sapid.conf"]),
    ("[sapid]\nhooks = missing-hooks.py\n", ["missing-hooks.py"]),
])
def test_check_bad_configuration(identities, tmp_path, text, needles):
    config = tmp_path / "sapid.conf"
    text = text.replace("[sapid]\n", f"[sapid]\nidentity = {identities('p256')}\n", 1)
    config.write_text(text)
    done = sapid_run("check", "-c", config)
    one_error(done, *needles)
    assert done.stdout == ""


def test_check_missing_explicit_config(tmp_path):
    done = sapid_run("check", "-c", tmp_path / "absent.conf")
    one_error(done, "absent.conf", "no such configuration file")
    # $SAPID_CONFIG names a file explicitly too.
    done = sapid_run("check", env=sapid_env(SAPID_CONFIG=str(tmp_path / "absent2.conf")))
    one_error(done, "absent2.conf")


def test_sapid_config_environment_is_read(identities, tmp_path):
    """The twin of the missing $SAPID_CONFIG: an existing one is what check loads."""
    config = config_file(tmp_path, identities("p256"))
    line = check_line(sapid_run("check", env=sapid_env(SAPID_CONFIG=str(config))))
    assert str(config) in line and "key decrypted" in line


def test_check_missing_identity(tmp_path):
    config = config_file(tmp_path, tmp_path / "no-identity")
    done = sapid_run("check", "-c", config)
    one_error(done, "no-identity", "sapid init")


def test_check_relative_paths_are_from_the_config_folder(identities, tmp_path):
    shutil.copytree(identities("p256"), tmp_path / "etc" / "identity")
    config = tmp_path / "etc" / "sapid.conf"
    config.write_text("[sapid]\nidentity = identity\nstate = state\nhooks =\n")
    line = check_line(sapid_run("check", "-c", config))
    assert "key decrypted" in line
    config.write_text("[sapid]\nidentity = elsewhere\nhooks =\n")
    one_error(sapid_run("check", "-c", config), str(tmp_path / "etc" / "elsewhere"))


# serve, as far as the command line goes ----------------------------------------------------

def test_serve_without_a_passphrase_source(identities, tmp_path):
    config = config_file(tmp_path, identities("p256"), socket=tmp_path / "s.sock")
    done = run([*SAPID, "serve", "-c", str(config)], env=no_passphrase_env(), input="",
               check=False, timeout=30)
    one_error(done, *SOURCES)
    assert not (tmp_path / "s.sock").exists()


def test_serve_missing_config(tmp_path):
    done = run([*SAPID, "serve", "-c", str(tmp_path / "absent.conf")], env=sapid_env(),
               input="", check=False, timeout=30)
    one_error(done, "absent.conf")


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "8080"])
def test_serve_listen_is_loopback_only(identities, tmp_path, listen):
    config = config_file(tmp_path, identities("p256"), socket=tmp_path / "s.sock")
    done = run([*SAPID, "serve", "-c", str(config), "--listen", listen], env=sapid_env(),
               input="", check=False, timeout=30)
    one_error(done, "--listen")


# --version, usage --------------------------------------------------------------------------

def test_version():
    done = sapid_run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"sapid {sapid.__version__}"
    assert re.fullmatch(r"sapid \d+\.\d+\.\d+", done.stdout.strip())


def test_no_command_is_a_usage_error():
    done = sapid_run()
    assert done.returncode == 2
    assert "usage: sapid" in done.stderr and "COMMAND" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("args", [["frobnicate"], ["init", "-f", "CN"]])
def test_bad_usage_exits_2(args):
    done = sapid_run(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "usage: sapid" in done.stderr and "Traceback" not in done.stderr


def test_help_lists_the_commands():
    done = sapid_run("--help")
    assert done.returncode == 0
    for command in ("init", "serve", "sign", "check"):
        assert command in done.stdout


def test_an_old_cryptography_gets_one_line(tmp_path):
    """Debian 12's own python3 has cryptography 38 (.ci/run installs it): ./sapid under it
    says which version it found and what it needs, in one line, with no traceback."""
    import subprocess
    python = "/usr/bin/python3"
    version = subprocess.run([python, "-c", "import cryptography; print(cryptography.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert int(version.split(".")[0]) < 47, version
    done = subprocess.run([python, str(ROOT / "sapid"), "check"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr == (f"sapid: error: cryptography {version} (from "
                           "/usr/lib/python3/dist-packages/cryptography) is too old: sapid needs "
                           "47 or newer; install sapid in a virtual environment (python3 -m venv "
                           "/opt/sapid && /opt/sapid/bin/pip install .) and run its bin/sapid\n")
