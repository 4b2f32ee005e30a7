"""Deploy time and channel occupation per forest size and encoding, at 2,400 baud 8N1, 100 ms turnaround.

Every deploy runs on the device emulator (tinyml_dagster.emulator): the gateway's real pySerialTransfer on the
emulator's pty, whose half-duplex wire schedules every byte exactly (10 bits / baud, turnaround on each change
of direction). The sweep runs the firmware under CPython in the emulator with the wire sped up (time scale);
the 50-tree compact deploy runs again in real time with the firmware in the MicroPython VM, and so does the
50-tree champion precompiled by the gateway (encoding mpy: champion.mpy + features.mpy, nothing compiled on the
device). Link seconds are unscaled wire time; a sped-up point is the fastest of REPEAT tries (the emulated wire
is exact, so extra time is the loaded host's scheduling magnified by the speed-up; every try is in the JSON).
The device's verify + install time (from the last fragment on the wire to its result, less the turnaround and the
result's wire time) is reported apart: `transfer_seconds` excludes it, `deploy_seconds` includes it (in real
seconds of the device: the VM's, or the CPython host's for the sweep).
Writes data/bench/deploy.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinyml_dagster import settings  # noqa: E402
from tinyml_dagster.emulator.deploy_run import (  # noqa: E402
    BAUD, TURNAROUND_S, account, deploy_log, deploy_on_emulator, package, training_rows)
from tinyml_dagster.link import LinkTiming  # noqa: E402

PAPER_SECONDS = {10: 759, 50: 5147}  # bearing 2, JSON, from the paper's Fig. 4b
PAPER_OCCUPATION = (0.6, 0.7)
SIZES = (10, 20, 30, 40, 50)
SPEEDUP = {"compact": 10.0, "json": 25.0}  # the emulator's wire runs this many times faster than 2,400 baud
VM_RUNS = 3
MPY_DEPLOY_RATIO_MAX = 1.2  # the precompiled champion's deploy against the compact one's, both in the VM
REPEAT = {"compact": 2, "json": 1}  # deploys per sped-up point (the fastest is kept, all are written)


def figures(rep, timing: LinkTiming, device_real_per_link: float) -> dict:
    """The report's figures in link seconds, the device's install time counted in its own real seconds."""
    install_link = rep.device_seconds
    transfer = rep.link_seconds - install_link
    install = install_link * device_real_per_link
    payload = rep.payload_bytes * timing.byte_s
    deploy = transfer + install
    return {"deploy_seconds": round(deploy, 2), "occupation": round(payload / transfer, 4),
            "transfer_seconds": round(transfer, 2), "install_seconds": round(install, 3),
            "occupation_with_install": round(payload / deploy, 4), "package_bytes": rep.package_bytes,
            "stream_bytes": rep.stream_bytes, "wire_bytes": rep.wire_bytes, "frames": rep.data_frames,
            "windows": rep.windows, "retransmissions": rep.retransmissions, "timeouts": rep.timeouts,
            "payload_wire_seconds": round(payload, 2), "all_wire_seconds": round(rep.wire_bytes * timing.byte_s, 2)}


def vm_mpy_deploys(rows) -> dict:
    """The 50-tree champion precompiled (.mpy, encoding mpy) deployed to the firmware in the MicroPython VM in real
    time (a CPython device has no .mpy loader): VM_RUNS first deploys (the median kept) and one replacement."""
    timing = LinkTiming(BAUD, TURNAROUND_S, 1.0)
    runs = []
    for _ in range(VM_RUNS):
        t0 = time.monotonic()
        (rep,), stats = deploy_on_emulator([package(rows, 50, "mpy")], "vm", 1.0)
        runs.append({**figures(rep, timing, 1.0), "real_seconds": round(time.monotonic() - t0, 2),
                     "wire_turnarounds": stats["turnarounds"], "reason": rep.reason})
        r = runs[-1]
        print(f"50 trees mpy, firmware in the MicroPython VM, real time: deploy {r['deploy_seconds']} s = transfer "
              f"{r['transfer_seconds']} s + verify/install {r['install_seconds']} s ({r['package_bytes']} B)",
              flush=True)
    out = dict(sorted(runs, key=lambda r: r["deploy_seconds"])[len(runs) // 2])
    prev = package(rows, 10, "mpy", seed=99, name="previous")
    (_, rr), _ = deploy_on_emulator([prev, package(rows, 50, "mpy", version=2)], "vm", 1.0)
    rf = figures(rr, timing, 1.0)
    out.update({"runtime": "MicroPython VM", "time_scale": 1.0, "runs": runs,
                "replace_deploy_seconds": rf["deploy_seconds"], "replace_stream_bytes": rf["stream_bytes"]})
    return out


def main() -> None:
    rows = training_rows()
    results: dict = {"baud": BAUD, "turnaround_s": TURNAROUND_S, "psi": 100, "where": "device emulator",
                     "speedup": SPEEDUP, "encodings": {}}
    print(f"{'trees':>5} {'encoding':>8} {'bytes':>7} {'deploy s':>8} {'transfer s':>10} {'occupation':>10} "
          f"{'install s':>9} {'replace s':>9} {'paper s':>8}")
    for encoding in ("compact", "json"):
        f = SPEEDUP[encoding]
        timing = LinkTiming(BAUD, TURNAROUND_S, 1.0 / f)
        per = results["encodings"].setdefault(encoding, {})
        for n in SIZES:
            tries = []
            for _ in range(REPEAT[encoding]):
                t0 = time.monotonic()
                (rep,), stats = deploy_on_emulator([package(rows, n, encoding)], "cpython", f)
                tries.append({**figures(rep, timing, 1.0 / f), "runtime": "CPython", "time_scale": 1.0 / f,
                              "real_seconds": round(time.monotonic() - t0, 2),
                              "wire_turnarounds": stats["turnarounds"]})
            # the wire is exact, so a slower try only measured the host's scheduling (x speedup): keep the fastest
            r = min(tries, key=lambda t: t["deploy_seconds"])
            r["tries_deploy_seconds"] = [t["deploy_seconds"] for t in tries]
            if encoding == "compact":
                # the usual case: replacing a champion, so features.py and __init__.py are already on the device
                prev = package(rows, 10, encoding, seed=99, name="previous")
                (_, rr), _ = deploy_on_emulator([prev, package(rows, n, encoding, version=2)], "cpython", f)
                rf = figures(rr, timing, 1.0 / f)
                r["replace_deploy_seconds"], r["replace_occupation"] = rf["deploy_seconds"], rf["occupation"]
                r["replace_stream_bytes"] = rf["stream_bytes"]
            per[str(n)] = r
            paper = PAPER_SECONDS.get(n, "")
            replace = f"{r['replace_deploy_seconds']:>9.1f}" if "replace_deploy_seconds" in r else f"{'':>9}"
            print(f"{n:>5} {encoding:>8} {r['package_bytes']:>7} {r['deploy_seconds']:>8.1f} "
                  f"{r['transfer_seconds']:>10.1f} {r['occupation']:>10.3f} {r['install_seconds']:>9.3f} "
                  f"{replace} {paper:>8}", flush=True)
    c50 = results["encodings"]["compact"]["50"]
    results["paper"] = {"deploy_seconds": PAPER_SECONDS, "occupation": PAPER_OCCUPATION}
    results["speedup_vs_paper_50"] = round(PAPER_SECONDS[50] / c50["deploy_seconds"], 1)
    met = c50["deploy_seconds"] <= 45 and c50["occupation"] >= 0.9
    if "--no-vm" not in sys.argv:
        timing = LinkTiming(BAUD, TURNAROUND_S, 1.0)
        runs = []
        for _ in range(VM_RUNS):  # the VM's install time varies with the machine's load: several runs
            t0 = time.monotonic()
            (rep,), stats = deploy_on_emulator([package(rows, 50, "compact")], "vm", 1.0)
            runs.append({**figures(rep, timing, 1.0), "real_seconds": round(time.monotonic() - t0, 2),
                         "wire_turnarounds": stats["turnarounds"]})
            r = runs[-1]
            print(f"50 trees compact, firmware in the MicroPython VM, real time: deploy {r['deploy_seconds']} s = "
                  f"transfer {r['transfer_seconds']} s + verify/install {r['install_seconds']} s; occupation "
                  f"{r['occupation']} over the transfer, {r['occupation_with_install']} with the install", flush=True)
        vm = dict(sorted(runs, key=lambda r: r["deploy_seconds"])[len(runs) // 2])  # the median run
        vm.update({"runtime": "MicroPython VM", "time_scale": 1.0, "runs": runs,
                   "install_seconds_range": [min(r["install_seconds"] for r in runs),
                                             max(r["install_seconds"] for r in runs)]})
        results["emulator_vm_50_compact"] = vm
        met = met and vm["deploy_seconds"] <= 45 and vm["occupation"] >= 0.9
        results["emulator_vm_50_mpy"] = mpy = vm_mpy_deploys(rows)
        results["mpy_vs_compact_50"] = {
            "package_bytes": {"compact": vm["package_bytes"], "mpy": mpy["package_bytes"]},
            "deploy_seconds": {"compact": vm["deploy_seconds"], "mpy": mpy["deploy_seconds"]},
            "install_seconds": {"compact": vm["install_seconds"], "mpy": mpy["install_seconds"]},
            "deploy_ratio": round(mpy["deploy_seconds"] / vm["deploy_seconds"], 3),
            "replace_deploy_seconds_mpy": mpy["replace_deploy_seconds"]}
        ratio = results["mpy_vs_compact_50"]["deploy_ratio"]
        met = met and ratio <= MPY_DEPLOY_RATIO_MAX
        print(f"50 trees: mpy {mpy['package_bytes']} B in {mpy['deploy_seconds']} s vs compact "
              f"{vm['package_bytes']} B in {vm['deploy_seconds']} s (x{ratio}, target <= {MPY_DEPLOY_RATIO_MAX} "
              f"for the wire + the VM's install); replace (delta) {mpy['replace_deploy_seconds']} s")
    t0 = time.perf_counter()
    (rep,), _, log = deploy_on_emulator([package(rows, 50, "compact")], "cpython", SPEEDUP["compact"], with_log=True)
    acc = account(deploy_log(log, t0), TURNAROUND_S / SPEEDUP["compact"])
    results["wire_account_50_compact"] = {"span_s": round(acc.span_s, 4), "busy_s": round(acc.busy_s, 4),
                                          "turnaround_s": round(acc.turnaround_s, 4), "idle_s": round(acc.idle_s, 4),
                                          "idle_share": round(acc.idle_share, 4), "time_scale": 1 / SPEEDUP["compact"]}
    print(f"50 trees compact at x{SPEEDUP['compact']:g}: the wire idle (endpoints processing) "
          f"{acc.idle_s * 1000:.0f} ms "
          f"of {acc.span_s * 1000:.0f} ms = {acc.idle_share:.3f} (target < 0.1), bytes {acc.busy_s * 1000:.0f} ms, "
          f"turnarounds {acc.turnaround_s * 1000:.0f} ms")
    met = met and acc.idle_share < 0.1
    results["targets"] = {"compact_50_deploy_seconds_max": 45, "occupation_min": 0.9, "idle_share_max": 0.1,
                          "mpy_50_deploy_ratio_max": MPY_DEPLOY_RATIO_MAX, "met": met}
    print(f"50 trees compact: {c50['deploy_seconds']} s (target <= 45), occupation {c50['occupation']} "
          f"(target >= 0.9); paper 5147 s at 0.6-0.7: {results['speedup_vs_paper_50']}x faster; targets met: {met}")
    out = settings.bench_dir() / "deploy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
