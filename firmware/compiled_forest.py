"""A champion compiled to MicroPython bytecode at load: each group of trees becomes one expression of nested ifs.

The node-array walk of `isoforest.Forest` spends ~20 bytecodes per node (subscripts, compares, index arithmetic);
a tree compiled to `(57 if q0<-1234 else ...)` spends 4. The compact bytes stay the storage and wire form; the
device compiles them here, TREES_PER_FUNCTION trees at a time so the compiler's transient memory stays small,
and then holds only the bytecode. To keep that bytecode small, every constant is a short varint: each feature is
centred on the middle of its thresholds' range (2-byte constants instead of 3) and the leaf codes are offset so
that most fall in -16..47 (one-byte constants), the offsets added back once per window; a group's trees sit on one
source line (no line-number table); a split whose two sides are the same expression (common: two singleton leaves
at one depth) is left out. Scores are the same integers summed, so they equal Forest's exactly; the out-of-range
isolation (isoforest's module docstring) adds two compares per feature against the forest's split ranges.

The gateway can do the compiling instead: `module_source` is the same groups as one module (the runtime module),
which it compiles with mpy-cross into a .mpy that `PrecompiledForest` imports without compiling anything.
"""

import math
import os
import sys

from firmware import isoforest

TREES_PER_FUNCTION = 5
SMALL_INT_MIN = -16  # MicroPython's one-byte integer constants: -16..47
SMALL_INT_SPAN = 64

# one globals dict shared by every compiled group (a dict per function would cost ~100 B each)
_GLOBALS = {}
# the generated scoring functions, per feature count: code shared by every champion (current and previous)
_SCORERS = {}


def layout(forest):
    """(centres, leaf offset): per feature the middle of its split range (of the whole grid when no split uses it); the
    offset putting most leaf codes in -16..47."""
    nf = forest.nf
    counts = [0] * isoforest.LEAF_FLAG
    for i in range(len(nf)):
        f = nf[i]
        if f & isoforest.LEAF_FLAG:
            counts[f - isoforest.LEAF_FLAG] += 1
    lo = forest.split_lo
    hi = forest.split_hi
    centres = tuple((lo[f] + hi[f] + 1) // 2 for f in range(forest.n_features))
    best, held = 0, sum(counts[:SMALL_INT_SPAN])
    run = held
    for start in range(1, len(counts) - SMALL_INT_SPAN + 1):
        run += counts[start + SMALL_INT_SPAN - 1] - counts[start - 1]
        if run > held:
            best, held = start, run
    return centres, best - SMALL_INT_MIN


def tree_expression(forest, root, centres, leaf_offset):
    """One tree as a nested conditional expression of the centred features q0, q1, ... (leaf codes - offset)."""
    nf = forest.nf
    nt = forest.nt
    nr = forest.nr
    leaf_base = isoforest.LEAF_FLAG + leaf_offset

    def expr(i):  # recursion as deep as the tree: <= height limit + 1 = 8 for psi <= 128
        f = nf[i]
        if f & isoforest.LEAF_FLAG:
            return str(f - leaf_base)
        left = expr(i + 1)
        right = expr(i + nr[i])
        if left == right:  # a split between equal leaves (two singletons at one depth) cannot change the sum
            return left
        return "(%s if q%d<%d else %s)" % (left, f, nt[i] - centres[f], right)

    return expr(root)


def group_source(forest, roots, centres, leaf_offset):
    """`def t(q0, q1, ...)` returning the summed (offset) leaf codes of the trees at roots, on one line."""
    args = ",".join("q%d" % f for f in range(forest.n_features))
    return "def t(%s):return %s" % (args, "+".join(tree_expression(forest, r, centres, leaf_offset) for r in roots))


def module_source(forest):
    """The runtime module of a forest: H = (n_features, n_trees, psi), C = the centres, R = the split ranges
    (lows, highs), L = the leaf offset, G = the groups' lambdas, one per line."""
    args = ",".join("q%d" % f for f in range(forest.n_features))
    roots = forest.roots
    centres, leaf_offset = layout(forest)
    lines = ["H=(%d,%d,%d)" % (forest.n_features, forest.n_trees, forest.psi),
             "C=(%s,)" % ",".join(str(c) for c in centres),
             "R=((%s,),(%s,))" % (",".join(str(v) for v in forest.split_lo), ",".join(str(v) for v in forest.split_hi)),
             "L=%d" % leaf_offset, "G=("]
    for k in range(0, len(roots), TREES_PER_FUNCTION):
        lines.append("lambda %s:%s," % (args, "+".join(tree_expression(forest, r, centres, leaf_offset)
                                                       for r in roots[k:k + TREES_PER_FUNCTION])))
    lines.append(")")
    return "\n".join(lines) + "\n"


def _compile(source, name):
    exec(source, _GLOBALS)
    return _GLOBALS.pop(name)


def _scorer(n_features):
    """`score(x, scales, bases, centres, lows, highs, widths, groups, offset, k, n_trees)`: quantise (as
    isoforest.quantise), centre, out-of-range share (as isoforest.out_of_range_share, on centred lows and highs),
    sum, exp, in one call.

    Unrolled over the features with the grid in locals: the per-window overhead that dominates small forests.
    """
    lines = ["def score(x,S,B,C,D,U,W,groups,offset,k,n):"]
    for name in "SBCDUW":
        lines.append(" " + ",".join("%s%d" % (name, f) for f in range(n_features)) + ",=" + name)
    lines.append(" p=0.0")
    for f in range(n_features):
        lines.append(" v=x[%d]" % f)
        lines.append(" if v!=v:raise ValueError('feature %d is NaN')" % f)
        lines.append(" q=int(floor(v*S%d+0.5))-B%d if -1e30<v<1e30 else (0 if v<0 else 65535)" % (f, f))
        lines.append(" q%d=(0 if q<0 else (65535 if q>65535 else q))-C%d" % (f, f))
        lines.append(" if q%d>U%d:e=q%d-U%d;p+=e/(W%d+e)" % (f, f, f, f, f))
        lines.append(" elif q%d<D%d:e=D%d-q%d;p+=e/(W%d+e)" % (f, f, f, f, f))
    args = ",".join("q%d" % f for f in range(n_features))
    lines += [" s=offset", " for t in groups:", "  s+=t(%s)" % args,
              " return exp(k*(oor(s,p/%d,n) if p else s))" % n_features]
    _GLOBALS["floor"] = math.floor
    _GLOBALS["exp"] = math.exp
    _GLOBALS["oor"] = isoforest.out_of_range_path_sum
    return _compile("\n".join(lines), "score")


def _path_summer(n_features):
    """`ps(groups, q, centres, offset)`: a quantised q centred into locals once, the groups' sums and the offsets
    added."""
    args = ",".join("q%d" % f for f in range(n_features))
    centred = ",".join("q[%d]-C[%d]" % (f, f) for f in range(n_features))
    return _compile("def ps(groups,q,C,offset):\n %s,=%s,\n s=offset\n for t in groups:\n  s+=t(%s)\n return s"
                    % (args, centred, args), "ps")


def scorers(n_features):
    """(path summer, scorer) for forests of n_features: generated once, shared by every champion."""
    if n_features not in _SCORERS:
        _SCORERS[n_features] = (_path_summer(n_features), _scorer(n_features))
    return _SCORERS[n_features]


def import_runtime(path, file_name):
    """The runtime module <path>/<file_name> (a .mpy) imported under a throwaway name; ValueError when unloadable."""
    name = file_name.rsplit(".", 1)[0]
    if not file_name.endswith(".mpy") or "." in name:
        raise ValueError("runtime file %s: not a <name>.mpy" % file_name)
    try:
        os.stat(path + "/" + file_name)
    except OSError:
        raise ValueError("runtime file %s/%s: missing" % (path, file_name)) from None
    sys.modules.pop(name, None)
    sys.path.insert(0, path)
    try:
        return __import__(name)
    except ImportError as e:  # CPython: no .mpy loader
        raise ValueError("cannot import %s: %s" % (file_name, e)) from None
    finally:
        sys.path.pop(0)
        sys.modules.pop(name, None)


class CompiledForest:
    """Scores like isoforest.Forest (same values), from compiled bytecode; keeps no node arrays."""

    def __init__(self, forest, collect=None):
        roots = forest.roots
        centres, leaf_offset = layout(forest)
        groups = []
        for k in range(0, len(roots), TREES_PER_FUNCTION):
            groups.append(_compile(group_source(forest, roots[k:k + TREES_PER_FUNCTION], centres, leaf_offset), "t"))
            if collect is not None:
                collect()
        self._hold(forest.n_features, forest.n_trees, forest.psi, forest.grid, tuple(groups), centres, leaf_offset,
                   forest.split_lo, forest.split_hi)

    def _hold(self, n_features, n_trees, psi, grid, groups, centres, leaf_offset, split_lo, split_hi):
        self.n_features = n_features
        self.n_trees = n_trees
        self.psi = psi
        self.grid = [[int(g[0]), int(g[1])] for g in grid]
        # as isoforest.Forest computes it, so the scores are the same floats
        self._k = -math.log(2.0) / (isoforest.LEAF_STEP * n_trees * isoforest.c(psi))
        self._offset = leaf_offset * n_trees
        self._centres = tuple(centres)
        self.split_lo = tuple(split_lo)
        self.split_hi = tuple(split_hi)
        # the ranges centred as the scorer's features, and their widths
        self._lows = tuple(split_lo[f] - centres[f] for f in range(n_features))
        self._highs = tuple(split_hi[f] - centres[f] for f in range(n_features))
        self._widths = tuple(split_hi[f] - split_lo[f] for f in range(n_features))
        self.groups = groups
        self._path_sum, self._score = scorers(n_features)
        sgrid = isoforest.scaled_grid(grid)
        self._scales = tuple(g[2] for g in sgrid)
        self._bases = tuple(g[1] for g in sgrid)

    def path_sum(self, q):
        """Sum over trees of the leaf codes (path lengths in 1/8 steps) for a quantised vector q."""
        return self._path_sum(self.groups, q, self._centres, self._offset)

    # the node walk's, on this forest's path_sum, split ranges, n_trees and _k: one formula for both
    expected_path_sum = isoforest.Forest.expected_path_sum
    score_q = isoforest.Forest.score_q

    def score(self, x):
        """Anomaly score (0..1) of a raw feature vector (floats, in the model's feature order)."""
        return self._score(x, self._scales, self._bases, self._centres, self._lows, self._highs, self._widths,
                           self.groups, self._offset, self._k, self.n_trees)


class PrecompiledForest(CompiledForest):
    """A CompiledForest from an imported runtime module (`module_source`, precompiled to .mpy): nothing compiled."""

    def __init__(self, module, grid):
        n_features, n_trees, psi = module.H
        if len(grid) != n_features:
            raise ValueError("grid has %d features, runtime module has %d" % (len(grid), n_features))
        if len(module.G) != (n_trees + TREES_PER_FUNCTION - 1) // TREES_PER_FUNCTION:
            raise ValueError("runtime module has %d groups for %d trees" % (len(module.G), n_trees))
        if len(module.C) != n_features:
            raise ValueError("runtime module has %d centres for %d features" % (len(module.C), n_features))
        ranges = getattr(module, "R", None)
        if ranges is None or len(ranges) != 2 or len(ranges[0]) != n_features or len(ranges[1]) != n_features:
            raise ValueError("runtime module has no split ranges R for %d features" % n_features)
        self._hold(n_features, n_trees, psi, grid, module.G, module.C, module.L, ranges[0], ranges[1])
