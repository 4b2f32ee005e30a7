"""Alarm events over a lossy link: the device's real DataComm on a real pty, the link service reading it with the real
pySerialTransfer; a lost ALARM or ALARM_ACK frame makes the device send the alarm again, and it is stored once."""

from __future__ import annotations

import time

from gateway_harness import KEY, Pty, PtyLink, State, running
from firmware import frames, messages
from firmware._compat import ticks_ms
from firmware.data_comm import DataComm
from tinyml_dagster.knowledge_base import KnowledgeBase


def _type(frame_bytes: bytes) -> int | None:
    """The message type of the first complete frame in frame_bytes (None: none, or a bad envelope)."""
    dec = frames.FrameDecoder()
    for b in frame_bytes:
        n = dec.feed(b)
        if n:
            m = messages.unpack(bytes(dec.payload()))
            return None if m is None else m[0]
    return None


class LossyLink:
    """Wraps a device's link (readinto/write): the first frame of each listed message type is lost, going up (the
    device writes it) or coming down (the gateway sent it)."""

    def __init__(self, link, lose_up: set[int], lose_down: set[int] = frozenset()):
        self.link, self.lose_up, self.lose_down = link, set(lose_up), set(lose_down)
        self.lost: list[int] = []
        self.sent: list[int] = []
        self.decoder = frames.FrameDecoder()
        self.pending = bytearray()

    def write(self, data):
        t = _type(bytes(data))
        if t in self.lose_up:
            self.lose_up.discard(t)
            self.lost.append(t)
            return len(data)
        self.sent.append(t)
        return self.link.write(data)

    def readinto(self, buf) -> int:
        got = bytearray(4096)
        for b in got[:self.link.readinto(got) or 0]:
            n = self.decoder.feed(b)
            if n:
                frame = frames.encode(bytes(self.decoder.payload()))
                t = _type(frame)
                if t in self.lose_down:
                    self.lose_down.discard(t)
                    self.lost.append(t)
                else:
                    self.pending += frame
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        del self.pending[:n]
        return n


def _deliver(comm: DataComm, timeout: float = 30.0) -> None:
    """Run the device's link until its alarm box is empty."""
    deadline = time.time() + timeout
    while comm.alarm_box and time.time() < deadline:
        comm.poll()
        comm.service(ticks_ms())
        time.sleep(0.002)
    assert not comm.alarm_box, comm.alarm_box


def test_a_lost_alarm_frame_and_a_lost_ack_are_made_good_and_the_alarm_is_stored_once(tmp_path):
    port = Pty()
    root = tmp_path / "flash"
    (root / "deploy").mkdir(parents=True)
    (root / "deploy" / "key").write_bytes(KEY)
    link = LossyLink(PtyLink(port), lose_up={messages.ALARM}, lose_down={messages.ALARM_ACK})
    comm = DataComm(link, str(root), State(), baud=1_000_000, ack_timeout_ms=300, device_id="dev-a")
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}):
            kb = KnowledgeBase(tmp_path / "kb.sqlite")
            comm.queue_alarm(messages.pack_alarm(0, 1000, 0, 0.8, 1, 3, "m-1"))
            _deliver(comm)
            # the first ALARM was lost on the way up, the ack of the second on the way down: a third made it good
            assert link.lost == [messages.ALARM, messages.ALARM_ACK]
            assert link.sent.count(messages.ALARM) == 2 and comm.retransmits == 2 and comm.alarms_acked == 1
            assert [(a["device_id"], a["alarm_no"], a["start"], a["end"]) for a in kb.alarms()] == \
                [("dev-a", 0, 1000.0, None)]
            comm.queue_alarm(messages.pack_alarm(0, 1000, 1300, 0.9, 1, 3, "m-1"))  # cleared: the same row
            _deliver(comm)
            assert link.sent.count(messages.ALARM) == 3
            (a,) = kb.alarms()
            assert (a["alarm_no"], a["end"], round(a["peak_score"], 4), a["feature_set"], a["champion_id"]) == \
                (0, 1300.0, 0.9, "wear", "m-1")
    finally:
        port.close()


def test_the_emulated_device_raises_an_alarm_whose_lost_frame_is_sent_again_and_stored_once(tmp_path, ims_files):
    from tinyml_dagster.emulator import DeviceEmulator
    from tinyml_dagster.link.transport import LinkTiming

    flash = tmp_path / "dev-e" / "flash"
    (flash / "deploy").mkdir(parents=True)
    (flash / "deploy" / "key").write_bytes(KEY)
    # a threshold no window stays under: every window is anomalous and the alarm rule raises within a few windows
    emu = DeviceEmulator("dev-e", flash_dir=flash, ims_files=ims_files, rate_hz=500,
                         runtime="cpython", time_scale=20, turnaround_ms=10, loop_data=True,
                         config={"n_train": 4, "n_trees": 10, "psi": 4, "threshold": 0.01, "upload_every": 1}).start()
    try:
        lossy = emu.device.comm.link = LossyLink(emu.device.comm.link, {messages.ALARM})
        with running(tmp_path / "kb.sqlite", ports={"dev-e": emu.port_path}, timing=LinkTiming(time_scale=1 / 20)):
            kb = KnowledgeBase(tmp_path / "kb.sqlite")
            deadline = time.time() + 60
            while not (lossy.lost and kb.alarms() and emu.device.comm.alarms_acked) and time.time() < deadline:
                time.sleep(0.05)
            comm = emu.device.comm
            assert lossy.lost == [messages.ALARM] and comm.alarms_acked == 1 and not comm.alarm_box
            (a,) = kb.alarms()
            assert (a["device_id"], a["alarm_no"], a["end"], a["champion_id"]) == ("dev-e", 0, None, "local-dev-e")
            assert emu.device.alarm.active and emu.device.state.data["alarms"] == 1
    finally:
        emu.stop()
    assert not emu.errors, emu.errors
