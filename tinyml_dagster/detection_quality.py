"""Detection quality (the paper left it out of scope): lead time, false alarms and ROC AUC of the forests.

Per source (synthetic run, real IMS excerpts), sampling rate, bearing, forest size and model (the firmware's
Isolation Forest as the repository trains it, and scikit-learn's IsolationForest on the same features):
- healthy windows: life_fraction < 0.6 (the training split; the false-alarm rate there is in-sample, as the device
  sees it while it monitors a machine like the one it trained on); `fa_rate_heldout` uses the healthy windows
  the forest never saw (0.6 <= life < 0.7, before the synthetic defects start; synthetic source only);
- end-of-life windows: life_fraction >= 0.9 (real segments: the last 6 files of set 1);
- alarm: score > threshold (0.6, as the paper); a snapshot (one 1-s file, both axes) alarms when at least half of
  its windows do; the first alarm is the first of ALARM_SNAPSHOTS consecutive alarming snapshots once monitoring
  starts (life >= 0.6); lead time = end of life - first alarm;
- AUC: probability that an end-of-life window scores above a healthy one (Mann-Whitney, ties count 1/2).

Bearings 3 and 4 fail at the end of set 1 (inner race, roller); bearings 1 and 2 do not, so their "end of life"
windows are healthy too and an AUC near 0.5 is the right answer for them.

`detection_records` (`--detection`, and `make report`) judges each feature set on whole lives instead: per source
(the synthetic run through the device's feature extraction at 2 kHz, the per-file tables of IMS sets 1 and 2),
bearing, feature set and model, trained on the first `train_fraction` of the recording's windows (a share of its
windows, not of its calendar time: a device trains on the windows it has recorded, and set 1's multi-day stops put
only 252 of its 2,156 files in its first quarter of time; every training window must lie in the healthy part),
with thresholds calibrated on cross-fitted scores of the training windows
(training.crossfit_scores, a generalised Pareto tail for the target rate), the labels of BearingLabels (healthy:
the recording before its first labelled onset, recording_onset; degraded: from the bearing's own onset) and the
alarm rule of firmware/alarms.py over alarm_span_s (the device's 600 s, or 6 snapshot intervals where snapshots are
sparser); it writes data/bench/detection.json. A user's recording is a source too (`--recording spec.toml`): its
monitored units through the device's extraction, labelled by the spec file's [labels] table (recording_labels).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from tinyml_dagster import ims, settings, subsampling, synthetic
from tinyml_dagster.storage import atomic_write
from tinyml_dagster.features import FEATURE_NAMES, WINDOW_MS, feature_windows_frame, life_fractions
from tinyml_dagster.forest import PoolScorer
from tinyml_dagster.training import PSI, THRESHOLD, TREE_COUNTS, feature_matrix, model_seed, train_forest

EOL_FRACTION = 0.9
ALARM_SNAPSHOTS = 3
SNAPSHOT_VOTE = 0.5
FAILING_BEARINGS: tuple[int, ...] = (3, 4)
MODELS: tuple[str, ...] = ("firmware", "sklearn")
REAL_EXCERPT = "data/ims_set1_real.npz"
REAL_SEGMENT_RATE_HZ = 2000  # the real segments are stored at 2 kHz; 1 kHz and 500 Hz are derived by the same FFT
REAL_FILE_RATE_HZ = ims.SAMPLE_RATE_HZ  # per-file features of the raw 20 kHz signal (1-s windows)
WINDOW_S = WINDOW_MS / 1000.0  # the feature windows' length in seconds


@dataclass(frozen=True)
class QualityConfig:
    """What to evaluate; the defaults are the committed report's full scale."""

    n_files: int = synthetic.FULL_FILES
    rates: tuple[int, ...] = settings.RATES_HZ
    tree_counts: tuple[int, ...] = TREE_COUNTS
    bearings: tuple[int, ...] = settings.BEARINGS
    seed: int = 0
    sklearn: bool = True
    real: bool = True
    threshold: float = THRESHOLD
    psi: int = PSI


@dataclass
class QualityRow:
    """One (source, rate, bearing, forest size, model) evaluation."""

    source: str
    rate_hz: int
    bearing: int
    n_trees: int
    model: str
    fails: bool
    n_healthy: int
    n_eol: int
    fa_rate: float
    fa_rate_heldout: float | None
    snapshot_fa_rate: float
    auc: float | None
    first_alarm: str | None
    first_alarm_life: float | None
    lead_time_h: float | None
    extra: dict = field(default_factory=dict)


# -- statistics -----------------------------------------------------------------------------------------------

def roc_auc(healthy: np.ndarray, eol: np.ndarray) -> float | None:
    """P(score of an end-of-life window > score of a healthy one), ties 1/2 (Mann-Whitney U / (n0 n1))."""
    healthy, eol = np.asarray(healthy, float), np.asarray(eol, float)
    if len(healthy) == 0 or len(eol) == 0:
        return None
    ranks = scipy.stats.rankdata(np.concatenate([healthy, eol]))
    u = ranks[len(healthy):].sum() - len(eol) * (len(eol) + 1) / 2.0
    return float(u / (len(healthy) * len(eol)))


def rate_interval(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Exact (Clopper-Pearson) interval of a rate seen as k events in n trials: [low, high]; None when n is 0.

    A held-out rate from few windows says little (1 of 50 is 2%, yet compatible with 0.05%): the interval says how
    much."""
    if n == 0:
        return None
    ci = scipy.stats.binomtest(k, n).proportion_ci(level, method="exact")
    return [round(float(ci.low), 5), round(float(ci.high), 5)]


def snapshot_alarms(file_index: np.ndarray, alarm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(file indices, alarm per snapshot): a snapshot alarms when >= SNAPSHOT_VOTE of its windows do."""
    files, inverse = np.unique(file_index, return_inverse=True)
    votes = np.bincount(inverse, weights=alarm.astype(float)) / np.bincount(inverse)
    return files, votes >= SNAPSHOT_VOTE


def first_alarm(snap_alarm: np.ndarray, snap_life: np.ndarray, start_life: float = settings.TRAIN_FRACTION,
                run: int = ALARM_SNAPSHOTS) -> int | None:
    """Index of the first snapshot (life >= start_life) that starts `run` consecutive alarming snapshots."""
    a = np.asarray(snap_alarm, bool) & (np.asarray(snap_life) >= start_life)
    if len(a) < run:
        return None
    window = np.convolve(a.astype(int), np.ones(run, dtype=int), mode="valid")
    hits = np.flatnonzero(window == run)
    return int(hits[0]) if len(hits) else None


# -- scoring ----------------------------------------------------------------------------------------------

def model_scores(X_train: np.ndarray, X: np.ndarray, tree_counts: Sequence[int], bearing: int, seed: int,
                 model: str, psi: int = PSI) -> np.ndarray:
    """(n_windows, n_sizes) anomaly scores in 0..1 of forests trained on X_train, one per forest size."""
    if model == "firmware":
        forests = [train_forest(X_train, n, psi, model_seed(seed, bearing, n)) for n in tree_counts]
        return PoolScorer(forests).scores(X)
    if model == "sklearn":
        from sklearn.ensemble import IsolationForest  # report-only dependency (dev extra)

        cols = []
        for n in tree_counts:
            ref = IsolationForest(n_estimators=n, max_samples=min(psi, len(X_train)),
                                  random_state=model_seed(seed, bearing, n) % (2**32))
            ref.fit(X_train)
            cols.append(-ref.score_samples(X))  # sklearn's score_samples is minus the paper's score
        return np.column_stack(cols)
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")


def evaluate_windows(windows: pd.DataFrame, source: str, config: QualityConfig,
                     heldout: tuple[float, float] | None = None, lead_time: bool = True) -> list[QualityRow]:
    """Detection quality of every (bearing, forest size, model) on one rate's feature windows.

    lead_time=False for recordings with a gap between healthy and end-of-life files (no first alarm to place).
    """
    if windows.empty:
        raise ValueError(f"{source}: no feature windows to evaluate")
    rates = windows.rate_hz.unique()
    if len(rates) != 1:
        raise ValueError(f"{source}: evaluate one rate at a time, got {sorted(rates)}")
    rate = int(rates[0])
    rows: list[QualityRow] = []
    models = MODELS if config.sklearn else MODELS[:1]
    for bearing in config.bearings:
        df = windows[windows.bearing == bearing].sort_values(["file_index", "window_index", "axis"], kind="stable")
        if df.empty:
            continue
        life = df.life_fraction.to_numpy()
        healthy = life < settings.TRAIN_FRACTION
        eol = life >= EOL_FRACTION
        if healthy.sum() < 2:
            raise ValueError(f"{source}, {rate} Hz, bearing {bearing}: {healthy.sum()} healthy windows, need 2")
        X = feature_matrix(df, f"{source} {rate} Hz bearing {bearing}")
        held = (life >= heldout[0]) & (life < heldout[1]) if heldout else None
        files = df.file_index.to_numpy()
        snap_files, first_rows = np.unique(files, return_index=True)
        snap_life = life[first_rows]
        snap_time = df.timestamp.to_numpy()[first_rows]
        end_time = pd.Timestamp(snap_time[-1])
        for model in models:
            scores = model_scores(X[healthy], X, config.tree_counts, bearing, config.seed, model, config.psi)
            for j, n_trees in enumerate(config.tree_counts):
                s = scores[:, j]
                alarm = s > config.threshold
                _, snap = snapshot_alarms(files, alarm)
                k = first_alarm(snap, snap_life) if lead_time else None
                t_alarm = pd.Timestamp(snap_time[k]) if k is not None else None
                rows.append(QualityRow(
                    source=source, rate_hz=rate, bearing=int(bearing), n_trees=int(n_trees), model=model,
                    fails=bearing in FAILING_BEARINGS, n_healthy=int(healthy.sum()), n_eol=int(eol.sum()),
                    fa_rate=float(alarm[healthy].mean()),
                    fa_rate_heldout=float(alarm[held].mean()) if held is not None and held.any() else None,
                    snapshot_fa_rate=float(snap[snap_life < settings.TRAIN_FRACTION].mean()),
                    auc=roc_auc(s[healthy], s[eol]),
                    first_alarm=t_alarm.isoformat() if t_alarm is not None else None,
                    first_alarm_life=float(snap_life[k]) if k is not None else None,
                    lead_time_h=round((end_time - t_alarm).total_seconds() / 3600.0, 2) if t_alarm is not None
                    else None,
                    extra={"eol_alarm_rate": float(alarm[eol].mean()) if eol.any() else None},
                ))
    return rows


def snapshot_scores(windows: pd.DataFrame, bearing: int, n_trees: int, config: QualityConfig = QualityConfig(),
                    model: str = "firmware") -> pd.DataFrame:
    """Per snapshot of one bearing: time, life fraction, mean and max window score, alarm; first alarm flagged."""
    df = windows[windows.bearing == bearing].sort_values(["file_index", "window_index", "axis"], kind="stable")
    X = feature_matrix(df, f"bearing {bearing}")
    life = df.life_fraction.to_numpy()
    s = model_scores(X[life < settings.TRAIN_FRACTION], X, (n_trees,), bearing, config.seed, model, config.psi)[:, 0]
    files = df.file_index.to_numpy()
    snap_files, snap = snapshot_alarms(files, s > config.threshold)
    g = pd.DataFrame({"file_index": files, "timestamp": df.timestamp.to_numpy(), "life_fraction": life, "score": s})
    out = g.groupby("file_index").agg(timestamp=("timestamp", "first"), life_fraction=("life_fraction", "first"),
                                      score_mean=("score", "mean"), score_max=("score", "max")).reset_index()
    out["alarm"] = snap
    k = first_alarm(snap, out.life_fraction.to_numpy())
    out["first_alarm"] = False
    if k is not None:
        out.loc[k, "first_alarm"] = True
    return out


# -- sources ----------------------------------------------------------------------------------------------

def synthetic_windows(
    n_files: int,
    rates: Sequence[int] = settings.RATES_HZ,
    bearings: Sequence[int] = settings.BEARINGS,
    seed: int = synthetic.DEFAULT_SEED,
    chunk: int = 64,
) -> dict[int, pd.DataFrame]:
    """Feature windows of the synthetic recording (n_files of its schedule) at each rate, computed in memory."""
    index = synthetic.schedule(n_files)
    stamps = np.array(synthetic.set1_timestamps(), dtype="datetime64[ns]")[index]
    parts: dict[int, list[np.ndarray]] = {r: [] for r in rates}
    for lo in range(0, len(index), chunk):
        raw = np.stack([synthetic.synthesize_file(i, seed) for i in index[lo:lo + chunk]])  # (files, 20480, 8)
        for rate, x in subsampling.subsample_many(raw, rates, ims.SAMPLE_RATE_HZ, axis=1).items():
            parts[rate].append(x.astype(np.float64))
    out = {}
    for rate in rates:
        signals = np.concatenate(parts[rate])
        out[rate] = pd.concat([feature_windows_frame(signals, stamps, rate, b) for b in bearings], ignore_index=True)
    return out


def real_excerpt() -> dict[str, np.ndarray]:
    """The real IMS set-1 excerpt packaged with tinyml_dagster (see build_real_excerpt)."""
    ref = resources.files("tinyml_dagster").joinpath(REAL_EXCERPT)
    with resources.as_file(ref) as path, np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def real_segment_windows(rate_hz: int, excerpt: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Feature windows of the real segments: the first 50 files (healthy) and the last 6 (end of life) of set 1,
    bearings 3 and 4, x axis; life fractions from the real timestamps."""
    ex = excerpt if excerpt is not None else real_excerpt()
    all_stamps = np.array(synthetic.set1_timestamps(), dtype="datetime64[ns]")
    life_all = life_fractions(all_stamps)
    frames = []
    for part in ("healthy", "eol"):
        signals = ex[f"{part}_2khz"].astype(np.float64)  # (files, 2048, 2): b3x, b4x
        if rate_hz != REAL_SEGMENT_RATE_HZ:
            signals = subsampling.subsample(signals, rate_hz, source_rate_hz=REAL_SEGMENT_RATE_HZ, axis=1)
        idx = ex[f"{part}_index"].astype(int)
        for col, bearing in enumerate((3, 4)):
            # a 4-column layout maps bearing b to column b-1; put the channel there
            four = np.zeros(signals.shape[:2] + (4,))
            four[:, :, bearing - 1] = signals[:, :, col]
            df = feature_windows_frame(four, all_stamps[idx], rate_hz, bearing)
            df["file_index"] = idx[df.file_index.to_numpy()]
            df["life_fraction"] = life_all[df.file_index.to_numpy()]
            df["split"] = np.where(df.life_fraction < settings.TRAIN_FRACTION, "train", "test")
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def real_file_windows(excerpt: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One window per real set-1 file (1 s at 20 kHz) and channel, for the whole life: mean, skewness, kurtosis."""
    ex = excerpt if excerpt is not None else real_excerpt()
    feats = ex["file_features"]  # (2156, 8, 3)
    stamps = np.array(synthetic.set1_timestamps(), dtype="datetime64[ns]")
    life = life_fractions(stamps)
    frames = []
    for ch in range(8):
        bearing, axis = ch // 2 + 1, "xy"[ch % 2]
        frames.append(pd.DataFrame({
            "timestamp": stamps, "file_index": np.arange(len(stamps)), "window_index": 0, "bearing": bearing,
            "axis": axis, "rate_hz": REAL_FILE_RATE_HZ, "life_fraction": life,
            "split": np.where(life < settings.TRAIN_FRACTION, "train", "test"),
            **{name: feats[:, ch, k] for k, name in enumerate(FEATURE_NAMES)},
        }))
    return pd.concat(frames, ignore_index=True)


def build_real_excerpt(shared_ims: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Make the packaged real excerpt from a copy of the IMS data
    (1st_test/, 1st_test_end_segments/, derived_features/).

    healthy_2khz: the first 50 files of set 1, bearing 3 x and bearing 4 x, subsampled to 2 kHz (float32);
    eol_2khz: the last 6 files, same channels (IF.mat, BF.mat), same subsampling; *_index: their file indices;
    file_features: (2156, 8, 3) mean, skewness, excess kurtosis of every file and channel at 20 kHz, from the
    per-file table (mean = -sqrt(rms^2 - std^2): the table keeps the mean of |x|; the sensors' offset is negative).
    """
    import scipy.io

    root = Path(shared_ims)
    files = ims.list_ims_files(root / "1st_test")
    raw = np.stack([ims.read_ims_file(f)[:, [4, 6]] for f in files])
    healthy = subsampling.subsample(raw, REAL_SEGMENT_RATE_HZ, ims.SAMPLE_RATE_HZ, axis=1).astype(np.float32)
    end = np.stack([scipy.io.loadmat(root / "1st_test_end_segments" / f"{n}.mat")["data"].ravel().reshape(6, ims.ROWS)
                    for n in ("IF", "BF")], axis=-1)
    eol = subsampling.subsample(end, REAL_SEGMENT_RATE_HZ, ims.SAMPLE_RATE_HZ, axis=1).astype(np.float32)
    table = pd.read_csv(root / "derived_features" / "ChoCho66_test1_timefeatures.csv", index_col=0)
    if len(table) != synthetic.FULL_FILES:
        raise ValueError(f"{root}/derived_features/ChoCho66_test1_timefeatures.csv: {len(table)} rows, "
                         f"expected {synthetic.FULL_FILES}")
    feats = np.zeros((len(table), 8, 3))
    for ch in range(8):
        p = f"B{ch // 2 + 1}_{'xy'[ch % 2]}_"
        rms, std = table[p + "rms"].to_numpy(), table[p + "std"].to_numpy()
        feats[:, ch, 0] = -np.sqrt(np.maximum(rms * rms - std * std, 0.0))
        feats[:, ch, 1] = table[p + "skew"].to_numpy()
        feats[:, ch, 2] = table[p + "kurtosis"].to_numpy()
    n = synthetic.FULL_FILES
    out = Path(out)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, healthy_2khz=healthy, healthy_index=np.arange(len(files)), eol_2khz=eol,
                        eol_index=np.arange(n - 6, n), file_features=feats)
    os.replace(tmp, out)
    return out


# -- the whole evaluation ---------------------------------------------------------------------------------

def evaluate(config: QualityConfig = QualityConfig(), log=print) -> pd.DataFrame:
    """Every source, rate, bearing, forest size and model: one row each (QualityRow's fields)."""
    rows: list[QualityRow] = []
    t0 = time.perf_counter()
    for rate, windows in synthetic_windows(config.n_files, config.rates, config.bearings).items():
        rows += evaluate_windows(windows, "synthetic", config, heldout=(settings.TRAIN_FRACTION,
                                                                         synthetic.DEFECT_ONSET))
        log(f"detection quality: synthetic {rate} Hz done ({time.perf_counter() - t0:.1f} s)")
    if config.real:
        excerpt = real_excerpt()
        real_cfg = QualityConfig(**{**asdict(config), "bearings": tuple(b for b in config.bearings
                                                                        if b in FAILING_BEARINGS)})
        for rate in config.rates:
            rows += evaluate_windows(real_segment_windows(rate, excerpt), "ims-real-segments", real_cfg,
                                     lead_time=False)
        rows += evaluate_windows(real_file_windows(excerpt), "ims-real-files", config)
        log(f"detection quality: real IMS done ({time.perf_counter() - t0:.1f} s)")
    return to_frame(rows)


def to_frame(rows: Iterable[QualityRow]) -> pd.DataFrame:
    """Rows as a DataFrame (extra flattened)."""
    records = []
    for r in rows:
        d = asdict(r)
        d.update(d.pop("extra"))
        records.append(d)
    return pd.DataFrame.from_records(records)


def write_frame(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """CSV, atomically."""
    path = Path(path)
    atomic_write(path, df.to_csv(index=False), mode=0o644)  # a published result: readable by all
    return path


def default_path() -> Path:
    return settings.data_dir() / "report" / "detection_quality.csv"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=synthetic.FULL_FILES, help="synthetic files (of 2,156)")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--build-real-excerpt", metavar="IMS_DIR",
                    help="rebuild the packaged real excerpt from a copy of the IMS data, then exit")
    ap.add_argument("--build-per-file-tables", metavar="IMS_DIR",
                    help="rebuild the packaged per-file feature tables of IMS sets 1 and 2, then exit")
    ap.add_argument("--detection", action="store_true",
                    help="judge the feature sets on whole lives (thresholds, alarms) "
                    "and write data/bench/detection.json")
    ap.add_argument("--recording", metavar="SPEC", action="append", default=[],
                    help="judge detection on this recording spec (its [labels] say which units fail and when) "
                    "instead of the built-in sources; repeatable; implies --detection")
    ap.add_argument("--train-fraction", type=float, default=DetectionConfig.train_fraction,
                    help="share of each recording's windows, from its start, that trains the models")
    ap.add_argument("--target-fa", type=float, default=DetectionConfig.target_fa,
                    help="window false-alarm rate the thresholds are calibrated for")
    ap.add_argument("--alarm-span-s", type=float, default=None,
                    help="the alarm rule's span in seconds (default: the device's 600 s, or 6 snapshot intervals)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the detection records (JSON)")
    args = ap.parse_args(argv)
    if args.build_real_excerpt:
        out = resources.files("tinyml_dagster").joinpath(REAL_EXCERPT)
        print(build_real_excerpt(args.build_real_excerpt, Path(str(out))))
        return
    if args.build_per_file_tables:
        out = resources.files("tinyml_dagster").joinpath(PER_FILE_TABLES)
        print(build_per_file_tables(args.build_per_file_tables, Path(str(out))))
        return
    if args.detection or args.recording:
        sources = tuple(RECORDING + str(spec) for spec in args.recording) or DetectionConfig.sources
        try:
            records = detection_records(DetectionConfig(
                synthetic_files=args.files, sklearn=not args.no_sklearn, sources=sources,
                train_fraction=args.train_fraction, target_fa=args.target_fa, alarm_span_s=args.alarm_span_s))
        except (ValueError, OSError) as e:
            ap.exit(2, f"error: {e}\n")
        for model in ("firmware", "sklearn"):
            table = detection_table(records, model)
            if len(table):
                print(f"model: {model}")
                print(table.to_string(index=False))
        print(f"wrote {write_detection(records, args.out)}")
        return
    df = evaluate(QualityConfig(n_files=args.files, sklearn=not args.no_sklearn, real=not args.no_real))
    print(df.to_string(max_rows=40))
    print(f"wrote {write_frame(df, default_path())}")


# -- whole-life detection per feature set: thresholds, alarms, lead times -------------------------------------

PER_FILE_TABLES = "data/ims_per_file_features.npz"
PER_FILE_COLUMNS = ("std", "skew", "kurtosis", "crest", "rms")
# the "wear" set's time-domain features, the part of it a per-file table of the 20 kHz signal can give
WEAR_TIME_DOMAIN = ("log_rms", "crest", "skewness", "kurtosis")
# the alarm rule of every source; its span from alarm_span_s unless DetectionConfig.alarm_span_s gives one
ALARM_RULE = {"raise_fraction": 0.5, "clear_fraction": 0.1, "min_windows": 4}
SNAPSHOTS_PER_SPAN = 6
RECORDING = "recording:"  # a source "recording:<spec.toml>": a user's recording, labelled in the spec's [labels]


@dataclass(frozen=True)
class BearingLabels:
    """What is known of one bearing: does it fail, from which file it is degraded, at which file it failed."""

    failing: bool
    onset: int | None = None
    failure: int | None = None


# published labels (PROVENANCE.md of the IMS copy): set 1 bearing 3 degraded from file ~1,800, failed ~2,100;
# bearing 4 degraded from ~1,400, failed ~1,850. Set 2 bearing 1 (outer race): the literature puts the onset near
# file 530 of 984; the per-file RMS of its channel is flat (0.076-0.079) to file ~520 and rises from ~530 (0.083 at
# 540, 0.089 at 560), so 530 is used; files 982-983 were recorded after the rig stopped (RMS ~0.002): the life
# ends at 981, the failure. Set 1 starts with a run-in (bearing 3's log RMS rises ~0.08 decade over its first
# ~180 files, then holds): the labels call it healthy and so does this evaluation; it lies in the training quarter,
# where the cross-fitted calibration sees it as one of its blocks of time.
IMS_LABELS: dict[str, dict[int, BearingLabels]] = {
    "ims-set1-files": {1: BearingLabels(False), 2: BearingLabels(False), 3: BearingLabels(True, 1800, 2100),
                       4: BearingLabels(True, 1400, 1850)},
    "ims-set2-files": {1: BearingLabels(True, 530, 981), 2: BearingLabels(False), 3: BearingLabels(False),
                       4: BearingLabels(False)},
}
IMS_SET2_FILES = 982


def recording_onset(labels: dict[int, BearingLabels]) -> int | None:
    """The first file of a recording with any bearing labelled degraded: its healthy part ends there.

    The bearings share one shaft and housing, so every channel sees a degrading bearing's vibration; after the
    first onset no channel of the recording is healthy (a non-failing bearing's windows then count neither as
    healthy nor as degraded)."""
    onsets = [lab.onset for lab in labels.values() if lab.failing and lab.onset is not None]
    return min(onsets) if onsets else None


@dataclass(frozen=True)
class DetectionConfig:
    """How detection is judged: training split, model, threshold, alarm rule, sources."""

    train_fraction: float = 0.25  # the first quarter of a recording's windows trains the models (healthy everywhere)
    target_fa: float = 0.002  # training.TARGET_FA: each model's calibrated threshold
    n_trees: int = 50
    psi: int = PSI
    seed: int = 0
    alarm_span_s: float | None = None  # None: alarm_span_s of each recording
    alarm: tuple = tuple(ALARM_RULE.items())
    synthetic_files: int = synthetic.FULL_FILES
    sklearn: bool = True
    sources: tuple[str, ...] = ("synthetic-2khz", "ims-set1-files", "ims-set2-files", "ims-set1-raw-2khz")


@dataclass
class Channel:
    """The windows of one bearing of one source, in time order: time (s), file index, features per set."""

    source: str
    bearing: int
    labels: BearingLabels
    t: np.ndarray
    file: np.ndarray
    features: dict[str, np.ndarray]
    note: str = ""
    healthy_until: int | None = None  # the first file of the recording with any bearing labelled degraded
    train_until_s: float | None = None  # the training windows' end (s from the start); None: training_windows
    lead_time: bool = True  # False when the recording holds nothing between its healthy and its failed files


def alarm_span_s(ch: Channel) -> float:
    """The alarm rule's span for a recording: the device's default (firmware/alarms.py), or longer where its
    snapshots are sparse, so that the span holds SNAPSHOTS_PER_SPAN of them (snapshots 10 min apart: one hour)."""
    from firmware.alarms import DEFAULTS

    starts = ch.t[np.unique(ch.file, return_index=True)[1]]
    gaps = np.diff(starts)
    return float(max(DEFAULTS["span_s"], SNAPSHOTS_PER_SPAN * np.median(gaps) if len(gaps) else 0.0))


def per_file_tables() -> dict[str, np.ndarray]:
    """The packaged per-file feature tables of IMS sets 1 and 2 (see build_per_file_tables)."""
    ref = resources.files("tinyml_dagster").joinpath(PER_FILE_TABLES)
    with resources.as_file(ref) as path, np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def build_per_file_tables(shared_ims: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Package the per-file features of IMS sets 1 and 2 (derived_features/ChoCho66_test{1,2}_timefeatures.csv):
    (files, channels, PER_FILE_COLUMNS) float32 and the files' times; set 2 without its 2 after-stop files."""
    root = Path(shared_ims) / "derived_features"
    arrays = {}
    for key, name, channels, n in (("set1", "ChoCho66_test1_timefeatures.csv",
                                    [f"B{c // 2 + 1}_{'xy'[c % 2]}_" for c in range(8)], synthetic.FULL_FILES),
                                   ("set2", "ChoCho66_test2_timefeatures.csv",
                                    [f"B{c + 1}_" for c in range(4)], IMS_SET2_FILES)):
        table = pd.read_csv(root / name, index_col=0)
        if len(table) < n:
            raise ValueError(f"{root / name}: {len(table)} rows, expected at least {n}")
        table = table.iloc[:n]
        arrays[key] = np.stack([np.stack([table[p + c].to_numpy(np.float64) for c in PER_FILE_COLUMNS], axis=-1)
                                for p in channels], axis=1).astype(np.float32)
        arrays[key + "_time"] = pd.to_datetime(table.index).to_numpy("datetime64[s]").astype(np.int64)
    out = Path(out)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    return out


def _per_file_sets(cols: np.ndarray) -> dict[str, np.ndarray]:
    """Paper and wear (time-domain part) features from per-file columns (..., PER_FILE_COLUMNS)."""
    std, skew, kurt, crest, rms = (cols[..., i].astype(np.float64) for i in range(len(PER_FILE_COLUMNS)))
    mean = -np.sqrt(np.maximum(rms * rms - std * std, 0.0))  # the table keeps mean |x|; the offset is negative
    return {"paper": np.stack([mean, skew, kurt], axis=-1),
            "wear": np.stack([np.log10(np.maximum(std, 1e-12)), crest, skew, kurt], axis=-1)}


def ims_file_channels(source: str, tables: dict[str, np.ndarray] | None = None) -> list[Channel]:
    """One Channel per bearing of IMS set 1 or 2 from the per-file tables (one window per file and axis)."""
    tables = tables if tables is not None else per_file_tables()
    key = {"ims-set1-files": "set1", "ims-set2-files": "set2"}[source]
    data, times = tables[key], tables[key + "_time"].astype(np.float64)
    axes = 2 if data.shape[1] == 8 else 1
    out = []
    for bearing, labels in IMS_LABELS[source].items():
        cols = data[:, (bearing - 1) * axes:bearing * axes, :]  # (files, axes, columns)
        feats = {k: v.reshape(-1, v.shape[-1]) for k, v in _per_file_sets(cols).items()}
        files = np.repeat(np.arange(len(data)), axes)
        out.append(Channel(source, bearing, labels, times[files] - times[0], files, feats,
                           "per-file features of the raw 20 kHz signal (1-s files); wear: its time-domain part "
                           "(log_rms, crest, skewness, kurtosis), no bands", recording_onset(IMS_LABELS[source])))
    return out


def synthetic_channels(n_files: int, rate_hz: int = settings.DEFAULT_RATE_HZ, chunk: int = 64,
                       seed: int = synthetic.DEFAULT_SEED) -> list[Channel]:
    """One Channel per bearing of the synthetic run, subsampled to rate_hz and windowed as the device does."""
    from tinyml_dagster.features import FEATURE_SETS, window_length

    index = synthetic.schedule(n_files)
    stamps = np.array(synthetic.set1_timestamps(), dtype="datetime64[s]").astype(np.int64)[index].astype(float)
    window = window_length(rate_hz)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in FEATURE_SETS}
    for lo in range(0, len(index), chunk):
        raw = np.stack([synthetic.synthesize_file(i, seed) for i in index[lo:lo + chunk]])
        # (files, n, 8)
        x = subsampling.subsample_many(raw, (rate_hz,), ims.SAMPLE_RATE_HZ, axis=1)[rate_hz].astype(np.float64)
        x = np.moveaxis(x, 1, -1)  # (files, 8, n)
        for name, fs in FEATURE_SETS.items():
            parts[name].append(fs.compute(x, window))  # (files, 8, windows, d)
    feats = {k: np.concatenate(v) for k, v in parts.items()}
    n_win = feats["paper"].shape[2]
    life = life_fractions(stamps.astype("datetime64[s]"))
    onset = int(np.argmax(life >= synthetic.DEFECT_ONSET))
    out = []
    for bearing in settings.BEARINGS:
        cols = [2 * (bearing - 1), 2 * (bearing - 1) + 1]
        # windows in time order: file, window, axis
        per = {k: np.transpose(v[:, cols], (0, 2, 1, 3)).reshape(-1, v.shape[-1]) for k, v in feats.items()}
        files = np.repeat(np.arange(len(index)), n_win * 2)
        t = stamps[files] - stamps[0] + np.tile(np.repeat(np.arange(n_win) * WINDOW_S, 2), len(index))
        labels = BearingLabels(True, onset, len(index) - 1) if bearing in FAILING_BEARINGS else BearingLabels(False)
        out.append(Channel("synthetic-2khz", bearing, labels, t, files, per,
                           f"synthetic set-1-like run, {rate_hz} Hz, the device's feature extraction (numpy twin)",
                           onset))
    return out


RAW_SOURCE = "ims-set1-raw-2khz"


def raw_segment_channels(excerpt: dict[str, np.ndarray] | None = None) -> list[Channel]:
    """Bearings 3 and 4 (x axis) of the real raw files at 2 kHz through the device's feature extraction: the first 50
    files of set 1 (healthy, 4.6 h of run-in) and its last 6 (both bearings failed), nothing in between. The first
    half of the healthy files trains, the other half is the held-out healthy part; no lead time (the gap)."""
    from tinyml_dagster.features import FEATURE_SETS, window_length

    ex = excerpt if excerpt is not None else real_excerpt()
    stamps = np.array(synthetic.set1_timestamps(), dtype="datetime64[s]").astype(np.int64).astype(float)
    idx = np.concatenate([ex["healthy_index"], ex["eol_index"]]).astype(int)
    x = np.concatenate([ex["healthy_2khz"], ex["eol_2khz"]]).astype(np.float64)  # (files, samples, b3x/b4x)
    window = window_length(REAL_SEGMENT_RATE_HZ)
    labels = IMS_LABELS["ims-set1-files"]
    out = []
    for col, bearing in enumerate((3, 4)):
        feats = {name: fs.compute(x[:, :, col], window) for name, fs in FEATURE_SETS.items()}  # (files, win, d)
        n_win = feats["paper"].shape[1]
        files = np.repeat(idx, n_win)
        t = stamps[files] - stamps[0] + np.tile(np.arange(n_win) * WINDOW_S, len(idx))
        half = stamps[ex["healthy_index"][len(ex["healthy_index"]) // 2]] - stamps[0]
        out.append(Channel(RAW_SOURCE, bearing, labels[bearing], t, files,
                           {k: v.reshape(-1, v.shape[-1]) for k, v in feats.items()},
                           "real raw 20 kHz files subsampled to 2 kHz, the device's feature extraction (numpy twin): "
                           "the first 50 files (healthy) and the last 6 (failed) of set 1",
                           recording_onset(labels), train_until_s=float(half), lead_time=False))
    return out


def recording_channels(spec_path: str | os.PathLike) -> list[Channel]:
    """One Channel per monitored unit of a user's recording (a recording spec, tinyml_dagster.recordings), resampled
    to the device's rate and windowed as the device does; labels from the spec file's [labels] table."""
    import tomllib

    from tinyml_dagster import recordings
    from tinyml_dagster.features import FEATURE_SETS, feature_windows_frame
    from tinyml_dagster.recordings.spec import device_rate, window_ms

    spec = recordings.load_spec(spec_path)
    rec = recordings.open_recording(spec)
    units = recordings.monitored_units(spec, rec.channels)
    rate = device_rate(spec)
    group = subsampling.snapshots_per_window(rec.snapshot_samples, rec.rate_hz, spec.window_s)
    signals, stamps = subsampling.subsample_recording(rec, (rate,), spec.window_s)
    labels = recording_labels(tomllib.loads(Path(spec_path).read_text()).get("labels", {}), units, rec.timestamps,
                              group, len(stamps), f"{spec_path}: [labels]")
    out = []
    for k, unit in enumerate(units, start=1):
        axes = [(name, rec.channels.index(name)) for name in unit]
        feats = {}
        for name, fs in FEATURE_SETS.items():
            frame = feature_windows_frame(signals[rate], stamps, rate, k, axes=axes, window_ms=window_ms(spec),
                                          feature_set=name)  # every set's frame has the same rows, in time order
            feats[name] = frame[list(fs.names)].to_numpy(np.float64)
        t = (frame.timestamp.to_numpy() - np.datetime64(stamps[0], "ns")) / np.timedelta64(1, "s")
        out.append(Channel(f"{RECORDING}{Path(spec_path).stem}", k, labels[k], t.astype(np.float64),
                           frame.file_index.to_numpy(), feats,
                           f"unit {'+'.join(unit)}: {rec.format} recording at {rec.rate_hz:g} Hz, the device's "
                           f"feature extraction at {rate} Hz", recording_onset(labels)))
    return out


def recording_labels(table: dict, units: list[tuple[str, ...]], snapshot_times: np.ndarray, group: int,
                     n_groups: int, where: str) -> dict[int, BearingLabels]:
    """Labels per unit (1-based) from a spec's [labels] table: "unit" = {onset = ..., failure = ...}, each a
    snapshot index (0-based, in time order) or a time (the first snapshot at or after it); units not in it never
    fail. A label falls in the window group holding its snapshot. ValueError naming what is wrong."""
    names = ["+".join(u) for u in units]
    if not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table of units, got {table!r}")
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ValueError(f"{where}: {', '.join(map(repr, unknown))}: not a monitored unit ({', '.join(names)})")
    times = np.asarray(snapshot_times, dtype="datetime64[ns]")

    def group_of(value, key: str, unit: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str, datetime)):
            raise ValueError(f"{where}: {unit}.{key}: {value!r} is neither a snapshot index nor a time")
        if isinstance(value, int):
            if not 0 <= value < len(times):
                raise ValueError(f"{where}: {unit}.{key}: snapshot {value} is not in 0..{len(times) - 1}")
            snapshot = value
        else:
            try:
                when = np.datetime64(value.replace(tzinfo=None) if isinstance(value, datetime) else value, "ns")
            except ValueError:
                raise ValueError(f"{where}: {unit}.{key}: {value!r} is not an ISO time") from None
            snapshot = int(np.searchsorted(times, when))
            if snapshot >= len(times):
                raise ValueError(f"{where}: {unit}.{key}: {value} is after the recording's last snapshot "
                                 f"({times[-1]})")
        return min(snapshot // group, n_groups - 1)  # a last incomplete group is dropped: its snapshots go back one

    labels = {}
    for k, unit in enumerate(names, start=1):
        entry = table.get(unit)
        if entry is None:
            labels[k] = BearingLabels(False)
            continue
        if not isinstance(entry, dict) or "onset" not in entry or set(entry) - {"onset", "failure"}:
            raise ValueError(f"{where}: {unit}: give {{onset = ..., failure = ...}} (failure optional: the last "
                             f"snapshot), each a snapshot index or a time; got {entry!r}")
        onset = group_of(entry["onset"], "onset", unit)
        failure = group_of(entry["failure"], "failure", unit) if "failure" in entry else n_groups - 1
        if failure < onset:
            raise ValueError(f"{where}: {unit}: failure ({entry.get('failure')}) comes before onset ({entry['onset']})")
        labels[k] = BearingLabels(True, onset, failure)
    return labels


def span_score(t: np.ndarray, scores: np.ndarray, span_s: float, fraction: float) -> np.ndarray:
    """Per window, the score the k-of-n rule acts on: the k-th highest window score of the last span_s seconds
    (k = ceil(fraction * n) of its n windows). At least k of n windows are anomalous exactly when it exceeds the
    threshold, so it is the rule's smoothed score (exact windows here; the device counts in BUCKETS buckets)."""
    t = np.asarray(t, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    left = np.searchsorted(t, t - span_s, side="right")
    out = np.empty(len(s))
    for i in range(len(s)):
        w = s[left[i]:i + 1]
        k = max(1, int(np.ceil(fraction * len(w))))
        out[i] = np.partition(w, len(w) - k)[len(w) - k]
    return out


def _scores(model: str, X_train: np.ndarray, X: np.ndarray, cfg: DetectionConfig, seed: int) -> np.ndarray:
    return model_scores(X_train, X, (cfg.n_trees,), 0, seed, model, cfg.psi)[:, 0]


def judge(ch: Channel, feature_set: str, model: str, cfg: DetectionConfig, threshold_mode: str) -> dict:
    """One record: a model of one feature set on one channel, with its threshold and the alarm rule."""
    from firmware.alarms import AlarmRule
    from tinyml_dagster.training import THRESHOLD, calibrated_threshold, crossfit_scores

    X = ch.features[feature_set]
    train = training_windows(ch, cfg.train_fraction)
    seed = model_seed(cfg.seed, ch.bearing, cfg.n_trees)
    s = _scores(model, X[train], X, cfg, seed)
    if threshold_mode == "paper-0.6":
        thr = THRESHOLD
    else:
        def held_out(X_fit: np.ndarray, X_block: np.ndarray, k: int) -> np.ndarray:
            return _scores(model, X_fit, X_block, cfg, seed + 7919 * (k + 1))

        thr = calibrated_threshold(crossfit_scores(X[train], held_out), cfg.target_fa)
    anomalous = s > thr
    lab = ch.labels
    healthy = ch.file < ch.healthy_until if ch.healthy_until is not None else np.ones(len(s), bool)
    heldout = healthy & ~train
    degraded = ch.file >= lab.onset if lab.failing else np.zeros(len(s), bool)
    alarm = {**dict(cfg.alarm), "span_s": cfg.alarm_span_s or alarm_span_s(ch)}
    rule = AlarmRule(alarm)
    raises = [i for i in range(len(s)) if rule.push(float(ch.t[i]), float(s[i]), bool(anomalous[i])) == "raised"]
    smooth = span_score(ch.t, s, alarm["span_s"], alarm["raise_fraction"])
    monitored = np.array([i for i in raises if not train[i]], dtype=int)
    in_healthy = [i for i in monitored if healthy[i]]
    # after the recording's first onset, before this bearing's own (or on a bearing that never fails): neither
    # healthy nor degraded by the labels, though the machine is degrading
    unlabelled = [i for i in monitored if not healthy[i] and not degraded[i]]
    healthy_days = (ch.t[heldout].max() - ch.t[heldout].min()) / 86400.0 if heldout.sum() > 1 else 0.0
    rec = {"source": ch.source, "bearing": ch.bearing, "feature_set": feature_set, "model": model,
           "threshold_mode": threshold_mode, "features": list(_feature_names(feature_set, ch)),
           "failing": lab.failing, "threshold": round(float(thr), 4), "healthy_until_file": ch.healthy_until,
           "alarm_span_s": alarm["span_s"],
           "n_train": int(train.sum()), "n_heldout_healthy": int(heldout.sum()), "n_degraded": int(degraded.sum()),
           "auc": roc_auc(smooth[heldout], smooth[degraded]) if lab.failing else None,
           "auc_window": roc_auc(s[heldout], s[degraded]) if lab.failing else None,
           "fa_rate_heldout": float(anomalous[heldout].mean()) if heldout.any() else None,
           "fa_rate_heldout_ci95": rate_interval(int(anomalous[heldout].sum()), int(heldout.sum())),
           "target_fa": cfg.target_fa if threshold_mode == "calibrated" else None,
           "heldout_drift": healthy_drift(X, train, heldout, _feature_names(feature_set, ch)),
           "alarms_in_healthy": len(in_healthy), "alarms_after_recording_onset": len(unlabelled),
           "alarms_per_healthy_day": round(len(in_healthy) / healthy_days, 3) if healthy_days else None,
           "lead_time_measured": bool(lab.failing and ch.lead_time),
           "first_alarm_h_before_failure": None, "first_alarm_h_after_onset": None, "note": ch.note}
    if lab.failing and ch.lead_time:
        t_onset = ch.t[np.argmax(ch.file >= lab.onset)]
        t_fail = ch.t[np.argmax(ch.file >= lab.failure)]
        after = [i for i in monitored if ch.t[i] >= t_onset]
        if after:
            rec["first_alarm_h_before_failure"] = round(float(t_fail - ch.t[after[0]]) / 3600.0, 1)
            rec["first_alarm_h_after_onset"] = round(float(ch.t[after[0]] - t_onset) / 3600.0, 1)
    return rec


def healthy_drift(X: np.ndarray, train: np.ndarray, heldout: np.ndarray, names: Sequence[str]) -> dict:
    """Per feature: [median, 99th percentile] of the training windows, then of the held-out healthy ones; how far a
    healthy part moves after the training windows (where held-out false alarms come from)."""
    if not heldout.any():
        return {}
    q = [np.quantile(X[m], [0.5, 0.99], axis=0) for m in (train, heldout)]
    return {name: [round(float(q[0][0, j]), 3), round(float(q[0][1, j]), 3),
                   round(float(q[1][0, j]), 3), round(float(q[1][1, j]), 3)] for j, name in enumerate(names)}


def training_windows(ch: Channel, train_fraction: float) -> np.ndarray:
    """Mask of the windows a model trains on: the first train_fraction of the channel's windows (in time order),
    or those before ch.train_until_s; ValueError if any lies past the recording's healthy part."""
    if ch.train_until_s is not None:
        train = ch.t < ch.train_until_s
    else:
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        train = np.arange(len(ch.t)) < int(train_fraction * len(ch.t))
    if ch.healthy_until is not None and (ch.file[train] >= ch.healthy_until).any():
        raise ValueError(f"{ch.source} bearing {ch.bearing}: training windows reach file {ch.file[train].max()}, "
                         f"past the healthy part (before file {ch.healthy_until}); lower train_fraction")
    return train


def _feature_names(feature_set: str, ch: Channel) -> tuple[str, ...]:
    from tinyml_dagster.features import feature_set as fs

    names = fs(feature_set).names
    return names if ch.features[feature_set].shape[1] == len(names) else WEAR_TIME_DOMAIN


def detection_records(cfg: DetectionConfig = DetectionConfig(), log=print) -> list[dict]:
    """Every source, bearing, feature set, model and threshold mode: one record each."""
    t0 = time.perf_counter()
    channels: list[Channel] = []
    for source in cfg.sources:
        if source == "synthetic-2khz":
            channels += synthetic_channels(cfg.synthetic_files)
        elif source in IMS_LABELS:
            channels += ims_file_channels(source)
        elif source == RAW_SOURCE:
            channels += raw_segment_channels()
        elif source.startswith(RECORDING):
            channels += recording_channels(source[len(RECORDING):])
        else:
            raise ValueError(f"unknown source {source!r}: one of synthetic-2khz, {', '.join(IMS_LABELS)}, "
                             f"{RAW_SOURCE}, {RECORDING}<spec.toml>")
        log(f"detection: {source} features ready ({time.perf_counter() - t0:.1f} s)")
    records = []
    models = MODELS if cfg.sklearn else MODELS[:1]
    for ch in channels:
        for feature_set in ch.features:
            modes = ("calibrated", "paper-0.6") if feature_set == "paper" else ("calibrated",)
            for model in models:
                for mode in modes:
                    records.append(judge(ch, feature_set, model, cfg, mode))
    log(f"detection: {len(records)} records ({time.perf_counter() - t0:.1f} s)")
    return records


def write_detection(records: list[dict], path: str | os.PathLike | None = None) -> Path:
    """data/bench/detection.json: {"default_feature_set": NAME, "records": [...]} (atomically)."""
    import json

    from tinyml_dagster.features import DEFAULT_FEATURE_SET

    path = Path(path) if path is not None else settings.bench_dir() / "detection.json"
    doc = {"default_feature_set": DEFAULT_FEATURE_SET, "records": records}
    atomic_write(path, json.dumps(doc, indent=1), mode=0o644)
    return path


def detection_table(records: list[dict], model: str = "firmware") -> pd.DataFrame:
    """The records of one model as a table, one row per source, bearing, feature set and threshold mode."""
    cols = ["source", "bearing", "feature_set", "threshold_mode", "failing", "threshold", "auc", "auc_window",
            "fa_rate_heldout", "fa_rate_heldout_ci95", "alarms_in_healthy", "alarms_after_recording_onset",
            "alarms_per_healthy_day", "first_alarm_h_before_failure", "first_alarm_h_after_onset"]
    df = pd.DataFrame([r for r in records if r["model"] == model])
    return df[cols] if len(df) else df


if __name__ == "__main__":
    main()
