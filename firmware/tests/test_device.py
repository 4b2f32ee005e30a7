"""The device main loop: first champion trained on device, uploads, outbox bound and acks, reboots."""

import struct
import sys

from firmware import features, frames, isoforest, messages
from firmware._compat import exists, makedirs, sleep_ms, ticks_add, write_json
from firmware.data_comm import pack_hello, unpack_hello
from firmware.device import Device
from firmware.tests.util import FakeUART, samples_bytes, scratch, signal

CFG = {"device_id": "dev-t", "rate_hz": 100, "n_train": 30, "n_trees": 10, "psi": 16, "upload_every": 5,
       "outbox_max": 6, "baud": 1000000, "ack_timeout_ms": 60000}


def _device(root, data=b"", link=None):
    write_json(root + "/config.json", CFG)
    return Device(FakeUART(data, burst=128), link or FakeUART(), root)


def _sent(link):
    dec = frames.FrameDecoder()
    out = []
    for b in link.tx:
        n = dec.feed(b)
        if n:
            m = messages.unpack(bytes(dec.payload()))
            assert m is not None
            out.append((m[0], bytes(m[2])))
    assert dec.crc_errors == 0 and dec.framing_errors == 0
    return out


def _drain(dev, steps=5, pause_ms=0):
    """Step until the data UART is exhausted and everything queued went out once, then `steps` more turns."""
    while dev.data_in.uart.pos < len(dev.data_in.uart.rx):
        dev.step()
    for _ in range(5000):
        if not dev.comm.control and all(e[3] is not None for e in dev.comm.outbox + dev.comm.alarm_box):
            break
        if not dev.step():
            sleep_ms(1)
    for _ in range(steps):
        dev.step()
        if pause_ms:
            sleep_ms(pause_ms)


def test_trains_first_champion_then_infers_and_uploads():
    root = scratch("dev")
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 60)), link)
    _drain(dev)
    assert dev.windows == 60
    assert dev.inference.ready() and dev.inference.version == 0
    assert exists(root + "/models/champion/forest.bin")
    sent = _sent(link)
    types = [t for t, _ in sent]
    assert types[0] == messages.HELLO
    hello = unpack_hello(sent[0][1])
    assert hello["device_id"] == "dev-t" and hello["phase"] == 0
    # the runtime tail: the .mpy this interpreter imports (774 in the 1.27 VM, none under CPython)
    assert hello["sys_mpy"] == getattr(sys.implementation, "_mpy", 0)
    assert messages.CHAMPION_CHUNK in types
    ups = [messages.unpack_upload(b[:-messages.MAC_SIZE]) for t, b in sent if t == messages.UPLOAD]
    # 30 inferred windows: every 5th normal one plus every anomaly, bounded by the outbox (6)
    assert len(ups) >= 6
    assert [u[0] for u in ups] == list(range(len(ups)))
    assert len(ups[0][5]) == 3


def test_hello_of_an_older_device_without_the_runtime_tail_still_parses():
    body = pack_hello("dev-old", 3, "m-1", 10, 2, 7, 0, 1, 1)
    hello = unpack_hello(body)
    assert hello["device_id"] == "dev-old" and hello["champion_version"] == 3 and hello["outbox"] == 1
    assert "sys_mpy" not in hello
    assert unpack_hello(body + struct.pack("<H", 11014) + b"later")["sys_mpy"] == 11014  # longer: tail read
    try:
        unpack_hello(body[:-1])
    except ValueError as e:
        assert "HELLO of 56 bytes" in str(e)
    else:
        raise AssertionError("a short HELLO parsed")


def test_outbox_is_bounded_drops_are_counted_and_acks_clear_it():
    root = scratch("box")
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 90)), link)
    _drain(dev)
    d = dev.state.data
    assert len(dev.comm.outbox) == 6
    assert d["next_upload"] - d.get("uploads_dropped", 0) == 6
    assert d.get("uploads_dropped", 0) > 0
    last = dev.comm.outbox[-1][0]
    link.feed(frames.encode(messages.pack(messages.UPLOAD_ACK, 1, struct.pack("<I", last - 2))))
    _drain(dev, 10)
    assert [e[0] for e in dev.comm.outbox] == [last - 1, last]
    assert dev.comm.uploads_acked == 4


def test_a_refused_upload_leaves_the_outbox_and_is_not_resent():
    root = scratch("refused")
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 60)), link)
    _drain(dev)
    box = [e[0] for e in dev.comm.outbox]
    assert len(box) >= 2
    link.feed(frames.encode(messages.pack(messages.UPLOAD_REFUSED, 1, messages.pack_upload_refused(box[0], "no"))))
    _drain(dev, 10)
    assert [e[0] for e in dev.comm.outbox] == box[1:]
    assert dev.comm.uploads_refused == 1
    # the outbox on flash agrees: a reboot does not bring the refused upload back
    assert [e[0] for e in _device(root).comm.outbox] == box[1:]


def _due(dev):
    """Step until what the ack timeout made due is queued, then until it all went out."""
    for _ in range(5000):
        if dev.step():
            break
        sleep_ms(1)
    _drain(dev, 5)


def test_dropped_uploads_are_told_as_gaps_until_the_ack_passes_them():
    root = scratch("gaps")
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 90)), link)
    _drain(dev)
    d = dev.state.data
    dropped = d["uploads_dropped"]
    link.tx = bytearray()
    dev.comm.gap_sent_at = ticks_add(dev.comm.gap_sent_at, -CFG["ack_timeout_ms"])  # the next round is due
    _due(dev)
    gaps = [struct.unpack(messages.GAP_FORMAT, b[:-messages.MAC_SIZE]) for t, b in _sent(link)
            if t == messages.UPLOAD_GAP]
    told = set()
    for first, last, why in gaps:
        assert why == messages.GAP_DROPPED
        told.update(range(first, last + 1))
    assert len(told) == dropped and not told & {e[0] for e in dev.comm.outbox}, (gaps, dropped)
    link.feed(frames.encode(messages.pack(messages.UPLOAD_ACK, 1, struct.pack("<I", d["next_upload"] - 1))))
    _drain(dev, 10)
    assert d["gaps"] == [] and d["acked_through"] == d["next_upload"] - 1, d
    # after a reboot the device tells what a gateway acknowledged before (a gateway with a new KB moves on)
    link2 = FakeUART()
    dev2 = _device(root, b"", link2)
    _drain(dev2)
    _due(dev2)
    settled = [struct.unpack(messages.GAP_FORMAT, b[:-messages.MAC_SIZE]) for t, b in _sent(link2)
               if t == messages.UPLOAD_GAP]
    assert settled == [(0, d["next_upload"] - 1, messages.GAP_SETTLED)], settled


def test_the_champion_upload_is_sent_again_until_the_gateway_acknowledges_it():
    root = scratch("champ")
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 31)), link)
    _drain(dev)
    first = [b for t, b in _sent(link) if t == messages.CHAMPION_CHUNK]
    assert first and dev.comm.champion is not None
    dev.comm.champion_sent_at = ticks_add(dev.comm.champion_sent_at, -CFG["ack_timeout_ms"])  # no CHAMPION_ACK
    _due(dev)
    assert [b for t, b in _sent(link) if t == messages.CHAMPION_CHUNK] == first * 2
    link.feed(frames.encode(messages.pack(messages.CHAMPION_ACK, 2, struct.pack(messages.CHAMPION_ACK_FORMAT, 0,
                                                                                 messages.CHAMPION_STORED))))
    _drain(dev, 5)
    assert dev.comm.champion is None


def test_a_forged_offer_touches_neither_the_transfer_nor_the_flash():
    from firmware import transfer

    root = scratch("offer")
    key = b"k" * 32
    makedirs(root + "/deploy")
    with open(root + "/deploy/key", "wb") as f:
        f.write(key)

    class Agent:
        device_id = "dev-t"

        def champion_info(self):
            return "", 0

    r = transfer.Receiver(root, Agent())
    body = struct.pack(messages.OFFER_FORMAT, b"\x11" * 32, 300, 1, 1) + struct.pack(messages.OFFER_FILE_FORMAT,
                                                                                    b"\x22" * 8, 100)
    replies = r.handle(messages.DEPLOY_OFFER, messages.seal(key, messages.TAG_OFFER, "dev-t", body), 5)
    assert [t for t, _ in replies] == [messages.DEPLOY_HAVE]
    state = open(root + "/deploy/xfer.json").read()
    big = struct.pack(messages.OFFER_FORMAT, b"\x33" * 32, 500000, 9, 1) + struct.pack(messages.OFFER_FILE_FORMAT,
                                                                                      b"\x44" * 8, 400000)
    for forged in (body + bytes(messages.MAC_SIZE), messages.seal(b"x" * 32, messages.TAG_OFFER, "dev-t", big),
                   messages.seal(key, messages.TAG_OFFER, "dev-u", big), big):
        replies = r.handle(messages.DEPLOY_OFFER, forged, 6)
        assert [t for t, _ in replies] == [messages.DEPLOY_RESULT]
        assert b"unauthenticated" in replies[0][1]
    assert open(root + "/deploy/xfer.json").read() == state  # the transfer in progress and its resume state
    assert r.state["digest"] == "11" * 32


def test_a_deploy_has_the_bus_no_upload_is_sent_again_under_it():
    """Uploads the gateway has not acknowledged are due again, then an offer arrives: the device answers it and
    sends nothing else until the deploy ends (its result) or falls silent for 2 x the ack timeout."""
    root = scratch("deployhold")
    makedirs(root + "/deploy")
    with open(root + "/deploy/key", "wb") as f:
        f.write(b"k" * 32)
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 60)), link)
    _drain(dev)
    assert dev.comm.outbox
    for e in dev.comm.outbox:
        e[3] = ticks_add(e[3], -CFG["ack_timeout_ms"])  # no UPLOAD_ACK within the ack timeout: all due again
    body = struct.pack(messages.OFFER_FORMAT, b"\x11" * 32, 300, 1, 1) + struct.pack(messages.OFFER_FILE_FORMAT,
                                                                                    b"\x22" * 8, 100)
    before = len(_sent(link))
    link.feed(frames.encode(messages.pack(messages.DEPLOY_OFFER, 9,
                                          messages.seal(b"k" * 32, messages.TAG_OFFER, "dev-t", body))))
    _drain(dev, 50, pause_ms=2)
    assert [t for t, _ in _sent(link)[before:]] in ([messages.DEPLOY_HAVE], [messages.UPLOAD, messages.DEPLOY_HAVE])
    dev.comm.deploy_hold = ticks_add(dev.comm.deploy_hold, -2 * CFG["ack_timeout_ms"])  # the deploy fell silent
    _due(dev)
    assert messages.UPLOAD in [t for t, _ in _sent(link)[before + 1:]]


def test_nothing_is_written_while_the_uart_still_sends():
    """A UART with txdone() (machine.UART's): the next frame waits until the previous one has left it."""
    root = scratch("txdone")
    link = FakeUART()
    dev = _device(root, samples_bytes(signal(50 * 60)), link)
    link.txdone = lambda: False
    while dev.data_in.uart.pos < len(dev.data_in.uart.rx):
        dev.step()
    assert len(link.tx) == 0 and dev.comm.outbox and all(e[3] is None for e in dev.comm.outbox)
    link.txdone = lambda: True
    _drain(dev)
    assert [t for t, _ in _sent(link)][0] == messages.HELLO and all(e[3] is not None for e in dev.comm.outbox)


def _same_champion(dev, forest_bytes):
    """The device scores like the forest stored as forest_bytes (on windows with normal and spiky data)."""
    want = isoforest.load(forest_bytes, dev.inference.forest.grid)
    probes = features.signal_features(signal(50 * 12, seed=21, spike_every=9), 100)
    return all(dev.inference.forest.score(r) == want.score(r) for r in probes)


def test_state_champion_and_outbox_survive_a_reboot():
    root = scratch("boot")
    dev = _device(root, samples_bytes(signal(50 * 50)))
    _drain(dev)
    fb = open(root + "/models/champion/forest.bin", "rb").read()
    box = [e[0] for e in dev.comm.outbox]
    nxt = dev.state.data["next_upload"]
    link = FakeUART()
    dev2 = _device(root, b"", link)
    assert dev2.inference.ready() and _same_champion(dev2, fb)
    assert [e[0] for e in dev2.comm.outbox] == box, ([e[0] for e in dev2.comm.outbox], box)
    assert dev2.state.data["next_upload"] == nxt and dev2.state.data["boots"] == 2, (nxt, dev2.state.data)
    link.feed(frames.encode(messages.pack(messages.STATUS_REQUEST, 9)))
    _drain(dev2, 20, pause_ms=3)
    hellos = [unpack_hello(b) for t, b in _sent(link) if t == messages.HELLO]
    assert len(hellos) == 2 and hellos[-1]["phase"] == 1 and hellos[-1]["windows"] >= 40, hellos


def test_corrupt_champion_falls_back_to_previous():
    root = scratch("fb")
    dev = _device(root, samples_bytes(signal(50 * 30)))
    _drain(dev)
    first = open(root + "/models/champion/forest.bin", "rb").read()
    grid = dev.inference.forest.grid
    dev.agent.install_local(isoforest.load(first, grid), 0.7)  # a second champion; the first becomes previous
    assert exists(root + "/models/previous/forest.bin")
    with open(root + "/models/champion/forest.bin", "wb") as f:
        f.write(b"IF\x01garbage")
    dev2 = _device(root)
    assert dev2.inference.ready() and _same_champion(dev2, first)
    assert dev2.agent.fallbacks == 1


def test_refused_package_changes_nothing():
    root = scratch("pkg")
    dev = _device(root, samples_bytes(signal(50 * 30)))
    _drain(dev)
    before = dev.inference.forest
    with open(root + "/deploy/key", "wb") as f:
        f.write(b"k" * 32)
    with open(root + "/deploy/stage.pkg", "wb") as f:
        f.write(b"TMPK" + bytes(100))
    ok, reason = dev.agent.install(root + "/deploy/stage.pkg")
    assert not ok and reason
    assert dev.inference.forest is before and not exists(root + "/models/new")
    assert dev.agent.refusals == 1


def test_feature_set_from_config_then_from_the_champion():
    from firmware import feature_sets
    from firmware._compat import read_json

    root = scratch("fset")
    link = FakeUART()
    write_json(root + "/config.json", dict(CFG, feature_set="wear"))
    dev = Device(FakeUART(samples_bytes(signal(50 * 45)), burst=128), link, root)
    _drain(dev)
    assert dev.inference.ready() and dev.inference.forest.n_features == 7
    assert read_json(root + "/models/champion/config.json")["feature_set"] == "wear"
    ups = [messages.unpack_upload(b[:-messages.MAC_SIZE]) for t, b in _sent(link) if t == messages.UPLOAD]
    assert ups and all(len(u[5]) == 7 and u[6] == feature_sets.CODES["wear"] for u in ups)
    want = feature_sets.extractor("wear")
    rows = features.signal_features(signal(50 * 3, seed=2), 100)
    assert len(rows[0]) == 3 and len(want(signal(50, seed=2))) == 7
    # a champion on the paper's features takes over: the device extracts those from the next window on
    paper = isoforest.train(rows * 10, 5, 16, 1)
    dev.agent.install_local(paper, 0.6, ("paper", {}))
    link.tx = bytearray()
    dev.data_in.uart.feed(samples_bytes(signal(50 * 12, seed=4)))
    _drain(dev)
    ups = [messages.unpack_upload(b[:-messages.MAC_SIZE]) for t, b in _sent(link) if t == messages.UPLOAD]
    assert ups and all(len(u[5]) == 3 and u[6] == 0 for u in ups)


def _alarming_device(name):
    """(root, link, device) after 40 windows, every one anomalous for a threshold this low: the rule raised an
    alarm once 4 windows were in its span."""
    root = scratch(name)
    link = FakeUART()
    write_json(root + "/config.json", dict(CFG, threshold=0.01))
    dev = Device(FakeUART(samples_bytes(signal(50 * 40)), burst=128), link, root)
    _drain(dev)
    return root, link, dev


def _alarm_ack(no, end, status=messages.ALARM_STORED):
    return frames.encode(messages.pack(messages.ALARM_ACK, 3, struct.pack(messages.ALARM_ACK_FORMAT, no, end, status)))


def _alarms_sent(link):
    """The sealed ALARM bodies the device wrote to link."""
    return [b for t, b in _sent(link) if t == messages.ALARM]


def _alarm_events(link):
    """The ALARM events the device wrote to link, unpacked (messages.unpack_alarm)."""
    return [messages.unpack_alarm(b[:-messages.MAC_SIZE]) for b in _alarms_sent(link)]


def test_persistent_anomalies_raise_an_alarm_reported_to_the_gateway():
    from firmware import feature_sets

    _, link, dev = _alarming_device("alarm")
    alarms = _alarm_events(link)
    assert len(alarms) == 1 and dev.alarm.active and dev.state.data["alarms"] == 1
    no, start, end, peak, code, version, champion = alarms[0]
    assert no == 0 and end is None and 0.0 < peak <= 1.0 and code == feature_sets.CODES["paper"]
    assert version == 0 and champion == "local-dev-t"
    assert messages.unpack_alarm(messages.pack_alarm(7, 5, 9, 0.5, 1, 2, "m"))[:3] == (7, 5, 9)


def test_an_alarm_is_sent_again_until_acknowledged_and_a_reboot_keeps_it():
    root, link, dev = _alarming_device("alarmbox")
    raised = _alarms_sent(link)
    assert len(raised) == 1 and [e[0] for e in dev.comm.alarm_box] == [0]
    box = dev.comm.alarm_box[0]
    box[3] = ticks_add(box[3], -CFG["ack_timeout_ms"])  # no ALARM_ACK within the ack timeout: sent again
    _due(dev)
    assert _alarms_sent(link) == raised * 2 and dev.comm.retransmits >= 1
    # a reboot before any ack: the alarm comes back from flash and is sent again, before any upload
    link = FakeUART()
    dev = Device(FakeUART(), link, root)
    assert [e[0] for e in dev.comm.alarm_box] == [0] and dev.state.data["next_alarm"] == 1
    _drain(dev)
    sent = [t for t, _ in _sent(link) if t in (messages.ALARM, messages.UPLOAD)]
    assert _alarms_sent(link) == raised and sent[0] == messages.ALARM, sent
    # acks of another event (its clear) or another alarm leave it; its own ack takes it, from flash too
    link.feed(_alarm_ack(0, 999) + _alarm_ack(1, 0))
    _drain(dev)
    assert [e[0] for e in dev.comm.alarm_box] == [0]
    link.feed(_alarm_ack(0, 0))
    _drain(dev)
    assert dev.comm.alarm_box == [] and dev.comm.alarms_acked == 1
    assert Device(FakeUART(), FakeUART(), root).comm.alarm_box == []


def test_an_alarm_open_at_a_reboot_is_cleared_after_it_with_its_number():
    root, link, dev = _alarming_device("alarmopen")
    (raised,) = _alarm_events(link)
    link = FakeUART()
    dev = Device(FakeUART(samples_bytes(signal(50 * 6)), burst=128), link, root)
    assert dev.alarm.active and dev.alarm_no == raised[0]
    dev.inference.threshold = 0.999  # the machine is healthy again: no window is anomalous
    _drain(dev)
    alarms = _alarm_events(link)
    # the clear of the same alarm (its number and start, an end) replaces its raise, never acknowledged
    assert {a[:2] for a in alarms} == {raised[:2]} and alarms[-1][2] is not None and not dev.alarm.active
    assert [e[:2] for e in dev.comm.alarm_box] == [[raised[0], alarms[-1][2]]]
    assert "open_alarm" not in dev.state.data
    dev.inference.threshold = 0.01  # worn again: the next alarm takes the next number
    dev.data_in.uart.feed(samples_bytes(signal(50 * 8)))
    _drain(dev)
    got = [a[:3] for a in _alarm_events(link)]
    assert [g[0] for g in got[len(alarms):]] == [1], got
    dev = Device(FakeUART(), FakeUART(), root)
    assert dev.alarm_no == 1 and [e[0] for e in dev.comm.alarm_box] == [0, 1]


def test_a_clear_replaces_its_raise_and_a_full_alarm_box_drops_its_oldest():
    root = scratch("alarmbound")
    comm = _device(root).comm
    comm.alarm_outbox_max = 3
    for no in range(4):
        comm.queue_alarm(messages.pack_alarm(no, 100 + no, 0, 0.7, 0, 0, "m"))
    assert [e[0] for e in comm.alarm_box] == [1, 2, 3] and comm.state.data["alarms_dropped"] == 1
    comm.queue_alarm(messages.pack_alarm(2, 102, 150, 0.8, 0, 0, "m"))  # alarm 2 cleared before its raise was acked
    assert [e[:2] for e in comm.alarm_box] == [[1, 0], [3, 0], [2, 150]]
    comm.handle(messages.ALARM_ACK, struct.pack(messages.ALARM_ACK_FORMAT, 2, 0, messages.ALARM_STORED))
    assert [e[0] for e in comm.alarm_box] == [1, 3, 2]  # the raise's late ack does not take the clear
    comm.handle(messages.ALARM_ACK, struct.pack(messages.ALARM_ACK_FORMAT, 2, 150, messages.ALARM_STORED))
    comm.handle(messages.ALARM_ACK, struct.pack(messages.ALARM_ACK_FORMAT, 3, 0, messages.ALARM_REFUSED))
    comm.handle(messages.ALARM_ACK, b"\x01")  # too short: counted, ignored
    assert [e[0] for e in comm.alarm_box] == [1] and comm.bad_messages == 1
    assert [e[:2] for e in _device(root).comm.alarm_box] == [[1, 0]]


def test_self_trained_champion_on_wear_gets_a_calibrated_threshold():
    from firmware._compat import read_json
    from firmware.local_training import LocalTraining, calibrated_threshold

    rows = features.signal_features(signal(50 * 40, seed=8), 100)
    t = LocalTraining(40, 10, 16, 3)
    for r in rows:
        t.add(r)
    forest = t.train(0.05)
    scores = [forest.score(r) for r in rows]
    assert t.threshold == calibrated_threshold(scores, 0.05) and 0.5 <= t.threshold <= 0.99
    assert sum(1 for s in scores if s > t.threshold) <= 0.05 * len(scores) + 1e-9
    assert calibrated_threshold([0.1, 0.2], 0.5) == 0.5 and calibrated_threshold([0.995], 0.1) == 0.99
    # a device on the wear set installs its first champion with such a threshold (the paper's keeps 0.6)
    root = scratch("cal")
    write_json(root + "/config.json", dict(CFG, feature_set="wear", target_fa=0.05))
    dev = Device(FakeUART(samples_bytes(signal(50 * 35)), burst=128), FakeUART(), root)
    _drain(dev)
    thr = read_json(root + "/models/champion/config.json")["threshold"]
    assert thr == dev.inference.threshold and thr != 0.6 and 0.5 <= thr <= 0.99
