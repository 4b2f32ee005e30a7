"""Loop sensors: cursor on the Knowledge Base, devices as dynamic partitions, once-per-episode replacement."""

import time

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


def _tick(sensor, instance, tmp_path, n_fp=5):
    """One evaluation of a sensor on the gateway under tmp_path, its resources opened."""
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path), n_fp=n_fp))
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        return sensor(ctx)


def _report(instance, result) -> None:
    """What the daemon does with a sensor's result: new partitions and asset events into the instance."""
    for add in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)


def test_device_uploads_sensor_reports_decisions_without_runs_and_runs_only_for_work(tmp_path, monkeypatch):
    from tinyml_dagster.pool_inference import pool_from_repository

    monkeypatch.setenv("TINYML_DATA_DIR", str(tmp_path))
    ids = seed_candidates(tmp_path / "models", n_trees=(10, 20, 30))
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    instance = dg.DagsterInstance.ephemeral()
    empty = _tick(device_uploads_sensor, instance, tmp_path)
    assert not empty.run_requests and empty.skip_reason

    # just received: the link service's pool decides them within a second, so no run
    rows = commissioning_features()[:6]
    kb.ingest([Upload(d, s, "normal", features=tuple(map(float, rows[s])), champion_id="v1", champion_decision=0)
               for d in ("dev-a", "dev-b") for s in (1, 2)])
    fresh = _tick(device_uploads_sensor, instance, tmp_path)
    assert not fresh.run_requests and not fresh.asset_events
    (add,) = fresh.dynamic_partitions_requests
    assert add.partitions_def_name == "devices" and sorted(add.partition_keys) == ["dev-a", "dev-b"]
    _report(instance, fresh)

    # the service decided them: one pool_decisions materialisation from the sensor, no run
    pool_from_repository(tmp_path / "models").decide_pending(kb)
    decided = _tick(device_uploads_sensor, instance, tmp_path)
    assert not decided.run_requests and not decided.dynamic_partitions_requests
    (event,) = decided.asset_events
    assert event.asset_key == dg.AssetKey("pool_decisions")
    assert event.metadata["decided"].value == 4 and event.metadata["through_upload_id"].value == 4
    assert event.metadata["pool_size"].value == len(ids)
    _report(instance, decided)
    assert not _tick(device_uploads_sensor, instance, tmp_path).asset_events  # reported once

    # windows no pool decided for longer than the grace: one run, and none while one is queued or running
    kb.ingest([Upload("dev-c", 1, "anomaly", features=(0.0, 0.0, 9.0), champion_id="v1", champion_decision=1)],
              now=time.time() - 60)
    stale = _tick(device_uploads_sensor, instance, tmp_path)
    assert [r.run_key for r in stale.run_requests] == ["decide-through-5"]
    assert list(stale.dynamic_partitions_requests[0].partition_keys) == ["dev-c"]
    _report(instance, stale)
    instance.add_run(dg.DagsterRun(job_name="pool_decisions_job", status=dg.DagsterRunStatus.STARTED))
    assert not _tick(device_uploads_sensor, instance, tmp_path).run_requests

    # the run decides them and reports through its own materialisation: the sensor does not repeat it
    from tinyml_dagster.defs.loop.assets import device_champions, pool_decisions

    r = dg.materialize([device_champions, pool_decisions], instance=instance,
                       resources=gateway_resources(GatewayResource(data_dir=str(tmp_path))))
    meta = r.asset_materializations_for_node("pool_decisions")[0].metadata
    assert meta["decided"].value == 1 and meta["through_upload_id"].value == 5
    after = _tick(device_uploads_sensor, instance, tmp_path)
    assert not after.asset_events and not after.run_requests


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


def test_false_positive_sensor_requests_one_replacement_per_episode(tmp_path, monkeypatch):
    from tinyml_dagster.defs.loop.sensors import false_positive_sensor

    kb, ids = _fleet_with_false_positives(tmp_path, monkeypatch, 12)
    fps = kb.count_false_positives("dev-a")
    assert fps >= 5
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(false_positive_sensor, instance, tmp_path)
    (req,) = first.run_requests
    episode = kb.current_champion("dev-a").episode_id
    assert req.run_key == "replace-dev-a-episode-%d" % episode and req.partition_key == "dev-a"
    assert req.tags["tinyml/model_id"] == kb.ranking(ids)[0][0]
    # re-evaluated (more false positives meanwhile or not): the same run key, so the daemon launches one run
    again = _tick(false_positive_sensor, instance, tmp_path)
    assert [r.run_key for r in again.run_requests] == [req.run_key]
    # with a higher N_fp nothing is due
    assert not _tick(false_positive_sensor, instance, tmp_path, n_fp=fps + 1).run_requests
    # the link failed: the episode's deploy is retried under a new run key, a bounded number of times
    rid = kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg", episode_id=episode)
    kb.claim_deploy()
    kb.finish_deploy(rid, False, error="DeployError: link cut")
    retry = _tick(false_positive_sensor, instance, tmp_path)
    assert [r.run_key for r in retry.run_requests] == [req.run_key + "-retry-1"]
    assert kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg2", episode_id=episode) == rid
    assert kb.deploy_request(rid)["status"] == "pending" and kb.deploy_request(rid)["attempts"] == 2
    kb.claim_deploy()
    kb.finish_deploy(rid, False, error="DeployError: link cut")
    kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg3", episode_id=episode)
    kb.claim_deploy()
    kb.finish_deploy(rid, False, error="DeployError: link cut")
    assert not _tick(false_positive_sensor, instance, tmp_path).run_requests  # 3 attempts: give up
    # the deploy landed: a new episode with no false positives, nothing more to request
    kb.request_deploy("dev-a", req.tags["tinyml/model_id"], b"pkg", episode_id=episode)
    kb.claim_deploy()
    kb.finish_deploy(rid, True, {"link_seconds": 12.0})
    assert not _tick(false_positive_sensor, instance, tmp_path).run_requests


def test_release_checks_block_a_package_over_budget(tmp_path, monkeypatch):
    from tinyml_dagster.defs.loop.assets import champion_package, deployed_champion
    from tinyml_dagster.defs.loop.resources import DeviceBudgetResource

    kb, ids = _fleet_with_false_positives(tmp_path, monkeypatch, 8)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("devices", ["dev-a"])
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))
    episode = {"tinyml/episode": str(kb.current_champion("dev-a").episode_id)}
    ok = dg.materialize([champion_package], partition_key="dev-a", instance=instance, tags=episode,
                        resources=dict(resources, device_budget=DeviceBudgetResource()))
    assert ok.success
    checks = {c.check_name: c.passed for c in ok.get_asset_check_evaluations()}
    assert checks == {"fits_device_budget": True, "link_time_within_deadline": True}
    meta = ok.asset_materializations_for_node("champion_package")[0].metadata
    # the best-ranked candidate; among equal ranks, the larger forest
    ranking = kb.ranking(ids)
    best = [m for m, points, *_ in ranking if points == ranking[0][1]]
    repo = GatewayResource(data_dir=str(tmp_path)).repository()
    assert meta["model_id"].value == min(best, key=lambda m: (-repo.get(m)["hyperparameters"]["n_trees"], m))
    assert (tmp_path / "packages" / "dev-a" / "next.blob").is_file()
    # a device with 8 KB of flash and a 5-s deadline: both checks fail, and the deploy does not run
    tight = DeviceBudgetResource(flash_bytes=8 * 1024, heap_bytes=4 * 1024, deadline_s=5.0)
    res = dg.materialize([champion_package, deployed_champion], partition_key="dev-a", instance=instance,
                         resources=dict(resources, device_budget=tight), raise_on_error=False, tags=episode)
    checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
    assert checks == {"fits_device_budget": False, "link_time_within_deadline": False}
    assert not res.success
    assert not res.asset_materializations_for_node("deployed_champion")
    assert kb.deploys() == []


def _failure(instance, result) -> str:
    (event,) = [e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_failure]
    return event.dagster_event.step_failure_data.user_failure_data.description


def test_nothing_deploys_by_accident(tmp_path, monkeypatch):
    """A plain materialisation of the deploy assets (what "Materialize all" does) fails fast and queues nothing."""
    from tinyml_dagster.defs.loop.assets import champion_package, deployed_champion

    kb, ids = _fleet_with_false_positives(tmp_path, monkeypatch, 8)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("devices", ["dev-a"])
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))
    plain = dg.materialize([champion_package, deployed_champion], partition_key="dev-a", instance=instance,
                           resources=resources, raise_on_error=False)
    assert not plain.success and not plain.asset_materializations_for_node("champion_package")
    why = _failure(instance, plain)
    assert why.startswith("nothing deployed to dev-a") and "confirm_device: dev-a" in why
    # a config naming the model but not confirming the device is not enough
    cfg = {"ops": {"champion_package": {"config": {"model_id": ids[0], "confirm_device": "dev-b"}}}}
    wrong = dg.materialize([champion_package], partition_key="dev-a", instance=instance, resources=resources,
                           run_config=cfg, raise_on_error=False)
    assert not wrong.success
    # deployed_champion alone deploys nothing, not even a package an earlier run left behind
    cfg["ops"]["champion_package"]["config"]["confirm_device"] = "dev-a"
    assert dg.materialize([champion_package], partition_key="dev-a", instance=instance, resources=resources,
                          run_config=cfg).success
    alone = dg.materialize([champion_package, deployed_champion], selection=[deployed_champion],
                           partition_key="dev-a", instance=instance, resources=resources, raise_on_error=False)
    assert not alone.success and "made in the same run" in _failure(instance, alone)
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
