"""tinyml_dagster/forest.py: the numpy pool scorer reads the same compact bytes and gives the same scores."""

import numpy as np
import pytest

from firmware import isoforest as iso
from firmware.tests.util import beyond_range
from tinyml_dagster.forest import PoolScorer, decode, quantise, score_forest


def _data(n, seed, scale=(0.01, 0.3, 1.0)):
    return np.random.default_rng(seed).normal(size=(n, 3)) * np.array(scale)


@pytest.fixture(scope="module")
def forests():
    out = []
    for k, n_trees in enumerate((10, 20, 30, 40, 50)):
        rows = _data(2000, k, scale=(0.01 * (k + 1), 0.3, 1.0 + k)).tolist()
        out.append(iso.train(rows, n_trees, 100, seed=100 + k))
    return out


@pytest.mark.parametrize("method", ["rank", "heap"])
def test_pool_scores_equal_the_firmware_scores_on_thousands_of_windows(forests, method):
    # wider than the training data, so that clipping at the grid's ends is exercised too
    X = _data(3000, 99, scale=(0.03, 1.0, 4.0))
    X[:5] = [[1e6, -1e6, 50.0], [-1e-9, 0.0, 0.0], [0.0, 0.0, -1e40], [1e40, 1e40, 1e40], [0.0, 0.0, 0.0]]
    # and windows exactly on split thresholds: q == t goes right, q == t - 1 left
    f0 = forests[0]
    on = [[(t + b - d + 0.0) / 2.0 ** e for (e, b) in f0.grid] for t in (f0.nt[0],) for d in (0, 1)]
    X[5:7] = on
    pool = PoolScorer(forests, method=method)
    assert pool.method == method
    for f in forests:  # windows inside and beyond each forest's split ranges
        assert 500 < beyond_range(f, X.tolist()) < 2500
    S = pool.scores(X)
    assert S.shape == (3000, 5)
    ref = np.array([[f.score(list(x)) for f in forests] for x in X])
    assert np.abs(S - ref).max() < 1e-9
    sums = pool.path_sums(X)
    expected = np.array([[f.path_sum(iso.quantise(list(x), f.grid)) for f in forests] for x in X[:300]])
    assert (sums[:300] == expected).all()
    expected = np.array([[f.expected_path_sum(iso.quantise(list(x), f.grid)) for f in forests] for x in X[:300]])
    assert np.abs(pool.expected_path_sums(X[:300]) - expected).max() < 1e-9
    assert np.allclose(score_forest(forests[2], X), ref[:, 2], rtol=0, atol=1e-9)
    assert ((S > 0) & (S <= 1)).all()


def test_quantise_matches_the_firmware(forests):
    X = _data(500, 7, scale=(0.05, 2.0, 8.0))
    for f in forests:
        Q = quantise(X, f.grid)
        assert (Q == np.array([iso.quantise(list(x), f.grid) for x in X])).all()
    with pytest.raises(ValueError, match="row 1 feature 2 is NaN"):
        quantise(np.array([[0, 0, 0], [0, 0, np.nan]], dtype=float), forests[0].grid)
    with pytest.raises(ValueError, match="shape"):
        quantise(np.zeros((3, 2)), forests[0].grid)


def test_decode_reads_every_node_and_the_16_bit_offset():
    left = {"leaf": 8}
    for k in range(70):
        left = {"feature": 0, "threshold": 1000 + k, "left": left, "right": {"leaf": 9}}
    doc = {"format": iso.JSON_FORMAT, "n_features": 3, "psi": 100, "leaf_step": 8, "grid": [[0, 0]] * 3,
           "trees": [{"feature": 1, "threshold": 5000, "left": left, "right": {"leaf": 3}}, {"leaf": 40}]}
    forest = iso.from_json(doc)
    assert PoolScorer([forest]).method == "rank" and PoolScorer([forest], method="heap").method == "nodes"
    t = decode(forest)
    assert len(t.roots) == 2 and t.depth == 71
    assert int((t.left == np.arange(len(t.left))).sum()) == 73  # leaves point to themselves
    X = np.array([[1050.0, 0.0, 0.0], [0.0, 6000.0, 0.0], [0.0, 0.0, 0.0]])
    sums = PoolScorer([forest]).path_sums(X)[:, 0]
    assert PoolScorer([forest], method="heap").path_sums(X)[:, 0].tolist() == sums.tolist()
    assert sums.tolist() == [forest.path_sum(iso.quantise(list(x), forest.grid)) for x in X] == [9 + 40, 3 + 40, 8 + 40]


def test_pool_rejects_mismatched_models(forests):
    other = iso.train(_data(200, 1)[:, :2].tolist(), 5, 32, seed=1)
    with pytest.raises(ValueError, match="forest 1 has 2 features"):
        PoolScorer([forests[0], other])
    with pytest.raises(ValueError, match="at least one"):
        PoolScorer([])
