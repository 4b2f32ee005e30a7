"""The firmware's Isolation Forest agrees with scikit-learn's on real IMS features (healthy vs end of life)."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from tinyml_dagster.features import window_features_np, window_length
from tinyml_dagster.forest import score_forest
from tinyml_dagster.subsampling import subsample
from tinyml_dagster.training import train_forest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "forest"
RATE_HZ = 500
FILE_SAMPLES = 20480


def _features(signal_20k: np.ndarray) -> np.ndarray:
    """500-ms windows at 500 Hz of each 1-s file of a 20 kHz signal: (n_files * 2, 3)."""
    files = np.asarray(signal_20k, dtype=np.float64).reshape(-1, FILE_SAMPLES)
    return window_features_np(subsample(files, RATE_HZ, 20000), window_length(RATE_HZ)).reshape(-1, 3)


@pytest.fixture(scope="module")
def labelled():
    """Train on the first 16 healthy files, test on the next 8 healthy files and the last 6 files (failed)."""
    npz = np.load(FIXTURES / "set1_first24_b3x_b4x.npz")
    healthy = npz["milli_g"].astype(np.float64) / 1000.0  # (24 files, 20480, 2 channels)
    train = np.vstack([_features(healthy[:16, :, c]) for c in (0, 1)])
    normal = np.vstack([_features(healthy[16:, :, c]) for c in (0, 1)])
    failed = np.vstack([_features(scipy.io.loadmat(FIXTURES / name)["data"][:, 0]) for name in ("IF.mat", "BF.mat")])
    X = np.vstack([normal, failed])
    y = np.r_[np.zeros(len(normal)), np.ones(len(failed))]
    return train, X, y


def test_fixture_is_the_real_data(labelled):
    train, X, y = labelled
    assert train.shape == (64, 3) and X.shape == (56, 3) and y.sum() == 24
    # at 500 Hz the defects show as a shifted mean and a wider kurtosis spread than the run-in's
    healthy = np.vstack([train, X[y == 0]])
    assert np.median(np.abs(X[y == 1, 0])) > np.percentile(np.abs(healthy[:, 0]), 90)
    assert np.percentile(np.abs(X[y == 1, 2]), 90) > np.percentile(np.abs(healthy[:, 2]), 90)


@pytest.mark.parametrize("n_trees", [10, 50])
def test_scores_rank_like_sklearn_and_detect_as_well(labelled, n_trees):
    train, X, y = labelled
    all_windows = np.vstack([train, X])
    ours, theirs, auc_ours, auc_theirs = [], [], [], []
    for seed in range(5):
        forest = train_forest(train, n_trees, psi=100, seed=seed)
        sk = IsolationForest(n_estimators=n_trees, max_samples=min(100, len(train)), random_state=seed).fit(train)
        ours.append(score_forest(forest, all_windows))
        theirs.append(-sk.score_samples(all_windows))  # sklearn returns the opposite of the paper's score
        auc_ours.append(roc_auc_score(y, score_forest(forest, X)))
        auc_theirs.append(roc_auc_score(y, -sk.score_samples(X)))
    rho = spearmanr(np.mean(ours, axis=0), np.mean(theirs, axis=0)).statistic
    assert rho > 0.9, rho
    assert abs(np.mean(auc_ours) - np.mean(auc_theirs)) < 0.05, (auc_ours, auc_theirs)
    assert np.mean(auc_ours) > 0.8
    # each single forest agrees too
    assert min(spearmanr(a, b).statistic for a, b in zip(ours, theirs)) > 0.8
    # the standard normalisation: the same 0..1 scale as sklearn's (its score_samples is -2**(-E[h]/c(psi)))
    assert abs(np.median(ours) - np.median(theirs)) < 0.05
