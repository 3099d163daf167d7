"""A fleet (DESIGN.md "Store"): two ``sapid serve`` on one machine, as two hosts would run them,
each on its own socket and state folder, sharing one PostgreSQL; both sign under load."""

from __future__ import annotations

import json
import subprocess
import threading

from cryptography import x509

from conftest import SAPID, KeepAliveClient as Client, make_csr, sapid_env

CLIENTS_PER_HOST = 8
SIGNINGS_PER_CLIENT = 40


def test_two_hosts_share_one_postgresql(daemon_factory, postgres, tmp_path):
    uri = postgres.database()
    hosts = [daemon_factory(store=uri), daemon_factory(store=uri, workers=2)]
    assert hosts[0].socket != hosts[1].socket and hosts[0].state != hosts[1].state
    csrs = [make_csr(tmp_path, name=f"f{n}").read_bytes() for n in range(4)]
    received, failures, lock = {}, [], threading.Lock()

    def client(host: int, number: int):
        connection = Client(hosts[host].socket, timeout=30)
        try:
            for i in range(SIGNINGS_PER_CLIENT):
                client_id = f"h{host}c{number}"
                status, reply = connection.sign(csrs[i % len(csrs)], client_id)
                with lock:
                    if status != 200:
                        failures.append((host, status, reply))
                        return
                    assert reply["serial"] not in received, f"serial {reply['serial']} twice"
                    received[reply["serial"]] = (client_id, reply["signed_x509_pem"])
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(host, n))
               for host in (0, 1) for n in range(CLIENTS_PER_HOST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]
    total = 2 * CLIENTS_PER_HOST * SIGNINGS_PER_CLIENT
    assert len(received) == total

    # Every certificate in the store once, as its client received it.
    rows = hosts[0].stored()
    assert len(rows) == len({row["serial"] for row in rows}) == total
    for row in rows:
        client_id, pem = received[row["serial"]]
        assert row["client_id"] == client_id
        assert row["certificate"] == x509.load_pem_x509_certificate(pem.encode())
    # Each host sees all of them: its health count and ``sapid list`` with its own config.
    for host in hosts:
        status, health, _ = host.curl("/api/health")
        assert (status, health["certificates_issued"]) == (200, total), health
        done = subprocess.run([*SAPID, "list", "-c", str(host.config), "--json"],
                              env=sapid_env(), capture_output=True, text=True, timeout=60,
                              check=True)
        listed = json.loads(done.stdout)
        assert sorted(entry["serial"] for entry in listed) == sorted(received)
    mine = subprocess.run([*SAPID, "list", "-c", str(hosts[1].config), "--client", "h0c3",
                           "--json"], env=sapid_env(), capture_output=True, text=True,
                          timeout=60, check=True)
    assert len(json.loads(mine.stdout)) == SIGNINGS_PER_CLIENT
    for host in hosts:
        assert host.stop() == 0
        assert "Traceback" not in host.output()
