"""A device emulator: the firmware (in the MicroPython VM, or under CPython for speed) wired to a data UART fed
from IMS files, a half-duplex link UART on a pseudo-terminal, and a flash directory that survives restarts."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import threading
import time
from pathlib import Path

import firmware
from tinyml_dagster import ims, settings
from tinyml_dagster.health import NS_PER_FUEL
from tinyml_dagster.storage import atomic_write
from tinyml_dagster.emulator.data_feed import DataFeed
from tinyml_dagster.emulator.wire import HalfDuplexWire
from tinyml_dagster.micropython_vm import MicroPythonVM

FIRMWARE_DIR = Path(firmware.__file__).parent
RUNTIMES = ("vm", "cpython")
# the firmware leaves collection off in the VM (see docs/device.md); the boot loop collects between steps once
# half the heap was allocated since the last collection, and reboots the VM if the heap ever fills
VM_HEAP_BYTES = 16 * 1024 * 1024
VM_MEMORY_BYTES = 48 * 1024 * 1024
IDLE_MAX_S = 0.02  # an idle device loop wakes at least this often (its timers: retransmissions, HELLO)
PACING_SLACK_S = 0.002  # the firmware paces a frame by its wire time + 1 ms (ticks_ms rounding)

VM_BOOT = """
import sys, host, binascii, gc, micropython
sys.path[:] = ['/flash']

class HostUART:
    def __init__(self, name):
        self.read_name = name + '_read'
        self.write_name = name + '_write'
        self.txdone_name = name + '_txdone'
        self.size = b'%d'

    def readinto(self, buf):
        h = host.call(self.read_name, self.size % len(buf))
        if not h:
            return None
        if h[0] == '!':
            raise OSError(h)
        n = len(h) // 2
        buf[0:n] = binascii.unhexlify(h)
        return n

    def write(self, data):
        host.call(self.write_name, bytes(data))
        return len(data)

    def txdone(self):
        return host.call(self.txdone_name, b'') == '1'

from firmware import device, _compat
# the device's clock: VM instructions x the calibrated ns per instruction (tinyml_dagster.health.NS_PER_FUEL)
_compat.set_clock_us(lambda: int(host.call('fuel_used', b'')) * PS_PER_FUEL // 1000000 & 0x3FFFFFFF)
dev = device.Device(HostUART('data'), HostUART('link'), '/flash', reset_cause=int(host.call('reset_cause', b'')))
print('BOOTED')
allocated = micropython.mem_current()
running, busy = True, 0
while running:
    if not dev.step():
        busy = 0
        running = host.call('idle', b'') == '1'  # the light sleep; '0' once the emulator stops
    else:
        busy += 1
        if busy == 16:  # a long busy spell: is the emulator stopping?
            busy = 0
            running = host.call('running', b'') == '1'
    # collect here, at module level: below, no function's wasm locals hold heap pointers the collector would miss
    # (bytes allocated and not freed since the last collection; mem_current is a wrapping small int)
    if (micropython.mem_current() - allocated) % 0x80000000 > COLLECT_BYTES:
        gc.collect()
        _compat.collected()
        allocated = micropython.mem_current()
dev.state.save()
print('STOPPED')
""".replace("PS_PER_FUEL", str(round(NS_PER_FUEL * 1000)))
# machine.reset_cause() values the emulated board reports: power on, and the watchdog's reboot after a crash
POWER_ON, WATCHDOG_RESET = 1, 3


def device_dir(device_id: str) -> Path:
    return settings.data_dir() / "devices" / device_id


def install_firmware(flash: Path) -> list[str]:
    """Copy firmware/*.py to <flash>/firmware/ and main.py to <flash>/ (as mpremote would); the files changed."""
    dest = flash / "firmware"
    dest.mkdir(parents=True, exist_ok=True)
    changed = []
    for src in sorted(FIRMWARE_DIR.glob("*.py")):
        target = flash / "main.py" if src.name == "main.py" else dest / src.name
        if not target.exists() or not filecmp.cmp(src, target, shallow=False):
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            changed.append(str(target.relative_to(flash)))
    return changed


def write_config(flash: Path, updates: dict) -> dict:
    """Merge updates into <flash>/config.json (atomically); the resulting config."""
    path = flash / "config.json"
    cfg = {}
    if path.exists():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: bad JSON ({exc.msg})") from None
    cfg.update(updates)
    atomic_write(path, json.dumps(cfg, indent=1, sort_keys=True), mode=0o644)
    return cfg


class DeviceEmulator:
    """One emulated device; start() brings it up, port_path is what the gateway opens, stop() shuts it down."""

    def __init__(self, device_id: str, *, flash_dir: Path | None = None, ims_files: list[Path] | None = None,
                 bearing: int = 1, axis: str = "x", rate_hz: int = 1000, runtime: str = "vm",
                 baud: int = settings.LINK_BAUD, turnaround_ms: float = 10.0, time_scale: float = 1.0,
                 link_path: Path | None = None,
                 config: dict | None = None, loop_data: bool = False, heap_bytes: int = VM_HEAP_BYTES,
                 feed: DataFeed | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.device_id = device_id
        self.root = device_dir(device_id) if flash_dir is None else Path(flash_dir).parent
        self.flash = Path(flash_dir) if flash_dir is not None else self.root / "flash"
        self.runtime = runtime
        self.baud, self.turnaround_ms, self.time_scale = baud, turnaround_ms, time_scale
        self.link_path = link_path
        self.heap_bytes = heap_bytes
        if feed is None:  # IMS files: the given ones, else settings.ims_dir()
            files = ims_files if ims_files is not None else ims.list_ims_files(settings.ims_dir())
            feed = DataFeed(list(files), bearing, axis, rate_hz, time_scale, loop=loop_data)
        self.feed = feed
        # the firmware paces frames and times acks on its own clock: scale them with the wire
        self.config = {"ack_timeout_ms": max(1, int(5000 / time_scale)), "window_ms": settings.WINDOW_MS,
                       **(config or {}), "device_id": device_id,
                       "rate_hz": rate_hz, "baud": max(1, int(round(baud * time_scale)))}
        self.wire: HalfDuplexWire | None = None
        self.device = None  # the firmware's Device under the cpython runtime
        self.reboots = 0
        self.errors: list[str] = []
        self._running = threading.Event()
        self._booted = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port_path(self) -> str:
        assert self.wire is not None, "start() the emulator first"
        return self.wire.port_path

    def start(self, boot_timeout_s: float = 60.0) -> "DeviceEmulator":
        self.flash.mkdir(parents=True, exist_ok=True)
        install_firmware(self.flash)
        write_config(self.flash, self.config)
        self.wire = HalfDuplexWire(self.baud, self.turnaround_ms / 1000, self.time_scale, self.link_path)
        self._running.set()
        target = self._run_vm if self.runtime == "vm" else self._run_cpython
        self._thread = threading.Thread(target=target, name=f"device-{self.device_id}", daemon=True)
        self._thread.start()
        if not self._booted.wait(boot_timeout_s):
            self.stop()
            raise RuntimeError(f"device {self.device_id} did not boot: {self.errors}")
        return self

    def _run_cpython(self) -> None:
        import sys

        from firmware.device import Device

        sys.setswitchinterval(0.001)
        try:
            self.device = Device(self.feed, self.wire.device_port(), str(self.flash))
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        self._booted.set()
        while self._running.is_set():
            if not self.device.step():
                self._sleep_until_work()
        self.device.state.save()

    def _sleep_until_work(self) -> None:
        """The device's light sleep: until link bytes arrive, the next window's samples are due, the wire has
        carried what the device wrote (it may send its next frame), or IDLE_MAX_S (its other timers) has passed."""
        timeout = min(IDLE_MAX_S, self.feed.seconds_to_next_window())
        wire_free_in = self.wire.free_at() - time.perf_counter()
        if wire_free_in > 0:
            timeout = min(timeout, wire_free_in + PACING_SLACK_S)
        woken = self.wire.device_readable
        woken.wait(timeout)
        woken.clear()

    def _run_vm(self) -> None:
        port = self.wire.device_port()

        def link_read(payload: bytes) -> str:
            buf = bytearray(int(payload or b"64"))
            n = port.readinto(buf)
            return buf[: n or 0].hex()

        def link_write(payload: bytes) -> str:
            port.write(payload)
            return ""

        def link_txdone(_: bytes) -> str:
            return "1" if port.txdone() else "0"

        def running(_: bytes) -> str:
            return "1" if self._running.is_set() else "0"

        def idle(_: bytes) -> str:
            self._sleep_until_work()
            return running(b"")

        def reset_cause(_: bytes) -> str:
            return str(WATCHDOG_RESET if self.reboots else POWER_ON)

        host = {"data_read": self.feed.read_hex, "data_write": lambda p: "", "link_read": link_read,
                "link_write": link_write, "link_txdone": link_txdone, "running": running, "idle": idle,
                "reset_cause": reset_cause}
        vm = MicroPythonVM(heap_bytes=self.heap_bytes, memory_bytes=max(VM_MEMORY_BYTES, 2 * self.heap_bytes),
                           flash_dir=self.flash, readonly_dirs={}, sys_path=("/flash",), host_functions=host,
                           timeout_s=None, fuel=2**62, stdout_path=self.root / "vm.stdout",
                           stderr_path=self.root / "vm.stderr")
        while self._running.is_set():
            self._booted.set()
            result = vm.run(code=VM_BOOT.replace("COLLECT_BYTES", str(self.heap_bytes // 2)))
            if not self._running.is_set():
                break
            # the VM stopped by itself (full heap, crash): reboot, as the ESP32's watchdog would
            self.reboots += 1
            self.errors = self.errors[-9:] + [
                f"exit {result.exit_code} trap {result.trap}: {result.stderr.strip()[-300:]}"
            ]
            time.sleep(min(5.0, 0.1 * self.reboots))

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.wire is not None:
            self.wire.close()

    def __enter__(self) -> "DeviceEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
