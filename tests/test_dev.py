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


def test_dev_script(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    launcher = venv / "bin" / "sapid"         # this checkout's sapid, as the venv would have it
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "sapid"}" "$@"\n')
    launcher.chmod(0o755)
    dev = tmp_path / "dev"
    env = sapid_env(SAPID_DEV=str(dev), SAPID_VENV=str(venv))
    del env["CA_PASSPHRASE"]
    process = subprocess.Popen(["sh", str(ROOT / "examples" / "dev.sh")], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               cwd=tmp_path)
    try:
        printed = ""
        while "curl --unix-socket" not in printed:
            line = process.stdout.readline()
            assert line, f"dev.sh ended:\n{printed}"
            printed += line
        deadline = time.monotonic() + 20
        while not (dev / "sapid.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Paste the example as printed.
        commands = re.findall(r"^  (openssl req .*?\.csr)$|^  (curl .*)$",
                              printed.replace("\\\n      ", ""), re.M)
        openssl_line, curl_line = commands[0][0], commands[1][1]
        monkeypatch.chdir(tmp_path)
        run(["sh", "-c", openssl_line], env=env)
        done = run(["sh", "-c", curl_line], env=env)
        assert '"signed_x509_pem"' in done.stdout, done.stdout
        assert (dev / "identity" / "ca.cert.pem").exists()
        assert oct((dev / "passphrase").stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
