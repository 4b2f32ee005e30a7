"""Local Training Engine: trains the first champion on the device from its own first N windows."""

from firmware import isoforest

# a calibrated threshold stays within these bounds: 0.5 is the score of a window as easy to isolate as any
THRESHOLD_BOUNDS = (0.5, 0.99)


def calibrated_threshold(scores, target_fa):
    """The threshold above which at most a target_fa share of a model's scores on its own training windows lie:
    their (1 - target_fa) quantile (the next higher score, as numpy's method="higher"), within THRESHOLD_BOUNDS."""
    if not 0.0 < target_fa < 1.0:
        raise ValueError("target false-alarm rate must be in (0, 1), got %r" % (target_fa,))
    s = sorted(scores)
    if not s:
        raise ValueError("no training scores to calibrate a threshold on")
    pos = (1.0 - target_fa) * (len(s) - 1)
    i = int(pos)
    if pos > i:
        i += 1
    return min(max(float(s[i]), THRESHOLD_BOUNDS[0]), THRESHOLD_BOUNDS[1])


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
