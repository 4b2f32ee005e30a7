"""Helpers for the firmware tests: scratch flash directories and duck-typed UARTs over byte buffers."""

import struct

from firmware._compat import exists, makedirs, rmtree

_n = [0]


def scratch(name):
    """A fresh empty directory: under /flash in the VM, under a temp dir under CPython."""
    if exists("/flash"):
        base = "/flash/tests"
    else:
        import tempfile

        base = tempfile.gettempdir() + "/tinyml-fw-tests"
    _n[0] += 1
    path = "%s/%s-%d" % (base, name, _n[0])
    rmtree(path)
    makedirs(path)
    return path


class FakeUART:
    """readinto/write over byte buffers, returning at most `burst` bytes per read like a UART's FIFO."""

    def __init__(self, data=b"", burst=64):
        self.rx = bytearray(data)
        self.pos = 0
        self.tx = bytearray()
        self.burst = burst

    def feed(self, data):
        self.rx += data

    def readinto(self, buf):
        n = min(len(buf), len(self.rx) - self.pos, self.burst)
        if n <= 0:
            return None
        buf[0:n] = self.rx[self.pos:self.pos + n]
        self.pos += n
        return n

    def write(self, data):
        self.tx += data
        return len(data)


def signal(n, seed=1, spike_every=0):
    """A deterministic vibration-like float32 array (LCG noise + two sines) without `random`."""
    import array
    import math

    s = seed
    out = array.array("f", bytes(4 * n))
    for i in range(n):
        s = (s * 1103515245 + 12345) & 0x7FFFFFFF
        x = 0.5 * math.sin(i * 0.3) + 0.2 * math.sin(i * 0.05) + (s / 0x7FFFFFFF - 0.5) * 0.3
        if spike_every and i % spike_every == 0:
            x += 3.0
        out[i] = x
    return out


def samples_bytes(xs):
    """Little-endian float32 bytes of the samples, as the data UART carries them."""
    out = bytearray(4 * len(xs))
    for i in range(len(xs)):
        struct.pack_into("<f", out, 4 * i, xs[i])
    return out


def beyond_range(forest, rows):
    """How many rows lie beyond the forest's split ranges (out-of-range isolation applies to them)."""
    from firmware import isoforest

    n = 0
    for r in rows:
        if isoforest.out_of_range_share(isoforest.quantise(r, forest.grid), forest.split_lo, forest.split_hi):
            n += 1
    return n
