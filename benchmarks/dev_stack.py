"""`make dev`'s stack headless: what it costs idle, whether runs queue up, and how fast a replacement lands.

Starts `python -m tinyml_dagster.dev` (the emulated ESP32 streaming bearing 3 at 10x, the link service with its
pool, Dagster's webserver and daemon with the shipped dagster.yaml) on a fresh data directory and DAGSTER_HOME,
waits for the device's own champion, then measures --idle-seconds (default 300) of CPU time of every process of the
stack (split per process), the runs launched and the largest run queue. Then it forces one false-positive episode:
windows of the device's channel its champion calls anomalous and the pool normal, enough for N_fp false positives and
the ranking's hysteresis, committed to the Knowledge Base as the link service commits the device's uploads (a
champion that never disagrees with its pool has none: then the operator first deploys the pool member that disagrees
most, through deploy_champion_job, and the episode is forced on it); it times
the pool's decision on them to the new champion installed on the device (a failed link is retried by
false_positive_sensor, up to 3 attempts, within the measured time). Stops the stack with SIGINT (as Ctrl-C does).
Writes data/bench/dev_stack.json.

    python benchmarks/dev_stack.py [--idle-seconds 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinyml_dagster import settings  # noqa: E402
from tinyml_dagster.dev import free_port  # noqa: E402
from tinyml_dagster.pool_inference import HYSTERESIS_POINTS  # noqa: E402
from tinyml_dagster.storage import atomic_write  # noqa: E402

DEVICE = "esp32-0"
FORCED_SEQ_BASE = 1 << 32  # above any upload number of the device (u32)
MAX_ATTEMPTS = 3  # false_positive_sensor's deploys of one episode (KnowledgeBaseResource.max_deploy_attempts)
LABELS = (("tinyml_dagster.dev", "dev.py"), ("tinyml_dagster.emulator", "emulator"),
          ("tinyml_dagster.link_service", "link service"), ("dagster_webserver", "webserver"),
          ("dagster-webserver", "webserver"), ("dagster-daemon", "daemon"), ("_daemon", "daemon"),
          ("execute_run", "runs"), ("api grpc", "code server"), ("code-server", "code server"),
          ("dagster dev", "dagster dev"), ("dg dev", "dg dev"), ("multiprocessing", "webserver helpers"),
          ("watch_orphans", "run log watchers"), ("tail -F", "run log watchers"))


def label(proc: psutil.Process) -> str:
    """Which part of the stack a process is."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    return next((name for key, name in LABELS if key in cmd), cmd[:60])


class CpuMeter:
    """CPU seconds (user + system) of a process and its descendants, remembered per pid between samples."""

    def __init__(self, root_pid: int):
        self.root = psutil.Process(root_pid)
        self.seen: dict[int, tuple[str, float]] = {}
        self.lock = threading.Lock()

    def sample(self) -> dict[int, tuple[str, float]]:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            procs = []
        with self.lock:
            for p in procs:
                try:
                    t = p.cpu_times()
                    prev = self.seen.get(p.pid)
                    self.seen[p.pid] = (prev[0] if prev else label(p), t.user + t.system)
                except psutil.Error:
                    pass
            return dict(self.seen)

    @staticmethod
    def between(before: dict, after: dict) -> dict[str, float]:
        """CPU seconds per part of the stack spent between two samples."""
        out: dict[str, float] = {}
        for pid, (name, cpu) in after.items():
            out[name] = out.get(name, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
        return out


def wait(pred, timeout: float, what: str, proc: subprocess.Popen, poll: float = 1.0):
    deadline = time.time() + timeout
    while True:
        value = pred()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError("the make-dev stack exited (code %s) before %s" % (proc.returncode, what))
        if time.time() > deadline:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(poll)


class ChannelVotes:
    """The pool's votes on the feature windows of the device's channel (the demo's bearing, x axis)."""

    def __init__(self):
        import numpy as np

        from tinyml_dagster.demo import BEARING, RATE_HZ
        from tinyml_dagster.features import feature_set, load_feature_windows
        from tinyml_dagster.model_repository import ModelRepository
        from tinyml_dagster.pool_inference import pool_from_repository

        self.repo = ModelRepository(settings.models_dir())
        self.engine = pool_from_repository()
        df = load_feature_windows(RATE_HZ, BEARING, feature_set=self.engine.feature_set)
        self.X = df[df.axis == "x"][list(feature_set(self.engine.feature_set).names)].to_numpy(dtype=float)
        self.decision = self.engine.decide(self.X, np.ones(len(self.X)))

    def false_positives(self, model_id: str):
        """Which windows are false positives of a champion: it flags them (its forest, its threshold), the pool's
        majority calls them normal. A pool member's own flags are its votes, so they also move the ranking away
        from it, as the pool's hysteresis requires before it is replaced."""
        from tinyml_dagster.forest import score_forest
        from tinyml_dagster.pool_inference import DEFAULT_THRESHOLD

        if model_id in self.engine.model_ids:
            flags = self.decision.votes[:, self.engine.model_ids.index(model_id)]
        elif model_id in self.repo:
            threshold = float(self.repo.get(model_id).get("threshold") or DEFAULT_THRESHOLD)
            flags = score_forest(self.repo.load_forest(model_id), self.X) > threshold
        else:
            raise RuntimeError("the champion %s is not in the model repository: its flags are unknown" % model_id)
        return flags & ~self.decision.pool_anomaly

    def disagreeing_member(self, champion: str) -> str | None:
        """The pool member other than the champion with the most false positives on the channel (None if none)."""
        counts = {m: int(self.false_positives(m).sum()) for m in self.engine.model_ids if m != champion}
        best = max(counts, key=counts.get)
        return best if counts[best] else None


def force_episode(kb, votes: ChannelVotes, champion: str, n: int) -> int:
    """Commit n false positives of the champion as the link service commits the device's uploads; the last id."""
    from tinyml_dagster.knowledge_base import Upload

    rows = votes.X[votes.false_positives(champion)]
    if not len(rows):
        raise RuntimeError("no window of the channel is a false positive of %s" % champion)
    now = time.time()
    uploads = [Upload(DEVICE, FORCED_SEQ_BASE + int(now) * 100 + i, "anomaly",
                      features=tuple(map(float, rows[i % len(rows)])), champion_id=champion, champion_decision=1,
                      sent_at=now, feature_set=votes.engine.feature_set) for i in range(n)]
    return kb.ingest(uploads).upload_ids[-1]


def operator_deploy(kb, instance, stack: subprocess.Popen, model_id: str) -> None:
    """The operator's deploy of model_id to the device (deploy_champion_job, confirmed by its config)."""
    from tinyml_dagster.defs.deploy.jobs import deploy_champion_job
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.resources import gateway_resources

    res = deploy_champion_job.execute_in_process(
        run_config={"ops": {"deploy_champion": {"config": {"model_id": model_id, "device_id": DEVICE}}}},
        resources=gateway_resources(GatewayResource()), instance=instance, raise_on_error=False)
    if not res.success:
        raise RuntimeError("the operator's deploy of %s failed: %s" % (model_id, [
            e.message for e in res.all_events if e.is_failure]))
    wait(lambda: kb.current_champion(DEVICE).model_id == model_id, 60, "%s as the champion" % model_id, stack)


def measure_replacement(kb, instance, stack: subprocess.Popen, n_fp: int, fig: dict) -> None:
    """Force a false-positive episode on the device's champion and time its replacement (figures into fig)."""
    import dagster as dg

    votes = ChannelVotes()
    champion = kb.current_champion(DEVICE)
    if not votes.false_positives(champion.model_id).any():
        # the champion never disagrees with its pool on the channel, so it has no false positive to force: the
        # operator first deploys the pool member that disagrees most, and the episode is forced on that one
        member = votes.disagreeing_member(champion.model_id)
        if member is None:
            raise RuntimeError("no model of the pool calls any window of the channel anomalous against the pool")
        fig["operator_deployed_first"] = {"replacing": champion.model_id, "deployed": member}
        operator_deploy(kb, instance, stack, member)
        champion = kb.current_champion(DEVICE)
    earlier = kb.deploy_for_episode(DEVICE, champion.episode_id)
    if earlier and earlier["status"] == "failed" and earlier["attempts"] >= MAX_ATTEMPTS:
        raise RuntimeError("episode %d of %s already gave up after %d failed deploys: %s" % (
            champion.episode_id, champion.model_id, earlier["attempts"], earlier["error"]))
    t_forced = time.time()
    last_id = force_episode(kb, votes, champion.model_id, n_fp + HYSTERESIS_POINTS // 2 + 1)
    t_due = wait(lambda: kb.decision_time(last_id), 60, "the pool's decision on the forced windows", stack,
                 poll=0.2)

    def replaced():
        d = kb.deploy_for_episode(DEVICE, champion.episode_id)
        if not d or d["requested_at"] < t_forced:
            return None
        return d if d["status"] == "done" or (d["status"] == "failed" and d["attempts"] >= MAX_ATTEMPTS) else None

    deploy = wait(replaced, 600, "the replacement's deploy", stack, poll=0.5)
    runs = instance.get_run_records(dg.RunsFilter(job_name="replace_champion_job"), limit=1)
    run = runs[0] if runs else None
    fig.update(replaced=champion.model_id, replacement_status=deploy["status"], new_champion=deploy["model_id"],
               replacement_error=deploy["error"],
               replacement_attempts=deploy["attempts"],
               replacement_seconds=round(deploy["finished_at"] - t_due, 1),
               deploy_link_seconds=round(deploy["figures"].get("link_seconds") or 0.0, 1),
               deploy_real_seconds=round(deploy["finished_at"] - deploy["started_at"], 1),
               package_bytes=deploy["figures"].get("package_bytes"),
               replacement_run_queued_seconds=round(run.start_time - run.create_timestamp.timestamp(), 1)
               if run and run.start_time else None)

    def fleet_shows_it():  # the fleet view shows the new champion
        ev = instance.get_latest_materialization_event(dg.AssetKey("fleet"))
        md = ev.asset_materialization.metadata["table"].value if ev else ""
        return md if "| %s | %s |" % (DEVICE, deploy["model_id"]) in md else None

    try:
        fig["fleet_table"] = wait(fleet_shows_it, 60, "the fleet view", stack)
    except RuntimeError as e:
        fig["fleet_table"] = "not shown: %s" % e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=300.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directory and DAGSTER_HOME")
    args = ap.parse_args(argv)
    out_path = settings.bench_dir() / "dev_stack.json"
    tmp = Path(tempfile.mkdtemp(prefix="dev_stack-"))
    home, data = tmp / "dagster_home", tmp / "data"
    os.environ.update(DAGSTER_HOME=str(home), TINYML_DATA_DIR=str(data))
    for name in ("TINYML_KB_PATH", "TINYML_IMS_DIR", "TINYML_DEVICE_KEYS"):
        os.environ.pop(name, None)
    from tinyml_dagster.demo import BEARING, RATE_HZ

    os.environ[settings.COHORT_ENV] = "bearing=%d,rate_hz=%d" % (BEARING, RATE_HZ)  # as make dev sets it
    n_fp = settings.n_fp()
    port = free_port()
    log = open(tmp / "stack.log", "wb")
    t_start = time.time()
    stack = subprocess.Popen([sys.executable, "-m", "tinyml_dagster.dev", "--port", str(port)], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    meter = CpuMeter(stack.pid)
    fig: dict = {"device": DEVICE, "n_fp": n_fp, "idle_seconds": args.idle_seconds, "log": str(tmp / "stack.log")}
    queued_max = [0]
    stop_sampling = threading.Event()
    try:
        import dagster as dg

        from tinyml_dagster.knowledge_base import KnowledgeBase

        def up() -> bool:
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/server_info" % port, timeout=2)
                return True
            except OSError:
                return False

        wait(up, 900, "the Dagster webserver", stack)
        fig["startup_seconds"] = round(time.time() - t_start, 1)
        kb = KnowledgeBase(settings.kb_path())
        wait(lambda: kb.current_champion(DEVICE), 600, "the device's own champion", stack)
        instance = dg.DagsterInstance.get()
        wait(lambda: instance.get_latest_materialization_event(dg.AssetKey("pool_decisions")), 300,
             "the first pool_decisions report", stack)
        busy = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]
        wait(lambda: instance.get_runs_count(dg.RunsFilter(statuses=busy)) == 0, 300, "the start-up runs", stack)

        def sample_queue() -> None:
            while not stop_sampling.is_set():
                meter.sample()
                queued = instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
                queued_max[0] = max(queued_max[0], queued)
                stop_sampling.wait(2.0)

        sampler = threading.Thread(target=sample_queue, daemon=True)
        runs_before = instance.get_runs_count()
        uploads_before = kb.max_upload_id()
        t0, before = time.time(), meter.sample()
        sampler.start()
        while time.time() - t0 < args.idle_seconds:
            if stack.poll() is not None:
                raise RuntimeError("the make-dev stack exited during the idle period")
            time.sleep(1.0)
        after, elapsed = meter.sample(), time.time() - t0
        per = {k: round(v / elapsed, 3) for k, v in sorted(CpuMeter.between(before, after).items()) if v > 0}
        queued_now = instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        fig.update(cpu_cores_idle=round(sum(per.values()), 3), cpu_cores_idle_per_process=per,
                   runs_launched_idle=instance.get_runs_count() - runs_before, max_queued_runs_idle=queued_max[0],
                   queued_runs_end_of_idle=queued_now, uploads_idle=kb.max_upload_id() - uploads_before,
                   idle_measured_seconds=round(elapsed, 1))

        # the forced episode: N_fp false positives against the device's champion (enough to clear the hysteresis)
        try:
            measure_replacement(kb, instance, stack, n_fp, fig)
        except RuntimeError as e:  # the idle figures stand; say why the replacement was not measured
            fig.update(replacement_status="not measured: %s" % e, replacement_seconds=None)
        fig["max_queued_runs"] = queued_max[0]
    finally:
        stop_sampling.set()
        pids = [p for p in meter.sample()]
        t_stop = time.time()
        if stack.poll() is None:
            stack.send_signal(signal.SIGINT)
            try:
                stack.wait(timeout=120)
            except subprocess.TimeoutExpired:
                stack.kill()
        fig["shutdown_seconds"] = round(time.time() - t_stop, 1)
        left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        fig["processes_left_after_sigint"] = len(left)
        for pid in left:  # ours: the stack's children that outlived it
            os.kill(pid, signal.SIGKILL)
        log.close()
    replacement, link = fig.get("replacement_seconds"), fig.get("deploy_link_seconds") or 0.0
    fig["targets"] = {
        "cpu_cores_idle <= 0.3": fig.get("cpu_cores_idle", 99) <= 0.3,
        "no queue growth": fig.get("queued_runs_end_of_idle", 1) == 0,
        "replacement <= link time + 30 s": replacement is not None and fig.get("replacement_status") == "done"
        and replacement <= link + 30,
    }
    atomic_write(out_path, json.dumps(fig, indent=2).encode())
    if "cpu_cores_idle" in fig:
        print("make-dev stack, %.0f s idle with %s streaming: %.3f cores (target <= 0.3), %d runs launched, "
              "at most %d queued" % (fig["idle_measured_seconds"], DEVICE, fig["cpu_cores_idle"],
                                     fig["runs_launched_idle"], fig["max_queued_runs_idle"]))
        print("  per process (cores): " + ", ".join("%s %.3f" % kv
                                                    for kv in fig["cpu_cores_idle_per_process"].items()))
    if replacement is not None:
        print("forced episode: %s -> %s %s, replacement %.1f s from the pool's decision (deploy: %.1f s of link "
              "time, %.1f s real; target replacement <= link time + 30 s)" % (
                  fig["replaced"], fig["new_champion"], fig["replacement_status"], replacement, link,
                  fig["deploy_real_seconds"]))
    else:
        print("forced episode: %s" % fig.get("replacement_status"))
    print("wrote", out_path)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
