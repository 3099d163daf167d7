"""Soak: 20,000 signings from 32 concurrent keep-alive clients on the Unix socket, then an audit
of everything issued: distinct serials, every certificate verifies against the CA, and each has
its audit line and its row in the store, SQLite and PostgreSQL (DESIGN.md "Store")."""

from __future__ import annotations

import os
import re
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import KeepAliveClient as Client

CLIENTS = 32
SIGNINGS = 20_000
CSRS = 64
TIME_LIMIT = 300.0          # seconds for the signings; the whole test stays within ~6 minutes
RSS_LIMIT_KB = 150 * 1024
THREAD_SLACK = 8
MAX_THREADS = 32           # the default of max_threads


def make_csrs(count: int) -> list[bytes]:
    """P-256 CSRs with a subject and a DNS name each, made once and reused."""
    made = []
    for n in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"soak{n}")]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"soak{n}.example")]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        made.append(csr.public_bytes(serialization.Encoding.PEM))
    return made


def test_soak(daemon_factory, store):
    daemon = daemon_factory(**store)
    pid = daemon.process.pid
    csrs = make_csrs(CSRS)
    per_client = SIGNINGS // CLIENTS
    replies = [[] for _ in range(CLIENTS)]      # (client id, status, reply, seconds)
    errors = []
    peak_threads = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak_threads[0] = max(peak_threads[0], len(os.listdir(f"/proc/{pid}/task")))

    def client(number):
        client_id = f"soak{number}"
        try:
            connection = Client(daemon.socket)
            for i in range(per_client):
                if time.monotonic() > deadline:
                    errors.append(f"{client_id}: over {TIME_LIMIT:g} s")
                    return
                started = time.perf_counter()
                status, reply = connection.sign(csrs[(number + i) % CSRS], client_id)
                replies[number].append((client_id, status, reply, time.perf_counter() - started))
            connection.close()
        except (OSError, ValueError) as e:
            errors.append(f"{client_id}: {e!r}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    started = time.monotonic()
    deadline = started + TIME_LIMIT
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIME_LIMIT + 30)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    with open(f"/proc/{pid}/status") as status_file:
        rss_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status_file.read())[1])
    results = [r for batch in replies for r in batch]
    latencies = sorted(seconds for *_, seconds in results)
    if latencies:
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        print(f"\nsoak: {len(results)} signings from {CLIENTS} clients in {elapsed:.1f} s = "
              f"{len(results) / elapsed:.0f} signings/s, latency p50 {p50:.1f} ms p99 "
              f"{p99:.1f} ms, daemon peak RSS {rss_kb / 1024:.1f} MB, peak {peak_threads[0]} "
              f"threads")

    assert not errors, errors[:5]
    assert elapsed < TIME_LIMIT, elapsed
    refused = [(status, reply) for _, status, reply, _ in results if status != 200]
    assert not refused, refused[:3]
    assert len(results) == per_client * CLIENTS >= SIGNINGS
    assert rss_kb < RSS_LIMIT_KB, rss_kb
    assert peak_threads[0] <= MAX_THREADS + THREAD_SLACK, peak_threads[0]

    # Distinct serials, each certificate verifies against the CA and is what the reply says.
    issued = {}
    ca = x509.load_pem_x509_certificate((daemon.identity / "ca.cert.pem").read_bytes())
    for client_id, _, reply, _ in results:
        assert reply["serial"] not in issued, f"serial {reply['serial']} issued twice"
        pem = reply["signed_x509_pem"].encode()
        certificate = x509.load_pem_x509_certificate(pem)
        certificate.verify_directly_issued_by(ca)
        assert format(certificate.serial_number, "X").zfill(len(reply["serial"])) == reply["serial"]
        assert certificate.fingerprint(hashes.SHA256()).hex() == reply["sha256_fingerprint"]
        issued[reply["serial"]] = (client_id, pem, reply["sha256_fingerprint"])
    assert len(issued) == len(results)

    # Each has its audit line, with its client id and fingerprint.
    log = daemon.output()
    audited = {}
    for match in re.finditer(r'audit outcome=issued client_id="(\w+)" subject="[^"]*" '
                             r'serial="([0-9A-F]+)" sha256="([0-9a-f]{64})"', log):
        assert match[2] not in audited, f"two audit lines for {match[2]}"
        audited[match[2]] = (match[1], match[3])
    assert audited == {serial: (client_id, fingerprint)
                       for serial, (client_id, _, fingerprint) in issued.items()}
    assert "Traceback" not in log and ": ERROR:" not in log

    # Each is in the store once, byte for byte, with its client id.
    rows = daemon.stored()
    recorded = {row["serial"]: (row["client_id"], row["certificate"].public_bytes(
        serialization.Encoding.PEM)) for row in rows}
    assert len(recorded) == len(rows)
    assert recorded == {serial: (client_id, pem) for serial, (client_id, pem, _) in issued.items()}
    status, health, _ = daemon.curl("/api/health")
    assert status == 200 and health["certificates_issued"] == len(issued), health
