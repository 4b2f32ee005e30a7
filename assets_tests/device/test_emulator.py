"""The device emulator: firmware in the MicroPython VM (and CPython), link on a pty opened by pySerialTransfer."""

import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pySerialTransfer import pySerialTransfer as txfer

from firmware import features, messages
from firmware.data_comm import unpack_hello
from tinyml_dagster.emulator import DeviceEmulator
from tinyml_dagster.emulator.data_feed import DataFeed

RATE = 500  # 2 windows of 250 samples per 1-s IMS file
CFG = {"n_train": 4, "n_trees": 10, "psi": 4, "upload_every": 1, "outbox_max": 16}


class Gateway:
    """The gateway's end of the link: the real pySerialTransfer on the emulator's pty."""

    def __init__(self, port):
        self.link = txfer.SerialTransfer(port, baud=2400, restrict_ports=False, debug=False)
        self.link.open()
        self.seq = 0

    def receive(self, until, timeout=20.0):
        """Messages (type, seq, body, arrival time) until until(messages) is true."""
        got = []
        end = time.monotonic() + timeout
        while time.monotonic() < end and not until(got):
            if self.link.available():
                m = messages.unpack(bytes(self.link.rx_buff[: self.link.bytes_read]))
                assert m is not None, "envelope check failed"
                got.append((m[0], m[1], bytes(m[2]), time.monotonic()))
            else:
                time.sleep(0.002)
        return got

    def send(self, msg_type, body=b""):
        self.seq += 1
        payload = messages.pack(msg_type, self.seq, body)
        self.link.tx_buff[: len(payload)] = list(payload)
        self.link.send(len(payload))

    def close(self):
        self.link.close()


def _uploads(got):
    return [messages.unpack_upload(b[:-messages.MAC_SIZE]) for t, _, b, _ in got if t == messages.UPLOAD]


def _gateway_features(files):
    feed = DataFeed(files, 1, "x", RATE)
    rows = []
    for f in files:
        x = np.asarray(feed.file_samples(f), dtype=np.float32).astype(np.float64).tolist()
        rows += features.signal_features(x, RATE)
    return [tuple(struct.unpack("<3f", struct.pack("<3f", *r))) for r in rows]


@pytest.mark.parametrize("runtime", ["vm", "cpython"])
def test_emulator_trains_uploads_takes_acks_and_survives_restart(tmp_path, ims_files, runtime):
    flash = tmp_path / "dev" / "flash"
    emu = DeviceEmulator("dev-e", flash_dir=flash, ims_files=ims_files, rate_hz=RATE, runtime=runtime,
                         time_scale=20, turnaround_ms=10, config=CFG).start()
    gw = Gateway(emu.port_path)
    try:
        t0 = time.monotonic()
        got = gw.receive(lambda g: len({u[0] for u in _uploads(g)}) >= 6)
        types = [t for t, *_ in got]
        assert types[0] == messages.HELLO
        assert unpack_hello(got[0][2])["phase"] == 0
        assert messages.CHAMPION_CHUNK in types
        ups = _uploads(got)
        numbers = sorted({u[0] for u in ups})
        assert numbers[:6] == list(range(6))
        # window -> features on the device equal the gateway's (float32 on the wire); 4 windows trained it
        want = _gateway_features(ims_files)
        for u in ups:
            assert u[5] == want[4 + u[0]], (u, want[4 + u[0]])
            assert 0.0 < u[4] < 1.0 and u[3] == 0
        # every byte's wire time is honoured: 10 bits at 2,400 baud x 20
        assert time.monotonic() - t0 >= emu.wire.stats()["bytes_up"] * 10 / (2400 * 20) * 0.95
        gw.send(messages.UPLOAD_ACK, struct.pack("<I", 3))
        gw.send(messages.STATUS_REQUEST)
        got = gw.receive(lambda g: any(t == messages.HELLO for t, *_ in g))
        hello = unpack_hello([b for t, _, b, _ in got if t == messages.HELLO][0])
        assert hello["phase"] == 1 and hello["champion_id"] == "local-dev-e" and hello["windows"] >= 10
        assert emu.wire.stats()["bytes_down"] > 0 and emu.wire.stats()["turnarounds"] >= 1
        ups = _uploads(gw.receive(lambda g: len(_uploads(g)) >= 3, timeout=5))
        assert ups and min(u[0] for u in ups) >= 4, "acked uploads were sent again"
        assert emu.reboots == 0, emu.errors
    finally:
        gw.close()
        emu.stop()
    assert (flash / "models" / "champion" / "forest.bin").exists()
    champion = (flash / "models" / "champion" / "forest.bin").read_bytes()
    emu = DeviceEmulator("dev-e", flash_dir=flash, ims_files=ims_files, rate_hz=RATE, runtime=runtime,
                         time_scale=20, config=CFG).start()
    gw = Gateway(emu.port_path)
    try:
        got = gw.receive(lambda g: any(t == messages.HELLO for t, *_ in g))
        hello = unpack_hello([b for t, _, b, _ in got if t == messages.HELLO][0])
        assert hello["phase"] == 1 and hello["next_upload"] >= 6, hello
    finally:
        gw.close()
        emu.stop()
    assert (flash / "models" / "champion" / "forest.bin").read_bytes() == champion


def test_the_vm_runtime_collects_its_garbage_between_steps(tmp_path, ims_files):
    """Windows leave garbage (tens of KB each) and the firmware collects none in the VM: the emulator's loop does,
    between steps, so a 2 MB heap carries hundreds of windows without a reboot, and the device reports the free
    heap after those collections."""
    emu = DeviceEmulator("dev-g", flash_dir=tmp_path / "flash", ims_files=ims_files, rate_hz=RATE, runtime="vm",
                         time_scale=20, turnaround_ms=10, config={**CFG, "upload_every": 50}, loop_data=True,
                         heap_bytes=2 * 1024 * 1024).start()
    gw = Gateway(emu.port_path)
    try:
        hello = {"windows": 0}
        deadline = time.monotonic() + 120
        while hello["windows"] < 300 and time.monotonic() < deadline:
            gw.send(messages.STATUS_REQUEST)
            got = gw.receive(lambda g: any(t == messages.HELLO for t, *_ in g), timeout=5)
            hello = unpack_hello([b for t, _, b, _ in got if t == messages.HELLO][-1])
            time.sleep(1.0)
        assert hello["windows"] >= 300, hello
        assert emu.reboots == 0, emu.errors
        assert 0 < hello["health"]["free_heap"] < 2 * 1024 * 1024
    finally:
        gw.close()
        emu.stop()


def test_cli_prints_port_and_runs(tmp_path, ims_files):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyml_dagster.emulator", "--device-id", "dev-cli", "--flash", str(tmp_path / "f"),
         "--ims-dir", str(Path(ims_files[0]).parent), "--rate-hz", "500", "--runtime", "cpython",
         "--time-scale", "20", "--set", "n_train=4", "--set", "psi=4", "--duration", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = proc.stdout.readline().split()
    assert port[0] == "PORT" and port[1].startswith("/dev/")
    gw = Gateway(port[1])
    try:
        got = gw.receive(lambda g: any(t == messages.HELLO for t, *_ in g), timeout=10)
        assert unpack_hello(got[0][2])["device_id"] == "dev-cli"
    finally:
        gw.close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"reboots": 0' in out


def test_cli_names_a_missing_ims_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyml_dagster.emulator", "--ims-dir", str(tmp_path / "none"),
                        "--flash", str(tmp_path / "f")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and str(tmp_path / "none") in r.stderr


def test_a_looping_feed_replays_the_same_samples_parsing_each_file_once(ims_files, monkeypatch):
    feed = DataFeed(ims_files[:2], 1, "x", RATE, time_scale=1000.0, loop=True)
    parsed = []
    original = feed.file_samples
    monkeypatch.setattr(feed, "file_samples", lambda f: parsed.append(f) or original(f))
    per_pass = 2 * 2 * features.window_length(RATE, features.WINDOW_MS) * 4  # 2 files x 2 windows, float32
    first, second = bytearray(), bytearray()
    deadline = time.monotonic() + 30
    while len(second) < per_pass and time.monotonic() < deadline:
        buf = bytearray(4096)
        n = feed.readinto(buf) or 0
        (first if len(first) < per_pass else second).extend(buf[:n])
    assert len(first) == len(second) == per_pass and first == second
    assert parsed == ims_files[:2]
    assert feed.seconds_to_next_window() >= 0.0
