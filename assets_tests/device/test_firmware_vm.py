"""The firmware inside the real MicroPython VM: its own test suite, numbers equal to CPython's, package install."""

import hashlib
import json
import struct

import pytest

from firmware import features, isoforest
from firmware.tests.util import beyond_range
from tinyml_dagster.micropython_vm import MicroPythonVM

# collection is off in the WASI VM (its GC misses roots held in wasm locals), so tests get a large heap
VM_HEAP = 40 * 1024 * 1024
VM_MEMORY = 96 * 1024 * 1024


def _vm(flash):
    return MicroPythonVM(flash_dir=flash, heap_bytes=VM_HEAP, memory_bytes=VM_MEMORY, fuel=20_000_000_000)


def test_firmware_suite_passes_inside_micropython(tmp_path):
    r = _vm(tmp_path / "flash").run(code="import sys\nfrom firmware.tests import runner\nsys.exit(runner.main())")
    lines = r.stdout.splitlines()
    assert r.ok, r.stdout + r.stderr
    assert not [ln for ln in lines if ln.startswith("FAIL")]
    assert lines[-1].endswith(" passed, 0 failed") and int(lines[-1].split()[0]) >= 9
    assert "micropython" not in r.stderr.lower() or r.stderr == ""


PIPELINE = """
import hashlib, struct, binascii
from firmware import features, isoforest
from firmware.tests.util import signal, samples_bytes
from firmware.data_in import DataIn
from firmware.tests.util import FakeUART
din = DataIn(FakeUART(samples_bytes(signal(250 * 48, seed=5, spike_every=%d)), burst=101), 500)
rows = []
while True:
    r = din.poll()
    if r is None:
        if din.uart.pos >= len(din.uart.rx):
            break
        continue
    rows.append(r)
forest = isoforest.train(rows[:32], 25, 32, 11)
print(binascii.hexlify(hashlib.sha256(forest.to_bytes()).digest()).decode())
for r in rows:
    print(binascii.hexlify(struct.pack("<dddd", r[0], r[1], r[2], forest.score(r))).decode())
"""


def _cpython_pipeline(spike_every):
    xs = _signal(250 * 48, 5, spike_every)
    rows = features.signal_features(xs, 500)
    forest = isoforest.train(rows[:32], 25, 32, 11)
    assert 0 < beyond_range(forest, rows) < len(rows)  # windows inside and beyond the split ranges
    out = [hashlib.sha256(forest.to_bytes()).hexdigest()]
    out += [struct.pack("<dddd", *r, forest.score(r)).hex() for r in rows]
    return out


def _signal(n, seed, spike_every):
    from firmware.tests.util import signal

    return signal(n, seed=seed, spike_every=spike_every)


@pytest.mark.parametrize("spike_every", [0, 97])
def test_window_features_score_equal_cpython_bit_for_bit(tmp_path, spike_every):
    r = _vm(tmp_path / "flash").run(code=PIPELINE % spike_every).check()
    got = r.stdout.split()
    want = _cpython_pipeline(spike_every)
    assert len(got) == 1 + 48
    assert got[0] == want[0], "the forest trained in the VM differs from CPython's"
    assert got[1:] == want[1:]


def test_gateway_twin_features_agree_with_the_vm(tmp_path):
    twin = pytest.importorskip("tinyml_dagster.features")
    import numpy as np

    r = _vm(tmp_path / "flash").run(code=PIPELINE % 0).check()
    vm_rows = [struct.unpack("<dddd", bytes.fromhex(h))[:3] for h in r.stdout.split()[1:]]
    xs = np.asarray(_signal(250 * 48, 5, 0), dtype=np.float32).astype(np.float64).reshape(48, 250)
    mean = xs.mean(axis=1)
    d = xs - mean[:, None]
    m2, m3, m4 = (d**2).mean(axis=1), (d**3).mean(axis=1), (d**4).mean(axis=1)
    np.testing.assert_allclose(np.array(vm_rows), np.c_[mean, m3 / m2**1.5, m4 / m2**2 - 3], rtol=1e-9, atol=1e-12)
    assert twin.FEATURE_NAMES == features.FEATURE_NAMES


INSTALL = """
import json
from firmware.device import Device
from firmware.tests.util import FakeUART
dev = Device(FakeUART(), FakeUART(), "/flash")
print(json.dumps([dev.inference.model_id, dev.inference.version]))
for name in ("bad.pkg", "good.pkg", "good.pkg"):
    print(json.dumps(dev.agent.install("/flash/deploy/" + name)))
print(json.dumps([dev.inference.model_id, dev.inference.version, dev.inference.forest.n_trees]))
print(json.dumps(dev.agent.fallback()))
print(json.dumps([dev.inference.model_id, dev.inference.version]))
"""


def _install_in_vm(tmp_path, encoding):
    from tinyml_dagster.deployment_agent import build_package

    flash = tmp_path / "flash"
    (flash / "deploy").mkdir(parents=True)
    key = bytes(range(32))
    (flash / "deploy" / "key").write_bytes(key)
    (flash / "config.json").write_text(json.dumps({"device_id": "dev-vm", "rate_hz": 100}))
    rows = features.signal_features(_signal(50 * 40, 2, 0), 100)
    first = isoforest.train(rows, 5, 16, 1)
    champ = flash / "models" / "champion"
    champ.mkdir(parents=True)
    (champ / "forest.bin").write_bytes(first.to_bytes())
    (champ / "config.json").write_text(json.dumps(
        {"model_id": "local-dev-vm", "version": 0, "model_file": "forest.bin", "grid": first.grid, "threshold": 0.6}))
    forest = isoforest.train(rows, 12, 32, 3)
    cfg = {"grid": forest.grid, "threshold": 0.62}
    model = ("forest.bin", forest.to_bytes()) if encoding == "compact" else (
        "forest.json", json.dumps(isoforest.to_json(forest)).encode())
    pkg = build_package("m-12", model, cfg, device_id="dev-vm", version=7, key=key, encoding=encoding)
    (flash / "deploy" / "good.pkg").write_bytes(pkg.data)
    tampered = bytearray(pkg.data)
    tampered[len(tampered) // 2] ^= 1
    (flash / "deploy" / "bad.pkg").write_bytes(bytes(tampered))
    return _vm(flash).run(code=INSTALL).check(), flash


def test_signed_package_installs_in_the_vm_and_bad_ones_are_refused(tmp_path):
    r, flash = _install_in_vm(tmp_path, "json")
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert out[0] == ["local-dev-vm", 0]
    assert out[1][0] is False and "corrupted" in out[1][1]
    assert out[2] == [True, "installed m-12 v7"]
    assert out[3][0] is False and "replayed" in out[3][1]
    assert out[4] == ["m-12", 7, 12]
    assert out[5][0] is True and out[6] == ["local-dev-vm", 0]
    assert (flash / "models" / "previous" / "config.json").exists()
    assert json.loads((flash / "state.json").read_text())["accepted_version"] == 7


def test_compact_deflated_package_installs_in_the_vm(tmp_path):
    r, flash = _install_in_vm(tmp_path, "compact")
    assert json.loads(r.stdout.splitlines()[2]) == [True, "installed m-12 v7"]
    assert json.loads(r.stdout.splitlines()[4]) == ["m-12", 7, 12]
    assert (flash / "models" / "previous" / "forest.bin").exists()
