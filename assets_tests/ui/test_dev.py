"""`make dev` as the README tells it: its instance config, the default materialisation path, and a clean stop."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil

from tinyml_dagster import settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_instance_config_queues_runs_with_limits(tmp_path):
    from tinyml_dagster.dev import install_instance_config

    home = tmp_path / "home"
    install_instance_config(home)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: true\n")  # an older copy is replaced
    install_instance_config(home)
    instance = dg.DagsterInstance.from_config(str(home))
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    queue = instance.get_concurrency_config().run_queue_config
    assert 1 <= queue.max_concurrent_runs <= 3
    per_value = [t for t in queue.tag_concurrency_limits if isinstance(t.get("value"), dict)]
    limits = {(t["key"], t.get("value")): t["limit"] for t in queue.tag_concurrency_limits if t not in per_value}
    assert limits[("tinyml/job", "decide")] == 1 and limits[("tinyml/job", "retrain")] == 1
    # one deploy run at a time on each bus (per value of tinyml/bus), different buses in parallel
    assert [(t["key"], t["value"], t["limit"]) for t in per_value] == [
        ("tinyml/bus", {"applyLimitPerUniqueValue": True}, 1)]


def test_candidate_models_default_config_succeeds_after_make_devs_preparation(data_dir, tmp_path, monkeypatch):
    """README: make dev, then materialise candidate_models with its default config (every bearing)."""
    from tinyml_dagster.defs.models.assets import candidate_models
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.models.resources import ModelRepositoryResource
    from tinyml_dagster.dev import ensure_pool_inputs
    from tinyml_dagster.model_repository import ModelRepository
    from tinyml_dagster.pool_inference import pool_ids

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TINYML_SYNTHETIC_FILES", "40")
    (tmp_path / "home").mkdir()
    said = []
    ensure_pool_inputs(log=said.append)
    assert len(said) == 2  # the demo's channel, then the other bearings' feature windows
    ensure_pool_inputs(log=said.append)
    assert len(said) == 2  # ready: nothing materialised again
    assert all(settings.feature_path(settings.DEFAULT_RATE_HZ, b).exists() for b in settings.BEARINGS)
    result = dg.materialize([candidate_models], instance=dg.DagsterInstance.get(),
                            resources={"model_repository": ModelRepositoryResource(gateway=GatewayResource())})
    assert result.success
    repo = ModelRepository(settings.models_dir())
    assert len(repo.candidate_ids()) == 5 * len(settings.BEARINGS)
    # the pool stays the device's cohort: bearing 3 at the default rate
    monkeypatch.setenv(settings.COHORT_ENV, "bearing=3,rate_hz=%d" % settings.DEFAULT_RATE_HZ)
    cohort = pool_ids(repo)
    assert len(cohort) == 5 and all(repo.get(m)["training"]["bearing"] == 3 for m in cohort)


def test_dev_in_the_background_stops_on_sigint_with_its_children(data_dir, tmp_path):
    """Started from a script's background (SIGINT ignored), Ctrl-C's signal still stops every process it started."""
    from tinyml_dagster.dev import install_instance_config

    env = dict(os.environ, DAGSTER_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT),
               TINYML_IMS_DIR=str(Path(__file__).parents[1] / "fixtures" / "ims" / "1st_test"))
    from tinyml_dagster.demo import BEARING, RATE_HZ

    # what make dev's first start leaves (the cohort's candidates, every bearing's feature windows): it starts at once
    install_instance_config(tmp_path / "home")
    _cohort_repository(BEARING, RATE_HZ)
    for b in settings.BEARINGS:
        settings.feature_path(RATE_HZ, b).parent.mkdir(parents=True, exist_ok=True)
        settings.feature_path(RATE_HZ, b).write_bytes(b"")
    log = open(tmp_path / "dev.log", "wb")
    dev = subprocess.Popen([sys.executable, "-m", "tinyml_dagster.dev", "--no-dagster", "--runtime", "cpython"],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 120
        while b"link service up" not in (tmp_path / "dev.log").read_bytes():
            assert dev.poll() is None and time.time() < deadline, (tmp_path / "dev.log").read_text()[-2000:]
            time.sleep(0.2)
        children = psutil.Process(dev.pid).children(recursive=True)
        assert len(children) >= 2  # the emulator and the link service
        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
        assert b"killed" not in (tmp_path / "dev.log").read_bytes()  # each stopped on its signal, none SIGKILLed
    finally:
        if dev.poll() is None:
            dev.kill()
        log.close()


def _cohort_repository(bearing: int, rate_hz: int) -> None:
    """Five candidates of the cohort in the repository's candidate set, as make dev's first start leaves it."""
    from firmware import isoforest
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(settings.models_dir())
    rows = [[0.001 * i, 0.01 * (i % 13), 0.1 * (i % 7)] for i in range(120)]
    ids = [repo.add(isoforest.train(rows, n, 32, n), rate_hz=rate_hz, prefix="b%d" % bearing,
                    training={"bearing": bearing, "rate_hz": rate_hz}, threshold=0.6)
           for n in (10, 20, 30, 40, 50)]
    repo.set_candidates(ids)
