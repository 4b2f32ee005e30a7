"""The feature sets a device can compute, by name: each is a firmware module with the same interface.

A module has FEATURE_SET (its name), VERSION, FEATURE_NAMES, N_FEATURES, WINDOW_MS, PARAMS (defaults),
window_length(rate_hz, window_ms) and make_extractor(params) -> (window buffer -> feature tuple). A champion's
config.json names its set (feature_set, feature_params); a config without one is the paper's set.
"""

PAPER = "paper"
DEFAULT = "wear"
NAMES = ("paper", "wear")
# one byte on the wire (the UPLOAD flags' high nibble) per set; 0 is the paper's, as before sets existed
CODES = {"paper": 0, "wear": 1}


def module(name):
    """The firmware module of a feature set; ValueError naming an unknown one."""
    if name == "paper":
        from firmware import features as m
    elif name == "wear":
        from firmware import features_wear as m
    else:
        raise ValueError("unknown feature set %r (known: %s)" % (name, ", ".join(NAMES)))
    return m


def extractor(name, params=None, shipped=None):
    """window buffer -> feature tuple of a set with its parameters; from shipped (the set's module that came with
    the champion) when given, else the firmware's."""
    return (module(name) if shipped is None else shipped).make_extractor(params)


def name_of_code(code):
    """The set a wire code names; ValueError for an unknown code."""
    for k in CODES:
        if CODES[k] == code:
            return k
    raise ValueError("unknown feature set code %d" % code)


def of_config(cfg):
    """(name, params) of the feature set a champion's config uses (the paper's when it names none)."""
    return cfg.get("feature_set", PAPER), cfg.get("feature_params", {})


def same(a, b):
    """True when two (name, params) pairs name the same extraction (parameters counted with their defaults)."""
    if a[0] != b[0]:
        return False
    m = module(a[0])
    if not hasattr(m, "check_params"):
        return True  # a set without parameters
    return m.check_params(a[1]) == m.check_params(b[1])
