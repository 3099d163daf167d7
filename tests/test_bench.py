"""The benchmark's smoke mode: a real sapid under a few hundred requests from bench/loadgen.py,
every certificate verified against the CA. No timing is asserted; cfssl is not needed."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_smoke_run_signs_and_verifies_every_request():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert ("| server | concurrency | requests/s | p50 (ms) | p99 (ms) | errors |" in out), out
    assert "| overhead (ms/req) |" in out and "| ×cfssl | ×ceiling | ×sapid |" in out, out
    assert "| sapid | 1 |" in out and "| sapid | 8 |" in out, out
    assert "sapid idle RSS (MiB) | sapid peak RSS (MiB) | sapid idle PSS (MiB)" in out, out
    assert "Failures:" not in out, out
    assert "verified 150/150" in done.stderr, done.stderr


def test_hooks_server_and_both_load_generators():
    """sapid with no-op hooks beside the built-in ones and a baseline checkout, each measured
    by the event loop and by a thread per connection: every answer verified, the tables there."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--servers",
                           "sapid,sapid+hooks", "--keys", "p256", "--concurrency", "2",
                           "--requests", "60", "--rounds", "1", "--loadgen-check", "2",
                           "--no-openssl-speed", "--workers", "auto", "--baseline", str(ROOT)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert "| sapid | 2 |" in out and "| sapid+hooks | 2 |" in out, out
    assert "| baseline | 2 |" in out, out          # this checkout again, as its own baseline
    assert "### The two load generators" in out, out
    assert "| EC P-256 | sapid | 2 | 1 |" in out and "| EC P-256 | sapid+hooks | 2 | 1 |" in out
    assert done.stderr.count("verified 60/60") == 9, done.stderr     # 3 cells + 6 checks


def test_load_generator_reads_content_length_chunked_and_close_delimited_answers():
    sys.path.insert(0, str(ROOT / "bench"))
    import loadgen

    fixed = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1")
    reader = loadgen.ResponseReader()
    assert reader.feed(fixed) == (len(fixed) - len("HTTP/1.1"), b"hello")
    assert reader.status == 200 and not reader.close

    chunked = bytearray(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    reader = loadgen.ResponseReader()
    assert reader.feed(chunked) is None
    chunked += b"2;x=y\r\nde\r\n0\r\n\r\n"
    assert reader.feed(chunked) == (len(chunked), b"abcde")

    interim = bytearray(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 503 Busy\r\n\r\nlater")
    reader = loadgen.ResponseReader()
    assert reader.feed(interim) is None
    assert reader.at_eof(interim) == (len(interim), b"later")
    assert reader.status == 503 and reader.close

    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert loadgen.percentile([float(n) for n in range(1, 101)], 0.99) == 99.0


def test_startup_benchmark_starts_sapid_on_a_store_it_did_not_write():
    """bench/startup.py on a small store: every start reaches READY=1, the rows it put in are
    counted, and the earlier sapid's records are imported once (the log says so)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "startup.py"),
                           "--certificates", "300", "--legacy", "20"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| empty", "| 300 certificates", "| 300 certificates, after kill -9",
        "| 300 certificates + 20 of an earlier sapid, imported once",
        "| 320 certificates, the import done"], done.stdout


def test_revocation_benchmark_runs_on_a_small_store():
    """bench/revocation.py end to end on a small store: every OCSP answer a 200, the CRL
    holding every revoked certificate (the script checks both), its table printed."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "revocation.py"),
                           "--certificates", "2000", "--revoked", "200", "--seconds", "0.5",
                           "--revocations", "10", "--clients", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "| measure | baseline, same run | figure | × baseline |" in done.stdout
    for row in ("| start to READY=1 |", "| GET /api/crl, building it |",
                "| POST /api/revoke (p50, p99) |", "| OCSP with nonce"):
        assert row in done.stdout, done.stdout
