"""Forest: train the 20 candidates, then score every window of full-scale set 1 with the pool scorer and sklearn.

Windows: 500-ms feature windows at 500 Hz of the full-scale synthetic set 1 (2,156 files x 4 bearings x 2 axes x
2 windows = 34,496), from the recording benchmarks/pipeline.py generates under data/generated/ims_full/ (generated
here if missing), cached as Parquet under data/bench/forest_features/. Measured in the same run:
- training the 20 candidates (4 bearings x 10..50 trees, psi 100) with the firmware's pure-Python forest;
- the pool scorer (tinyml_dagster/forest.py) scoring every window with all 20 models at once;
- scikit-learn's IsolationForest with the same trees count and psi per model: fit, and score_samples of every window;
- the firmware's pure-Python scorer on a sample, and the compact vs JSON model sizes;
- training a 50-tree psi=100 forest on 300 windows inside the real MicroPython VM (fuel = wasm instructions), as the
  device's Local Training Engine does; scoring 200 windows there with it and with the same trees as a
  LibIsolationForest-style forest (nested dicts from JSON, feature looked up by name, {} leaves), and its heap.
Writes data/bench/forest.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware import isoforest  # noqa: E402
from tinyml_dagster import features, ims, settings, subsampling, synthetic  # noqa: E402
from tinyml_dagster.forest import PoolScorer  # noqa: E402
from tinyml_dagster.storage import atomic_write  # noqa: E402
from tinyml_dagster.training import PSI, THRESHOLD, TREE_COUNTS, feature_matrix, model_seed, train_forest  # noqa: E402

RATE_HZ = 500
N_FILES = int(os.environ.get("TINYML_BENCH_FILES", str(synthetic.FULL_FILES)))
REPEATS = 3
PY_SAMPLE = 2000


def feature_windows_full(n_files: int) -> pd.DataFrame:
    """Feature windows at 500 Hz of every file of the (full-scale) synthetic recording, cached."""
    cache = settings.bench_dir() / "forest_features" / f"files={n_files}"
    paths = [cache / f"bearing={b}.parquet" for b in settings.BEARINGS]
    if not all(p.exists() for p in paths):
        rec_dir = settings.data_dir() / "generated" / ("ims_full" if n_files == synthetic.FULL_FILES else
                                                        f"ims_{n_files}") / "1st_test"
        t0 = time.perf_counter()
        files = synthetic.generate_recording(rec_dir, n_files)
        print(f"recording: {len(files)} files in {rec_dir} ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        signals = subsampling.subsample_files(files, (RATE_HZ,))[RATE_HZ]
        stamps = ims.file_timestamps(files)
        for b, p in zip(settings.BEARINGS, paths):
            features.write_feature_windows(features.feature_windows_frame(signals, stamps, RATE_HZ, b), p)
        print(f"feature windows at {RATE_HZ} Hz: {time.perf_counter() - t0:.1f} s -> {cache}")
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def best_of(fn, repeats: int = REPEATS) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


VM_TRAIN = """
from firmware import isoforest
import json
f = open('/flash/rows.json', 'rb'); rows = json.loads(f.read()); f.close()
%s
"""


def vm_training(rows: list) -> dict:
    """Fuel and wall time of train(rows, 50, 100) in the MicroPython VM, net of loading the rows; same bytes?"""
    import tempfile

    from tinyml_dagster.micropython_vm import MicroPythonVM

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "rows.json").write_text(json.dumps(rows))
        # the WASI build's GC must not run inside nested calls: a heap that training never fills
        vm = MicroPythonVM(heap_bytes=8 * 1024 * 1024, memory_bytes=32 * 1024 * 1024, flash_dir=Path(tmp))
        base = vm.run(code=VM_TRAIN % "pass").check()
        run = vm.run(code=VM_TRAIN % "import ubinascii\nF = isoforest.train(rows, 50, 100, 7)\n"
                                     "print(ubinascii.hexlify(F.to_bytes()).decode())").check()
    same = bytes.fromhex(run.stdout.strip()) == isoforest.train(rows, 50, 100, 7).to_bytes()
    return {"rows": len(rows), "fuel": run.fuel_used - base.fuel_used, "wall_s": round(run.wall_s - base.wall_s, 3),
            "same_bytes_as_cpython": same}


VM_SCORE_SETUP = """
import json, gc
from firmware import isoforest
f = open('/flash/x.json', 'rb'); X = json.loads(f.read()); f.close()
f = open('/flash/g.json', 'rb'); GRID = json.loads(f.read()); f.close()
f = open('/flash/lib.json', 'rb'); LIB = json.loads(f.read()); f.close()
f = open('/flash/forest.bin', 'rb'); BUF = f.read(); f.close()
f = None
gc.collect()
a0 = gc.mem_alloc()
F = isoforest.load(BUF, GRID)
gc.collect()
print(gc.mem_alloc() - a0)
SAMPLES = [[{"mean": x[0]}, {"skewness": x[1]}, {"kurtosis": x[2]}] for x in X]
def lib_tree(sample, node):
    # LibIsolationForest-style: the node's feature is looked up by name in the sample's list of features
    depth = 0.0
    while node:
        found = False
        for feature in sample:
            if list(feature)[0] == node["Feature Name"]:
                value = list(feature.values())[0]
                node = node["Left"] if value < node["Split Value"] else node["Right"]
                depth = depth + 1
                found = True
                break
        if not found:
            break
    return depth
def lib_score(sample):
    h = 0.0
    for tree in LIB:
        h = h + lib_tree(sample, tree)
    return h / len(LIB)
"""


def _lib_json(node: dict, grid: list, names: tuple) -> dict:
    """A tree of ours as LibIsolationForest dumps trees: Feature Name, Split Value (raw units), Left, Right;
    {} leaves."""
    if "leaf" in node:
        return {}
    e, base = grid[node["feature"]]
    return {"Feature Name": names[node["feature"]], "Split Value": (node["threshold"] + base - 0.5) / 2.0 ** e,
            "Left": _lib_json(node["left"], grid, names), "Right": _lib_json(node["right"], grid, names)}


def vm_inference(forest: isoforest.Forest, X: list) -> dict:
    """Fuel per window in the MicroPython VM: our forest vs the same trees as a LibIsolationForest-style dict forest."""
    import tempfile

    from tinyml_dagster.micropython_vm import MicroPythonVM

    names = tuple(features.FEATURE_NAMES)
    lib = [_lib_json(t, forest.grid, names) for t in isoforest.to_json(forest)["trees"]]
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (
            ("x.json", json.dumps(X)), ("g.json", json.dumps(forest.grid)), ("lib.json", json.dumps(lib))
        ):
            Path(tmp, name).write_text(text)
        Path(tmp, "forest.bin").write_bytes(forest.to_bytes())
        vm = MicroPythonVM(heap_bytes=8 * 1024 * 1024, memory_bytes=32 * 1024 * 1024, flash_dir=Path(tmp))
        base = vm.run(code=VM_SCORE_SETUP).check()
        ours = vm.run(code=VM_SCORE_SETUP + "for x in X:\n    F.score(x)\n").check()
        libs = vm.run(code=VM_SCORE_SETUP + "for s in SAMPLES:\n    lib_score(s)\n").check()
    per_ours = (ours.fuel_used - base.fuel_used) / len(X)
    per_lib = (libs.fuel_used - base.fuel_used) / len(X)
    return {"windows": len(X), "n_trees": forest.n_trees, "heap_bytes_loaded_forest": int(base.stdout.split()[0]),
            "fuel_per_window_ours": round(per_ours), "fuel_per_window_libisolationforest_style": round(per_lib),
            "fewer_instructions_x": round(per_lib / per_ours, 2)}


def main() -> None:
    from sklearn.ensemble import IsolationForest

    windows = feature_windows_full(N_FILES)
    X_all = feature_matrix(windows)
    n = len(X_all)
    print(f"windows: {n} ({N_FILES} files, {RATE_HZ} Hz, 4 bearings x 2 axes)")

    # 1. train the 20 candidates with the firmware's pure-Python forest
    specs, forests, train_sets = [], [], []
    t0 = time.perf_counter()
    for b in settings.BEARINGS:
        X_train = feature_matrix(windows[(windows.bearing == b) & (windows.split == "train")])
        for n_trees in TREE_COUNTS:
            forests.append(train_forest(X_train, n_trees, PSI, model_seed(0, b, n_trees)))
            specs.append((b, n_trees))
            train_sets.append(X_train)
    train_seconds = time.perf_counter() - t0
    print(f"train 20 candidates (pure Python): {train_seconds:.2f} s")

    # 2. the pool scorer (all 20 models at once) and 3. scikit-learn (same trees count, psi and training windows
    # per model), in alternating rounds so that the shared machine's load hits both alike; best round of each
    pool_setup, pool = best_of(lambda: PoolScorer(forests), 1)
    sks, fit_s = [], 0.0
    for (_b, n_trees), X_train in zip(specs, train_sets):
        t0 = time.perf_counter()
        sks.append(
            IsolationForest(n_estimators=n_trees, max_samples=min(PSI, len(X_train)), random_state=0).fit(X_train)
        )
        fit_s += time.perf_counter() - t0
    pool_seconds = score_s = float("inf")
    for _ in range(REPEATS):
        t, scores = best_of(lambda: pool.scores(X_all), 1)
        pool_seconds = min(pool_seconds, t)
        t0 = time.perf_counter()
        sk_scores = [-sk.score_samples(X_all) for sk in sks]  # sklearn's score_samples is minus the paper's score
        score_s = min(score_s, time.perf_counter() - t0)
    pool_rate = n * len(forests) / pool_seconds
    print(f"pool scorer ({pool.method}, setup {pool_setup:.2f} s): {n} windows x {len(forests)} models in "
          f"{pool_seconds:.3f} s = {pool_rate:,.0f} model-windows/s ({n / pool_seconds:,.0f} windows/s through all 20)")
    sk_rate = n * len(forests) / score_s
    sk_fit_score_rate = n * len(forests) / (fit_s + score_s)
    print(f"sklearn: fit {fit_s:.3f} s, score_samples {score_s:.3f} s = {sk_rate:,.0f} model-windows/s "
          f"({sk_fit_score_rate:,.0f} with fit)")
    from scipy.stats import spearmanr

    rho = [float(spearmanr(scores[:, i], sk_scores[i]).statistic) for i in range(len(forests))]

    # 4. the firmware's pure-Python scorer (what the device runs), on a sample
    sample = X_all[:: max(1, n // PY_SAMPLE)][:PY_SAMPLE].tolist()
    f50 = forests[TREE_COUNTS.index(50)]
    py_seconds, _ = best_of(lambda: [f50.score(x) for x in sample], 1)
    py_rate = len(sample) / py_seconds

    # 5. sizes: the compact form vs the nested-dict JSON form
    compact = [len(f.to_bytes()) for f in forests]
    js = [len(json.dumps(isoforest.to_json(f), separators=(",", ":"))) for f in forests]
    deflated = [len(zlib.compress(f.to_bytes(), 9)) for f in forests]

    # 6. the device's Local Training Engine: the same training inside the MicroPython VM
    vm = vm_training([[round(v, 6) for v in row] for row in X_all[:300].tolist()])
    print(f"MicroPython VM: train 50 trees psi 100 on {vm['rows']} windows: {vm['fuel']:,} fuel, "
          f"{vm['wall_s']} s wall, same bytes as CPython: {vm['same_bytes_as_cpython']}")

    inf = vm_inference(f50, [[round(v, 6) for v in row] for row in X_all[:: max(1, n // 200)][:200].tolist()])
    print(f"MicroPython VM, 50 trees: {inf['fuel_per_window_ours']:,} fuel per window vs "
          f"{inf['fuel_per_window_libisolationforest_style']:,} for the same trees as a LibIsolationForest-style "
          f"dict forest ({inf['fewer_instructions_x']}x fewer); "
          f"loaded forest {inf['heap_bytes_loaded_forest']} B of heap")

    speedup = pool_rate / sk_rate
    print(f"pool vs sklearn per model: {speedup:.2f}x ({'meets' if speedup >= 1 else 'MISSES'} the target >= 1x)")
    print(f"firmware pure-Python scorer, 50 trees: {py_rate:,.0f} windows/s")
    print(f"50-tree model: compact {compact[4]} B (deflated {deflated[4]} B), JSON {js[4]} B")
    print(f"Spearman(pool, sklearn) per model: min {min(rho):.3f}, median {np.median(rho):.3f}")
    out = {
        "windows": n,
        "files": N_FILES,
        "rate_hz": RATE_HZ,
        "models": len(forests),
        "train_seconds": round(train_seconds, 3),
        "pool_setup_seconds": round(pool_setup, 4),
        "pool_seconds": round(pool_seconds, 4),
        "pool_windows_per_s": round(pool_rate),
        "pool_windows_per_s_through_all_models": round(n / pool_seconds),
        "sklearn_fit_seconds": round(fit_s, 4),
        "sklearn_score_seconds": round(score_s, 4),
        "sklearn_windows_per_s": round(sk_rate),
        "sklearn_fit_and_score_windows_per_s": round(sk_fit_score_rate),
        "pool_vs_sklearn": round(speedup, 3),
        "target_met": bool(speedup >= 1.0),
        "firmware_python_windows_per_s_50_trees": round(py_rate),
        "compact_bytes": dict(zip([f"b{b}-t{t}" for b, t in specs], compact)),
        "json_bytes": dict(zip([f"b{b}-t{t}" for b, t in specs], js)),
        "deflated_bytes": dict(zip([f"b{b}-t{t}" for b, t in specs], deflated)),
        "anomaly_rate_all_windows": dict(zip([f"b{b}-t{t}" for b, t in specs],
                                             [round(float(v), 4) for v in (scores > THRESHOLD).mean(axis=0)])),
        "spearman_pool_vs_sklearn": [round(r, 4) for r in rho],
        "micropython_vm_training_50_trees": vm,
        "micropython_vm_inference_50_trees": inf,
        "pool_method": pool.method,
        "definition": "windows_per_s = windows x models / seconds (model-windows per second); pool and sklearn "
                      "scoring in 3 alternating rounds, best round of each",
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count()},
    }
    path = settings.bench_dir() / "forest.json"
    atomic_write(path, json.dumps(out, indent=1), mode=0o644)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
