"""Knowledge Base manager on SQLite and on a real PostgreSQL server: schema, dedup of retransmissions, atomic
batches, commit-then-ack, deploy queue, episodes."""

import re
import subprocess
import sys

import pytest
from kb_backends import drop_refusal, fail_inserts_of_seq, old_knowledge_base, set_schema_version

from tinyml_dagster.knowledge_base import (MIGRATIONS, ChampionScore, KnowledgeBase, KnowledgeBaseError,
                                           UnstorableError, Upload, location)


def win(device, seq, anomaly=False, champ="v1", f=(0.1, 0.2, 0.3)):
    return Upload(device, seq, "anomaly" if anomaly else "normal", features=f, champion_id=champ,
                  champion_score=0.7 if anomaly else 0.4, champion_decision=int(anomaly), window_start=seq * 0.5)


def test_schema_is_migrated_and_wal(kb_location):
    kb = KnowledgeBase(kb_location)
    assert kb.schema_version() == len(MIGRATIONS)
    if not kb.postgres:
        assert kb.scalar("PRAGMA journal_mode") == "wal"
    kb.ingest([win("d1", 1)])
    kb.close()
    kb = KnowledgeBase(kb_location)  # reopening migrates nothing and keeps the data
    assert kb.schema_version() == len(MIGRATIONS) and kb.count_uploads() == 1


def test_location_by_url(tmp_path, monkeypatch):
    assert location("sqlite:///" + str(tmp_path / "a.sqlite")) == tmp_path / "a.sqlite"
    assert location("sqlite:///rel/kb.sqlite").parts == ("rel", "kb.sqlite")
    assert location("postgresql://kb@db/kb") == "postgresql://kb@db/kb"
    monkeypatch.setenv("TINYML_KB_URL", "sqlite:///" + str(tmp_path / "b.sqlite"))
    assert KnowledgeBase().path == tmp_path / "b.sqlite"
    with pytest.raises(KnowledgeBaseError, match="'mysql://x/y': use sqlite:///<path>, postgresql://"):
        KnowledgeBase("mysql://x/y")


def test_newer_schema_is_refused_by_name(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.close()
    set_schema_version(kb_location, 99)
    with pytest.raises(KnowledgeBaseError, match=re.escape(str(kb.path)) + ": schema version 99"):
        KnowledgeBase(kb_location)


def test_retransmission_is_stored_once(kb_location):
    kb = KnowledgeBase(kb_location)
    r1 = kb.ingest([win("d1", 1), win("d1", 2, anomaly=True), win("d2", 1)])
    assert r1.duplicates == [False, False, False]
    r2 = kb.ingest([win("d1", 2, anomaly=True), win("d1", 3)])
    assert r2.duplicates == [True, False]
    assert r2.upload_ids[0] == r1.upload_ids[1]
    assert kb.count_uploads() == 4
    assert kb.count_uploads(kind="anomaly") == 1
    assert kb.devices() == ["d1", "d2"]
    assert kb.scalar("SELECT last_seq FROM devices WHERE device_id='d1'") == 3


def test_repeats_inside_one_batch_and_conflicting_content(kb_location):
    kb = KnowledgeBase(kb_location)
    r = kb.ingest([win("d1", 1), win("d1", 1), win("d1", 2), win("d1", 2, f=(9.0, 9.0, 9.0))])
    assert r.duplicates == [False, True, False, True] and r.conflicts == [False, False, False, True]
    assert r.upload_ids[0] == r.upload_ids[1] and r.upload_ids[2] == r.upload_ids[3] > r.upload_ids[0]
    assert kb.query("SELECT seq, f_mean FROM uploads ORDER BY seq") == [(1, 0.1), (2, 0.1)]
    c = kb.current_champion("d1")
    assert (c.model_id, c.source, c.since_upload_id) == ("v1", "reported", r.upload_ids[0] - 1)


def test_bad_upload_names_the_field_and_stores_nothing_of_the_batch(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.ingest([win("d1", 1)])
    bad = Upload("d1", 3, "normal", features=(1.0, 2.0), champion_decision=0)
    with pytest.raises(KnowledgeBaseError, match=r"device='d1' seq=3: field features"):
        kb.ingest([win("d1", 2), bad])
    with pytest.raises(KnowledgeBaseError, match="field kind"):
        kb.ingest([Upload("d1", 4, "weird", features=(0, 0, 0), champion_decision=0)])
    assert kb.count_uploads() == 1
    # a database-level failure in the middle of a batch rolls the whole batch back
    fail_inserts_of_seq(kb_location, 7)
    with pytest.raises(UnstorableError):
        kb.ingest([win("d1", 6), win("d1", 7)])
    assert kb.count_uploads() == 1 and kb.scalar("SELECT last_seq FROM devices WHERE device_id='d1'") == 1
    drop_refusal(kb_location)
    assert kb.ingest([win("d1", 6), win("d1", 7)]).stored == 2


def test_committed_upload_survives_sigkill(kb_location):
    path = kb_location
    code = (
        "import os, signal, sys\n"
        "from tinyml_dagster.knowledge_base import KnowledgeBase, Upload\n"
        "kb = KnowledgeBase(sys.argv[1])\n"
        "kb.ingest([Upload('d9', 41, 'normal', features=(1.0, 2.0, 3.0), champion_decision=0)])\n"
        "print('acked', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9 and p.stdout.strip() == "acked"
    kb = KnowledgeBase(path)
    assert kb.query("SELECT device_id, seq, f_kurtosis FROM uploads") == [("d9", 41, 3.0)]


def test_champion_upload_registration_and_episodes(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.ingest([Upload("d1", 1, "champion", model_blob=b"\x01\x02", window_from=0.0, window_to=60.0)])
    (uid, dev, blob, wfrom, wto, mid), = kb.model_uploads()
    assert (dev, blob, wto, mid) == ("d1", b"\x01\x02", 60.0, None)
    kb.register_model_upload(uid, "d1-champion-1")
    kb.register_model_upload(uid, "d1-champion-1")  # idempotent
    assert kb.model_uploads() == []
    c = kb.current_champion("d1")
    assert (c.model_id, c.source) == ("d1-champion-1", "device")
    kb.ingest([win("d1", 2, anomaly=True), win("d1", 3, anomaly=True)])
    ids = [r[0] for r in kb.undecided()]
    pid = kb.pool_id(["a", "b"])
    # upload 2: pool says normal (a false positive, a and b agree); upload 3: pool says anomaly, b disagrees
    rows = [(ids[0], 0, 2, 0, 1, b"", [True, True]), (ids[1], 1, 2, 1, 0, b"", [True, False])]
    assert kb.store_decisions(pid, ["a", "b"], rows) == 2
    assert kb.store_decisions(pid, ["a", "b"], rows) == 0  # already decided: ranking unchanged
    assert kb.ranking() == [("a", 2, 2, 0), ("b", 0, 1, 1)]
    (e,) = kb.episodes()
    assert (e.device_id, e.champion, e.false_positives) == ("d1", "d1-champion-1", 1)
    assert kb.nth_false_positive_time(e.episode_id, 1) == e.last_false_positive_at
    assert kb.nth_false_positive_time(e.episode_id, 2) is None
    # what the pool decided on that champion's windows
    assert kb.champion_scores() == {"v1": ChampionScore("v1", 1, 1)} and kb.count_pool_anomalies() == 1


def test_reported_champion_identified_later_keeps_its_episode(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.ingest([win("d1", 1, champ="0")])
    c = kb.current_champion("d1")
    assert (c.model_id, c.source) == ("0", "reported")
    kb.ingest([Upload("d1", 1 << 40, "champion", model_blob=b"\x00")])
    kb.register_model_upload(kb.model_uploads()[0][0], "d1-t50-abc")
    c2 = kb.current_champion("d1")
    assert (c2.episode_id, c2.model_id, c2.source) == (c.episode_id, "d1-t50-abc", "device")
    assert len(kb.champions("d1")) == 1


def test_reported_champion_identified_after_a_deploy_replaced_it(kb_location):
    """The device's own model reaches the repository after the gateway already replaced it: the first episode
    gets its id, and the deployed champion stays current."""
    kb = KnowledgeBase(kb_location)
    kb.ingest([win("d1", 1, champ="0")])
    first = kb.current_champion("d1")
    rid = kb.request_deploy("d1", "m7", b"pkg", episode_id=first.episode_id, run_id="r1")
    kb.claim_deploy(["d1"])
    kb.finish_deploy(rid, True)
    kb.ingest([Upload("d1", 1 << 40, "champion", model_blob=b"\x00")])
    kb.register_model_upload(kb.model_uploads()[0][0], "d1-t50-abc")
    assert [(c.model_id, c.source) for c in kb.champions("d1")] == [("d1-t50-abc", "device"), ("m7", "deploy")]
    assert kb.current_champion("d1").model_id == "m7"


def test_windows_the_previous_champion_scored_and_sent_late_are_not_the_new_champions(kb_location):
    """A deploy finishes while the device's outbox still holds windows its old champion scored: their false
    positives stay the old episode's, and the new champion's episode starts with none."""
    kb = KnowledgeBase(kb_location)
    kb.ingest([win("d1", 1, anomaly=True, champ="0")])
    old = kb.current_champion("d1")
    rid = kb.request_deploy("d1", "m7", b"pkg", episode_id=old.episode_id, run_id="r1")
    kb.claim_deploy(["d1"])
    kb.finish_deploy(rid, True)
    kb.ingest([win("d1", s, anomaly=True, champ="0") for s in (2, 3)] + [win("d1", 4, anomaly=True, champ="1")])
    pid = kb.pool_id(["a", "b"])
    kb.store_decisions(pid, ["a", "b"], [(u, 0, 2, 0, 1, b"", [True, True]) for u, *_ in kb.undecided()])
    (e,) = kb.episodes()
    assert (e.champion, e.false_positives) == ("m7", 1)
    assert kb.nth_false_positive_time(e.episode_id, 1) is not None
    assert kb.nth_false_positive_time(e.episode_id, 2) is None
    summary = {r["champion"]: (r["windows_decided"], r["false_positives"]) for r in kb.episode_summaries()}
    assert summary == {"0": (3, 3), "m7": (1, 1)}


def test_deploy_queue(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.ingest([win("d1", 1)])
    episode = kb.current_champion("d1").episode_id
    rid = kb.request_deploy("d1", "m7", b"pkg", episode_id=episode, run_id="r1")
    assert kb.request_deploy("d1", "m7", b"pkg", episode_id=episode, run_id="r2") == rid  # once per episode
    assert kb.claim_deploy(["d2"]) is None
    assert kb.claim_deploy(["d1"]) == (rid, "d1", "m7", b"pkg")
    assert kb.claim_deploy() is None
    assert kb.requeue_running() == 1  # a killed service's claim goes back to the queue
    assert kb.claim_deploy()[0] == rid
    kb.finish_deploy(rid, True, {"wire_seconds": 12.5})
    d = kb.wait_deploy(rid, timeout=1)
    assert d["status"] == "done" and d["figures"] == {"wire_seconds": 12.5}
    c = kb.current_champion("d1")
    assert (c.model_id, c.source, c.deploy_id) == ("m7", "deploy", rid)
    with pytest.raises(TimeoutError, match="deploy request .* to d1 still pending"):
        kb.wait_deploy(kb.request_deploy("d1", "m8", episode_id=None), timeout=0.3, poll=0.1)


def test_migration_from_version_1_keeps_the_data(kb_location):
    old_knowledge_base(kb_location, 1, "INSERT INTO deploy_requests (device_id, model_id, status, requested_at)"
                       " VALUES ('d1','m1','done',1.0)")
    kb = KnowledgeBase(kb_location)
    assert kb.schema_version() == len(MIGRATIONS) >= 2
    assert kb.deploy_request(1)["attempts"] == 1 and kb.deploy_request(1)["model_id"] == "m1"


def test_settings_updates_are_queued_claimed_and_requeued_after_a_crash(kb_location):
    kb = KnowledgeBase(kb_location)
    first = kb.request_settings("dev-a", 1, {"threshold": 0.5})
    kb.request_settings("dev-b", 1, {"upload_every": 3}, revert=False)
    assert kb.claim_settings(["dev-b"])[1:] == ("dev-b", 1, {"upload_every": 3}, False)
    assert kb.claim_settings(["dev-c"]) is None
    assert kb.claim_settings()[0] == first
    kb.requeue_running()  # a killed link service: both pending again
    assert {r["status"] for r in kb.settings_updates()} == {"pending"}
    rid, *_ = kb.claim_settings(["dev-a"])
    kb.finish_settings(rid, "applied", "applied settings v1", {"threshold": 0.5}, {"link_seconds": 1.2})
    assert kb.wait_settings(rid)["status"] == "applied" and kb.settings_in_force("dev-a") == {"threshold": 0.5}
    assert kb.settings_in_force("dev-b") is None
    with pytest.raises(KnowledgeBaseError, match="bad device id"):
        kb.request_settings("", 1, {})


def test_a_health_report_missing_a_field_is_refused_by_name(kb_location):
    kb = KnowledgeBase(kb_location)
    with pytest.raises(KnowledgeBaseError, match="missing .*energy_mj_per_window"):
        kb.record_health("dev-a", {k: 0 for k in KnowledgeBase.HEALTH_KEYS if k != "energy_mj_per_window"})
    assert kb.health_history("dev-a") == []


def test_the_gateway_resource_chooses_the_backend_by_url(postgres_cluster, data_dir, monkeypatch):
    from tinyml_dagster.defs.gateway import GatewayResource

    assert GatewayResource().knowledge_base_location() == data_dir / "kb.sqlite"  # the embedded default
    url = postgres_cluster.create_database()
    with GatewayResource(kb_url=url.replace("postgres@", "postgres:secret@")).knowledge_base() as kb:
        assert kb.postgres and kb.schema_version() == len(MIGRATIONS)
        assert "secret" not in str(kb.path) and "postgres:***@" in str(kb.path)  # messages never show it
    monkeypatch.setenv("TINYML_KB_URL", url)
    with GatewayResource().knowledge_base() as kb:
        assert kb.postgres
    monkeypatch.setenv("TINYML_KB_URL", "sqlite:///" + str(data_dir / "other.sqlite"))
    with GatewayResource().knowledge_base() as kb:
        assert not kb.postgres and kb.path == data_dir / "other.sqlite"


def test_gateways_opening_a_new_knowledge_base_at_once_migrate_it_once(kb_location):
    code = "import sys\nfrom tinyml_dagster.knowledge_base import KnowledgeBase\nprint(KnowledgeBase(sys.argv[1])" \
           ".schema_version())\n"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(kb_location)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [(p.returncode, o.strip()) for p, (o, _) in zip(procs, outs)] == [(0, str(len(MIGRATIONS)))] * 4, outs
    kb = KnowledgeBase(kb_location)
    if kb.postgres:
        assert kb.query("SELECT version FROM kb_schema") == [(len(MIGRATIONS),)]
