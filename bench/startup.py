#!/usr/bin/env python3
"""How sapid's start grows with the certificates it has issued: start to READY=1 and idle RSS
with an empty state folder, then with N certificates on record at a first start, after a clean
stop and after a crash, in one run.  See bench/README.md."""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the sapid process, its READY=1 and its memory


def fill(state: Path, count: int, pem: bytes) -> None:
    """``count`` records as sapid leaves them: a journal record and an index file each."""
    index = state / "issued"
    index.mkdir(parents=True, exist_ok=True)
    with open(state / "issued.pem", "ab") as journal:
        for _ in range(count):
            serial = secrets.token_hex(16).upper()
            journal.write(b"# serial %s client bench at 2026-01-01T00:00:00Z\n%s"
                          % (serial.encode(), pem))
            (index / f"{serial}.pem").write_bytes(pem)


def measure(sapid: run.Sapid, label: str, rows: list, expect: str,
            stop=signal.SIGTERM) -> None:
    """Start, note READY=1 and RSS, check that the log says ``expect``, stop with ``stop``."""
    seen = log_text(sapid).count(expect)
    sapid.start()
    if log_text(sapid).count(expect) == seen:
        raise SystemExit(f"{label}: sapid did not log {expect!r}:\n{sapid.log_tail()}")
    rows.append((label, sapid.ready_seconds, sapid.idle_rss_kib / 1024))
    run.say(f"  {label}: READY=1 after {sapid.ready_seconds:.2f} s, "
            f"idle RSS {sapid.idle_rss_kib / 1024:.1f} MiB")
    if stop == signal.SIGTERM:
        code = sapid.stop()
        if code != 0:
            raise SystemExit(f"sapid exited {code} on SIGTERM:\n{sapid.log_tail()}")
    else:
        sapid.process.send_signal(stop)
        sapid.process.wait()


def log_text(sapid: run.Sapid) -> str:
    try:
        return sapid.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def table(rows: list) -> str:
    _, ready, rss = rows[0]
    lines = ["| state folder | start to READY=1 (s) | × empty | idle RSS (MiB) | × empty |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {seconds:.2f} | {seconds / ready:.2f} | {mib:.1f} | "
              f"{mib / rss:.2f} |" for label, seconds, mib in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--certificates", type=int, default=100_000,
                        help="certificates on record (default 100000)")
    parser.add_argument("--key", default="p256", choices=sorted(run.KEY_LABELS))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sapid-startup-"))
    sapid = run.Sapid(work / "sapid", args.key)
    try:
        sapid.prepare()
        rows = []
        checked, trusted = "certificates, checked against", "unchanged since a clean stop"
        measure(sapid, "empty", rows, checked)
        count = args.certificates
        fill(sapid.folder / "state", count, sapid.ca_path.read_bytes())
        run.say(f"  {count:,} certificates put on record")
        measure(sapid, f"{count:,} certificates, first start: every record checked", rows,
                f"{count} {checked}")
        measure(sapid, f"{count:,} certificates, after a clean stop", rows,
                f"{count} certificates, {trusted}", signal.SIGKILL)
        measure(sapid, f"{count:,} certificates, after a crash: every record checked", rows,
                f"{count} {checked}")
    finally:
        sapid.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
