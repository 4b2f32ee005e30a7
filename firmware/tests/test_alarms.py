"""The alarm rule: k of n anomalous windows over a time span, with hysteresis, and gaps that count for nothing."""

from firmware.alarms import AlarmRule, check


def _raises(fn, text):
    try:
        fn()
    except ValueError as e:
        assert text in str(e), str(e)
        return
    raise AssertionError("no ValueError")


def test_raised_when_anomalies_persist_cleared_with_hysteresis():
    rule = AlarmRule({"span_s": 60, "raise_fraction": 0.5, "clear_fraction": 0.1, "min_windows": 4})
    events = []
    t = 0.0
    # healthy minute with one anomalous window: no alarm
    for i in range(120):
        events.append(rule.push(t, 0.7 if i == 50 else 0.4, i == 50))
        t += 0.5
    assert [e for e in events if e] == [] and not rule.active
    # anomalies persist: raised once half of the last minute is anomalous
    got = []
    for i in range(120):
        got.append(rule.push(t, 0.8 + i * 0.001, True))
        t += 0.5
    assert got.count("raised") == 1 and 55 <= got.index("raised") <= 65 and rule.active
    assert rule.peak >= 0.8 + 0.119 - 1e-9 and rule.start > 60
    # a few healthy windows do not clear it (hysteresis) ...
    for _ in range(40):
        assert rule.push(t, 0.4, False) is None
        t += 0.5
    # ... a healthy minute does
    out = [rule.push(t + 0.5 * i, 0.4, False) for i in range(120)]
    assert out.count("cleared") == 1 and not rule.active and rule.raised == 1


def test_a_gap_longer_than_the_span_forgets_the_old_windows():
    rule = AlarmRule({"span_s": 600, "min_windows": 2})
    assert rule.push(0, 0.9, True) is None  # one window is not enough
    assert rule.push(5000, 0.9, True) is None  # the first is 5000 s old: forgotten
    assert rule.push(5001, 0.9, True) == "raised"


def test_bad_parameters_are_named():
    _raises(lambda: check({"span": 5}), "unknown parameter span")
    _raises(lambda: check({"span_s": 0}), "span_s must be > 0")
    _raises(lambda: check({"raise_fraction": 0.1, "clear_fraction": 0.2}), "clear_fraction < raise_fraction")
    _raises(lambda: check({"min_windows": 0}), "min_windows must be >= 1")
