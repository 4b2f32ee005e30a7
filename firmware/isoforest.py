"""Isolation Forest for device and gateway: seeded training, compact byte form, scoring (MicroPython 1.27 and CPython).

Standard Isolation Forest (Liu, Ting, Zhou, ICDM 2008): each tree grows on psi rows drawn without replacement,
height limit ceil(log2 psi); a split takes a random (non-constant) feature and a uniform threshold between the
node's min and max; a row's path length is depth + c(leaf size); score = 2 ** (-E[h] / c(psi)) in 0..1.
(LibIsolationForest, used by the paper, treats "subsampling size" as a depth limit only and normalises by the
number of trees, so its scores are not comparable across forest sizes; this module does it the standard way.)

Everything is deterministic and integer-based so the device and the gateway build the same bytes:
- PRNG: xorshift32 seeded through a multiplicative hash (`Rng`); `below(k)` uses integers only.
- Grid: each feature is quantised to an unsigned 16-bit integer q = clamp(round_half_up(x * 2**e) - base, 0, 65535)
  with (e, base) per feature in the model config (`grid`). e is the largest power of two keeping the training
  range within 32767 steps; base leaves 16384 steps of headroom on each side. Multiplying by 2**e is exact in
  single and double precision, so the device and the gateway quantise the same float to the same integer.
  Values beyond the headroom clip, which changes no split decision (every threshold lies inside the training range).
- Split: go left when q[f] < t, with integer t uniform in [min + 1, max] of the node (both sides non-empty).
- Compact form (how a forest is stored and sent: the `compact` wire encoding before deflate):
    header (8 bytes): b"IF", version u8 (=1), n_features u8, n_trees u16 LE, psi u16 LE (effective psi);
    then the trees one after another, each flat in pre-order:
    internal node: feature u8 (< 0x80), threshold u16 LE, o u8 = byte offset from the node to its right child;
                   the left child is the next node (node + 4). When the left subtree is too large for a byte,
                   o = 0 and a u16 LE offset follows (left child at node + 6).
    leaf: one byte 0x80 | v, v = round((depth + c(size)) * 8), the precomputed path length in 1/8 steps.
  About 300 B per psi=100 tree, ~15 KB for 50 trees. psi <= 128 keeps every leaf value below 16.
- Runtime form: `Forest` unpacks the compact bytes into flat per-node arrays (see its docstring), ~4 B per node.

Out-of-range isolation: a plain forest scores every window beyond its training range like the most extreme
training window (the window lands in the same outermost leaves however far out it lies). The score here counts the
window as if it took part in its own isolation: per feature f the forest's range [lo_f, hi_f] is the min and max of
its split thresholds on f (the whole grid when no split uses f); a window's excess is e_f = max(0, q_f - hi_f,
lo_f - q_f); a node splitting on f at a uniform value over the range widened to include the window separates it
with probability e_f / (hi_f - lo_f + e_f), so with the node's feature drawn uniformly a node isolates it with
probability p = mean_f e_f / (hi_f - lo_f + e_f) (a lower bound: deeper nodes' ranges are narrower). Over the
forest's path length L (path_sum / (8 * n_trees)) the expected path length becomes E = (1 - (1 - p) ** L) / p:
E = L inside the range (p = 0: the plain score, bit for bit) and falls, so the score 2 ** (-E / c(psi)) rises, as
the window moves further out. Cost per window: 2 compares per feature, and a pow only beyond the range.
- Paper-like JSON form (nested dicts) for people and the paper's tooling: `to_json` / `from_json`.
Training and scoring use no recursion (an explicit stack of <= height + 1 entries) and small buffers.
"""

import math

try:
    from array import array
except ImportError:  # pragma: no cover - every MicroPython port we target has array
    array = None

FORMAT_VERSION = 1
MAGIC = b"IF"
HEADER_SIZE = 8
LEAF_FLAG = 0x80
LEAF_STEP = 8
MAX_PSI = 128
MAX_FEATURES = 127
Q_MAX = 65535
Q_SPAN = 32767
Q_HEADROOM = 16384
E_MIN = -40
E_MAX = 40
EULER_GAMMA = 0.5772156649015329
JSON_FORMAT = "isoforest-json-1"


def c(n):
    """Average path length of an unsuccessful BST search among n points (c(n) of the paper; c(2) = 1)."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return 2.0 * (math.log(n - 1) + EULER_GAMMA) - 2.0 * (n - 1) / n


def height_limit(psi):
    """ceil(log2 psi), computed with integers."""
    h = 0
    while (1 << h) < psi:
        h += 1
    return h


def leaf_code(depth, size):
    """Leaf byte value: depth + c(size) in 1/8 steps (0..127)."""
    v = int(math.floor((depth + c(size)) * LEAF_STEP + 0.5))
    return 127 if v > 127 else v


class Rng:
    """xorshift32 (13, 17, 5) with a hashed seed: the same seed gives the same stream on MicroPython and CPython.

    The 32-bit state is kept as two 16-bit halves so that every intermediate stays a small int (< 2**30):
    no big-int allocation per draw on the device.
    """

    def __init__(self, seed):
        s = (int(seed) * 2654435761 + 0x9E3779B9) & 0xFFFFFFFF
        if not s:
            s = 0x6D2B79F5
        self.hi = s >> 16
        self.lo = s & 0xFFFF
        for _ in range(4):
            self.step()

    def step(self):
        hi = self.hi
        lo = self.lo
        hi ^= ((hi << 13) | (lo >> 3)) & 0xFFFF  # x ^= x << 13
        lo ^= (lo << 13) & 0xFFFF
        lo ^= hi >> 1  # x ^= x >> 17
        hi ^= ((hi << 5) | (lo >> 11)) & 0xFFFF  # x ^= x << 5
        lo ^= (lo << 5) & 0xFFFF
        self.hi = hi
        self.lo = lo

    def next32(self):
        """The next 32-bit output (a big int on MicroPython: tests only; training uses below)."""
        self.step()
        return (self.hi << 16) | self.lo

    def below(self, k):
        """Uniform integer in [0, k), for 0 < k < 2**24 (top 24 bits, rejection against modulo bias)."""
        limit = 0x1000000 - 0x1000000 % k
        while True:
            self.step()
            r = (self.hi << 8) | (self.lo >> 8)
            if r < limit:
                return r % k


def _rnd(v):
    return int(math.floor(v + 0.5))


def grid_for_range(lo, hi):
    """(e, base) for one feature whose training values span lo..hi."""
    if not hi > lo:
        return [0, _rnd(lo) - Q_HEADROOM]
    e = 0
    while e > E_MIN and _rnd(hi * 2.0 ** e) - _rnd(lo * 2.0 ** e) > Q_SPAN:
        e -= 1
    while e < E_MAX and _rnd(hi * 2.0 ** (e + 1)) - _rnd(lo * 2.0 ** (e + 1)) <= Q_SPAN:
        e += 1
    return [e, _rnd(lo * 2.0 ** e) - Q_HEADROOM]


def make_grid(rows):
    """Per-feature integer grid [[e, base], ...] from training rows (lists of floats)."""
    d = len(rows[0])
    grid = []
    for f in range(d):
        lo = hi = rows[0][f]
        for r in rows:
            v = r[f]
            if v < lo:
                lo = v
            elif v > hi:
                hi = v
        grid.append(grid_for_range(lo, hi))
    return grid


def scaled_grid(grid):
    """[[e, base, 2.0 ** e], ...]: the grid with its scales precomputed (fewer float allocations per window)."""
    return [[int(g[0]), int(g[1]), 2.0 ** int(g[0])] for g in grid]


def quantise(x, grid, out=None):
    """Raw feature vector -> list (or `out`) of unsigned 16-bit grid integers; grid rows [e, base(, scale)]."""
    if out is None:
        out = [0] * len(grid)
    for f in range(len(grid)):
        g = grid[f]
        v = x[f]
        if v != v:
            raise ValueError("feature %d is NaN" % f)
        q = (int(math.floor(v * (g[2] if len(g) > 2 else 2.0 ** g[0]) + 0.5)) - g[1]
             if -1e30 < v < 1e30 else (0 if v < 0 else Q_MAX))
        out[f] = 0 if q < 0 else (Q_MAX if q > Q_MAX else q)
    return out


def _check_rows(rows):
    if not rows:
        raise ValueError("no training rows")
    d = len(rows[0])
    if not 0 < d <= MAX_FEATURES:
        raise ValueError("row 0 has %d features (1..%d allowed)" % (d, MAX_FEATURES))
    for i in range(len(rows)):
        r = rows[i]
        if len(r) != d:
            raise ValueError("row %d has %d features, row 0 has %d" % (i, len(r), d))
        for f in range(d):
            v = r[f]
            if v != v or v > 1e30 or v < -1e30:
                raise ValueError("row %d feature %d is not a finite number: %r" % (i, f, v))
    return d


def train(rows, n_trees, psi, seed, grid=None, collect=None):
    """Grow a forest of n_trees on rows (lists of floats); returns a Forest (compact bytes + grid).

    collect: optional callable run at safe points (every 32 rows quantised, after each tree), e.g. gc.collect.
    """
    d = _check_rows(rows)
    n = len(rows)
    if not 0 < n_trees <= 65535:
        raise ValueError("n_trees must be 1..65535, got %r" % (n_trees,))
    if not 2 <= psi <= MAX_PSI:
        raise ValueError("psi must be 2..%d, got %r" % (MAX_PSI, psi))
    if n >= 1 << 24:
        raise ValueError("too many rows: %d" % n)
    if grid is None:
        grid = make_grid(rows)
    elif len(grid) != d:
        raise ValueError("grid has %d features, rows have %d" % (len(grid), d))
    data = array("H", bytes(2 * n * d))
    qrow = [0] * d
    sgrid = scaled_grid(grid)
    for i in range(n):
        quantise(rows[i], sgrid, qrow)
        for f in range(d):
            data[i * d + f] = qrow[f]
        if collect is not None and i & 31 == 31:
            collect()
    k = psi if psi < n else n
    hl = height_limit(k)
    rng = Rng(seed)
    idx = array("L", [0] * k)
    # one small bytearray per tree, joined once at the end: no growing buffer in a fragmented heap
    chunks = [_header(d, n_trees, k)]
    for _ in range(n_trees):
        _sample(rng, n, k, idx)
        chunks.append(_grow(data, d, idx, hl, rng))
        if collect is not None:
            collect()
    buf = b"".join(chunks)
    chunks = None
    return Forest(buf, grid)


def _sample(rng, n, k, idx):
    """k distinct row indices out of n into idx (Floyd's algorithm), sorted."""
    if k == n:
        for i in range(n):
            idx[i] = i
        return
    chosen = set()
    for j in range(n - k, n):
        t = rng.below(j + 1)
        chosen.add(j if t in chosen else t)
    i = 0
    for v in sorted(chosen):
        idx[i] = v
        i += 1


def _grow(data, d, idx, hl, rng):
    """Grow one tree on the rows in idx; its compact bytes."""
    feat = []  # per node in pre-order: feature, or LEAF_FLAG | leaf code
    thr = []
    right = []
    stack = [(0, len(idx), 0, -1)]
    while stack:
        lo, hi, depth, parent = stack.pop()
        me = len(feat)
        if parent >= 0:
            right[parent] = me
        n = hi - lo
        split = None
        if depth < hl and n > 1:
            cands = []
            for f in range(d):
                mn = mx = data[idx[lo] * d + f]
                for j in range(lo + 1, hi):
                    v = data[idx[j] * d + f]
                    if v < mn:
                        mn = v
                    elif v > mx:
                        mx = v
                if mx > mn:
                    cands.append((f, mn, mx))
            if cands:
                split = cands[rng.below(len(cands))]
        if split is None:
            feat.append(LEAF_FLAG | leaf_code(depth, n))
            thr.append(0)
            right.append(0)
            continue
        f, mn, mx = split
        t = mn + 1 + rng.below(mx - mn)
        mid = lo
        for j in range(lo, hi):
            r = idx[j]
            if data[r * d + f] < t:
                idx[j] = idx[mid]
                idx[mid] = r
                mid += 1
        feat.append(f)
        thr.append(t)
        right.append(0)
        stack.append((mid, hi, depth + 1, me))
        stack.append((lo, mid, depth + 1, -1))
    return _emit(feat, thr, right)


def _emit(feat, thr, right):
    """One pre-order tree (node lists) in the compact layout, as a bytearray of exactly its size."""
    m = len(feat)
    size = [1] * m
    for i in range(m - 1, -1, -1):
        if not feat[i] & LEAF_FLAG:
            ls = size[i + 1]
            size[i] = (4 if ls + 4 <= 255 else 6) + ls + size[right[i]]
    if size[0] > 65535:
        raise ValueError("tree too large for the compact form")
    out = bytearray(size[0])
    p = 0
    for i in range(m):
        f = feat[i]
        out[p] = f
        if f & LEAF_FLAG:
            p += 1
            continue
        t = thr[i]
        out[p + 1] = t & 255
        out[p + 2] = t >> 8
        ls = size[i + 1]
        if ls + 4 <= 255:
            out[p + 3] = ls + 4
            p += 4
        else:
            o = ls + 6
            out[p + 3] = 0
            out[p + 4] = o & 255
            out[p + 5] = o >> 8
            p += 6
    return out


def _header(d, n_trees, psi):
    return MAGIC + bytes((FORMAT_VERSION, d, n_trees & 255, n_trees >> 8, psi & 255, psi >> 8))


def parse_header(buf):
    """(n_features, n_trees, psi) of compact bytes; ValueError naming what is wrong."""
    if len(buf) < HEADER_SIZE:
        raise ValueError("compact forest: %d bytes, shorter than the %d-byte header" % (len(buf), HEADER_SIZE))
    if bytes(buf[0:2]) != MAGIC:
        raise ValueError("compact forest: bad magic %r (want %r)" % (bytes(buf[0:2]), MAGIC))
    if buf[2] != FORMAT_VERSION:
        raise ValueError("compact forest: format version %d (this firmware reads %d)" % (buf[2], FORMAT_VERSION))
    d = buf[3]
    n_trees = buf[4] | (buf[5] << 8)
    psi = buf[6] | (buf[7] << 8)
    if not 0 < d <= MAX_FEATURES or n_trees == 0 or not 1 <= psi <= MAX_PSI:
        raise ValueError("compact forest: bad header n_features=%d n_trees=%d psi=%d" % (d, n_trees, psi))
    return d, n_trees, psi


def tree_starts(buf):
    """Byte offset of every tree, checking the layout (features, offsets, length) on the way."""
    return _walk(buf)[0]


def _walk(buf):
    """(tree byte offsets, node count), checking the layout (features, offsets, length)."""
    d, n_trees, _ = parse_header(buf)
    starts = []
    p = HEADER_SIZE
    end = len(buf)
    nodes = 0
    for t in range(n_trees):
        starts.append(p)
        pending = 1
        while pending:
            nodes += 1
            if p >= end:
                raise ValueError("compact forest: tree %d truncated at byte %d" % (t, p))
            f = buf[p]
            if f & LEAF_FLAG:
                p += 1
                pending -= 1
                continue
            if f >= d:
                raise ValueError("compact forest: tree %d node at byte %d uses feature %d of %d" % (t, p, f, d))
            if p + 4 > end:
                raise ValueError("compact forest: tree %d truncated at byte %d" % (t, p))
            o = buf[p + 3]
            if o:
                q = p + 4
            else:
                if p + 6 > end:
                    raise ValueError("compact forest: tree %d truncated at byte %d" % (t, p))
                o = buf[p + 4] | (buf[p + 5] << 8)
                q = p + 6
            if p + o <= q:
                raise ValueError("compact forest: tree %d node at byte %d has bad right offset %d" % (t, p, o))
            p = q
            pending += 1
    if p != end:
        raise ValueError("compact forest: %d trailing bytes after tree %d" % (end - p, n_trees - 1))
    return starts, nodes


class Forest:
    """A trained forest: scores raw or quantised feature vectors; to_bytes() gives its compact form.

    At load the compact bytes are unpacked into three flat per-node arrays, in pre-order (the runtime form,
    4 bytes per node, ~15 KB for a 50-tree psi=100 forest): `nf` (bytearray: feature, or 0x80 | leaf code),
    `nt` (array 'H': threshold, 0 for leaves) and `nr` (bytearray, or array 'H' if a left subtree has more than
    254 nodes: how many nodes ahead the right child is; the left child is the next node). A step is then two
    subscripts and a compare, about half the interpreter work of decoding the bytes in place.
    """

    def __init__(self, buf, grid):
        self.n_features, self.n_trees, self.psi = parse_header(buf)
        if len(grid) != self.n_features:
            raise ValueError("grid has %d features, forest has %d" % (len(grid), self.n_features))
        self.grid = [[int(g[0]), int(g[1])] for g in grid]
        self._sgrid = scaled_grid(grid)
        self.height_limit = height_limit(self.psi)
        starts, n = _walk(buf)
        self.n_nodes = n
        self.nf = nf = bytearray(n)
        self.nt = nt = array("H", bytes(2 * n))
        nr = bytearray(n)
        lo = [Q_MAX] * self.n_features
        hi = [0] * self.n_features
        roots = []
        i = 0
        for p in starts:
            roots.append(i)
            pending = []  # (node index, byte offset of its right child), innermost last
            while True:
                if pending and pending[-1][1] == p:
                    j = pending.pop()[0]
                    if i - j > 255 and not isinstance(nr, array):
                        nr = array("H", nr)
                    nr[j] = i - j
                f = buf[p]
                nf[i] = f
                i += 1
                if f & LEAF_FLAG:
                    p += 1
                    if not pending:
                        break
                    continue
                t = buf[p + 1] | (buf[p + 2] << 8)
                nt[i - 1] = t
                if t < lo[f]:
                    lo[f] = t
                if t > hi[f]:
                    hi[f] = t
                o = buf[p + 3]
                if o:
                    pending.append((i - 1, p + o))
                    p += 4
                else:
                    pending.append((i - 1, p + (buf[p + 4] | (buf[p + 5] << 8))))
                    p += 6
        self.nr = nr
        self.roots = roots
        # per feature the range of its split thresholds; the whole grid when no split uses it (never out of range)
        self.split_lo = tuple(lo[f] if lo[f] <= hi[f] else 0 for f in range(self.n_features))
        self.split_hi = tuple(hi[f] if lo[f] <= hi[f] else Q_MAX for f in range(self.n_features))
        # score = 2 ** (-(sum of leaf codes / (8 * n_trees)) / c(psi)) = exp(k * sum)
        self._k = -math.log(2.0) / (LEAF_STEP * self.n_trees * c(self.psi))
        self._q = [0] * self.n_features

    def to_bytes(self):
        """The compact form (re-encoded from the node arrays: the same bytes the forest was loaded from)."""
        nf = self.nf
        nt = self.nt
        nr = self.nr
        chunks = [_header(self.n_features, self.n_trees, self.psi)]
        ends = self.roots[1:] + [self.n_nodes]
        for t in range(self.n_trees):
            a = self.roots[t]
            feat = []
            thr = []
            right = []
            for i in range(a, ends[t]):
                feat.append(nf[i])
                thr.append(nt[i])
                right.append(i - a + nr[i])
            chunks.append(_emit(feat, thr, right))
        return b"".join(chunks)

    @property
    def buf(self):
        """The compact bytes (re-encoded on each access)."""
        return self.to_bytes()

    @property
    def starts(self):
        """Byte offset of every tree in the compact bytes."""
        return tree_starts(self.to_bytes())

    def path_sum(self, q):
        """Sum over trees of the leaf codes (path lengths in 1/8 steps) for a quantised vector q."""
        nf = self.nf
        nt = self.nt
        nr = self.nr
        total = 0
        for i in self.roots:
            f = nf[i]
            while f < 128:
                i += 1 if q[f] < nt[i] else nr[i]
                f = nf[i]
            total += f
        return total - 128 * self.n_trees

    def expected_path_sum(self, q):
        """The path sum with out-of-range isolation (the plain path_sum inside the forest's split ranges)."""
        return out_of_range_path_sum(self.path_sum(q), out_of_range_share(q, self.split_lo, self.split_hi),
                                     self.n_trees)

    def score_q(self, q):
        """Anomaly score (0..1) of a quantised feature vector, with out-of-range isolation."""
        return math.exp(self._k * self.expected_path_sum(q))

    def score(self, x):
        """Anomaly score (0..1) of a raw feature vector (floats, in the model's feature order)."""
        return self.score_q(quantise(x, self._sgrid, self._q))

    def mean_path_length(self, x):
        """E[h] of a raw feature vector with out-of-range isolation, in tree levels."""
        return self.expected_path_sum(quantise(x, self._sgrid, self._q)) / (LEAF_STEP * self.n_trees)


def out_of_range_share(q, lo, hi):
    """p: the probability that one node isolates quantised q, the mean over features of e_f / (hi_f - lo_f + e_f)
    for its excess e_f beyond the split range [lo_f, hi_f] (0.0 inside every range)."""
    p = 0.0
    for f in range(len(lo)):
        v = q[f]
        if v > hi[f]:
            e = v - hi[f]
        elif v < lo[f]:
            e = lo[f] - v
        else:
            continue
        p += e / (hi[f] - lo[f] + e)
    return p / len(lo)


def out_of_range_path_sum(path_sum, p, n_trees):
    """The expected path sum (1/8 steps, all trees) when each node also isolates with probability p:
    E = (1 - (1 - p) ** L) / p for the path length L; path_sum itself when p = 0."""
    if not p:
        return path_sum
    steps = LEAF_STEP * n_trees
    return steps * (1.0 - (1.0 - p) ** (path_sum / steps)) / p


def load(buf, grid):
    """Forest from compact bytes and its grid."""
    return Forest(buf, grid)


def to_json(forest):
    """Paper-like nested-dict form: {"format", "n_features", "psi", "leaf_step", "grid", "trees": [...]}."""
    b = forest.to_bytes()
    trees = []
    for start in tree_starts(b):
        trees.append(_node_json(b, start, 0))
    return {"format": JSON_FORMAT, "n_features": forest.n_features, "psi": forest.psi,
            "leaf_step": LEAF_STEP, "grid": [list(g) for g in forest.grid], "trees": trees}


def _node_json(b, p, depth):
    f = b[p]
    if f & LEAF_FLAG:
        return {"leaf": f & 127, "path_length": (f & 127) / LEAF_STEP}
    o = b[p + 3]
    if o:
        left = p + 4
    else:
        o = b[p + 4] | (b[p + 5] << 8)
        left = p + 6
    return {"feature": f, "threshold": b[p + 1] | (b[p + 2] << 8),
            "left": _node_json(b, left, depth + 1), "right": _node_json(b, p + o, depth + 1)}


def from_json(doc):
    """Forest from the nested-dict form (inverse of to_json)."""
    if doc.get("format") != JSON_FORMAT:
        raise ValueError("forest JSON: format %r (want %r)" % (doc.get("format"), JSON_FORMAT))
    d = doc["n_features"]
    n_trees = len(doc["trees"])
    psi = doc["psi"]
    chunks = [_header(d, n_trees, psi)]
    for tree in doc["trees"]:
        feat = []
        thr = []
        right = []
        stack = [(tree, -1)]
        while stack:
            node, parent = stack.pop()
            me = len(feat)
            if parent >= 0:
                right[parent] = me
            if "leaf" in node:
                feat.append(LEAF_FLAG | int(node["leaf"]))
                thr.append(0)
                right.append(0)
                continue
            f = int(node["feature"])
            t = int(node["threshold"])
            if not 0 <= f < d or not 0 <= t <= Q_MAX:
                raise ValueError("forest JSON: bad node feature=%r threshold=%r" % (f, t))
            feat.append(f)
            thr.append(t)
            right.append(0)
            stack.append((node["right"], me))
            stack.append((node["left"], -1))
        chunks.append(_emit(feat, thr, right))
    return Forest(b"".join(chunks), [list(g) for g in doc["grid"]])
