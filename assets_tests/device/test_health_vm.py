"""Device health measured in the real MicroPython VM (its fuel-based clock, its heap) goes into the Knowledge Base,
and device_health_sensor flags a device whose inference time or resets cross their limits and starts the action."""

import json
import time

import dagster as dg
import pytest

from firmware.tests.util import samples_bytes, signal
from tinyml_dagster import health
from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.loop.jobs import replace_champion_job, retrain_job
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.monitor.health import HealthLimitsResource, device_health_sensor
from tinyml_dagster.defs.resources import gateway_resources
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.emulator.health_run import BytesFeed, vm_health

KEY = bytes(range(32))
DEVICE = "dev-h"
BOOTS = 5
WINDOWS = 70

@pytest.fixture(scope="module")
def vm_reports(tmp_path_factory):
    """The HEALTH reports a device sent in the VM: one life of WINDOWS windows, then BOOTS - 1 reboots."""
    flash = tmp_path_factory.mktemp("health") / "flash"
    (flash / "deploy").mkdir(parents=True)
    (flash / "deploy" / "key").write_bytes(KEY)
    (flash / "config.json").write_text(json.dumps({"device_id": DEVICE, "rate_hz": 100, "n_train": 30, "n_trees": 10,
                                                   "psi": 16, "baud": 1000000}))
    feed = BytesFeed(samples_bytes(signal(50 * WINDOWS)))
    return vm_health(flash, feed, DEVICE, KEY, windows=WINDOWS, boots=BOOTS, every=10)


def test_the_vm_reports_real_times_heap_and_resets(vm_reports):
    periods = [r for r in vm_reports if r["windows"]]
    assert [r["windows"] for r in periods] == [10] * (WINDOWS // 10)
    inferred = [health.from_report(r) for r in periods if r["inference_us_mean"]]
    assert inferred, "no period with inference"
    for h in inferred:
        assert 0 < h["feature_ms_mean"] <= h["feature_ms_max"] and 0 < h["inference_ms_mean"] <= h["inference_ms_max"]
        assert h["active_ms_mean"] >= h["feature_ms_mean"]
        assert h["energy_mj_per_window"] == round(health.energy_mj(h["active_ms_mean"]), 4) > 0
        assert 0 < h["free_heap_bytes"] <= 40 * 1024 * 1024
    boots = [r for r in vm_reports if not r["windows"]]
    assert [r["boots"] for r in boots] == list(range(1, BOOTS + 1))
    assert [r["reset_cause"] for r in boots] == [1] + [3] * (BOOTS - 1)
    # the VM's heap only shrinks (no collection there): the device sees it
    heaps = [r["free_heap"] for r in vm_reports[:len(periods) + 1]]
    assert heaps == sorted(heaps, reverse=True)


def _tick(tmp_path, instance, limits: HealthLimitsResource, cursor=None) -> dg.SensorResult:
    resources = {**gateway_resources(GatewayResource(data_dir=str(tmp_path))), "health_limits": limits}
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as ctx:
        return device_health_sensor(ctx)


def _kb_with(tmp_path, reports) -> KnowledgeBase:
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    t0 = time.time() - len(reports)
    for i, r in enumerate(reports):
        kb.record_health(DEVICE, health.from_report(r), now=t0 + i)
    return kb


def test_slow_inference_is_flagged_once_and_starts_retraining(tmp_path, vm_reports):
    life = [r for r in vm_reports if r["boots"] == 1]  # before any reboot
    kb = _kb_with(tmp_path, life)
    measured = [h for h in kb.health_history(DEVICE) if h["windows"]][-1]["inference_ms_mean"]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(devices_partitions.name, [DEVICE])
    healthy = _tick(tmp_path, instance, HealthLimitsResource(inference_ms_max=2 * measured))
    assert not healthy.run_requests
    (obs,) = healthy.asset_events
    assert obs.partition == DEVICE and obs.metadata["health"].value == "ok"
    assert obs.metadata["inference_ms_mean"].value == round(measured, 2) > 0
    assert "](data:image/png;base64,iVBOR" in obs.metadata["health_plot"].value  # its reports, plotted

    slow = _tick(tmp_path, instance, HealthLimitsResource(inference_ms_max=measured / 2))
    (req,) = slow.run_requests
    assert req.job_name == retrain_job.name and "inference" in req.tags["tinyml/health"]
    assert "inference" in slow.asset_events[0].metadata["health"].value
    # flagged once: the next report crossing the limit again starts nothing new
    kb.record_health(DEVICE, health.from_report(life[-1]))
    again = _tick(tmp_path, instance, HealthLimitsResource(inference_ms_max=measured / 2), cursor=slow.cursor)
    assert not again.run_requests and again.asset_events


def test_a_reboot_loop_is_flagged_and_starts_a_redeploy_of_the_device(tmp_path, vm_reports):
    _kb_with(tmp_path, vm_reports)
    instance = dg.DagsterInstance.ephemeral()
    ok = _tick(tmp_path, instance, HealthLimitsResource(inference_ms_max=1e6, resets_max=BOOTS - 1))
    assert not ok.run_requests
    looping = _tick(tmp_path, instance, HealthLimitsResource(inference_ms_max=1e6, resets_max=BOOTS - 2,
                                                             action="redeploy"))
    (req,) = looping.run_requests
    assert req.job_name == replace_champion_job.name and req.partition_key == DEVICE
    assert "%d resets" % (BOOTS - 1) in req.tags["tinyml/health"] and "watchdog" in req.tags["tinyml/health"]
    none = _tick(tmp_path, instance, HealthLimitsResource(inference_ms_max=1e6, resets_max=0, action="none"))
    assert not none.run_requests
