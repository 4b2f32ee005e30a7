"""Feature set "wear": amplitude, impulsiveness and spectral shape of a window, in one integer pass.

MicroPython 1.27 and CPython alike. Why these features (physics, not any one rig):
- log_rms: wear grows the vibration amplitude multiplicatively (log scale), around the sensor's offset (excluded);
- crest (peak / RMS), kurtosis (excess) and skewness: impacts of a local defect make the signal impulsive;
- band_hi / band_mid / band_lo: log RMS of three bands of the spectrum. Defect impacts and their harmonics raise the
  energy high in the spectrum first, shaft-order faults (imbalance, looseness) low in it.

The bands are the binomial second-order filter bank: lo = (1 + z^-1)^2 / 4, mid = (1 - z^-2) / (2 sqrt 2),
hi = (1 - z^-1)^2 / 4, whose power responses (1 + cos w)^2 / 4, (1 - cos^2 w) / 2, (1 - cos w)^2 / 4 add up to 1:
the three band powers split the window's power exactly. Relative to the Nyquist frequency fN the bands dominate
below ~0.39 fN (lo), between ~0.39 and ~0.61 fN (mid) and above ~0.61 fN (hi) (crossovers at cos w = +-1/3); at
2 kHz: below ~390 Hz (shaft orders and the bearing defect frequencies of a 25-50 Hz machine), ~390-610 Hz, above
~610 Hz (defect harmonics and the broadband energy of impacts, which rise first as a bearing wears). Being
relative to the sampling rate they need no tuning to a rig, and they cost two products per sample: each band
power is a combination of the window's autocorrelation at lags 0, 1 and 2.

Fixed point, scaled to the window: the range of the window's first eighth spans STEPS integer steps (about 50 steps
per standard deviation), a sample x becomes int(x * scale); the mean comes first from the C-level sum(), then one
bytecode pass keeps every sum in small integers (no allocation), except the fourth moment (a float). The sums are
exact, so the numpy twin gives the same numbers, and the cost does not grow with the amplitude. Powers below the
quantisation noise (1/12 step^2) count as that floor.
"""

import math

from firmware._compat import overlay
from firmware.features import WINDOW_MS, window_length  # noqa: F401 (the set's interface)

FEATURE_SET = "wear"
VERSION = 1
FEATURE_NAMES = ("log_rms", "crest", "skewness", "kurtosis", "band_hi", "band_mid", "band_lo")
N_FEATURES = 7
STEPS = 256
PARAMS = {"steps": STEPS}
_FLOOR = 1.0 / 12.0  # quantisation noise power, LSB^2


def scale_of(buf, steps=STEPS):
    """Integer steps per unit for one window: its first eighth's range spans `steps` (`steps` for a flat one)."""
    head = buf[:len(buf) >> 3] if len(buf) >= 16 else buf
    span = max(head) - min(head)
    return steps / span if span > 0 else float(steps)


def sums(buf, scale):
    """Integer sums of one whole window: (n, s1, s2, s3, s4, lo, hi, r1, r2) of d = int(x * scale) - c.

    c is the window's mean in steps (from the C-level sum()), so d is centred and its sums stay small integers;
    s4 is a float (d**4 outgrows them). lo/hi: extremes of d (and 0); r1, r2: lag-1 and lag-2 products.
    """
    n = len(buf)
    c = int(sum(buf) / n * scale)
    s1 = s2 = s3 = r1 = r2 = q1 = q2 = lo = hi = 0
    s4 = 0.0
    toint = int
    for x in buf:
        d = toint(x * scale) - c
        a = d * d
        s1 += d
        s2 += a
        s3 += a * d
        s4 += a * a
        if d > hi:
            hi = d
        elif d < lo:
            lo = d
        r1 += d * q1
        r2 += d * q2
        q2 = q1
        q1 = d
    return n, s1, s2, s3, s4, lo, hi, r1, r2


def from_sums(n, s1, s2, s3, s4, lo, hi, r1, r2, scale):
    """The features from a window's sums (see sums)."""
    mu = s1 / n
    m2 = s2 / n - mu * mu
    log_scale = math.log10(scale)
    # autocorrelation at lags 1, 2 of the centred window (biased estimate, edges neglected)
    a1 = r1 / n - mu * mu
    a2 = r2 / n - mu * mu
    bands = (0.375 * m2 - 0.5 * a1 + 0.125 * a2, 0.25 * (m2 - a2), 0.375 * m2 + 0.5 * a1 + 0.125 * a2)
    logs = [0.5 * math.log10(p if p > _FLOOR else _FLOOR) - log_scale for p in bands]
    if m2 < _FLOOR:
        return (0.5 * math.log10(_FLOOR) - log_scale, 0.0, 0.0, 0.0, logs[0], logs[1], logs[2])
    m3 = s3 / n - 3.0 * mu * s2 / n + 2.0 * mu * mu * mu
    m4 = s4 / n - 4.0 * mu * s3 / n + 6.0 * mu * mu * s2 / n - 3.0 * mu * mu * mu * mu
    rms = m2 ** 0.5
    peak = hi - mu if hi - mu > mu - lo else mu - lo
    return (math.log10(rms) - log_scale, peak / rms, m3 / (m2 * rms), m4 / (m2 * m2) - 3.0,
            logs[0], logs[1], logs[2])


def window_features(buf, start=0, length=-1, steps=STEPS):
    """The set's features of buf[start:start+length] (an array, list or memoryview of floats)."""
    if length < 0:
        length = len(buf) - start
    if length < 1 or start < 0 or start + length > len(buf):
        raise ValueError("window [%d, %d) outside buffer of %d" % (start, start + length, len(buf)))
    if start or length != len(buf):
        buf = buf[start:start + length]
    scale = scale_of(buf, steps)
    r = sums(buf, scale)
    return from_sums(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], scale)


def check_params(params=None):
    """The set's parameters: defaults overlaid with params; ValueError naming an unknown or bad one."""
    p = overlay(PARAMS, params, "feature set wear")
    if type(p["steps"]) is not int or not 16 <= p["steps"] <= 4096:
        raise ValueError("feature set wear: steps must be an integer in 16..4096, got %r" % (p["steps"],))
    return p


def make_extractor(params=None):
    """window buffer -> feature tuple, with the set's parameters."""
    steps = check_params(params)["steps"]
    return lambda buf: window_features(buf, 0, len(buf), steps)
