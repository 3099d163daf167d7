"""Secrets and permissions: symbolic links and foreign owners refused, modes of what sapid writes,
core dumps off, the passphrase and key never in a log or an error."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from conftest import PASSPHRASE, SAPID, make_csr, run, sapid_env, write_hooks

NOBODY = 65534


def copy_identity(identities, tmp_path, key="p256"):
    folder = tmp_path / "identity"
    shutil.copytree(identities(key), folder)
    return folder


def check(config, **env):
    return run([*SAPID, "check", "-c", str(config)], env=sapid_env(**env), check=False)


@pytest.mark.parametrize("name", ["ca.private_key.pem", "ca.cert.pem", "."])
def test_foreign_owner_refused_unless_configured(daemon_factory, identities, tmp_path, name):
    folder = copy_identity(identities, tmp_path)
    os.chown(folder / name, NOBODY, -1)
    daemon = daemon_factory(identity=folder, start=False)
    done = check(daemon.config)
    assert done.returncode == 1 and f"owned by uid {NOBODY}" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
    daemon.config.write_text(daemon.config.read_text() + "strict_files = no\n")
    done = check(daemon.config)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["ca.private_key.pem", "ca.cert.pem"])
def test_symlinked_identity_file_refused_unless_configured(daemon_factory, identities, tmp_path,
                                                           name):
    folder = copy_identity(identities, tmp_path)
    real = tmp_path / f"real-{name}"
    (folder / name).rename(real)
    (folder / name).symlink_to(real)
    daemon = daemon_factory(identity=folder, start=False)
    done = check(daemon.config)
    assert done.returncode == 1 and "symbolic link" in done.stderr, done.stderr
    daemon.config.write_text(daemon.config.read_text() + "strict_files = no\n")
    assert check(daemon.config).returncode == 0


def test_symlinked_or_foreign_hooks_refused(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, "import sapid\n")
    link = tmp_path / "link.py"
    link.symlink_to(hooks)
    daemon = daemon_factory(hooks=str(link), start=False)
    done = check(daemon.config)
    assert done.returncode == 1 and "symbolic link" in done.stderr
    os.chown(hooks, NOBODY, -1)
    daemon.config.write_text(daemon.config.read_text().replace(str(link), str(hooks)))
    done = check(daemon.config)
    assert done.returncode == 1 and f"owned by uid {NOBODY}" in done.stderr
    daemon.config.write_text(daemon.config.read_text() + "strict_files = no\n")
    assert check(daemon.config).returncode == 0
    hooks.chmod(0o664)      # writable by the group: refused even so
    done = check(daemon.config)
    assert done.returncode == 1 and "writable by group or others" in done.stderr


PROBE = """
import ctypes, resource
import sapid
def boot(authority):
    libc = ctypes.CDLL(None)
    with open({out!r}, "w") as file:
        file.write(f"{{libc.prctl(3, 0, 0, 0, 0)}} {{resource.getrlimit(resource.RLIMIT_CORE)}}")
"""


def test_socket_and_state_modes_and_core_dumps_off(daemon_factory, tmp_path):
    out = tmp_path / "probe"
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, PROBE.format(out=str(out)))))
    # PR_GET_DUMPABLE (3) is 0 and RLIMIT_CORE is (0, 0) in the daemon, before any request.
    assert out.read_text() == "0 (0, 0)"
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    assert daemon.sign(make_csr(tmp_path))[0] == 200
    for path in [daemon.state, *daemon.state.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert not mode & 0o022, f"{path} is {mode:04o}"
        assert not mode & 0o007, f"{path} is open to others: {mode:04o}"


def test_secrets_never_logged(daemon_factory, identities, tmp_path):
    daemon = daemon_factory()
    daemon.sign(make_csr(tmp_path))
    daemon.sign(make_csr(tmp_path, "rsa1024", name="refused"))
    daemon.curl("/api/csr/x", "PUT", b"garbage")
    daemon.stop()
    key_pem = (identities("p256") / "ca.private_key.pem").read_text()
    body = "".join(key_pem.splitlines()[1:-1])
    log = daemon.output()
    assert PASSPHRASE not in log
    for i in range(0, len(body) - 16, 16):
        assert body[i:i + 16] not in log
    # A wrong passphrase: the error names neither it nor the right one.
    done = run([*SAPID, "check", "-c", str(daemon.config)],
               env=sapid_env(CA_PASSPHRASE="hunter2-wrong-passphrase"), check=False)
    assert done.returncode == 1 and "wrong passphrase" in done.stderr
    assert "hunter2" not in done.stderr and PASSPHRASE not in done.stderr
