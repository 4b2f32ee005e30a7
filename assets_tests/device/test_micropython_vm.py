"""The MicroPython VM runner: a real MicroPython 1.27 on wasmtime, with heap, fuel, flash and host calls."""

import pytest

from tinyml_dagster.micropython_vm import ESP32_HEAP_BYTES, MicroPythonVM


def test_runs_real_micropython_with_the_requested_heap():
    r = MicroPythonVM(heap_bytes=100 * 1024).run(
        code="import sys, gc\nprint(sys.implementation.name, sys.implementation.version[:2])\n"
        "print(gc.mem_free() + gc.mem_alloc())"
    ).check()
    name, version = r.stdout.splitlines()[0].split(" ", 1)
    assert name == "micropython" and version == "(1, 27)"
    total = int(r.stdout.splitlines()[1])
    assert 95 * 1024 < total <= 100 * 1024


def test_fuel_is_deterministic_and_grows_with_work():
    vm = MicroPythonVM()
    small = [vm.run(code="s = 0\nfor i in range(1000): s += i\nprint(s)").check() for _ in range(2)]
    big = vm.run(code="s = 0\nfor i in range(10000): s += i\nprint(s)").check()
    assert small[0].fuel_used == small[1].fuel_used
    assert small[0].stdout == "499500\n" and big.stdout == "49995000\n"
    assert big.fuel_used > small[0].fuel_used + 9 * 1000 * 50


def test_flash_dir_is_writable_and_survives_runs(tmp_path):
    vm = MicroPythonVM(flash_dir=tmp_path / "flash")
    vm.run(
        code="f = open('/flash/x.tmp', 'wb')\nf.write(b'abc')\nf.close()\n"
        "import os\nos.rename('/flash/x.tmp', '/flash/x')"
    ).check()
    assert (tmp_path / "flash" / "x").read_bytes() == b"abc"
    r = vm.run(code="import os\nprint(os.listdir('/flash'), open('/flash/x').read())").check()
    assert r.stdout.strip() == "['x'] abc"


def test_source_tree_is_read_only_and_importable():
    r = MicroPythonVM().run(code="from firmware import messages\nprint(messages.MAX_BODY)\nopen('/fw/zz', 'w')")
    assert r.stdout.strip() == "249"
    assert r.exit_code == 1 and "OSError" in r.stderr


def test_host_functions_receive_bytes_and_return_text():
    seen = []

    def echo(payload: bytes) -> str:
        seen.append(payload)
        return payload[::-1].hex()

    def broken(payload: bytes) -> str:
        raise ValueError("bad")

    vm = MicroPythonVM(host_functions={"echo": echo, "broken": broken})
    r = vm.run(
        code="import host\nprint(host.call('echo', bytes([0, 126, 255])))\nprint(host.call('broken', b''))"
    ).check()
    assert seen == [b"\x00\x7e\xff"]
    assert r.stdout.splitlines() == ["ff7e00", "!ValueError: bad"]


def test_small_heap_raises_memory_error_in_the_guest():
    r = MicroPythonVM(heap_bytes=32 * 1024).run(code="x = bytearray(64 * 1024)")
    assert r.exit_code == 1 and "MemoryError" in r.stderr


def test_out_of_fuel_and_timeout_stop_the_vm():
    r = MicroPythonVM(fuel=1_000_000).run(code="while True: pass")
    assert r.trap == "out of fuel" and not r.ok
    r = MicroPythonVM(timeout_s=0.3).run(code="while True: pass")
    assert r.trap == "timeout"
    with pytest.raises(RuntimeError, match="timeout"):
        r.check()


def test_rejects_heap_without_headroom():
    with pytest.raises(ValueError, match="headroom"):
        MicroPythonVM(heap_bytes=ESP32_HEAP_BYTES, memory_bytes=ESP32_HEAP_BYTES).run(code="pass")
