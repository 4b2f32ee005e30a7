"""One deploy seam: deploy_champion_job and replace_champion_job package a repository model the same way and send it
through the Knowledge Base's queue and the real link service process to an emulated device (real firmware on a pty),
in both encodings; model_packages shows both encodings' sizes."""

import json
import random
import subprocess
import sys
import time

import dagster as dg
import pytest

from firmware import isoforest
from tinyml_dagster.defs.deploy.assets import model_packages
from tinyml_dagster.defs.deploy.jobs import deploy_champion_job
from tinyml_dagster.defs.loop.assets import champion_package, deployed_champion
from tinyml_dagster.defs.loop.jobs import replace_champion_job
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.resources import gateway_resources
from tinyml_dagster.deployment_agent import DeviceKeys
from tinyml_dagster.emulator import DeviceEmulator
from tinyml_dagster.emulator.deploy_run import ims_files
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.model_repository import ModelRepository

DEVICE = "dev-7"
SCALE = 25.0  # the emulated wire runs 25x faster than 2,400 baud


@pytest.fixture
def repo(data_dir):
    repo = ModelRepository(data_dir / "models")
    rng = random.Random(4)
    rows = [[rng.gauss(0, 0.02), rng.gauss(0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(400)]
    ids = [repo.add(isoforest.train(rows, n, 100, n), threshold=0.6, rate_hz=1000) for n in (2, 3, 4)]
    repo.set_candidates(ids)
    return repo, ids


@pytest.fixture
def gateway(tmp_path, repo, request):
    """An emulated device holding its key (its firmware under CPython, or in the MicroPython VM when the test is
    parametrized so), and the link service process that owns its port."""
    flash = tmp_path / DEVICE / "flash"
    DeviceKeys().provision(DEVICE, flash)
    emu = DeviceEmulator(DEVICE, flash_dir=flash, ims_files=ims_files(), runtime=getattr(request, "param", "cpython"),
                         turnaround_ms=100, time_scale=SCALE, config={"n_train": 100000}).start()
    kb_path, ready = tmp_path / "kb.sqlite", tmp_path / "ready"
    svc = subprocess.Popen([sys.executable, "-m", "tinyml_dagster.link_service", "--kb", str(kb_path),
                            "--port", f"{DEVICE}={emu.port_path}", "--time-scale", str(1 / SCALE), "--no-pool",
                            "--reply-slack", "2", "--ready-file", str(ready)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert svc.poll() is None and time.monotonic() < deadline, "link service did not start"
        time.sleep(0.05)
    resources = gateway_resources(GatewayResource(data_dir=str(repo[0].root.parent), kb_path=str(kb_path)))
    try:
        yield flash, kb_path, resources
    finally:
        svc.terminate()
        svc.wait(timeout=30)
        emu.stop()


def test_model_packages_shows_both_encodings(repo):
    _, ids = repo
    result = dg.materialize([model_packages], resources=gateway_resources(GatewayResource()))
    assert result.success
    meta = result.asset_materializations_for_node("model_packages")[0].metadata
    compact, js = meta["compact_bytes"].value, meta["json_bytes"].value
    assert set(compact) == set(js) == set(ids) and meta["candidates"].value == 3
    assert all(compact[m] < js[m] for m in ids) and compact[ids[2]] * 4 < js[ids[2]]
    assert "| json/compact |" in meta["packages"].value


def _device_runs(flash) -> dict:
    return json.loads((flash / "models" / "champion" / "config.json").read_text())


def test_both_jobs_deploy_every_encoding_through_the_link_service(repo, gateway):
    _, ids = repo
    flash, kb_path, resources = gateway
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(devices_partitions.name, [DEVICE])
    replace_job = dg.Definitions(assets=[champion_package, deployed_champion], jobs=[replace_champion_job],
                                 resources=resources).resolve_job_def(replace_champion_job.name)
    version = 0
    for encoding in ("compact", "json"):
        res = deploy_champion_job.execute_in_process(
            run_config={"ops": {"deploy_champion": {"config": {"model_id": ids[1], "device_id": DEVICE,
                                                               "encoding": encoding}}}},
            resources=resources, instance=instance, raise_on_error=False)
        logs = [r.user_message for r in instance.all_logs(res.run_id)]
        assert res.success, logs
        version += 1
        out = res.output_for_node("deploy_champion")
        assert out["installed"] and (out["device_champion_id"], out["device_champion_version"]) == (ids[1], version)
        assert any("queued" in line for line in logs) and any(f"runs {ids[1]} v{version}" in line for line in logs)
        running = _device_runs(flash)
        assert (running["model_id"], running["encoding"], running["version"]) == (ids[1], encoding, version)
        assert running["threshold"] == 0.6 and running["rate_hz"] == 1000 and running["window_ms"] > 0

        res = replace_job.execute_in_process(
            run_config={"ops": {"champion_package": {"config": {"model_id": ids[2], "encoding": encoding,
                                                                 "confirm_device": DEVICE}}}},
            instance=instance, partition_key=DEVICE, raise_on_error=False)
        assert res.success, [r.user_message for r in instance.all_logs(res.run_id)]
        meta = res.asset_materializations_for_node("deployed_champion")[0].metadata
        assert "](data:image/png;base64,iVBOR" in meta["deploy_progress"].value  # plotted from this deploy
        version += 1
        running = _device_runs(flash)
        assert (running["model_id"], running["encoding"], running["version"]) == (ids[2], encoding, version)
    # both jobs recorded every deploy, and the Knowledge Base knows what the device runs
    kb = KnowledgeBase(kb_path)
    deploys = kb.deploys(DEVICE)
    assert [(d["model_id"], d["status"]) for d in deploys] == [(ids[1], "done"), (ids[2], "done")] * 2
    assert kb.current_champion(DEVICE).model_id == ids[2]


def test_a_refused_package_fails_the_run_with_the_devices_reason(repo, gateway):
    _, ids = repo
    flash, kb_path, resources = gateway
    (flash / "deploy" / "key").write_bytes(b"a key the gateway does not hold")
    instance = dg.DagsterInstance.ephemeral()
    res = deploy_champion_job.execute_in_process(
        run_config={"ops": {"deploy_champion": {"config": {"model_id": ids[0], "device_id": DEVICE}}}},
        resources=resources, instance=instance, raise_on_error=False)
    assert not res.success
    logs = " ".join(r.user_message for r in instance.all_logs(res.run_id))
    assert "the device refused the package: bad signature" in logs, logs
    assert not (flash / "models" / "champion").exists()
    (d,) = KnowledgeBase(kb_path).deploys(DEVICE)
    assert d["status"] == "failed" and "bad signature" in d["error"]


def _deploy_with_the_default_encoding(gateway, model_id: str) -> tuple[int, list[str]]:
    """Wait for the device's boot HELLO to be stored, then deploy with the job's default encoding: (the runtime the
    device reported, the run's log)."""
    flash, kb_path, resources = gateway
    kb = KnowledgeBase(kb_path)
    deadline = time.monotonic() + 120
    while kb.device_sys_mpy(DEVICE) is None:  # the boot HELLO, stored by the link service
        assert time.monotonic() < deadline, "no HELLO with the device's runtime recorded"
        time.sleep(0.2)
    instance = dg.DagsterInstance.ephemeral()
    res = deploy_champion_job.execute_in_process(
        run_config={"ops": {"deploy_champion": {"config": {"model_id": model_id, "device_id": DEVICE}}}},
        resources=resources, instance=instance, raise_on_error=False)
    logs = [r.user_message for r in instance.all_logs(res.run_id)]
    assert res.success, logs
    return kb.device_sys_mpy(DEVICE), logs


@pytest.mark.parametrize("gateway", ["vm"], indirect=True)
def test_the_default_encoding_follows_the_runtime_the_devices_hello_reported(repo, gateway):
    _, ids = repo
    flash = gateway[0]
    sys_mpy, logs = _deploy_with_the_default_encoding(gateway, ids[2])
    assert sys_mpy == 774  # the MicroPython 1.27 VM: .mpy v6.3, bytecode only
    assert "encoding mpy: the device imports .mpy v6.3 (bytecode)" in logs
    running = _device_runs(flash)
    assert (running["model_id"], running["encoding"]) == (ids[2], "mpy")
    assert sorted(p.name for p in (flash / "models" / "champion").iterdir()) == [
        "__init__.py", "champion.mpy", "config.json", "features.mpy"]
    assert "not loaded" not in (flash.parent / "vm.stdout").read_text()  # both .mpy files imported


def test_a_device_without_a_mpy_loader_gets_the_compact_bytes(repo, gateway):
    _, ids = repo
    sys_mpy, logs = _deploy_with_the_default_encoding(gateway, ids[0])
    assert sys_mpy == 0  # the firmware under CPython
    assert "encoding compact: the device's runtime imports no .mpy (sys.implementation._mpy 0)" in logs
    assert _device_runs(gateway[0])["encoding"] == "compact"


def _settings_run(resources, instance, **config):
    from tinyml_dagster.defs.configure.jobs import update_settings_job

    res = update_settings_job.execute_in_process(run_config={"ops": {"update_settings": {"config": config}}},
                                                 resources=resources, instance=instance, raise_on_error=False)
    return res, " ".join(r.user_message for r in instance.all_logs(res.run_id))


def test_a_settings_update_changes_threshold_and_alarm_span_without_a_package(repo, gateway):
    _, ids = repo
    flash, kb_path, resources = gateway
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(devices_partitions.name, [DEVICE])
    res = deploy_champion_job.execute_in_process(
        run_config={"ops": {"deploy_champion": {"config": {"model_id": ids[1], "device_id": DEVICE}}}},
        resources=resources, instance=instance)
    assert res.success
    res, logs = _settings_run(resources, instance, device_id=DEVICE, threshold=0.5, alarm_span_s=120)
    assert res.success, logs
    (out,) = res.output_for_node("update_settings")
    assert out["status"] == "applied" and out["version"] == 1, out
    assert out["in_force"]["threshold"] == 0.5 and out["in_force"]["alarm_span_s"] == 120
    saved = json.loads((flash / "settings.json").read_text())
    assert saved["values"] == {"threshold": 0.5, "alarm_span_s": 120} and saved["champion"] == [ids[1], 1]
    (obs,) = res.get_asset_observation_events()
    assert obs.partition == DEVICE and obs.asset_observation_data.asset_observation.metadata[
        "settings_in_force"].value["threshold"] == 0.5
    # no package: the champion and the deploy record are what they were
    kb = KnowledgeBase(kb_path)
    assert _device_runs(flash)["version"] == 1 and len(kb.deploys(DEVICE)) == 1
    assert kb.settings_in_force(DEVICE)["threshold"] == 0.5

    # the device refuses what its champion does not allow, with its reason, recorded in the KB
    res, logs = _settings_run(resources, instance, device_id=DEVICE, window_ms=1000)
    assert not res.success and "not allowed by champion %s" % ids[1] in logs, logs
    last = kb.settings_updates(DEVICE)[-1]
    assert last["status"] == "refused" and last["version"] == 2 and last["in_force"]["window_ms"] != 1000
    # an out-of-range value never leaves the gateway
    res, logs = _settings_run(resources, instance, cohort="all", threshold=1.5)
    assert not res.success and "threshold 1.5 out of range" in logs and len(kb.settings_updates(DEVICE)) == 2

    # the device's health report at boot reached the Knowledge Base through the port (periods: test_health_vm.py)
    (h,) = kb.health_history(DEVICE)
    assert (h["windows"], h["resets"], h["settings_version"]) == (0, 0, 0)
