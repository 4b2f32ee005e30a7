"""Window features shared by the device and the gateway: mean, skewness, excess kurtosis.

MicroPython 1.27 and CPython alike. Population (biased) moments, two passes over the window
(mean first, then centred sums) so single-precision floats on the ESP32 keep their accuracy:
    skewness = m3 / m2**1.5,  kurtosis = m4 / m2**2 - 3  (Fisher, as scipy.stats.kurtosis defaults)
A constant window (m2 negligible against mean**2) gives skewness 0 and kurtosis 0.
"""

FEATURE_SET = "paper"
VERSION = 1
FEATURE_NAMES = ("mean", "skewness", "kurtosis")
N_FEATURES = 3
WINDOW_MS = 500
PARAMS = {}

# m2 below this fraction of mean**2 is rounding noise: the window is constant
_FLAT = 1e-12


def window_length(rate_hz, window_ms=WINDOW_MS):
    """Samples in one window at rate_hz."""
    n = (rate_hz * window_ms) // 1000
    if n < 1:
        raise ValueError("window of %d ms at %d Hz holds no sample" % (window_ms, rate_hz))
    return n


def window_features(buf, start=0, length=-1):
    """(mean, skewness, kurtosis) of buf[start:start+length]; buf is an array, list or memoryview of floats."""
    if length < 0:
        length = len(buf) - start
    if length < 1 or start < 0 or start + length > len(buf):
        raise ValueError("window [%d, %d) outside buffer of %d" % (start, start + length, len(buf)))
    end = start + length
    s = 0.0
    for i in range(start, end):
        s += buf[i]
    mean = s / length
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    for i in range(start, end):
        d = buf[i] - mean
        d2 = d * d
        s2 += d2
        s3 += d2 * d
        s4 += d2 * d2
    m2 = s2 / length
    if m2 <= _FLAT * mean * mean or m2 == 0.0:
        return (mean, 0.0, 0.0)
    m3 = s3 / length
    m4 = s4 / length
    return (mean, m3 / (m2 * m2 ** 0.5), m4 / (m2 * m2) - 3.0)


def make_extractor(params=None):
    """window buffer -> feature tuple (the paper's set has no parameters)."""
    if params:
        raise ValueError("feature set paper: unknown parameters %s" % ", ".join(sorted(params)))
    return lambda buf: window_features(buf, 0, len(buf))


def signal_features(buf, rate_hz, window_ms=WINDOW_MS):
    """Features of every complete non-overlapping window of buf, as a list of tuples."""
    n = window_length(rate_hz, window_ms)
    out = []
    start = 0
    while start + n <= len(buf):
        out.append(window_features(buf, start, n))
        start += n
    return out


class WindowAccumulator:
    """Collects samples as they arrive into one preallocated window; push() returns features when it fills."""

    def __init__(self, rate_hz, window_ms=WINDOW_MS):
        import array

        self.length = window_length(rate_hz, window_ms)
        self.buf = array.array("f", bytes(4 * self.length))
        self.fill = 0

    def push(self, x):
        """Add one sample; return (mean, skewness, kurtosis) when the window is complete, else None."""
        self.buf[self.fill] = x
        self.fill += 1
        if self.fill < self.length:
            return None
        self.fill = 0
        return window_features(self.buf, 0, self.length)

    def extend(self, samples, out=None):
        """Push many samples; append each completed window's features to out (a list) and return it."""
        if out is None:
            out = []
        for x in samples:
            r = self.push(x)
            if r is not None:
                out.append(r)
        return out

    def reset(self):
        """Drop a partly filled window."""
        self.fill = 0
