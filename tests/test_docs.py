"""Man pages and units: lint-clean, verified by systemd, and complete with respect to sapid.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


import sapid
from conftest import ROOT, run

MAN = ROOT / "man"
PAGES = {"sapid.8": None, "sapid.conf.5": None, "sapid-hooks.5": None}


def page(name: str) -> str:
    """A page as mandoc renders it, so words split by markup are found whole."""
    done = run(["mandoc", "-Tutf8", str(MAN / name)])
    return re.sub(r".\x08", "", done.stdout)


def test_mandoc_lint_is_clean():
    done = run(["mandoc", "-Tlint", "-W", "warning", *map(str, sorted(MAN.iterdir()))],
               check=False)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr)


def test_every_option_is_documented():
    text = page("sapid.8")
    parser = sapid.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"init", "serve", "sign", "check", "list", "show", "revoke"}
    for name, sub in commands.items():
        assert re.search(rf"\b{name}\b", text), name
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in text, f"{name} {option} missing from sapid(8)"
                elif option.startswith("-") and option != "-h":
                    assert re.search(rf"(?<![\w-]){option}\b", text), f"{option} missing"
    for variable in ("SAPID_CONFIG", "CA_PASSPHRASE", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET",
                     "LISTEN_FDS", "WATCHDOG_USEC", "INVOCATION_ID"):
        assert variable in text, variable
    for signal_name in ("SIGHUP", "SIGTERM", "SIGINT"):
        assert signal_name in text
    for code in re.findall(r'RequestError\(\d+, "(\w+)"', (ROOT / "sapid.py").read_text()):
        assert code in text, f"error code {code} missing from sapid(8)"


def test_every_config_key_is_documented():
    text = page("sapid.conf.5")
    defaults = sapid.Config()
    for key in sapid.CONFIG_KEYS:
        assert re.search(rf"\b{key}\b", text), f"{key} missing from sapid.conf(5)"
        default = getattr(defaults, key)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert f"{default:g}" in text, f"default of {key} ({default:g}) missing"
    example = (ROOT / "examples" / "sapid.conf").read_text()
    for key in sapid.CONFIG_KEYS:
        assert re.search(rf"^{key} =( |$)", example, re.M), f"{key} missing from examples/sapid.conf"


def test_every_hook_is_documented():
    text = page("sapid-hooks.5")
    names = [*sapid.HOOK_METHODS, *sapid.HOOK_FUNCTIONS, *sapid.SSL_API_NAMES,
             "NotAuthorized", "SigningHooks", "add_extension", "remove_extension",
             "client_id", "client_hash", "public_key_hash", "csr_pem", "peer", "headers"]
    names += [f.name for f in __import__("dataclasses").fields(sapid.Draft)]
    for name in names:
        assert re.search(rf"\b{name}\b", text), f"{name} missing from sapid-hooks(5)"


def test_example_config_loads():
    config = sapid.Config.load(str(ROOT / "examples" / "sapid.conf"))
    assert config == sapid.Config(path=config.path, hooks="/etc/sapid/hooks.py")


def test_units_verify(tmp_path):
    """systemd-analyze verify, with ExecStart pointing at this checkout's sapid."""
    units = tmp_path / "units"
    units.mkdir()
    launcher = shutil.which("sapid", path=os.path.dirname(sys.executable)) or str(ROOT / "sapid")
    for unit in (ROOT / "systemd").glob("sapid.*"):
        text = unit.read_text().replace("/opt/sapid/bin/sapid", launcher)
        (units / unit.name).write_text(text)
    env = dict(os.environ, MANPATH=f"{tmp_path / 'man'}:", SYSTEMD_LOG_LEVEL="notice")
    manual = tmp_path / "man"
    for section in ("5", "8"):
        (manual / f"man{section}").mkdir(parents=True)
    for name in PAGES:
        shutil.copy(MAN / name, manual / f"man{name[-1]}" / name)
    done = subprocess.run(["systemd-analyze", "verify", "sapid.socket", "sapid.service"],
                          cwd=units, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr)
    # The negative twin: a unit with a typo does not pass.
    broken = (units / "sapid.service").read_text().replace("ProtectSystem=", "ProtectSytsem=")
    (units / "sapid.service").write_text(broken)
    done = subprocess.run(["systemd-analyze", "verify", "sapid.service"], cwd=units, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "ProtectSytsem" in done.stdout + done.stderr


def test_unit_hardening_is_as_documented():
    service = (ROOT / "systemd" / "sapid.service").read_text()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "PrivateDevices=yes", "PrivateNetwork=yes",
                 "RestrictAddressFamilies=AF_UNIX", "SystemCallFilter=@system-service",
                 "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet=\n", "UMask=0077",
                 "StateDirectory=sapid", "LogRateLimitIntervalSec=0",
                 "LoadCredentialEncrypted=passphrase:"):
        assert line in service, line
    assert not re.search(r"^StateDirectory=.*identity", service, re.M)
    socket_unit = (ROOT / "systemd" / "sapid.socket").read_text()
    assert "ListenStream=/run/sapid/sapid.sock" in socket_unit and "SocketMode=0660" in socket_unit


def test_security_exposure_is_low(tmp_path):
    done = run(["systemd-analyze", "security", "--offline=yes",
                str(ROOT / "systemd" / "sapid.service")], check=False)
    score = re.search(r"Overall exposure level for .*: (\d+\.\d+)", done.stdout + done.stderr)
    assert score, done.stdout + done.stderr
    assert float(score.group(1)) <= 1.0, done.stdout


def test_man_pages_install_with_pip(tmp_path):
    """The wheel that ``pip install .`` builds puts the pages in share/man."""
    import zipfile
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "dev", "build",
                                                                "*.egg-info"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"),
         str(source)], timeout=300)
    wheel, = (tmp_path / "w").glob("sapid-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in PAGES:
        section = name.rsplit(".", 1)[1]
        assert any(n.endswith(f".data/data/share/man/man{section}/{name}") for n in names), names
    assert "sapid.py" in names
