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
