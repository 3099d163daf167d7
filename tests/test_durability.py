"""Durable before the answer (DESIGN.md "Store"), seen in the system calls: under ``strace -f``,
every answer that carries a certificate is sent after a sync of the store's write-ahead log
that came after the write of that certificate's bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import datetime
import sqlite3
import threading
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import sapid
from conftest import ROOT, SAPID, KeepAliveClient as Client, make_csr, run

CALL = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")
FD = re.compile(r"^(\d+)<([^>]*)>")
HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


def events(lines: list[str]) -> list[tuple]:
    """(kind, detail) in the order the calls happened: ("write", bytes) for a write to the WAL,
    ("synced",) when a sync of the WAL returned, ("send", bytes) when a send to a client began.
    A call strace shows in two parts counts where it began (a send) or where it ended (a sync);
    the pid's pending call is remembered in between."""
    pending = {}           # pid -> (name, arguments so far) of an unfinished call
    found = []
    for line in lines:
        match = CALL.match(line)
        if not match:
            continue
        pid, resumed, name, rest = match.groups()
        if resumed:
            name, before = pending.pop(pid, (resumed, ""))
            rest = before + rest
            finished = True
        else:
            finished = not rest.endswith("<unfinished ...>")
            if not finished:
                pending[pid] = (name, rest.removesuffix("<unfinished ...>"))
        fd = FD.match(rest)
        if fd is None:
            continue
        target = unhex(fd[2]).decode(errors="replace")      # -xx escapes paths too
        if name in ("sendto", "sendmsg", "write") and target.startswith("socket:") and (
                not resumed):
            data = HEX.search(rest)
            if data and unhex(data[1]).startswith(b"HTTP/1.1 "):
                found.append(("send", unhex(data[1])))
        elif name in ("pwrite64", "write") and target.endswith("sapid.db-wal") and finished:
            data = HEX.search(rest)
            if data:
                found.append(("write", unhex(data[1])))
        elif name in ("fsync", "fdatasync") and target.endswith("sapid.db-wal") and finished:
            if re.search(r"= 0$", rest):
                found.append(("synced",))
    return found


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def violations(found: list[tuple]) -> tuple[int, list[str]]:
    """(answers checked, serials answered with no sync of their write before the answer)."""
    writes = []            # (position, data) of WAL writes
    syncs = []             # positions of completed syncs
    checked, bad = 0, []
    for position, event in enumerate(found):
        if event[0] == "write":
            writes.append((position, event[1]))
        elif event[0] == "synced":
            syncs.append(position)
        elif b"signed_x509_pem" in event[1]:
            body = json.loads(event[1].partition(b"\r\n\r\n")[2])
            der = x509.load_pem_x509_certificate(body["signed_x509_pem"].encode()).public_bytes(
                serialization.Encoding.DER)
            written = next((at for at, data in writes if der in data), None)
            checked += 1
            if written is None or not any(written < at < position for at in syncs):
                bad.append(body["serial"])
    return checked, bad


def test_each_answer_follows_a_sync_of_its_certificate(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    trace = tmp_path / "strace.log"
    daemon.start(command=[
        "strace", "-f", "-qq", "-o", str(trace), "-y", "-xx", "-s", "65536",
        "-e", "trace=write,pwrite64,fsync,fdatasync,sendto,sendmsg", "-e", "signal=none",
        *SAPID, "serve", "-c", str(daemon.config)])
    csrs = [make_csr(tmp_path, name=f"d{n}").read_bytes() for n in range(4)]

    def client(number):
        connection = Client(daemon.socket, timeout=60)
        try:
            return [connection.sign(csrs[(number + i) % 4], f"sync{number}") for i in range(5)]
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:      # concurrent: commits are shared
        answers = [answer for batch in pool.map(client, range(8)) for answer in batch]
    assert all(status == 200 for status, _ in answers), answers[:2]
    with open(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children") as file:
        sapid_pid = int(file.read().split()[0])       # strace's child: the daemon
    os.kill(sapid_pid, signal.SIGTERM)
    assert daemon.process.wait(30) == 0
    found = events(trace.read_text(errors="replace").splitlines())
    checked, bad = violations(found)
    assert checked == len(answers) == 40, (checked, len(found))
    assert not bad, f"{len(bad)} answers sent before their certificate was synced: {bad[:3]}"
    syncs = sum(event[0] == "synced" for event in found)
    print(f"\n40 answers after {syncs} syncs of the write-ahead log")
    assert syncs <= 40
    # The twin: the same calls without the syncs are caught, every answer.
    assert violations([event for event in found if event[0] != "synced"]) == (
        40, [body for body in (json.loads(event[1].partition(b"\r\n\r\n")[2])["serial"]
                               for event in found if event[0] == "send"
                               and b"signed_x509_pem" in event[1])])


def records(count: int) -> list:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "group.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    made = []
    for serial in range(1, count + 1):
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(key.public_key()).serial_number(serial)
                       .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                       .sign(key, hashes.SHA256()))
        made.append(sapid.Record.of(certificate, certificate.public_bytes(
            serialization.Encoding.DER), f"group{serial}"))
    return made


def test_issuances_made_during_a_commit_share_the_next_one(tmp_path):
    """50 records submitted from 50 threads while the first commit waits for another writer's
    lock: two commits in all, the first one's and one for the other 49, none waiting for more
    than one commit of another's; each ticket done, each record in the store."""
    database = tmp_path / "sapid.db"
    store = sapid.SQLiteStore(str(database))
    store.prepare()
    committer = sapid.Committer(store)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    made = records(50)
    tickets = [None] * len(made)
    tickets[0] = committer.submit(made[0])
    committer.flush()
    deadline = time.monotonic() + 10
    while committer.queued:           # the committer has taken it, and waits for the lock
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def submit(number):
        tickets[number] = committer.submit(made[number])
        committer.flush()             # as a pool thread's wait does: a commit runs, so no-op
    threads = [threading.Thread(target=submit, args=(n,)) for n in range(1, len(made))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert committer.batches == 0 and not any(ticket.done for ticket in tickets)
    holder.execute("ROLLBACK")
    for ticket in tickets:
        committer.wait(ticket)
    assert committer.batches == 2, committer.batches
    assert all(t.done and t.error is None and not t.taken for t in tickets)
    committer.close()
    assert store.count() == 50
    assert sorted(r.serial for r in store.select()) == sorted(r.serial for r in made)
    store.close()


STORE_WRITER = """
import datetime, secrets, sys
sys.path.insert(0, sys.argv[1])
import sapid
store = sapid.SQLiteStore(sys.argv[2])
store.prepare()
now = datetime.datetime.now(datetime.timezone.utc)
for batch in range(10):
    store.add([sapid.Record(secrets.token_hex(16).upper(), f"client{n}", "CN=x", ("DNS:x",), now,
                            now, secrets.token_hex(32), secrets.token_bytes(600), now)
               for n in range(400)])
"""


def test_a_commit_creates_no_temporary_file(tmp_path):
    """A batch's statement journal (the pages it changed) stays in memory: under strace, the
    commits of large batches into a store of thousands open no file but the store's own.  In
    a file, SQLite would create and delete one in /var/tmp at every commit."""
    trace = tmp_path / "strace.log"
    run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat", sys.executable, "-c",
         STORE_WRITER, str(ROOT), str(tmp_path / "sapid.db")])
    created = set(re.findall(r'openat\([^,]*, "([^"]*)", [^)]*O_CREAT', trace.read_text()))
    assert created and all(path.startswith(f"{tmp_path}/") for path in created), created
