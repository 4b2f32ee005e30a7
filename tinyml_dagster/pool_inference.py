"""Pool Inference Engine (paper, steps 6-9): majority vote of the repository's candidates, false positives, ranking.

For every window a device uploads, each candidate of the pool scores it; the majority of the candidates'
decisions is the pool's decision. An anomaly the champion reported and the pool rejects is a false positive
of the champion. Each candidate gets +1 when it agrees with the pool and -1 when not (kept in the Knowledge
Base over time). When a device's champion reaches N_fp false positives, the top-ranked candidate is the next
champion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from tinyml_dagster.knowledge_base import KnowledgeBase

log = logging.getLogger("tinyml_dagster.pool_inference")

DEFAULT_THRESHOLD = 0.6  # paper: an Isolation Forest score above 0.6 is an anomaly


class Candidate(Protocol):
    """What the pool needs from a repository model: an id and a vectorised score over (n, 3) feature rows."""

    model_id: str

    def score(self, X: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class FunctionCandidate:
    """A candidate from a model id, a scoring function and its own threshold."""

    model_id: str
    score_fn: Callable[[np.ndarray], np.ndarray]
    threshold: float = DEFAULT_THRESHOLD
    n_trees: int = 0  # the forest's size, when the candidate is a forest (tie_order)

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.score_fn(X), dtype=np.float64)


@dataclass(frozen=True)
class PoolDecision:
    """The pool's decision on a batch of windows."""

    scores: np.ndarray  # (n, k) candidate scores
    votes: np.ndarray  # (n, k) bool: candidate says anomaly
    pool_anomaly: np.ndarray  # (n,) bool: strict majority of candidates say anomaly
    false_positive: np.ndarray  # (n,) bool: champion said anomaly, pool says normal
    agree: np.ndarray  # (n, k) bool: candidate agrees with the pool


@dataclass(frozen=True)
class DecideSummary:
    decided: int
    anomalies: int
    false_positives: int
    through_upload_id: int


class PoolInferenceEngine:
    """Majority vote of the candidates and the +1/-1 ranking, stored in the Knowledge Base."""

    def __init__(self, candidates: Sequence[Candidate], threshold: float = DEFAULT_THRESHOLD,
                 feature_set: str = "paper"):
        if not candidates:
            raise ValueError("the pool needs at least one candidate model")
        ids = [c.model_id for c in candidates]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate candidate model ids in the pool: %s" % ids)
        self.candidates = list(candidates)
        self.model_ids = ids
        self.feature_set = feature_set  # only windows of this set are put to the vote
        self.thresholds = np.array([getattr(c, "threshold", threshold) for c in candidates], dtype=np.float64)
        self._through: dict[str, int] = {}  # per KB: every window through this upload id is decided
        self.gateway: str | None = None  # set: only the windows of the devices hanging on this gateway
        self.cohort: dict | None = None  # set: only its cohort's devices' windows ({}: devices without a cohort)
        self._matrix_scorer: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def from_forests(cls, model_ids: Sequence[str], forests: Sequence, thresholds: Sequence[float] | None = None,
                     feature_set: str = "paper") -> "PoolInferenceEngine":
        """A pool of compact Isolation Forests (firmware.isoforest.Forest), scored all at once by forest.PoolScorer."""
        from tinyml_dagster.forest import PoolScorer, score_forest

        thresholds = list(thresholds) if thresholds is not None else [DEFAULT_THRESHOLD] * len(model_ids)
        pool = cls([FunctionCandidate(m, lambda X, f=f: score_forest(f, X), t, f.n_trees)
                    for m, f, t in zip(model_ids, forests, thresholds)], feature_set=feature_set)
        pool._matrix_scorer = PoolScorer(list(forests)).scores
        return pool

    def decide(self, X: np.ndarray, champion_decision: np.ndarray) -> PoolDecision:
        """Vote on feature rows X (n, n_features) given the champion's decisions (n,) (1 = anomaly)."""
        X = np.asarray(X, dtype=np.float64)
        X = X.reshape(len(X), -1) if X.ndim > 1 or not len(X) else X.reshape(1, -1)
        if not len(X):
            scores = np.zeros((0, len(self.candidates)))
        elif self._matrix_scorer is not None:
            scores = self._matrix_scorer(X)
        else:
            scores = np.column_stack([c.score(X) for c in self.candidates])
        votes = scores > self.thresholds
        # A tie is not a majority: the pool declares an anomaly only when more than half of the candidates do.
        pool_anomaly = votes.sum(axis=1) * 2 > votes.shape[1]
        champ = np.asarray(champion_decision, dtype=bool).reshape(-1)
        return PoolDecision(
            scores=scores,
            votes=votes,
            pool_anomaly=pool_anomaly,
            false_positive=champ & ~pool_anomaly,
            agree=votes == pool_anomaly[:, None],
        )

    def decide_pending(self, kb: KnowledgeBase, batch: int = 20_000, max_batches: int | None = None) -> DecideSummary:
        """Decide every stored window the pool has not decided yet (at most max_batches batches of them) and
        update the ranking (idempotent)."""
        pool_id = kb.pool_id(self.model_ids)
        decided = anomalies = fps = 0
        through = self._through.get(str(kb.path), 0)
        while True:
            rows = kb.undecided(limit=batch, after_id=through, feature_set=self.feature_set, gateway=self.gateway,
                                cohort=self.cohort)
            if not rows:
                break
            last_id, full = rows[-1][0], len(rows) == batch
            rows, d = self._decide_rows(kb, self._usable(kb, rows))
            n = len(rows)
            scores32 = d.scores.astype("<f4")
            out = list(zip([r[0] for r in rows], d.votes.sum(axis=1).tolist(), [len(self.model_ids)] * n,
                           d.pool_anomaly.astype(int).tolist(), d.false_positive.astype(int).tolist(),
                           [row.tobytes() for row in scores32], d.agree.tolist()))
            decided += kb.store_decisions(pool_id, self.model_ids, out)
            anomalies += int(d.pool_anomaly.sum())
            fps += int(d.false_positive.sum())
            through = last_id
            self._through[str(kb.path)] = through
            if max_batches is not None:
                max_batches -= 1
            if not full or max_batches == 0:
                break
        return DecideSummary(decided, anomalies, fps, through)

    def _usable(self, kb: KnowledgeBase, rows: list[tuple]) -> list[tuple]:
        """The rows the pool can score; the others (features that are not finite numbers, a champion decision
        that is not 0/1) are quarantined with the reason, so one row never stops the decisions on every other."""
        try:  # the usual case, checked at once: every row finite, every champion decision 0, 1 or None
            X = np.array([r[2:-1] for r in rows], dtype=np.float64)
            if np.isfinite(X).all() and {r[-1] for r in rows} <= {None, 0, 1}:
                return rows
        except (TypeError, ValueError):
            pass
        good, bad = [], {}
        for r in rows:
            try:
                x = np.array(r[2:-1], dtype=np.float64)
            except (TypeError, ValueError):
                x = np.array([np.nan])
            if not np.isfinite(x).all():
                bad[r[0]] = "features are not %d finite numbers" % (len(r) - 3)
            elif r[-1] not in (None, 0, 1):
                bad[r[0]] = "champion decision is not 0 or 1"
            else:
                good.append(r)
        for uid, reason in bad.items():
            kb.quarantine([uid], "pool_decisions", reason)
        return good

    def _decide_rows(self, kb: KnowledgeBase, rows: list[tuple]) -> tuple[list[tuple], PoolDecision]:
        """The pool's decision on rows; when the candidates fail on the batch, the failing rows are found one
        at a time and quarantined with the error."""
        def run(rs):
            X = np.array([r[2:-1] for r in rs], dtype=np.float64).reshape(len(rs), -1)
            return self.decide(X, np.array([r[-1] or 0 for r in rs], dtype=bool))

        try:
            return rows, run(rows)
        except Exception:
            kept = []
            for r in rows:
                try:
                    run([r])
                    kept.append(r)
                except Exception as e:
                    kb.quarantine([r[0]], "pool_decisions", "pool scoring failed: %s: %s" % (type(e).__name__, e))
            return kept, run(kept)

    def top_candidate(self, kb: KnowledgeBase, exclude: Sequence[str] = ()) -> str:
        """The best-ranked candidate of this pool (excluding e.g. the current champion); ties by forest size
        (the larger first, see tie_order), then model id."""
        ranked = [r for r in kb.ranking(self.model_ids) if r[0] not in exclude]
        unranked = sorted(m for m in self.model_ids if m not in exclude and m not in {r[0] for r in ranked})
        sizes = {c.model_id: getattr(c, "n_trees", 0) for c in self.candidates}
        # Unranked candidates count as 0 points.
        order = sorted([(-r[1], *tie_order(r[0], sizes)) for r in ranked]
                       + [(0, *tie_order(m, sizes)) for m in unranked])
        if not order:
            raise ValueError("no candidate left in the pool besides %s" % list(exclude))
        return order[0][-1]


def tie_order(model_id: str, sizes: dict[str, int] | None) -> tuple[int, str]:
    """Between candidates of equal rank, the larger forest first: at the same calibrated false-alarm rate its
    score (an average path length over more trees) varies less, so it separates wear from healthy windows better;
    then the model id."""
    return -int((sizes or {}).get(model_id) or 0), model_id


def unpack_scores(blob: bytes) -> np.ndarray:
    """The candidates' scores stored with a decision (float32, pool order)."""
    return np.frombuffer(blob, dtype="<f4")


HYSTERESIS_POINTS = 20  # a pool member champion is replaced only by a candidate ranked this far above it


def next_champion(kb: KnowledgeBase, pool_ids: Sequence[str], champion: str,
                  margin: int = HYSTERESIS_POINTS, sizes: dict[str, int] | None = None) -> str | None:
    """The best-ranked candidate other than the champion (ties by tie_order: sizes are the candidates' forest
    sizes); None while the champion is itself a pool member ranked within margin points of it, so two near-equal
    candidates do not alternate."""
    points = {r[0]: r[1] for r in kb.ranking(pool_ids)}
    order = sorted((-points.get(m, 0), *tie_order(m, sizes)) for m in pool_ids if m != champion)
    if not order:
        raise ValueError("no candidate left in the pool besides %s" % champion)
    best = order[0][-1]
    if champion in pool_ids and points.get(best, 0) < points.get(champion, 0) + margin:
        return None
    return best


def in_cohort(meta: dict, cohort: dict[str, int]) -> bool:
    """A repository model trained on the cohort's bearing and rate (every model when the cohort is {})."""
    training = meta.get("training") or {}
    return all(training.get(k) == v for k, v in cohort.items())


def pool_ids(repo, cohort: dict[str, int] | None = None) -> list[str]:
    """The pool: the repository's candidate set (else every model not trained by a device), restricted to the
    devices' cohort (settings.cohort(): their bearing and rate) when it holds any of it."""
    from tinyml_dagster import settings

    cohort = settings.cohort() if cohort is None else cohort
    ids = repo.candidate_ids() or [e["model_id"] for e in repo.list() if e.get("source") != "device"]
    same = [m for m in ids if in_cohort(repo.get(m), cohort)] if cohort else ids
    return same or ids


def cohort_candidates(repo, cohort: dict | None) -> list[str]:
    """The candidates that may replace the champion of a device of this cohort (whichever gateway it hangs on):
    those whose training matches every key of it (machine, channel, rate_hz, ...) and whose feature set is its
    feature_set; none of the cohort, none at all. No cohort: the gateway's pool (pool_ids)."""
    if not cohort:
        return pool_ids(repo)
    ids = repo.candidate_ids() or [e["model_id"] for e in repo.list() if e.get("source") != "device"]
    training = {k: v for k, v in cohort.items() if k != "feature_set"}
    return [m for m in ids if in_cohort(repo.get(m), training)
            and repo.config(m).get("feature_set", "paper") == cohort.get("feature_set", "paper")]


class CohortPools:
    """One pool per cohort of a gateway's devices, each voting only on its cohort's windows (and the gateway's pool
    on the windows of devices without a cohort); decide_pending as one pool's."""

    def __init__(self, pools: Sequence[PoolInferenceEngine]):
        self.pools = list(pools)

    @property
    def gateway(self) -> str | None:
        return self.pools[0].gateway if self.pools else None

    @gateway.setter
    def gateway(self, value: str | None) -> None:
        for p in self.pools:
            p.gateway = value

    def decide_pending(self, kb: KnowledgeBase, batch: int = 20_000, max_batches: int | None = None) -> DecideSummary:
        done = [p.decide_pending(kb, batch, max_batches) for p in self.pools]
        return DecideSummary(sum(d.decided for d in done), sum(d.anomalies for d in done),
                             sum(d.false_positives for d in done), max(d.through_upload_id for d in done))


def cohort_pools(cohorts: Sequence[dict], root=None, previous: CohortPools | None = None) -> CohortPools:
    """A pool for each cohort that has candidates in the repository, and one for devices without a cohort; each
    pool of `previous` that is still its cohort's pool is kept (see pool_from_repository)."""
    before = {json.dumps(p.cohort, sort_keys=True): p for p in previous.pools} if previous is not None else {}
    pools = []
    for cohort in [dict(c) for c in {json.dumps(c, sort_keys=True): c for c in cohorts}.values()] + [{}]:
        try:
            pools.append(pool_from_repository(root, cohort, previous=before.get(json.dumps(cohort, sort_keys=True))))
        except ValueError as e:  # no candidate of this cohort yet: its windows wait
            log.warning("cohort %s: %s", cohort or "(none)", e)
    if not pools:
        raise ValueError("no cohort of %s has candidates in the repository" % list(cohorts))
    return CohortPools(pools)


def pool_from_repository(root=None, cohort: dict | None = None,
                         previous: PoolInferenceEngine | None = None) -> PoolInferenceEngine:
    """The pool of the model repository's candidates for the devices' cohort (see pool_ids); with a cohort (a
    device's: machine, channel, rate_hz, feature_set), its candidates only, voting only on its devices' windows;
    `previous` itself when it already is that pool (a model id names one trained forest)."""
    from tinyml_dagster import settings
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(root or settings.models_dir())
    ids = cohort_candidates(repo, cohort) if cohort else pool_ids(repo)
    if not ids:
        raise ValueError("the model repository under %s holds no candidate models yet" % repo.root)
    thresholds = [float(repo.get(m).get("threshold") or DEFAULT_THRESHOLD) for m in ids]
    sets = {m: repo.config(m).get("feature_set", "paper") for m in ids}
    if len(set(sets.values())) > 1:
        raise ValueError("the candidates of one pool must share a feature set, got %s" % sets)
    if (previous is not None and previous.model_ids == ids and previous.thresholds.tolist() == thresholds
            and previous.feature_set == next(iter(sets.values())) and previous.cohort == cohort):
        return previous
    pool = PoolInferenceEngine.from_forests(ids, [repo.load_forest(m) for m in ids], thresholds,
                                            feature_set=next(iter(sets.values())))
    pool.cohort = cohort
    return pool
