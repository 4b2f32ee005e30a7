"""The link UART of an emulated device: a pseudo-terminal whose bytes cross a half-duplex wire at the baud rate.

The gateway opens `port_path` with pyserial like a real port. Every byte takes its wire time (10 bits at 8N1,
divided by time_scale) and arrives at the end of it; the wire carries one direction at a time and waits
`turnaround_s` when the direction changes. Bytes a side writes while the other is talking wait in its modem's
buffer (nothing is lost), as with a half-duplex power-line modem.
"""

from __future__ import annotations

import os
import pty
import select
import threading
import time
import tty
from pathlib import Path

BITS_PER_BYTE = 10  # 8N1: start + 8 data + stop


class HalfDuplexWire:
    """pty <-> device byte pipe with wire timing; device side via `device_port()` (readinto/write)."""

    def __init__(self, baud: int = 2400, turnaround_s: float = 0.01, time_scale: float = 1.0,
                 link_path: str | Path | None = None) -> None:
        if baud <= 0 or time_scale <= 0 or turnaround_s < 0:
            raise ValueError(f"bad wire settings: baud={baud} time_scale={time_scale} turnaround_s={turnaround_s}")
        self.byte_s = BITS_PER_BYTE / baud / time_scale
        self.turnaround_s = turnaround_s / time_scale
        self.master, self.slave = pty.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.port_path = os.ttyname(self.slave)
        self.link_path = Path(link_path) if link_path else None
        if self.link_path:
            tmp = self.link_path.with_name(self.link_path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(self.port_path, tmp)
            os.replace(tmp, self.link_path)
        self._lock = threading.Lock()
        self._to_device = bytearray()  # delivered, waiting for the device to read
        self._from_device = bytearray()  # written by the device, waiting for the wire
        self._from_gateway = bytearray()  # written by the gateway, waiting for the wire
        self._direction = None  # "up" (device -> gateway) or "down"
        self._free_at = time.perf_counter()  # when the wire finishes its last byte
        self.bytes_up = 0
        self.bytes_down = 0
        self.turnarounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="half-duplex-wire", daemon=True)
        self._thread.start()

    # --- device side
    def device_port(self) -> "DevicePort":
        return DevicePort(self)

    def _device_read(self, buf) -> int | None:
        with self._lock:
            n = min(len(buf), len(self._to_device))
            if not n:
                return None
            buf[0:n] = self._to_device[:n]
            del self._to_device[:n]
            return n

    def _device_write(self, data) -> int:
        with self._lock:
            self._from_device += data
        return len(data)

    # --- the wire
    def _run(self) -> None:
        while not self._stop.is_set():
            self._read_gateway()
            with self._lock:
                up, down = len(self._from_device), len(self._from_gateway)
            if not up and not down:
                select.select([self.master], [], [], 0.002)
                continue
            if self._direction == "up" and up or self._direction == "down" and down:
                direction = self._direction
            else:
                direction = "up" if up else "down"
            start = max(time.perf_counter(), self._free_at)
            if direction != self._direction:
                if self._direction is not None:
                    start = max(start, self._free_at + self.turnaround_s)
                    self.turnarounds += 1
                self._direction = direction
            self._transmit(direction, start)

    def _transmit(self, direction: str, start: float) -> None:
        """Put the bytes due in one direction on the wire: each arrives at the end of its own wire time."""
        end = start + self.byte_s
        now = time.perf_counter()
        if end > now:
            time.sleep(end - now)
        now = time.perf_counter()
        n = max(1, int((now - start) / self.byte_s))
        with self._lock:
            src = self._from_device if direction == "up" else self._from_gateway
            chunk = bytes(src[:n])
            del src[: len(chunk)]
            if direction == "down":
                self._to_device += chunk
        if direction == "up":
            self._write_gateway(chunk)
            self.bytes_up += len(chunk)
        else:
            self.bytes_down += len(chunk)
        self._free_at = start + len(chunk) * self.byte_s

    def _read_gateway(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except (BlockingIOError, OSError):
            return
        if data:
            with self._lock:
                self._from_gateway += data

    def _write_gateway(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                k = os.write(self.master, view)
                view = view[k:]
            except BlockingIOError:
                time.sleep(0.001)

    def stats(self) -> dict:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "turnarounds": self.turnarounds,
                "byte_ms": self.byte_s * 1000}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self.link_path and self.link_path.is_symlink():
            self.link_path.unlink(missing_ok=True)
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class DevicePort:
    """The device's view of the link: a UART with readinto/write (as machine.UART)."""

    def __init__(self, wire: HalfDuplexWire) -> None:
        self.wire = wire

    def readinto(self, buf) -> int | None:
        return self.wire._device_read(buf)

    def write(self, data) -> int:
        return self.wire._device_write(bytes(data))
