"""Window -> features -> score on the device, with the Data In manager and the Local engines."""

from firmware import features, isoforest
from firmware.compiled_forest import CompiledForest
from firmware.data_in import DataIn
from firmware.local_inference import LocalInference
from firmware.local_training import LocalTraining
from firmware.tests.util import FakeUART, beyond_range, samples_bytes, signal


def _close(a, b, tol=1e-6):
    return abs(a - b) <= tol * (1.0 + abs(b))


def test_data_in_windows_like_features_module():
    xs = signal(50 * 7 + 13)
    want = features.signal_features(xs, 100)
    din = DataIn(FakeUART(samples_bytes(xs), burst=37), 100)
    got = []
    for _ in range(1000):
        r = din.poll()
        if r is not None:
            got.append(r)
    assert len(got) == 7 == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a == b, (g, w)
    assert din.samples == 50 * 7 + 13 and din.windows == 7


def test_data_in_drops_and_counts_windows_with_bad_samples():
    xs = signal(150)
    xs[60] = float("nan")
    xs[130] = float("inf")
    din = DataIn(FakeUART(samples_bytes(xs)), 100)
    got = [din.poll() for _ in range(40)]
    assert len([g for g in got if g is not None]) == 1
    assert din.bad_windows == 2 and din.windows == 1 and din.samples == 150


def test_constant_window_gives_zero_moments():
    din = DataIn(FakeUART(samples_bytes([0.25] * 50)), 100)
    got = [din.poll() for _ in range(20)]
    assert [g for g in got if g is not None] == [(0.25, 0.0, 0.0)], got


def test_training_then_inference_flags_spikes():
    rows = features.signal_features(signal(50 * 40, seed=3), 100)
    tr = LocalTraining(40, 20, 32, 7)
    done = False
    for r in rows:
        done = tr.add(r)
    assert done
    forest = tr.train()
    assert forest.n_trees == 20 and forest.psi == 32
    again = isoforest.train(rows, 20, 32, 7)
    assert again.to_bytes() == forest.to_bytes()
    inf = LocalInference()
    inf.set_champion(forest, {"threshold": 0.6, "model_id": "m", "version": 3})
    normal = [inf.infer(r)[0] for r in rows]
    spiky = features.signal_features(signal(50 * 5, seed=9, spike_every=7), 100)
    odd = [inf.infer(r) for r in spiky]
    assert max(normal) < min(s for s, _ in odd), (max(normal), [s for s, _ in odd])
    assert all(a for _, a in odd)
    assert inf.windows == 45 and inf.anomalies >= 5



def test_compiled_forest_scores_equal_the_node_walk():
    rows = features.signal_features(signal(50 * 60, seed=5), 100)
    forest = isoforest.train(rows[:40], 25, 32, 11)
    compiled = CompiledForest(forest)
    probes = rows + features.signal_features(signal(50 * 10, seed=6, spike_every=5), 100)
    assert 0 < beyond_range(forest, probes) < len(probes)  # windows inside and beyond the split ranges
    for r in probes:
        q = isoforest.quantise(r, forest.grid)
        assert compiled.path_sum(q) == forest.path_sum(q), r
        assert compiled.score(r) == forest.score(r) == compiled.score_q(q) == forest.score_q(q), r
    assert compiled.n_trees == 25 and len(compiled.groups) == 5
    assert (compiled.split_lo, compiled.split_hi) == (forest.split_lo, forest.split_hi)


def test_out_of_range_isolation_rises_with_the_excess_and_is_the_plain_score_inside():
    rows = features.signal_features(signal(50 * 60, seed=5), 100)
    forest = isoforest.train(rows[:40], 25, 32, 11)
    compiled = CompiledForest(forest)
    base = [(forest.split_lo[f] + forest.split_hi[f]) // 2 for f in range(forest.n_features)]
    for f in range(forest.n_features):
        lo, hi = forest.split_lo[f], forest.split_hi[f]
        assert lo < hi < isoforest.Q_MAX and lo > 0
        q = list(base)
        for v in (lo, (lo + hi) // 2, hi):  # inside: the plain score 2 ** (-L / c(psi))
            q[f] = v
            assert isoforest.out_of_range_share(q, forest.split_lo, forest.split_hi) == 0
            plain = 2.0 ** (-forest.path_sum(q) / (isoforest.LEAF_STEP * forest.n_trees) / isoforest.c(forest.psi))
            assert _close(forest.score_q(q), plain, 1e-12) and compiled.score_q(q) == forest.score_q(q)
        for side, edge, end in ((1, hi, isoforest.Q_MAX), (-1, lo, 0)):
            q[f] = edge
            last = forest.score_q(q)
            step = max(1, abs(end - edge) // 12)
            for k in range(1, 13):  # further and further out: the path stays, the score rises
                q[f] = edge + side * min(k * step, abs(end - edge))
                s = forest.score_q(q)
                assert s > last and compiled.score_q(q) == s, (f, side, k, s, last)
                last = s
