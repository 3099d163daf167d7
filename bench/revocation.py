#!/usr/bin/env python3
"""What revocation costs as the store grows: with N certificates issued and M of them revoked
(1,000,000 and 100,000 by default), start to READY=1, revocation latency, CRL build time and
size, and OCSP answers per second and their p99, each beside a baseline of the same run (an
empty store; GET /api/health, which also reads the store on a pool thread).  See
bench/README.md.

    python3 bench/revocation.py
    python3 bench/revocation.py --certificates 2000 --revoked 200 --seconds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the sapid process, its READY=1 and its memory
import startup  # bench/startup.py: a store filled with rows as sapid writes them

# Lets every client revoke: the API path runs the hook, as a deployment's would.
HOOKS = """
import sapid

class Hooks(sapid.SigningHooks):
    def authorize_revocation(self, certificate, reason):
        return True
"""


class Client:
    """One keep-alive HTTP/1.1 connection to sapid's socket."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buffer = b""

    def ask(self, method: str, path: str, body: bytes = b"", media: str = "") -> tuple:
        head = f"{method} {path} HTTP/1.1\r\nHost: sapid\r\nContent-Length: {len(body)}\r\n"
        if media:
            head += f"Content-Type: {media}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head)[1])
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return int(head.split(b" ", 2)[1]), rest[:length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed by sapid")
        return chunk

    def close(self) -> None:
        self.sock.close()


def revoke_rows(database: Path, count: int) -> list[str]:
    """Mark the first ``count`` rows revoked, as ``sapid revoke`` would; their serials."""
    with sqlite3.connect(database) as connection:
        serials = [row[0] for row in connection.execute(
            "SELECT serial FROM certificates ORDER BY rowid LIMIT ?", (count,))]
        connection.executemany(
            "UPDATE certificates SET revoked_at = '2026-06-01T00:00:00.000000Z',"
            " revocation_reason = 'keyCompromise' WHERE serial = ?", [(s,) for s in serials])
        connection.execute("UPDATE revocation_changes SET changes = changes + ?", (count,))
    return serials


def good_serials(database: Path, skip: int, count: int) -> list[str]:
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute(
            "SELECT serial FROM certificates ORDER BY rowid LIMIT ? OFFSET ?", (count, skip))]


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def load(socket_path: str, requests: list[tuple], clients: int, seconds: float) -> tuple:
    """``clients`` threads, each on its own connection, sending the requests in turn for
    ``seconds``: (answers per second, p50 ms, p99 ms, statuses seen)."""
    latencies, statuses, lock = [], {}, threading.Lock()
    deadline = time.perf_counter() + seconds

    def work(offset: int):
        client, mine, seen = Client(socket_path), [], {}
        n = offset
        try:
            while time.perf_counter() < deadline:
                method, path, body, media = requests[n % len(requests)]
                n += clients
                started = time.perf_counter()
                status, _ = client.ask(method, path, body() if callable(body) else body, media)
                mine.append(time.perf_counter() - started)
                seen[status] = seen.get(status, 0) + 1
        finally:
            client.close()
            with lock:
                latencies.extend(mine)
                for status, count in seen.items():
                    statuses[status] = statuses.get(status, 0) + count
    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return (len(latencies) / elapsed, 1000 * latencies[len(latencies) // 2],
            1000 * latencies[int(len(latencies) * 0.99)], statuses)


def ocsp_request(ca: x509.Certificate, serial: str, nonce: bool) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        *issuer_hashes(ca), int(serial, 16), hashes.SHA1())
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(secrets.token_bytes(16)), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def issuer_hashes(ca: x509.Certificate) -> tuple[bytes, bytes]:
    """SHA-1 of the CA's name and key, as in every OCSP CertID openssl sends."""
    name = hashes.Hash(hashes.SHA1())
    name.update(ca.subject.public_bytes())
    key = x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
    return name.finalize(), key


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--certificates", type=int, default=1_000_000)
    parser.add_argument("--revoked", type=int, default=100_000)
    parser.add_argument("--key", default="p256", choices=sorted(run.KEY_LABELS))
    parser.add_argument("--clients", type=int, default=8, help="OCSP clients (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per OCSP load (default 5)")
    parser.add_argument("--revocations", type=int, default=200,
                        help="revocations over the API to time (default 200)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sapid-revocation-"))
    sapid = run.Sapid(work / "sapid", args.key)
    rows = []
    try:
        sapid.prepare()
        hooks = sapid.folder / "hooks.py"
        hooks.write_text(HOOKS)
        hooks.chmod(0o644)
        sapid.config.write_text(sapid.config.read_text().replace("hooks =\n",
                                                                 f"hooks = {hooks}\n"))
        state = sapid.folder / "state"
        socket_path = str(sapid.socket)
        ca = x509.load_pem_x509_certificate(sapid.ca_path.read_bytes())

        sapid.start()
        empty_ready = sapid.ready_seconds
        client = Client(socket_path)
        empty_crl, _ = timed(client.ask, "GET", "/api/crl")
        client.close()
        sapid.stop()
        run.say(f"  empty store: READY=1 after {empty_ready:.2f} s")

        der = ca.public_bytes(serialization.Encoding.DER)
        startup.fill(state / "sapid.db", args.certificates, der)
        revoked = revoke_rows(state / "sapid.db", args.revoked)
        good = good_serials(state / "sapid.db", args.revoked, 1000)
        run.say(f"  {args.certificates:,} certificates, {args.revoked:,} revoked, in the store")
        sapid.start()
        full_ready = sapid.ready_seconds
        rows.append(("start to READY=1", f"{empty_ready:.2f} s", f"{full_ready:.2f} s",
                     f"{full_ready / empty_ready:.2f}"))
        rows.append(("idle RSS", "", f"{sapid.idle_rss_kib / 1024:.1f} MiB", ""))

        client = Client(socket_path)
        built, (status, crl) = timed(client.ask, "GET", "/api/crl")
        assert status == 200, crl
        assert len(x509.load_der_x509_crl(crl)) == args.revoked
        cached = [timed(client.ask, "GET", "/api/crl")[0] for _ in range(20)]
        rows.append(("GET /api/crl, building it", f"{empty_crl * 1000:.1f} ms (empty)",
                     f"{built * 1000:.0f} ms", f"{built / empty_crl:.0f}"))
        rows.append(("GET /api/crl, built", "", f"{statistics.median(cached) * 1000:.1f} ms", ""))
        rows.append(("CRL size", "", f"{len(crl) / 1e6:.2f} MB ({len(crl) / args.revoked:.0f} "
                     "bytes per entry)", ""))
        health = [timed(client.ask, "GET", "/api/health")[0] for _ in range(args.revocations)]
        latencies = []
        for serial in good[:args.revocations]:
            body = json.dumps({"serial": serial, "reason": "keyCompromise"}).encode()
            seconds, (status, answer) = timed(client.ask, "POST", "/api/revoke/bench", body,
                                              "application/json")
            assert status == 200, answer
            latencies.append(seconds)
        latencies.sort()
        base = statistics.median(health)
        rows.append(("POST /api/revoke (p50, p99)", f"{base * 1000:.2f} ms (health p50)",
                     f"{statistics.median(latencies) * 1000:.2f} ms, "
                     f"{latencies[int(len(latencies) * 0.99)] * 1000:.2f} ms",
                     f"{statistics.median(latencies) / base:.1f}"))
        rebuilt, (status, crl) = timed(client.ask, "GET", "/api/crl")
        assert len(x509.load_der_x509_crl(crl)) == args.revoked + args.revocations
        rows.append(("GET /api/crl after a revocation", "", f"{rebuilt * 1000:.0f} ms", ""))
        started = time.perf_counter()
        done = run.subprocess.run([*run.SAPID, "revoke", "-c", str(sapid.config),
                                   good[args.revocations], "--reason", "superseded"],
                                  capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        rows.append(("sapid revoke (the whole command)", "", f"{time.perf_counter() - started:.2f} s",
                     ""))
        client.close()

        health_rate = load(socket_path, [("GET", "/api/health", b"", "")], args.clients,
                           args.seconds)
        serials = good[args.revocations + 1:] + revoked[:1000]
        fresh = [("POST", "/ocsp", (lambda s=s: ocsp_request(ca, s, True)),
                  "application/ocsp-request") for s in serials]
        reused = [("POST", "/ocsp", ocsp_request(ca, s, False), "application/ocsp-request")
                  for s in serials]
        for label, requests in (("OCSP with nonce (signed each time)", fresh),
                                ("OCSP without nonce (answers reused)", reused)):
            rate, p50, p99, statuses = load(socket_path, requests, args.clients, args.seconds)
            assert set(statuses) == {200}, statuses
            rows.append((f"{label}: answers/s, p50, p99",
                         f"{health_rate[0]:,.0f}/s (health)",
                         f"{rate:,.0f}/s, {p50:.2f} ms, {p99:.2f} ms",
                         f"{rate / health_rate[0]:.2f}"))
    finally:
        sapid.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.certificates:,} certificates, {args.revoked:,} revoked, CA key "
          f"{run.KEY_LABELS[args.key]}, {args.clients} OCSP clients\n")
    print("| measure | baseline, same run | figure | × baseline |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
