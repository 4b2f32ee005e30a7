"""Shims so the firmware runs unchanged on MicroPython 1.27 (ESP32, WASI VM) and CPython (gateway, tests)."""

import os

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


try:
    from time import ticks_add, ticks_diff, ticks_ms, ticks_us, sleep_ms
except ImportError:  # CPython
    import time as _time

    _PERIOD = 0x40000000

    def ticks_ms():
        return int(_time.monotonic() * 1000) & (_PERIOD - 1)

    def ticks_us():
        return int(_time.perf_counter() * 1000000) & (_PERIOD - 1)

    def ticks_add(t, delta):
        return (t + delta) & (_PERIOD - 1)

    def ticks_diff(a, b):
        d = (a - b) & (_PERIOD - 1)
        return d - _PERIOD if d & (_PERIOD >> 1) else d

    def sleep_ms(ms):
        _time.sleep(ms / 1000)


def native(f):
    """Stand-in for @micropython.native: the WASI VM has no native emitter, so hot loops stay bytecode."""
    return f


def _wasi():
    import sys

    return getattr(sys.implementation, "_build", "") == "wasi"


# The WASI MicroPython build's collector misses roots held in wasm locals (it frees live objects: seen as
# memory_out_of_bounds / table_out_of_bounds traps), so there the firmware leaves collection off; the emulator
# collects between steps, at module level, where no function's wasm locals hold heap pointers (collected_free).
COLLECT = not _wasi()
if not COLLECT:
    import gc

    gc.disable()  # a full heap then raises MemoryError instead of collecting unsoundly


_collected_free = None  # in the WASI VM: the free heap right after the emulator's last collection between steps


def collected():
    """The emulator's loop collected garbage between steps: note the free heap then, as a board's heap_info sees it."""
    global _collected_free
    import gc

    _collected_free = gc.mem_free()


def collect():
    """Collect garbage at a safe point (once per window); a no-op in the WASI VM, see COLLECT."""
    if COLLECT:
        import gc

        gc.collect()


def mem_free():
    """Free MicroPython heap after a collection (None under CPython)."""
    import gc

    gc.collect()
    return gc.mem_free() if hasattr(gc, "mem_free") else None


_clock_us = None


def set_clock_us(clock):
    """Make clock_us() read clock() (the emulator's device-time model) instead of ticks_us()."""
    global _clock_us
    _clock_us = clock


def clock_us():
    """The device's microsecond clock for its own measurements (wraps like ticks_us: compare with ticks_diff)."""
    return _clock_us() if _clock_us is not None else ticks_us()


def heap_info():
    """(free bytes, largest free block) of the MicroPython heap; (0, 0) under CPython.

    On a board: after a collection, the largest block by a bounded binary search of allocations. In the WASI VM
    (no collection inside a function): the free heap after the emulator's last collection between steps, else
    now; largest = free (a probe needs a collection after each allocation)."""
    import gc

    if not hasattr(gc, "mem_free"):
        return 0, 0
    if not COLLECT:
        free = gc.mem_free() if _collected_free is None else _collected_free
        return free, free
    gc.collect()
    free = gc.mem_free()
    lo, hi = 0, free
    while hi - lo > 256:
        mid = (lo + hi) // 2
        try:
            probe = bytearray(mid)
            del probe
            lo = mid
        except MemoryError:
            hi = mid
    gc.collect()
    return free, lo


def reset_cause():
    """machine.reset_cause() on a board (1 power on, 2 hard, 3 watchdog, 4 deep sleep, 5 soft), else 0."""
    try:
        import machine

        return machine.reset_cause()
    except (ImportError, AttributeError):
        return 0


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def makedirs(path):
    """mkdir -p for absolute or relative slash-separated paths."""
    cur = ""
    for part in path.split("/"):
        if not part:
            cur = "/" if not cur else cur
            continue
        cur = part if not cur else (cur + part if cur.endswith("/") else cur + "/" + part)
        if not exists(cur):
            os.mkdir(cur)


def rmtree(path):
    """Remove a directory tree (shallow recursion: our trees are one or two levels deep)."""
    if not exists(path):
        return
    if os.stat(path)[0] & 0x4000:
        for name in os.listdir(path):
            rmtree(path + "/" + name)
        os.rmdir(path)
    else:
        os.remove(path)


def write_atomic(path, data):
    """Write data to path through path.tmp and a rename, so a reboot leaves the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_json(path, default=None):
    """JSON content of path, default when it does not exist; ValueError naming the file when it is corrupt."""
    import json

    if not exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError("%s: bad JSON (%s)" % (path, e)) from None


def write_json(path, obj):
    import json

    write_atomic(path, json.dumps(obj).encode())


def overlay(defaults, params, what):
    """defaults overlaid with params (a dict or None); ValueError naming an unknown parameter of what."""
    p = dict(defaults)
    for k in params or {}:
        if k not in p:
            raise ValueError("%s: unknown parameter %s" % (what, k))
        p[k] = params[k]
    return p
