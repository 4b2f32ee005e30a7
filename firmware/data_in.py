"""Data In manager: reads float32 samples from the data UART straight into one window buffer, yields features.

Samples are never turned into objects one by one: UART bytes are copied into a preallocated window of
little-endian float32 bytes, and a complete window becomes one float32 array for the feature extraction.
"""

from array import array

from firmware import features


class DataIn:
    """Buffers and windows samples from `uart` (anything with readinto: machine.UART, a stream, a bridge)."""

    def __init__(self, uart, rate_hz, window_ms=features.WINDOW_MS, extract=None):
        self.uart = uart
        # window array -> feature tuple (firmware.feature_sets.extractor); the paper's set by default
        self.extract = extract if extract is not None else features.make_extractor()
        self.rate_hz = rate_hz
        self.length = features.window_length(rate_hz, window_ms)
        self.wbuf = bytearray(4 * self.length)  # the window being filled, as raw float32 bytes
        self.mv = memoryview(self.wbuf)
        self.fill = 0  # bytes in wbuf
        self.samples = 0
        self.windows = 0
        self.bad_windows = 0  # windows holding NaN or infinite samples, dropped

    def poll(self):
        """Read what the UART has (up to the end of the window); one window's features when it completes."""
        n = self.uart.readinto(self.mv[self.fill:])
        if not n:
            return None
        self.samples += (self.fill + n) // 4 - self.fill // 4
        self.fill += n
        if self.fill < len(self.wbuf):
            return None
        self.fill = 0
        r = self.extract(array("f", self.wbuf))
        for v in r:
            if v != v or v > 1e300 or v < -1e300:
                self.bad_windows += 1
                return None
        self.windows += 1
        return r
