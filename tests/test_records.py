"""The store (DESIGN.md "Store"): every certificate signed is in it once, byte for byte, with
its client id; SQLite by default, PostgreSQL when configured; an earlier sapid's journal and
index files are imported once; ``sapid list`` and ``sapid show`` read it while the daemon runs."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import sapid
from conftest import (ROOT, SAPID, PASSPHRASE, make_csr, openssl_verify, run, sapid_env, stored,
                      write_hooks)

LEGACY = ROOT / "tests" / "data" / "legacy-state"


def sapid_cli(*args, check=True):
    done = subprocess.run([*SAPID, *map(str, args)], env=sapid_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_200_requests_from_20_clients(daemon_factory, store, tmp_path):
    daemon = daemon_factory(**store)
    csrs = [make_csr(tmp_path, key, name=f"c{i}")
            for i, key in enumerate(["p256", "rsa2048", "ed25519", "p384"])]

    def client(number):
        return [(f"client{number}", *daemon.sign(csrs[(number + i) % len(csrs)],
                                                 f"client{number}")) for i in range(10)]

    with ThreadPoolExecutor(20) as pool:
        replies = [r for batch in pool.map(client, range(20)) for r in batch]
    assert all(status == 200 for _, status, _ in replies), [r for r in replies if r[1] != 200][:3]
    serials = [reply["serial"] for _, _, reply in replies]
    assert len(set(serials)) == 200
    certs = tmp_path / "certs"
    certs.mkdir()
    paths = []
    for serial, (_, _, reply) in zip(serials, replies):
        path = certs / f"{serial}.pem"
        path.write_text(reply["signed_x509_pem"])
        paths.append(path)
    verified = openssl_verify(daemon.identity / "ca.cert.pem", *paths)
    assert verified.returncode == 0 and verified.stdout.count(": OK") == 200
    # Each is in the store once, as the client received it, with what the reply said of it.
    rows = {row["serial"]: row for row in daemon.stored()}
    assert sorted(rows) == sorted(serials)
    for client_id, _, reply in replies:
        row = rows[reply["serial"]]
        assert row["client_id"] == client_id
        assert row["certificate"] == x509.load_pem_x509_certificate(
            reply["signed_x509_pem"].encode())
        assert row["sha256"] == reply["sha256_fingerprint"]
        assert (str(row["not_after"]).replace(" ", "T").replace("+00:00", "Z")
                == reply["not_after"])
        assert json.loads(row["sans"]) == ["DNS:device1.example"]
        assert row["subject"] == "CN=device1" and row["revoked_at"] is None
    log = daemon.output()
    assert log.count("audit outcome=issued") == 200
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 200


def test_the_sqlite_store_is_a_plain_file_operators_can_read(daemon, tmp_path):
    status, reply = daemon.sign(make_csr(tmp_path), "plain")
    assert status == 200, reply
    database = daemon.state / "sapid.db"
    assert stat.S_IMODE(database.stat().st_mode) == 0o640
    assert stat.S_IMODE(daemon.state.stat().st_mode) == 0o750
    # The operator's own tools: the sqlite3 shell, and a backup taken while the daemon runs.
    shell = run(["sqlite3", str(database), "PRAGMA journal_mode;",
                 "SELECT value FROM sapid_meta WHERE name = 'schema';",
                 "SELECT serial, client_id FROM certificates;"]).stdout.split()
    assert shell == ["wal", str(len(sapid.MIGRATIONS)), f"{reply['serial']}|plain"]
    indexes = run(["sqlite3", str(database), ".indexes certificates"]).stdout.split()
    assert {"certificates_by_client", "certificates_by_not_after",
            "certificates_revoked"} <= set(indexes), indexes
    run(["sqlite3", str(database), f".backup {tmp_path / 'copy.db'}"])
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("SELECT serial FROM certificates").fetchall() == [(reply["serial"],)]
    # What an earlier sapid wrote is not there: no journal, no index folder.
    assert sorted(os.listdir(daemon.state)) == ["sapid.db", "sapid.db-shm", "sapid.db-wal"]


def test_a_store_newer_than_this_sapid_is_refused(daemon_factory):
    daemon = daemon_factory()
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.state / "sapid.db") as connection:
        connection.execute("UPDATE sapid_meta SET value = '99' WHERE name = 'schema'")
    done = subprocess.run([*SAPID, "serve", "-c", str(daemon.config)], env=sapid_env(),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("schema version 99 is newer than this sapid's (2); "
                                        "run a newer sapid"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_store_of_the_first_schema_is_brought_forward(daemon_factory, store, tmp_path):
    """A store as the first schema left it (certificates, no revocation count) is migrated at
    start, its certificates kept and revocable."""
    daemon = daemon_factory(start=False, **store)
    if store:
        import psycopg
        connection = psycopg.connect(store["store"], user="root", autocommit=True)
        types = {"time": "TIMESTAMPTZ", "blob": "BYTEA", "int": "BIGINT"}
    else:
        daemon.state.mkdir()
        connection = sqlite3.connect(daemon.state / "sapid.db", isolation_level=None)
        types = {"time": "TEXT", "blob": "BLOB", "int": "INTEGER"}
    connection.execute("CREATE TABLE sapid_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    connection.execute("INSERT INTO sapid_meta VALUES ('schema', '1')")
    for statement in sapid.MIGRATIONS[0]:
        connection.execute(statement.format(**types))
    connection.close()
    daemon.start()
    assert "schema brought from version 1 to 2" in daemon.output()
    status, reply = daemon.sign(make_csr(tmp_path))
    assert status == 200, reply
    done = run([*SAPID, "revoke", "-c", str(daemon.config), reply["serial"]], env=sapid_env())
    assert done.stdout.startswith(f"revoked {reply['serial']} ")
    status, crl, _ = daemon.curl("/api/crl.pem")
    assert status == 200
    assert len(x509.load_pem_x509_crl(crl.encode())) == 1
    assert [row["revocation_reason"] for row in daemon.stored()] == ["unspecified"]


def test_serial_collision_draws_another(identities, tmp_path):
    """A hooks serial generator that repeats itself: the second draw is taken, and a third
    draw gives an unused one."""
    store = sapid.SQLiteStore(str(tmp_path / "state" / "sapid.db"))
    store.prepare()
    committer = sapid.Committer(store)
    drawn = iter([7, 7, 8])
    hooks = sapid.HookSet(None, sapid.SigningHooks, sapid.boot, lambda: next(drawn),
                          frozenset({"serial_number"}))
    config = sapid.Config(identity=str(identities("p256")))
    identity = sapid.Identity.load(config.identity, PASSPHRASE)
    authority = sapid.Authority(config, identity, hooks, committer, sapid.HookRunner(2))
    csr = make_csr(tmp_path).read_bytes()
    try:
        assert authority.wait(authority.issue(sapid.Signing(csr, "a"))).serial == "07"
        assert authority.wait(authority.issue(sapid.Signing(csr, "b"))).serial == "08"
    finally:
        committer.close()
        store.close()
    assert [(row["serial"], row["client_id"]) for row in stored(tmp_path / "state")] == [
        ("07", "a"), ("08", "b")]


def test_sapid_sign_beside_a_running_daemon_is_counted_and_listed(daemon, tmp_path):
    csr = make_csr(tmp_path)
    assert daemon.sign(csr, "first")[0] == 200
    done = sapid_cli("sign", "-c", daemon.config, "--client-id", "offline", csr)
    offline = x509.load_pem_x509_certificate(done.stdout.encode())
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 2
    listed = json.loads(sapid_cli("list", "-c", daemon.config, "--json").stdout)
    assert [entry["client_id"] for entry in listed] == ["first", "offline"]
    assert listed[1]["serial"] == sapid.serial_hex(offline.serial_number)
    assert daemon.sign(csr, "third")[0] == 200
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 3


SHORT_HOOKS = """\
    import datetime
    import sapid

    class Hooks(sapid.SigningHooks):
        def authorize(self, subject_alt_names):
            if self.client_id.startswith("short"):
                return datetime.timedelta(days=3)
    """


def test_list_and_show(daemon_factory, store, tmp_path):
    """``sapid list`` by client and by expiry, as text and JSON, and ``sapid show``, while the
    daemon runs; each filter also leaves out what it must."""
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, SHORT_HOOKS)), **store)
    csr = make_csr(tmp_path)
    replies = {}
    for client in ("short1", "long1", "long2", "short2"):
        status, reply = daemon.sign(csr, client)
        assert status == 200, reply
        replies[client] = reply
    config = daemon.config

    everything = json.loads(sapid_cli("list", "-c", config, "--json").stdout)
    assert [entry["client_id"] for entry in everything] == ["short1", "long1", "long2", "short2"]
    assert everything[0] == {
        "serial": replies["short1"]["serial"], "client_id": "short1", "subject": "CN=device1",
        "sans": ["DNS:device1.example"], "not_before": replies["short1"]["not_before"],
        "not_after": replies["short1"]["not_after"],
        "sha256_fingerprint": replies["short1"]["sha256_fingerprint"],
        "issued_at": everything[0]["issued_at"], "status": "valid", "revoked_at": None,
        "revocation_reason": None}
    issued_at = datetime.datetime.strptime(everything[0]["issued_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(issued_at - datetime.datetime.utcnow()) < datetime.timedelta(minutes=5)

    mine = json.loads(sapid_cli("list", "-c", config, "--client", "long2", "--json").stdout)
    assert [entry["serial"] for entry in mine] == [replies["long2"]["serial"]]
    assert json.loads(sapid_cli("list", "-c", config, "--client", "nobody", "--json").stdout) == []
    soon = json.loads(sapid_cli("list", "-c", config, "--expiring", "30", "--json").stdout)
    assert sorted(entry["client_id"] for entry in soon) == ["short1", "short2"]
    assert sapid_cli("list", "-c", config, "--expiring", "1", "--json").stdout.strip() == "[\n]"
    assert len(json.loads(sapid_cli("list", "-c", config, "--expiring", "400",
                                    "--json").stdout)) == 4
    assert json.loads(sapid_cli("list", "-c", config, "--revoked", "--json").stdout) == []

    lines = sapid_cli("list", "-c", config).stdout.splitlines()
    assert len(lines) == 4
    serial, not_after, status, client, subject = lines[1].split()
    assert (serial, not_after, status, client, subject) == (
        replies["long1"]["serial"], replies["long1"]["not_after"], "valid", "long1",
        '"CN=device1"')

    # show: by serial in any spelling openssl or a person would use.
    wanted = replies["long1"]["serial"]
    for spelling in (wanted, wanted.lower(), ":".join(wanted[i:i + 2]
                                                      for i in range(0, len(wanted), 2))):
        shown = sapid_cli("show", "-c", config, spelling).stdout
        assert f"serial: {wanted}\n" in shown and "client_id: long1\n" in shown
        assert "status: valid\n" in shown
        pem = shown[shown.index("-----BEGIN CERTIFICATE-----"):]
        assert pem == replies["long1"]["signed_x509_pem"]
    leaf = tmp_path / "shown.pem"
    leaf.write_text(pem)
    assert openssl_verify(daemon.identity / "ca.cert.pem", leaf).returncode == 0
    document = json.loads(sapid_cli("show", "-c", config, "--json", wanted).stdout)
    assert document["pem"] == replies["long1"]["signed_x509_pem"]
    assert document["client_id"] == "long1"

    # The twins: an unknown serial, something that is no serial, a bad client id.
    for args, needle in ((("show", "0BADC0DE"), "no certificate with serial 0BADC0DE in "),
                         (("show", "xyz"), "'xyz' is not a serial number"),
                         (("list", "--client", "a-b"), "--client 'a-b'")):
        done = sapid_cli(args[0], "-c", config, *args[1:], check=False)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("sapid: error: ") and needle in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_list_without_a_store_says_so(tmp_path, identities):
    config = tmp_path / "sapid.conf"
    config.write_text(f"[sapid]\nidentity = {identities('p256')}\nstate = {tmp_path / 'none'}\n")
    done = sapid_cli("list", "-c", config, check=False)
    assert done.returncode == 1
    assert done.stderr == (f"sapid: error: {tmp_path / 'none' / 'sapid.db'}: no store here yet "
                           "(sapid creates it at its first start)\n")
    assert not (tmp_path / "none").exists()


def test_an_earlier_sapids_records_are_imported_once(daemon_factory, store, tmp_path):
    """A state folder as sapid 0.1 left it (a journal with a torn tail after a crash, an index
    file whose journal record never came), started by this sapid: every certificate is in the
    store with its client id, the old files stay, and a second start imports nothing again."""
    daemon = daemon_factory(start=False, **store)
    shutil.copytree(LEGACY, daemon.state)
    before = {path.name: path.read_bytes() for path in daemon.state.rglob("*") if path.is_file()}
    journal = (daemon.state / "issued.pem").read_bytes()
    index = {path.stem: path.read_bytes() for path in (daemon.state / "issued").glob("*.pem")}
    daemon.start(wait=False)
    messages = []
    for message in daemon.messages():
        messages.append(message)
        if "READY=1" in message.split("\n"):
            break
    # systemd is told the start takes longer while the import runs (a million take minutes).
    assert any(message.startswith("EXTEND_TIMEOUT_USEC=30000000\nWATCHDOG=1\nSTATUS=importing")
               for message in messages[:-1]), messages
    log = daemon.output()
    assert ("imported 6 certificates from 5 journal records and 1 index files of an earlier "
            "sapid") in log, log
    assert "bytes of an unfinished last record, not imported" in log
    rows = {row["serial"]: row for row in daemon.stored()}
    assert sorted(rows) == sorted(index)
    for serial, pem in index.items():
        assert rows[serial]["certificate"] == x509.load_pem_x509_certificate(pem)
        assert rows[serial]["client_id"] == ("" if f"# serial {serial} ".encode() not in journal
                                             else journal.split(f"# serial {serial} client ".encode()
                                                                )[1].split(b" ")[0].decode())
    assert sorted(row["client_id"] for row in rows.values()) == [
        "", "legacy1", "legacy2", "legacy3", "legacy4", "offline"]
    ca = ROOT / "tests" / "data" / "legacy-state-ca.pem"
    leaf = tmp_path / "imported.pem"
    leaf.write_bytes(next(iter(rows.values()))["certificate"].public_bytes(
        serialization.Encoding.PEM))
    assert openssl_verify(ca, leaf).returncode == 0
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 6
    # The old files are left as they were.
    assert {path.name: path.read_bytes() for path in daemon.state.rglob("*")
            if path.is_file() and not path.name.startswith("sapid.db")} == before
    status, reply = daemon.sign(make_csr(tmp_path), "new")
    assert status == 200, reply
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.output().count("imported 6 certificates") == 1
    assert len(daemon.stored()) == 7
    assert daemon.curl("/api/health")[1]["certificates_issued"] == 7


def test_a_reload_keeps_the_store_until_a_restart(daemon, tmp_path):
    csr = make_csr(tmp_path)
    assert daemon.sign(csr, "before")[0] == 200
    moved = tmp_path / "moved"
    daemon.config.write_text(daemon.config.read_text().replace(f"state = {daemon.state}",
                                                               f"state = {moved}"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    assert f"reload: the store stays {daemon.state / 'sapid.db'} until a restart" in \
        daemon.output()
    assert daemon.sign(csr, "after")[0] == 200
    assert [row["client_id"] for row in daemon.stored()] == ["before", "after"]
    assert not moved.exists()


def test_check_reports_the_store(daemon, tmp_path):
    assert daemon.sign(make_csr(tmp_path), "one")[0] == 200
    done = sapid_cli("check", "-c", daemon.config)
    assert done.stdout.strip().endswith(f"store {daemon.state / 'sapid.db'} (1 certificate)")
    fresh = Path(tmp_path / "fresh.conf")
    fresh.write_text(daemon.config.read_text().replace(f"state = {daemon.state}",
                                                       f"state = {tmp_path / 'new'}"))
    done = sapid_cli("check", "-c", fresh)
    assert done.stdout.strip().endswith("sapid.db (created at the first start)")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("uri", ["mysql://db/sapid", "sqlite:///x.db"])
def test_a_store_that_is_no_postgresql_uri_is_a_config_error(identities, tmp_path, uri):
    config = tmp_path / "sapid.conf"
    config.write_text(f"[sapid]\nidentity = {identities('p256')}\nstore = {uri}\n")
    done = sapid_cli("check", "-c", config, check=False)
    assert done.returncode == 1
    assert done.stderr == (f"sapid: error: {config}: store: {uri!r}: a postgresql:// URI, or "
                           "unset for SQLite in the state folder\n")


def test_the_postgresql_password_comes_from_a_credential(daemon_factory, postgres, tmp_path):
    """A store that needs a password: the systemd credential ``store-password`` gives it, the
    configuration never holds it; a wrong one stops the start with one line, the password
    not in it."""
    uri = postgres.database(owner="sapidpw")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "store-password").write_text(postgres.PASSWORD + "\n")
    daemon = daemon_factory(store=uri, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    status, reply = daemon.sign(make_csr(tmp_path), "pw")
    assert status == 200, reply
    assert [row["client_id"] for row in daemon.stored()] == ["pw"]
    assert postgres.PASSWORD not in daemon.config.read_text()
    assert daemon.stop() == 0
    (credentials / "store-password").write_text("not the password\n")
    done = subprocess.run([*SAPID, "serve", "-c", str(daemon.config)],
                          env=sapid_env(CREDENTIALS_DIRECTORY=str(credentials)),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("sapid: error: ")]
    assert len(errors) == 1 and 'password authentication failed for user "sapidpw"' in errors[0]
    assert "not the password" not in done.stderr and "Traceback" not in done.stderr


# The store's own promises, in process against real databases ----------------------------------

def record_of(serial: str, client_id: str) -> sapid.Record:
    now = datetime.datetime.now(datetime.timezone.utc)
    return sapid.Record(serial, client_id, "CN=x", (), now, now, "00" * 32, b"\x30\x00", now)


def test_two_records_with_one_serial_in_a_batch(tmp_path):
    """The first is added and its ticket is not taken; only the second draws again."""
    store = sapid.SQLiteStore(str(tmp_path / "sapid.db"))
    store.prepare()
    committer = sapid.Committer(store)
    try:
        assert store.add([record_of("0A", "first"), record_of("0A", "second"),
                          record_of("0B", "third")]) == {1}
        assert store.add([record_of("0B", "again"), record_of("0C", "new")]) == {0}
        # Through the committer, in one batch: tickets by position, not by serial.  An open
        # transaction of another connection holds the committer on a first record, so that
        # the two are queued together behind it.
        blocker = sqlite3.connect(tmp_path / "sapid.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        first = committer.submit(record_of("0C0C", "first"))
        committer.flush()
        deadline = time.monotonic() + 10
        while not committer._busy:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        tickets = [committer.submit(record_of("0D", "one")), committer.submit(
            record_of("0D", "two"))]
        blocker.execute("COMMIT")
        blocker.close()
        for ticket in [first, *tickets]:
            committer.wait(ticket)
        assert committer.batches == 2
        assert [(t.taken, t.error) for t in tickets] == [(False, None), (True, None)]
        assert store.get("0D").client_id == "one"
    finally:
        committer.close()
        store.close()
    # Closed, a committer fails what it is given instead of leaving it waiting.
    late = committer.submit(record_of("0E", "late"))
    assert late.done and isinstance(late.error, sapid.StoreError)


def test_listings_read_an_index_not_a_sort(tmp_path):
    store = sapid.SQLiteStore(str(tmp_path / "sapid.db"))
    store.prepare()
    store.close()
    connection = sqlite3.connect(tmp_path / "sapid.db")
    query = ("SELECT serial FROM certificates {where} ORDER BY {order}, serial LIMIT 1000")
    for where, order in (("", "issued_at"), ("WHERE client_id = 'a'", "issued_at"),
                         ("WHERE not_after >= '2026' AND not_after <= '2027'"
                          " AND revoked_at IS NULL", "not_after"),
                         ("WHERE (issued_at, serial) > ('2026', '0A')", "issued_at")):
        plan = " ".join(str(row) for row in connection.execute(
            "EXPLAIN QUERY PLAN " + query.format(where=where, order=order)))
        assert "TEMP B-TREE" not in plan and re.search("USING (COVERING )?INDEX", plan), (
            where, plan)
    connection.close()
    # What a CRL lists is read through the index of revoked certificates, which a store
    # without statistics would not choose by itself.
    store = sapid.SQLiteStore(str(tmp_path / "sapid.db"))
    try:
        store.revoked(sapid.utcnow())
        statements = []
        store._connections[False].set_trace_callback(statements.append)
        store.revoked(sapid.utcnow())
        query, = [text for text in statements if "revoked_at IS NOT NULL" in text]
        with store._session() as cursor:
            cursor.execute("EXPLAIN QUERY PLAN " + query)
            plan = " ".join(str(row) for row in cursor.fetchall())
        assert "USING COVERING INDEX certificates_revoked" in plan, plan
    finally:
        store.close()


def test_the_journal_of_an_earlier_sapid_is_read_record_by_record(tmp_path):
    """A header whose certificate was never written (a torn write) does not take the next
    record's certificate; a record whose certificate is another serial's is left out."""
    journal = (LEGACY / "issued.pem").read_bytes()
    records = [part for part in journal.split(b"# serial ") if part]
    first, second = (b"# serial " + part for part in records[:2])
    header_only = first.split(b"\n", 1)[0] + b"\n"
    wrong = second.split(b"\n", 1)[0].replace(second[9:15], b"ABCDEF") + b"\n" + (
        first.split(b"\n", 1)[1])
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "issued.pem").write_bytes(header_only + second + wrong)
    store = sapid.SQLiteStore(str(folder / "sapid.db"))
    store.prepare()
    try:
        sapid.import_legacy(store, str(folder), lambda count: None)
        rows = [(r.serial, r.client_id) for r in store.select()]
    finally:
        store.close()
    serial, client = re.match(rb"# serial (\S+) client (\S+)", second).groups()
    assert rows == [(serial.decode(), client.decode())]


def test_hosts_sharing_a_store_each_import_their_own_files_once(postgres, tmp_path, caplog):
    uri = postgres.database(owner="root")
    store = sapid.PostgresStore(uri)
    store.prepare()
    folders = []
    for name in ("one", "two"):
        folders.append(tmp_path / name)
        shutil.copytree(LEGACY, folders[-1])
    try:
        with caplog.at_level("INFO", "sapid"):
            for folder in folders + folders:
                sapid.import_legacy(store, str(folder), lambda count: None)
        imports = [r.message for r in caplog.records if "certificates from" in r.message]
        assert len(imports) == 2, imports
    finally:
        store.close()


def test_postgresql_options_in_the_uri_keep_the_timeouts(postgres):
    uri = postgres.database(owner="root") + "&options=-c%20search_path%3Dpublic"
    store = sapid.PostgresStore(uri)
    try:
        with store._session() as cursor:
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone()[0] == "5s"
            cursor.execute("SHOW search_path")
            assert cursor.fetchone()[0] == "public"
    finally:
        store.close()


def test_a_role_that_only_reads_and_writes_a_prepared_store(daemon_factory, postgres, tmp_path):
    """The DBA made the tables; sapid's role may only read and write them, not create any."""
    uri = postgres.database()
    prepared = sapid.PostgresStore(uri.replace("postgresql://", "postgresql://root@"))
    prepared.prepare()
    prepared.close()
    name = uri.split("///", 1)[1].split("?")[0]
    run(["psql", "-h", str(postgres.sockets), "-d", name, "-c",
         "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO sapidpw"])
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "store-password").write_text(postgres.PASSWORD + "\n")
    daemon = daemon_factory(store=uri.replace("postgresql://", "postgresql://sapidpw@"),
                            env={"CREDENTIALS_DIRECTORY": str(credentials)})
    status, reply = daemon.sign(make_csr(tmp_path))
    assert status == 200, reply
    # The negative twin: that role cannot create a table, so a start that had to fails.
    done = run(["psql", "-h", str(postgres.sockets), "-d", name, "-U", "sapidpw", "-c",
                "CREATE TABLE probe (x int)"], env={**os.environ,
                                                    "PGPASSWORD": postgres.PASSWORD},
               check=False)
    assert done.returncode != 0 and "permission denied" in done.stderr, done.stderr
