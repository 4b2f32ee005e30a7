"""Many gateways on one Knowledge Base: every device hangs on exactly one gateway, a deploy is carried out only by
the device's own gateway (one that goes away leaves its devices' requests queued), a restarting gateway requeues
only its own interrupted deploys, and a device's cohort chooses its candidates whichever gateway it hangs on.
Then the whole: Dagster's webserver and daemon on PostgreSQL (config/dagster-postgres.yaml), two gateways' devices
due for replacement at once: the two buses deploy in parallel, a bus's two devices one after the other."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from firmware import isoforest
from tinyml_dagster.knowledge_base import KnowledgeBase, KnowledgeBaseError
from tinyml_dagster.model_repository import ModelRepository
from tinyml_dagster.pool_inference import cohort_candidates, pool_ids

PUMP_A = {"machine": "pump-a", "channel": "b1x", "rate_hz": 1000, "feature_set": "paper"}
PUMP_B = {"machine": "pump-b", "channel": "b3x", "rate_hz": 1000, "feature_set": "paper"}


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


def test_uploads_through_a_gateway_make_its_devices_and_its_pool_decides_only_those(kb_location):
    from tinyml_dagster.knowledge_base import Upload

    def window(device, seq):
        return Upload(device, seq, "normal", features=(0.1, 0.2, 0.3), champion_id="1", champion_decision=0)

    kb = KnowledgeBase(kb_location)
    kb.assign_devices("bus-b", {"b1": PUMP_B})
    kb.ingest([window("a1", 1), window("b1", 1)], gateway="bus-a")  # b1 keeps its own gateway
    kb.ingest([window("c1", 1)])
    assert kb.device_gateway("a1") == "bus-a" and kb.device_gateway("b1") == "bus-b"
    assert kb.device_gateway("c1") is None
    assert [r[1] for r in kb.undecided(gateway="bus-a")] == ["a1"]
    assert [r[1] for r in kb.undecided()] == ["a1", "b1", "c1"]


def test_a_restarting_gateway_requeues_only_its_own_deploys(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.assign_devices("bus-a", {"a1": None})
    kb.assign_devices("bus-b", {"b1": None})
    ra, rb = kb.request_deploy("a1", "m1", b"p"), kb.request_deploy("b1", "m2", b"p")
    assert kb.claim_deploy(["a1"])[0] == ra and kb.claim_deploy(["b1"])[0] == rb
    assert kb.requeue_running(kb.gateway_devices("bus-a")) == 1
    assert kb.deploy_request(ra)["status"] == "pending" and kb.deploy_request(rb)["status"] == "running"


def _cohort_models(repo: ModelRepository, cohort: dict, sizes) -> list[str]:
    """Small forests trained for a cohort (its keys in their training record, its rate)."""
    rng = random.Random(3)
    rows = [[rng.gauss(0, 0.02), rng.gauss(0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(300)]
    return [repo.add(isoforest.train(rows, n, 100, n + len(cohort["machine"])), threshold=0.6,
                     rate_hz=cohort["rate_hz"], training={k: v for k, v in cohort.items() if k != "feature_set"},
                     prefix=cohort["machine"]) for n in sizes]


def test_a_devices_cohort_chooses_its_candidates(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    a, b = _cohort_models(repo, PUMP_A, (2, 3)), _cohort_models(repo, PUMP_B, (2, 4))
    repo.set_candidates(a + b)
    assert sorted(cohort_candidates(repo, PUMP_A)) == sorted(a)
    assert sorted(cohort_candidates(repo, PUMP_B)) == sorted(b)
    assert cohort_candidates(repo, dict(PUMP_A, feature_set="wear")) == []  # no model of its feature set
    assert cohort_candidates(repo, dict(PUMP_A, machine="pump-z")) == []
    assert sorted(cohort_candidates(repo, None)) == sorted(pool_ids(repo, {}))


def test_each_cohort_votes_only_on_its_devices_windows(kb_location, tmp_path):
    from tinyml_dagster.knowledge_base import Upload
    from tinyml_dagster.pool_inference import cohort_pools

    repo = ModelRepository(tmp_path / "models")
    a, b = _cohort_models(repo, PUMP_A, (2, 3, 4)), _cohort_models(repo, PUMP_B, (2, 4, 5))
    repo.set_candidates(a + b)
    kb = KnowledgeBase(kb_location)
    kb.assign_devices("bus-a", {"a1": PUMP_A, "b1": PUMP_B, "c1": None})
    kb.ingest([Upload(d, s, "normal", features=(0.0, 0.3, 0.5), champion_id="1", champion_decision=0)
               for s in (1, 2) for d in ("a1", "b1", "c1", "x9")], gateway="bus-a")
    pools = cohort_pools([PUMP_A, PUMP_B, PUMP_A], root=repo.root)
    pools.gateway = "bus-b"  # another gateway's pools: none of these devices is theirs
    assert pools.decide_pending(kb).decided == 0
    pools.gateway = "bus-a"
    assert pools.decide_pending(kb).decided == 8
    voters = {d: json.loads(m) for d, m in kb.query(
        "SELECT DISTINCT u.device_id, p.model_ids FROM pool_decisions x JOIN uploads u ON u.id = x.upload_id"
        " JOIN pools p ON p.pool_id = x.pool_id")}
    # a device with a cohort: its cohort's candidates only; without one (c1, and x9 which came through the
    # gateway): the gateway's pool
    assert voters == {"a1": a, "b1": b, "c1": a + b, "x9": a + b}
    # the link service's refresh keeps each cohort's pool while its candidates stay the same
    again = cohort_pools([PUMP_A, PUMP_B], root=repo.root, previous=pools)
    assert [p is q for p, q in zip(again.pools, pools.pools)] == [True, True, True]
    repo.set_candidates(a)
    assert cohort_pools([PUMP_A, PUMP_B], root=repo.root, previous=pools).pools[-1] is not pools.pools[-1]


def _service(kb_url: str, gateway: str, ports: dict[str, str], log, *extra: str) -> subprocess.Popen:
    ready = "%s.ready" % log.name
    if os.path.exists(ready):
        os.unlink(ready)
    cmd = [sys.executable, "-m", "tinyml_dagster.link_service", "--kb", kb_url, "--gateway", gateway, "--no-pool",
           "--ready-file", ready, *extra] + ["--port=%s=%s" % kv for kv in ports.items()]
    p = subprocess.Popen(cmd, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        assert p.poll() is None and time.monotonic() < deadline, open(log.name).read()[-2000:]
        time.sleep(0.05)
    return p


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the processes still running, the last started first (SIGKILL after 30 s)."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


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
        _stop(procs)
        for master, slave in ptys.values():
            os.close(master)
            os.close(slave)
        kb.close()


ROOT = Path(__file__).resolve().parents[2]
SCALE = 10.0  # the emulated wires run 10x faster than 2,400 baud
N_FP = 3
BUSES = {"bus-a": {"a1": PUMP_A, "a2": PUMP_A}, "bus-b": {"b1": PUMP_B}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _due_for_replacement(kb: KnowledgeBase, ranking_ids: list[str], masks) -> dict[str, int]:
    """Every device's reported champion with N_fp + 2 false positives the pool decided (upload numbers far above
    what the emulated devices send); the candidates ranked by masks(i) (which agreed on window i). Returns the
    episodes."""
    pid = kb.pool_id(ranking_ids)
    for device in [d for bus in BUSES.values() for d in bus]:
        from tinyml_dagster.knowledge_base import Upload

        ids = kb.ingest([Upload(device, 10**9 + i, "anomaly", features=(0.1, 0.2, 5.0), champion_id="0",
                                champion_score=0.9, champion_decision=1) for i in range(N_FP + 2)]).upload_ids
        kb.store_decisions(pid, ranking_ids, [(u, 0, len(ranking_ids), 0, 1, b"", masks(u)) for u in ids])
    return {e.device_id: e.episode_id for e in kb.episodes()}


def test_two_gateways_replace_at_once_through_dagsters_queue_on_postgresql(postgres_cluster, data_dir, tmp_path,
                                                                           monkeypatch):
    from tinyml_dagster.deployment_agent import DeviceKeys
    from tinyml_dagster.emulator import DeviceEmulator
    from tinyml_dagster.emulator.deploy_run import ims_files

    kb_url = postgres_cluster.create_database()
    dagster_url = postgres_cluster.create_database().replace("postgresql://", "postgresql+psycopg2://")
    repo = ModelRepository(data_dir / "models")
    a_models, b_models = _cohort_models(repo, PUMP_A, (2, 3)), _cohort_models(repo, PUMP_B, (2, 4))
    repo.set_candidates(a_models + b_models)
    kb = KnowledgeBase(kb_url)
    # the ranking's top is pump-b's second model: a device of pump-a must still get pump-a's best (its first)
    ranking = [a_models[0], a_models[1], b_models[0], b_models[1]]
    emus, procs, logs = [], [], []
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "config" / "dagster-postgres.yaml", home / "dagster.yaml")
    env = dict(os.environ, DAGSTER_HOME=str(home), TINYML_DAGSTER_PG_URL=dagster_url, TINYML_KB_URL=kb_url,
               TINYML_DATA_DIR=str(data_dir), TINYML_N_FP=str(N_FP), PYTHONPATH=str(ROOT))
    try:
        for bus, devices in BUSES.items():
            ports = {}
            for device in devices:
                flash = tmp_path / device / "flash"
                DeviceKeys().provision(device, flash)
                emus.append(DeviceEmulator(device, flash_dir=flash, ims_files=ims_files(), runtime="cpython",
                                           turnaround_ms=100, time_scale=SCALE,
                                           config={"n_train": 100000}).start())
                ports[device] = emus[-1].port_path
            logs.append(open(tmp_path / ("%s.log" % bus), "ab"))
            cohorts = ["--cohort=%s=%s" % (d, ",".join("%s=%s" % kv for kv in c.items())) for d, c in devices.items()]
            procs.append(_service(kb_url, bus, ports, logs[-1], "--time-scale", str(1 / SCALE), "--reply-slack", "2",
                                  *cohorts))
        assert _until(lambda: all(kb.device_cohort(d) == c for bus in BUSES.values() for d, c in bus.items()))
        episodes = _due_for_replacement(kb, ranking, lambda i: [i % 5 != 0, False, False, True])
        assert kb.ranking()[0][0] == b_models[1] and kb.ranking()[1][0] == a_models[0]
        # the instance's tables first: the daemon and the webserver would race to create them
        monkeypatch.setenv("TINYML_DAGSTER_PG_URL", dagster_url)
        instance = dg.DagsterInstance.from_config(str(home))
        log = open(tmp_path / "dagster.log", "ab")
        logs.append(log)
        port = _free_port()
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                                       str(ROOT / "workspace.yaml")], cwd=ROOT, env=env, stdout=log, stderr=log))
        procs.append(subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-w", str(ROOT / "workspace.yaml"),
                                       "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log))

        def replacements():
            runs = instance.get_run_records(dg.RunsFilter(job_name="replace_champion_job"))
            return {r.dagster_run.tags["dagster/partition"]: r for r in runs
                    if int(r.dagster_run.tags["tinyml/episode"]) == episodes[r.dagster_run.tags["dagster/partition"]]}

        def finished():
            got = replacements()
            assert all(r.dagster_run.status != dg.DagsterRunStatus.FAILURE for r in got.values()), \
                [instance.all_logs(r.dagster_run.run_id)[-3:] for r in got.values()]
            return len(got) == 3 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in got.values())

        assert _until(finished, timeout=420), (tmp_path / "dagster.log").read_text()[-3000:]
        runs = replacements()
        assert {d: r.dagster_run.tags["tinyml/bus"] for d, r in runs.items()} == {"a1": "bus-a", "a2": "bus-a",
                                                                                 "b1": "bus-b"}
        # Dagster's queue let pump-b's run out while pump-a's bus was busy, and pump-a's second run only after its
        # first had finished: the bus of pump-a carried one deploy at a time, pump-b's bus ran alongside
        def dequeued(record) -> float:
            """When the queue launched the run (its RUN_STARTING event)."""
            (event,) = instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_STARTING)
            return event.timestamp

        first, second = sorted([runs["a1"], runs["a2"]], key=dequeued)
        assert dequeued(second) >= first.end_time and second.start_time >= first.end_time
        assert dequeued(runs["b1"]) < first.end_time
        deploys = {d: kb.deploy_for_episode(d, episodes[d]) for d in runs}
        assert all(x["status"] == "done" for x in deploys.values())
        da, db = sorted([deploys["a1"], deploys["a2"]], key=lambda x: x["started_at"])
        assert db["started_at"] >= da["finished_at"]
        # each device got its own cohort's best candidate, whichever gateway it hangs on
        assert {d: kb.current_champion(d).model_id for d in runs} == {"a1": a_models[0], "a2": a_models[0],
                                                                      "b1": b_models[1]}
        # the webserver reads the same PostgreSQL instance: the runs and their buses
        query = '{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }'
        req = urllib.request.Request("http://127.0.0.1:%d/graphql" % port, json.dumps({"query": query}).encode(),
                                     {"Content-Type": "application/json"})
        assert _until(lambda: _reachable(req), timeout=120)
        seen = json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]["runsOrError"]["results"]
        buses = {r["runId"]: t["value"] for r in seen for t in r["tags"] if t["key"] == "tinyml/bus"}
        assert {buses[r.dagster_run.run_id] for r in runs.values()} == {"bus-a", "bus-b"}
    finally:
        _stop(procs)
        for emu in emus:
            emu.stop()
        for f in logs:
            f.close()
        kb.close()


def _reachable(req) -> bool:
    try:
        urllib.request.urlopen(req, timeout=10)
        return True
    except OSError:
        return False
