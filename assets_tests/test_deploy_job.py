"""deploy_champion_job and model_packages on a real repository, the real firmware behind the simulated line."""

import json
import random

import dagster as dg
import pytest

from firmware import isoforest
from tinyml_dagster.defs.deploy.assets import model_packages
from tinyml_dagster.defs.deploy.jobs import deploy_champion_job
from tinyml_dagster.defs.deploy.resources import SimulatedDeviceLinkResource
from tinyml_dagster.model_repository import ModelRepository


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYML_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TINYML_DEVICE_KEYS", raising=False)
    repo = ModelRepository(tmp_path / "data" / "models")
    rng = random.Random(4)
    rows = [[rng.gauss(0, 0.02), rng.gauss(0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(400)]
    ids = [repo.add(isoforest.train(rows, n, 100, n), threshold=0.6, rate_hz=1000) for n in (2, 5, 10)]
    repo.set_candidates(ids)
    return repo, ids


def test_model_packages_shows_both_encodings(repo):
    _, ids = repo
    result = dg.materialize([model_packages], selection=[model_packages])
    assert result.success
    meta = result.asset_materializations_for_node("model_packages")[0].metadata
    compact, js = meta["compact_bytes"].value, meta["json_bytes"].value
    assert set(compact) == set(js) == set(ids) and meta["candidates"].value == 3
    assert all(compact[m] < js[m] for m in ids) and compact[ids[2]] * 5 < js[ids[2]]
    assert "| json/compact |" in meta["packages"].value


def _run(tmp_path, model_id, device="dev-7"):
    instance = dg.DagsterInstance.ephemeral()
    link = SimulatedDeviceLinkResource(flash_dir=str(tmp_path / "flash"), time_scale=0.02)
    result = deploy_champion_job.execute_in_process(
        run_config={"ops": {"deploy_champion": {"config": {"model_id": model_id, "device_id": device}}}},
        resources={"device_link": link}, instance=instance, raise_on_error=False)
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    return result, logs


def test_deploy_job_streams_the_package_and_reports(tmp_path, repo):
    _, ids = repo
    result, logs = _run(tmp_path, ids[2])
    assert result.success, logs
    out = result.output_for_node("deploy_champion")
    assert out["installed"] and out["device_champion_id"] == ids[2] and out["device_champion_version"] == 1
    assert out["wire_bytes"] > out["payload_bytes"] > 0 and 0 < out["occupation"] <= 1
    assert any("ETA" in line for line in logs) and any(f"runs {ids[2]} v1" in line for line in logs)
    mat = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"][0]
    meta = mat.event_specific_data.metadata
    assert meta["link_seconds"].value > 0 and meta["retransmissions"].value == 0
    installed = json.loads((tmp_path / "flash" / "models" / "champion" / "config.json").read_text())
    assert installed["model_id"] == ids[2] and installed["threshold"] == 0.6 and installed["window_ms"] > 0
    # the next deploy gets a newer version; the device reuses what it holds
    result, logs = _run(tmp_path, ids[1])
    assert result.success and result.output_for_node("deploy_champion")["device_champion_version"] == 2
    assert result.output_for_node("deploy_champion")["delta_saved_bytes"] > 0


def test_deploy_job_fails_with_the_devices_reason(tmp_path, repo):
    _, ids = repo
    (tmp_path / "flash" / "deploy").mkdir(parents=True)
    (tmp_path / "flash" / "deploy" / "key").write_bytes(b"a key the gateway does not hold")
    (tmp_path / "flash" / "config.json").write_text(json.dumps({"device_id": "dev-7", "baud": 120000}))
    result, logs = _run(tmp_path, ids[0])
    assert not result.success
    assert any("refused" in line and "bad signature" in line for line in logs), logs
    assert not (tmp_path / "flash" / "models" / "champion").exists()
