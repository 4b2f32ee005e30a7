"""Vectorised numpy twin of firmware/features.py, the feature-window table, and its Parquet store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from firmware import features as _fw
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
    axes: list[tuple[str, int]] | None = None, window_ms: int | None = None,
) -> pd.DataFrame:
    """One row per (file, axis, window) of a bearing, from signals shaped (n_files, n_samples, n_channels).

    axes: the bearing's (axis name, column) pairs (default: the IMS layout); window_ms: default WINDOW_MS.
    """
    n_files, _, n_channels = signals.shape
    window_ms = window_ms or WINDOW_MS
    window = window_length(rate_hz, window_ms)
    life = life_fractions(timestamps)
    ts = np.asarray(timestamps, dtype="datetime64[ns]")
    parts = []
    for axis, col in axes or bearing_channels(n_channels, bearing):
        feats = window_features_np(signals[:, :, col], window)  # (files, windows, 3)
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
                "mean": feats[..., 0].ravel(),
                "skewness": feats[..., 1].ravel(),
                "kurtosis": feats[..., 2].ravel(),
            }
        )
        parts.append(frame)
    df = pd.concat(parts, ignore_index=True)
    return df.sort_values(["file_index", "window_index", "axis"], kind="stable").reset_index(drop=True)


def write_feature_windows(df: pd.DataFrame, path: Path) -> Path:
    """Write a feature-window table to Parquet atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[list(COLUMNS)], schema=SCHEMA, preserve_index=False)
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
    rate_hz: int, bearing: int | None = None, data_dir: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Feature windows of one rate (and one bearing, or all materialised bearings), as written by `feature_windows`."""
    root = Path(data_dir) if data_dir is not None else settings.data_dir()
    if bearing is not None:
        paths = [settings.feature_path(rate_hz, bearing, root)]
    else:
        paths = sorted(settings.features_dir(root).joinpath(f"rate={int(rate_hz)}").glob("bearing=*.parquet"))
    missing = [str(p) for p in paths if not p.exists()]
    if not paths or missing:
        raise FileNotFoundError(
            f"no feature windows for rate {rate_hz} Hz"
            + (f", bearing {bearing}" if bearing is not None else "")
            + f" under {settings.features_dir(root)}: materialize the feature_windows asset first"
        )
    frames = [pq.read_table(p, schema=SCHEMA).to_pandas() for p in paths]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return df.sort_values(["bearing", "file_index", "window_index", "axis"], kind="stable").reset_index(drop=True)
