"""`make report`: the paper's figures reproduced in this system, and detection quality, in docs/results.md.

Runs (or reuses) the benchmarks' JSON under data/bench/, measures device time in the MicroPython VM
(report/device_time.py), evaluates detection quality (tinyml_dagster/detection_quality.py), reads the demo's
Knowledge Base for the champion-replacement loop, and writes docs/results.md with PNG plots in docs/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tinyml_dagster import detection_quality as dq
from tinyml_dagster import settings, synthetic
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.storage import atomic_write
from tinyml_dagster.micropython_vm import REPO_ROOT
from tinyml_dagster.report import device_time as dt

from tinyml_dagster.report import DOCS  # noqa: E402
PAPER_DEPLOY_S = {10: 759, 50: 5147}
PAPER_OCCUPATION = (0.6, 0.7)
BENCHMARKS = ("deploy", "device")  # what the report reads; the demo is run for the loop's figures


@dataclass(frozen=True)
class ReportConfig:
    """Scale of a report run; FULL is the committed one."""

    name: str = "full"
    quality: dq.QualityConfig = dq.QualityConfig()
    device_bearings: tuple[int, ...] = (1, 3)
    device_tree_counts: tuple[int, ...] = (10, 20, 30, 40, 50)
    device_per_kind: int = 200
    benchmarks: str = "run"  # run | reuse (run only the missing ones) | skip
    demo: str = "reuse"  # run | reuse | skip


FULL = ReportConfig()
QUICK = ReportConfig(name="quick", quality=dq.QualityConfig(n_files=240, tree_counts=(10, 30, 50)),
                     device_tree_counts=(10, 30, 50), device_per_kind=60)
SMALL = ReportConfig(name="small", quality=dq.QualityConfig(n_files=60, rates=(500, 2000), tree_counts=(10,),
                                                            bearings=(1, 3), sklearn=False),
                     device_bearings=(1,), device_tree_counts=(10,), device_per_kind=8,
                     benchmarks="skip", demo="skip")


# -- inputs -------------------------------------------------------------------------------------------------

def run_benchmarks(names: Sequence[str], mode: str, log=print) -> dict[str, dict]:
    """data/bench/<name>.json of each benchmark; mode run: run benchmarks/<name>.py, reuse: only if missing, never."""
    out = {}
    for name in names:
        path = settings.bench_dir() / f"{name}.json"
        if mode == "run" or (mode == "reuse" and not path.exists()):
            t0 = time.perf_counter()
            log(f"== benchmarks/{name}.py")
            subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / f"{name}.py")], check=True,
                           cwd=REPO_ROOT)
            log(f"   {time.perf_counter() - t0:.0f} s")
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def demo_figures(mode: str, log=print) -> tuple[dict | None, Path | None]:
    """The demo's data/bench/demo.json and its Knowledge Base (running `python -m tinyml_dagster.demo` if asked)."""
    path = settings.bench_dir() / "demo.json"
    if mode == "run" or (mode == "reuse" and not path.exists()):
        log("== python -m tinyml_dagster.demo")  # step 1 materialises the candidates its loop needs
        subprocess.run([sys.executable, "-m", "tinyml_dagster.demo"], cwd=REPO_ROOT)
    if mode == "skip":
        return None, None
    figures = json.loads(path.read_text()) if path.exists() else None  # None: the demo did not finish
    for kb in (settings.data_dir() / "demo" / "kb.sqlite", settings.kb_path()):
        if kb.exists():
            return figures, kb
    return figures, None


def false_positive_episodes(kb_path: Path) -> pd.DataFrame:
    """Per device and champion episode: windows the pool decided, the champion's anomalies, false positives."""
    with KnowledgeBase(kb_path) as kb:
        return pd.DataFrame(kb.episode_summaries())


# -- plots --------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CAL_NOTE = ("modelled ESP32 time = MicroPython VM instructions x {:.1f} ns: ONE constant, set by the paper's 8.7 ms "
            "(10 trees, bearing 1) on the paper-like forest")


def _cal_note(fig, dev: dt.DeviceTime) -> None:
    """The calibration, stated on the plot itself, below the axes."""
    fig.subplots_adjust(bottom=0.17)
    fig.text(0.01, 0.01, CAL_NOTE.format(dev.ms_per_fuel * 1e6), fontsize=6.5, color="0.3")


def plot_inference(dev: dt.DeviceTime, out: Path) -> list[Path]:
    """Fig. 3a/3b: mean and std of inference time vs forest size, normal and anomalous windows, per bearing."""
    plt = _plt()
    paths = []
    for bearing, letter in zip(sorted(dev.rows.bearing.unique()), "ab"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for impl, style, label in (
            ("baseline", "-", "paper-like JSON forest"), ("ours", "--", "this project's forest")
        ):
            for kind, color in (("normal", "tab:blue"), ("anomalous", "tab:red")):
                d = dev.rows[(dev.rows.impl == impl) & (dev.rows.bearing == bearing) & (dev.rows.kind == kind)]
                d = d.sort_values("n_trees")
                if d.empty:
                    continue
                ax.errorbar(d.n_trees, d.ms_mean, yerr=d.ms_std, fmt="o" + style, color=color, capsize=3,
                            alpha=1.0 if impl == "baseline" else 0.6, label=f"{label}, {kind}")
        paper = dt.PAPER_INFERENCE_MS.get(int(bearing), {})
        if paper:
            ax.errorbar(list(paper), [v[0] for v in paper.values()], yerr=[v[1] for v in paper.values()], fmt="k*",
                        markersize=12, capsize=5, label="paper (ESP32, mean ± std)")
        ax.set_xlabel("trees in the forest")
        ax.set_ylabel("inference time per window (ms, modelled)")
        ax.set_title(f"Fig. 3{letter}: inference time, bearing {bearing} model ({dev.rate_hz} Hz windows)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _cal_note(fig, dev)
        paths.append(_save(fig, out / f"fig3{letter}_inference_bearing{bearing}.png"))
    return paths


def plot_load(dev: dt.DeviceTime, out: Path) -> Path:
    """Fig. 3c: model load time (flash to memory) vs forest size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, style, label in (("baseline", "-", "paper-like JSON forest"), ("ours", "--", "this project's forest"),
                               ("mpy", ":", "this project's forest, precompiled .mpy")):
        for bearing, color in zip(sorted(dev.load.bearing.unique()), ("tab:blue", "tab:orange", "tab:green")):
            d = dev.load[(dev.load.impl == impl) & (dev.load.bearing == bearing)].sort_values("n_trees")
            ax.plot(d.n_trees, d.load_ms, "o" + style, color=color, label=f"{label}, bearing {bearing}")
    ax.set_xlabel("trees in the forest")
    ax.set_ylabel("load time from flash (ms, modelled)")
    ax.set_title("Fig. 3c: model load time (the paper gives no numbers for it)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _cal_note(fig, dev)
    return _save(fig, out / "fig3c_load.png")


def _deploy_rows(deploy: dict) -> pd.DataFrame:
    rows = []
    for enc, per in deploy.get("encodings", {}).items():
        for n, r in per.items():
            rows.append({"encoding": enc, "n_trees": int(n), **r})
    return pd.DataFrame(rows).sort_values(["encoding", "n_trees"])


def plot_deploy(deploy: dict, out: Path) -> list[Path]:
    """Fig. 4a/4b: channel occupation and deploy time vs forest size, both encodings, with the paper's numbers."""
    plt = _plt()
    d = _deploy_rows(deploy)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhspan(*PAPER_OCCUPATION, color="0.85", label="paper: 0.6-0.7 for every model")
    for enc, color in (("json", "tab:purple"), ("compact", "tab:green")):
        e = d[d.encoding == enc]
        ax.plot(e.n_trees, e.occupation, "o-", color=color, label=f"this system, {enc} package")
    ax.set_ylim(0, 1)
    ax.set_xlabel("trees in the forest")
    ax.set_ylabel("channel occupation (payload time / wall time)")
    ax.set_title("Fig. 4a: channel occupation while deploying (2,400 baud, half duplex)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    a = _save(fig, out / "fig4a_occupation.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for enc, color in (("json", "tab:purple"), ("compact", "tab:green")):
        e = d[d.encoding == enc]
        ax.plot(e.n_trees, e.deploy_seconds, "o-", color=color, label=f"this system, {enc} package")
    ax.plot(list(PAPER_DEPLOY_S), list(PAPER_DEPLOY_S.values()), "k*", markersize=12, label="paper (bearing 2)")
    ax.set_yscale("log")
    ax.set_xlabel("trees in the forest")
    ax.set_ylabel("deploy time (s, link time at 2,400 baud)")
    ax.set_title("Fig. 4b: time to deploy a model")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    b = _save(fig, out / "fig4b_deploy_time.png")
    return [a, b]


def forest_sizes(forest: dict) -> pd.DataFrame:
    """Model bytes per (bearing, trees) and form, from benchmarks/forest.py's data/bench/forest.json."""
    rows = []
    for form in ("compact_bytes", "json_bytes", "deflated_bytes"):
        for key, size in forest.get(form, {}).items():
            b, t = key.split("-")
            rows.append({"bearing": int(b[1:]), "n_trees": int(t[1:]), "form": form[:-6], "bytes": size})
    return pd.DataFrame(rows)


def plot_repository(forest: dict, out: Path) -> Path:
    """The repository's model sizes vs forest size, per bearing and form (what a deploy has to carry)."""
    plt = _plt()
    d = forest_sizes(forest)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for form, style in (("json", "o-"), ("compact", "s-"), ("deflated", "^--")):
        for bearing, color in zip(sorted(d.bearing.unique()), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            e = d[(d.form == form) & (d.bearing == bearing)].sort_values("n_trees")
            ax.plot(e.n_trees, e.bytes, style, color=color, alpha=0.8,
                    label=f"{form}" if bearing == d.bearing.min() else None)
    ax.set_yscale("log")
    ax.set_xlabel("trees in the forest")
    ax.set_ylabel("model bytes (colours: bearings 1-4)")
    ax.set_title(f"Model repository: {forest.get('models')} candidates, size per form")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out / "repository_sizes.png")


def plot_quality(q: pd.DataFrame, out: Path) -> list[Path]:
    """AUC, false-alarm rate and lead time vs forest size per rate (synthetic run, the failing bearings)."""
    plt = _plt()
    paths = []
    metrics = (("auc", "ROC AUC healthy vs end of life", (0.3, 1.02)),
               ("fa_rate", "false-alarm rate on healthy windows", None),
               ("lead_time_h", "lead time of the first alarm (h)", None))
    for source in q.source.unique():
        s = q[q.source == source]
        bearings = sorted(s.bearing.unique())
        shown = [m for m in metrics if s[m[0]].notna().any()]  # no lead time where the recording has a gap
        fig, axes = plt.subplots(len(shown), len(bearings), figsize=(max(7.0, 3.2 * len(bearings)), 2.6 * len(shown)),
                                 squeeze=False, sharex=True)
        for i, (col, label, ylim) in enumerate(shown):
            for j, bearing in enumerate(bearings):
                ax = axes[i][j]
                for rate, color in zip(sorted(s.rate_hz.unique()), ("tab:blue", "tab:orange", "tab:green", "k")):
                    for model, style in (("firmware", "o-"), ("sklearn", "x--")):
                        d = s[(s.bearing == bearing) & (s.rate_hz == rate) & (s.model == model)].sort_values("n_trees")
                        if d.empty or d[col].isna().all():
                            continue
                        ax.plot(d.n_trees, d[col].astype(float), style, color=color, alpha=1 if model == "firmware"
                                else 0.6, label=f"{rate} Hz {'ours' if model == 'firmware' else 'sklearn'}")
                if ylim:
                    ax.set_ylim(*ylim)
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(f"bearing {bearing}" + (" (fails)" if bearing in dq.FAILING_BEARINGS else ""))
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
                if i == len(shown) - 1:
                    ax.set_xlabel("trees")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6 if len(bearings) > 2 else 3, len(labels)) or 1,
                   fontsize=7)
        fig.suptitle(f"Detection quality, {source}", fontsize=10)
        fig.tight_layout(rect=(0, 0.1 if len(bearings) <= 2 else 0.06, 1, 0.97))
        paths.append(_save(fig, out / f"quality_{source}.png", tight=False))
    return paths


def false_positive_timeline(kb_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(decided windows in upload order with their false_positive flag, champion changes with their upload id)."""
    with KnowledgeBase(kb_path) as kb:
        windows = pd.DataFrame(kb.decided_windows(), columns=["upload_id", "device_id", "false_positive"])
        changes = pd.DataFrame([{"episode": c.episode_id, "device_id": c.device_id, "model_id": c.model_id,
                                 "since_upload_id": c.since_upload_id} for c in kb.champions()],
                               columns=["episode", "device_id", "model_id", "since_upload_id"])
        return windows, changes


def plot_score_over_life(series: dict[str, pd.DataFrame], out: Path, threshold: float) -> Path:
    """The forest's score over the whole life, per snapshot, with the training split, end of life and first alarm."""
    plt = _plt()
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 2.3 * len(series)), squeeze=False, sharex=True)
    for ax, (title, d) in zip(axes[:, 0], series.items()):
        x = d.life_fraction.to_numpy() * 100
        ax.plot(x, d.score_max, ".", ms=2, color="0.6", label="max window score")
        ax.plot(x, d.score_mean, ".-", ms=2, lw=0.5, color="tab:blue", label="mean window score")
        ax.axhline(threshold, color="tab:red", lw=0.8, ls="--", label=f"threshold {threshold}")
        ax.axvspan(0, settings.TRAIN_FRACTION * 100, color="tab:green", alpha=0.07, label="training (healthy)")
        ax.axvspan(dq.EOL_FRACTION * 100, 100, color="tab:red", alpha=0.07, label="end of life")
        first = d[d.first_alarm]
        if not first.empty:
            ax.axvline(first.life_fraction.iloc[0] * 100, color="k", lw=1.2, label="first alarm")
        ax.set_ylim(0.3, 0.9)
        ax.set_ylabel("score", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("% of life (time)")
    axes[0][0].legend(fontsize=7, ncol=6, loc="upper left")
    fig.tight_layout()
    return _save(fig, out / "score_over_life.png")


def plot_loop(episodes: pd.DataFrame, out: Path, timeline: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> Path:
    """False-positive rate per champion episode, and cumulative false positives over the run with the replacements."""
    plt = _plt()
    active = episodes[episodes.windows_decided > 0].reset_index(drop=True)
    fig, axes = plt.subplots(1, 2 if timeline is not None else 1, figsize=(11, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(active)), active.fp_rate, color="tab:red")
    for i, r in enumerate(active.itertuples()):
        ax.text(i, r.fp_rate + 0.005, f"{r.false_positives}/{r.windows_decided}", ha="center", fontsize=8)
    ax.set_xticks(range(len(active)), [f"{i + 1}: {r.champion[:24]}\n({r.source})" for i, r in
                                       enumerate(active.itertuples())], fontsize=7)
    ax.set_ylabel("false positives / windows decided")
    ax.set_title("false-positive rate per champion", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if timeline is not None:
        windows, changes = timeline
        ax = axes[0][1]
        x = np.arange(1, len(windows) + 1)
        ax.plot(x, windows.false_positive.cumsum().to_numpy(), color="tab:red", label="cumulative false positives")
        pos = np.searchsorted(windows.upload_id.to_numpy(), changes.since_upload_id.to_numpy(), side="right")
        for p, r in zip(pos, changes.itertuples()):
            if 0 < p < len(windows):
                ax.axvline(p + 0.5, color="0.4", ls="--", lw=1)
                ax.text(p + 1, ax.get_ylim()[1] * 0.05, r.model_id[:18], rotation=90, fontsize=7, color="0.3")
        ax.set_xlabel("windows decided by the pool, in upload order (dashed: a new champion)")
        ax.set_ylabel("false positives so far")
        ax.set_title("over the run", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Champion replacement loop (demo run): false positives before and after replacements", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "loop_false_positives.png")


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight" if tight else None)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


# -- text ---------------------------------------------------------------------------------------------------

def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, (float, np.floating)) else str(v)


def _md_table(df: pd.DataFrame, floats: dict[str, int] | None = None) -> str:
    floats = floats or {}
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"

    def cell(v, c):
        if isinstance(v, (float, np.floating)):
            if c not in floats and np.isfinite(v) and float(v).is_integer():
                return str(int(v))
            return _fmt(float(v), floats.get(c, 2))
        return str(v)

    body = "".join("| " + " | ".join(cell(r[c], c) for c in df.columns) + " |\n" for _, r in df.iterrows())
    return head + body


def rate_verdict(q: pd.DataFrame) -> tuple[int, str, pd.DataFrame]:
    """Best sampling rate by mean AUC of the firmware forest on the failing bearings (synthetic + real segments)."""
    both = q[q.fails]
    table = both.groupby(["source", "rate_hz", "model"]).agg(
        auc=("auc", "mean"), fa_rate=("fa_rate", "mean"), lead_time_h=("lead_time_h", "mean")).unstack("model")
    table.columns = [f"{metric} ({'ours' if m == 'firmware' else m})" for metric, m in table.columns]
    table = table.reset_index()
    f = both[(both.model == "firmware") & both.source.isin(["synthetic", "ims-real-segments"])]
    by_rate = f.groupby("rate_hz").auc.mean()
    best = int(by_rate.idxmax())
    parts = [f"{r} Hz: {a:.3f}" for r, a in by_rate.items()]
    text = (f"Mean ROC AUC of the firmware forest on the failing bearings (3 and 4; synthetic run and real "
            f"segments, all forest sizes): {', '.join(parts)}. Best: {best} Hz.")
    return best, text, table


def _mpy_deploy_text(c: dict, m: dict, dev: dt.DeviceTime | None, device_bench: dict | None) -> str:
    """The 50-tree deploy of the precompiled champion vs the compact one (both with the firmware in the VM)."""
    text = (f"The 50-tree champion precompiled to .mpy (encoding mpy), deployed in real time to the firmware in the "
            f"VM: {m['package_bytes']:,} B in {m['deploy_seconds']} s (transfer {m['transfer_seconds']} s + install "
            f"{m['install_seconds']} s) vs compact {c['package_bytes']:,} B in {c['deploy_seconds']} s (transfer "
            f"{c['transfer_seconds']} s + install {c['install_seconds']} s): "
            f"{m['deploy_seconds'] / c['deploy_seconds']:.2f}x with the VM's install at the host's speed")
    if dev is not None and device_bench and "mpy" in device_bench:
        compile_s = device_bench["ours"]["load_fuel"]["50"] * dev.ms_per_fuel / 1000
        import_s = device_bench["mpy"]["load_fuel"]["50"] * dev.ms_per_fuel / 1000
        text += (f"; with the load modelled on the ESP32 ({compile_s:.1f} s to compile the compact champion, "
                 f"{import_s:.2f} s to import the .mpy), {c['transfer_seconds'] + compile_s:.1f} s vs "
                 f"{m['transfer_seconds'] + import_s:.1f} s = "
                 f"{(m['transfer_seconds'] + import_s) / (c['transfer_seconds'] + compile_s):.2f}x")
    return text + "."


def write_markdown(cfg: ReportConfig, dev: dt.DeviceTime | None, deploy: dict | None, device_bench: dict | None,
                   quality: pd.DataFrame, demo: dict | None, episodes: pd.DataFrame | None, figs: dict[str, list[Path]],
                   path: Path, seconds: float, bench_all: dict | None = None,
                   life_table: pd.DataFrame | None = None, detection: list[dict] | None = None) -> Path:
    """docs/results.md."""
    rel = lambda p: p.relative_to(path.parent).as_posix()  # noqa: E731
    img = lambda key: "".join(f"![{p.stem}]({rel(p)})\n" for p in figs.get(key, []))  # noqa: E731
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip() or "unknown"
    qc = cfg.quality
    L: list[str] = []
    L += ["# Results: the paper's figures in this system, and detection quality", "",
          f"Generated by `make report` (`python -m tinyml_dagster.report --scale {cfg.name}`) at commit `{commit}`, "
          f"in {seconds:.0f} s. Scale: synthetic run of {qc.n_files} of set 1's 2,156 files, rates "
          f"{', '.join(map(str, qc.rates))} Hz, forest sizes {', '.join(map(str, qc.tree_counts))}, "
          f"bearings {', '.join(map(str, qc.bearings))}; device time on bearings "
          f"{', '.join(map(str, cfg.device_bearings))}, up to {cfg.device_per_kind} windows per batch. "
          "Everything below is regenerated from scratch by that command; no number is typed in by hand except "
          "the paper's.", ""]
    headline: list[str] = []
    # device time
    L += ["## Device time (Fig. 3a, 3b, 3c)", ""]
    if dev is not None:
        fit_json = json.dumps(
            {k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in dev.fit.items()}
        )
        L += [f"**How device time is modelled.** The ESP32 is not here; its MicroPython is (1.27, WASI build on "
              f"wasmtime). Every figure is wasm instructions (fuel, deterministic) measured in that VM, times ONE "
              f"constant: **{dev.ms_per_fuel * 1e6:.2f} ns per instruction**, derived so that the paper-like forest "
              f"(nested dicts loaded from JSON, like the paper's LibIsolationForest port) takes the paper's "
              f"**8.7 ms** for a 10-tree bearing-1 inference on normal windows. All other points, including the "
              f"paper-like 50-tree and bearing-3 ones, are predictions of that one constant. Windows: 500 Hz feature "
              f"windows of the synthetic run; 'normal' / 'anomalous' = windows the model scores <= / > 0.6. "
              f"Per-window spread: the VM counts per run, so each batch's total is measured and the per-window "
              f"instructions are modelled as a + c·trees + b·(nodes visited) (nodes counted exactly); the model "
              f"reproduces every measured batch total within "
              f"{max(v['max_rel_error_batches'] for v in dev.fit.values()) * 100:.1f}% "
              f"(fits: {fit_json}). "
              f"The paper's std (1.3-6.1 ms) includes timer and GC jitter of a real board, which a deterministic "
              f"VM does not have.", ""]
        L += [img("inference"), ""]
        t = dev.rows.copy()
        t = t.pivot_table(index=["bearing", "n_trees"], columns=["impl", "kind"], values="ms_mean")
        t.columns = [f"{impl} {kind} ms" for impl, kind in t.columns]
        t = t.reset_index()
        for b, per in dt.PAPER_INFERENCE_MS.items():
            for n, (m, s) in per.items():
                t.loc[(t.bearing == b) & (t.n_trees == n), "paper ms"] = f"{m} ± {s}"
        L += [_md_table(t.fillna(""), {c: 2 for c in t.columns if c.endswith(" ms")}), ""]
        for b in sorted(dt.PAPER_INFERENCE_MS):
            for n, (m, _) in dt.PAPER_INFERENCE_MS[b].items():
                r = dev.rows[(dev.rows.impl == "baseline") & (dev.rows.bearing == b) & (dev.rows.n_trees == n)
                             & (dev.rows.kind == "normal")]
                if not r.empty and not (b == 1 and n == 10):
                    headline.append(f"paper-like forest, bearing {b}, {n} trees: modelled {r.ms_mean.iloc[0]:.1f} ms "
                                    f"vs the paper's {m} ms")
        L += [img("load"), "",
              _md_table(dev.load.pivot_table(index=["bearing", "n_trees"], columns="impl",
                                             values=["load_ms", "model_bytes"]).pipe(
                  lambda x: x.set_axis([f"{a} {b}" for a, b in x.columns], axis=1)).reset_index()), ""]
        ours = dev.rows[(dev.rows.impl == "ours")]
        base = dev.rows[(dev.rows.impl == "baseline")]
        ratio = (ours.set_index(["bearing", "n_trees", "kind"]).ms_mean
                 / base.set_index(["bearing", "n_trees", "kind"]).ms_mean)
        load_ratio = (dev.load[dev.load.impl == "ours"].load_fuel.values
                      / dev.load[dev.load.impl == "baseline"].load_fuel.values)
        size_ratio = (dev.load[dev.load.impl == "baseline"].model_bytes.values
                      / dev.load[dev.load.impl == "ours"].model_bytes.values)
        L += [f"This project's forest (the device benchmark's `LOAD_OURS` / `SCORE_OURS`: the firmware's runtime "
              f"form) takes {ratio.min():.2f}-{ratio.max():.2f}x the instructions of the paper-like nested-dict forest "
              f"per inference and {load_ratio.min():.2f}-{load_ratio.max():.2f}x to load; its file is "
              f"{size_ratio.mean():.0f}x smaller.", ""]
        if (dev.load.impl == "mpy").any():
            mpy = dev.rows[(dev.rows.impl == "mpy")].set_index(["bearing", "n_trees", "kind"]).ms_mean
            mpy_load = (dev.load[dev.load.impl == "mpy"].load_fuel.values
                        / dev.load[dev.load.impl == "baseline"].load_fuel.values)
            L += [f"Precompiled by the gateway (`LOAD_MPY`: the same champion's runtime module compiled by mpy-cross "
                  f"and imported as a .mpy, nothing compiled on the device), it takes "
                  f"{mpy_load.min():.2f}-{mpy_load.max():.2f}x the nested-dict forest's instructions to load and "
                  f"{(mpy / ours.set_index(['bearing', 'n_trees', 'kind']).ms_mean).min():.2f}-"
                  f"{(mpy / ours.set_index(['bearing', 'n_trees', 'kind']).ms_mean).max():.2f}x the device-compiled "
                  f"champion's per inference.", ""]
    else:
        L += ["(not measured at this scale)", ""]
    if device_bench:
        o, b = device_bench["ours"], device_bench["baseline"]
        L += [f"From `benchmarks/device.py` (data/bench/device.json, its own generic windows at "
              f"{device_bench.get('rate_hz')} Hz): heap held by a loaded 50-tree model {o['heap_bytes']['50']} B "
              f"(this project's runtime form) vs {b['heap_bytes']['50']} B (JSON dicts); feature extraction "
              f"{device_bench['feature_fuel_per_window']['fuel']:,} instructions per 500-ms window of "
              f"{device_bench['feature_fuel_per_window']['samples']} samples"
              + (f" = {device_bench['feature_fuel_per_window']['fuel'] * dev.ms_per_fuel:.0f} ms modelled" if dev
                 else "") + ".", ""]
        if "mpy" in device_bench:
            m, pb = device_bench["mpy"], device_bench.get("package_bytes", {})
            L += [f"The champion precompiled to .mpy (50 trees): load {m['load_fuel']['50']:,} instructions vs "
                  f"{o['load_fuel']['50']:,} compiled on the device and {b['load_fuel']['50']:,} for the JSON dicts; "
                  f"heap {m['heap_bytes']['50']} B; {m['inference_fuel']['50']:,} instructions per inference vs "
                  f"{o['inference_fuel']['50']:,}; package {pb.get('mpy', {}).get('50')} B (mpy) vs "
                  f"{pb.get('compact', {}).get('50')} B (compact) and {pb.get('mpy+compact', {}).get('50')} B "
                  f"(mpy+compact, the compact model beside).", ""]
    forest = bench_all.get("forest") if bench_all else None
    L += ["## The model repository's sizes and costs", ""]
    if forest and forest.get("compact_bytes"):
        sizes = forest_sizes(forest).pivot_table(index=["bearing", "n_trees"], columns="form", values="bytes")
        sizes = sizes.reset_index()[["bearing", "n_trees", "compact", "deflated", "json"]]
        L += [f"From `benchmarks/forest.py` (data/bench/forest.json, read as found: `make bench` runs it at full "
              f"scale): {forest.get('models')} candidates trained on {forest.get('files')} files' "
              f"{forest.get('rate_hz')} Hz windows in {forest.get('train_seconds')} s; the pool scores "
              f"{forest.get('pool_windows_per_s_through_all_models', 0):,} windows/s through all models "
              f"({forest.get('pool_vs_sklearn')}x scikit-learn's rate in model-windows/s).", "", img("repository"), "",
              _md_table(sizes), ""]
    else:
        L += ["(data/bench/forest.json missing: run `make bench`)", ""]
    # deploy
    L += ["## Deploy (Fig. 4a, 4b)", ""]
    if deploy:
        L += [f"From `benchmarks/deploy.py` (data/bench/deploy.json): the gateway's real pySerialTransfer and the "
              f"real firmware on the device emulator's exact {deploy.get('baud')}-baud 8N1 half-duplex wire with "
              f"{deploy.get('turnaround_s')} s turnaround each way (the sweep sped up, the 50-tree compact deploy also "
              f"in real time with the firmware in the MicroPython VM); link time (wire time at 2,400 baud). "
              f"Occupation = payload bytes' wire time / link time.", "", img("deploy"), ""]
        d = _deploy_rows(deploy)[["encoding", "n_trees", "package_bytes", "frames", "deploy_seconds", "occupation"]]
        d["paper s"] = d.n_trees.map(lambda n: PAPER_DEPLOY_S.get(n, ""))
        L += [_md_table(d, {"occupation": 3, "deploy_seconds": 1}), ""]
        c50 = d[(d.encoding == "compact") & (d.n_trees == 50)]
        j50 = d[(d.encoding == "json") & (d.n_trees == 50)]
        if not c50.empty:
            headline.append(f"deploying 50 trees: {c50.deploy_seconds.iloc[0]:.0f} s compact, "
                            f"{j50.deploy_seconds.iloc[0]:.0f} s JSON, vs the paper's 5,147 s; occupation "
                            f"{d.occupation.min():.2f}-{d.occupation.max():.2f} vs 0.6-0.7")
        if "emulator_vm_50_mpy" in deploy and "emulator_vm_50_compact" in deploy:
            L += [_mpy_deploy_text(deploy["emulator_vm_50_compact"], deploy["emulator_vm_50_mpy"], dev,
                                   device_bench), ""]
    else:
        L += ["(data/bench/deploy.json missing: run `make bench`)", ""]
    # quality
    L += ["## Detection quality (beyond the paper)", "",
          "Definitions (tinyml_dagster/detection_quality.py): healthy windows = life < 60% (the training split; the "
          "false-alarm rate there is in-sample, as a device sees it); `fa_rate_heldout` = healthy windows the "
          "forest never saw (60-70% of life, before the synthetic defects start); end-of-life windows = life >= 90%; "
          "alarm = score > 0.6; a 1-s snapshot alarms when at least half of its windows do; first alarm = first of "
          f"{dq.ALARM_SNAPSHOTS} consecutive alarming snapshots once monitoring starts (60% of life); lead time = end "
          "of the recording - first alarm. Models: `firmware` = the forest the repository trains "
          "(firmware/isoforest.py, psi 100, seeds as training.py); `sklearn` = scikit-learn's IsolationForest, same "
          "features, trees and psi. Bearings 3 and 4 fail at the end of set 1; 1 and 2 do not (AUC ~0.5 is right "
          "for them).", "",
          "Sources: **synthetic** = the calibrated synthetic set 1 (defects from 70% of life); "
          "**ims-real-segments** = real files packaged in tinyml_dagster/data/ims_set1_real.npz: the first 50 "
          "files of set 1 (healthy run-in, the first 4.6 h) against the last 6 (bearing 3 inner race, bearing 4 "
          "roller), x axis, subsampled as the pipeline does; no lead time (nothing in between); "
          "**ims-real-files** = the whole real life of set 1 (2,156 files, all channels) with one window per "
          "file: mean, skewness and kurtosis of the raw 20 kHz 1-s file from a public per-file feature table "
          "(the mean rebuilt as -sqrt(rms² - std²), checked against the raw files here: equal to 1e-5 except the "
          "very last bearing-3 file, whose mean is positive), so 20 kHz and 1-s windows, not the device's "
          "rates.", ""]
    for p in figs.get("quality", []):
        L += [f"![{p.stem}]({rel(p)})", ""]
    L += ["What the detector sees over a whole life (our forest; per 1-s snapshot: mean and max of its windows' "
          "scores; the first alarm as defined above):", "", img("life"), "",
          _md_table(life_table, {c: 3 for c in life_table.columns[1:4]} | {"first alarm at % of life": 1})
          if life_table is not None else "", ""]
    best, verdict, rate_table = rate_verdict(quality)
    L += ["### Per source and rate (failing bearings, mean over forest sizes; ours vs scikit-learn)", "",
          _md_table(rate_table, {c: (1 if c.startswith("lead") else 3) for c in rate_table.columns[2:]}), ""]
    big = max(qc.tree_counts)
    sel = quality[quality.n_trees == big][["source", "rate_hz", "bearing", "model", "n_healthy", "n_eol", "fa_rate",
                                           "fa_rate_heldout", "auc", "lead_time_h", "eol_alarm_rate"]]
    L += [f"### Every bearing at {big} trees (every rate, size and model: "
          "[results/detection_quality.csv](results/detection_quality.csv))", "",
          _md_table(sel, {"fa_rate": 3, "fa_rate_heldout": 3, "auc": 3, "lead_time_h": 1, "eol_alarm_rate": 3}),
          "For bearings 1 and 2, which do not fail, a lead time is a persistent false alarm during monitoring "
          "(3 alarming snapshots in a row).", ""]
    for source in ("synthetic", "ims-real-files"):
        f = quality[(quality.source == source) & (quality.model == "firmware") & quality.fails
                    & (quality.n_trees == big)]
        if source == "synthetic":
            f = f[f.rate_hz == f.rate_hz.max()]
        if not f.empty:
            headline.append(f"{source} ({int(f.rate_hz.iloc[0])} Hz, {big} trees, our forest): " + "; ".join(
                f"bearing {r.bearing} AUC {_fmt(r.auc, 3)}, false alarms {r.fa_rate:.3f}, first alarm "
                + (f"{r.lead_time_h:.0f} h before the end" if pd.notna(r.lead_time_h) else "never")
                for r in f.itertuples()))
    defect = (f"BPFI {synthetic.BPFI_HZ:.0f} Hz for bearing 3's inner race, 2xBSF {2 * synthetic.BSF_HZ:.0f} Hz "
              "for bearing 4's rollers")
    L += ["### What follows for the default sampling rate", "",
          verdict + f" The failing bearings' defect frequencies ({defect}) lie above the 250 Hz Nyquist limit "
          "of 500 Hz sampling, so at 500 Hz their impacts reach the features only through the low band; "
          "at 1 and 2 kHz the defect lines themselves are inside the band.", ""]
    L += [f"Defaults now: the candidate models train on {settings.DEFAULT_RATE_HZ} Hz windows "
          f"(`settings.DEFAULT_RATE_HZ`, the default of `candidate_models`)"
          + (" — the numbers above say it should be "
             f"{best} Hz." if settings.DEFAULT_RATE_HZ != best else ", which the numbers support."), ""]
    if dev is not None and device_bench:
        fb = device_bench["feature_fuel_per_window"]
        per_sample_ms = fb["fuel"] / fb["samples"] * dev.ms_per_fuel
        costs = {r: per_sample_ms * r * dq.WINDOW_S for r in qc.rates}
        fits = [r for r, ms in costs.items() if ms < 1000 * dq.WINDOW_S]
        L += ["Cost on the device: feature extraction is linear in a window's samples: "
              + ", ".join(f"~{ms:.0f} ms per 500-ms window at {r} Hz" for r, ms in costs.items())
              + f" (modelled from benchmarks/device.py's {fb['fuel']:,} instructions for {fb['samples']} samples; "
              "pure-Python features). Real time (< 500 ms per window) holds at "
              + (", ".join(f"{r} Hz" for r in fits) or "no rate") + "; the link is not affected (only features or "
              "anomalies are uploaded).", ""]
    headline.append(verdict)
    # loop
    L += ["## The champion-replacement loop: false positives before and after", ""]
    if episodes is not None and not episodes.empty:
        deployed = int((episodes.source == "deploy").sum())  # counted in the KB, the loop's ground truth
        run = (f"{demo.get('windows', '?')} windows on the device, N_fp = {demo.get('n_fp', '?')}, "
               f"{deployed} champion(s) deployed by the loop" if demo else
               "**the demo did not finish in this run** (no data/bench/demo.json), so this is what its Knowledge "
               "Base holds")
        L += [f"From the demo's Knowledge Base (`make demo`; {run}): one row per champion in its order on the "
              "device; windows decided by the pool while that champion ran (the windows the device uploaded: its "
              "anomalies and a sample of its normal windows), the champion's anomalies among them, and the false "
              "positives (champion anomaly, pool normal). A champion is replaced after N_fp false positives.", "",
              img("loop"), "",
              _md_table(episodes, {"fp_rate": 3}), ""]
        active = episodes[episodes.windows_decided > 0]  # a placeholder champion before the device trains has none
        if len(active) >= 2:
            first, later = active.iloc[0], active.iloc[1:]
            fp, n = int(later.false_positives.sum()), int(later.windows_decided.sum())
            text = (f"false-positive rate {first.fp_rate:.3f} ({first.false_positives}/{first.windows_decided}) "
                    f"under the first champion, {fp / n:.3f} ({fp}/{n}) under the {len(later)} that replaced it "
                    f"(last: {later.iloc[-1].false_positives}/{later.iloc[-1].windows_decided})")
            L += [f"Before and after: {text}.", ""]
            headline.append("champion replacement (demo run): " + text)
        else:
            L += ["No replacement took place in this run, so there is no 'after' to compare.", ""]
            headline.append("champion replacement: no replacement took place in the demo run behind this report")
    else:
        L += ["(no demo Knowledge Base found: run `make demo`, then `make report`)", ""]
    if detection:
        L += detection_markdown(detection, (bench_all or {}).get("device"), headline)
    L += ["## Closing note", ""] + [f"- {h}" for h in headline] + [""]
    atomic_write(path, "\n".join(L), mode=0o644)
    return path


def detection_markdown(records: list[dict], device_bench: dict | None, headline: list[str]) -> list[str]:
    """The section of results.md on the feature sets judged on whole lives (data/bench/detection.json)."""
    from tinyml_dagster.features import DEFAULT_FEATURE_SET

    L = ["## Detection per feature set on whole lives (data/bench/detection.json)", "",
         f"Default feature set: **{DEFAULT_FEATURE_SET}**. Per source and bearing, models trained on the first "
         "quarter of the recording's windows (healthy everywhere): the firmware's Isolation Forest (50 trees, "
         "psi 100, scored with out-of-range isolation) and scikit-learn's on the same features; thresholds "
         "calibrated for a 0.2% window false-alarm rate on cross-fitted scores of the training windows (5 "
         "blocks of time, each scored by a model grown on the others) through a generalised Pareto tail (the "
         "paper's set also at its fixed 0.6). Healthy = the recording's part before its first labelled onset "
         "(every channel sees a degrading bearing on the shared shaft); degraded = from the bearing's own "
         "onset. `auc`: degraded vs held-out healthy windows on the score the alarm acts on (the k-th highest "
         "window score of the alarm span); `auc_window`: on single windows; `fa_rate_heldout_ci95`: the exact "
         "(Clopper-Pearson) 95% interval of the held-out rate; alarms: firmware/alarms.py, span "
         "the device's 600 s or 6 snapshot intervals where snapshots are sparser (3,600 s on the IMS files and the "
         "synthetic run, 1,800 s on the raw files), raised at 50% anomalous windows, cleared at 10%. IMS sources "
         "are per-file features of the raw 20 kHz signal; the wear set there is its time-domain part (no bands).",
         ""]
    for model in ("firmware", "sklearn"):
        rows = [r for r in records if r["model"] == model]
        if not rows:
            continue
        df = pd.DataFrame(rows)[["source", "bearing", "feature_set", "threshold_mode", "failing", "auc", "auc_window",
                                 "fa_rate_heldout", "fa_rate_heldout_ci95", "alarms_in_healthy",
                                 "alarms_after_recording_onset", "first_alarm_h_before_failure",
                                 "first_alarm_h_after_onset"]]
        df["fa_rate_heldout_ci95"] = df.fa_rate_heldout_ci95.map(lambda ci: f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else "")
        L += [f"Model: {model}", "", _md_table(df, {"auc": 3, "auc_window": 3, "fa_rate_heldout": 4}), ""]
    drifted = [r for r in records if r["model"] == "firmware" and r["feature_set"] == DEFAULT_FEATURE_SET
               and r.get("target_fa") and r["fa_rate_heldout_ci95"] and r["fa_rate_heldout_ci95"][0] > r["target_fa"]]
    if drifted:
        L += ["Held-out healthy windows flagged well above the calibrated target (the lower end of the interval "
              "above it). Each feature's median and 99th percentile in the training windows and in the held-out "
              "healthy ones, to show how the held-out part differs from what the models learned.", ""]
        rows = [{"source": r["source"], "bearing": r["bearing"], "feature": name, "train median": v[0],
                 "train p99": v[1], "held-out median": v[2], "held-out p99": v[3]}
                for r in drifted for name, v in r["heldout_drift"].items()]
        L += [_md_table(pd.DataFrame(rows), {c: 3 for c in ("train median", "train p99", "held-out median",
                                                             "held-out p99")}), ""]
    fails = [r for r in records if r["model"] == "firmware" and r["feature_set"] == DEFAULT_FEATURE_SET
             and r["failing"]]
    if fails:
        def lead(r: dict) -> str:
            h = r["first_alarm_h_before_failure"]
            if h is not None:
                return f"first alarm {h} h before failure"
            return "no alarm before failure" if r.get("lead_time_measured") else "no lead time (a gap in the recording)"

        headline.append("detection, default set (" + DEFAULT_FEATURE_SET + "): " + "; ".join(
            f"{r['source']} b{r['bearing']} AUC {r['auc']:.3f}, {lead(r)}" for r in fails))
    fs = (device_bench or {}).get("feature_sets")
    if fs:
        costs = []
        for name, v in fs["sets"].items():
            kinds = ", ".join("%s %s" % (k, c["ms"]) for k, c in v["signals"].items())
            costs.append(f"{name} {v['worst_ms']} ms at worst ({kinds})")
        L += [f"Device cost of the feature sets at {fs['rate_hz']} Hz (benchmarks/device.py, modelled ms per 500-ms "
              f"window): " + "; ".join(costs) + f" (budget {fs['budget_ms']:.0f} ms).", ""]
    return L


# -- the whole report ---------------------------------------------------------------------------------------

def build(cfg: ReportConfig = FULL, docs_dir: Path = DOCS, log=print) -> Path:
    """Run everything at cfg's scale and write docs_dir/results.md and docs_dir/results/*.png."""
    t0 = time.perf_counter()
    out = docs_dir / "results"
    bench = run_benchmarks(BENCHMARKS, cfg.benchmarks, log) if cfg.benchmarks != "skip" else {}
    if cfg.benchmarks != "skip":  # full-scale and heavy: `make bench` runs it, the report only reads it
        bench.update(run_benchmarks(("forest",), "never", log))
    demo, kb = demo_figures(cfg.demo, log)
    quality = dq.evaluate(cfg.quality, log)
    dq.write_frame(quality, dq.default_path())
    dq.write_frame(quality.round(4), out / "detection_quality.csv")  # every row, next to the plots
    figs: dict[str, list[Path]] = {"quality": plot_quality(quality, out)}
    big, rate = max(cfg.quality.tree_counts), max(cfg.quality.rates)
    series = {}
    synth = dq.synthetic_windows(cfg.quality.n_files, (rate,), dq.FAILING_BEARINGS)[rate]
    for b in dq.FAILING_BEARINGS:
        series[f"synthetic, {rate} Hz, bearing {b}, {big} trees"] = dq.snapshot_scores(synth, b, big, cfg.quality)
    if cfg.quality.real:
        real = dq.real_file_windows()
        for b in dq.FAILING_BEARINGS:
            series[f"real set 1 (per-file features, 20 kHz), bearing {b}, {big} trees"] = dq.snapshot_scores(
                real, b, big, cfg.quality)
    figs["life"] = [plot_score_over_life(series, out, cfg.quality.threshold)]
    life_rows = []
    for title, d in series.items():
        lf = d.life_fraction
        first = d[d.first_alarm]
        life_rows.append({"series": title,
                          "alarming snapshots, life < 60%": d.alarm[lf < settings.TRAIN_FRACTION].mean(),
                          "60-90%": d.alarm[(lf >= settings.TRAIN_FRACTION) & (lf < dq.EOL_FRACTION)].mean(),
                          "last 10%": d.alarm[lf >= dq.EOL_FRACTION].mean(),
                          "first alarm at % of life": first.life_fraction.iloc[0] * 100 if len(first) else np.nan})
    life_table = pd.DataFrame(life_rows)
    windows = dq.synthetic_windows(cfg.quality.n_files, (500,), cfg.device_bearings)[500]
    dev = dt.measure(windows, cfg.device_bearings, cfg.device_tree_counts, cfg.device_per_kind, log=log)
    figs["inference"] = plot_inference(dev, out)
    figs["load"] = [plot_load(dev, out)]
    if "forest" in bench and bench["forest"].get("compact_bytes"):
        figs["repository"] = [plot_repository(bench["forest"], out)]
    if "deploy" in bench:
        figs["deploy"] = plot_deploy(bench["deploy"], out)
    episodes = false_positive_episodes(kb) if kb else None
    if episodes is not None and not episodes.empty:
        figs["loop"] = [plot_loop(episodes, out, false_positive_timeline(kb))]
    detection = dq.detection_records(dq.DetectionConfig(
        synthetic_files=cfg.quality.n_files, sklearn=cfg.quality.sklearn,
        sources=dq.DetectionConfig.sources if cfg.quality.real else ("synthetic-2khz",)), log)
    dq.write_detection(detection)
    path = write_markdown(cfg, dev, bench.get("deploy"), bench.get("device"), quality, demo, episodes, figs,
                          docs_dir / "results.md", time.perf_counter() - t0, bench, life_table, detection)
    log(f"wrote {path} and {sum(len(v) for v in figs.values())} plots in {out}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.report", description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("full", "quick", "small"), default="full",
                    help="full: the committed report (all 2,156 synthetic files, all sizes); quick: 240 files")
    ap.add_argument("--benchmarks", choices=("run", "reuse", "skip"), default=None,
                    help="run the benchmarks (default for full), reuse their JSON when present, or skip them")
    ap.add_argument("--demo", choices=("run", "reuse", "skip"), default=None,
                    help="run the demo for the loop's figures, reuse data/bench/demo.json (default), or skip")
    ap.add_argument("--docs", type=Path, default=DOCS, help="where results.md and results/ go")
    args = ap.parse_args(argv)
    cfg = {"full": FULL, "quick": QUICK, "small": SMALL}[args.scale]
    if args.benchmarks:
        cfg = replace(cfg, benchmarks=args.benchmarks)
    if args.demo:
        cfg = replace(cfg, demo=args.demo)
    build(cfg, args.docs)
