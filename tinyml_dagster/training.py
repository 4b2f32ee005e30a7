"""Embedded and Pool model Training Engine: the repository's candidates, grown with the firmware's own forest.

As in the paper, the gateway trains with "the same library used for the embedded device": firmware/isoforest.py,
run under CPython on rows of feature windows; the pool scorer (tinyml_dagster/forest.py) then measures each model's
anomaly rate on its training windows and on the later ones. One model per (bearing, forest size): trained on the
bearing's windows of both axes whose life_fraction < 0.6 (split "train"), psi = 100, threshold 0.6.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from firmware import isoforest
from tinyml_dagster import settings
from tinyml_dagster.features import FEATURE_NAMES, WINDOW_MS
from tinyml_dagster.forest import PoolScorer
from tinyml_dagster.model_repository import ModelRepository

TREE_COUNTS: tuple[int, ...] = (10, 20, 30, 40, 50)
PSI = 100
THRESHOLD = 0.6


def model_seed(seed: int, bearing: int, n_trees: int) -> int:
    """The training seed of one candidate: distinct per (bearing, forest size), reproducible from the run's seed."""
    return int(seed) * 100_000 + int(bearing) * 1000 + int(n_trees)


def feature_matrix(windows: pd.DataFrame, what: str = "feature windows") -> np.ndarray:
    """(n, 3) float64 matrix of the feature columns; a clear error naming the first bad window."""
    missing = [c for c in FEATURE_NAMES if c not in windows.columns]
    if missing:
        raise ValueError(f"{what}: missing feature columns {missing}")
    X = windows[list(FEATURE_NAMES)].to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isfinite(X))
    if len(bad):
        i, j = bad[0]
        row = windows.iloc[int(i)]
        where = ", ".join(f"{k}={row[k]}" for k in ("bearing", "axis", "file_index", "window_index") if k in row)
        raise ValueError(f"{what}: window {where} has a non-finite {FEATURE_NAMES[j]}: {X[i, j]}")
    return X


def train_forest(X: np.ndarray, n_trees: int, psi: int = PSI, seed: int = 0) -> isoforest.Forest:
    """One forest from a feature matrix, grown by the firmware's pure-Python Isolation Forest."""
    return isoforest.train(np.asarray(X, dtype=np.float64).tolist(), n_trees, psi, seed)


def anomaly_rates(forests: Sequence[isoforest.Forest], X: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Per forest, the fraction of rows whose score exceeds threshold (score > threshold = anomaly)."""
    if len(X) == 0:
        return np.full(len(forests), np.nan)
    return (PoolScorer(forests).scores(X) > threshold).mean(axis=0)


@dataclass(frozen=True)
class TrainedCandidate:
    """One candidate as stored: its id and what was measured."""

    model_id: str
    bearing: int
    n_trees: int
    seed: int
    size_bytes: int
    anomaly_rate_train: float
    anomaly_rate_later: float
    train_seconds: float


def _time(t) -> str | None:
    return None if pd.isna(t) else pd.Timestamp(t).isoformat()


def train_candidates(windows: pd.DataFrame, repo: ModelRepository, *, rate_hz: int,
                     bearings: Sequence[int] = settings.BEARINGS, tree_counts: Sequence[int] = TREE_COUNTS,
                     psi: int = PSI, threshold: float = THRESHOLD, seed: int = 0,
                     lineage: dict | None = None) -> list[TrainedCandidate]:
    """Train and store one model per (bearing, forest size) on the first 60% of life; returns them in order."""
    out: list[TrainedCandidate] = []
    for bearing in bearings:
        df = windows[(windows.bearing == bearing) & (windows.rate_hz == rate_hz)]
        train = df[df.split == "train"]
        later = df[df.split != "train"]
        if len(train) < 2:
            raise ValueError(f"feature windows at {rate_hz} Hz, bearing {bearing}: {len(train)} training windows "
                             f"(life_fraction < {settings.TRAIN_FRACTION}); need at least 2")
        X_train = feature_matrix(train, f"bearing {bearing} training windows")
        X_later = feature_matrix(later, f"bearing {bearing} later windows")
        training = {
            "asset": "feature_windows",
            "rate_hz": int(rate_hz),
            "bearing": int(bearing),
            "axes": sorted(train.axis.unique().tolist()),
            "split": "train",
            "life_fraction": [float(train.life_fraction.min()), float(train.life_fraction.max())],
            "time_from": _time(train.timestamp.min()),
            "time_to": _time(train.timestamp.max()),
            "file_index": [int(train.file_index.min()), int(train.file_index.max())],
            "n_windows": int(len(train)),
            "n_later_windows": int(len(later)),
        }
        forests, seeds, seconds = [], [], []
        for n_trees in tree_counts:
            s = model_seed(seed, bearing, n_trees)
            t0 = time.perf_counter()
            forests.append(train_forest(X_train, n_trees, psi, s))
            seconds.append(time.perf_counter() - t0)
            seeds.append(s)
        rate_train = anomaly_rates(forests, X_train, threshold)
        rate_later = anomaly_rates(forests, X_later, threshold)
        for forest, s, secs, r_tr, r_la in zip(forests, seeds, seconds, rate_train, rate_later):
            metrics = {"anomaly_rate_train": float(r_tr),
                       "anomaly_rate_later": None if np.isnan(r_la) else float(r_la),
                       "train_seconds": round(secs, 4)}
            model_id = repo.add(forest, lineage={"source": "gateway", **(lineage or {})}, threshold=threshold,
                                rate_hz=rate_hz, window_ms=WINDOW_MS, seed=s, training=training, metrics=metrics)
            out.append(TrainedCandidate(model_id, int(bearing), forest.n_trees, s, len(forest.to_bytes()),
                                        float(r_tr), float(r_la), secs))
    return out


def retrain(windows: pd.DataFrame, repo: ModelRepository, *, tree_counts: Sequence[int] = TREE_COUNTS,
            psi: int = PSI, seed: int = 0, lineage: dict | None = None, training: dict | None = None) -> list[str]:
    """New candidates from the normal windows devices uploaded: one model per forest size; their ids."""
    X = feature_matrix(windows, "uploaded normal windows")
    ids = []
    for i, n_trees in enumerate(tree_counts):
        ids.append(repo.add(train_forest(X, n_trees, psi, seed + i), lineage={"source": "retraining", **(lineage or {})},
                            seed=seed + i, training=training))
    return ids
