"""`make demo`: the whole Tiny-MLOps loop end to end, a printed summary, and data/bench/demo.json.

1. Materialise every (unpartitioned and statically partitioned) asset of the Definitions outside the loop:
   the IMS recording (synthetic by default, TINYML_IMS_DIR for real files), features, candidate models, packages.
2. The loop, on its own data directory (data/demo/), on step 1's data: a device running the real firmware behind
   the simulated 2,400-baud half-duplex line (time-scaled) samples IMS set 1's failing bearing (3, x channel) at
   settings.DEFAULT_RATE_HZ through the emulator's DataFeed; the gateway link service owns its port; the pool is
   the repository's candidates of that bearing at that rate. The device trains its first champion on its own first
   windows (run-in) and streams; the champion flags healthy windows the pool calls normal (false positives);
   Dagster's sensors run the pool and, at N_fp, the replacement job: package, Release checks, deploy through the
   link service; the device runs the new champion, and later in life the pool confirms the bearing's anomalies.
   Replacement is once per episode: a deployed champion that reaches N_fp in turn (e.g. at the defect's onset,
   where the pool's members split) is replaced again.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinyml_dagster import settings

DEVICE_ID = "esp32-demo"
RATE_HZ = getattr(settings, "DEFAULT_RATE_HZ", 2000)


def device_channel() -> tuple[int, str]:
    """(unit, axis) the device samples: IMS set 1's failing bearing 3 (inner race), x; or the recording spec's
    device_channel (default: its first monitored channel), in the unit that holds it."""
    path = settings.recording_spec_file()
    if path is None:
        return 3, "x"
    from tinyml_dagster.recordings import load_spec

    spec = load_spec(path)
    units = [u.split("+") for u in spec.monitor] or [[c] for c in spec.channels]
    channel = spec.device_channel or units[0][0]
    unit = next((k for k, u in enumerate(units, start=1) if channel in u), None)
    if unit is None:
        raise ValueError(f"{path}: device_channel {channel!r} is not a monitored channel")
    return unit, channel


BEARING, AXIS = device_channel()
# the loop's feature set: the default, which sees wear (the paper's Fig. 3/4 reproductions keep the paper's set)
FEATURE_SET = "wear"
# the device trains its first champion on its first N_TRAIN windows: 8 snapshots of the replayed recording, inside
# its run-in (the level still rising), so the settled machine's windows look new to it and it raises the false
# positives the loop exists to correct (the paper's case); trained on the settled machine it would not need a
# replacement
N_TRAIN = 16
# the device's alarm span (seconds of its clock, which counts whole seconds): the replay compresses the recording,
# at 20-25 windows per real second two seconds hold 20-25 snapshots of 10 min, a few hours of the recording (the
# whole-life evaluation uses one hour of 10-min snapshots); one second would hold too few windows when the device
# pauses (a deploy), and a pair of false positives would make half of them
ALARM_SPAN_S = 2


# -- the pool: the repository's candidates for the device's bearing ------------------------------------------

def pool_candidates(source_models: Path, rate_hz: int = RATE_HZ, bearing: int = BEARING,
                    feature_set: str = FEATURE_SET) -> list[dict]:
    """The source repository's candidates trained on this bearing at this rate (metadata, 5 forest sizes).

    The pool is the device's bearing's models only: the candidates of the other bearings learnt other machines'
    normal (the paper's pool serves one device type); 5 is odd, so the majority never ties.
    """
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(source_models)

    def fits(m: dict) -> bool:
        t = m.get("training") or {}
        return (m.get("source") == "gateway" and t.get("bearing") == bearing and t.get("rate_hz") == rate_hz
                and (m.get("feature_schema") or {}).get("feature_set", "paper") == feature_set)

    found = [m for m in repo.candidates() if fits(m)]
    if not found:  # the current candidate set is of another rate: the newest stored version of each forest size
        latest: dict = {}
        for m in repo.list():
            if fits(m) and m["version"] >= latest.get(m["family"], {}).get("version", 0):
                latest[m["family"]] = m
        found = sorted(latest.values(), key=lambda m: m["hyperparameters"]["n_trees"])
    if not found:
        raise RuntimeError("%s: no candidate models of bearing %d at %d Hz on feature set %s; materialise "
                           "candidate_models (rate_hz=%d, feature_set=%s) first (make demo does it in step 1)"
                           % (source_models, bearing, rate_hz, feature_set, rate_hz, feature_set))
    return found


def materialize_pool_inputs(rate_hz: int = RATE_HZ, bearing: int = BEARING, instance=None,
                            feature_set: str = FEATURE_SET) -> None:
    """Step 1 for one channel only: recording, features and candidate_models of one bearing, in TINYML_DATA_DIR."""
    import dagster as dg

    from tinyml_dagster.defs.data.assets import materialize_data
    from tinyml_dagster.defs.models.assets import candidate_models
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.models.resources import ModelRepositoryResource

    instance = instance or dg.DagsterInstance.ephemeral()
    for r in materialize_data(rates_hz=[rate_hz], bearings=[bearing], instance=instance):
        if not r.success:
            raise RuntimeError("materialising the data assets failed")
    repository = ModelRepositoryResource(gateway=GatewayResource())
    r = dg.materialize([candidate_models], instance=instance, resources={"model_repository": repository},
                       run_config={"ops": {"candidate_models": {"config": {
                           "rate_hz": rate_hz, "bearings": [bearing], "feature_set": feature_set}}}})
    if not r.success:
        raise RuntimeError("materialising candidate_models failed")


def seed_pool(models_root: Path, source_models: Path, rate_hz: int = RATE_HZ, bearing: int = BEARING,
              feature_set: str = FEATURE_SET) -> list[str]:
    """Copy the pool's candidates into the loop's repository (same ids) and make them its candidate set."""
    from tinyml_dagster.model_repository import ModelRepository

    src, dst = ModelRepository(source_models), ModelRepository(models_root)
    ids = []
    for meta in pool_candidates(source_models, rate_hz, bearing, feature_set):
        forest, cfg = src.load(meta["model_id"])
        mid = dst.add(forest, lineage=meta.get("lineage"), threshold=cfg["threshold"], rate_hz=cfg["rate_hz"],
                      window_ms=cfg.get("window_ms", 500), seed=meta.get("seed"), training=meta.get("training"),
                      metrics=meta.get("metrics"), prefix=meta["family"].rsplit("-t", 1)[0],
                      feature_set=cfg.get("feature_set", "paper"), feature_params=cfg.get("feature_params") or None)
        if mid != meta["model_id"]:
            raise RuntimeError("candidate %s copied as %s (content differs)" % (meta["model_id"], mid))
        ids.append(mid)
    dst.set_candidates(ids, note={"source": str(source_models), "rate_hz": rate_hz, "bearing": bearing})
    return ids


# -- the device: real firmware behind the simulated line, fed the IMS recording, in its own process -----------

def data_feed(recording: str | None, ims_dir: str, bearing: int, axis: str, rate_hz: int, pace: float):
    """The device's data UART: the recording spec's channel, else the IMS files' bearing and axis, replayed at
    pace x real time."""
    from tinyml_dagster import ims
    from tinyml_dagster.emulator.data_feed import DataFeed, RecordingFeed

    if recording:
        from tinyml_dagster.recordings import load_spec, open_recording

        return RecordingFeed(open_recording(load_spec(recording)), axis, rate_hz, time_scale=pace)
    return DataFeed(ims.list_ims_files(Path(ims_dir)), bearing, axis, rate_hz, time_scale=pace)


# the demo's settings update, sent once the recording is scored: the champion's threshold and the alarm span
DEMO_SETTINGS = {"threshold": 0.65, "alarm_span_s": 300}
HEALTH_WINDOWS = 40  # windows the champion in force runs in the MicroPython VM for the device's health


def settings_update(defs, instance, note) -> dict | None:
    """update_settings_job for the demo's device; its outcome (None when the run failed)."""
    r = defs.resolve_job_def("update_settings_job").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"update_settings": {"config": {"device_id": DEVICE_ID, **DEMO_SETTINGS}}}})
    outcome = r.output_for_node("update_settings")[0] if r.success else None
    note("update_settings_job", success=r.success, **({"status": outcome["status"], "reason": outcome["reason"]}
                                                       if outcome else {}))
    return outcome


def vm_device_health(flash: Path, key: bytes, feed) -> dict:
    """The device's health as the MicroPython VM measures it on the champion and settings in force: means over
    the reporting periods (times on the ESP32 model, the VM's heap, energy from tinyml_dagster.health's model)."""
    from tinyml_dagster import health
    from tinyml_dagster.emulator.health_run import vm_health

    reports = [health.from_report(r) for r in vm_health(flash, feed, DEVICE_ID, key, windows=HEALTH_WINDOWS,
                                                        every=10, heap_bytes=96 * 1024 * 1024)]
    periods = [h for h in reports if h["inference_ms_mean"]]
    if not periods:
        return {}

    def mean(k: str) -> float:
        return round(sum(h[k] for h in periods) / len(periods), 3)

    return {"inference_ms_mean": mean("inference_ms_mean"), "inference_ms_max": max(h["inference_ms_max"]
                                                                                    for h in periods),
            "feature_ms_mean": mean("feature_ms_mean"), "active_ms_mean": mean("active_ms_mean"),
            "energy_mj_per_window": mean("energy_mj_per_window"), "free_heap_bytes": periods[-1]["free_heap_bytes"],
            "windows": sum(h["windows"] for h in periods), "ns_per_instruction": health.NS_PER_FUEL,
            "power_model_mw": round(health.ACTIVE_MW, 1)}


def device_main(args) -> int:
    """The emulated device: SimulatedLink (its gateway end is a pty) + firmware Device + the bearing's DataFeed."""
    import signal as _signal

    from firmware.device import Device
    from tinyml_dagster.link.sim import SimulatedLink
    from tinyml_dagster.link.transport import LinkTiming

    link = SimulatedLink(LinkTiming(time_scale=args.time_scale))
    # the recording is replayed at windows_per_s windows per real second
    feed = data_feed(args.recording, args.ims_dir, args.bearing, args.axis, args.rate_hz,
                     args.windows_per_s * settings.WINDOW_MS / 1000.0)
    device = Device(feed, link.device_uart, args.flash)
    gc.freeze()  # the host's own objects: the firmware's collect once per window scans only what it allocates
    stop = threading.Event()
    _signal.signal(_signal.SIGTERM, lambda *_: stop.set())
    status = Path(args.status)
    error = None

    def write_status():
        doc = {"port": link.gateway_port, "windows": int(device.state.data.get("windows", 0)),
               "champion": list(device.agent.champion_info()), "signal_done": feed.exhausted(),
               "outbox": len(device.comm.outbox), "windows_planned": feed.windows_planned(),
               "per_version": {str(v): c for v, c in device.scored.items()}, "error": error}
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, status)

    last_write = 0.0
    try:
        while not stop.is_set():
            busy = device.step()
            if time.monotonic() - last_write > 0.1:
                write_status()
                last_write = time.monotonic()
            if not busy:
                time.sleep(0.0005)
    except Exception as exc:
        error = repr(exc)
    finally:
        write_status()
        link.close()
    return 0


# -- the loop -------------------------------------------------------------------------------------------------

@dataclass
class LoopResult:
    figures: dict
    events: list = field(default_factory=list)


def run_loop(data_dir: Path, *, source_dir: Path | None = None, ims_dir: Path | None = None,
             rate_hz: int = RATE_HZ, bearing: int = BEARING, axis: str = AXIS, n_train: int = N_TRAIN,
             upload_every: int = 10, windows_per_s: float = 20.0, time_scale: float = 0.02, n_fp: int = 5,
             timeout_s: float = 240.0, pool_in_service: bool = True, log=print, instance=None,
             progress=None) -> LoopResult:
    """Run the loop once on the IMS recording; returns its figures (windows, anomalies, false positives, ...).

    source_dir holds step 1's output (the recording unless ims_dir is given, and the candidate models);
    the device trains its first champion on its first n_train windows and uploads every upload_every-th
    normal window; the recording is replayed at windows_per_s windows per real second, the link time-scaled;
    progress(windows done, windows planned, what) as the device goes.
    """
    import dagster as dg

    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.definitions import defs_for
    from tinyml_dagster.link.sim import provision_flash
    from tinyml_dagster.link.transport import LinkTiming

    data_dir = Path(data_dir).resolve()
    source_dir = Path(source_dir).resolve() if source_dir else settings.data_dir()
    ims_dir = Path(ims_dir).resolve() if ims_dir else (
        Path(os.environ[settings.IMS_DIR_ENV]).resolve() if os.environ.get(settings.IMS_DIR_ENV)
        else settings.generated_ims_dir(source_dir))
    if data_dir.exists():  # the loop's own directory: every run starts from a factory-fresh device and gateway
        shutil.rmtree(data_dir)
    gateway = GatewayResource(data_dir=str(data_dir), n_fp=n_fp)
    data_dir.mkdir(parents=True, exist_ok=True)
    events: list = []

    def note(what: str, **kw) -> None:
        events.append(dict(kw, t=round(time.time() - t0, 3), event=what))
        log("[%7.2f s] %s %s" % (time.time() - t0, what, " ".join("%s=%s" % kv for kv in kw.items())))

    t0 = time.time()
    candidates = seed_pool(gateway.models_dir(), settings.models_dir(source_dir), rate_hz, bearing)
    note("pool", models=len(candidates), bearing=bearing, rate_hz=rate_hz)

    defs = defs_for(gateway)
    repo_def = defs.get_repository_def()
    resources = repo_def.get_top_level_resources()
    instance = instance or dg.DagsterInstance.ephemeral()

    timing = LinkTiming(time_scale=time_scale)
    flash = gateway.device_flash_dir(DEVICE_ID)
    provision_flash(flash, DEVICE_ID, gateway.device_keys().key(DEVICE_ID), timing)
    cfg = json.loads((flash / "config.json").read_text())
    cfg.update({"rate_hz": rate_hz, "window_ms": settings.WINDOW_MS, "n_train": n_train, "upload_every": upload_every,
                "ack_timeout_ms": max(200, int(5000 * time_scale * 4)), "feature_set": FEATURE_SET,
                "alarm_span_s": ALARM_SPAN_S})
    (flash / "config.json").write_text(json.dumps(cfg))
    run_dir = data_dir / "run"
    run_dir.mkdir(exist_ok=True)
    status_path = run_dir / "device.json"
    status_path.unlink(missing_ok=True)
    procs = []
    logf = open(run_dir / "processes.log", "ab")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tinyml_dagster.demo", "device", "--flash", str(flash), "--status", str(status_path),
         "--time-scale", str(time_scale), "--ims-dir", str(ims_dir), "--rate-hz", str(rate_hz),
         "--bearing", str(bearing), "--axis", axis, "--windows-per-s", str(windows_per_s)]
        + (["--recording", str(settings.recording_spec_file())] if settings.recording_spec_file() else []),
        stdout=logf, stderr=logf))
    status = _wait_json(status_path, 60, procs[0])
    ready = run_dir / "service.ready"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tinyml_dagster.link_service", "--kb", str(gateway.knowledge_base_path()),
           "--port", "%s=%s" % (DEVICE_ID, status["port"]), "--time-scale", str(time_scale),
           "--ready-file", str(ready), "--reply-slack", "2"]
    if not pool_in_service:
        cmd.append("--no-pool")
    # the service's own pool reads this gateway's repository
    procs.append(subprocess.Popen(cmd, stdout=logf, stderr=logf, env=dict(os.environ, TINYML_DATA_DIR=str(data_dir))))
    _wait_file(ready, 60, procs[1])
    source = ({"recording": str(settings.recording_spec_file())} if settings.recording_spec_file()
              else {"ims": str(ims_dir)})
    note("started", device=DEVICE_ID, **source, channel="unit %d %s" % (bearing, axis),
         link_port=status["port"], time_scale=time_scale, windows_planned=status["windows_planned"])

    kb = gateway.knowledge_base()
    done_keys: set[str] = set()
    fleet_cursor, next_fleet_report = None, 0.0
    replacements = []
    try:
        while time.time() - t0 < timeout_s:
            status = json.loads(status_path.read_text())
            if progress:
                progress(status["windows"], status["windows_planned"], "windows on the device")
            if status["error"] or any(p.poll() is not None for p in procs):
                raise RuntimeError("the device or the link service stopped: %s (see %s)" % (status["error"], logf.name))
            # device_uploads_sensor: the service's decisions as asset events; pool_decisions_job only for work
            with dg.build_sensor_context(instance=instance, resources=resources, repository_def=repo_def) as ctx:
                res = defs.resolve_sensor_def("device_uploads_sensor")(ctx)
            for req in res.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            for event in res.asset_events or []:
                instance.report_runless_asset_event(event)
            for req in res.run_requests or []:
                r = defs.resolve_job_def("pool_decisions_job").execute_in_process(instance=instance, tags=req.tags)
                assert r.success
            # false_positive_sensor -> replace_champion_job (once per episode: run_key)
            with dg.build_sensor_context(instance=instance, resources=resources, repository_def=repo_def) as ctx:
                res = defs.resolve_sensor_def("false_positive_sensor")(ctx)
            for req in res.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            for req in res.run_requests or []:
                if req.run_key in done_keys:
                    continue
                done_keys.add(req.run_key)
                note("false_positive_sensor", run_key=req.run_key, candidate=req.tags["tinyml/model_id"],
                     false_positives=req.tags["tinyml/false_positives"])
                r = defs.resolve_job_def("replace_champion_job").execute_in_process(
                    instance=instance, partition_key=req.partition_key, tags=req.tags, raise_on_error=False)
                deploys = kb.deploys(DEVICE_ID)
                if not deploys:
                    note("replace_champion_job", success=r.success, status="not queued")
                    continue
                deploy = deploys[-1]
                note("replace_champion_job", run_id=r.run_id, success=r.success, status=deploy["status"],
                     model=deploy["model_id"],
                     link_seconds=round(deploy["figures"].get("link_seconds") or 0, 1), error=deploy["error"])
                episode = int(req.tags["tinyml/episode"])
                t_nfp = kb.nth_false_positive_time(episode, n_fp)
                if deploy["status"] != "done":
                    continue  # the link failed: false_positive_sensor asks again under a retry run key
                replacements.append({"run_success": r.success, "deploy": deploy, "t_nfp": t_nfp})
            if time.time() >= next_fleet_report:
                fleet_cursor = report_fleet(defs, instance, resources, fleet_cursor)
                next_fleet_report = time.time() + 2.0
            if status["signal_done"] and not status["outbox"] and kb.count_uploads() and _settled(kb):
                break  # the whole recording was scored, uploaded and decided
            time.sleep(0.1)
        # let the last windows reach the gateway and be decided
        deadline = time.time() + 10
        while time.time() < deadline and not _settled(kb):
            time.sleep(0.2)
        r = defs.resolve_job_def("pool_decisions_job").execute_in_process(instance=instance)
        settings_outcome = settings_update(defs, instance, note)
        report_fleet(defs, instance, resources, fleet_cursor)
    finally:
        for p in reversed(procs):
            p.send_signal(15)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        logf.close()
    status = json.loads(status_path.read_text())
    feed = data_feed(str(settings.recording_spec_file() or ""), str(ims_dir), bearing, axis, rate_hz, 1e9)
    device_health = vm_device_health(flash, gateway.device_keys().key(DEVICE_ID), feed)
    reported = kb.health_history(DEVICE_ID)
    device_health["resets"] = reported[-1]["resets"] if reported else 0
    device_health["reports_in_kb"] = len(reported)
    note("device_health", **device_health)
    figures = _figures(kb, status, replacements, n_fp, time_scale, time.time() - t0)
    fig = settings_outcome["figures"] if settings_outcome else {}
    figures.update({
        "config_updates": sum(u["status"] == "applied" for u in kb.settings_updates(DEVICE_ID)),
        "config_update": {k: settings_outcome[k] for k in ("version", "status", "reason", "settings", "in_force")}
        if settings_outcome else None,
        "config_update_link_seconds": fig.get("link_seconds"),
        # the same exchange on a clean line: its wire bytes at 2,400 baud and two turnarounds
        "config_update_wire_seconds": (round(fig["wire_bytes"] * timing.byte_s + 2 * timing.turnaround_s, 3)
                                       if fig else None),
        "config_update_wire_bytes": fig.get("wire_bytes"),
        "device_health": device_health})
    figures.update({"rate_hz": rate_hz, "bearing": bearing, "axis": axis, "ims_dir": str(ims_dir), "pool": candidates,
                    "n_train": n_train, "upload_every": upload_every, "windows_per_s": windows_per_s})
    kb.close()
    return LoopResult(figures, events)


def report_fleet(defs, instance, resources, cursor: str | None) -> str | None:
    """One fleet_sensor tick: what changed in the fleet, as asset events in the instance; the new cursor."""
    import dagster as dg

    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
        res = defs.resolve_sensor_def("fleet_sensor")(ctx)
    for event in res.asset_events or []:
        instance.report_runless_asset_event(event)
    return res.cursor or cursor


def _settled(kb) -> bool:
    return not kb.undecided(limit=1)


def _wait_file(path: Path, timeout: float, proc) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("%s did not come up (exit %s)" % (proc.args[:4], proc.poll()))
        time.sleep(0.05)


def _wait_json(path: Path, timeout: float, proc) -> dict:
    _wait_file(path, timeout, proc)
    return json.loads(path.read_text())


def _figures(kb, status, replacements, n_fp, time_scale, elapsed) -> dict:
    champion_info = status["champion"]
    done = [r for r in replacements if r["deploy"]["status"] == "done"]
    first = done[0] if done else None
    fig = first["deploy"]["figures"] if first else {}
    new_model = done[-1]["deploy"]["model_id"] if done else None
    after = kb.count_windows_received_after(first["deploy"]["finished_at"]) if first else 0
    # per champion: the windows it scored (counted on the device) and its false positives (decided by the pool)
    decided = kb.champion_scores()
    champions = []
    for version, (scored, anomalies) in sorted(status["per_version"].items(), key=lambda kv: int(kv[0])):
        pool = decided.get(version)
        n_fps = pool.false_positives if pool else 0
        champions.append({"version": int(version), "windows": scored, "anomalies": anomalies,
                          "false_positives": n_fps, "confirmed_anomalies": pool.confirmed_anomalies if pool else 0,
                          "false_positive_rate": round(n_fps / scored, 4) if scored else None})
    return {
        "device": DEVICE_ID,
        "feature_set": FEATURE_SET,
        "champions": champions,
        # what a person sees: the alarms the device raised (k of n anomalous windows over its span), as stored
        "alarms": [{k: a[k] for k in ("start", "end", "peak_score", "feature_set", "champion_id", "champion_version")}
                   for a in kb.alarms()],
        # false positives per window scored, by the device's own champion and by the one the gateway deployed
        "false_positive_rate_before": champions[0]["false_positive_rate"] if champions else None,
        "false_positive_rate_after": champions[1]["false_positive_rate"] if len(champions) > 1 else None,
        "windows": status["windows"],
        "windows_uploaded": kb.count_uploads() - kb.count_uploads(kind="champion"),
        "anomalies": kb.count_uploads(kind="anomaly"),
        "pool_confirmed_anomalies": kb.count_pool_anomalies(),
        "false_positives": kb.count_false_positives(),
        "n_fp": n_fp,
        "replacements": len(done),
        "replacement_seconds": (round(first["deploy"]["finished_at"] - first["t_nfp"], 3)
                                if first and first["t_nfp"] else None),
        "deploy_wire_seconds": round(fig.get("link_seconds", 0.0), 2) if first else None,
        "deploy_real_seconds": (round(first["deploy"]["finished_at"] - first["deploy"]["started_at"], 3)
                                if first else None),
        # the same replacement on an unscaled 2,400-baud line: real time with the deploy's link time put back
        "replacement_seconds_unscaled": round(first["deploy"]["finished_at"] - first["t_nfp"]
                                              - (first["deploy"]["finished_at"] - first["deploy"]["started_at"])
                                              + fig.get("link_seconds", 0.0), 2) if first and first["t_nfp"] else None,
        "occupation": round(fig.get("occupation", 0.0), 3) if first else None,
        "package_bytes": fig.get("package_bytes") if first else None,
        "new_champion": new_model,
        "device_runs": list(champion_info),
        "device_runs_new_champion": bool(first) and champion_info[0] == new_model,
        "uploads_after_replacement": after,
        "ranking_top": kb.ranking()[:3],
        "time_scale": time_scale,
        "elapsed_s": round(elapsed, 2),
    }


def materialize_everything(log=print, progress=None) -> dict:
    """Materialise every asset outside the loop, in dependency order (each static partition of partitioned ones);
    progress(done, total, what) after each materialisation."""
    import dagster as dg

    from tinyml_dagster.definitions import defs as load_defs

    defs = load_defs()
    graph = defs.get_repository_def().asset_graph
    instance = dg.DagsterInstance.ephemeral()
    t = time.time()
    out = {"assets": [], "partitions": 0}
    todo = []
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable or node.group_name == "loop":
            continue
        pkeys = (node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
                 if node.partitions_def else [None])
        todo += [(key, pk) for pk in pkeys]
    for i, (key, pk) in enumerate(todo):
        name = key.to_user_string() + (" [%s]" % pk if pk else "")
        job = defs.resolve_implicit_job_def_def_for_assets([key])
        # the candidates are the loop's pool: trained on the loop's feature set
        run_config = ({"ops": {"candidate_models": {"config": {"feature_set": FEATURE_SET}}}}
                      if key.to_user_string() == "candidate_models" else None)
        r = job.execute_in_process(instance=instance, asset_selection=[key], partition_key=pk, raise_on_error=False,
                                   run_config=run_config)
        if not r.success:
            raise RuntimeError("materialising %s failed" % name)
        out["partitions"] += pk is not None
        if key.to_user_string() not in out["assets"]:
            out["assets"].append(key.to_user_string())
        log("materialised %s (%.1f s)" % (name, time.time() - t))
        if progress:
            progress(i + 1, len(todo), name)
    out["seconds"] = round(time.time() - t, 1)
    return out


@contextlib.contextmanager
def quiet_console(log_path: Path, verbose: bool):
    """(log, progress factory): quiet, Dagster's event log and the steps go to log_path and the terminal shows a
    progress bar per step with its ETA; verbose, everything goes to the terminal."""
    if verbose:
        yield print, lambda title: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    log_path.parent.mkdir(parents=True, exist_ok=True)
    console = Console(file=sys.stdout)
    console.print("Dagster's event log and the loop's steps: %s (-v shows them here)" % log_path)
    with open(log_path, "w") as logf, contextlib.redirect_stderr(logf), Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[what]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console) as bars:

        def log(line: str) -> None:
            print(line, file=logf, flush=True)

        def progress(title: str):
            task = bars.add_task(title, total=None, what="")

            def update(done: int, total: int, what: str) -> None:
                bars.update(task, completed=done, total=total, what=what)
            return update

        yield log, progress


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        dp = argparse.ArgumentParser(prog="python -m tinyml_dagster.demo device")
        dp.add_argument("--flash", required=True)
        dp.add_argument("--status", required=True)
        dp.add_argument("--time-scale", type=float, default=0.02)
        dp.add_argument("--ims-dir", required=True)
        dp.add_argument("--rate-hz", type=int, default=RATE_HZ)
        dp.add_argument("--bearing", type=int, default=BEARING)
        dp.add_argument("--axis", default=AXIS)
        dp.add_argument("--windows-per-s", type=float, default=20.0)
        dp.add_argument("--recording", help="recording spec (then --axis is the channel fed)")
        return device_main(dp.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--time-scale", type=float, default=0.02, help="real seconds per link second")
    ap.add_argument("--n-fp", type=int, default=settings.n_fp())
    ap.add_argument("--skip-assets", action="store_true", help="only the loop (on step 1's earlier output)")
    ap.add_argument("--n-train", type=int, default=N_TRAIN, help="windows the device trains its first champion on")
    ap.add_argument("--upload-every", type=int, default=10, help="the device uploads every n-th normal window")
    ap.add_argument("--windows-per-s", type=float, default=20.0, help="recording replay pace (windows per real second)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show Dagster's event log and every step here")
    args = ap.parse_args(argv)
    root = settings.data_dir()
    summary: dict = {}
    with quiet_console(root / "logs" / "demo.log", args.verbose) as (log, progress):
        if not args.skip_assets:
            summary["assets"] = materialize_everything(log=log, progress=progress("step 1: assets"))
        res = run_loop(root / "demo", source_dir=root, time_scale=args.time_scale, n_fp=args.n_fp,
                       n_train=args.n_train, upload_every=args.upload_every, windows_per_s=args.windows_per_s,
                       log=log, progress=progress("step 2: the loop"))
    f = res.figures
    summary.update(f)
    print()
    source = "recording %s, unit" % settings.recording_spec_file() if settings.recording_spec_file() else "IMS bearing"
    print("Tiny-MLOps loop, device %s on %s %d %s at %d Hz, pool %d candidates (link time-scaled x%g)" % (
        f["device"], source, f["bearing"], f["axis"], f["rate_hz"], len(f["pool"]), f["time_scale"]))
    print("  windows processed on the device   %d (%d uploaded)" % (f["windows"], f["windows_uploaded"]))
    print("  anomalies reported by champion    %d (pool confirmed %d)" % (
        f["anomalies"], f["pool_confirmed_anomalies"]))
    print("  false positives (pool rejected)   %d (N_fp = %d)" % (f["false_positives"], f["n_fp"]))
    print("  champion replacements             %d -> %s" % (f["replacements"], f["new_champion"]))
    print("  N_fp-th false positive -> running %s s real (%s s on an unscaled line)" % (
        f["replacement_seconds"], f["replacement_seconds_unscaled"]))
    print("  deploy wire time                  %s s at 2,400 baud (link time; %s s real)" % (
        f["deploy_wire_seconds"], f["deploy_real_seconds"]))
    print("  link occupation                   %s" % f["occupation"])
    print("  device runs                       %s (new champion: %s)" % (
        f["device_runs"], f["device_runs_new_champion"]))
    print("  alarms raised by the device       %d (span %d s of the replay)" % (len(f["alarms"]), ALARM_SPAN_S))
    for a in f["alarms"]:
        print("    alarm by champion v%s %s: peak score %.3f, %s" % (
            a["champion_version"], a["champion_id"], a["peak_score"], "cleared" if a["end"] else "still active"))
    print("  false-positive rate per window    %s before the replacement, %s after" % (
        f["false_positive_rate_before"], f["false_positive_rate_after"]))
    u = f["config_update"] or {}
    print("  settings update (no package)      %s v%s %s: %s link s at 2,400 baud (%s s of wire + turnarounds; "
          "target <= 3 s), %s bytes" % (u.get("status", "not sent"), u.get("version"), u.get("settings"),
                                       f["config_update_link_seconds"], f["config_update_wire_seconds"],
                                       f["config_update_wire_bytes"]))
    h = f["device_health"]
    print("  device health (MicroPython VM)    inference %s ms, features %s ms, free heap %s B, resets %s, "
          "%s mJ/window" % (h.get("inference_ms_mean"), h.get("feature_ms_mean"), h.get("free_heap_bytes"),
                            h.get("resets"), h.get("energy_mj_per_window")))
    for c in f["champions"]:
        print("  champion v%-3d windows %4d  anomalies %3d  pool-confirmed %3d  false positives %3d (rate %s)" % (
            c["version"], c["windows"], c["anomalies"], c["confirmed_anomalies"], c["false_positives"],
            c["false_positive_rate"]))
    out = settings.bench_dir() / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out)
    print("  written %s" % out)
    if settings.recording_spec_file():  # a user's recording: the loop ran; whether a replacement was due is the data's
        if not f["replacements"]:
            print("  no replacement: the pool rejected %d of the champion's anomalies (N_fp = %d)" % (
                f["false_positives"], f["n_fp"]))
        return 0 if f["windows"] else 1
    return 0 if f["replacements"] >= 1 and f["device_runs_new_champion"] else 1


if __name__ == "__main__":
    sys.exit(main())
