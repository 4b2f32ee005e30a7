"""Loop sensors: cursor on the Knowledge Base, devices as dynamic partitions, once-per-episode replacement."""

import json

import dagster as dg
import numpy as np

from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.resources import gateway_resources
from tinyml_dagster.defs.loop.sensors import device_uploads_sensor
from tinyml_dagster.definitions import defs
from tinyml_dagster.knowledge_base import KnowledgeBase, Upload


def test_definitions_load_with_the_loop():
    d = defs()
    d.get_repository_def().load_all_definitions()
    keys = {a.key.to_user_string() for a in d.resolve_all_asset_specs()}
    assert {"pool_decisions", "device_champions", "champion_package", "deployed_champion",
            "retrained_candidate_models"} <= keys
    assert {s.name for s in d.sensors} >= {"device_uploads_sensor", "false_positive_sensor"}
    assert "retrain_schedule" in {s.name for s in d.schedules}
    assert {j.name for j in d.jobs} >= {"pool_decisions_job", "replace_champion_job", "retrain_job"}


def test_device_uploads_sensor_cursor_and_partitions(tmp_path):
    path = tmp_path / "kb.sqlite"
    kb = KnowledgeBase(path)
    instance = dg.DagsterInstance.ephemeral()
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))

    result = evaluate(device_uploads_sensor, instance=instance, resources=resources)
    assert not result.run_requests and result.skip_reason

    kb.ingest([Upload(d, s, "normal", features=(0, 0, 0), champion_id="v1", champion_decision=0)
               for d in ("dev-a", "dev-b") for s in (1, 2)])
    result = evaluate(device_uploads_sensor, instance=instance, resources=resources)
    (req,) = result.run_requests
    assert req.run_key == "uploads-through-4"
    assert json.loads(result.cursor) == {"upload_id": 4}
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "devices" and sorted(add.partition_keys) == ["dev-a", "dev-b"]
    instance.add_dynamic_partitions("devices", list(add.partition_keys))

    # re-evaluation with the same cursor: nothing new, no new partitions
    again = evaluate(device_uploads_sensor, instance=instance, resources=resources, cursor=result.cursor)
    assert not again.run_requests and not again.dynamic_partitions_requests

    kb.ingest([Upload("dev-c", 1, "anomaly", features=(0, 0, 9), champion_id="v1", champion_decision=1)])
    third = evaluate(device_uploads_sensor, instance=instance, resources=resources, cursor=result.cursor)
    assert [r.run_key for r in third.run_requests] == ["uploads-through-5"]
    assert list(third.dynamic_partitions_requests[0].partition_keys) == ["dev-c"]


def evaluate(sensor, **context):
    """One evaluation of a sensor with its resources opened."""
    with dg.build_sensor_context(**context) as ctx:
        return sensor(ctx)


def commissioning_features(seed: int = 3, window: int = 500) -> np.ndarray:
    """Feature windows of a Gaussian machine at a few operating points (the sensors' test data)."""
    from tinyml_dagster.features import window_features_np

    rng = np.random.default_rng(seed)
    rows = []
    for mean in np.linspace(-1.0, 1.0, 9):
        for scale in (0.8, 1.0, 1.25):
            x = rng.normal(mean, scale, (24, window))
            rows.append(np.array([window_features_np(r, window)[0] for r in x]))
    return np.vstack(rows)


def seed_candidates(models_root, n_trees=(10, 20, 30, 40, 50), psi: int = 100) -> list:
    """Candidates trained on commissioning_features, made the repository's candidate set."""
    from firmware import isoforest
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(models_root)
    rows = commissioning_features().tolist()
    ids = [repo.add(isoforest.train(rows, n_trees=n, psi=psi, seed=100 + n),
                    lineage={"source": "commissioning", "windows": len(rows)}, seed=100 + n, prefix="machine")
           for n in n_trees]
    repo.set_candidates(ids, note={"source": "commissioning"})
    return ids


def _fleet_with_false_positives(tmp_path, monkeypatch, n_fp_seen):
    """A KB where dev-a's champion reported anomalies the pool (real forests from the repository) rejects."""
    from tinyml_dagster.pool_inference import pool_from_repository

    monkeypatch.setenv("TINYML_DATA_DIR", str(tmp_path))
    ids = seed_candidates(tmp_path / "models", n_trees=(10, 20, 30))
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    normal = commissioning_features()[:n_fp_seen]
    kb.ingest([Upload("dev-a", i, "anomaly", features=tuple(map(float, f)), champion_id="0", champion_decision=1)
               for i, f in enumerate(normal, start=1)])
    pool_from_repository(tmp_path / "models").decide_pending(kb)
    return kb, ids


def _fp_sensor(instance, tmp_path, n_fp=5):
    """false_positive_sensor evaluated once on the gateway under tmp_path."""
    from tinyml_dagster.defs.loop.sensors import false_positive_sensor

    return evaluate(false_positive_sensor, instance=instance,
                    resources=gateway_resources(GatewayResource(data_dir=str(tmp_path), n_fp=n_fp)))


def test_false_positive_sensor_requests_one_replacement_per_episode(tmp_path, monkeypatch):

    kb, ids = _fleet_with_false_positives(tmp_path, monkeypatch, 12)
    fps = kb.count_false_positives("dev-a")
    assert fps >= 5
    instance = dg.DagsterInstance.ephemeral()
    first = _fp_sensor(instance, tmp_path)
    (req,) = first.run_requests
    episode = kb.current_champion("dev-a").episode_id
    assert req.run_key == "replace-dev-a-episode-%d" % episode and req.partition_key == "dev-a"
    assert req.tags["tinyml/model_id"] == kb.ranking(ids)[0][0]
    # re-evaluated (more false positives meanwhile or not): the same run key, so the daemon launches one run
    again = _fp_sensor(instance, tmp_path)
    assert [r.run_key for r in again.run_requests] == [req.run_key]
    # with a higher N_fp nothing is due
    assert not _fp_sensor(instance, tmp_path, n_fp=fps + 1).run_requests
    # the link failed: the episode's deploy is retried under a new run key, a bounded number of times
    rid = kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg", episode_id=episode)
    kb.claim_deploy()
    kb.finish_deploy(rid, False, error="DeployError: link cut")
    retry = _fp_sensor(instance, tmp_path)
    assert [r.run_key for r in retry.run_requests] == [req.run_key + "-retry-1"]
    assert kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg2", episode_id=episode) == rid
    assert kb.deploy_request(rid)["status"] == "pending" and kb.deploy_request(rid)["attempts"] == 2
    kb.claim_deploy()
    kb.finish_deploy(rid, False, error="DeployError: link cut")
    kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg3", episode_id=episode)
    kb.claim_deploy()
    kb.finish_deploy(rid, False, error="DeployError: link cut")
    assert not _fp_sensor(instance, tmp_path).run_requests  # 3 attempts: give up
    # the deploy landed: a new episode with no false positives, nothing more to request
    kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg", episode_id=episode)
    kb.claim_deploy()
    kb.finish_deploy(rid, True, {"link_seconds": 12.0})
    assert not _fp_sensor(instance, tmp_path).run_requests


def test_release_checks_block_a_package_over_budget(tmp_path, monkeypatch):
    from tinyml_dagster.defs.loop.assets import champion_package, deployed_champion
    from tinyml_dagster.defs.loop.resources import DeviceBudgetResource

    kb, ids = _fleet_with_false_positives(tmp_path, monkeypatch, 8)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("devices", ["dev-a"])
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))
    ok = dg.materialize([champion_package], partition_key="dev-a", instance=instance,
                        resources=dict(resources, device_budget=DeviceBudgetResource()))
    assert ok.success
    checks = {c.check_name: c.passed for c in ok.get_asset_check_evaluations()}
    assert checks == {"fits_device_budget": True, "link_time_within_deadline": True}
    meta = ok.asset_materializations_for_node("champion_package")[0].metadata
    assert meta["model_id"].value == kb.ranking(ids)[0][0]
    assert (tmp_path / "packages" / "dev-a" / "next.blob").is_file()
    # a device with 8 KB of flash and a 5-s deadline: both checks fail, and the deploy does not run
    tight = DeviceBudgetResource(flash_bytes=8 * 1024, heap_bytes=4 * 1024, deadline_s=5.0)
    res = dg.materialize([champion_package, deployed_champion], partition_key="dev-a", instance=instance,
                         resources=dict(resources, device_budget=tight), raise_on_error=False)
    checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
    assert checks == {"fits_device_budget": False, "link_time_within_deadline": False}
    assert not res.success
    assert not res.asset_materializations_for_node("deployed_champion")
    assert kb.deploys() == []


def test_retrain_schedule_trains_new_candidates_from_the_kb(tmp_path, monkeypatch):
    from tinyml_dagster.defs.loop.assets import RetrainConfig, retrained_candidate_models
    from tinyml_dagster.defs.loop.schedules import retrain_schedule
    from tinyml_dagster.model_repository import ModelRepository

    monkeypatch.setenv("TINYML_DATA_DIR", str(tmp_path))
    first = seed_candidates(tmp_path / "models", n_trees=(10,))
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    rows = commissioning_features()[:150]
    kb.ingest([Upload("dev-a", i, "normal", features=tuple(map(float, f)), champion_id="0", champion_decision=0)
               for i, f in enumerate(rows, start=1)])
    kb.ingest([Upload("dev-a", 999, "anomaly", features=(0.0, 0.0, 40.0), champion_id="0", champion_decision=1)])
    (req,) = retrain_schedule.evaluate_tick(dg.build_schedule_context()).run_requests
    assert retrain_schedule.job_name == "retrain_job" and req.tags["dagster/schedule_name"] == "retrain_schedule"
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))
    cfg = RetrainConfig(min_windows=100, n_trees=[10, 20], psi=64)
    r = dg.materialize([retrained_candidate_models], resources=resources,
                       run_config=dg.RunConfig({"retrained_candidate_models": cfg}))
    assert r.success
    repo = ModelRepository(tmp_path / "models")
    new = [e for e in repo.list() if e["source"] == "retraining"]
    assert [e["hyperparameters"]["n_trees"] for e in new] == [10, 20]
    assert all(e["lineage"]["kb_uploads"] == [1, 151] and e["lineage"]["windows"] == 150 for e in new)
    assert repo.candidate_ids() == first + [e["model_id"] for e in new]
    (run,) = kb.retraining_runs()
    assert run[4:7] == (0, 151, 150)
    # nothing new since: the next tick trains nothing
    r = dg.materialize([retrained_candidate_models], resources=resources,
                       run_config=dg.RunConfig({"retrained_candidate_models": cfg}))
    assert r.asset_materializations_for_node("retrained_candidate_models")[0].metadata["trained"].value == 0
    assert len(kb.retraining_runs()) == 1
