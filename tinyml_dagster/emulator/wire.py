"""The link UART of an emulated device: a pseudo-terminal whose bytes cross a half-duplex wire at the baud rate.

The gateway opens `port_path` with pyserial like a real port. Every byte takes its wire time (10 bits at 8N1,
divided by time_scale) and arrives at the end of it; the wire carries one direction at a time and waits
`turnaround_s` when the direction changes. Bytes a side writes while the wire is busy wait in its modem's
buffer (nothing is lost), as with a half-duplex power-line modem.

The schedule is exact: when bytes are written, their slot on the wire is fixed at once, starting at
max(written, end of the previous byte [+ turnaround if the direction changes]), so a late delivery thread
never stretches the wire; it can only hand a byte over a little after its slot ends (not cumulative).
"""

from __future__ import annotations

import os
import pty
import select
import threading
import time
import tty
from collections import deque
from pathlib import Path

from tinyml_dagster import settings

BITS_PER_BYTE = 10  # 8N1: start + 8 data + stop
UP, DOWN = "up", "down"  # device -> gateway, gateway -> device
_MAX_WAIT_S = 0.05
_OPEN_GRACE_S = 0.02
_MIN_WAIT_S = 0.001  # deliver in batches at most this fine (late by this much at worst, never cumulative; a
# UART FIFO or a USB adapter hands bytes over in bursts too), so the thread wakes at most every ms on a busy line


class HalfDuplexWire:
    """pty <-> device byte pipe with wire timing; device side via `device_port()` (readinto/write)."""

    def __init__(self, baud: int = settings.LINK_BAUD, turnaround_s: float = 0.01, time_scale: float = 1.0,
                 link_path: str | Path | None = None) -> None:
        if baud <= 0 or time_scale <= 0 or turnaround_s < 0:
            raise ValueError(f"bad wire settings: baud={baud} time_scale={time_scale} turnaround_s={turnaround_s}")
        self.baud, self.time_scale = baud, time_scale
        self.byte_s = BITS_PER_BYTE / baud / time_scale  # real seconds per byte
        self.turnaround_s = turnaround_s / time_scale  # real seconds
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        os.set_blocking(self.master, False)
        self.port_path = os.ttyname(slave)
        # we keep no slave fd open, so the master sees POLLHUP while the gateway has the port closed: bytes for
        # the gateway wait in its modem until it opens the port (pyserial's open() flushes what came before)
        os.close(slave)
        self._poll = select.poll()
        self._poll.register(self.master, select.POLLIN)
        self._gateway_open_since: float | None = None
        self.link_path = Path(link_path) if link_path else None
        if self.link_path:
            tmp = self.link_path.with_name(self.link_path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            os.symlink(self.port_path, tmp)
            os.replace(tmp, self.link_path)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._to_device = bytearray()  # delivered, waiting for the device to read
        self._to_gateway = bytearray()  # delivered, waiting for room in the pty
        self.device_readable = threading.Event()  # set when bytes reach the device (wakes its idle loop)
        # segments on the wire: [start, direction, data, delivered]; byte i ends at start + (i + 1) * byte_s
        self._segments: deque[list] = deque()
        self._direction: str | None = None
        self._free_at = 0.0  # when the wire finishes its last scheduled byte
        self.bytes_up = 0  # delivered
        self.bytes_down = 0
        self.turnarounds = 0
        self.busy_s = 0.0  # real seconds of wire time scheduled (bytes only)
        self.turnaround_total_s = 0.0
        self.late_s_max = 0.0  # worst hand-over delay after a byte's slot ended (real seconds)
        self.log: deque[tuple] = deque(maxlen=4096)  # recent writes: (direction, written, start, end, turnaround)
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
        if data:
            self._schedule(UP, bytes(data), time.perf_counter())
            try:
                os.write(self._wake_w, b"w")
            except (BlockingIOError, OSError):
                pass  # already woken (or closing)
        return len(data)

    def _device_txdone(self) -> bool:
        with self._lock:
            return not any(seg[1] == UP for seg in self._segments)

    # --- the wire
    def _schedule(self, direction: str, data: bytes, written: float) -> None:
        """Fix the wire slot of bytes written at `written` (real time): after the previous byte, and after the
        turnaround if the direction changes."""
        with self._lock:
            start = max(written, self._free_at)
            turn = self._direction is not None and direction != self._direction
            if turn:
                start = max(start, self._free_at + self.turnaround_s)
                self.turnarounds += 1
                self.turnaround_total_s += self.turnaround_s
            self._direction = direction
            self._free_at = start + len(data) * self.byte_s
            self.log.append((direction, written, start, self._free_at, turn))
            self.busy_s += len(data) * self.byte_s
            self._segments.append([start, direction, data, 0])

    def _deliver(self, now: float) -> float | None:
        """Hand over every byte whose wire time has ended; the real time the next one ends, or None."""
        with self._lock:
            while self._segments:
                seg = self._segments[0]
                start, direction, data, done = seg
                n = min(len(data), int((now - start) / self.byte_s + 1e-9))
                if n > done:
                    chunk = data[done:n]
                    self.late_s_max = max(self.late_s_max, now - (start + n * self.byte_s))
                    if direction == DOWN:
                        self._to_device += chunk
                        self.device_readable.set()
                        self.bytes_down += len(chunk)
                    else:
                        self._to_gateway += chunk
                        self.bytes_up += len(chunk)
                    seg[3] = done = n
                if done < len(data):
                    return start + (done + 1) * self.byte_s
                self._segments.popleft()
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter()
            next_due = self._deliver(now)
            ready = self._gateway_ready()
            if ready:
                self._flush_gateway()
            wait = _MAX_WAIT_S if next_due is None else min(_MAX_WAIT_S, max(_MIN_WAIT_S, next_due - now))
            if self._to_gateway or self._gateway_open_since is None:
                wait = min(wait, 0.002)  # the gateway reads slowly, or we watch for it to open the port
            watch = [self._wake_r] + ([self.master] if self._gateway_open_since is not None else [])
            try:
                readable, _, _ = select.select(watch, [], [], wait)
            except (OSError, ValueError):
                return
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except (BlockingIOError, OSError):
                    pass
            if self.master in readable:
                written = time.perf_counter()  # the bytes were there by now (the thread was waiting on them)
                try:
                    data = os.read(self.master, 4096)
                except (BlockingIOError, OSError):
                    data = b""
                if data:
                    self._schedule(DOWN, data, written)

    def _gateway_ready(self) -> bool:
        """The gateway has had the port open for a moment (its open() has flushed its input by then)."""
        hup = any(ev & select.POLLHUP for _, ev in self._poll.poll(0))
        now = time.perf_counter()
        if hup:
            self._gateway_open_since = None
            return False
        if self._gateway_open_since is None:
            self._gateway_open_since = now
        return now - self._gateway_open_since >= _OPEN_GRACE_S

    def _flush_gateway(self) -> None:
        """Write delivered bytes to the gateway's pty; what does not fit waits (the gateway reads slowly)."""
        if not self._to_gateway:
            return
        try:
            k = os.write(self.master, self._to_gateway)
        except (BlockingIOError, OSError):
            return
        del self._to_gateway[:k]

    def free_at(self) -> float:
        """Real time (perf_counter) when the wire has carried every byte written so far."""
        with self._lock:
            return self._free_at

    def idle(self) -> bool:
        """Nothing scheduled is still on the wire."""
        with self._lock:
            return not self._segments and time.perf_counter() >= self._free_at

    def stats(self) -> dict:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "turnarounds": self.turnarounds,
                "byte_ms": self.byte_s * 1000, "busy_s": round(self.busy_s, 4),
                "late_ms_max": round(self.late_s_max * 1000, 3)}

    def close(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=2)
        if self.link_path and self.link_path.is_symlink():
            self.link_path.unlink(missing_ok=True)
        for fd in (self.master, self._wake_r, self._wake_w):
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

    def txdone(self) -> bool:
        """True when every byte the device wrote has crossed the wire (machine.UART.txdone)."""
        return self.wire._device_txdone()
