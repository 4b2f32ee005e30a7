"""Settings updates and health reports: signed, validated, atomic, refused with a reason; health per period."""

from firmware import configure, frames, messages
from firmware._compat import exists, makedirs, read_json, sleep_ms, write_atomic
from firmware.data_comm import unpack_hello
from firmware.device import Device
from firmware.tests.test_device import CFG, _device, _drain, _sent
from firmware.tests.util import FakeUART, samples_bytes, scratch, signal

KEY = b"k" * 32


def _trained(name):
    """A device with its key, past its first (self-trained) champion, and its link."""
    root = scratch(name)
    makedirs(root + "/deploy")
    write_atomic(root + "/deploy/key", KEY)
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 40)), link)
    _drain(dev)
    assert dev.inference.ready()
    link.tx = bytearray()
    return root, dev, link


def _update(dev, link, body, seq=7):
    """Send a CONFIG_UPDATE body; the device's (applied, version, reason, settings in force)."""
    link.tx = bytearray()
    link.feed(frames.encode(messages.pack(messages.CONFIG_UPDATE, seq, body)))
    got = _until(dev, link, messages.CONFIG_RESULT)
    assert len(got) == 1, got
    assert got[0][:2] == bytes([seq, 0])  # the echo of the update's seq
    return configure.unpack_result(got[0])


def _until(dev, link, msg_type):
    """Step until the device sent a message of msg_type (at most ~5 s); the bodies of that type it sent."""
    for _ in range(5000):
        got = [b for t, b in _sent(link) if t == msg_type]
        if got:
            return got
        if not dev.step():
            sleep_ms(1)
    return []


def test_a_settings_update_changes_threshold_and_alarm_span_without_a_package():
    root, dev, link = _trained("cfg-apply")
    champion = dev.agent.champion_info()
    accepted = dev.state.data.get("accepted_version", 0)
    installs = dev.agent.installs
    ok, version, reason, in_force = _update(dev, link, configure.pack_update(
        KEY, "dev-t", 1, {"threshold": 0.42, "alarm_span_s": 120, "upload_every": 3}))
    assert ok and version == 1, reason
    assert abs(dev.inference.threshold - 0.42) < 1e-9 and dev.alarm.span_s == 120 and dev.comm.upload_every == 3
    assert in_force["threshold"] == 0.42 and in_force["alarm_span_s"] == 120 and in_force["upload_every"] == 3
    # no package: the same champion, no install, the package ledger untouched
    assert dev.agent.champion_info() == champion and dev.agent.installs == installs
    assert dev.state.data.get("accepted_version", 0) == accepted
    saved = read_json(root + "/settings.json")
    assert saved["version"] == 1 and saved["previous"] == {} and saved["champion"] == list(champion)
    # a reboot keeps them
    again = Device(FakeUART(), FakeUART(), root)
    assert abs(again.inference.threshold - 0.42) < 1e-9 and again.alarm.span_s == 120
    assert again.comm.upload_every == 3
    # the previous settings are kept for a fallback
    ok, version, reason, in_force = _update(dev, link, configure.pack_update(KEY, "dev-t", 2, {}, revert=True))
    assert ok and version == 2, reason
    assert dev.alarm.span_s == CFG.get("alarm_span_s", 600) and dev.comm.upload_every == CFG["upload_every"]
    assert dev.inference.threshold == dev.inference.manifest["threshold"]


def test_tampered_replayed_and_out_of_range_updates_are_refused_with_their_reason():
    root, dev, link = _trained("cfg-refuse")
    good = configure.pack_update(KEY, "dev-t", 5, {"threshold": 0.5})
    tampered = bytearray(good)
    tampered[6] ^= 1
    cases = [
        (bytes(tampered), "bad signature"),
        (configure.pack_update(b"x" * 32, "dev-t", 5, {"threshold": 0.5}), "bad signature"),
        (configure.pack_update(KEY, "dev-other", 5, {"threshold": 0.5}), "bad signature"),
        (configure.pack_update(KEY, "dev-t", 5, {"threshold": 1.5}), "out of range"),
        (configure.pack_update(KEY, "dev-t", 5, {"upload_every": 0}), "out of range"),
        (configure.pack_update(KEY, "dev-t", 5, {"alarm_raise": 0.05}), "clear_fraction < raise_fraction"),
        (configure.pack_update(KEY, "dev-t", 5, {"window_ms": 1000}), "not allowed by champion"),
        (configure.pack_update(KEY, "dev-t", 5, {"n_trees": 3}), "unknown setting"),
        (configure.pack_update(KEY, "dev-t", 5, {"threshold": "high"}), "must be float"),
        (configure.pack_update(KEY, "dev-t", 5, {}, revert=True), "no previous settings"),
    ]
    threshold = dev.inference.threshold
    for body, why in cases:
        ok, version, reason, in_force = _update(dev, link, body)
        assert not ok and why in reason, (why, reason)
        assert version == 0 and dev.inference.threshold == threshold and not exists(root + "/settings.json")
    ok, version, reason, _ = _update(dev, link, good)
    assert ok and version == 5, reason
    ok, version, reason, _ = _update(dev, link, good)  # the same update again: a replay
    assert not ok and "replayed or old settings update: version 5 <= 5" in reason, reason
    ok, _, reason, _ = _update(dev, link, configure.pack_update(KEY, "dev-t", 4, {"threshold": 0.3}))
    assert not ok and "replayed" in reason and dev.inference.threshold == 0.5


def test_a_threshold_needs_a_champion_and_stays_with_the_one_it_was_set_for():
    root = scratch("cfg-champion")
    makedirs(root + "/deploy")
    write_atomic(root + "/deploy/key", KEY)
    link = FakeUART()
    dev = _device(root, b"", link)
    ok, _, reason, _ = _update(dev, link, configure.pack_update(KEY, "dev-t", 1, {"threshold": 0.5}))
    assert not ok and "no champion yet" in reason, reason
    ok, _, reason, in_force = _update(dev, link, configure.pack_update(KEY, "dev-t", 2, {"upload_every": 4}))
    assert ok and in_force["upload_every"] == 4, reason
    # a threshold set for one champion is not carried over to the next by an unrelated update
    root, dev, link = _trained("cfg-bound")
    ok, _, reason, _ = _update(dev, link, configure.pack_update(KEY, "dev-t", 1, {"threshold": 0.45}))
    assert ok and read_json(root + "/settings.json")["champion"] == list(dev.agent.champion_info()), reason
    dev.inference.version += 1  # as if another champion had been installed
    ok, _, reason, _ = _update(dev, link, configure.pack_update(KEY, "dev-t", 2, {"upload_every": 4}))
    saved = read_json(root + "/settings.json")
    assert ok and saved["champion"][1] == dev.inference.version - 1, (reason, saved)


def test_health_is_reported_per_period_at_boot_and_in_hello():
    root = scratch("health")
    makedirs(root + "/deploy")
    write_atomic(root + "/deploy/key", KEY)
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 45)), link)
    dev.cfg["health_every"] = 10
    _drain(dev)
    _drain(dev, 30, pause_ms=1)  # everything queued goes out
    reports = [messages.unpack_health(messages.unseal(KEY, messages.TAG_HEALTH, "dev-t", b))
               for t, b in _sent(link) if t == messages.HEALTH]
    assert reports[0]["windows"] == 0 and reports[0]["boots"] == 1  # at boot
    periods = reports[1:]
    assert [r["windows"] for r in periods] == [10, 10, 10, 10]
    inferred = [r for r in periods if r["inference_us_mean"] > 0]
    assert inferred and all(r["feature_us_mean"] > 0 and r["active_us_mean"] >= r["feature_us_mean"]
                            and r["inference_us_max"] >= r["inference_us_mean"] for r in inferred)
    # a reboot counts: boots 2, and the HELLO carries the health tail
    link2 = FakeUART()
    _until(Device(FakeUART(), link2, root, reset_cause=3), link2, messages.HEALTH)
    sent = _sent(link2)
    hello = unpack_hello([b for t, b in sent if t == messages.HELLO][0])
    assert hello["health"]["boots"] == 2 and hello["health"]["reset_cause"] == 3
    boot = messages.unpack_health([b for t, b in sent if t == messages.HEALTH][0][:-messages.MAC_SIZE])
    assert boot["boots"] == 2 and boot["reset_cause"] == 3
