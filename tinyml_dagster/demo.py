"""`make demo`: the whole Tiny-MLOps loop end to end, a printed summary, and data/bench/demo.json.

1. Materialise every (unpartitioned and statically partitioned) asset of the Definitions outside the loop:
   the synthetic recording, features, candidate models, package sizes.
2. The loop, on its own data directory (data/demo/): a pool of candidates trained on the machine's
   commissioning data; a device running the real firmware behind the simulated 2,400-baud half-duplex line
   (time-scaled); the gateway link service owning its port; the device trains its first champion, streams
   windows; its operating point drifts (benign), the champion reports anomalies the pool rejects (false
   positives); Dagster's sensors run the pool and, at N_fp, the replacement job: package, Release checks,
   deploy through the link service; the device runs the new champion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyml_dagster import settings

DEVICE_ID = "esp32-demo"
RATE_HZ = 1000
WINDOW = RATE_HZ // 2  # 500-ms windows


# -- the machine: a vibration signal on the device's data UART ---------------------------------------------

def window_samples(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One 500-ms window of the machine's vibration: normal, drifted (benign operating point), or faulty."""
    if kind == "normal":
        return rng.normal(0.0, 1.0, WINDOW)
    if kind == "drift":  # a new, harmless operating point: the mean moves
        return rng.normal(0.5, 1.0, WINDOW)
    if kind == "fault":  # bearing impacts: heavy tails
        x = rng.normal(0.5, 1.0, WINDOW)
        hits = rng.random(WINDOW) < 0.01
        return x + hits * rng.normal(0.0, 8.0, WINDOW)
    raise ValueError("unknown window kind %r" % kind)


def schedule(n_train: int, n_normal: int, n_drift: int, fault_every: int) -> list[str]:
    kinds = ["normal"] * (n_train + n_normal)
    for i in range(n_drift):
        kinds.append("fault" if fault_every and i % fault_every == fault_every - 1 else "drift")
    return kinds


class MachineSignal:
    """The data UART: float32 LE samples, one window per `period_s` real seconds (readinto, like machine.UART)."""

    def __init__(self, kinds: list[str], period_s: float, seed: int = 0):
        self.kinds = kinds
        self.period_s = period_s
        self.rng = np.random.default_rng(seed)
        self.t0 = time.monotonic()
        self.window = 0  # windows fully handed out
        self.buf = b""
        self.pos = 0

    def readinto(self, buf) -> int:
        if self.pos >= len(self.buf):
            due = int((time.monotonic() - self.t0) / self.period_s)
            if self.window >= min(due, len(self.kinds)):
                return 0
            self.buf = window_samples(self.rng, self.kinds[self.window]).astype("<f4").tobytes()
            self.pos = 0
            self.window += 1
        n = min(len(buf), len(self.buf) - self.pos)
        n -= n % 4
        buf[:n] = self.buf[self.pos:self.pos + n]
        self.pos += n
        return n

    @property
    def done(self) -> bool:
        return self.window >= len(self.kinds) and self.pos >= len(self.buf)


def commissioning_features(seed: int = 3) -> np.ndarray:
    """Feature windows of the machine at its known operating points (what the pool's candidates learn)."""
    from tinyml_dagster.features import window_features_np

    rng = np.random.default_rng(seed)
    rows = []
    for mean in np.linspace(-1.0, 1.0, 9):
        for scale in (0.8, 1.0, 1.25):
            x = rng.normal(mean, scale, (24, WINDOW))
            rows.append(np.array([window_features_np(r, WINDOW)[0] for r in x]))
    return np.vstack(rows)


def seed_candidates(models_root: Path, n_trees: tuple[int, ...] = (10, 20, 30, 40, 50), psi: int = 100) -> list[str]:
    """Train the pool's candidates on the commissioning data into the repository and make them the candidate set."""
    from firmware import isoforest
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(models_root)
    rows = commissioning_features().tolist()
    ids = [repo.add(isoforest.train(rows, n_trees=n, psi=psi, seed=100 + n),
                    lineage={"source": "commissioning", "windows": len(rows)}, seed=100 + n, prefix="machine")
           for n in n_trees]
    repo.set_candidates(ids, note={"source": "commissioning"})
    return ids


# -- the device: real firmware behind the simulated line, in its own process -----------------------------------

def device_main(args) -> int:
    """The emulated device: SimulatedLink (its gateway end is a pty) + DeviceHost + the machine's signal."""
    import signal as _signal

    from tinyml_dagster.link.sim import DeviceHost, SimulatedLink
    from tinyml_dagster.link.transport import LinkTiming

    timing = LinkTiming(time_scale=args.time_scale)
    link = SimulatedLink(timing)
    kinds = schedule(64, args.n_normal, args.n_drift, args.fault_every)
    sig = MachineSignal(kinds, period_s=0.5 * args.time_scale)
    host = DeviceHost(args.flash, link.device_uart, sig).start()
    stop = threading.Event()
    _signal.signal(_signal.SIGTERM, lambda *_: stop.set())
    status = Path(args.status)

    def write_status():
        d = host.device
        doc = {"port": link.gateway_port, "windows": int(d.state.data.get("windows", 0)),
               "champion": list(d.agent.champion_info()), "signal_done": sig.done,
               "windows_planned": len(kinds), "error": repr(host.error) if host.error else None}
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, status)

    try:
        while not stop.is_set():
            write_status()
            stop.wait(0.1)
    finally:
        write_status()
        host.stop()
        link.close()
    return 0


# -- the loop -------------------------------------------------------------------------------------------------

@dataclass
class LoopResult:
    figures: dict
    events: list = field(default_factory=list)


def run_loop(data_dir: Path, *, time_scale: float = 0.02, n_fp: int = 5, n_normal: int = 60, n_drift: int = 400,
             fault_every: int = 25, timeout_s: float = 240.0, pool_in_service: bool = False, log=print,
             instance=None) -> LoopResult:
    """Run the loop once; returns its figures (windows, anomalies, false positives, replacements, times)."""
    import dagster as dg

    from tinyml_dagster.deployment_agent import DeviceKeys
    from tinyml_dagster.knowledge_base import KnowledgeBase
    from tinyml_dagster.link.sim import provision_flash
    from tinyml_dagster.link.transport import LinkTiming

    data_dir = Path(data_dir).resolve()
    if data_dir.exists():  # the loop's own directory: every run starts from a factory-fresh device and gateway
        shutil.rmtree(data_dir)
    os.environ["TINYML_DATA_DIR"] = str(data_dir)
    os.environ["TINYML_N_FP"] = str(n_fp)
    os.environ.pop("TINYML_KB_PATH", None)
    data_dir.mkdir(parents=True, exist_ok=True)
    events: list = []

    def note(what: str, **kw) -> None:
        events.append(dict(kw, t=round(time.time() - t0, 3), event=what))
        log("[%7.2f s] %s %s" % (time.time() - t0, what, " ".join("%s=%s" % kv for kv in kw.items())))

    t0 = time.time()
    candidates = seed_candidates(settings.models_dir())
    note("candidates", models=len(candidates))

    from tinyml_dagster.definitions import defs as load_defs

    defs = load_defs()
    repo_def = defs.get_repository_def()
    resources = repo_def.get_top_level_resources()
    instance = instance or dg.DagsterInstance.ephemeral()

    timing = LinkTiming(time_scale=time_scale)
    flash = settings.device_flash_dir(DEVICE_ID)
    provision_flash(flash, DEVICE_ID, DeviceKeys().key(DEVICE_ID), timing)
    cfg = json.loads((flash / "config.json").read_text())
    cfg.update({"rate_hz": RATE_HZ, "ack_timeout_ms": max(200, int(5000 * time_scale * 4))})
    (flash / "config.json").write_text(json.dumps(cfg))
    run_dir = data_dir / "run"
    run_dir.mkdir(exist_ok=True)
    status_path = run_dir / "device.json"
    status_path.unlink(missing_ok=True)
    procs = []
    logf = open(run_dir / "processes.log", "ab")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tinyml_dagster.demo", "device", "--flash", str(flash), "--status", str(status_path),
         "--time-scale", str(time_scale), "--n-normal", str(n_normal), "--n-drift", str(n_drift),
         "--fault-every", str(fault_every)], stdout=logf, stderr=logf))
    status = _wait_json(status_path, 60, procs[0])
    ready = run_dir / "service.ready"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tinyml_dagster.link_service", "--kb", str(settings.kb_path()),
           "--port", "%s=%s" % (DEVICE_ID, status["port"]), "--time-scale", str(time_scale),
           "--ready-file", str(ready), "--reply-slack", "2"]
    if not pool_in_service:
        cmd.append("--no-pool")
    procs.append(subprocess.Popen(cmd, stdout=logf, stderr=logf))
    _wait_file(ready, 60, procs[1])
    note("started", device=DEVICE_ID, link_port=status["port"], time_scale=time_scale,
         windows_planned=status["windows_planned"])

    kb = KnowledgeBase(settings.kb_path())
    uploads_cursor = None
    done_keys: set[str] = set()
    replacements = []
    try:
        while time.time() - t0 < timeout_s:
            status = json.loads(status_path.read_text())
            if status["error"] or any(p.poll() is not None for p in procs):
                raise RuntimeError("the device or the link service stopped: %s (see %s)" % (status["error"], logf.name))
            # device_uploads_sensor -> pool_decisions_job
            ctx = dg.build_sensor_context(instance=instance, cursor=uploads_cursor, resources=resources,
                                          repository_def=repo_def)
            res = defs.resolve_sensor_def("device_uploads_sensor")(ctx)
            for req in res.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            for req in res.run_requests or []:
                r = defs.resolve_job_def("pool_decisions_job").execute_in_process(instance=instance, tags=req.tags)
                assert r.success
            uploads_cursor = res.cursor or uploads_cursor
            # false_positive_sensor -> replace_champion_job (once per episode: run_key)
            ctx = dg.build_sensor_context(instance=instance, resources=resources, repository_def=repo_def)
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
            if replacements:
                version = str(status["champion"][1])
                if status["signal_done"] or kb.scalar("SELECT COUNT(*) FROM uploads WHERE champion_id=?", (version,)):
                    break  # the device reports windows scored by the new champion (or has no more windows)
            if status["signal_done"] and not replacements and kb.count_uploads() and _settled(kb):
                break
            time.sleep(0.1)
        # let the last windows reach the gateway and be decided
        deadline = time.time() + 10
        while time.time() < deadline and not _settled(kb):
            time.sleep(0.2)
        r = defs.resolve_job_def("pool_decisions_job").execute_in_process(instance=instance)
    finally:
        for p in reversed(procs):
            p.send_signal(15)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        logf.close()
    status = json.loads(status_path.read_text())
    figures = _figures(kb, status, replacements, n_fp, time_scale, time.time() - t0)
    kb.close()
    return LoopResult(figures, events)


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
    after = kb.scalar(
        "SELECT COUNT(*) FROM uploads WHERE kind != 'champion' AND received_at > ?",
        (first["deploy"]["finished_at"],)) if first else 0
    return {
        "device": DEVICE_ID,
        "windows": status["windows"],
        "windows_uploaded": kb.count_uploads() - kb.count_uploads(kind="champion"),
        "anomalies": kb.count_uploads(kind="anomaly"),
        "pool_confirmed_anomalies": kb.scalar("SELECT COUNT(*) FROM pool_decisions WHERE pool_anomaly=1"),
        "false_positives": kb.count_false_positives(),
        "n_fp": n_fp,
        "replacements": len(done),
        "replacement_seconds": round(first["deploy"]["finished_at"] - first["t_nfp"], 3) if first and first["t_nfp"] else None,
        "deploy_wire_seconds": round(fig.get("link_seconds", 0.0), 2) if first else None,
        "deploy_real_seconds": round(first["deploy"]["finished_at"] - first["deploy"]["started_at"], 3) if first else None,
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


def materialize_everything(log=print) -> dict:
    """Materialise every asset outside the loop, in dependency order (each static partition of partitioned ones)."""
    import dagster as dg

    from tinyml_dagster.definitions import defs as load_defs

    defs = load_defs()
    graph = defs.get_repository_def().asset_graph
    instance = dg.DagsterInstance.ephemeral()
    t = time.time()
    out = {"assets": [], "partitions": 0}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable or node.group_name == "loop":
            continue
        job = defs.resolve_implicit_job_def_def_for_assets([key])
        pkeys = node.partitions_def.get_partition_keys(dynamic_partitions_store=instance) if node.partitions_def else [None]
        for pk in pkeys:
            r = job.execute_in_process(instance=instance, asset_selection=[key], partition_key=pk,
                                       raise_on_error=False)
            if not r.success:
                raise RuntimeError("materialising %s%s failed" % (key.to_user_string(), " [%s]" % pk if pk else ""))
            out["partitions"] += pk is not None
        out["assets"].append(key.to_user_string())
        log("materialised %s (%.1f s)" % (key.to_user_string(), time.time() - t))
    out["seconds"] = round(time.time() - t, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        dp = argparse.ArgumentParser(prog="python -m tinyml_dagster.demo device")
        dp.add_argument("--flash", required=True)
        dp.add_argument("--status", required=True)
        dp.add_argument("--time-scale", type=float, default=0.02)
        dp.add_argument("--n-normal", type=int, default=60)
        dp.add_argument("--n-drift", type=int, default=400)
        dp.add_argument("--fault-every", type=int, default=25)
        return device_main(dp.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--time-scale", type=float, default=0.02, help="real seconds per link second")
    ap.add_argument("--n-fp", type=int, default=settings.n_fp())
    ap.add_argument("--skip-assets", action="store_true", help="only the loop")
    args = ap.parse_args(argv)
    root = settings.data_dir()
    summary: dict = {}
    if not args.skip_assets:
        summary["assets"] = materialize_everything()
    res = run_loop(root / "demo", time_scale=args.time_scale, n_fp=args.n_fp)
    os.environ["TINYML_DATA_DIR"] = str(root)
    f = res.figures
    summary.update(f)
    print()
    print("Tiny-MLOps loop, device %s (link time-scaled x%g)" % (f["device"], f["time_scale"]))
    print("  windows processed on the device   %d (%d uploaded)" % (f["windows"], f["windows_uploaded"]))
    print("  anomalies reported by champion    %d (pool confirmed %d)" % (f["anomalies"], f["pool_confirmed_anomalies"]))
    print("  false positives (pool rejected)   %d (N_fp = %d)" % (f["false_positives"], f["n_fp"]))
    print("  champion replacements             %d -> %s" % (f["replacements"], f["new_champion"]))
    print("  N_fp-th false positive -> running %s s real (%s s on an unscaled line)" % (
        f["replacement_seconds"], f["replacement_seconds_unscaled"]))
    print("  deploy wire time                  %s s at 2,400 baud (link time; %s s real)" % (
        f["deploy_wire_seconds"], f["deploy_real_seconds"]))
    print("  link occupation                   %s" % f["occupation"])
    print("  device runs                       %s (new champion: %s)" % (f["device_runs"], f["device_runs_new_champion"]))
    out = settings.bench_dir() / "demo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out)
    print("  written %s" % out)
    return 0 if f["replacements"] >= 1 and f["device_runs_new_champion"] else 1


if __name__ == "__main__":
    sys.exit(main())
