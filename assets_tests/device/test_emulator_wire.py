"""The emulator's half-duplex wire: every byte's wire time exact against a running deadline, turnarounds, time scale,
no lost time when the writer runs late but ahead of the wire. Real ptys, real pyserial. Tests check the schedule
and lower bounds only; the hand-over latency of a loaded host is a figure of benchmarks/deploy.py."""

import random
import time

import pytest
import serial

from tinyml_dagster.emulator import deploy_run
from tinyml_dagster.emulator.wire import HalfDuplexWire
from tinyml_dagster.link import LinkTiming, estimate_deploy

SCALE = 10.0
BYTE_S = 10 / 2400 / SCALE  # 0.42 ms per byte in real time
TURN_S = 0.1 / SCALE


@pytest.fixture
def wire():
    w = HalfDuplexWire(baud=2400, turnaround_s=0.1, time_scale=SCALE)
    gw = serial.Serial(w.port_path, timeout=0)
    yield w, gw
    gw.close()
    w.close()


def _device_read(port, n, timeout=5.0):
    """Read n bytes on the device side; (data, arrival time of every byte)."""
    buf = bytearray(512)
    out, times = bytearray(), []
    deadline = time.perf_counter() + timeout
    while len(out) < n and time.perf_counter() < deadline:
        k = port.readinto(buf)
        if k:
            now = time.perf_counter()
            out += buf[:k]
            times += [now] * k
        else:
            time.sleep(0.0002)
    return bytes(out), times


def _gateway_read(gw, n, timeout=5.0):
    out, times = bytearray(), []
    deadline = time.perf_counter() + timeout
    while len(out) < n and time.perf_counter() < deadline:
        data = gw.read(4096)
        if data:
            now = time.perf_counter()
            out += data
            times += [now] * len(data)
        else:
            time.sleep(0.0002)
    return bytes(out), times


def test_a_late_writer_ahead_of_the_wire_loses_no_time(wire):
    w, gw = wire
    rng = random.Random(5)
    payload = bytes(rng.randrange(256) for _ in range(1200))  # 0.5 s of wire at x10
    port = w.device_port()
    t0 = time.perf_counter()
    gw.write(payload[:100])
    gw.flush()
    for i in range(100, 1200, 100):
        # the writer wakes late each time (jitter) but always before the wire has drained what it wrote
        time.sleep(rng.uniform(0.0, 0.03))
        gw.write(payload[i : i + 100])
        gw.flush()
    data, times = _device_read(port, len(payload))
    assert data == payload
    for k in (0, 99, 100, 599, 1199):
        assert times[k] >= t0 + (k + 1) * BYTE_S - 1e-4, f"byte {k} arrived before its wire time"
    assert w.stats()["bytes_down"] == len(payload) and w.stats()["turnarounds"] == 0
    log = list(w.log)
    for (_, _, _, prev_end, _), (_, written, start, _, _) in zip(log, log[1:]):
        assert start == pytest.approx(max(written, prev_end), abs=1e-9), "a late write stretched the wire"


def test_the_schedule_is_exact(wire):
    """Every write starts at max(written, end of the previous byte [+ turnaround]): no time lost, whatever the load."""
    w, gw = wire
    port = w.device_port()
    rng = random.Random(9)
    for _ in range(30):
        if rng.random() < 0.6:
            gw.write(bytes(rng.randrange(1, 80)))
            gw.flush()
        else:
            port.write(bytes(rng.randrange(1, 40)))
        time.sleep(rng.uniform(0.0, 0.02))
    time.sleep(0.2)
    log = list(w.log)
    assert len(log) >= 20 and {d for d, *_ in log} == {"up", "down"}
    prev_dir, prev_end = None, 0.0
    for direction, written, start, end, turn in log:
        assert turn == (prev_dir is not None and direction != prev_dir)
        due = max(written, prev_end + (TURN_S if turn else 0.0))
        assert start == pytest.approx(due, abs=1e-9)
        prev_dir, prev_end = direction, end
    assert w.busy_s == pytest.approx(sum(e - s for _, _, s, e, _ in log))
    assert w.turnarounds == sum(t for *_, t in log)


def test_direction_change_waits_for_the_wire_and_the_turnaround(wire):
    w, gw = wire
    port = w.device_port()
    t0 = time.perf_counter()
    gw.write(bytes(240))
    gw.flush()
    time.sleep(0.005)
    port.write(b"\x55" * 100)  # the device answers while the gateway's bytes are still on the wire
    down, dtimes = _device_read(port, 240)
    up, utimes = _gateway_read(gw, 100)
    assert down == bytes(240) and up == b"\x55" * 100
    due = t0 + 340 * BYTE_S + TURN_S
    assert utimes[-1] >= due - 1e-4
    assert dtimes[-1] < utimes[0]
    assert w.stats()["turnarounds"] == 1
    assert w.busy_s == pytest.approx(340 * BYTE_S)


def test_an_idle_wire_gives_no_credit(wire):
    w, gw = wire
    port = w.device_port()
    gw.write(b"a" * 20)
    gw.flush()
    _device_read(port, 20)
    time.sleep(0.1)
    t1 = time.perf_counter()
    gw.write(b"b" * 50)
    gw.flush()
    data, times = _device_read(port, 50)
    assert data == b"b" * 50
    # the second burst starts when written, not where the first ended
    assert times[-1] >= t1 + 50 * BYTE_S - 1e-4


def test_time_scale_one_is_2400_baud(wire):
    w = HalfDuplexWire(baud=2400, turnaround_s=0.1, time_scale=1.0)
    try:
        gw = serial.Serial(w.port_path, timeout=0)
        t0 = time.perf_counter()
        w.device_port().write(b"z" * 60)  # 0.25 s at 240 bytes/s
        data, times = _gateway_read(gw, 60)
        gw.close()
    finally:
        w.close()
    assert data == b"z" * 60
    assert times[-1] - t0 >= 0.25 - 1e-3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="baud=0"):
        HalfDuplexWire(baud=0)


def test_bytes_for_a_closed_port_wait_in_the_modem():
    w = HalfDuplexWire(baud=2400, turnaround_s=0.1, time_scale=SCALE)
    try:
        w.device_port().write(b"hello at boot")  # the device boots before the gateway opens its port
        time.sleep(0.1)
        assert w.stats()["bytes_up"] == 13  # crossed the wire, held by the gateway's modem
        gw = serial.Serial(w.port_path, timeout=0)  # pyserial's open() flushes its input
        data, _ = _gateway_read(gw, 13, timeout=2)
        gw.close()
    finally:
        w.close()
    assert data == b"hello at boot"


def test_a_deploy_on_the_emulator_never_lets_a_byte_wait_on_a_free_wire():
    """The real Deployer and pySerialTransfer, the real firmware (CPython) on the emulator, a 50-tree package at x10:
    every byte starts as soon as it is written or the wire is free, and the deploy's span is exactly its bytes,
    turnarounds and the endpoints' processing (how much processing is a figure: benchmarks/deploy.py)."""
    pkg = deploy_run.package(deploy_run.training_rows(400), 50, "compact")
    assert 6000 < pkg.size < 12000
    t0 = time.perf_counter()
    (rep,), _, log = deploy_run.deploy_on_emulator([pkg], "cpython", SCALE, with_log=True, reply_slack_s=2.0)
    assert rep.installed and rep.retransmissions == 0 and rep.timeouts == 0
    log = deploy_run.deploy_log(log, t0)
    assert [d for d, *_ in log][:2] == ["down", "up"] and log[-1][0] == "up"  # offer, have, fragments, result
    acc = deploy_run.account(log, TURN_S)
    assert acc.waited_while_free == 0, "a byte waited while the wire was free"
    assert acc.busy_s == pytest.approx(rep.wire_bytes * BYTE_S, rel=1e-6)
    assert acc.span_s == pytest.approx(acc.busy_s + acc.idle_s + acc.turnaround_s, abs=1e-6)
    # the gateway's link time covers the whole exchange on the wire
    assert rep.link_seconds / SCALE >= acc.span_s - 0.005
    # the Release check's estimate is this deploy's exact wire bytes and turnarounds
    est = estimate_deploy(rep.stream_bytes, len(pkg.files), pkg.model_id, pkg.version, LinkTiming())
    assert (est.wire_bytes, est.turnarounds) == (rep.wire_bytes, sum(e[4] for e in log[1:]))
