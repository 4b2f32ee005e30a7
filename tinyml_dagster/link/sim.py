"""A simulated power line between two pseudo-terminals: half-duplex wire time, turnaround, seeded faults.

The gateway opens `link.gateway_port` with the real pySerialTransfer; the device reads and writes
`link.device_uart` (readinto/write, like machine.UART). Every byte is delivered after its wire time
(10 bits at `baud`), each change of direction costs the turnaround, all scaled by `time_scale`.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
import tty
from dataclasses import dataclass

from .transport import LinkTiming


@dataclass(frozen=True)
class Faults:
    """Per-byte probabilities of corruption, loss and duplication, of a lost burst (a dropped frame or more),
    and per write (usually one frame) of it arriving twice."""

    repeat: float = 0.0
    corrupt: float = 0.0
    drop: float = 0.0
    duplicate: float = 0.0
    burst: float = 0.0
    burst_len: tuple[int, int] = (8, 300)


class PtyUart:
    """A non-blocking pty end with the UART methods the firmware uses."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)

    def readinto(self, buf) -> int:
        try:
            data = os.read(self.fd, len(buf))
        except (BlockingIOError, OSError):
            return 0
        buf[: len(data)] = data
        return len(data)

    def write(self, data) -> int:
        data = bytes(data)
        done = 0
        while done < len(data):
            try:
                done += os.write(self.fd, data[done:])
            except BlockingIOError:
                time.sleep(0.001)
        return done


class SimulatedLink:
    """Two ptys joined by a forwarder thread that models the channel and injects seeded faults."""

    def __init__(self, timing: LinkTiming | None = None, faults: Faults = Faults(), seed: int = 0) -> None:
        self.timing = timing if timing is not None else LinkTiming()
        self.faults = faults
        self.rng = random.Random(seed)
        self._gw_master, gw_slave = os.openpty()
        self._dev_master, dev_slave = os.openpty()
        for fd in (self._gw_master, gw_slave, self._dev_master, dev_slave):
            tty.setraw(fd)
        self._gw_slave = gw_slave
        self.gateway_port = os.ttyname(gw_slave)
        self.device_uart = PtyUart(dev_slave)
        self.cut_flag = False
        self.stats = {"bytes": 0, "corrupted": 0, "dropped": 0, "duplicated": 0, "repeated": 0, "turnarounds": 0}
        self._queue: list[tuple[float, int, bytes]] = []  # (due, fd, bytes)
        self._free_at = 0.0
        self._last_dir = None
        self._burst_left = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated-link", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Everything sent from now on is lost."""
        self.cut_flag = True

    def restore(self) -> None:
        self.cut_flag = False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in (self._gw_master, self._dev_master, self._gw_slave, self.device_uart.fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "SimulatedLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _mangle(self, data: bytes) -> bytes:
        f = self.faults
        if self.cut_flag:
            self.stats["dropped"] += len(data)
            return b""
        if not (f.corrupt or f.drop or f.duplicate or f.burst):
            return data
        out = bytearray()
        rng = self.rng
        for b in data:
            if self._burst_left:
                self._burst_left -= 1
                self.stats["dropped"] += 1
                continue
            if f.burst and rng.random() < f.burst:
                self._burst_left = rng.randint(*f.burst_len) - 1
                self.stats["dropped"] += 1
                continue
            if f.drop and rng.random() < f.drop:
                self.stats["dropped"] += 1
                continue
            if f.corrupt and rng.random() < f.corrupt:
                b ^= 1 << rng.randrange(8)
                self.stats["corrupted"] += 1
            out.append(b)
            if f.duplicate and rng.random() < f.duplicate:
                out.append(b)
                self.stats["duplicated"] += 1
        return bytes(out)

    def _schedule(self, direction: str, data: bytes, dest: int) -> None:
        tm = self.timing
        now = time.monotonic()
        start = max(now, self._free_at)
        if self._last_dir is not None and self._last_dir != direction:
            start = max(start, self._free_at + tm.turnaround_s * tm.time_scale)
            self.stats["turnarounds"] += 1
        self._last_dir = direction
        step = tm.byte_s * tm.time_scale
        # wire time is spent on every byte sent, whatever the faults do to it
        self._free_at = start + len(data) * step
        self.stats["bytes"] += len(data)
        mangled = self._mangle(data)
        if self.faults.repeat and mangled and self.rng.random() < self.faults.repeat:
            self.stats["repeated"] += 1
            self._free_at += len(data) * step
            mangled += mangled
        if mangled:
            # deliver in slices of up to 16 bytes, each when its last byte has crossed the wire
            for i in range(0, len(mangled), 16):
                chunk = mangled[i : i + 16]
                self._queue.append((start + min(i + len(chunk), len(data)) * step, dest, chunk))

    def _run(self) -> None:
        sources = {self._gw_master: ("down", self._dev_master), self._dev_master: ("up", self._gw_master)}
        while not self._stop.is_set():
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, fd, chunk = self._queue.pop(0)
                try:
                    os.write(fd, chunk)
                except OSError:
                    pass
            wait = 0.01 if not self._queue else max(0.0, min(0.01, self._queue[0][0] - now))
            try:
                ready, _, _ = select.select(list(sources), [], [], wait)
            except (OSError, ValueError):
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                direction, dest = sources[fd]
                self._schedule(direction, data, dest)


class DeviceHost:
    """The real firmware (firmware.device.Device) run by a CPython thread on a flash directory; restartable."""

    def __init__(self, root: str, uart, data_uart=None) -> None:
        self.root = root
        self.uart = uart
        self.data_uart = data_uart if data_uart is not None else _SilentSensor()
        self.device = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "DeviceHost":
        from firmware.device import Device

        self.device = Device(self.data_uart, self.uart, self.root)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="device", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.device.step():
                    time.sleep(0.0005)
        except BaseException as exc:  # a simulated power loss ends the loop like a reset would
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def restart(self) -> "DeviceHost":
        """Power-cycle: RAM state is lost, the flash stays."""
        self.stop()
        self.error = None
        return self.start()


class _SilentSensor:
    """A data UART with no samples (the deploy tests do not need any)."""

    def readinto(self, buf) -> int:
        return 0


def provision_flash(root, device_id: str, key: bytes, timing: LinkTiming | None = None) -> None:
    """A fresh device flash: config.json (id, link speed as seen in scaled time) and the deploy key."""
    import json
    from pathlib import Path

    timing = timing if timing is not None else LinkTiming()
    root = Path(root)
    (root / "deploy").mkdir(parents=True, exist_ok=True)
    (root / "deploy" / "key").write_bytes(key)
    cfg = {"device_id": device_id, "baud": int(timing.baud / timing.time_scale)}
    (root / "config.json").write_text(json.dumps(cfg))
