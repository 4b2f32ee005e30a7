"""Local Inference Engine: scores each window with the champion: score, decision, counters."""

from firmware import feature_sets, isoforest
from firmware.compiled_forest import CompiledForest
from firmware._compat import read_bytes, read_json


class ChampionError(Exception):
    """A champion directory that cannot be loaded; str() names the file and what is wrong."""


def load_champion(path, default_threshold=None):
    """(forest, config) of an installed champion directory (config.json + its model file)."""
    try:
        cfg = read_json(path + "/config.json")
    except ValueError as e:
        raise ChampionError(str(e))
    if cfg is None:
        raise ChampionError("%s/config.json: missing" % path)
    if "threshold" not in cfg and default_threshold is not None:
        cfg["threshold"] = default_threshold
    for key in ("model_id", "version", "model_file", "threshold"):
        if key not in cfg:
            raise ChampionError("%s/config.json: no field %s" % (path, key))
    model_path = path + "/" + cfg["model_file"]
    try:
        if cfg.get("encoding", "compact") == "json":
            import json

            with open(model_path) as f:
                forest = isoforest.from_json(json.load(f))
        else:
            if "grid" not in cfg:
                raise ChampionError("%s/config.json: no field grid" % path)
            forest = isoforest.load(read_bytes(model_path), cfg["grid"])
    except (OSError, ValueError, KeyError) as e:
        raise ChampionError("%s: %s" % (model_path, e))
    name, params = feature_sets.of_config(cfg)
    try:
        feature_sets.extractor(name, params)
    except (ValueError, KeyError, TypeError) as e:
        raise ChampionError("%s/config.json: %s" % (path, e))
    n = feature_sets.module(name).N_FEATURES
    if forest.n_features != n:
        raise ChampionError("%s: forest of %d features for feature set %s of %d" % (model_path, forest.n_features,
                                                                                   name, n))
    return forest, cfg


class LocalInference:
    """Holds the champion and scores windows with it."""

    def __init__(self):
        self.forest = None
        self.threshold = 1.0
        self.model_id = ""
        self.version = 0
        self.windows = 0
        self.anomalies = 0
        self.last_score = 0.0
        self.feature_set = None  # (name, params) of the champion's features; None before the first champion

    def set_champion(self, forest, cfg):
        """Hot-swap the champion (takes effect for the next window), compiled to bytecode for scoring."""
        self.forest = CompiledForest(forest)
        self.threshold = float(cfg["threshold"])
        self.model_id = cfg["model_id"]
        self.version = int(cfg["version"])
        self.feature_set = (cfg.get("feature_set", "paper"), cfg.get("feature_params", {}))

    def ready(self):
        return self.forest is not None

    def infer(self, feats):
        """(score, anomaly) of one window's features."""
        s = self.forest.score(feats)
        a = s > self.threshold
        self.windows += 1
        if a:
            self.anomalies += 1
        self.last_score = s
        return s, a
