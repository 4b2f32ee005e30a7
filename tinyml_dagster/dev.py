"""`make dev`: the gateway as a person runs it: emulated device, link service, Dagster webserver + daemon.

1. the synthetic IMS recording, if there is none yet (the emulator feeds it to the device's data UART);
2. the device emulator (`python -m tinyml_dagster.emulator`), its link on a pseudo-terminal, deploy key provisioned;
3. the link service (`python -m tinyml_dagster.link_service`), owning that port and writing the Knowledge Base;
4. `dagster dev -w workspace.yaml`: webserver on http://127.0.0.1:3000 and the daemon running the sensors.

Materialise the assets in the UI (candidate_models gives the pool its candidates); device_uploads_sensor then
runs the pool over the uploads, and false_positive_sensor launches replace_champion_job at N_fp.
Ctrl-C stops everything.
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

ROOT = Path(__file__).resolve().parents[1]


def ensure_recording(log=print) -> None:
    """Materialise ims_recording when the configured IMS directory holds no files."""
    d = settings.ims_dir()
    if d.is_dir() and any(d.iterdir()):
        return
    import dagster as dg

    from tinyml_dagster.definitions import defs

    log("generating the synthetic IMS recording in %s" % d)
    job = defs().resolve_implicit_job_def_def_for_assets([dg.AssetKey("ims_recording")])
    r = job.execute_in_process(asset_selection=[dg.AssetKey("ims_recording")], instance=dg.DagsterInstance.get())
    if not r.success:
        raise RuntimeError("could not generate the IMS recording")


def wait_for(pred, timeout: float, what: str, procs) -> None:
    deadline = time.time() + timeout
    while not pred():
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

    os.environ.setdefault("DAGSTER_HOME", str(ROOT / ".dagster_home"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    ensure_recording()
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
    py = sys.executable
    try:
        procs.append(subprocess.Popen([py, "-m", "tinyml_dagster.emulator", "--device-id", args.device_id,
                                       "--flash", str(flash), "--time-scale", str(args.speed), "--loop",
                                       "--runtime", args.runtime, "--link", str(link),
                                       # the firmware paces its sends by its configured baud: the scaled line's
                                       "--set", "baud=%d" % int(2400 * args.speed)], cwd=ROOT))
        wait_for(link.exists, 120, "the emulator's link port", procs)
        procs.append(subprocess.Popen([py, "-m", "tinyml_dagster.link_service",
                                       "--port", "%s=%s" % (args.device_id, os.path.realpath(link)),
                                       "--time-scale", str(1.0 / args.speed), "--ready-file", str(ready)], cwd=ROOT))
        wait_for(ready.exists, 60, "the link service", procs)
        print("device %s on %s, link service up (Knowledge Base %s)" % (args.device_id, os.path.realpath(link),
                                                                       settings.kb_path()), flush=True)
        if not args.no_dagster:
            procs.append(subprocess.Popen([py, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"),
                                           "-p", str(args.port)], cwd=ROOT))
            print("Dagster UI on http://127.0.0.1:%d (Ctrl-C stops everything)" % args.port, flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is procs[-1] else signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
