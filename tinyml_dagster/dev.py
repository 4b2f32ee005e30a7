"""`make dev`: the gateway as a person runs it: emulated device, link service, Dagster webserver + daemon.

1. the demo's step 1 for its channel, if the repository has no candidates for it yet: the IMS recording (synthetic,
   or TINYML_IMS_DIR), the feature windows and candidate_models of bearing 3 at settings.DEFAULT_RATE_HZ, in the
   UI's instance, then the feature windows of the other bearings at that rate (candidate_models' default config
   trains them all); config/dagster.yaml (run queue limits) in DAGSTER_HOME; TINYML_COHORT set to the device's
   bearing and rate, so the pool is the 5 candidates of its cohort whatever else the repository holds;
2. the device emulator (`python -m tinyml_dagster.emulator`) fed bearing 3's x channel at that rate (the demo's
   channel), its link on a pseudo-terminal, deploy key provisioned;
3. the link service (`python -m tinyml_dagster.link_service`) with its pool, owning that port, writing the Knowledge
   Base and deciding every upload as it arrives;
4. `dg dev` (the project of pyproject.toml's [tool.dg]): webserver on http://127.0.0.1:3000 and the daemon running
   the sensors.

device_uploads_sensor reports the decisions, false_positive_sensor launches replace_champion_job at N_fp,
fleet_sensor keeps the fleet view. Ctrl-C (SIGINT) or SIGTERM stops everything, also when started in the background.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tinyml_dagster import settings
from tinyml_dagster.storage import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def ensure_pool_inputs(log=print) -> None:
    """The demo's step 1 for its channel (recording, features, candidates), unless the repository has its pool;
    then the feature windows of every bearing at that rate, which candidate_models' default config trains on."""
    import dagster as dg

    from tinyml_dagster import demo
    from tinyml_dagster.defs.data.assets import materialize_data
    from tinyml_dagster.model_repository import ModelRepository

    instance = dg.DagsterInstance.get()
    try:  # the link service's pool is the current candidate set: it must hold the channel's candidates
        ids = [m["model_id"] for m in demo.pool_candidates(settings.models_dir(), demo.RATE_HZ, demo.BEARING)]
        ready = set(ids) <= set(ModelRepository(settings.models_dir()).candidate_ids())
    except RuntimeError:
        ready = False
    if not ready:
        log("materialising the recording, features and candidate models of bearing %d at %d Hz"
            % (demo.BEARING, demo.RATE_HZ))
        demo.materialize_pool_inputs(demo.RATE_HZ, demo.BEARING, instance=instance)
    missing = [b for b in settings.BEARINGS if not settings.feature_path(demo.RATE_HZ, b).exists()]
    if missing:
        log("materialising the feature windows of bearings %s at %d Hz" % (missing, demo.RATE_HZ))
        for r in materialize_data(rates_hz=[demo.RATE_HZ], bearings=missing, instance=instance, with_recording=False):
            if not r.success:
                raise RuntimeError("materialising the feature windows failed")


def free_port() -> int:
    """A TCP port free on localhost now (for a webserver of a test or a benchmark)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_instance_config(home: Path) -> None:
    """The shipped dagster.yaml (run queue limits) in DAGSTER_HOME, replacing an older copy."""
    home.mkdir(parents=True, exist_ok=True)
    shipped = (ROOT / "config" / "dagster.yaml").read_bytes()
    target = home / "dagster.yaml"
    if not target.is_file() or target.read_bytes() != shipped:
        atomic_write(target, shipped)


def child_takes_sigint() -> None:
    """In the child: SIGINT stops it even when dev.py runs in the background (where the shell ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(pred, timeout: float, what: str, procs, stop: list) -> None:
    """Wait until pred() holds (or a stop signal came); a child that exits or the timeout is an error."""
    deadline = time.time() + timeout
    while not pred() and not stop:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError("%s exited (code %s) before %s" % (dead[0].args[:4], dead[0].returncode, what))
        if time.time() > deadline:
            raise RuntimeError("timed out waiting for %s" % what)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.dev", description=__doc__.split("\n")[0])
    ap.add_argument("--device-id", default="esp32-0")
    ap.add_argument("--speed", type=float, default=10.0, help="the emulated wire and data run this many times faster")
    ap.add_argument("--runtime", default="vm", choices=("vm", "cpython"), help="device firmware runtime")
    ap.add_argument("--port", type=int, default=3000, help="Dagster webserver port")
    ap.add_argument("--no-dagster", action="store_true", help="only the emulator and the link service")
    args = ap.parse_args(argv)

    from tinyml_dagster.demo import AXIS, BEARING, FEATURE_SET, RATE_HZ

    os.environ.setdefault("DAGSTER_HOME", str(ROOT / ".dagster_home"))
    # the children run in ROOT: same data, whatever the cwd
    os.environ[settings.DATA_DIR_ENV] = str(settings.data_dir())
    # the pool serves the emulated device's cohort (link service and Dagster read it from the environment)
    os.environ.setdefault(settings.COHORT_ENV, "bearing=%d,rate_hz=%d" % (BEARING, RATE_HZ))
    install_instance_config(Path(os.environ["DAGSTER_HOME"]))
    ensure_pool_inputs()
    run = settings.data_dir() / "run"
    run.mkdir(parents=True, exist_ok=True)
    link = run / ("%s.link" % args.device_id)
    link.unlink(missing_ok=True)
    ready = run / "link_service.ready"
    ready.unlink(missing_ok=True)

    from tinyml_dagster.deployment_agent import DeviceKeys

    flash = settings.device_flash_dir(args.device_id)
    DeviceKeys().provision(args.device_id, flash)
    procs: list[subprocess.Popen] = []
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored there)
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    py = sys.executable
    try:
        procs.append(subprocess.Popen([py, "-m", "tinyml_dagster.emulator", "--device-id", args.device_id,
                                       "--flash", str(flash), "--time-scale", str(args.speed), "--loop",
                                       "--runtime", args.runtime, "--link", str(link),
                                       "--bearing", str(BEARING), "--axis", AXIS, "--rate-hz", str(RATE_HZ),
                                       # the firmware paces its sends by its configured baud: the scaled line's
                                       "--set", "baud=%d" % int(settings.LINK_BAUD * args.speed),
                                       # the device's first champion extracts the pool's feature set
                                       "--set", "feature_set=%s" % FEATURE_SET],
                                      cwd=ROOT, preexec_fn=child_takes_sigint))
        wait_for(link.exists, 120, "the emulator's link port", procs, stop)
        if stop:
            return 0
        procs.append(subprocess.Popen([py, "-m", "tinyml_dagster.link_service",
                                       "--port", "%s=%s" % (args.device_id, os.path.realpath(link)),
                                       "--time-scale", str(1.0 / args.speed), "--ready-file", str(ready),
                                       # the emulated device answers on a shared host: as the demo, 2 s for it
                                       "--reply-slack", "2"],
                                      cwd=ROOT, preexec_fn=child_takes_sigint))
        wait_for(ready.exists, 60, "the link service", procs, stop)
        if stop:
            return 0
        print("device %s on %s, link service up (Knowledge Base %s)" % (args.device_id, os.path.realpath(link),
                                                                       settings.kb_path()), flush=True)
        if not args.no_dagster:
            # `dg dev` (Dagster's recommended command) loads the project from pyproject's [tool.dg], in this venv
            dg = Path(sys.executable).parent / "dg"
            procs.append(subprocess.Popen([str(dg), "dev", "--use-active-venv", "-p", str(args.port)], cwd=ROOT,
                                          env={**os.environ, "VIRTUAL_ENV": sys.prefix},
                                          preexec_fn=child_takes_sigint))
            print("Dagster UI on http://127.0.0.1:%d (Ctrl-C stops everything)" % args.port, flush=True)
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the shutdown short
        for p in reversed(procs):  # one at a time: the link service lets go of the port before the device goes
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is procs[-1] else signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print("%s did not stop in 60 s: killed" % " ".join(p.args[:3]), flush=True)
                p.kill()
                p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
