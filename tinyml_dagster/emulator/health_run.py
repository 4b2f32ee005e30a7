"""A device's health measured in the real MicroPython VM: its flash (champion, settings, key) run on samples for a
few reporting periods, on the emulator's clock (VM instructions x health.NS_PER_FUEL) and with the VM's heap."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from firmware import frames, messages
from tinyml_dagster.health import NS_PER_FUEL
from tinyml_dagster.micropython_vm import MicroPythonVM

SCRIPT = """
import host, binascii
from firmware import _compat
from firmware._compat import sleep_ms
from firmware.device import Device
_compat.set_clock_us(lambda: int(host.call('fuel_used', b'')) * PS_PER_FUEL // 1000000 & 0x3FFFFFFF)


class HostUART:
    def __init__(self, name):
        self.name = name

    def readinto(self, buf):
        h = host.call(self.name, b'%d' % len(buf))
        if not h:
            return None
        n = len(h) // 2
        buf[0:n] = binascii.unhexlify(h)
        return n

    def write(self, data):
        host.call('link_write', bytes(data))
        return len(data)


for boot in range(BOOTS):
    dev = Device(HostUART('data'), HostUART('link_read'), '/flash', reset_cause=1 if boot == 0 else 3)
    dev.cfg['health_every'] = EVERY
    while boot == 0 and dev.windows < WINDOWS and host.call('more', b'') == '1':
        dev.step()
    dev.data_in.uart = HostUART('no_data')  # what is queued goes out, no further window comes in
    for _ in range(300):
        if not dev.step():
            sleep_ms(1)
"""


class BytesFeed:
    """Samples (float32 LE bytes) for the device's data UART, all available at once."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = bytes(data), 0

    def read_hex(self, payload: bytes) -> str:
        n = int(payload or b"64")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk.hex()

    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


def vm_health(flash: Path, feed, device_id: str, key: bytes, *, windows: int, boots: int = 1, every: int = 10,
              heap_bytes: int = 40 * 1024 * 1024) -> list[dict]:
    """The HEALTH reports (firmware.messages.HEALTH_FIELDS) a device with this flash sends in the VM: one life of
    up to `windows` windows from feed (read_hex, exhausted), a report every `every` windows, then boots - 1
    reboots. The flash is copied: the original is left as it was."""
    sent = bytearray()

    def link_write(payload: bytes) -> str:
        sent.extend(payload)
        return ""

    host = {"data": feed.read_hex, "no_data": lambda _: "", "link_read": lambda _: "", "link_write": link_write,
            "more": lambda _: "0" if feed.exhausted() else "1"}
    code = (SCRIPT.replace("PS_PER_FUEL", str(round(NS_PER_FUEL * 1000))).replace("BOOTS", str(boots))
            .replace("EVERY", str(every)).replace("WINDOWS", str(windows)))
    with tempfile.TemporaryDirectory(prefix="health-") as tmp:
        copy = Path(tmp) / "flash"
        shutil.copytree(flash, copy)
        MicroPythonVM(flash_dir=copy, heap_bytes=heap_bytes, memory_bytes=2 * heap_bytes + 16 * 1024 * 1024,
                      fuel=2**62, timeout_s=None, host_functions=host).run(code=code).check()
    reports = []
    dec = frames.FrameDecoder()
    for b in sent:
        m = messages.unpack(bytes(dec.payload())) if dec.feed(b) else None
        if m is not None and m[0] == messages.HEALTH:
            body = messages.unseal(key, messages.TAG_HEALTH, device_id, m[2])
            if body is None:
                raise ValueError("%s: a HEALTH whose MAC does not verify under the given key" % device_id)
            reports.append(messages.unpack_health(body))
    return reports
