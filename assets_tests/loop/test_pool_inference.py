"""Pool Inference Engine: majority vote, false positives, +1/-1 ranking kept over time, top candidate."""

import numpy as np
import pytest

from tinyml_dagster.knowledge_base import KnowledgeBase, Upload
from tinyml_dagster.pool_inference import FunctionCandidate, PoolInferenceEngine, unpack_scores


def kurtosis_detector(model_id, limit):
    """A candidate that scores a window by its kurtosis against its own limit (above 0.6 = anomaly)."""
    return FunctionCandidate(model_id, lambda X, lim=limit: np.where(X[:, 2] > lim, 0.8, 0.4))


def pool():
    # a: strict (flags kurtosis > 1), b: medium (> 2), c: lax (> 4)
    return PoolInferenceEngine([kurtosis_detector("a", 1.0), kurtosis_detector("b", 2.0), kurtosis_detector("c", 4.0)])


def test_majority_vote_and_false_positives():
    X = np.array([[0, 0, 0.5], [0, 0, 1.5], [0, 0, 3.0], [0, 0, 5.0]])
    champ = np.array([1, 1, 1, 0])
    d = pool().decide(X, champ)
    assert d.votes.sum(axis=1).tolist() == [0, 1, 2, 3]
    assert d.pool_anomaly.tolist() == [False, False, True, True]
    assert d.false_positive.tolist() == [True, True, False, False]
    assert d.agree.tolist() == [[True, True, True], [False, True, True], [True, True, False], [True, True, True]]


def test_a_tie_is_not_a_majority():
    p = PoolInferenceEngine([kurtosis_detector("a", 1.0), kurtosis_detector("b", 9.0)])
    d = p.decide(np.array([[0, 0, 2.0]]), np.array([1]))
    assert d.pool_anomaly.tolist() == [False] and d.false_positive.tolist() == [True]


def test_pool_rejects_bad_candidate_lists():
    with pytest.raises(ValueError, match="at least one candidate"):
        PoolInferenceEngine([])
    with pytest.raises(ValueError, match="duplicate candidate model ids"):
        PoolInferenceEngine([kurtosis_detector("a", 1), kurtosis_detector("a", 2)])


def test_decide_pending_ranks_over_time_and_is_idempotent(tmp_path):
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    p = pool()
    kb.ingest([Upload("d1", i, "anomaly", features=(0, 0, k), champion_id="v1", champion_decision=1)
               for i, k in enumerate([0.5, 1.5, 3.0, 5.0], start=1)])
    s = p.decide_pending(kb)
    assert (s.decided, s.anomalies, s.false_positives) == (4, 2, 2)
    assert p.decide_pending(kb).decided == 0  # nothing new: ranking unchanged
    # a: agrees 3/4 -> +2, b: 4/4 -> +4, c: 3/4 -> +2
    assert kb.ranking() == [("b", 4, 4, 0), ("a", 2, 3, 1), ("c", 2, 3, 1)]
    assert p.top_candidate(kb) == "b"
    assert p.top_candidate(kb, exclude=["b"]) == "a"
    assert kb.count_false_positives("d1") == 2
    blob = kb.scalar("SELECT scores FROM pool_decisions ORDER BY upload_id DESC LIMIT 1")
    assert unpack_scores(blob).tolist() == pytest.approx([0.8, 0.8, 0.8])
    # later uploads move the ranking on; its history keeps every step
    kb.ingest([Upload("d1", 5, "normal", features=(0, 0, 1.5), champion_id="v1", champion_decision=0)])
    p.decide_pending(kb)
    hist = kb.ranking_history()
    assert [h[2]["a"] for h in hist] == [2, 1]
    assert [h[2]["b"] for h in hist] == [4, 5]


def test_next_champion_keeps_a_near_equal_champion(tmp_path):
    from tinyml_dagster.pool_inference import next_champion

    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    ids = ["a", "b", "c"]
    pid = kb.pool_id(ids)
    # 30 windows: a and b always agree with the pool, c never; then 10 where only b agrees
    rows = [(i, 0, 3, 0, 0, b"", [True, True, False]) for i in range(1, 31)]
    rows += [(i, 0, 3, 0, 0, b"", [False, True, False]) for i in range(31, 41)]
    kb.ingest([Upload("d", i, "normal", features=(0, 0, 0), champion_id="a", champion_decision=0)
               for i in range(1, 41)])
    kb.store_decisions(pid, ids, rows)
    points = {m: p for m, p, _, _ in kb.ranking(ids)}
    assert points == {"a": 20, "b": 40, "c": -40}
    # b is 20 points above a: a champion a is replaced by b; with a wider margin a keeps its place
    assert next_champion(kb, ids, "a", margin=20) == "b"
    assert next_champion(kb, ids, "a", margin=21) is None
    # b, the best, is never replaced by a worse-ranked candidate; a champion outside the pool always is
    assert next_champion(kb, ids, "b", margin=0) is None
    assert next_champion(kb, ids, "device-own", margin=1000) == "b"


def test_equal_rank_prefers_the_larger_forest(tmp_path):
    """Before the pool has seen a disagreement every candidate ranks equal: the larger forest is deployed."""
    from firmware import isoforest
    from tinyml_dagster.pool_inference import next_champion

    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    rows = np.random.default_rng(0).normal(size=(64, 3)).tolist()
    ids = ["b3-t10-x", "b3-t50-y", "b3-t20-z"]
    forests = [isoforest.train(rows, n, 32, 1) for n in (10, 50, 20)]
    p = PoolInferenceEngine.from_forests(ids, forests, [0.6] * 3)
    assert p.top_candidate(kb) == "b3-t50-y" and p.top_candidate(kb, exclude=["b3-t50-y"]) == "b3-t20-z"
    sizes = {"b3-t10-x": 10, "b3-t50-y": 50, "b3-t20-z": 20}
    assert next_champion(kb, ids, "device-own", sizes=sizes) == "b3-t50-y"
    assert next_champion(kb, ids, "device-own") == "b3-t10-x"  # without sizes: by model id


def test_the_pool_is_the_devices_cohort(tmp_path, monkeypatch):
    from firmware import isoforest
    from tinyml_dagster import settings
    from tinyml_dagster.model_repository import ModelRepository
    from tinyml_dagster.pool_inference import pool_ids

    repo = ModelRepository(tmp_path / "models")
    rows = [[0.0, 0.1 * i, 0.2 * (i % 7)] for i in range(60)]
    ids = {(b, n): repo.add(isoforest.train(rows, n, 32, b * 10 + n), rate_hz=2000,
                            training={"bearing": b, "rate_hz": 2000}, prefix="b%d" % b)
           for b in (1, 3) for n in (2, 3)}
    repo.set_candidates(list(ids.values()))
    monkeypatch.setenv("TINYML_COHORT", "bearing=3,rate_hz=2000")
    assert pool_ids(repo) == [ids[(3, 2)], ids[(3, 3)]]
    assert pool_ids(repo, cohort={}) == list(ids.values())
    monkeypatch.setenv("TINYML_COHORT", "bearing=2")  # no candidate of that cohort: the whole candidate set
    assert pool_ids(repo) == list(ids.values())
    monkeypatch.setenv("TINYML_COHORT", "axis=x")
    with pytest.raises(ValueError, match="TINYML_COHORT='axis=x': expected bearing=<n>,rate_hz=<Hz>"):
        settings.cohort()
