"""sapid under systemd's protocols, spoken for real: socket activation (systemd-socket-activate
and a test-made fd 3), sd_notify on a datagram socket the test binds, signals, passphrase
sources (credentials, the environment, a terminal, systemd-ask-password) and the journal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import socket
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

import sapid
from conftest import PASSPHRASE, SAPID, curl, make_csr, run, sapid_env, write_hooks


# sd_notify, unit level -------------------------------------------------------------------------

def test_sd_notify_path_and_abstract(tmp_path, monkeypatch):
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sapid.sd_notify("READY=1\nSTATUS=hello")
        assert receiver.recv(100) == b"READY=1\nSTATUS=hello"
    name = f"sapid-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sapid.sd_notify("WATCHDOG=1")
        assert receiver.recv(100) == b"WATCHDOG=1"


def test_sd_notify_never_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sapid.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sapid.sd_notify("READY=1") is False


def test_listen_fds_trusts_only_our_pid(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sapid.listen_fds() == []
    assert os.environ["LISTEN_FDS"] == "1"      # not ours: left alone


# Socket activation ----------------------------------------------------------------------------

def test_systemd_socket_activate(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    listen = str(tmp_path / "activated.sock")
    notify = str(tmp_path / "n.sock")
    env = sapid_env()
    command = ["systemd-socket-activate", "-l", listen, "--fdname=sapid",
               "-E", f"CA_PASSPHRASE={PASSPHRASE}", "-E", f"NOTIFY_SOCKET={notify}",
               *SAPID, "serve", "-c", str(daemon.config)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(notify)
        activator = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(listen) and time.monotonic() < deadline:
                time.sleep(0.05)
            # The first connection starts sapid, which finds the socket on fd 3.
            status, reply, _ = curl(listen, "/api/csr/dev1", "PUT", make_csr(tmp_path))
            assert status == 200, reply
            receiver.settimeout(10)
            assert "READY=1" in receiver.recv(4096).decode().split("\n")
            assert not os.path.exists(daemon.socket)      # the configured path was not bound
            os.killpg(activator.pid, signal.SIGTERM)
            output = activator.communicate(timeout=15)[0].decode()
            assert "from systemd" in output
        finally:
            if activator.poll() is None:
                os.killpg(activator.pid, signal.SIGKILL)
                activator.wait()
    assert os.path.exists(listen), "sapid must never unlink a socket systemd passed"


def start_with_fd3(daemon, listener: socket.socket, extra_env=None):
    """sapid serve with ``listener`` as fd 3 and LISTEN_PID set to its own pid by a shell."""
    fd = listener.fileno()

    def on_fd3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    env = sapid_env(LISTEN_FDS="1", LISTEN_FDNAMES="sapid", **(extra_env or {}))
    return subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *SAPID, "serve", "-c",
                             str(daemon.config)], env=env, preexec_fn=on_fd3, close_fds=False,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_test_made_fd3(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    path = str(tmp_path / "fd3.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    process = start_with_fd3(daemon, listener)
    try:
        status, reply, _ = curl(path, "/api/csr/dev1", "PUT", make_csr(tmp_path))
        assert status == 200, reply
        status, health, _ = curl(path, "/api/health")
        assert health["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert os.path.exists(path)
    listener.close()


# Readiness, reload, watchdog, stop -----------------------------------------------------------

def test_notify_protocol(daemon_factory):
    daemon = daemon_factory(start=False)
    daemon.env = {"WATCHDOG_USEC": "400000"}
    daemon.start()
    # WATCHDOG=1 comes every WATCHDOG_USEC / 2.
    seen = []
    deadline = time.monotonic() + 5
    for message in daemon.messages(2):
        seen.append(message)
        if sum("WATCHDOG=1" in m.split("\n") for m in seen) >= 3 or time.monotonic() > deadline:
            break
    assert sum("WATCHDOG=1" in m.split("\n") for m in seen) >= 3, seen
    daemon.process.send_signal(signal.SIGHUP)
    reloading = daemon.wait_for("RELOADING=1")
    stamp = int(re.search(r"^MONOTONIC_USEC=(\d+)$", reloading, re.M).group(1))
    assert abs(stamp - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
    after = daemon.wait_for("READY=1")
    assert re.search(r"^STATUS=serving on .*, 0 certificates in the store$", after, re.M), after
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("STOPPING=1")
    assert daemon.process.wait(10) == 0


def test_status_counts_certificates(daemon, tmp_path):
    daemon.sign(make_csr(tmp_path))
    daemon.process.send_signal(signal.SIGHUP)
    message = daemon.wait_for("READY=1")
    assert "STATUS=serving on" in message and "1 certificate in the store" in message


REFUSING = """
import sapid
class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        raise sapid.NotAuthorized("closed for the night")
"""


def test_sighup_reloads_hooks_and_keeps_old_on_error(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, "import sapid\n")
    daemon = daemon_factory(hooks=str(hooks))
    assert daemon.sign(make_csr(tmp_path))[0] == 200
    write_hooks(tmp_path, REFUSING)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    status, reply = daemon.sign(make_csr(tmp_path))
    assert (status, reply.get("message")) == (403, "closed for the night")
    write_hooks(tmp_path, "import sapid\nclass Hooks(sapid.SigningHooks:\n")   # syntax error
    daemon.process.send_signal(signal.SIGHUP)
    failed = daemon.wait_for("READY=1")
    assert f"{hooks}:2: syntax error" in daemon.output()
    # systemctl status says so, until a reload succeeds.
    assert re.search(r"^STATUS=reload failed at \d\d:\d\d, serving with the previous setup on ",
                     failed, re.M), failed
    status, reply = daemon.sign(make_csr(tmp_path))
    assert (status, reply.get("message")) == (403, "closed for the night")   # old hooks kept
    # A config change is taken too: validity_days.
    daemon.config.write_text(daemon.config.read_text() + "validity_days = 2\n")
    write_hooks(tmp_path, "import sapid\n")
    daemon.process.send_signal(signal.SIGHUP)
    assert "STATUS=serving on " in daemon.wait_for("READY=1")
    status, reply = daemon.sign(make_csr(tmp_path))
    assert status == 200 and reply["not_after"][:10] != reply["not_before"][:10]
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(reply["signed_x509_pem"].encode())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 2


def test_sighup_with_broken_identity_keeps_serving(daemon_factory, tmp_path, identities):
    import shutil
    identity = tmp_path / "identity"
    shutil.copytree(identities("p256"), identity)
    daemon = daemon_factory(identity=identity)
    (identity / "ca.cert.pem").write_text("garbage")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    assert "reload failed" in daemon.output()
    assert daemon.sign(make_csr(tmp_path))[0] == 200


SLOW = """
import time
import sapid
class Hooks(sapid.SigningHooks):
    def presign(self, draft):
        time.sleep(2)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_finishes_requests_in_flight(daemon_factory, tmp_path, sig):
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, SLOW)))
    csr = make_csr(tmp_path)
    result = {}
    client = threading.Thread(target=lambda: result.update(reply=daemon.sign(csr)))
    client.start()
    time.sleep(0.7)                      # the hook is sleeping now
    daemon.process.send_signal(sig)
    daemon.wait_for("STOPPING=1")
    # No new connections once stopping.
    time.sleep(0.2)
    with pytest.raises(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
            late.connect(daemon.socket)
            late.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            if not late.recv(100):
                raise ConnectionResetError("closed")
    client.join(20)
    status, reply = result["reply"]
    assert status == 200 and "signed_x509_pem" in reply
    assert daemon.process.wait(15) == 0
    assert not os.path.exists(daemon.socket)      # a socket sapid bound itself is removed


def test_stale_socket_is_replaced_but_live_one_and_files_are_not(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(daemon.socket)
    stale.close()                         # a socket file nobody listens on
    daemon.start()
    assert daemon.curl("/api/health")[0] == 200
    second = daemon_factory(start=False)
    second.config.write_text(second.config.read_text().replace(second.socket, daemon.socket))
    done = run([*SAPID, "serve", "-c", str(second.config)], env=sapid_env(), check=False)
    assert done.returncode == 1 and "another process is serving" in done.stderr
    daemon.stop()
    Path(daemon.socket).write_text("a regular file")
    done = run([*SAPID, "serve", "-c", str(daemon.config)], env=sapid_env(), check=False)
    assert done.returncode == 1 and "not a socket" in done.stderr
    assert Path(daemon.socket).read_text() == "a regular file"


# Passphrase sources ---------------------------------------------------------------------------

ENV_PROBE = """
import os
import sapid
def boot(authority):
    with open({out!r}, "w") as file:
        file.write(repr("CA_PASSPHRASE" in os.environ))
"""


def test_credential_wins_and_environment_is_cleared(daemon_factory, tmp_path):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "passphrase").write_text(PASSPHRASE + "\n")   # one newline is stripped
    out = tmp_path / "env-seen"
    hooks = write_hooks(tmp_path, ENV_PROBE.format(out=str(out)))
    daemon = daemon_factory(hooks=str(hooks), start=False,
                            env={"CREDENTIALS_DIRECTORY": str(credentials),
                                 "CA_PASSPHRASE": "a wrong one, ignored"})
    daemon.start()
    assert out.read_text() == "False"
    assert daemon.sign(make_csr(tmp_path))[0] == 200
    # /proc/<pid>/environ keeps the process's initial environment; os.environ does not.
    daemon.stop()


def test_environment_source_is_removed(daemon_factory, tmp_path):
    out = tmp_path / "env-seen"
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, ENV_PROBE.format(out=str(out)))))
    assert out.read_text() == "False"
    assert daemon.sign(make_csr(tmp_path))[0] == 200


def test_wrong_and_missing_passphrase_fail_at_start(daemon_factory):
    daemon = daemon_factory(start=False)
    wrong = run([*SAPID, "serve", "-c", str(daemon.config)],
                env=sapid_env(CA_PASSPHRASE="not the passphrase"), check=False)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().endswith("wrong passphrase"), wrong.stderr
    assert "not the passphrase" not in wrong.stderr and "Traceback" not in wrong.stderr
    env = sapid_env()
    del env["CA_PASSPHRASE"]
    missing = run([*SAPID, "serve", "-c", str(daemon.config)], env=env, check=False)
    assert missing.returncode == 1
    for source in ("credential", "CA_PASSPHRASE", "terminal", "systemd-ask-password"):
        assert source in missing.stderr, missing.stderr
    credentials = daemon.folder / "creds"
    credentials.mkdir()
    (credentials / "passphrase").write_text("wrong too")
    wrong = run([*SAPID, "serve", "-c", str(daemon.config)],
                env=dict(env, CREDENTIALS_DIRECTORY=str(credentials)), check=False)
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr


def test_terminal_source(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    env = sapid_env(NOTIFY_SOCKET=str(tmp_path / "n.sock"))
    del env["CA_PASSPHRASE"]
    master, slave = pty.openpty()

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "n.sock"))
        process = subprocess.Popen([*SAPID, "serve", "-c", str(daemon.config)], env=env,
                                   stdin=slave, stdout=slave, stderr=slave,
                                   preexec_fn=controlling_terminal)
        os.close(slave)
        try:
            prompt = b""
            while b"passphrase" not in prompt.lower():
                prompt += os.read(master, 1024)
            os.write(master, PASSPHRASE.encode() + b"\n")
            receiver.settimeout(15)
            assert "READY=1" in receiver.recv(4096).decode()
            assert curl(daemon.socket, "/api/health")[0] == 200
        finally:
            process.terminate()
            process.wait(10)
            os.close(master)


def test_systemd_ask_password_source(daemon_factory, tmp_path):
    """Under systemd ($INVOCATION_ID) with no other source, the real systemd-ask-password
    asks, and an agent speaking its protocol (as systemd-tty-ask-password-agent) answers."""
    daemon = daemon_factory(start=False)
    ask_folder = Path("/run/systemd/ask-password")
    before = set(ask_folder.glob("ask.*")) if ask_folder.exists() else set()
    env = sapid_env(INVOCATION_ID="0123456789abcdef0123456789abcdef")
    del env["CA_PASSPHRASE"]
    process = subprocess.Popen([*SAPID, "check", "-c", str(daemon.config)], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # check never prompts: it says the key was not decrypted, and does not ask.
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "key not decrypted" in out, err
    process = subprocess.Popen([*SAPID, "serve", "-c", str(daemon.config)],
                               env=dict(env, NOTIFY_SOCKET=str(tmp_path / "n.sock")),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "n.sock"))
        try:
            deadline = time.monotonic() + 20
            question = None
            while question is None and time.monotonic() < deadline:
                for ask in set(ask_folder.glob("ask.*")) - before:
                    text = ask.read_text()
                    if "sapid CA key" in text:
                        question = text
                time.sleep(0.05)
            assert question, "systemd-ask-password never asked"
            answer_to = re.search(r"^Socket=(.+)$", question, re.M).group(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as agent:
                agent.sendto(b"+" + PASSPHRASE.encode(), answer_to)
            receiver.settimeout(20)
            assert "READY=1" in receiver.recv(4096).decode()
            assert curl(daemon.socket, "/api/health")[0] == 200
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)


# Journal -----------------------------------------------------------------------------------

def test_syslog_prefixes_when_stderr_is_the_journal(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    daemon.log_path.touch()
    info = os.stat(daemon.log_path)
    daemon.env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    daemon.start()
    daemon.sign(make_csr(tmp_path))
    daemon.stop()
    lines = daemon.output().splitlines()
    assert any(re.match(r"<6>audit outcome=issued ", line) for line in lines), lines
    assert any(line.startswith("<4>no hooks file") for line in lines), lines
    assert all(re.match(r"<\d>", line) for line in lines), lines
