"""The README's first command: examples/dev.sh makes a throwaway CA, serves it on a local socket
and prints an openssl + curl example that works when pasted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, run, sapid_env


def readme_command(number: int) -> str:
    """The command under "# N." in the README's first code block."""
    block = (ROOT / "README.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(f"# {number}."))
    return next(line for line in lines[start:] if line and not line.startswith("#"))


def path_without(tmp_path, name: str) -> str:
    """$PATH as it is, but with no ``name`` on it: a folder of links to everything else."""
    folder = tmp_path / f"path-without-{name}"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            target = os.path.join(directory, entry)
            if entry != name and not (folder / entry).exists() and os.access(target, os.X_OK):
                (folder / entry).symlink_to(target)
    return str(folder)


def test_the_readme_commands_need_no_sudo_as_root():
    assert readme_command(1) == "sh examples/dev.sh"
    assert readme_command(2) == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    # As root nothing calls sudo; another user is asked for it once, before anything runs.
    assert [line for line in ci.splitlines() if "sudo" in line and not line.startswith("#")] == [
        '[ "$(id -u)" = 0 ] || exec sudo bash "$0" "$@"']


def test_dev_script(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    launcher = venv / "bin" / "sapid"         # this checkout's sapid, as the venv would have it
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "sapid"}" "$@"\n')
    launcher.chmod(0o755)
    dev = tmp_path / "dev"
    # A sapid.conf of the user's own, from an earlier start: kept as it is.
    dev.mkdir()
    mine = ("[sapid]\nidentity = identity\nstate = state\nsocket = sapid.sock\n"
            "# my own\nhooks =\n")
    (dev / "sapid.conf").write_text(mine)
    # The README's first command, run as root with no sudo on PATH.
    env = sapid_env(SAPID_DEV=str(dev), SAPID_VENV=str(venv),
                    PATH=path_without(tmp_path, "sudo"))
    del env["CA_PASSPHRASE"]
    process = subprocess.Popen(["sh", "-c", readme_command(1)], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               cwd=ROOT)
    monkeypatch.chdir(tmp_path)
    try:
        printed = ""
        while "it is kept." not in printed:
            line = process.stdout.readline()
            assert line, f"dev.sh ended:\n{printed}"
            printed += line
        deadline = time.monotonic() + 20
        while not (dev / "sapid.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Paste the examples as printed, in a shell of their own.
        joined = printed.replace("\\\n      ", "").replace("|\n      ", "| ")
        commands = re.findall(r"^  ((?:openssl |curl |CA_PASSPHRASE=|\S*/sapid ).*)$", joined,
                              re.M)
        for command in commands:
            if " revoke " in command:
                continue
            done = run(["sh", "-c", command], env={**env, "PATH": os.environ["PATH"]})
            if command.startswith("openssl verify"):
                assert "device.pem: OK" in done.stdout, done.stdout
            if " check " in command:
                assert done.stdout.startswith("sapid: ") and ": ok;" in done.stdout, done.stdout
        assert (tmp_path / "device.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
        assert len(commands) == 6, commands
        assert (dev / "sapid.conf").read_text() == mine
        assert (dev / "identity" / "ca.cert.pem").exists()
        assert oct((dev / "passphrase").stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
