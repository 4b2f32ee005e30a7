"""A champion compiled to MicroPython bytecode at load: one small function of nested ifs per tree.

The node-array walk of `isoforest.Forest` spends ~20 bytecodes per node (subscripts, compares, index arithmetic);
a tree compiled to `if q0 < 31337: ... return 57` spends ~4. The compact bytes stay the storage and wire form;
the device compiles them here, one tree at a time so the compiler's transient memory stays small, and then holds
only the bytecode (~6 B per node: 22 KB for a 50-tree psi=100 forest, less than the node arrays + the interpreter
work they cost). Scores are the same integers summed in the same order, so they equal Forest's exactly.
"""

import hashlib
import math

from firmware import isoforest

# one globals dict shared by every compiled tree (a dict per tree would cost ~100 B each)
_GLOBALS = {}


def tree_source(forest, root):
    """MicroPython source of one tree: `def t(q0, q1, ...)` returning the leaf code (path length in 1/8 steps)."""
    nf = forest.nf
    nt = forest.nt
    nr = forest.nr
    args = ",".join("q%d" % f for f in range(forest.n_features))
    lines = ["def t(" + args + "):"]
    # explicit stack of (node, indent); a negative node marks the `else:` before a right subtree
    stack = [(root, 1)]
    while stack:
        i, ind = stack.pop()
        if i < 0:
            lines.append(" " * ind + "else:")
            i = -i - 1
            ind += 1
        f = nf[i]
        if f & isoforest.LEAF_FLAG:
            lines.append(" " * ind + "return %d" % (f - isoforest.LEAF_FLAG))
            continue
        lines.append(" " * ind + "if q%d<%d:" % (f, nt[i]))
        stack.append((-(i + nr[i]) - 1, ind))
        stack.append((i + 1, ind + 1))
    return "\n".join(lines)


def _path_summer(n_features):
    """`ps(trees, q)`: the trees' leaf codes summed, q unpacked into locals once (cheaper than t(*q) per tree)."""
    args = ",".join("q%d" % f for f in range(n_features))
    exec("def ps(trees,q):\n %s,=q\n s=0\n for t in trees:\n  s+=t(%s)\n return s" % (args, args), _GLOBALS)
    return _GLOBALS.pop("ps")


def compile_tree(forest, root):
    """The compiled function of the tree rooted at node `root` of a Forest."""
    exec(tree_source(forest, root), _GLOBALS)
    return _GLOBALS.pop("t")


class CompiledForest:
    """Scores like isoforest.Forest (same values), from per-tree bytecode; keeps no node arrays."""

    def __init__(self, forest, collect=None):
        self.n_features = forest.n_features
        self.n_trees = forest.n_trees
        self.psi = forest.psi
        self.grid = forest.grid
        self.sha256 = hashlib.sha256(forest.to_bytes()).digest()  # which compact bytes this was compiled from
        self._sgrid = forest._sgrid
        self._k = forest._k
        self._q = [0] * self.n_features
        trees = []
        for root in forest.roots:
            trees.append(compile_tree(forest, root))
            if collect is not None:
                collect()
        self.trees = tuple(trees)
        self._path_sum = _path_summer(self.n_features)

    def path_sum(self, q):
        """Sum over trees of the leaf codes (path lengths in 1/8 steps) for a quantised vector q."""
        return self._path_sum(self.trees, q)

    def score_q(self, q):
        """Anomaly score (0..1) of a quantised feature vector."""
        return math.exp(self._k * self.path_sum(q))

    def score(self, x):
        """Anomaly score (0..1) of a raw feature vector (floats, in the model's feature order)."""
        return self.score_q(isoforest.quantise(x, self._sgrid, self._q))
