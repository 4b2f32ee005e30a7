"""Alarms, what a person sees: raised when anomalous windows persist over a time span given in seconds.

The rule is k of n with hysteresis, over time rather than over a count of windows (so it means the same at any
window rate, and across gaps in a recording): the span is cut into BUCKETS buckets of span_s / BUCKETS seconds,
each counting the windows and the anomalous windows whose time falls in it. Over the buckets of the last span_s
seconds (ending at the newest window's time): an alarm is raised when at least min_windows windows were seen and
the anomalous share reaches raise_fraction; an active alarm clears when the share falls to clear_fraction or
below. Windows older than the span count for nothing. The share is the smoothed score the alarm acts on.
MicroPython 1.27 and CPython alike; the gateway's evaluation runs this very class.
"""

from firmware._compat import overlay

BUCKETS = 30
DEFAULTS = {"span_s": 600, "raise_fraction": 0.5, "clear_fraction": 0.1, "min_windows": 4}


def check(params=None):
    """The rule's parameters: DEFAULTS overlaid with params; ValueError naming an unknown or bad one."""
    p = overlay(DEFAULTS, params, "alarm rule")
    if not p["span_s"] > 0:
        raise ValueError("alarm rule: span_s must be > 0, got %r" % (p["span_s"],))
    if not 0.0 <= p["clear_fraction"] < p["raise_fraction"] <= 1.0:
        raise ValueError("alarm rule: need 0 <= clear_fraction < raise_fraction <= 1, got %r, %r"
                         % (p["clear_fraction"], p["raise_fraction"]))
    if p["min_windows"] < 1:
        raise ValueError("alarm rule: min_windows must be >= 1, got %r" % (p["min_windows"],))
    return p


class AlarmRule:
    """Feed it every window (time, score, anomalous); it says when an alarm is raised and when it clears."""

    def __init__(self, params=None):
        p = check(params)
        self.span_s = p["span_s"]
        self.raise_fraction = p["raise_fraction"]
        self.clear_fraction = p["clear_fraction"]
        self.min_windows = p["min_windows"]
        self.bucket_s = p["span_s"] / BUCKETS
        self.ids = [None] * BUCKETS
        self.windows = [0] * BUCKETS
        self.anomalous = [0] * BUCKETS
        self.active = False
        self.start = 0.0
        self.peak = 0.0
        self.share = 0.0
        self.raised = 0

    def push(self, t, score, anomalous):
        """Add the window at time t (s); returns "raised", "cleared" or None. The share over the span is .share."""
        b = int(t // self.bucket_s)
        i = b % BUCKETS
        if self.ids[i] != b:
            self.ids[i] = b
            self.windows[i] = 0
            self.anomalous[i] = 0
        self.windows[i] += 1
        if anomalous:
            self.anomalous[i] += 1
        n = a = 0
        for j in range(BUCKETS):
            k = self.ids[j]
            if k is not None and b - BUCKETS < k <= b:
                n += self.windows[j]
                a += self.anomalous[j]
        self.share = a / n
        if self.active:
            if score > self.peak:
                self.peak = score
            if self.share <= self.clear_fraction:
                self.active = False
                return "cleared"
        elif n >= self.min_windows and self.share >= self.raise_fraction:
            self.active = True
            self.start = t
            self.peak = score
            self.raised += 1
            return "raised"
        return None
