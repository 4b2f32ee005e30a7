"""Local Training Engine: trains the first champion on the device from its own first N windows."""

import math

from firmware import isoforest

# a calibrated threshold stays within these bounds: 0.5 is the score of a window as easy to isolate as any
THRESHOLD_BOUNDS = (0.5, 0.99)


# the tail of healthy scores above which a generalised Pareto distribution is fitted: the top TAIL_SHARE of them,
# and at least TAIL_MIN scores (peaks over threshold, as in extreme-value anomaly detection)
TAIL_SHARE = 0.1
TAIL_MIN = 10


def _empirical(s, q):
    """The q quantile of sorted scores s (the next higher score, as numpy's method="higher")."""
    pos = q * (len(s) - 1)
    i = int(pos)
    if pos > i:
        i += 1
    return float(s[i])


def tail_quantile(scores, target_fa):
    """The score a target_fa share of healthy scores exceed, from a generalised Pareto fit of their upper tail.

    Peaks over threshold: u is the (1 - TAIL_SHARE) quantile, the excesses over it get a GPD by the method of
    moments (shape xi = (1 - m^2/v) / 2, scale = m (m^2/v + 1) / 2), whose quantile extrapolates beyond the largest
    score seen when target_fa * n < 1 (a 0.2% rate from a few hundred windows). With too few scores for a tail, or
    when the empirical quantile rests on at least TAIL_MIN exceedances already, the empirical quantile.
    """
    s = sorted(scores)
    n = len(s)
    k = max(int(TAIL_SHARE * n), TAIL_MIN)
    if n < 2 * TAIL_MIN or target_fa * n >= TAIL_MIN:
        return _empirical(s, 1.0 - target_fa)
    u = s[n - k - 1]
    ex = [x - u for x in s[n - k:]]
    m = sum(ex) / k
    v = sum((e - m) * (e - m) for e in ex) / (k - 1)
    if m <= 0.0 or v <= 0.0:
        return float(s[-1])
    xi = 0.5 * (1.0 - m * m / v)
    sigma = 0.5 * m * (m * m / v + 1.0)
    r = target_fa * n / k
    if abs(xi) < 1e-9:
        return u - sigma * math.log(r)
    return u + sigma / xi * (r ** (-xi) - 1.0)


def calibrated_threshold(scores, target_fa):
    """The threshold a target_fa share of healthy windows' scores exceed (tail_quantile), within THRESHOLD_BOUNDS.
    The scores should be of windows the model did not grow on (see the gateway's cross-fitted calibration); the
    device's self-trained champion, which cannot afford refitting, uses its training windows'."""
    if not 0.0 < target_fa < 1.0:
        raise ValueError("target false-alarm rate must be in (0, 1), got %r" % (target_fa,))
    if not len(scores):
        raise ValueError("no training scores to calibrate a threshold on")
    t = tail_quantile(scores, target_fa)
    return min(max(t, THRESHOLD_BOUNDS[0]), THRESHOLD_BOUNDS[1])


class LocalTraining:
    """Collects n_train windows' features, then grows the shared Isolation Forest on them."""

    def __init__(self, n_train, n_trees, psi, seed):
        if n_train < 2:
            raise ValueError("n_train must be >= 2, got %r" % (n_train,))
        self.n_train = n_train
        self.n_trees = n_trees
        self.psi = psi
        self.seed = seed
        self.rows = []
        self.threshold = None  # calibrated by train(target_fa)

    def add(self, feats):
        """Keep one window's features; True when there are enough to train."""
        if len(self.rows) < self.n_train:
            self.rows.append(tuple(feats))
        return len(self.rows) >= self.n_train

    def train(self, target_fa=0.0):
        """The trained forest; frees the rows. target_fa > 0: .threshold is calibrated on the training rows."""
        psi = self.psi if self.psi <= len(self.rows) else len(self.rows)
        forest = isoforest.train(self.rows, self.n_trees, psi, self.seed)
        if target_fa > 0:
            self.threshold = calibrated_threshold([forest.score(r) for r in self.rows], target_fa)
        self.rows = []
        return forest
