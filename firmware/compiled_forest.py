"""A champion compiled to MicroPython bytecode at load: each group of trees becomes one expression of nested ifs.

The node-array walk of `isoforest.Forest` spends ~20 bytecodes per node (subscripts, compares, index arithmetic);
a tree compiled to `(57 if q0<-1234 else ...)` spends 4. The compact bytes stay the storage and wire form; the
device compiles them here, TREES_PER_FUNCTION trees at a time so the compiler's transient memory stays small,
and then holds only the bytecode. To keep that bytecode small, every constant is a short varint: thresholds are
centred (q - 32768) and leaf codes offset by -64, the offsets added back once per window; a group's trees sit on
one source line (no line-number table). Scores are the same integers summed, so they equal Forest's exactly.

The gateway can do the compiling instead: `module_source` is the same groups as one module (the runtime module),
which it compiles with mpy-cross into a .mpy that `PrecompiledForest` imports without compiling anything.
"""

import math
import os
import sys

from firmware import isoforest

TREES_PER_FUNCTION = 5
Q_CENTRE = 32768
LEAF_OFFSET = 64

# one globals dict shared by every compiled group (a dict per function would cost ~100 B each)
_GLOBALS = {}
# the generated scoring functions, per feature count: code shared by every champion (current and previous)
_SCORERS = {}


def tree_expression(forest, root):
    """One tree as a nested conditional expression of the centred features q0, q1, ... (leaf codes - 64)."""
    nf = forest.nf
    nt = forest.nt
    nr = forest.nr
    leaf_base = isoforest.LEAF_FLAG + LEAF_OFFSET

    def expr(i):  # recursion as deep as the tree: <= height limit + 1 = 8 for psi <= 128
        f = nf[i]
        if f & isoforest.LEAF_FLAG:
            return str(f - leaf_base)
        return "(%s if q%d<%d else %s)" % (expr(i + 1), f, nt[i] - Q_CENTRE, expr(i + nr[i]))

    return expr(root)


def group_source(forest, roots):
    """`def t(q0, q1, ...)` returning the summed (offset) leaf codes of the trees at roots, on one line."""
    args = ",".join("q%d" % f for f in range(forest.n_features))
    return "def t(%s):return %s" % (args, "+".join(tree_expression(forest, r) for r in roots))


def module_source(forest):
    """The runtime module of a forest: H = (n_features, n_trees, psi), G = the groups' lambdas, one per line."""
    args = ",".join("q%d" % f for f in range(forest.n_features))
    roots = forest.roots
    lines = ["H=(%d,%d,%d)" % (forest.n_features, forest.n_trees, forest.psi), "G=("]
    for k in range(0, len(roots), TREES_PER_FUNCTION):
        lines.append("lambda %s:%s," % (args, "+".join(tree_expression(forest, r)
                                                       for r in roots[k:k + TREES_PER_FUNCTION])))
    lines.append(")")
    return "\n".join(lines) + "\n"


def _compile(source, name):
    exec(source, _GLOBALS)
    return _GLOBALS.pop(name)


def _scorer(n_features):
    """`score(x, scales, bases, groups, offset, k)`: quantise (as isoforest.quantise), centre, sum, exp, in one call.

    Unrolled over the features with the grid in locals: the per-window overhead that dominates small forests.
    """
    lines = ["def score(x,S,B,groups,offset,k):"]
    lines.append(" " + ",".join("S%d" % f for f in range(n_features)) + ",=S")
    lines.append(" " + ",".join("B%d" % f for f in range(n_features)) + ",=B")
    for f in range(n_features):
        lines.append(" v=x[%d]" % f)
        lines.append(" if v!=v:raise ValueError('feature %d is NaN')" % f)
        lines.append(" q=int(floor(v*S%d+0.5))-B%d if -1e30<v<1e30 else (0 if v<0 else 65535)" % (f, f))
        lines.append(" q%d=(0 if q<0 else (65535 if q>65535 else q))-%d" % (f, Q_CENTRE))
    args = ",".join("q%d" % f for f in range(n_features))
    lines += [" s=offset", " for t in groups:", "  s+=t(%s)" % args, " return exp(k*s)"]
    _GLOBALS["floor"] = math.floor
    _GLOBALS["exp"] = math.exp
    return _compile("\n".join(lines), "score")


def _path_summer(n_features):
    """`ps(groups, q, offset)`: a quantised q centred into locals once, the groups' sums and the offsets added."""
    args = ",".join("q%d" % f for f in range(n_features))
    centred = ",".join("q[%d]-%d" % (f, Q_CENTRE) for f in range(n_features))
    return _compile("def ps(groups,q,offset):\n %s,=%s,\n s=offset\n for t in groups:\n  s+=t(%s)\n return s"
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
        groups = []
        for k in range(0, len(roots), TREES_PER_FUNCTION):
            groups.append(_compile(group_source(forest, roots[k:k + TREES_PER_FUNCTION]), "t"))
            if collect is not None:
                collect()
        self._hold(forest.n_features, forest.n_trees, forest.psi, forest.grid, tuple(groups))

    def _hold(self, n_features, n_trees, psi, grid, groups):
        self.n_features = n_features
        self.n_trees = n_trees
        self.psi = psi
        self.grid = [[int(g[0]), int(g[1])] for g in grid]
        # as isoforest.Forest computes it, so the scores are the same floats
        self._k = -math.log(2.0) / (isoforest.LEAF_STEP * n_trees * isoforest.c(psi))
        self._offset = LEAF_OFFSET * n_trees
        self.groups = groups
        self._path_sum, self._score = scorers(n_features)
        sgrid = isoforest.scaled_grid(grid)
        self._scales = tuple(g[2] for g in sgrid)
        self._bases = tuple(g[1] for g in sgrid)

    def path_sum(self, q):
        """Sum over trees of the leaf codes (path lengths in 1/8 steps) for a quantised vector q."""
        return self._path_sum(self.groups, q, self._offset)

    def score_q(self, q):
        """Anomaly score (0..1) of a quantised feature vector."""
        return math.exp(self._k * self.path_sum(q))

    def score(self, x):
        """Anomaly score (0..1) of a raw feature vector (floats, in the model's feature order)."""
        return self._score(x, self._scales, self._bases, self.groups, self._offset, self._k)


class PrecompiledForest(CompiledForest):
    """A CompiledForest from an imported runtime module (`module_source`, precompiled to .mpy): nothing compiled."""

    def __init__(self, module, grid):
        n_features, n_trees, psi = module.H
        if len(grid) != n_features:
            raise ValueError("grid has %d features, runtime module has %d" % (len(grid), n_features))
        if len(module.G) != (n_trees + TREES_PER_FUNCTION - 1) // TREES_PER_FUNCTION:
            raise ValueError("runtime module has %d groups for %d trees" % (len(module.G), n_trees))
        self._hold(n_features, n_trees, psi, grid, module.G)
