"""GET /api/metrics: the Prometheus text format, checked by promtool (Debian's prometheus), the
same figures whichever worker answers a scrape."""

from __future__ import annotations

import re
import subprocess

from conftest import SAPID, make_csr, run, sapid_env, write_hooks

HOOKS = """
import sapid

class Hooks(sapid.SigningHooks):
    def authorize(self, subject_alt_names):
        return None
"""


def promtool(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in:\n{text}"
    return float(found[1])


def test_metrics_count_what_every_worker_did(daemon_factory, tmp_path):
    daemon = daemon_factory(hooks=str(write_hooks(tmp_path, HOOKS)), workers=2)
    csr = make_csr(tmp_path)
    serials = []
    for n in range(3):
        status, reply = daemon.sign(csr, f"device{n}")
        assert status == 200, reply
        serials.append(reply["serial"])
    assert daemon.sign(csr, "bad-id")[0] == 400
    assert daemon.curl("/api/csr/device1", "PUT", b"not a csr")[0] == 400
    assert daemon.curl("/nowhere")[0] == 404
    # Refused before it was read whole: counted too.
    assert daemon.raw(b"PUT /api/csr/x HTTP/1.1\r\nHost: s\r\nContent-Length: z\r\n\r\n"
                      ).startswith(b"HTTP/1.1 400 ")
    run([*SAPID, "revoke", "-c", str(daemon.config), serials[0]], env=sapid_env())
    for _ in range(6):                      # scrapes land on either worker
        status, text, head = daemon.curl("/api/metrics")
        assert status == 200 and "content-type: text/plain; version=0.0.4" in head.lower()
        checked = promtool(text)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert sample(text, "sapid_certificates_issued_total") == 3
        assert sample(text, 'sapid_requests_refused_total{code="bad_client_id"}') == 1
        assert sample(text, 'sapid_requests_refused_total{code="not_a_csr"}') == 1
        assert sample(text, 'sapid_requests_refused_total{code="not_found"}') == 1
        assert sample(text, 'sapid_requests_refused_total{code="bad_request"}') == 1
        assert sample(text, "sapid_revocations_total") == 1
        assert sample(text, "sapid_certificates_stored") == 3
        assert sample(text, "sapid_workers_alive") == 2
        assert sample(text, "sapid_store_up") == 1
        assert sample(text, "sapid_request_duration_seconds_count") >= 6
        assert sample(text, 'sapid_request_duration_seconds_bucket{le="+Inf"}') == sample(
            text, "sapid_request_duration_seconds_count")
        assert sample(text, "sapid_store_commit_duration_seconds_count") >= 3
        assert sample(text, "sapid_hook_duration_seconds_count") >= 3     # authorize, each


def test_promtool_does_check():
    """The negative twin: promtool refuses what is not the text format."""
    assert promtool("# TYPE x counter\nx{code=oops} 1\n").returncode != 0
