"""Many gateways on one Knowledge Base: every device hangs on exactly one gateway, a deploy is carried out only by
the device's own gateway (one that goes away leaves its devices' requests queued), a restarting gateway requeues
only its own interrupted deploys, and a device's cohort chooses its candidates whichever gateway it hangs on."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from firmware import isoforest
from tinyml_dagster.knowledge_base import KnowledgeBase, KnowledgeBaseError
from tinyml_dagster.model_repository import ModelRepository
from tinyml_dagster.pool_inference import cohort_candidates, pool_ids

PUMP_A = {"machine": "pump-a", "channel": "b1x", "rate_hz": 1000, "feature_set": "paper"}
PUMP_B = {"machine": "pump-b", "channel": "b3x", "rate_hz": 2000, "feature_set": "paper"}


def test_a_device_hangs_on_exactly_one_gateway(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.assign_devices("bus-a", {"a1": PUMP_A, "a2": PUMP_A})
    kb.assign_devices("bus-b", {"b1": PUMP_B})
    kb.assign_devices("bus-a", {"a1": None})  # the same gateway again (a restart): its cohort stays
    assert kb.gateway_devices("bus-a") == ["a1", "a2"] and kb.device_gateway("b1") == "bus-b"
    assert kb.device_cohort("a1") == PUMP_A and kb.device_cohort("nobody") is None
    with pytest.raises(KnowledgeBaseError, match="device b1 belongs to gateway bus-b, not bus-a"):
        kb.assign_devices("bus-a", {"a3": PUMP_A, "b1": PUMP_A})
    assert kb.device_gateway("a3") is None  # nothing of the refused assignment is stored
    kb.assign_devices("bus-a", {"b1": PUMP_A}, move=True)  # moved to the other bus on purpose
    assert kb.device_gateway("b1") == "bus-a" and kb.device_cohort("b1") == PUMP_A
    with pytest.raises(KnowledgeBaseError, match="gateway id 'bus a'"):
        kb.assign_devices("bus a", {"a1": None})


def test_a_restarting_gateway_requeues_only_its_own_deploys(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.assign_devices("bus-a", {"a1": None})
    kb.assign_devices("bus-b", {"b1": None})
    ra, rb = kb.request_deploy("a1", "m1", b"p"), kb.request_deploy("b1", "m2", b"p")
    assert kb.claim_deploy(["a1"])[0] == ra and kb.claim_deploy(["b1"])[0] == rb
    assert kb.requeue_running(kb.gateway_devices("bus-a")) == 1
    assert kb.deploy_request(ra)["status"] == "pending" and kb.deploy_request(rb)["status"] == "running"


def test_a_devices_cohort_chooses_its_candidates(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    rng = random.Random(3)
    rows = [[rng.gauss(0, 0.02), rng.gauss(0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(300)]

    def model(n, cohort):
        return repo.add(isoforest.train(rows, n, 100, n + len(cohort["machine"])), threshold=0.6,
                        rate_hz=cohort["rate_hz"], training={k: v for k, v in cohort.items() if k != "feature_set"},
                        prefix=cohort["machine"])

    a = [model(n, PUMP_A) for n in (2, 3)]
    b = [model(n, PUMP_B) for n in (2, 4)]
    repo.set_candidates(a + b)
    assert sorted(cohort_candidates(repo, PUMP_A)) == sorted(a)
    assert sorted(cohort_candidates(repo, PUMP_B)) == sorted(b)
    assert cohort_candidates(repo, dict(PUMP_A, feature_set="wear")) == []  # no model of its feature set
    assert cohort_candidates(repo, dict(PUMP_A, machine="pump-z")) == []
    assert sorted(cohort_candidates(repo, None)) == sorted(pool_ids(repo, {}))


def _service(kb_url: str, gateway: str, ports: dict[str, str], log) -> subprocess.Popen:
    ready = "%s.ready" % log.name
    if os.path.exists(ready):
        os.unlink(ready)
    cmd = [sys.executable, "-m", "tinyml_dagster.link_service", "--kb", kb_url, "--gateway", gateway, "--no-pool",
           "--ready-file", ready] + ["--port=%s=%s" % kv for kv in ports.items()]
    p = subprocess.Popen(cmd, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        assert p.poll() is None and time.monotonic() < deadline, open(log.name).read()[-2000:]
        time.sleep(0.05)
    return p


def _until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _status_after(kb: KnowledgeBase, request_id: int, want: set[str], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := kb.deploy_request(request_id)["status"]) not in want and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def test_a_gateway_that_goes_away_leaves_its_devices_requests_queued(postgres_cluster, tmp_path):
    """Two link service processes on one PostgreSQL Knowledge Base, each with its own port; the devices behind the
    ports stay silent, so a claimed deploy stays 'running' until its link gives up."""
    url = postgres_cluster.create_database()
    ptys = {d: os.openpty() for d in ("a1", "b1")}
    ports = {d: os.ttyname(slave) for d, (_, slave) in ptys.items()}
    kb = KnowledgeBase(url)
    procs = []
    try:
        a = _service(url, "bus-a", {"a1": ports["a1"]}, open(tmp_path / "a.log", "ab"))
        b = _service(url, "bus-b", {"b1": ports["b1"]}, open(tmp_path / "b.log", "ab"))
        procs += [a, b]
        assert _until(lambda: kb.device_gateway("a1") == "bus-a" and kb.device_gateway("b1") == "bus-b")
        b.send_signal(signal.SIGKILL)
        b.wait()
        rb, ra = kb.request_deploy("b1", "m2", b"pkg"), kb.request_deploy("a1", "m1", b"pkg")
        # bus-a's gateway takes its own device's request, never the one of the gateway that went away
        assert _status_after(kb, ra, {"running", "done", "failed"}) in ("running", "failed")
        time.sleep(1.0)  # five turns of the dispatcher
        assert kb.deploy_request(rb)["status"] == "pending"
        b = _service(url, "bus-b", {"b1": ports["b1"]}, open(tmp_path / "b.log", "ab"))
        procs.append(b)
        assert _status_after(kb, rb, {"running", "done", "failed"}) in ("running", "failed")
        # bus-a restarting requeues only what it was doing itself
        before, started_a = kb.deploy_request(rb)["started_at"], kb.deploy_request(ra)["started_at"]
        a.send_signal(signal.SIGKILL)
        a.wait()
        procs.append(_service(url, "bus-a", {"a1": ports["a1"]}, open(tmp_path / "a.log", "ab")))
        assert _until(lambda: kb.deploy_request(ra)["status"] != "running" or kb.deploy_request(ra)["started_at"]
                      != started_a)
        assert kb.deploy_request(rb)["started_at"] == before
        # and a gateway cannot take over another's device by naming its port
        c = subprocess.run([sys.executable, "-m", "tinyml_dagster.link_service", "--kb", url, "--gateway", "bus-c",
                            "--no-pool", "--port", "b1=%s" % ports["b1"]], capture_output=True, text=True, timeout=60)
        assert c.returncode != 0 and "device b1 belongs to gateway bus-b, not bus-c" in c.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        for master, slave in ptys.values():
            os.close(master)
            os.close(slave)
        kb.close()
