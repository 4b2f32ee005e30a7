"""Local Inference Engine: scores each window with the champion: score, decision, counters."""

from firmware import feature_sets, isoforest
from firmware.compiled_forest import CompiledForest, PrecompiledForest, import_runtime
from firmware._compat import read_bytes, read_json


class ChampionError(Exception):
    """A champion directory that cannot be loaded; str() names the file and what is wrong."""


def _load_precompiled(path, cfg):
    """A PrecompiledForest from cfg's runtime_file, or None with cfg["load_note"] saying why the model file is used."""
    runtime = cfg["runtime_file"]
    try:
        return PrecompiledForest(import_runtime(path, runtime), cfg["grid"])
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        # MicroPython refuses a .mpy of another version or architecture with ValueError
        why = "%s not loaded (%s)" % (runtime, e)
        if "model_file" not in cfg:
            raise ChampionError("%s/%s, and no model file to compile instead" % (path, why)) from None
        cfg["load_note"] = "%s: compiled %s instead" % (why, cfg["model_file"])
        return None


def load_champion(path, default_threshold=None):
    """(forest, config) of an installed champion directory (config.json + its runtime module or model file).

    A precompiled runtime module (config runtime_file, a .mpy) gives a PrecompiledForest; when it cannot be loaded
    (another MicroPython version or architecture) the model file is compiled instead and config["load_note"] says why.
    A precompiled feature module (config features_file) is imported likewise into config["feature_module"].
    """
    try:
        cfg = read_json(path + "/config.json")
    except ValueError as e:
        raise ChampionError(str(e)) from None
    if cfg is None:
        raise ChampionError("%s/config.json: missing" % path)
    if "threshold" not in cfg and default_threshold is not None:
        cfg["threshold"] = default_threshold
    for key in ("model_id", "version", "threshold"):
        if key not in cfg:
            raise ChampionError("%s/config.json: no field %s" % (path, key))
    forest = _load_precompiled(path, cfg) if "runtime_file" in cfg else None
    if forest is not None:
        model_path = path + "/" + cfg["runtime_file"]
    else:
        forest, model_path = _load_model_file(path, cfg)
    name, params = feature_sets.of_config(cfg)
    try:
        feature_sets.extractor(name, params)
    except (ValueError, KeyError, TypeError) as e:
        raise ChampionError("%s/config.json: %s" % (path, e)) from None
    n = feature_sets.module(name).N_FEATURES
    if forest.n_features != n:
        raise ChampionError("%s: forest of %d features for feature set %s of %d" % (model_path, forest.n_features,
                                                                                   name, n))
    if "features_file" in cfg:
        _load_features(path, cfg, name, params, n)
    return forest, cfg


def _load_model_file(path, cfg):
    """(forest, its path) of the champion's model file (compact bytes or the paper-like JSON)."""
    if "model_file" not in cfg:
        raise ChampionError("%s/config.json: no field model_file" % path)
    model_path = path + "/" + cfg["model_file"]
    try:
        if cfg.get("encoding", "compact") == "json":
            import json

            with open(model_path) as f:
                return isoforest.from_json(json.load(f)), model_path
        if "grid" not in cfg:
            raise ChampionError("%s/config.json: no field grid" % path)
        return isoforest.load(read_bytes(model_path), cfg["grid"]), model_path
    except (OSError, ValueError, KeyError) as e:
        raise ChampionError("%s: %s" % (model_path, e)) from None


def _load_features(path, cfg, name, params, n_features):
    """The champion's own feature module (cfg features_file, a .mpy) into cfg["feature_module"]; when it cannot be
    imported or is not the config's set, the firmware's module is used and cfg["load_note"] says why."""
    file_name = cfg["features_file"]
    try:
        m = import_runtime(path, file_name)
        if m.FEATURE_SET != name or m.N_FEATURES != n_features:
            raise ValueError("feature set %s of %d features, the champion's is %s of %d"
                             % (m.FEATURE_SET, m.N_FEATURES, name, n_features))
        m.make_extractor(params)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        why = "%s not loaded (%s): own %s features instead" % (file_name, e, name)
        cfg["load_note"] = cfg["load_note"] + "; " + why if "load_note" in cfg else why
        return
    cfg["feature_module"] = m


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
        self.feature_module = None
        self.manifest = None  # the champion's config.json

    def set_champion(self, forest, cfg):
        """Hot-swap the champion (takes effect for the next window), compiled to bytecode for scoring."""
        self.forest = forest if isinstance(forest, CompiledForest) else CompiledForest(forest)
        self.threshold = float(cfg["threshold"])
        self.model_id = cfg["model_id"]
        self.version = int(cfg["version"])
        self.feature_set = (cfg.get("feature_set", "paper"), cfg.get("feature_params", {}))
        self.feature_module = cfg.get("feature_module")  # the set's module shipped with the champion, if any
        self.manifest = cfg

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
