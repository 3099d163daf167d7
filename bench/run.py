#!/usr/bin/env python3
"""sapid's benchmark: sapid against cfssl and against the in-process ceiling, by key type and
concurrency, in one run. See bench/README.md.

    python3 bench/run.py                    # everything (about 5 minutes with the defaults)
    python3 bench/run.py --smoke            # a few hundred requests to sapid; exit 1 on any error
    python3 bench/run.py --keys p256 --concurrency 8,128 --duration 10 --output result.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # bench/ is not a package: found through sys.path

SAPID = [sys.executable, str(ROOT / "sapid")]
PASSPHRASE = "sapid bench passphrase"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEY_LABELS = {"p256": "EC P-256", "rsa2048": "RSA-2048", "ed25519": "Ed25519"}
CFSSL_KEYS = {"p256": {"algo": "ecdsa", "size": 256}, "rsa2048": {"algo": "rsa", "size": 2048}}
OPENSSL_SPEED = {"p256": "ecdsap256", "rsa2048": "rsa2048", "ed25519": "ed25519"}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes under test
# ---------------------------------------------------------------------------------------------

def proc_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (sapid's forked workers)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as file:
                    pending.extend(int(child) for child in file.read().split())
        except OSError:
            pass
    return found


def proc_status(pid: int) -> dict:
    """VmRSS, VmHWM, ... of /proc/<pid>/status and Pss of its smaps_rollup, in KiB, added up
    over its process tree.  Pss shares each page among the processes that map it, so forked
    workers' sum counts their common memory once, where the sum of VmRSS counts it each time."""
    figures = {}
    for member in proc_tree(pid):
        for source, wanted in (("status", "Vm"), ("smaps_rollup", "Pss")):
            try:
                with open(f"/proc/{member}/{source}") as file:
                    for line in file:
                        name, _, value = line.partition(":")
                        if name.startswith(wanted) and value.strip().endswith("kB"):
                            figures[name] = figures.get(name, 0) + int(value.split()[0])
            except OSError:
                pass
    return figures


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` and its workers so far."""
    total = 0
    for member in proc_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as file:
                fields = file.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process) so far."""
    with open("/proc/stat") as file:
        ticks = [int(value) for value in file.readline().split()[1:]]
    idle = ticks[3] + ticks[4]          # idle and iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def clean_env(**extra) -> dict:
    """The environment sapid runs with here.  PYTHONDONTWRITEBYTECODE goes too: without its
    bytecode cached (pip caches it at install) every start compiles sapid.py, which costs
    0.1 s and 8 MiB of RSS that an installed sapid does not pay."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
                        "CREDENTIALS_DIRECTORY", "INVOCATION_ID", "JOURNAL_STREAM",
                        "WATCHDOG_USEC", "WATCHDOG_PID", "SAPID_CONFIG", "CA_PASSPHRASE",
                        "PYTHONDONTWRITEBYTECODE")}
    env.update(extra)
    return env


class Server:
    """A server process started by this script, stopped by its pid."""

    name = "?"
    process: subprocess.Popen | None = None
    ready_seconds = float("nan")
    idle_rss_kib = idle_pss_kib = 0

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"{self.name}.log"

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def status(self) -> dict:
        return proc_status(self.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                say(f"{self.name} (pid {self.pid}) ignored SIGTERM for 20 s; killing it")
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# Hooks that run for every signing and change nothing: what the pool path costs by itself.
NOOP_HOOKS = """\
import sapid


class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        return None

    def presign(self, draft):
        pass

    def postsign(self, certificate):
        pass
"""


class Sapid(Server):
    name = "sapid"

    def __init__(self, folder: Path, key: str, workers: str = "1", hooks: bool = False,
                 checkout: Path | None = None):
        if hooks:
            self.name = "sapid+hooks"
        if checkout is not None:
            self.name = "baseline"
        super().__init__(folder, key)
        self.workers, self.hooks = workers, hooks
        self.command = [sys.executable, str(checkout / "sapid")] if checkout else SAPID
        self.identity = folder / "identity"
        self.socket = folder / "sapid.sock"
        self.notify_path = folder / "notify.sock"
        self.config = folder / "sapid.conf"
        self.ca_path = self.identity / "ca.cert.pem"

    def prepare(self) -> None:
        done = subprocess.run(
            [*self.command, "init", "-d", str(self.identity), "--key", self.key,
             "-f", "CN", f"sapid bench CA {self.key}", "-f", "O", "sapid bench"],
            env=clean_env(CA_PASSPHRASE=PASSPHRASE), capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            raise SystemExit(f"sapid init failed:\n{done.stdout}{done.stderr}")
        hooks = ""
        if self.hooks:
            hooks = f" {folder_file(self.folder / 'hooks.py', NOOP_HOOKS)}"
        self.config.write_text(
            "[sapid]\n"
            f"identity = {self.identity}\n"
            f"state = {self.folder / 'state'}\n"
            f"socket = {self.socket}\n"
            f"workers = {self.workers}\n"
            f"hooks ={hooks}\n")

    def start(self) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path.unlink(missing_ok=True)        # left by an earlier start
        notify.bind(str(self.notify_path))
        log = open(self.log_path, "ab")
        try:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                [*self.command, "serve", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
                env=clean_env(CA_PASSPHRASE=PASSPHRASE, NOTIFY_SOCKET=str(self.notify_path)))
            deadline = started + 60
            notify.settimeout(0.1)
            while True:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    if self.process.poll() is not None:
                        raise SystemExit(f"sapid exited {self.process.returncode} before "
                                         f"READY=1:\n{self.log_tail()}") from None
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"sapid sent no READY=1 in 60 s:\n{self.log_tail()}"
                                         ) from None
                    continue
                if "READY=1" in message.split("\n"):
                    self.ready_seconds = time.perf_counter() - started
                    break
        finally:
            notify.close()
            log.close()
        figures = self.status()
        self.idle_rss_kib, self.idle_pss_kib = figures["VmRSS"], figures.get("Pss", 0)

    def target(self) -> loadgen.Target:
        return loadgen.SapidTarget(str(self.socket))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cfssl(Server):
    name = "cfssl"

    def __init__(self, folder: Path, key: str):
        super().__init__(folder, key)
        self.ca_path = folder / "ca.pem"
        self.ca_key = folder / "ca-key.pem"
        self.config = folder / "config.json"
        self.port = 0

    def prepare(self) -> None:
        request = folder_file(self.folder / "ca-csr.json", json.dumps({
            "CN": f"cfssl bench CA {self.key}", "key": CFSSL_KEYS[self.key],
            "names": [{"O": "sapid bench"}]}))
        done = subprocess.run(["cfssl", "gencert", "-initca", str(request)],
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            raise SystemExit(f"cfssl gencert -initca failed:\n{done.stderr}")
        made = json.loads(done.stdout)
        folder_file(self.ca_path, made["cert"])
        folder_file(self.ca_key, made["key"], 0o600)
        folder_file(self.config, json.dumps({"signing": {"default": {
            "usages": ["signing", "key encipherment", "server auth", "client auth"],
            "expiry": "8760h"}}}, indent=2))

    def start(self) -> None:
        self.port = free_port()
        log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            ["cfssl", "serve", "-address", "127.0.0.1", "-port", str(self.port),
             "-ca", str(self.ca_path), "-ca-key", str(self.ca_key), "-config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = started + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None:
                    raise SystemExit(f"cfssl exited {self.process.returncode}:\n"
                                     f"{self.log_tail()}") from None
                if time.perf_counter() > deadline:
                    raise SystemExit(f"cfssl did not listen in 60 s:\n{self.log_tail()}"
                                     ) from None
                time.sleep(0.005)
        self.ready_seconds = time.perf_counter() - started
        self.idle_rss_kib = self.status()["VmRSS"]

    def target(self) -> loadgen.Target:
        return loadgen.CfsslTarget(("127.0.0.1", self.port))


def folder_file(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One measured row: a server (or the ceiling) at one concurrency."""

    key: str
    server: str
    concurrency: int
    rate: float
    p50: float
    p99: float
    answers: int = 0
    errors: int = 0
    verified: int = 0
    server_cpu_ms: float = float("nan")      # server CPU per answer
    loadgen_cpu_us: float = float("nan")     # load generator CPU per answer
    verify_seconds: float = 0.0
    others_cores: float = float("nan")       # CPU that other processes used meanwhile, in cores
    rounds: int = 1
    stopped_by: str = "duration"
    connections: int = 0
    generator: str = "loop"
    reasons: dict = field(default_factory=dict)


def measure(server: Server, pool: loadgen.CsrPool, requests: list, ca, concurrency: int,
            duration: float, cap: int, generator: str = "loop") -> Cell:
    target = server.target()
    busy_before, cpu_before, wall_before = machine_busy(), server.cpu(), time.perf_counter()
    result = loadgen.LOAD_GENERATORS[generator](target, requests, concurrency, duration, cap)
    cpu_used = server.cpu() - cpu_before
    wall = time.perf_counter() - wall_before
    others = machine_busy() - busy_before - cpu_used - result.cpu_seconds
    verdict = loadgen.verify(result, target, ca, pool)
    latencies = result.latencies_ms()
    answers = len(result.records)
    cell = Cell(pool.key, server.name, concurrency, result.rate,
                loadgen.percentile(latencies, 0.50), loadgen.percentile(latencies, 0.99),
                answers=answers, errors=verdict.errors, verified=verdict.verified,
                server_cpu_ms=cpu_used / answers * 1e3 if answers else float("nan"),
                loadgen_cpu_us=result.cpu_per_request_us, verify_seconds=verdict.seconds,
                others_cores=max(0.0, others / wall), stopped_by=result.stopped_by,
                connections=result.connections, generator=generator,
                reasons=dict(verdict.reasons.most_common(5)))
    say(f"  {pool.key:8} {server.name:6} c={concurrency:<4} {generator:7} {cell.rate:8.1f} req/s  "
        f"p50 {cell.p50:7.1f} ms  p99 {cell.p99:7.1f} ms  errors {cell.errors}  "
        f"verified {cell.verified}/{answers} in {verdict.seconds:.1f} s  "
        f"{result.connections} connections  (others used {cell.others_cores:.2f} cores)")
    for reason, number in cell.reasons.items():
        say(f"      {number} x {reason}")
    if not server.alive():
        say(f"  {server.name} died (exit {server.process.returncode}):\n{server.log_tail()}")
    return cell


def load_ca_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    return serialization.load_pem_private_key(path.read_bytes(), PASSPHRASE.encode())


def ceiling(key: str, ca_key, ca_certificate, pool: loadgen.CsrPool, threads: int,
            duration: float, cap: int) -> Cell:
    """What one Python process does with cryptography alone: parse the CSR, verify its
    signature, build sapid's default profile, sign, encode PEM, fingerprint. No HTTP, no disk."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID

    digest = None if key == "ed25519" else hashes.SHA256()
    issuer = ca_certificate.subject
    ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    constant = [
        x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(False, None)),
        x509.Extension(x509.ExtendedKeyUsage.oid, False, x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])),
        x509.Extension(x509.AuthorityKeyIdentifier.oid, False, aki)]

    def usage(encipherment: bool):
        return x509.Extension(x509.KeyUsage.oid, True, x509.KeyUsage(
            True, False, encipherment, False, False, False, False, False, False))

    usages = {True: usage(True), False: usage(False)}
    backdate, validity = datetime.timedelta(minutes=5), datetime.timedelta(days=365)

    def issue(pem: bytes) -> bytes:
        csr = x509.load_pem_x509_csr(pem)
        if not csr.is_signature_valid:
            raise ValueError("bad CSR signature")
        public_key = csr.public_key()
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        now = datetime.datetime.now(datetime.UTC)
        extensions = [*constant, usages[isinstance(public_key, rsa.RSAPublicKey)],
                      x509.Extension(x509.SubjectKeyIdentifier.oid, False,
                                     x509.SubjectKeyIdentifier.from_public_key(public_key)),
                      x509.Extension(san.oid, False, san.value)]
        certificate = x509.CertificateBuilder(
            issuer_name=issuer, subject_name=csr.subject, public_key=public_key,
            serial_number=secrets.randbits(159) | 1, not_valid_before=now - backdate,
            not_valid_after=now + validity, extensions=extensions).sign(ca_key, digest)
        certificate.fingerprint(hashes.SHA256())
        return certificate.public_bytes(serialization.Encoding.PEM)

    issue(pool.pems[0])                     # warm-up, and a check that it works
    counter = itertools.count()
    pems = pool.pems
    perf = time.perf_counter

    def worker(deadline: float) -> list:
        times = []
        for number in counter:
            if number >= cap:
                break
            started = perf()
            if started >= deadline:
                break
            issue(pems[number % len(pems)])
            times.append(perf() - started)
        return times

    with concurrent.futures.ThreadPoolExecutor(threads) as executor:
        busy, cpu, started = machine_busy(), time.process_time(), perf()
        futures = [executor.submit(worker, started + duration) for _ in range(threads)]
        times = [t for future in futures for t in future.result()]
        elapsed = perf() - started
        used = time.process_time() - cpu
        others = machine_busy() - busy - used
    latencies = sorted(t * 1e3 for t in times)
    cell = Cell(key, "ceiling", threads, len(times) / elapsed,
                loadgen.percentile(latencies, 0.5), loadgen.percentile(latencies, 0.99),
                len(times), verified=len(times), others_cores=max(0.0, others / elapsed),
                server_cpu_ms=used / len(times) * 1e3 if times else float("nan"))
    say(f"  {key:8} ceiling {threads} thread(s): {cell.rate:8.1f} signatures/s  "
        f"(others used {cell.others_cores:.2f} cores)")
    return cell


def file_creation_us(folder: Path, count: int = 300) -> float:
    """CPU microseconds to create one small file in ``folder``, as sapid's index files are.
    Kept, not deleted: deleting many files makes the next creations dearer on some
    filesystems (bench/README.md, "Where the time goes")."""
    folder.mkdir(parents=True, exist_ok=True)
    data = b"x" * 1000
    started = time.process_time()
    for _ in range(count):
        fd = os.open(folder / secrets.token_hex(16), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
    return (time.process_time() - started) * 1e6 / count


def openssl_speed(key: str, seconds: int = 3) -> float:
    """Sign operations per second of ``openssl speed`` on one core; nan if it fails."""
    try:
        done = subprocess.run(["openssl", "speed", "-mr", "-seconds", str(seconds),
                               OPENSSL_SPEED[key]], capture_output=True, text=True,
                              timeout=seconds * 10 + 30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return float("nan")
    for line in done.stdout.splitlines():
        if line.startswith("+F"):
            return float(line.split(":")[-2])
    return float("nan")


def best_of(rounds: list) -> Cell:
    """The round with the highest rate (other tenants only ever slow a round down), with the
    errors of every round added up, so none is hidden."""
    best = max(rounds, key=lambda cell: cell.rate)
    merged = {}
    for cell in rounds:
        for reason, count in cell.reasons.items():
            merged[reason] = merged.get(reason, 0) + count
    return Cell(**{**best.__dict__, "errors": sum(c.errors for c in rounds),
                   "reasons": merged, "rounds": len(rounds)})


def warm_up(server: Server, pool: loadgen.CsrPool, requests: list, ca) -> None:
    target = server.target()
    result = loadgen.run_load(target, requests, 2, 5.0, 32)
    verdict = loadgen.verify(result, target, ca, pool)
    if verdict.errors or not result.records:
        say(f"  warm-up of {server.name} had {verdict.errors} errors: "
            f"{dict(verdict.reasons)}\n{server.log_tail()}")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend
    facts = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "cryptography's OpenSSL": backend.openssl_version_text(),
    }
    if shutil.which("openssl"):
        facts["openssl"] = subprocess.run(["openssl", "version"], capture_output=True,
                                          text=True, check=False).stdout.strip()
    if shutil.which("cfssl"):
        version = subprocess.run(["cfssl", "version"], capture_output=True, text=True,
                                 check=False).stdout
        facts["cfssl"] = " ".join(line.split(":", 1)[1].strip() for line in version.splitlines()
                                  if line.startswith(("Version", "Runtime")))
    return facts


def number(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def ratio(value: float, reference: float | None) -> str:
    if not reference or math.isnan(reference) or math.isnan(value):
        return "—"
    return f"{value / reference:.2f}"


# Rows whose rate is also given relative to sapid's (the column ×sapid).
RELATIVE = ("sapid+hooks", "baseline")


def key_table(key: str, cells: list) -> str:
    rows = [c for c in cells if c.key == key]
    cfssl = {c.concurrency: c.rate for c in rows if c.server == "cfssl"}
    builtin = {c.concurrency: c.rate for c in rows if c.server == "sapid"}
    ceilings = [c.rate for c in rows if c.server == "ceiling"]
    best = max(ceilings) if ceilings else None
    # What cryptography alone needs per certificate, on one thread: sapid's overhead is its
    # server CPU per request less this.
    floor = next((c.server_cpu_ms for c in rows if c.server == "ceiling" and c.concurrency == 1),
                 float("nan"))
    lines = [
        f"### {KEY_LABELS[key]}",
        "",
        ("| server | concurrency | requests/s | p50 (ms) | p99 (ms) | errors | server CPU "
         "(ms/req) | overhead (ms/req) | load gen CPU (µs/req) | others' CPU (cores) "
         "| ×cfssl | ×ceiling | ×sapid |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {"sapid": 0, "sapid+hooks": 1, "baseline": 2, "cfssl": 3, "ceiling": 4}
    for c in sorted(rows, key=lambda c: (c.server == "ceiling", c.concurrency, order[c.server])):
        ceiling_row = c.server == "ceiling"
        sapid_row = c.server.startswith("sapid") or c.server == "baseline"
        server = (f"ceiling, {c.concurrency} thread{'s' if c.concurrency > 1 else ''}"
                  if ceiling_row else c.server)
        lines.append(
            f"| {server} | {c.concurrency} | {number(c.rate)} | {number(c.p50, 2)} | "
            f"{number(c.p99, 2)} | {'—' if ceiling_row else c.errors} | "
            f"{number(c.server_cpu_ms, 2)} | "
            f"{number(c.server_cpu_ms - floor, 2) if sapid_row else '—'} | "
            f"{'—' if ceiling_row else number(c.loadgen_cpu_us, 0)} | "
            f"{number(c.others_cores, 2)} | "
            f"{ratio(c.rate, cfssl.get(c.concurrency)) if sapid_row else '—'} | "
            f"{ratio(c.rate, best) if sapid_row else '—'} | "
            f"{ratio(c.rate, builtin.get(c.concurrency)) if c.server in RELATIVE else '—'} |")
    return "\n".join(lines)


def loadgen_table(checks: list) -> str:
    """The same servers measured by both load generators in turn: each round's pair, and the
    thread-per-connection rate over the event loop's."""
    lines = ["### The two load generators", "",
             "| key | server | concurrency | round | event loop (req/s) | thread per connection "
             "(req/s) | threads/loop | event loop CPU (µs/req) | threads CPU (µs/req) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    pairs = {}
    for cell in checks:
        pairs.setdefault((cell.key, cell.server, cell.concurrency), []).append(cell)
    for (key, server, concurrency), found in pairs.items():
        loops = [c for c in found if c.generator == "loop"]
        threads = [c for c in found if c.generator == "threads"]
        for number_, (loop, thread) in enumerate(zip(loops, threads), 1):
            lines.append(f"| {KEY_LABELS[key]} | {server} | {concurrency} | {number_} | "
                         f"{number(loop.rate)} | {number(thread.rate)} | "
                         f"{ratio(thread.rate, loop.rate)} | {number(loop.loadgen_cpu_us, 0)} | "
                         f"{number(thread.loadgen_cpu_us, 0)} |")
    return "\n".join(lines)


def summary_table(keys: list, cells: list, servers: dict, speeds: dict,
                  creation: dict) -> str:
    lines = [
        "### Processes",
        "",
        ("| key | sapid start to READY=1 (s) | sapid idle RSS (MiB) | sapid peak RSS (MiB) | "
         "sapid idle PSS (MiB) | file creation (µs) | cfssl start to listening (s) | "
         "cfssl peak RSS (MiB) | openssl speed (sign/s, 1 core) "
         "| load gen CPU (µs/req, median) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        found = servers.get(key, {})
        sapid, cfssl = found.get("sapid"), found.get("cfssl")
        loadgen_cpu = [c.loadgen_cpu_us for c in cells
                       if c.key == key and c.server != "ceiling" and c.answers]
        lines.append(
            f"| {KEY_LABELS[key]} | "
            f"{number(sapid['ready'], 2) if sapid else '—'} | "
            f"{number(sapid['idle'] / 1024) if sapid else '—'} | "
            f"{number(sapid['peak'] / 1024) if sapid else '—'} | "
            f"{number(sapid['pss'] / 1024) if sapid else '—'} | "
            f"{number(creation[key], 0) if key in creation else '—'} | "
            f"{number(cfssl['ready'], 3) if cfssl else '—'} | "
            f"{number(cfssl['peak'] / 1024) if cfssl else '—'} | "
            f"{number(speeds[key], 0) if key in speeds else '—'} | "
            f"{number(statistics.median(loadgen_cpu), 0) if loadgen_cpu else '—'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per cell and round (default 4; 60 as a cap in --smoke)")
    parser.add_argument("--requests", type=int, default=None,
                        help="request cap per cell (default 20000; 150 in --smoke)")
    parser.add_argument("--keys", default=None,
                        help="comma-separated: p256,rsa2048,ed25519 (the default; p256 in --smoke)")
    parser.add_argument("--concurrency", default=None,
                        help="comma-separated (default 1,2,8,32,128; 1,8 in --smoke)")
    parser.add_argument("--servers", default="sapid,cfssl,ceiling",
                        help="which of sapid,sapid+hooks,cfssl,ceiling to measure (default "
                             "sapid,cfssl,ceiling; sapid+hooks is sapid with hooks that do "
                             "nothing, run for every signing)")
    parser.add_argument("--workers", default="1",
                        help="sapid's workers setting: a number, or auto (one per core); "
                             "default 1")
    parser.add_argument("--baseline", metavar="CHECKOUT", type=Path,
                        help="also measure the sapid of another checkout (an earlier commit, "
                             "say: git worktree add /tmp/base COMMIT), with the same settings, "
                             "taking turns with the others")
    parser.add_argument("--loadgen-check", metavar="C", type=int, default=0,
                        help="also measure each server at concurrency C with both load "
                             "generators (one event loop, a thread per connection), taking "
                             "turns, and report how far they agree")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measure each cell this many times, servers taking turns, and "
                             "keep the fastest (default 2; 1 in --smoke)")
    parser.add_argument("--pool", type=int, default=64, help="distinct CSRs per key (default 64)")
    parser.add_argument("--no-openssl-speed", action="store_true",
                        help="skip openssl speed (about 20 s)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few hundred requests to sapid only; exit 1 on any error")
    parser.add_argument("--output", metavar="FILE", help="also write the Markdown report here")
    parser.add_argument("--json", metavar="FILE", help="write every cell as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its logs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration = args.duration or 60.0
        args.requests = args.requests or 150
        args.keys = args.keys or "p256"
        args.concurrency = args.concurrency or "1,8"
        args.servers = "sapid"
        args.no_openssl_speed = True
        args.rounds = args.rounds or 1
    args.rounds = max(1, args.rounds or 2)
    args.duration = args.duration or 4.0
    args.requests = args.requests or 20000
    args.keys = [k.strip() for k in (args.keys or "p256,rsa2048,ed25519").split(",") if k.strip()]
    args.concurrency = [int(c) for c in (args.concurrency or "1,2,8,32,128").split(",")]
    args.servers = {s.strip() for s in args.servers.split(",") if s.strip()}
    for key in args.keys:
        if key not in KEY_LABELS:
            parser.error(f"--keys: {key!r} is not one of {', '.join(KEY_LABELS)}")
    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) >= 1):
        parser.error(f"--workers: a number or auto, not {args.workers!r}")
    if args.servers - {"sapid", "sapid+hooks", "cfssl", "ceiling"}:
        parser.error(f"--servers: unknown {', '.join(sorted(args.servers))}")
    if args.baseline and not (args.baseline / "sapid").is_file():
        parser.error(f"--baseline: no sapid in {args.baseline}")
    if "cfssl" in args.servers and not shutil.which("cfssl"):
        parser.error("cfssl is not installed (apt-get install golang-cfssl), or leave it out: "
                     "--servers sapid,ceiling")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sapid-bench-"))
    facts = machine()
    threads = facts["nproc"]
    say(f"work folder {work}; {facts['nproc']} cores, {facts['cpu']}")
    cells, servers, speeds, creation, running, checks = [], {}, {}, {}, [], []
    failed = []
    from cryptography import x509
    try:
        if not args.no_openssl_speed:
            for key in args.keys:
                speeds[key] = openssl_speed(key)
                say(f"openssl speed {OPENSSL_SPEED[key]}: {speeds[key]:,.0f} sign/s")
        for key in args.keys:
            pool = loadgen.make_pool(key, args.pool)
            say(f"{KEY_LABELS[key]}: {len(pool.pems)} CSRs made in {pool.seconds:.1f} s")
            creation[key] = file_creation_us(work / "file-creation" / key)
            say(f"  creating a file: {creation[key]:,.0f} µs of CPU")
            present = []
            if "sapid" in args.servers or "ceiling" in args.servers:
                sapid = Sapid(work / key / "sapid", key, args.workers)
                sapid.prepare()
                if "ceiling" in args.servers:
                    ca_key = load_ca_key(sapid.identity / "ca.private_key.pem")
                    ca = x509.load_pem_x509_certificate(sapid.ca_path.read_bytes())
                    for count in sorted({1, threads}):
                        cells.append(best_of([
                            ceiling(key, ca_key, ca, pool, count, args.duration, args.requests)
                            for _ in range(args.rounds)]))
                    del ca_key
                if "sapid" in args.servers:
                    present.append(sapid)
            if "sapid+hooks" in args.servers:
                hooked = Sapid(work / key / "sapid+hooks", key, args.workers, hooks=True)
                hooked.prepare()
                present.append(hooked)
            if args.baseline:
                baseline = Sapid(work / key / "baseline", key, args.workers,
                                 checkout=args.baseline)
                baseline.prepare()
                present.append(baseline)
            for server in present:
                running.append(server)
                server.start()
                say(f"  {server.name} pid {server.pid} READY=1 after "
                    f"{server.ready_seconds:.2f} s, RSS {server.idle_rss_kib / 1024:.1f} MiB, "
                    f"PSS {server.idle_pss_kib / 1024:.1f} MiB")
            if "cfssl" in args.servers and key in CFSSL_KEYS:
                cfssl = Cfssl(work / key / "cfssl", key)
                cfssl.prepare()
                running.append(cfssl)
                cfssl.start()
                say(f"  cfssl pid {cfssl.pid} listening after {cfssl.ready_seconds:.3f} s")
                present.append(cfssl)
            prepared = {}
            for server in present:
                target = server.target()
                ca = x509.load_pem_x509_certificate(server.ca_path.read_bytes())
                prepared[server.name] = (target.requests(pool), ca)
                warm_up(server, pool, *prepared[server.name])
            # Servers take turns at each concurrency, round after round, so that their ratio
            # is measured close in time on a machine that others share.
            for concurrency in args.concurrency:
                rounds = {server.name: [] for server in present}
                for _ in range(args.rounds):
                    for server in present:
                        if not server.alive():
                            failed.append(f"{key} {server.name} c={concurrency}: "
                                          "server not running")
                            continue
                        requests, ca = prepared[server.name]
                        cell = measure(server, pool, requests, ca, concurrency, args.duration,
                                       args.requests)
                        rounds[server.name].append(cell)
                        if server.name != "cfssl" and (
                                cell.errors or not cell.answers or cell.verified != cell.answers):
                            failed.append(f"{key} sapid c={concurrency}: {cell.errors} errors, "
                                          f"{cell.verified}/{cell.answers} verified "
                                          f"{cell.reasons}")
                cells.extend(best_of(found) for found in rounds.values() if found)
            if args.loadgen_check:
                for server in present:
                    requests, ca = prepared[server.name]
                    for _ in range(args.rounds):
                        for generator in loadgen.LOAD_GENERATORS:
                            checks.append(measure(server, pool, requests, ca,
                                                  args.loadgen_check, args.duration,
                                                  args.requests, generator))
            for server in present:
                figures = server.status() if server.alive() else {}
                servers.setdefault(key, {})[server.name] = {
                    "ready": server.ready_seconds, "idle": server.idle_rss_kib,
                    "pss": server.idle_pss_kib,
                    "peak": figures.get("VmHWM", float("nan"))}
                code = server.stop()
                running.remove(server)
                if server.name != "cfssl" and code not in (0, None):
                    failed.append(f"{key} sapid exited {code} on SIGTERM:\n{server.log_tail()}")
    finally:
        for server in running:
            server.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    today = datetime.date.today().isoformat()
    parts = [f"## {today}: " + ", ".join(f"{k} {v}" for k, v in facts.items()), "",
             f"best of {args.rounds} round(s) of {args.duration:g} s per cell (cap "
             f"{args.requests} requests), CSR pool of "
             f"{args.pool} per key, concurrency {', '.join(map(str, args.concurrency))}; "
             f"ceiling with 1 and {threads} threads; sapid with workers = {args.workers}."
             + (" Smoke run: sapid only." if args.smoke else ""), ""]
    for key in args.keys:
        parts += [key_table(key, cells), ""]
    parts += [summary_table(args.keys, cells, servers, speeds, creation), ""]
    if checks:
        parts += [loadgen_table(checks), ""]
    if failed:
        parts += ["Failures:", "", *[f"- {line}" for line in failed], ""]
    report = "\n".join(parts)
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": facts, "servers": servers, "openssl_speed": speeds,
             "file_creation_us": creation,
             "cells": [cell.__dict__ for cell in cells],
             "loadgen_check": [cell.__dict__ for cell in checks]}, indent=1, default=str))
    if failed:
        say("FAILED:\n" + "\n".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
