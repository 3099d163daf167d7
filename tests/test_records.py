"""Concurrency and the issued records: nothing signed is lost, every serial is distinct."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from cryptography import x509

import sapid
from conftest import SAPID, make_csr, openssl_verify, sapid_env


def test_200_requests_from_20_clients(daemon, tmp_path):
    csrs = [make_csr(tmp_path, key, name=f"c{i}")
            for i, key in enumerate(["p256", "rsa2048", "ed25519", "p384"])]

    def client(number):
        replies = []
        for i in range(10):
            status, reply = daemon.sign(csrs[(number + i) % len(csrs)], f"client{number}")
            replies.append((status, reply))
        return replies

    with ThreadPoolExecutor(20) as pool:
        replies = [r for batch in pool.map(client, range(20)) for r in batch]
    assert len(replies) == 200
    assert all(status == 200 for status, _ in replies), [r for r in replies if r[0] != 200][:3]
    serials = [reply["serial"] for _, reply in replies]
    assert len(set(serials)) == 200
    certs = tmp_path / "certs"
    certs.mkdir()
    paths = []
    for serial, (_, reply) in zip(serials, replies):
        path = certs / f"{serial}.pem"
        path.write_text(reply["signed_x509_pem"])
        paths.append(path)
    verified = openssl_verify(daemon.identity / "ca.cert.pem", *paths)
    assert verified.returncode == 0 and verified.stdout.count(": OK") == 200
    # Every one is recorded: an index file each and one journal record each, and audited.
    index = daemon.state / "issued"
    assert sorted(p.stem for p in index.glob("*.pem")) == sorted(serials)
    journal = (daemon.state / "issued.pem").read_bytes()
    assert journal.count(b"-----BEGIN CERTIFICATE-----") == 200
    assert sorted(c.serial_number for c in x509.load_pem_x509_certificates(journal)) == sorted(
        int(s, 16) for s in serials)
    log = daemon.output()
    assert log.count("audit outcome=issued") == 200
    for serial in serials:
        assert f'serial="{serial}"' in log
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 200


def test_journal_records_and_index_rebuild(daemon_factory, tmp_path):
    daemon = daemon_factory()
    serials = [daemon.sign(make_csr(tmp_path, name=f"r{i}"), f"client{i}")[1]["serial"]
               for i in range(3)]
    journal = daemon.state / "issued.pem"
    text = journal.read_text()
    for i, serial in enumerate(serials):
        assert f"# serial {serial} client client{i} at " in text
        assert (daemon.state / "issued" / f"{serial}.pem").exists()
    assert daemon.stop() == 0
    # Lose an index file, tear the journal's tail as a crash mid-write would: a restart mends both.
    lost = daemon.state / "issued" / f"{serials[1]}.pem"
    expected = lost.read_bytes()
    lost.unlink()
    (daemon.state / "issued" / ".DEAD.1.tmp").write_text("partial")
    with open(journal, "ab") as file:
        file.write(b"# serial 00FF client x at 2026\n-----BEGIN CERTIFICATE-----\nMIIB")
    daemon.start()
    assert lost.read_bytes() == expected
    assert not (daemon.state / "issued" / ".DEAD.1.tmp").exists()
    assert journal.read_bytes().endswith(b"-----END CERTIFICATE-----\n")
    assert len(x509.load_pem_x509_certificates(journal.read_bytes())) == 3
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 3
    assert "unfinished record" in daemon.output()


def test_serial_collision_draws_another(identities, tmp_path):
    """A hooks serial generator that repeats itself: the second draw is taken."""
    records = sapid.Records(str(tmp_path / "state"))
    drawn = iter([7, 7, 8])
    hooks = sapid.HookSet(None, sapid.SigningHooks, sapid.boot, lambda: next(drawn),
                          frozenset({"serial_number"}))
    config = sapid.Config(identity=str(identities("p256")))
    identity = sapid.Identity.load(config.identity, "correct horse battery staple")
    authority = sapid.Authority(config, identity, hooks, records, sapid.HookRunner(2))
    csr = make_csr(tmp_path).read_bytes()
    assert authority.issue(sapid.Signing(csr, "a")).serial == "07"
    assert authority.issue(sapid.Signing(csr, "b")).serial == "08"
    assert sorted(os.listdir(tmp_path / "state" / "issued")) == ["07.pem", "08.pem"]


def test_unwritable_state_gives_503_and_no_certificate(daemon, tmp_path):
    if os.geteuid() == 0:
        # root ignores modes: make the index unusable another way, by a file in its place.
        index = daemon.state / "issued"
        moved = daemon.state / "issued.moved"
        index.rename(moved)
        index.write_text("not a folder")
    status, reply = daemon.sign(make_csr(tmp_path))
    assert (status, reply["error"]) == (503, "store_failed"), reply
    assert "signed_x509_pem" not in reply
    assert b"BEGIN CERTIFICATE" not in (daemon.state / "issued.pem").read_bytes()
    index.unlink()
    moved.rename(index)
    assert daemon.sign(make_csr(tmp_path, name="again"))[0] == 200


def test_a_clean_stop_spares_the_next_start_reading_every_record(daemon_factory, tmp_path):
    """A clean stop notes how the records look; a start that finds them so takes the count
    from the note; a crash, or any change made while stopped, means the whole check again."""
    daemon = daemon_factory()
    csr = make_csr(tmp_path)
    for i in range(3):
        assert daemon.sign(csr, f"c{i}")[0] == 200
    note = daemon.state / "issued.clean"
    assert not note.exists()
    assert daemon.stop() == 0
    assert json.loads(note.read_text())["certificates"] == 3
    daemon.start()
    assert not note.exists()                # used up: from here on a crash is no clean stop
    assert "3 certificates, unchanged since a clean stop" in daemon.output()
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 3
    status, reply = daemon.sign(csr, "c3")
    assert status == 200, reply
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not note.exists()
    # What a crash between an index file and its journal record leaves: found by the check.
    stray = daemon.state / "issued" / "0ABCDEF0.pem"
    stray.write_bytes((daemon.state / "issued" / f"{reply['serial']}.pem").read_bytes())
    daemon.start()
    assert "4 certificates, checked against" in daemon.output()
    assert not stray.exists() and (daemon.state / "unjournaled" / stray.name).exists()
    assert daemon.stop() == 0
    # A journal changed while stopped no longer looks as the note says.
    assert json.loads(note.read_text())["certificates"] == 4
    with open(daemon.state / "issued.pem", "ab") as file:
        file.write(b"# serial 00FF client x at 2026\n-----BEGIN CERTIFICATE-----\nMIIB")
    daemon.start()
    assert daemon.output().count("4 certificates, checked against") == 2
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 4


def test_workers_leave_a_clean_note_only_if_every_worker_ended_well(daemon_factory, tmp_path):
    daemon = daemon_factory(workers=2)
    csr = make_csr(tmp_path)
    for i in range(4):
        assert daemon.sign(csr, f"c{i}")[0] == 200
    assert daemon.stop() == 0
    note = daemon.state / "issued.clean"
    assert json.loads(note.read_text())["certificates"] == 4
    daemon.start()
    assert "4 certificates, unchanged since a clean stop" in daemon.output()
    pid = daemon.process.pid
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        worker = int(file.read().split()[0])
    os.kill(worker, signal.SIGKILL)        # it could have been between index and journal
    deadline = time.monotonic() + 10
    while "ended unexpectedly" not in daemon.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.sign(csr, "c4")[0] == 200
    assert daemon.stop() == 0
    assert not note.exists()
    daemon.start()
    assert "5 certificates, checked against" in daemon.output()


def test_workers_moved_to_another_state_folder_leave_no_clean_note(daemon_factory, tmp_path):
    """After a reload changes ``state``, each worker counts in its own records, so the count
    the supervisor could note would be wrong: the next start checks every record instead."""
    daemon = daemon_factory(workers=2)
    moved = tmp_path / "moved"
    daemon.config.write_text(daemon.config.read_text().replace(f"state = {daemon.state}",
                                                               f"state = {moved}"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    time.sleep(0.5)                                  # the workers reload on their own
    assert daemon.sign(make_csr(tmp_path), "c")[0] == 200
    assert daemon.stop() == 0
    assert not (moved / "issued.clean").exists()
    assert not (daemon.state / "issued.clean").exists()


def test_a_journal_write_waits_for_another_writers_lock(daemon, tmp_path):
    """Forked workers and ``sapid sign`` append to one journal, and a failed write is cut off
    again: each write holds a lock on the journal so that the cut never takes another process's
    record with it. While another process holds that lock, a signing waits."""
    csr = make_csr(tmp_path)
    with open(daemon.state / "issued.pem", "r+b") as journal, ThreadPoolExecutor(1) as pool:
        fcntl.lockf(journal, fcntl.LOCK_EX, 1, 0)  # the write lock: the journal's first byte
        pending = pool.submit(daemon.sign, csr, "waits")
        time.sleep(1.0)
        assert not pending.done()
        fcntl.lockf(journal, fcntl.LOCK_UN, 1, 0)
        status, reply = pending.result(timeout=10)
    assert status == 200, reply
    assert reply["serial"] in (daemon.state / "issued.pem").read_text()


def test_sapid_sign_beside_a_running_daemon_leaves_its_records_alone(daemon, tmp_path):
    """``sapid sign`` checks the records as it opens them, but while the daemon has them open
    an index file the journal lacks may be a record still being written: it stays where it is.
    The daemon's stop then notes nothing, since the records are no longer only what it made,
    and the next start, alone, checks every record and puts the stray aside."""
    csr = make_csr(tmp_path)
    status, reply = daemon.sign(csr, "first")
    assert status == 200, reply
    stray = daemon.state / "issued" / "0ABCDEF0.pem"
    stray.write_bytes((daemon.state / "issued" / f"{reply['serial']}.pem").read_bytes())
    done = subprocess.run([*SAPID, "sign", "-c", str(daemon.config), str(csr)], env=sapid_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert stray.exists() and not (daemon.state / "unjournaled").exists()
    assert daemon.stop() == 0
    assert "changed besides this process's writes" in daemon.output()
    assert not (daemon.state / "issued.clean").exists()
    daemon.start()
    assert "2 certificates, checked against" in daemon.output()
    assert not stray.exists() and (daemon.state / "unjournaled" / stray.name).exists()
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 2


def test_a_stray_index_file_at_a_stop_means_no_clean_note(daemon, tmp_path):
    assert daemon.sign(make_csr(tmp_path), "first")[0] == 200
    (daemon.state / "issued" / "0ABCDEF0.pem").write_bytes(b"not a record\n")
    assert daemon.stop() == 0
    assert "changed besides this process's writes" in daemon.output()
    assert not (daemon.state / "issued.clean").exists()


def test_a_reload_back_to_a_state_folder_takes_up_its_records_again(daemon, tmp_path):
    """Moving ``state`` away and back opens each folder's records once: one journal
    descriptor per folder (no second writer on a journal in one process, no descriptor left
    behind per reload), and a clean stop notes every folder with its own count."""
    csr = make_csr(tmp_path)
    first = daemon.state
    moved = tmp_path / "moved"
    text = daemon.config.read_text()

    def reload_to(folder):
        daemon.config.write_text(text.replace(f"state = {first}", f"state = {folder}/"))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for("READY=1")

    def journals():
        fds = f"/proc/{daemon.process.pid}/fd"
        return sorted(os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)
                      if os.readlink(f"{fds}/{fd}").endswith("issued.pem"))

    assert daemon.sign(csr, "a1")[0] == 200
    reload_to(moved)
    assert daemon.sign(csr, "b1")[0] == 200
    reload_to(first)
    assert daemon.sign(csr, "a2")[0] == 200
    reload_to(moved)
    reload_to(first)
    assert journals() == sorted([str(first / "issued.pem"), str(moved / "issued.pem")])
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 2
    assert daemon.stop() == 0
    assert json.loads((first / "issued.clean").read_text())["certificates"] == 2
    assert json.loads((moved / "issued.clean").read_text())["certificates"] == 1
