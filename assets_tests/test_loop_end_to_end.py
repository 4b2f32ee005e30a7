"""The whole loop end to end: real firmware behind the time-scaled 2,400-baud line, the link service process,
the Knowledge Base, the pool, Dagster's sensors and jobs, a champion replacement the device then runs."""

import json

from tinyml_dagster.demo import run_loop
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.model_repository import ModelRepository


def test_false_positives_trigger_one_replacement_that_the_device_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    res = run_loop(tmp_path / "data", time_scale=0.02, n_fp=5, n_normal=40, n_drift=600, timeout_s=150, log=lambda m: None)
    f = res.figures
    assert 64 + 40 < f["windows"] <= 64 + 40 + 600
    assert f["false_positives"] >= 5 and f["anomalies"] > f["false_positives"] > 0
    # one replacement per episode; the new champion may itself reach N_fp later in the drift
    assert f["replacements"] >= 1, res.events
    repo = ModelRepository(tmp_path / "data" / "models")
    assert f["new_champion"] in repo.candidate_ids()
    assert f["device_runs"] == [f["new_champion"], f["replacements"]] and f["device_runs_new_champion"]
    # the deploy honoured the 2,400-baud wire time and its figures are in the KB
    assert f["deploy_wire_seconds"] >= f["package_bytes"] / 240
    assert 0 < f["occupation"] <= 1
    assert 0 < f["replacement_seconds"] < 60
    kb = KnowledgeBase(tmp_path / "data" / "kb.sqlite")
    deploys = [d for d in kb.deploys("esp32-demo") if d["status"] == "done"]
    assert len(deploys) == f["replacements"]
    assert all(d["figures"]["installed"] for d in deploys)
    assert len({d["episode_id"] for d in deploys}) == len(deploys)  # never two deploys for one episode
    sources = [c[3] for c in kb.champions("esp32-demo")]
    assert sources == ["device"] + ["deploy"] * f["replacements"]
    # the device's own champion entered the repository with its lineage
    (own,) = [e for e in repo.list() if e.get("source") == "device"]
    assert own["lineage"]["device_id"] == "esp32-demo" and own["lineage"]["device_model_id"] == "local-esp32-demo"
    # after the replacement the device's uploads carry the new champion's version
    assert f["uploads_after_replacement"] > 0
    assert kb.scalar("SELECT COUNT(*) FROM uploads WHERE champion_id = ?", (str(f["device_runs"][1]),)) > 0
    # every window the gateway received was decided by the pool; the ranking was kept over time
    assert not kb.undecided()
    assert len(kb.ranking_history()) >= 2
    assert json.loads(json.dumps(f))  # the figures serialise as demo.json does
