"""Vectorised numpy twin of firmware/features.py, the feature-window table, and its Parquet store."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from firmware import feature_sets as _sets
from firmware import features as _fw
from firmware import features_wear as _wear
from tinyml_dagster import settings

FEATURE_NAMES: tuple[str, ...] = tuple(_fw.FEATURE_NAMES)
WINDOW_MS: int = settings.WINDOW_MS  # the firmware's 500 ms unless a recording spec sets window_s
window_length = _fw.window_length

SCHEMA = pa.schema(
    [
        ("timestamp", pa.timestamp("ns")),
        ("file_index", pa.int64()),
        ("window_index", pa.int64()),
        ("bearing", pa.int64()),
        ("axis", pa.string()),
        ("rate_hz", pa.int64()),
        ("life_fraction", pa.float64()),
        ("split", pa.string()),
        ("mean", pa.float64()),
        ("skewness", pa.float64()),
        ("kurtosis", pa.float64()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


def window_features_np(x: np.ndarray, window: int) -> np.ndarray:
    """Features of every complete window along the last axis: shape (..., n_windows, 3), as firmware computes."""
    x = np.asarray(x, dtype=np.float64)
    n_windows = x.shape[-1] // window
    if n_windows < 1:
        raise ValueError(f"signal of {x.shape[-1]} samples holds no window of {window}")
    w = x[..., : n_windows * window].reshape(*x.shape[:-1], n_windows, window)
    mean = w.mean(axis=-1)
    d = w - mean[..., None]
    d2 = d * d
    m2 = d2.mean(axis=-1)
    m3 = (d2 * d).mean(axis=-1)
    m4 = (d2 * d2).mean(axis=-1)
    flat = (m2 <= _fw._FLAT * mean * mean) | (m2 == 0.0)
    safe = np.where(flat, 1.0, m2)
    skew = np.where(flat, 0.0, m3 / (safe * np.sqrt(safe)))
    kurt = np.where(flat, 0.0, m4 / (safe * safe) - 3.0)
    return np.stack([mean, skew, kurt], axis=-1)


def bearing_channels(n_channels: int, bearing: int) -> list[tuple[str, int]]:
    """(axis, column) pairs of a bearing: set 1 has x and y per bearing (8 columns), sets 2-3 one column each."""
    if n_channels == 8:
        return [("x", 2 * (bearing - 1)), ("y", 2 * (bearing - 1) + 1)]
    if n_channels == 4:
        return [("x", bearing - 1)]
    raise ValueError(f"no bearing layout for {n_channels} channels")


def life_fractions(timestamps: np.ndarray) -> np.ndarray:
    """Fraction of useful life of each file, from its timestamp: 0 at the first file, 1 at the last."""
    t = np.asarray(timestamps, dtype="datetime64[ns]").astype(np.int64).astype(np.float64)
    span = t[-1] - t[0] if len(t) else 0.0
    return np.zeros(len(t)) if span <= 0 else (t - t[0]) / span


def feature_windows_frame(
    signals: np.ndarray, timestamps: np.ndarray, rate_hz: int, bearing: int,
    axes: list[tuple[str, int]] | None = None, window_ms: int | None = None, feature_set: str = "paper",
) -> pd.DataFrame:
    """One row per (file, axis, window) of a bearing, from signals shaped (n_files, n_samples, n_channels); the
    feature columns are those of the feature set.

    axes: the bearing's (axis name, column) pairs (default: the IMS layout); window_ms: default WINDOW_MS.
    """
    names = feature_set_of(feature_set).names
    n_files, _, n_channels = signals.shape
    window_ms = window_ms or WINDOW_MS
    window = window_length(rate_hz, window_ms)
    life = life_fractions(timestamps)
    ts = np.asarray(timestamps, dtype="datetime64[ns]")
    parts = []
    for axis, col in axes or bearing_channels(n_channels, bearing):
        feats = feature_set_of(feature_set).compute(np.asarray(signals[:, :, col]), window)  # (files, windows, d)
        n_windows = feats.shape[1]
        file_index = np.repeat(np.arange(n_files), n_windows)
        window_index = np.tile(np.arange(n_windows), n_files)
        offset = (window_index * window_ms).astype("timedelta64[ms]").astype("timedelta64[ns]")
        frame = pd.DataFrame(
            {
                "timestamp": ts[file_index] + offset,
                "file_index": file_index.astype(np.int64),
                "window_index": window_index.astype(np.int64),
                "bearing": np.int64(bearing),
                "axis": axis,
                "rate_hz": np.int64(rate_hz),
                "life_fraction": life[file_index],
                "split": np.where(life[file_index] < settings.TRAIN_FRACTION, "train", "test"),
                **{name: feats[..., k].ravel() for k, name in enumerate(names)},
            }
        )
        parts.append(frame)
    df = pd.concat(parts, ignore_index=True)
    return df.sort_values(["file_index", "window_index", "axis"], kind="stable").reset_index(drop=True)


def schema_of(feature_set: str = "paper") -> pa.Schema:
    """The Parquet schema of a feature set's windows: SCHEMA's window columns, then the set's features."""
    if feature_set == "paper":
        return SCHEMA
    base = [f for f in SCHEMA if f.name not in FEATURE_NAMES]
    return pa.schema(base + [(name, pa.float64()) for name in feature_set_of(feature_set).names])


def feature_windows_path(rate_hz: int, bearing: int, feature_set: str = "paper", root: Path | None = None) -> Path:
    """The paper's windows at settings.feature_path; another set's in features/rate=<hz>/set=<name>/."""
    if feature_set == "paper":
        return settings.feature_path(rate_hz, bearing, root)
    feature_set_of(feature_set)
    return (
        settings.features_dir(root) / f"rate={int(rate_hz)}" / f"set={feature_set}" / f"bearing={int(bearing)}.parquet"
    )


def write_feature_windows(df: pd.DataFrame, path: Path, feature_set: str = "paper") -> Path:
    """Write a feature-window table to Parquet atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema_of(feature_set)
    table = pa.Table.from_pandas(df[list(schema.names)], schema=schema, preserve_index=False)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_feature_windows(
    rate_hz: int, bearing: int | None = None, data_dir: str | os.PathLike | None = None, feature_set: str = "paper"
) -> pd.DataFrame:
    """Feature windows of one rate (and one bearing, or all materialised bearings), as written by `feature_windows`."""
    root = Path(data_dir) if data_dir is not None else settings.data_dir()
    if bearing is not None:
        paths = [feature_windows_path(rate_hz, bearing, feature_set, root)]
    else:
        paths = sorted(feature_windows_path(rate_hz, 0, feature_set, root).parent.glob("bearing=*.parquet"))
    missing = [str(p) for p in paths if not p.exists()]
    if not paths or missing:
        raise FileNotFoundError(
            f"no feature windows for rate {rate_hz} Hz"
            + (f", bearing {bearing}" if bearing is not None else "")
            + f" under {settings.features_dir(root)}: materialize the feature_windows asset first"
        )
    frames = [pq.read_table(p, schema=schema_of(feature_set)).to_pandas() for p in paths]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df.sort_values(["bearing", "file_index", "window_index", "axis"], kind="stable").reset_index(drop=True)


# -- feature sets -------------------------------------------------------------------------------------------

def wear_sums_np(x: np.ndarray, window: int, steps: int = _wear.STEPS) -> tuple[np.ndarray, np.ndarray]:
    """The "wear" set's scale and integer sums of every complete window, as the device forms them:
    shapes (..., n_windows) and (..., n_windows, 9).

    Samples are rounded to float32 first (what the device's data UART carries); the mean is summed in sample order
    (as MicroPython's sum()), so the integer steps, and hence every sum, are the device's exactly.
    """
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    n_windows = x.shape[-1] // window
    if n_windows < 1:
        raise ValueError(f"signal of {x.shape[-1]} samples holds no window of {window}")
    w = x[..., : n_windows * window].reshape(*x.shape[:-1], n_windows, window)
    head = w[..., : window >> 3] if window >= 16 else w
    span = head.max(-1) - head.min(-1)
    scale = np.where(span > 0, steps / np.where(span > 0, span, 1.0), float(steps))
    c = np.trunc(np.cumsum(w, axis=-1)[..., -1] / window * scale).astype(np.int64)
    d = np.trunc(w * scale[..., None]).astype(np.int64) - c[..., None]
    a = d * d
    sums = np.stack([
        np.full(d.shape[:-1], window), d.sum(-1), a.sum(-1), (a * d).sum(-1), (a * a).sum(-1),
        np.minimum(d.min(-1), 0), np.maximum(d.max(-1), 0),
        (d[..., 1:] * d[..., :-1]).sum(-1), (d[..., 2:] * d[..., :-2]).sum(-1),
    ], axis=-1)
    return scale, sums


def wear_features_np(x: np.ndarray, window: int, params: dict | None = None) -> np.ndarray:
    """The "wear" set's features of every complete window, shape (..., n_windows, 7), as firmware computes them."""
    scale, sums = wear_sums_np(x, window, _wear.check_params(params)["steps"])
    rows = zip(sums.reshape(-1, sums.shape[-1]).tolist(), scale.ravel().tolist())
    out = np.array([_wear.from_sums(*row, sc) for row, sc in rows], dtype=np.float64)
    return out.reshape(*sums.shape[:-1], _wear.N_FEATURES)


def paper_features_np(x: np.ndarray, window: int, params: dict | None = None) -> np.ndarray:
    """The paper's set (mean, skewness, kurtosis) in the feature-set interface."""
    _fw.make_extractor(params)  # refuses parameters, like the device
    return window_features_np(x, window)


@dataclass(frozen=True)
class FeatureSet:
    """A named, versioned feature set: its firmware module, feature names, default parameters and numpy twin."""

    name: str
    version: int
    names: tuple[str, ...]
    params: dict
    module_file: str
    twin: Callable[[np.ndarray, int, dict | None], np.ndarray]

    def compute(self, x: np.ndarray, window: int, params: dict | None = None) -> np.ndarray:
        """Features of every complete window along the last axis: shape (..., n_windows, len(names))."""
        return self.twin(x, window, params)

    def config(self, params: dict | None = None) -> dict:
        """What a model's config.json says of its feature set (the device picks its extraction from it)."""
        return {"feature_set": self.name, "feature_set_version": self.version,
                "feature_params": _check_params(self.name, params)}

    def script(self) -> bytes:
        """The set's MicroPython module, as it travels in a package."""
        return (Path(_fw.__file__).parent / self.module_file).read_bytes()


def _check_params(name: str, params: dict | None) -> dict:
    """The set's parameters with defaults; ValueError naming a bad one (as the device would refuse them)."""
    mod = _sets.module(name)
    if hasattr(mod, "check_params"):
        return mod.check_params(params)
    mod.make_extractor(params)
    return dict(mod.PARAMS)


FEATURE_SETS: dict[str, FeatureSet] = {
    "paper": FeatureSet("paper", _fw.VERSION, tuple(_fw.FEATURE_NAMES), dict(_fw.PARAMS), "features.py",
                        paper_features_np),
    "wear": FeatureSet("wear", _wear.VERSION, tuple(_wear.FEATURE_NAMES), dict(_wear.PARAMS), "features_wear.py",
                       wear_features_np),
}
PAPER_FEATURE_SET = _sets.PAPER
DEFAULT_FEATURE_SET = _sets.DEFAULT


def feature_set(name: str) -> "FeatureSet":
    """A feature set by name; ValueError naming the known ones."""
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown feature set {name!r} (known: {', '.join(FEATURE_SETS)})") from None


feature_set_of = feature_set  # for the functions above whose parameter is named feature_set
