"""Deploy time and channel occupation per forest size and encoding, at 2,400 baud 8N1, 100 ms turnaround.

The gateway's real pySerialTransfer talks over a pty to the real firmware (CPython host) through the simulated
half-duplex line, whose wire time is honoured at a time scale (link seconds = real seconds / scale); then the
50-tree compact deploy again, in real time, on the device emulator with the firmware in the MicroPython VM.
Writes data/bench/deploy.json.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware import isoforest  # noqa: E402
from tinyml_dagster import deployment_agent as da  # noqa: E402
from tinyml_dagster import settings  # noqa: E402
from tinyml_dagster.link import Deployer, LinkTiming, SerialTransport  # noqa: E402
from tinyml_dagster.link.sim import DeviceHost, SimulatedLink, provision_flash  # noqa: E402

PAPER_SECONDS = {10: 759, 50: 5147}  # bearing 2, JSON, from the paper's Fig. 4b
PAPER_OCCUPATION = (0.6, 0.7)
SIZES = (10, 20, 30, 40, 50)
SCALE = {"compact": 0.1, "json": 0.04}  # real seconds per link second
KEY = bytes(range(32))


def training_rows(n: int = 2000, seed: int = 2):
    """Feature-like rows (mean, skewness, kurtosis) with a bearing's spread."""
    rng = random.Random(seed)
    return [[rng.gauss(0.0, 0.02), rng.gauss(0.0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(n)]


def deploy_once(pkg: da.Package, timing: LinkTiming, previous: da.Package | None = None) -> dict:
    """Deploy pkg to a fresh device (or to one that already runs `previous`, which is not timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        provision_flash(tmp, "bench-0", KEY, timing)
        with SimulatedLink(timing) as link:
            device = DeviceHost(tmp, link.device_uart).start()
            transport = SerialTransport(link.gateway_port, timing)
            try:
                if previous is not None and not Deployer(transport).deploy(previous).installed:
                    raise RuntimeError("bench: the previous champion was not installed")
                rep = Deployer(transport).deploy(pkg)
            finally:
                transport.close()
                device.stop()
    if not rep.installed:
        raise RuntimeError(f"bench deploy refused: {rep.reason}")
    return {"deploy_seconds": round(rep.link_seconds, 2), "occupation": round(rep.occupation, 4),
            "package_bytes": rep.package_bytes, "wire_bytes": rep.wire_bytes, "frames": rep.data_frames,
            "windows": rep.windows, "payload_wire_seconds": round(rep.package_bytes / 240, 2),
            "all_wire_seconds": round(rep.wire_bytes / 240, 2), "time_scale": timing.time_scale}


def emulator_check(n_trees: int, rows) -> dict:
    """The same deploy on the device emulator (firmware in the MicroPython VM, its own half-duplex wire), real time."""
    from tinyml_dagster import ims
    from tinyml_dagster.emulator import DeviceEmulator

    files = ims.list_ims_files(settings.ims_dir()) if settings.ims_dir().is_dir() else []
    if not files:
        files = sorted((Path(__file__).resolve().parent.parent / "assets_tests" / "fixtures" / "ims" / "1st_test").iterdir())
    forest = isoforest.train(rows, n_trees, 100, 7)
    pkg = da.build_package(f"bench_t{n_trees}", ("model.bin", forest.to_bytes()), {"threshold": 0.6, "grid": forest.grid},
                           device_id="bench-0", version=1, key=KEY)
    with tempfile.TemporaryDirectory() as tmp:
        flash = Path(tmp) / "bench-0" / "flash"
        (flash / "deploy").mkdir(parents=True)
        (flash / "deploy" / "key").write_bytes(KEY)
        emu = DeviceEmulator("bench-0", flash_dir=flash, ims_files=files[:1], runtime="vm", baud=2400,
                             turnaround_ms=100, time_scale=1.0, config={"n_train": 100000}).start()
        try:
            out = flash.parent / "vm.stdout"
            deadline = time.monotonic() + 120
            while not (out.exists() and "BOOTED" in out.read_text()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"emulator did not boot: {emu.errors}")
                time.sleep(0.1)
            transport = SerialTransport(emu.port_path, LinkTiming())
            try:
                rep = Deployer(transport, install_s=120).deploy(pkg)
            finally:
                transport.close()
        finally:
            emu.stop()
    if not rep.installed:
        raise RuntimeError(f"emulator deploy refused: {rep.reason}")
    return {"runtime": "MicroPython VM", "time_scale": 1.0, "deploy_seconds": round(rep.link_seconds, 2),
            "occupation": round(rep.occupation, 4), "package_bytes": rep.package_bytes, "wire_bytes": rep.wire_bytes,
            "device_install_seconds": rep.device_seconds}


def main() -> None:
    rows = training_rows()
    results: dict = {"baud": 2400, "turnaround_s": 0.1, "psi": 100, "encodings": {}}
    print(f"{'trees':>5} {'encoding':>8} {'bytes':>8} {'deploy s':>9} {'occupation':>10} {'replace s':>9} "
          f"{'paper s':>8}")
    for encoding in ("compact", "json"):
        timing = LinkTiming(time_scale=SCALE[encoding])
        per = results["encodings"].setdefault(encoding, {})
        for n in SIZES:
            forest = isoforest.train(rows, n, 100, 7)
            model = ("model.bin", forest.to_bytes()) if encoding == "compact" else (
                "model.json", json.dumps(isoforest.to_json(forest)).encode())
            pkg = da.build_package(f"bench_t{n}", model, {"threshold": 0.6, "grid": forest.grid},
                                   device_id="bench-0", version=1, key=KEY, encoding=encoding)
            t0 = time.monotonic()
            r = deploy_once(pkg, timing)
            r["real_seconds"] = round(time.monotonic() - t0, 2)
            if encoding == "compact":
                # the usual case: replacing a champion, so features.py and __init__.py are already on the device
                prev_forest = isoforest.train(rows, 10, 100, 99)
                prev = da.build_package("previous", ("model.bin", prev_forest.to_bytes()),
                                        {"threshold": 0.6, "grid": prev_forest.grid}, device_id="bench-0",
                                        version=1, key=KEY, encoding=encoding)
                pkg2 = da.build_package(f"bench_t{n}", model, {"threshold": 0.6, "grid": forest.grid},
                                        device_id="bench-0", version=2, key=KEY, encoding=encoding)
                rr = deploy_once(pkg2, timing, previous=prev)
                r["replace_deploy_seconds"] = rr["deploy_seconds"]
                r["replace_occupation"] = rr["occupation"]
            per[str(n)] = r
            paper = PAPER_SECONDS.get(n, "")
            replace = f"{r['replace_deploy_seconds']:>9.1f}" if "replace_deploy_seconds" in r else f"{'':>9}"
            print(f"{n:>5} {encoding:>8} {r['package_bytes']:>8} {r['deploy_seconds']:>9.1f} "
                  f"{r['occupation']:>10.3f} {replace} {paper:>8}")
    c50 = results["encodings"]["compact"]["50"]
    results["paper"] = {"deploy_seconds": PAPER_SECONDS, "occupation": PAPER_OCCUPATION}
    results["targets"] = {"compact_50_deploy_seconds_max": 45, "occupation_min": 0.9,
                          "met": c50["deploy_seconds"] <= 45 and c50["occupation"] >= 0.9}
    results["speedup_vs_paper_50"] = round(PAPER_SECONDS[50] / c50["deploy_seconds"], 1)
    if "--no-emulator" not in sys.argv:
        emu = emulator_check(50, rows)
        results["emulator_vm_50_compact"] = emu
        print(f"cross-check, 50 trees compact on the device emulator (firmware in the MicroPython VM, real time): "
              f"{emu['deploy_seconds']} s, occupation {emu['occupation']}, device install {emu['device_install_seconds']} s")
    print(f"50 trees compact: {c50['deploy_seconds']} s (target <= 45), occupation {c50['occupation']} "
          f"(target >= 0.9); paper 5147 s at 0.6-0.7: {results['speedup_vs_paper_50']}x faster")
    out = settings.bench_dir() / "deploy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
