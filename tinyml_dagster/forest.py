"""Pool scorer: the numpy twin of firmware.isoforest, reading the same compact bytes and giving the same scores.

The compact bytes are decoded into node arrays (feature, threshold, left, right, leaf code; leaves point to
themselves), the windows are quantised on each model's grid exactly as the firmware does (clip(floor(x * 2**e
+ 0.5) - base, 0, 65535)), and every (tree, window) pair is brought to its leaf with vectorised lookups (see
PoolScorer). Scores are exp(k * expected path sum) with the firmware's k and its out-of-range isolation
(`out_of_range_path_sums`), so they match `firmware.isoforest.Forest.score` to float rounding (tested < 1e-9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from firmware import isoforest

CHUNK_WINDOWS = 256  # windows per vectorised step: (windows x trees) temporaries stay in cache
HEAP_MAX_DEPTH = 12  # deeper trees (only hand-made ones: training caps the height at 7) walk node arrays instead
RANK_MAX_FEATURES = 4  # rank tables (a product over the features) beyond this cost more than they save
RANK_MAX_TABLE = 1 << 25  # leaf-table entries (bytes) above which the pool falls back to walking the trees
RANK_CHUNK_PAIRS = 1 << 20  # (tree, window) pairs per lookup step


@dataclass(frozen=True)
class TreeArrays:
    """A compact forest decoded into node arrays (all trees, node ids global to the forest)."""

    feature: np.ndarray  # int32, 0 for leaves
    threshold: np.ndarray  # int32, 0 for leaves
    left: np.ndarray  # int32 node id; a leaf points to itself
    right: np.ndarray  # int32 node id; a leaf points to itself
    leaf: np.ndarray  # int64 leaf code (path length in 1/8 steps), 0 for internal nodes
    roots: np.ndarray  # int32 node id of each tree's root
    depth: int  # deepest leaf


def decode(forest: isoforest.Forest) -> TreeArrays:
    """A Forest's node arrays (the firmware's own unpacking of the compact bytes, pre-order) as numpy arrays."""
    nf = np.frombuffer(bytes(forest.nf), dtype=np.uint8).astype(np.int32)
    nt = np.asarray(forest.nt, dtype=np.int32)
    nr = np.asarray(forest.nr, dtype=np.int32)
    node = np.arange(len(nf), dtype=np.int32)
    is_leaf = (nf & isoforest.LEAF_FLAG) != 0
    left = np.where(is_leaf, node, node + 1)  # a leaf points to itself
    right = np.where(is_leaf, node, node + nr)
    # depths, one tree level settled per pass (a JSON-loaded forest may be deeper than the height limit)
    depth = np.zeros(len(nf), dtype=np.int32)
    internal = np.flatnonzero(~is_leaf)
    while True:
        deeper = depth.copy()
        deeper[left[internal]] = depth[internal] + 1
        deeper[right[internal]] = depth[internal] + 1
        if np.array_equal(deeper, depth):
            break
        depth = deeper
    return TreeArrays(
        feature=np.where(is_leaf, 0, nf),
        threshold=np.where(is_leaf, 0, nt),
        left=left,
        right=right,
        leaf=np.where(is_leaf, nf & 127, 0).astype(np.int64),
        roots=np.asarray(forest.roots, dtype=np.int32),
        depth=int(depth[is_leaf].max()),
    )


def quantise(X: np.ndarray, grid: Sequence[Sequence[int]]) -> np.ndarray:
    """Raw feature matrix (n, d) -> int32 grid integers, exactly as firmware.isoforest.quantise."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(grid):
        raise ValueError(f"feature matrix has shape {X.shape}, the model's grid has {len(grid)} features")
    bad = np.argwhere(np.isnan(X))
    if len(bad):
        row, col = bad[0]
        raise ValueError(f"feature matrix row {row} feature {col} is NaN")
    scale = np.array([2.0 ** int(e) for e, _ in grid])
    base = np.array([float(b) for _, b in grid])
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.floor(X * scale + 0.5) - base
    return np.clip(q, 0, isoforest.Q_MAX).astype(np.int32)


class PoolScorer:
    """Scores windows with many compact forests at once (the Pool Inference Engine's hot path).

    method "rank" (the default): a tree's leaf depends only on the window's rank among the tree's thresholds on
    each feature, so each model maps grid values to ranks (one lookup per feature and window), and each tree maps
    those ranks to its leaf code through a small table: 4 lookups per (tree, window), whatever the depth.
    method "heap" (fallback for more than RANK_MAX_FEATURES features or tables over RANK_MAX_TABLE bytes): each
    tree laid out as a complete binary tree of depth D (children of slot s at 2s+1, 2s+2; shallow leaves pushed
    down along always-right slots),
    walked D vectorised steps; trees deeper than HEAP_MAX_DEPTH walk node arrays.
    """

    def __init__(self, forests: Sequence[isoforest.Forest], method: str = "auto"):
        if method not in ("auto", "rank", "heap"):
            raise ValueError(f"method must be auto, rank or heap, got {method!r}")
        if not forests:
            raise ValueError("PoolScorer needs at least one forest")
        d = forests[0].n_features
        for i, f in enumerate(forests):
            if f.n_features != d:
                raise ValueError(f"forest {i} has {f.n_features} features, forest 0 has {d}")
        self.n_features = d
        self.forests = list(forests)
        decoded = [decode(f) for f in self.forests]
        self.depth = max(t.depth for t in decoded)
        self.k = np.array([f._k for f in self.forests])
        self.split_lo = np.array([f.split_lo for f in self.forests], dtype=np.int64)  # (models, features)
        self.split_hi = np.array([f.split_hi for f in self.forests], dtype=np.int64)
        self.model_n_trees = np.array([f.n_trees for f in self.forests], dtype=np.int64)
        tree_model = np.concatenate([np.full(len(t.roots), m, dtype=np.intp) for m, t in enumerate(decoded)])
        # trees of one model are contiguous: reduceat boundaries
        self.model_first_tree = np.searchsorted(tree_model, np.arange(len(self.forests)))
        self.n_trees = len(tree_model)
        self._rank = None
        self._nodes = None
        if method == "rank" or (method == "auto" and d <= RANK_MAX_FEATURES):
            self._rank = _rank_tables(decoded, d, RANK_MAX_TABLE if method == "auto" else None)
            if self._rank is not None:
                self.method = "rank"
                return
        if self.depth > HEAP_MAX_DEPTH:
            self._nodes = _stack_nodes(decoded, d)
            self.method = "nodes"
            return
        self.method = "heap"
        slots = (1 << (self.depth + 1)) - 1
        n_trees = self.n_trees
        feature = np.zeros((n_trees, slots), dtype=np.intp)
        threshold = np.zeros((n_trees, slots), dtype=np.int32)
        leaf = np.zeros((n_trees, slots), dtype=np.int64)
        first_leaf_slot = (1 << self.depth) - 1
        row = 0
        for m, t in enumerate(decoded):
            for root in t.roots:
                stack = [(int(root), 0)]
                while stack:
                    node, slot = stack.pop()
                    if t.left[node] == node:
                        while slot < first_leaf_slot:  # threshold 0: every window goes right
                            feature[row, slot] = m * d
                            slot = 2 * slot + 2
                        leaf[row, slot] = t.leaf[node]
                        continue
                    feature[row, slot] = m * d + t.feature[node]  # column in the stacked quantised matrix
                    threshold[row, slot] = t.threshold[node]
                    stack.append((int(t.left[node]), 2 * slot + 1))
                    stack.append((int(t.right[node]), 2 * slot + 2))
                row += 1
        self.slots = slots
        self.feature = feature.ravel()
        self.threshold = threshold.ravel()
        self.leaf = leaf.ravel()

    def quantised(self, X: np.ndarray) -> np.ndarray:
        """(n_windows, n_models * n_features) grid integers, model after model."""
        return np.concatenate([quantise(X, f.grid) for f in self.forests], axis=1)

    def path_sums(self, X: np.ndarray) -> np.ndarray:
        """(n_windows, n_models) int64 sums of leaf codes, as Forest.path_sum on each row."""
        return self._path_sums(self.quantised(X))

    def _path_sums(self, Q: np.ndarray) -> np.ndarray:
        """path_sums of quantised windows (n_windows, n_models * n_features)."""
        n, width = Q.shape
        out = np.empty((n, len(self.forests)), dtype=np.int64)
        if self._rank is not None:
            return self._path_sums_rank(Q, out)
        if self._nodes is not None:
            return self._path_sums_nodes(Q, out)
        tree_base = (np.arange(self.n_trees, dtype=np.intp) * self.slots)[None, :]
        for lo in range(0, n, CHUNK_WINDOWS):
            hi = min(n, lo + CHUNK_WINDOWS)
            flat = Q[lo:hi].ravel()
            row_base = (np.arange(hi - lo, dtype=np.intp) * width)[:, None]
            slot = np.zeros((hi - lo, self.n_trees), dtype=np.intp)
            for _ in range(self.depth):
                g = slot + tree_base
                go_right = np.take(flat, np.take(self.feature, g) + row_base) >= np.take(self.threshold, g)
                slot = 2 * slot + 1 + go_right
            codes = np.take(self.leaf, slot + tree_base)  # (windows, trees)
            out[lo:hi] = np.add.reduceat(codes, self.model_first_tree, axis=1)
        return out

    def _path_sums_rank(self, Q: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Per model: a window's rank among the model's thresholds per feature, then per tree two small lookups."""
        d = self.n_features
        n = Q.shape[0]
        for m, model in enumerate(self._rank):
            ranks = [np.take(model.rank_of[f], Q[:, m * d + f]) for f in range(d)]
            chunk = max(1, RANK_CHUNK_PAIRS // len(model.table_base))
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                idx = np.take(model.local[0], ranks[0][lo:hi], axis=1)
                for f in range(1, d):
                    idx += np.take(model.local[f], ranks[f][lo:hi], axis=1)
                out[lo:hi, m] = np.take(model.table, idx).sum(axis=0, dtype=np.int64)
        return out

    def _path_sums_nodes(self, Q: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Slower general walk over node arrays (next node = child[2 * node + go_right]), for deep trees."""
        feature, threshold, child, leaf, roots = self._nodes
        n, width = Q.shape
        for lo in range(0, n, CHUNK_WINDOWS):
            hi = min(n, lo + CHUNK_WINDOWS)
            flat = Q[lo:hi].ravel()
            row_base = (np.arange(hi - lo, dtype=np.intp) * width)[:, None]
            node = np.repeat(roots[None, :], hi - lo, axis=0)
            for _ in range(self.depth):
                go_right = np.take(flat, np.take(feature, node) + row_base) >= np.take(threshold, node)
                node = np.take(child, 2 * node + go_right)
            out[lo:hi] = np.add.reduceat(np.take(leaf, node), self.model_first_tree, axis=1)
        return out

    def expected_path_sums(self, X: np.ndarray) -> np.ndarray:
        """(n_windows, n_models) path sums with out-of-range isolation, as Forest.expected_path_sum on each row."""
        Q = self.quantised(X)
        share = out_of_range_shares(Q.reshape(len(Q), len(self.forests), self.n_features), self.split_lo,
                                    self.split_hi)
        return out_of_range_path_sums(self._path_sums(Q), share, self.model_n_trees)

    def scores(self, X: np.ndarray) -> np.ndarray:
        """(n_windows, n_models) anomaly scores in 0..1, with out-of-range isolation."""
        return np.exp(self.k[None, :] * self.expected_path_sums(X))


def out_of_range_shares(Q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """isoforest.out_of_range_share of quantised windows Q (n, models, features) for each model's split ranges
    lo, hi (models, features): (n, models), summed over the features in the firmware's order."""
    Q = Q.astype(np.int64)
    excess = np.maximum(0, np.maximum(Q - hi, lo - Q))
    part = np.divide(excess, (hi - lo) + excess, out=np.zeros(excess.shape), where=excess > 0)
    total = np.zeros(part.shape[:2])
    for f in range(part.shape[2]):
        total += part[:, :, f]
    return total / part.shape[2]


def out_of_range_path_sums(path_sums: np.ndarray, share: np.ndarray, n_trees: np.ndarray) -> np.ndarray:
    """isoforest.out_of_range_path_sum, elementwise: (n, models) path sums, shares and each model's tree count."""
    steps = (isoforest.LEAF_STEP * np.asarray(n_trees, dtype=np.int64)).astype(np.float64)
    out = path_sums.astype(np.float64)
    beyond = share > 0
    if beyond.any():
        steps = np.broadcast_to(steps, out.shape)[beyond]
        p = share[beyond]
        out[beyond] = steps * (1.0 - (1.0 - p) ** (out[beyond] / steps)) / p
    return out


@dataclass(frozen=True)
class _RankModel:
    """Lookup tables of one model: a tree's leaf is a function of the window's rank among its thresholds."""

    thresholds: list  # per feature: the model's distinct thresholds, sorted (int32)
    rank_of: list  # per feature: grid value q (0..65535) -> how many of those thresholds are <= q (uint16)
    local: list  # per feature: (trees, distinct thresholds + 1) maps, model rank -> table offset (tree rank * stride)
    table: np.ndarray  # concatenated per-tree leaf-code tables (uint8), indexed by the sum of the offsets
    table_base: np.ndarray  # each tree's start in `table`


def _leaves_at(t: TreeArrays, root: int, q: np.ndarray) -> np.ndarray:
    """Leaf codes of one tree for quantised points q (P, d): a vectorised walk of the node arrays."""
    node = np.full(len(q), root, dtype=np.intp)
    rows = np.arange(len(q))
    for _ in range(t.depth):
        go_right = q[rows, t.feature[node]] >= t.threshold[node]
        node = np.where(go_right, t.right[node], t.left[node])  # leaves point to themselves
    return t.leaf[node]


def _rank_tables(decoded: Sequence[TreeArrays], d: int, max_entries: int | None) -> list | None:
    """Rank tables of every model, or None when they would exceed max_entries leaf-table entries in total.

    For a tree, whether a window goes right at a node on feature f (q_f >= t) depends only on r_f = how many of
    the tree's distinct thresholds on f are <= q_f; so the leaf is table[r_0, ..., r_{d-1}]. The table is filled
    by walking the tree at one representative point per cell (the r_f-th threshold, or 0 for r_f = 0).
    """
    total = 0
    plans = []
    for t in decoded:
        internal = t.left != np.arange(len(t.left))
        tree_of = np.searchsorted(t.roots, np.arange(len(t.left)), side="right") - 1
        per_tree = []
        for k in range(len(t.roots)):
            mine = internal & (tree_of == k)
            uniq = [np.unique(t.threshold[mine & (t.feature == f)]) for f in range(d)]
            size = int(np.prod([len(u) + 1 for u in uniq]))
            total += size
            per_tree.append(uniq)
        plans.append(per_tree)
        if max_entries is not None and total > max_entries:
            return None
    models = []
    for t, per_tree in zip(decoded, plans):
        model_thr = [np.unique(np.concatenate([u[f] for u in per_tree])).astype(np.int32) for f in range(d)]
        local = [[] for _ in range(d)]
        tables, table_base = [], []
        tbase = 0
        for k, uniq in enumerate(per_tree):
            shape = [len(u) + 1 for u in uniq]
            strides = np.cumprod([1] + shape[::-1][:-1])[::-1]  # C order
            for f in range(d):
                # model rank R -> rank in this tree, times the stride; the tree's table base folded into feature 0
                to_tree = np.concatenate([[0], np.searchsorted(uniq[f], model_thr[f], side="right")])
                local[f].append(to_tree * int(strides[f]) + (tbase if f == 0 else 0))
            reps = [np.concatenate([[0], u]) for u in uniq]
            grid = np.stack([g.ravel() for g in np.meshgrid(*reps, indexing="ij")], axis=1)
            tables.append(_leaves_at(t, int(t.roots[k]), grid).astype(np.uint8))
            table_base.append(tbase)
            tbase += len(grid)
        models.append(_RankModel(
            thresholds=model_thr,
            rank_of=[np.searchsorted(u, np.arange(isoforest.Q_MAX + 1), side="right").astype(np.uint16)
                     for u in model_thr],
            local=[np.stack(x).astype(np.intp) for x in local],
            table=np.concatenate(tables),
            table_base=np.asarray(table_base, dtype=np.intp),
        ))
    return models


def _stack_nodes(decoded: Sequence[TreeArrays], d: int) -> tuple[np.ndarray, ...]:
    """Node arrays of all models, node ids made global; features as columns of the stacked quantised matrix."""
    feats, thrs, childs, leaves, roots = [], [], [], [], []
    offset = 0
    for m, t in enumerate(decoded):
        feats.append(t.feature.astype(np.intp) + m * d)
        thrs.append(t.threshold)
        childs.append(np.stack([t.left, t.right], axis=1).ravel().astype(np.intp) + offset)
        leaves.append(t.leaf)
        roots.append(t.roots.astype(np.intp) + offset)
        offset += len(t.feature)
    return (np.concatenate(feats), np.concatenate(thrs), np.concatenate(childs), np.concatenate(leaves),
            np.concatenate(roots))


def score_forest(forest: isoforest.Forest, X: np.ndarray) -> np.ndarray:
    """Scores of one forest on a feature matrix (n, d)."""
    return PoolScorer([forest]).scores(X)[:, 0]
