"""Local Training Engine: trains the first champion on the device from its own first N windows."""

from firmware import isoforest


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

    def add(self, feats):
        """Keep one window's features; True when there are enough to train."""
        if len(self.rows) < self.n_train:
            self.rows.append(tuple(feats))
        return len(self.rows) >= self.n_train

    def train(self):
        """The trained forest; frees the rows."""
        psi = self.psi if self.psi <= len(self.rows) else len(self.rows)
        forest = isoforest.train(self.rows, self.n_trees, psi, self.seed)
        self.rows = []
        return forest
