"""Shared pieces of the gateway fault tests: a real pty port, the link service in a thread, frames in and out."""

from __future__ import annotations

import os
import pty
import struct
import threading
import time
import tty
from contextlib import contextmanager

from firmware import frames, messages
from tinyml_dagster.link_service import LinkService


KEY = bytes(range(32))  # the device key of the tests' devices (the service gets it through `keys`)


class Pty:
    """A real pseudo-terminal: the service opens `path`, the test plays the device on the master side."""

    def __init__(self, device_id: str = "dev-a", key: bytes = KEY):
        self.device_id, self.key = device_id, key
        self.master, self.slave = pty.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.decoder = frames.FrameDecoder()
        self.tx_seq = 0

    def send(self, mtype: int, body: bytes = b"") -> None:
        self.tx_seq = (self.tx_seq + 1) & 0xFFFF
        self.write(bytes(frames.encode(messages.pack(mtype, self.tx_seq, body))))

    def write(self, data: bytes, timeout: float = 20.0) -> None:
        """All of data into the line (waiting while the gateway has not read what is there)."""
        deadline = time.time() + timeout
        while data:
            try:
                data = data[os.write(self.master, data):]
            except BlockingIOError:
                assert time.time() < deadline, "the gateway stopped reading its port"
                time.sleep(0.005)

    def sealed(self, tag: bytes, body: bytes) -> bytes:
        """body with its MAC under this device's key."""
        return messages.seal(self.key, tag, self.device_id, body)

    def upload(self, no: int, feats=(0.01, -0.2, 1.5), anomaly: bool = False, score: float = 0.3) -> None:
        body = messages.pack_upload(no, 1000 + no, anomaly, 3, score, feats)
        self.send(messages.UPLOAD, messages.seal(self.key, messages.TAG_UPLOAD, self.device_id, body))

    def read(self, want: int, timeout: float = 20.0, until=None) -> list[tuple[int, bytes]]:
        """Up to `want` messages (type, body) from the gateway, or those that arrived within timeout."""
        got: list[tuple[int, bytes]] = []
        deadline = time.time() + timeout
        while len(got) < want and time.time() < deadline:
            try:
                data = os.read(self.master, 4096)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            for b in data:
                n = self.decoder.feed(b)
                if n:
                    m = messages.unpack(bytes(self.decoder.buf[:n]))
                    if m is not None:
                        got.append((m[0], bytes(m[2])))
            if until is not None and until(got):
                break
        return got

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


class PtyLink:
    """The device end of a pty as the firmware's link (readinto/write), for the real DataComm."""

    def __init__(self, port: Pty):
        self.port = port

    def readinto(self, buf) -> int:
        try:
            data = os.read(self.port.master, len(buf))
        except BlockingIOError:
            return 0
        buf[:len(data)] = data
        return len(data)

    def write(self, data) -> None:
        self.port.write(bytes(data))


class State:
    """The device state DataComm keeps its counters in (RAM only)."""

    def __init__(self):
        self.data = {}

    def save(self):
        pass


def acks(msgs: list[tuple[int, bytes]]) -> list[int]:
    return [struct.unpack_from("<I", b, 0)[0] for t, b in msgs if t == messages.UPLOAD_ACK]


def refusals(msgs: list[tuple[int, bytes]]) -> list[tuple[int, str]]:
    return [(struct.unpack_from("<I", b, 0)[0], b[4:].decode()) for t, b in msgs if t == messages.UPLOAD_REFUSED]


@contextmanager
def running(kb_path, wait_ports: bool = True, **kwargs):
    """The link service in a thread (its ports open, unless not wait_ports), stopped (and checked to have kept
    running) on exit."""
    kwargs.setdefault("keys", lambda device_id: KEY)
    svc = LinkService(kb_path, **kwargs)
    errors: list[BaseException] = []

    def run():
        try:
            svc.run()
        except BaseException as e:  # the test fails on it below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert svc.ready.wait(30)
    if wait_ports:  # opening a port flushes its input: the device speaks once the gateway listens
        assert wait_for(lambda: all(link.port_state == "open" for link in svc._links.values()))
    if svc.ingest_socket is not None:
        assert wait_for(svc.ingest_socket.exists)
    try:
        yield svc
        assert t.is_alive() and not errors, errors
    finally:
        svc.stop()
        t.join(timeout=15)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
