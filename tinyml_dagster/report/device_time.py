"""Device time per inference and per model load, modelled from MicroPython VM instructions (fuel).

Fuel is measured in the real MicroPython 1.27 VM with the device benchmark's own work
(tinyml_dagster/device_workloads.py: the same setup, loaders and scorers, for our compact forest compiled on the
device, the same forest precompiled to .mpy by the gateway, and the paper-like nested-dict JSON forest) on the
repository's models (bearing 1 and 3, 10-50 trees, 500 Hz windows of the synthetic run):
- load fuel = run(setup + load + collect) - run(setup + collect) (a device collects after loading a model);
- a batch's inference fuel = run(setup + load + score the batch) - run(setup + load), on up to N windows the model
  calls normal (score <= threshold) and up to N it calls anomalous;
- per-window fuel: the VM gives one count per run, so each implementation's batches are fitted by least squares
  to fuel = a + c * trees + b * (internal nodes visited), the visits counted exactly in CPython; the per-window
  model gives the mean and spread per batch, its fit error is reported, and a few single windows are measured
  directly against it.
ONE calibration constant turns fuel into ESP32 milliseconds: the paper's 8.7 ms for a 10-tree bearing-1
inference, matched by the paper-like JSON forest's mean fuel on bearing 1's normal windows at 10 trees.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from firmware import isoforest
from tinyml_dagster.deployment_agent import MpyTarget, runtime_mpy
from tinyml_dagster import device_workloads as dw
from tinyml_dagster.forest import score_forest
from tinyml_dagster.training import PSI, THRESHOLD, TREE_COUNTS, feature_matrix, model_seed, train_forest

PAPER_INFERENCE_MS = {  # (mean, std) from the paper's text for Fig. 3a/3b
    1: {10: (8.7, 1.3), 50: (34.4, 5.0)},
    3: {10: (10.44, 2.57), 50: (38.88, 6.11)},
}
CALIBRATION = {"bearing": 1, "n_trees": 10, "impl": "baseline", "kind": "normal", "ms": 8.7}
# compact bytes compiled on the device (this project) / the same champion precompiled by the gateway (.mpy) /
# nested-dict JSON (LibIsolationForest-like, the paper)
IMPLS = ("ours", "mpy", "baseline")
MODEL_FILES = {"ours": "m%d.bin", "mpy": "m%d.mpy", "baseline": "m%d.json"}


def nodes_visited(forest: isoforest.Forest, X: np.ndarray) -> np.ndarray:
    """Internal nodes visited per window, summed over the trees (the firmware's own walk, counted)."""
    b = forest.buf
    q = [0] * forest.n_features
    out = np.zeros(len(X), dtype=np.int64)
    for i, x in enumerate(np.asarray(X, float).tolist()):
        isoforest.quantise(x, forest._sgrid, q)
        n = 0
        for p in forest.starts:
            while not b[p] & 128:
                o = b[p + 3]
                n += 1
                if q[b[p]] < (b[p + 1] | (b[p + 2] << 8)):
                    p += 4 if o else 6
                elif o:
                    p += o
                else:
                    p += b[p + 4] | (b[p + 5] << 8)
        out[i] = n
    return out


@dataclass
class DeviceTime:
    """Everything measured and modelled; figures per (impl, bearing, n_trees, kind)."""

    ms_per_fuel: float
    rows: pd.DataFrame  # impl, bearing, n_trees, kind, windows, fuel_mean, fuel_std, ms_mean, ms_std, batch_fuel
    load: pd.DataFrame  # impl, bearing, n_trees, load_fuel, load_ms, model_bytes
    fit: dict = field(default_factory=dict)  # per impl: a, b, c, max_rel_error; single-window checks
    rate_hz: int = 500


def measure(windows: pd.DataFrame, bearings: Sequence[int] = (1, 3), tree_counts: Sequence[int] = TREE_COUNTS,
            per_kind: int = 200, seed: int = 0, checks: int = 0, log=print) -> DeviceTime:
    """Measure fuel in the VM for every (impl, bearing, size, normal/anomalous batch); model per-window fuel."""
    records, loads, singles = [], [], []
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="tinyml-report-vm-") as tmp:
        for bearing in bearings:
            df = windows[windows.bearing == bearing]
            X_all = feature_matrix(df, f"bearing {bearing} windows")
            X_train = X_all[(df.split == "train").to_numpy()]
            for n in tree_counts:
                forest = train_forest(X_train, n, PSI, model_seed(seed, bearing, n))
                s = score_forest(forest, X_all)
                batches = {}
                for kind, mask in (("normal", s <= THRESHOLD), ("anomalous", s > THRESHOLD)):
                    idx = np.flatnonzero(mask)
                    if len(idx) > per_kind:
                        idx = np.sort(rng.choice(idx, per_kind, replace=False))
                    if len(idx):
                        batches[kind] = X_all[idx]
                for kind, X in batches.items():
                    flash = Path(tmp) / f"b{bearing}-t{n}-{kind}"
                    flash.mkdir()
                    (flash / "rows.json").write_text(json.dumps(X.tolist()))
                    (flash / "grid.json").write_text(json.dumps(forest.grid))
                    (flash / f"m{n}.bin").write_bytes(forest.to_bytes())
                    (flash / f"m{n}.json").write_text(json.dumps(isoforest.to_json(forest)))
                    (flash / f"m{n}.mpy").write_bytes(runtime_mpy(forest, MpyTarget()))
                    vm = dw.vm(flash)
                    base = dw.SETUP + dw.BASELINE_SCORER
                    setup = vm.run(code=base + dw.COLLECT).check().fuel_used
                    visits = nodes_visited(forest, X)
                    for impl, load_code, score_code in (("ours", dw.LOAD_OURS, dw.SCORE_OURS),
                                                        ("mpy", dw.LOAD_MPY, dw.SCORE_OURS),
                                                        ("baseline", dw.LOAD_BASELINE, dw.SCORE_BASELINE)):
                        load_src = base + load_code % {"n": n} + dw.COLLECT  # as a device: collect after load
                        loaded = vm.run(code=load_src).check().fuel_used
                        scored = vm.run(code=load_src + score_code).check().fuel_used
                        records.append({"impl": impl, "bearing": bearing, "n_trees": n, "kind": kind,
                                        "windows": len(X), "batch_fuel": scored - loaded,
                                        "visits": visits, "flash": str(flash)})
                        if kind == "normal":
                            model_bytes = (flash / (MODEL_FILES[impl] % n)).stat().st_size
                            loads.append({"impl": impl, "bearing": bearing, "n_trees": n,
                                          "load_fuel": loaded - setup, "model_bytes": model_bytes})
                        if checks and n in (min(tree_counts), max(tree_counts)) and bearing == bearings[0]:
                            for i in rng.choice(len(X), min(checks, len(X)), replace=False):
                                (flash / "one.json").write_text(json.dumps([X[i].tolist()]))
                                one_src = load_src.replace("/flash/rows.json", "/flash/one.json")
                                one = (vm.run(code=one_src + score_code).check().fuel_used
                                       - vm.run(code=one_src).check().fuel_used)
                                singles.append({"impl": impl, "n_trees": n, "visits": int(visits[i]), "fuel": one})
            log(f"device time: bearing {bearing} measured")
    fit = {}
    for impl in IMPLS:
        recs = [r for r in records if r["impl"] == impl]
        # batch fuel = N * a + N * T * c + sum(visits) * b
        A = np.array([[r["windows"], r["windows"] * r["n_trees"], r["visits"].sum()] for r in recs], float)
        y = np.array([r["batch_fuel"] for r in recs], float)
        (a, c, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        rel = np.abs(A @ np.array([a, c, b]) - y) / y
        checks_rel = [abs(a + c * s["n_trees"] + b * s["visits"] - s["fuel"]) / s["fuel"]
                      for s in singles if s["impl"] == impl]
        fit[impl] = {"a": float(a), "c_per_tree": float(c), "b_per_node": float(b),
                     "max_rel_error_batches": float(rel.max()),
                     "single_windows_checked": len(checks_rel),
                     "max_rel_error_single_windows": float(max(checks_rel)) if checks_rel else None}
        for r in recs:
            per = a + c * r["n_trees"] + b * r["visits"]
            r["fuel_mean"], r["fuel_std"] = float(per.mean()), float(per.std())
            r["fuel_mean_measured"] = r["batch_fuel"] / r["windows"]
    rows = pd.DataFrame([{k: v for k, v in r.items() if k not in ("visits", "flash")} for r in records])
    cal = rows[(rows.impl == CALIBRATION["impl"]) & (rows.bearing == CALIBRATION["bearing"])
               & (rows.n_trees == CALIBRATION["n_trees"]) & (rows.kind == CALIBRATION["kind"])]
    if cal.empty:
        cal = rows[(rows.impl == CALIBRATION["impl"]) & (rows.kind == CALIBRATION["kind"])].sort_values(
            ["bearing", "n_trees"]).head(1)
    ms_per_fuel = CALIBRATION["ms"] / float(cal.fuel_mean_measured.iloc[0])
    rows["ms_mean"] = rows.fuel_mean_measured * ms_per_fuel
    rows["ms_std"] = rows.fuel_std * ms_per_fuel
    load = pd.DataFrame(loads)
    load["load_ms"] = load.load_fuel * ms_per_fuel
    return DeviceTime(ms_per_fuel=ms_per_fuel, rows=rows, load=load, fit=fit)
