"""The whole loop end to end on the IMS recording: step 1's assets (recording, features, candidate models of bearing
3 at the default rate) in real Dagster, real firmware fed bearing 3's channel behind the time-scaled 2,400-baud line,
the link service process, the Knowledge Base, the pool, Dagster's sensors and jobs, a champion replacement the device
then runs, and the pool confirming the failing bearing's anomalies later in life."""

import json

import dagster as dg

from tinyml_dagster import settings
from tinyml_dagster.demo import BEARING, RATE_HZ, materialize_pool_inputs, run_loop
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.model_repository import ModelRepository


def test_run_in_champion_false_positives_trigger_a_replacement_and_the_pool_confirms_the_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("TINYML_DATA_DIR", str(tmp_path / "src"))
    monkeypatch.delenv("TINYML_IMS_DIR", raising=False)
    monkeypatch.delenv("TINYML_SYNTHETIC_FILES", raising=False)
    (tmp_path / "dagster_home").mkdir()
    materialize_pool_inputs(instance=dg.DagsterInstance.ephemeral())  # step 1 for bearing 3 (240 synthetic files)
    res = run_loop(tmp_path / "data", source_dir=tmp_path / "src", time_scale=0.02, n_fp=5, windows_per_s=25,
                   timeout_s=120, log=lambda m: None)
    f = res.figures
    assert RATE_HZ == getattr(settings, "DEFAULT_RATE_HZ", 2000) and f["rate_hz"] == RATE_HZ
    # the device was fed the whole recording's bearing-3 x channel: 2 windows per file
    assert f["windows"] == 2 * 240
    # the pool is the repository's candidates of that bearing at that rate, same ids as step 1 stored
    src = ModelRepository(tmp_path / "src" / "models")
    assert sorted(f["pool"]) == sorted(src.candidate_ids()) and len(f["pool"]) == 5
    assert all(src.get(m)["training"]["bearing"] == BEARING and src.get(m)["training"]["rate_hz"] == RATE_HZ
               for m in f["pool"])
    repo = ModelRepository(tmp_path / "data" / "models")
    assert repo.candidate_ids() == f["pool"]
    # the device's own champion (trained on its first windows, run-in) raised false positives on healthy windows
    first, second = f["champions"][0], f["champions"][1]
    assert first["version"] == 0 and first["false_positives"] >= 5
    assert f["false_positive_rate_before"] == first["false_positive_rate"] > f["false_positive_rate_after"]
    # N_fp = 5 replaced it with a pool candidate the device then ran; one replacement per episode
    assert f["replacements"] >= 1, res.events
    assert second["version"] == 1 and second["windows"] > 0
    assert f["new_champion"] in f["pool"]
    assert f["device_runs"] == [f["new_champion"], f["replacements"]] and f["device_runs_new_champion"]
    kb = KnowledgeBase(tmp_path / "data" / "kb.sqlite")
    deploys = [d for d in kb.deploys("esp32-demo") if d["status"] == "done"]
    assert len(deploys) == f["replacements"] and deploys[0]["model_id"] in f["pool"]
    assert len({d["episode_id"] for d in deploys}) == len(deploys)  # never two deploys for one episode
    assert all(d["figures"]["installed"] for d in deploys)
    assert [c.source for c in kb.champions("esp32-demo")] == ["device"] + ["deploy"] * f["replacements"]
    # the first replacement happened while the bearing was healthy (the recording's defect starts at 70% of life)
    assert first["windows"] + f["n_train"] < 0.7 * f["windows"]
    assert f["feature_set"] == "wear" and all(a["feature_set"] == "wear" for a in f["alarms"])
    # later in life, the failing bearing's anomalies are confirmed by the pool (whichever deployed champion ran
    # then: how many replacements happen before depends on the host's pace)
    deployed = f["champions"][1:]
    confirmed = sum(c["confirmed_anomalies"] for c in deployed)
    assert confirmed >= 20 and confirmed > sum(c["false_positives"] for c in deployed)
    # the deploy honoured the 2,400-baud wire time and its figures are in the KB
    assert f["deploy_wire_seconds"] >= f["package_bytes"] / 240
    assert 0 < f["occupation"] <= 1
    assert f["replacement_seconds"] > 0
    # the device's own champion entered the repository with its lineage
    (own,) = [e for e in repo.list() if e.get("source") == "device"]
    assert own["lineage"]["device_id"] == "esp32-demo" and own["lineage"]["device_model_id"] == "local-esp32-demo"
    # every window the gateway received was decided by the pool; the ranking was kept over time
    assert not kb.undecided()
    assert len(kb.ranking_history()) >= 2
    assert json.loads(json.dumps(f))  # the figures serialise as demo.json does
    # Configure: one signed settings update reached the device through the link service, without a package
    assert f["config_updates"] == 1 and f["config_update"]["status"] == "applied"
    assert f["config_update"]["in_force"]["threshold"] == 0.65 and f["config_update"]["in_force"]["alarm_span_s"] == 300
    assert f["config_update_wire_bytes"] > 0 and f["config_update_link_seconds"] > 0
    # Monitor: the champion in force measured in the MicroPython VM, and the device's own reports in the KB
    h = f["device_health"]
    assert h["inference_ms_mean"] > 0 and h["feature_ms_mean"] > 0 and h["free_heap_bytes"] > 0
    assert h["energy_mj_per_window"] > 0 and h["resets"] == 0 and h["reports_in_kb"] >= 1
