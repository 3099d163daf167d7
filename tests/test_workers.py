"""``workers``: forked after the key is loaded, all serving one socket, one service to systemd
(one READY=1, one reload, one stop), a worker that dies is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import make_csr, write_hooks

PID_HOOKS = """
import os
import sapid
class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        if self.client_id == "who":
            raise sapid.NotAuthorized(f"{{MARK}} {{os.getpid()}}")
MARK = {mark!r}
"""


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as file:
            found += [int(child) for child in file.read().split()]
    return found


def wait_for_children(pid: int, count: int, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(found := children(pid)) == count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{pid} has children {children(pid)}, not {count}")


def test_workers_share_the_socket_the_records_and_the_count(daemon_factory, tmp_path):
    daemon = daemon_factory(workers=2)
    workers = wait_for_children(daemon.process.pid, 2)
    csrs = [make_csr(tmp_path, name=f"c{i}") for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: daemon.sign(csrs[i % 4], f"client{i}"), range(40)))
    assert all(status == 200 for status, _ in replies), replies[:2]
    serials = {reply["serial"] for _, reply in replies}
    assert len(serials) == 40
    assert sorted(row["serial"] for row in daemon.stored()) == sorted(serials)
    # Every worker answers with the total, whichever of them signed.
    for _ in range(6):
        assert daemon.curl("/api/health")[1]["certificates_issued"] == 40
    assert children(daemon.process.pid) == workers


def test_one_ready_one_reload_one_stop(daemon_factory, tmp_path):
    hooks = write_hooks(tmp_path, PID_HOOKS.format(mark="before"))
    daemon = daemon_factory(hooks=str(hooks), workers=2)
    supervisor = daemon.process.pid
    workers = wait_for_children(supervisor, 2)
    status, reply = daemon.sign(make_csr(tmp_path), "who")
    assert status == 403 and reply["message"].split()[0] == "before"
    assert int(reply["message"].split()[1]) in workers        # a worker answered, not the supervisor
    write_hooks(tmp_path, PID_HOOKS.format(mark="after"))
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for("READY=1")
    time.sleep(0.5)                                  # the workers reload on their own
    marks = set()
    for _ in range(20):                              # new connections: any worker may answer
        status, reply = daemon.sign(make_csr(tmp_path), "who")
        marks.add(reply["message"].split()[0])
    assert marks == {"after"}
    assert daemon.output().count("reloaded: CA") == 3      # the supervisor and both workers
    # The supervisor alone speaks to systemd: no second READY=1 came from a worker.
    extra = [m for m in daemon.messages(1.0) if "READY=1" in m.split("\n")]
    assert extra == []
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for("STOPPING=1")
    assert daemon.process.wait(15) == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_dead_worker_is_replaced(daemon_factory, tmp_path):
    daemon = daemon_factory(workers=2)
    first, second = wait_for_children(daemon.process.pid, 2)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = children(daemon.process.pid)
        if len(now) == 2 and first not in now:
            break
        time.sleep(0.05)
    assert len(now) == 2 and first not in now and second in now
    assert "ended unexpectedly (signal SIGKILL)" in daemon.output()
    for i in range(5):
        assert daemon.sign(make_csr(tmp_path, name=f"n{i}"))[0] == 200


SLOW = """
import time
import sapid
class Hooks(sapid.SigningHooks):
    def presign(self, draft):
        time.sleep(1.5)
"""


def test_stop_finishes_requests_in_flight_in_every_worker(daemon_factory, tmp_path):
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, SLOW)), workers=2)
    wait_for_children(daemon.process.pid, 2)
    csr = make_csr(tmp_path)
    results = []
    clients = [threading.Thread(target=lambda: results.append(daemon.sign(csr)))
               for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(0.6)
    daemon.process.send_signal(signal.SIGTERM)
    for client in clients:
        client.join(20)
    assert [status for status, _ in results] == [200] * 4
    assert daemon.process.wait(15) == 0
    assert not os.path.exists(daemon.socket)


def test_workers_auto_is_one_per_core_this_process_may_use(daemon_factory, tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    daemon = daemon_factory(workers="auto")
    expected = min(len(cores), 64)
    if expected > 1:
        assert len(wait_for_children(daemon.process.pid, expected)) == expected
        assert f", {expected} workers" in daemon.output()
    # Held to one core (systemd's CPUAffinity=, a cpuset), auto is one process: no supervisor.
    os.sched_setaffinity(0, cores[:1])
    try:
        single = daemon_factory(workers="auto")
    finally:
        os.sched_setaffinity(0, cores)
    time.sleep(0.3)
    assert children(single.process.pid) == []
    status, reply = single.sign(make_csr(tmp_path), "one")
    assert status == 200, reply
