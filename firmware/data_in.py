"""Data In manager: reads float32 samples from the data UART into one preallocated window, yields features."""

import struct

from firmware import features
from firmware._compat import const

_SAMPLE = const(4)


class DataIn:
    """Buffers and windows samples from `uart` (anything with readinto: machine.UART, a stream, a bridge)."""

    def __init__(self, uart, rate_hz, window_ms=features.WINDOW_MS, chunk=256):
        self.uart = uart
        self.rate_hz = rate_hz
        self.acc = features.WindowAccumulator(rate_hz, window_ms)
        self.raw = bytearray(chunk - chunk % _SAMPLE)
        self.mv = memoryview(self.raw)
        self.pos = 0  # next unread byte in raw
        self.end = 0  # bytes held in raw
        self.samples = 0
        self.windows = 0
        self.bad_samples = 0

    def poll(self):
        """Read what the UART has; return one completed window's (mean, skewness, kurtosis), else None."""
        raw = self.raw
        if self.end - self.pos < _SAMPLE:
            left = self.end - self.pos
            if left:
                raw[0:left] = raw[self.pos:self.end]
            self.pos = 0
            self.end = left
            n = self.uart.readinto(self.mv[left:])
            if n:
                self.end += n
        acc = self.acc
        pos = self.pos
        end = self.end - _SAMPLE
        while pos <= end:
            x = struct.unpack_from("<f", raw, pos)[0]
            pos += _SAMPLE
            if x != x or x > 1e30 or x < -1e30:
                self.bad_samples += 1
                continue
            self.samples += 1
            r = acc.push(x)
            if r is not None:
                self.pos = pos
                self.windows += 1
                return r
        self.pos = pos
        return None
