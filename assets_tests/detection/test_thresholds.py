"""Per-model thresholds: calibrated on the model's own training windows, stored in its lineage and config.json,
and each candidate votes in the pool with its own."""

import numpy as np
import pandas as pd
import pytest

from firmware import features_wear as wear
from tinyml_dagster.model_repository import ModelRepository
from tinyml_dagster.pool_inference import pool_from_repository
from firmware import local_training
from tinyml_dagster.forest import PoolScorer
from tinyml_dagster.training import (CALIBRATION_FOLDS, TARGET_FA, THRESHOLD, calibrated_threshold,
                                     crossfit_threshold, default_target_fa, feature_matrix, train_candidates,
                                     train_forest)


def _windows(n=600, seed=0):
    """Wear-set feature windows of one bearing: healthy for 60% of life, drifting after."""
    rng = np.random.default_rng(seed)
    life = np.linspace(0, 1, n)
    X = rng.normal(size=(n, len(wear.FEATURE_NAMES)))
    X[:, [0, 4, 5, 6]] += np.where(life > 0.8, 6 * (life - 0.8) / 0.2, 0.0)[:, None]  # amplitude grows at the end
    return pd.DataFrame({
        "timestamp": pd.date_range("2003-10-22", periods=n, freq="10min"), "file_index": np.arange(n),
        "window_index": 0, "bearing": 3, "axis": "x", "rate_hz": 2000, "life_fraction": life,
        "split": np.where(life < 0.6, "train", "test"), **{k: X[:, i] for i, k in enumerate(wear.FEATURE_NAMES)}})


def test_calibrated_threshold_is_a_high_quantile_of_healthy_scores():
    s = np.linspace(0.40, 0.70, 1001)
    t = calibrated_threshold(s, 0.01)  # 10 scores above it: the empirical quantile
    assert (s > t).mean() <= 0.01 and (s >= t).mean() > 0.01
    assert calibrated_threshold(np.full(10, 0.3), 0.01) == 0.5  # never below an average window's score
    assert calibrated_threshold(np.full(10, 0.999), 0.01) == 0.99
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        calibrated_threshold(s, 0.0)
    with pytest.raises(ValueError, match="no training scores"):
        calibrated_threshold([], 0.01)
    assert default_target_fa("paper") is None and default_target_fa("wear") == TARGET_FA


def test_tail_quantile_extrapolates_beyond_the_largest_score():
    """A 0.1% rate from 500 scores: the generalised Pareto tail finds the true quantile, the sample cannot."""
    rng = np.random.default_rng(1)
    exponential = rng.exponential(size=500)  # P(X > x) = exp(-x): a tail of shape 0
    bounded = 1.0 - rng.uniform(size=500) ** 0.25  # P(X > x) = (1 - x)^4: a bounded tail (shape < 0)
    for s, true in ((exponential, -np.log(0.001)), (bounded, 1.0 - 0.001 ** 0.25)):
        t = local_training.tail_quantile(s.tolist(), 0.001)
        assert abs(t - true) < 0.15 * true
        assert t > np.sort(s)[-2]  # beyond the sample's own quantile (its 2nd largest score)


def test_crossfit_threshold_holds_its_rate_on_new_healthy_windows():
    rng = np.random.default_rng(2)
    X, new = rng.normal(size=(400, 3)), rng.normal(size=(20000, 3))
    thr, lineage = crossfit_threshold(X, 50, 100, seed=5, target_fa=0.01)
    forest = train_forest(X, 50, 100, 5)
    rate = (PoolScorer([forest]).scores(new)[:, 0] > thr).mean()
    assert 0.002 < rate < 0.02 and lineage["folds"] == CALIBRATION_FOLDS and lineage["threshold"] == thr
    # the in-sample quantile is optimistic: new healthy windows exceed it more often than the target
    naive = calibrated_threshold(PoolScorer([forest]).scores(X)[:, 0], 0.01)
    assert (PoolScorer([forest]).scores(new)[:, 0] > naive).mean() > rate


def test_models_carry_their_own_threshold_and_the_pool_votes_with_it(tmp_path):
    repo = ModelRepository(tmp_path)
    df = _windows()
    out = train_candidates(df, repo, rate_hz=2000, bearings=(3,), tree_counts=(10, 30), feature_set="wear",
                           target_fa=0.01)
    n_train = int((df.split == "train").sum())
    for c in out:
        meta, cfg = repo.get(c.model_id), repo.config(c.model_id)
        assert cfg["threshold"] == meta["threshold"] == c.threshold == meta["lineage"]["threshold"]["threshold"]
        assert meta["lineage"]["threshold"]["target_fa"] == 0.01
        assert meta["lineage"]["threshold"]["n_windows"] == n_train
        assert cfg["feature_set"] == "wear" and c.threshold != THRESHOLD
        X_train = feature_matrix(df[df.split == "train"], names=wear.FEATURE_NAMES)
        assert c.threshold == crossfit_threshold(X_train, c.n_trees, 100, c.seed, 0.01)[0]
        assert c.anomaly_rate_train <= 0.03 and c.anomaly_rate_later > 0.1  # the worn end of life stands out
    assert out[0].threshold != out[1].threshold
    # the pool reads each candidate's threshold from the repository and votes with it
    repo.set_candidates([c.model_id for c in out])
    pool = pool_from_repository(tmp_path)
    np.testing.assert_array_equal(pool.thresholds, [c.threshold for c in out])
    X = feature_matrix(df, names=wear.FEATURE_NAMES)
    d = pool.decide(X, np.zeros(len(X)))
    np.testing.assert_array_equal(d.votes, d.scores > np.array([c.threshold for c in out]))
    # the paper's fixed threshold stays available (and is the paper set's default)
    fixed = train_candidates(df.assign(mean=df.log_rms), repo, rate_hz=2000, bearings=(3,), tree_counts=(10,))
    assert repo.config(fixed[0].model_id)["threshold"] == THRESHOLD
    assert repo.get(fixed[0].model_id)["lineage"]["threshold"] == {"method": "fixed", "threshold": THRESHOLD}
