#!/usr/bin/env python3
"""How sapid's start grows with the certificates in its store: start to READY=1 and idle RSS
with an empty store, then with N certificates in it, after a clean stop and after a crash
(kill -9), and the one-time import of an earlier sapid's journal, in one run.  See
bench/README.md."""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the sapid process, its READY=1 and its memory

ROWS_PER_COMMIT = 50_000


def serial() -> str:
    """A random serial as sapid writes it: upper-case hex of even length, no leading 00."""
    text = format(secrets.randbits(159), "X")
    return text.zfill(len(text) + len(text) % 2)


def fill(database: Path, count: int, der: bytes) -> None:
    """``count`` rows as sapid writes them (the CA's own DER stands in for each certificate),
    straight into the store a first start created."""
    with sqlite3.connect(database) as connection:
        for start in range(0, count, ROWS_PER_COMMIT):
            rows = [(serial(), f"bench{n % 1000}", "CN=bench.example",
                     json.dumps(["DNS:bench.example"]), "2026-01-01T00:00:00Z",
                     f"2027-{n % 12 + 1:02d}-01T00:00:00Z", secrets.token_hex(32), der,
                     "2026-01-01T00:00:00Z")
                    for n in range(start, min(count, start + ROWS_PER_COMMIT))]
            connection.executemany(
                "INSERT INTO certificates (serial, client_id, subject, sans, not_before,"
                " not_after, sha256, der, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            connection.execute("INSERT INTO tally (writer, issued) VALUES ('bench', ?) ON CONFLICT"
                               " (writer) DO UPDATE SET issued = tally.issued + excluded.issued",
                               (len(rows),))
            connection.commit()


def legacy(state: Path, count: int) -> None:
    """``count`` records as sapid 0.1 left them: a journal record and an index file each, of
    certificates made here (signed by a throwaway key: the import reads, it does not verify)."""
    index = state / "issued"
    index.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    with open(state / "issued.pem", "ab") as journal:
        for _ in range(count):
            certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                           .public_key(key.public_key()).serial_number(x509.random_serial_number())
                           .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                           .sign(key, hashes.SHA256()))
            pem = certificate.public_bytes(serialization.Encoding.PEM)
            serial = format(certificate.serial_number, "X")
            serial = serial.zfill(len(serial) + len(serial) % 2)
            journal.write(b"# serial %s client bench at 2026-01-01T00:00:00Z\n%s"
                          % (serial.encode(), pem))
            (index / f"{serial}.pem").write_bytes(pem)


def measure(sapid: run.Sapid, label: str, rows: list, stop=signal.SIGTERM,
            expect: str | None = None) -> None:
    """Start, note READY=1 and RSS (and that the log says ``expect``), stop with ``stop``."""
    seen = log_text(sapid).count(expect) if expect else 0
    sapid.start()
    if expect and log_text(sapid).count(expect) == seen:
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
    lines = ["| store | start to READY=1 (s) | × empty | idle RSS (MiB) | × empty |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {seconds:.2f} | {seconds / ready:.2f} | {mib:.1f} | "
              f"{mib / rss:.2f} |" for label, seconds, mib in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--certificates", type=int, default=1_000_000,
                        help="certificates in the store (default 1000000)")
    parser.add_argument("--legacy", type=int, default=10_000,
                        help="records of an earlier sapid to import (default 10000)")
    parser.add_argument("--key", default="p256", choices=sorted(run.KEY_LABELS))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sapid-startup-"))
    sapid = run.Sapid(work / "sapid", args.key)
    try:
        sapid.prepare()
        rows = []
        state = sapid.folder / "state"
        measure(sapid, "empty", rows, expect="schema version")
        count = args.certificates
        pem = sapid.ca_path.read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        fill(state / "sapid.db", count, der)
        run.say(f"  {count:,} certificates put in the store")
        measure(sapid, f"{count:,} certificates", rows, signal.SIGKILL)
        measure(sapid, f"{count:,} certificates, after kill -9", rows)
        legacy(state, args.legacy)
        measure(sapid, f"{count:,} certificates + {args.legacy:,} of an earlier sapid, "
                "imported once", rows, expect=f"imported {args.legacy} certificates")
        measure(sapid, f"{count + args.legacy:,} certificates, the import done", rows)
    finally:
        sapid.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
