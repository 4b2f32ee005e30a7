"""firmware/isoforest.py: the forest's math, determinism, compact and JSON forms, and the same trees on MicroPython."""

import json
import math
import random

import pytest

from firmware import isoforest as iso


def _rows(n=400, seed=1, d=3):
    rnd = random.Random(seed)
    return [[rnd.gauss(0.0, 0.01), rnd.gauss(0.0, 0.3), rnd.gauss(0.0, 1.0)][:d] for _ in range(n)]


def _exact_rows(n=300, seed=3):
    """Rows whose values are exact in single and double precision (k / 2**m), made by the firmware PRNG."""
    r = iso.Rng(seed)
    return [[(r.below(2000) - 1000) / 256.0, (r.below(4000) - 2000) / 64.0, r.below(100) / 8.0] for _ in range(n)]


def test_c_of_n_matches_the_paper_and_sklearn():
    from sklearn.ensemble._iforest import _average_path_length
    import numpy as np

    assert iso.c(0) == 0.0 and iso.c(1) == 0.0 and iso.c(2) == 1.0
    ns = np.arange(3, 300)
    assert np.allclose([iso.c(int(n)) for n in ns], _average_path_length(ns), rtol=0, atol=1e-12)
    # the paper's formula: 2 H(n-1) - 2 (n-1) / n with H(i) ~ ln(i) + Euler's constant
    assert iso.c(100) == pytest.approx(2 * (math.log(99) + 0.5772156649) - 2 * 99 / 100, abs=1e-9)
    assert all(iso.c(n) < iso.c(n + 1) for n in range(1, 200))


def test_height_limit_is_ceil_log2_psi():
    assert [iso.height_limit(p) for p in (2, 3, 4, 64, 65, 100, 128)] == [1, 2, 2, 6, 7, 7, 7]


def test_rng_is_deterministic_uniform_and_seed_dependent():
    a, b, c = iso.Rng(42), iso.Rng(42), iso.Rng(43)
    xs = [a.below(10) for _ in range(5000)]
    assert xs == [b.below(10) for _ in range(5000)]
    assert xs != [c.below(10) for _ in range(5000)]
    counts = [xs.count(k) for k in range(10)]
    assert min(counts) > 400 and max(counts) < 600
    # the halves implement the plain xorshift32 (13, 17, 5) generator
    r = iso.Rng(7)
    s = (r.hi << 16) | r.lo
    for _ in range(1000):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        assert r.next32() == s


def test_grid_maps_the_training_range_inside_16_bits_with_headroom():
    rows = _rows()
    grid = iso.make_grid(rows)
    for f, (_e, _base) in enumerate(grid):
        qs = [iso.quantise(r, grid)[f] for r in rows]
        assert iso.Q_HEADROOM <= min(qs) and max(qs) <= iso.Q_HEADROOM + iso.Q_SPAN
        assert max(qs) - min(qs) > iso.Q_SPAN // 2  # the largest power of two: at least half the span used
    assert iso.quantise([1e9, -1e9, float("inf")], grid) == [iso.Q_MAX, 0, iso.Q_MAX]
    with pytest.raises(ValueError, match="feature 1 is NaN"):
        iso.quantise([0.0, float("nan"), 0.0], grid)


def test_scores_are_in_0_1_and_outliers_score_higher():
    rows = _rows(1000)
    forest = iso.train(rows, 50, 100, seed=5)
    inliers = [forest.score(r) for r in rows[:300]]
    assert all(0.0 < s <= 1.0 for s in inliers)
    outlier = forest.score([0.1, 3.0, 10.0])
    assert outlier > 0.6 > sorted(inliers)[len(inliers) // 2]
    assert outlier > max(inliers)
    # score = 2 ** (-E[h] / c(psi))
    x = rows[7]
    assert forest.score(x) == pytest.approx(2 ** (-forest.mean_path_length(x) / iso.c(100)), rel=1e-12)


def test_training_is_deterministic_for_a_seed():
    rows = _rows()
    a = iso.train(rows, 30, 100, seed=9).to_bytes()
    assert a == iso.train(rows, 30, 100, seed=9).to_bytes()
    assert a != iso.train(rows, 30, 100, seed=10).to_bytes()


def test_trees_respect_the_height_limit_and_the_leaf_codes():
    rows = _rows(500)
    forest = iso.train(rows, 20, 100, seed=1)
    doc = iso.to_json(forest)
    assert forest.n_trees == 20 and forest.psi == 100 and forest.height_limit == 7

    def walk(node, depth, sizes):
        if "leaf" in node:
            assert depth <= 7
            assert node["leaf"] >= depth * iso.LEAF_STEP  # depth + c(size), c >= 0
            return 1
        assert 0 <= node["feature"] < 3
        return walk(node["left"], depth + 1, sizes) + walk(node["right"], depth + 1, sizes)

    n_leaves = [walk(t, 0, None) for t in doc["trees"]]
    assert all(2 <= n <= 100 for n in n_leaves)
    # the compact form is small: a psi=100 tree takes a few hundred bytes
    assert len(forest.to_bytes()) < 20 * 400


def test_json_form_round_trips_and_scores_the_same():
    rows = _rows()
    forest = iso.train(rows, 10, 64, seed=2)
    doc = json.loads(json.dumps(iso.to_json(forest)))
    again = iso.from_json(doc)
    assert again.to_bytes() == forest.to_bytes()
    assert [again.score(r) for r in rows[:50]] == [forest.score(r) for r in rows[:50]]


def test_psi_larger_than_the_data_uses_all_rows():
    rows = _rows(40)
    forest = iso.train(rows, 5, 100, seed=1)
    assert forest.psi == 40 and forest.height_limit == 6


def test_long_left_subtrees_use_the_16_bit_offset():
    # a node whose left subtree is larger than 251 bytes takes the 6-byte form; build one by hand
    left = {"leaf": 8}
    for k in range(70):  # a left-leaning chain: 70 internal nodes of 4 bytes plus leaves
        left = {"feature": 0, "threshold": 1000 + k, "left": left, "right": {"leaf": 9}}
    doc = {"format": iso.JSON_FORMAT, "n_features": 1, "psi": 100, "leaf_step": 8, "grid": [[0, 0]],
           "trees": [{"feature": 0, "threshold": 5000, "left": left, "right": {"leaf": 3}}]}
    forest = iso.from_json(doc)
    assert forest.to_bytes()[iso.HEADER_SIZE + 3] == 0  # escape: 16-bit offset follows
    assert forest.path_sum([6000]) == 3  # right of the root
    assert forest.path_sum([0]) == 8  # all the way down the left chain
    assert forest.path_sum([1050]) == 9
    assert iso.from_json(iso.to_json(forest)).to_bytes() == forest.to_bytes()


def test_bad_input_gets_clear_errors():
    rows = _rows(50)
    with pytest.raises(ValueError, match="row 3 feature 2 is not a finite number"):
        iso.train(rows[:3] + [[0.0, 0.0, float("nan")]], 5, 16, 1)
    with pytest.raises(ValueError, match="row 1 has 2 features, row 0 has 3"):
        iso.train([[0.0, 0.0, 0.0], [1.0, 2.0]], 5, 16, 1)
    with pytest.raises(ValueError, match="psi must be"):
        iso.train(rows, 5, 1000, 1)
    with pytest.raises(ValueError, match="no training rows"):
        iso.train([], 5, 16, 1)
    buf = iso.train(rows, 5, 16, 1).to_bytes()
    with pytest.raises(ValueError, match="bad magic"):
        iso.load(b"XX" + buf[2:], [[0, 0]] * 3)
    with pytest.raises(ValueError, match="truncated"):
        iso.load(buf[:-3], [[0, 0]] * 3)
    with pytest.raises(ValueError, match="trailing bytes"):
        iso.load(buf + b"\x80", [[0, 0]] * 3)
    with pytest.raises(ValueError, match="grid has 2 features, forest has 3"):
        iso.load(buf, [[0, 0]] * 2)


def test_same_trees_and_scores_on_micropython_and_cpython():
    """The very same module trains the same bytes inside the real MicroPython 1.27 VM."""
    from tinyml_dagster.micropython_vm import MicroPythonVM

    code = """
from firmware import isoforest
import ubinascii
r = isoforest.Rng(3)
rows = []
for i in range(300):
    rows.append([(r.below(2000) - 1000) / 256.0, (r.below(4000) - 2000) / 64.0, r.below(100) / 8.0])
F = isoforest.train(rows, 50, 100, 11)
print(ubinascii.hexlify(ubinascii.unhexlify('00') + F.to_bytes()).decode())
print(F.grid)
print(repr(F.score([0.5, 3.0, 6.0])), repr(F.score(rows[5])), repr(F.score([6.0, -40.0, 14.0])))
"""
    # the WASI build's garbage collector must not run inside nested calls: give it a heap it never fills
    result = MicroPythonVM(heap_bytes=4 * 1024 * 1024).run(code=code).check()
    hex_bytes, grid, scores = result.stdout.strip().splitlines()
    rows = _exact_rows()
    forest = iso.train(rows, 50, 100, 11)
    assert bytes.fromhex(hex_bytes)[1:] == forest.to_bytes()
    assert json.loads(grid) == forest.grid
    s1, s2, s3 = (float(v) for v in scores.split())
    assert s1 == pytest.approx(forest.score([0.5, 3.0, 6.0]), rel=1e-6)
    assert s2 == pytest.approx(forest.score(rows[5]), rel=1e-6)
    assert s3 == pytest.approx(forest.score([6.0, -40.0, 14.0]), rel=1e-6)  # beyond every split range
    beyond = iso.quantise([6.0, -40.0, 14.0], forest.grid)
    assert all(not forest.split_lo[f] <= beyond[f] <= forest.split_hi[f] for f in range(3))


def test_split_ranges_are_the_thresholds_extremes_or_the_whole_grid():
    rows = _rows(300)
    forest = iso.train(rows, 20, 64, seed=4)
    for f in range(3):
        thresholds = [forest.nt[i] for i in range(forest.n_nodes) if forest.nf[i] == f]
        assert (forest.split_lo[f], forest.split_hi[f]) == (min(thresholds), max(thresholds))
    # a feature no tree splits on (constant in training) is never out of range
    constant = iso.train([r[:2] + [1.5] for r in rows], 20, 64, seed=4)
    assert (constant.split_lo[2], constant.split_hi[2]) == (0, iso.Q_MAX)
    assert constant.score([0.0, 0.0, 1e6]) == constant.score([0.0, 0.0, 1.5])
    assert iso.out_of_range_share([0, 0, 0], (10, 10, 0), (20, 20, iso.Q_MAX)) == pytest.approx(
        (10 / 20 + 10 / 20) / 3)
    assert iso.out_of_range_path_sum(123, 0.0, 10) == 123  # inside: the plain path sum


def test_score_rises_with_a_window_moving_beyond_the_training_range():
    """The plain forest scores every window past its outermost splits alike; out-of-range isolation keeps rising."""
    import numpy as np

    from tinyml_dagster.forest import PoolScorer

    rows = _rows(1000)
    forest = iso.train(rows, 50, 100, seed=5)
    pool = PoolScorer([forest])
    top = max(r[1] for r in rows)
    walk = [[0.0, top * (1.0 + 0.05 * k), 0.0] for k in range(1, 12)]  # within the grid's headroom
    scores = [forest.score(x) for x in walk]
    assert all(b > a for a, b in zip(scores, scores[1:])), scores
    sums = [forest.path_sum(iso.quantise(x, forest.grid)) for x in walk]
    assert len(set(sums)) == 1  # the path stops changing: only the excess moves the score
    assert np.abs(pool.scores(np.array(walk))[:, 0] - scores).max() < 1e-12
    inside = [x for x in rows[:200]
              if not iso.out_of_range_share(iso.quantise(x, forest.grid), forest.split_lo, forest.split_hi)]
    assert len(inside) > 150  # training windows: inside the ranges (but the few at a feature's extremes)
    for x in inside:  # the plain score
        plain = 2 ** (-forest.path_sum(iso.quantise(x, forest.grid)) / (8 * 50) / iso.c(100))
        assert forest.score(x) == pytest.approx(plain, rel=1e-12)
