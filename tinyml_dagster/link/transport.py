"""Gateway end of the power-line link: messages in pySerialTransfer frames over pyserial."""

from __future__ import annotations

import select
import time
from dataclasses import dataclass

import serial
from pySerialTransfer import pySerialTransfer as txfer

from firmware import messages
from tinyml_dagster import settings


FRAME_WIRE = 6  # pySerialTransfer's bytes around a payload: start, id, overhead, length, crc, stop

@dataclass(frozen=True)
class LinkTiming:
    """The channel model: 8N1 at `baud`, a turnaround per direction change, all times x time_scale in real time."""

    baud: int = settings.LINK_BAUD
    turnaround_s: float = settings.LINK_TURNAROUND_S
    time_scale: float = 1.0

    @property
    def byte_s(self) -> float:
        """Wire time of one byte (10 bits), in link seconds."""
        return 10.0 / self.baud


class SerialTransport:
    """Messages (type, seq, body) over the real pySerialTransfer; counts what it puts on and takes off the wire.

    OSError names the port when it cannot be opened; with write_timeout_s a port nobody reads fails a send
    (OSError) instead of blocking it forever."""

    def __init__(self, port: str, timing: LinkTiming = LinkTiming(), write_timeout_s: float | None = None) -> None:
        self.timing = timing
        self.link = txfer.SerialTransfer(port, baud=115200 if port.startswith("/dev/pts") else timing.baud,
                                         debug=False, restrict_ports=False, timeout=0.002,
                                         write_timeout=write_timeout_s)
        try:  # the port itself, not link.open(), which logs a traceback and carries on when the port is missing
            self.link.connection.open()
        except (OSError, ValueError) as e:
            raise OSError("serial port %s: %s" % (port, e)) from None
        self.tx_busy_until = 0.0  # real time when our last frame has left the wire
        self.wire_bytes_out = 0
        self.wire_bytes_in = 0
        self.frames_out = 0
        self.frames_in = 0
        self.bad_frames = 0
        self.empty_reads = 0  # the port polled readable and read nothing (a pty does, now and then)

    def close(self) -> None:
        self.link.close()

    def send(self, msg_type: int, seq: int, body: bytes = b"") -> int:
        """Frame and write one message; returns its wire size. The payload is rebuilt on every call."""
        payload = messages.pack(msg_type, seq, body)
        n = len(payload)
        self.link.tx_buff[:n] = list(payload)  # send() stuffs tx_buff in place: refill before every (re)send
        if not self.link.send(n):
            raise OSError("pySerialTransfer could not write the frame")
        wire = n + FRAME_WIRE
        now = time.monotonic()
        self.tx_busy_until = max(now, self.tx_busy_until) + wire * self.timing.byte_s * self.timing.time_scale
        self.wire_bytes_out += wire
        self.frames_out += 1
        return wire

    def _wait_readable(self, timeout: float) -> None:
        try:
            select.select([self.link.connection.fileno()], [], [], timeout)
        except (OSError, ValueError):  # closed under us: the next read says so
            time.sleep(min(timeout, 0.0005))

    def writable(self) -> bool:
        """True when the port takes bytes now (its reader keeps up); a port nobody reads stays False."""
        return bool(select.select([], [self.link.connection.fileno()], [], 0)[1])

    def drain_time(self) -> float:
        """Real seconds until what we sent has left the wire."""
        return max(0.0, self.tx_busy_until - time.monotonic())

    def recv(self, timeout: float) -> tuple[int, int, memoryview] | None:
        """The next well-formed message within timeout real seconds, or None."""
        deadline = time.monotonic() + timeout
        link = self.link
        while True:
            polled_empty = False
            try:
                n = link.available()
            except (IndexError, ValueError, TypeError):
                # pySerialTransfer trips over some corrupted stuffing (an overhead byte pointing into the part of
                # rx_buff it fills with ' ' strings gives a TypeError)
                n = 0
                link.state = txfer.State.FIND_START_BYTE
                self.bad_frames += 1
            except serial.SerialException as e:
                # a pty may poll readable and then read nothing: no byte arrived yet (a port that is gone raises
                # another error, or keeps raising until the caller's timeout)
                if "returned no data" not in str(e):
                    raise
                n = 0
                self.empty_reads += 1
                polled_empty = True
            if n:
                payload = bytes(link.rx_buff[:n])
                self.frames_in += 1
                self.wire_bytes_in += n + FRAME_WIRE
                msg = messages.unpack(payload)
                if msg is not None:
                    return msg[0], msg[1], bytes(msg[2])
                self.bad_frames += 1
                continue
            if link.status in (txfer.Status.CRC_ERROR, txfer.Status.PAYLOAD_ERROR, txfer.Status.STOP_BYTE_ERROR):
                self.bad_frames += 1
                link.status = txfer.Status.NO_DATA
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if polled_empty:  # select would say readable again at once
                time.sleep(min(remaining, 0.0005))
            else:  # sleep until a byte comes: a quiet line costs no CPU
                self._wait_readable(remaining)
