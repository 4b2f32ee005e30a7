"""The champion precompiled by the gateway (mpy-cross) and installed in the real MicroPython 1.27 VM."""

import json

import pytest

from firmware import features, isoforest
from firmware.compiled_forest import PrecompiledForest, module_source
from firmware.tests.util import beyond_range, signal
from tinyml_dagster import deployment_agent as da
from tinyml_dagster.micropython_vm import REPO_ROOT, MicroPythonVM

KEY = bytes(range(32))
DEVICE = "dev-vm"
# a device on MicroPython 1.12-1.18 (.mpy v5): the gateway believes so, the VM runs 1.27
OLD_MICROPYTHON = da.MpyTarget(5, 0, "")
VM = da.MpyTarget()

INSTALL = """
import json
from firmware.device import Device
from firmware.tests.util import FakeUART
dev = Device(FakeUART(), FakeUART(), "/flash")
for name in %r:
    print("RESULT " + json.dumps(dev.agent.install("/flash/deploy/" + name)))
from firmware import isoforest
rows, grid = json.load(open("/flash/rows.json"))
stored = isoforest.load(open("/flash/stored.bin", "rb").read(), grid)
print("STORED " + json.dumps([stored.score(r) for r in rows]))
f = dev.inference.forest
print("CHAMPION " + json.dumps([dev.inference.model_id, type(f).__name__, [f.score(r) for r in rows]]))
installed = dev
dev = Device(FakeUART(), FakeUART(), "/flash")
f = dev.inference.forest
print("REBOOTED " + json.dumps([dev.inference.model_id, type(f).__name__, [f.score(r) for r in rows]]))
"""


# after INSTALL: the features the device extracts from a window, and the firmware's own of it
EXTRACT = """
import array, math
from firmware import features as own
buf = array.array("f", [math.sin(i * 0.3) + (3.0 if i % 40 == 0 else 0.0) for i in range(250)])
for d in (installed, dev):  # hot-swapped in, loaded at boot
    d.step()
    m = d.inference.feature_module
    print("FEATURES " + json.dumps([m and m.__file__, list(d.data_in.extract(buf)), own.window_features(buf)]))
"""
# a feature script whose mean is shifted by 1000: only the shipped module computes that
SHIFTED_FEATURES = da.feature_script() + (
    b"\n_own = make_extractor\n\n\ndef make_extractor(params=None):\n"
    b"    f = _own(params)\n    return lambda buf: (f(buf)[0] + 1000.0,) + tuple(f(buf)[1:])\n")


def _rows():
    """Training rows, and test rows inside and (amplified windows) beyond the split ranges."""
    rows = features.signal_features(signal(250 * 120, seed=3, spike_every=17), 500)
    return rows[:80], rows[80:] + [tuple(v * 3.0 for v in r) for r in rows[80:88]]


def _package(forest, encoding, version=7, target=VM, key=KEY, runtime=None):
    return da.build_package("m-30", ("model.bin", forest.to_bytes()), {"grid": forest.grid, "threshold": 0.6},
                            device_id=DEVICE, version=version, key=key, encoding=encoding, target=target,
                            runtime=runtime if runtime is not None else da.runtime_mpy(forest, target))


def _install(tmp_path, packages, forest, test_rows, then=""):
    """Install the named packages in turn on a device in the VM; its printed lines by tag (STORED: the forest's
    own scores in the VM), its output, and its flash."""
    flash = tmp_path / "flash"
    (flash / "deploy").mkdir(parents=True)
    (flash / "deploy" / "key").write_bytes(KEY)
    (flash / "config.json").write_text(json.dumps({"device_id": DEVICE, "rate_hz": 500}))
    (flash / "rows.json").write_text(json.dumps([[list(r) for r in test_rows], forest.grid]))
    (flash / "stored.bin").write_bytes(forest.to_bytes())
    for name, pkg in packages.items():
        (flash / "deploy" / name).write_bytes(pkg.data)
    r = MicroPythonVM(flash_dir=flash, heap_bytes=16 * 1024 * 1024, memory_bytes=64 * 1024 * 1024).run(
        code=INSTALL % (list(packages),) + then).check()
    out = {}
    for line in r.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        out.setdefault(tag, []).append(json.loads(rest) if rest[:1] in "[{" else rest)
    return out, r.stdout, flash


def test_mpy_champion_scores_as_the_stored_forest_and_compiles_nothing(tmp_path):
    train, test = _rows()
    forest = isoforest.train(train, 30, 64, 5)
    assert 0 < beyond_range(forest, test) < len(test)
    out, _, flash = _install(tmp_path, {"mpy.pkg": _package(forest, "mpy")}, forest, test)
    assert out["RESULT"] == [[True, "installed m-30 v7"]]
    (want,) = out["STORED"]  # the stored forest's node-array walk, in the same VM
    assert want == pytest.approx([forest.score(r) for r in test], rel=1e-12)  # CPython's libm: within an ulp
    assert out["CHAMPION"] == [["m-30", "PrecompiledForest", want]]
    assert out["REBOOTED"] == [["m-30", "PrecompiledForest", want]]  # boot imports it again
    champion = flash / "models" / "champion"
    assert sorted(p.name for p in champion.iterdir()) == ["__init__.py", "champion.mpy", "config.json",
                                                         "features.mpy"]
    assert max(want) > 0.6 > min(want)  # the rows hold anomalies and normal windows


def test_a_runtime_module_without_split_ranges_is_refused():
    forest = isoforest.train(_rows()[0], 12, 64, 6)
    module = {}
    exec(module_source(forest), module)
    assert PrecompiledForest(type("M", (), module), forest.grid).split_hi == forest.split_hi
    del module["R"]  # a runtime module of an older gateway
    with pytest.raises(ValueError, match="no split ranges R for 3 features"):
        PrecompiledForest(type("M", (), module), forest.grid)


def test_features_travel_as_mpy_and_compute_the_same_features(tmp_path):
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "features.mpy").write_bytes(da.mpy_compile(da.feature_script(), "features", da.MpyTarget()))
    xs = list(signal(2000, seed=9, spike_every=50))
    vm = MicroPythonVM(readonly_dirs={"/mod": mod, "/fw": REPO_ROOT}, sys_path=("/mod", "/fw"),
                       heap_bytes=16 * 1024 * 1024, memory_bytes=64 * 1024 * 1024)
    r = vm.run(code=(  # firmware._compat first: it turns the WASI build's unsound collector off
        "from firmware import _compat\nimport array, features, json\n"
        "from firmware import features as firmware_features\n"
        "xs = array.array('f', %r)\n"
        "print(json.dumps([features.__file__, features.signal_features(xs, 1000),"
        " firmware_features.signal_features(xs, 1000)]))" % (xs,))).check()
    path, shipped, firmware_own = json.loads(r.stdout)
    assert path == "/mod/features.mpy" and len(shipped) == 4 and shipped == firmware_own
    assert shipped == [pytest.approx(list(row), rel=1e-9) for row in features.signal_features(xs, 1000)]


def test_the_device_extracts_features_with_the_module_shipped_as_mpy(tmp_path):
    train, test = _rows()
    forest = isoforest.train(train, 12, 64, 6)
    target = da.MpyTarget()
    pkg = da.build_package("m-30", ("model.bin", forest.to_bytes()), {"grid": forest.grid, "threshold": 0.6},
                           device_id=DEVICE, version=7, key=KEY, encoding="mpy", target=target,
                           runtime=da.runtime_mpy(forest, target), features_src=SHIFTED_FEATURES)
    out, _, _ = _install(tmp_path, {"shifted.pkg": pkg}, forest, test, then=EXTRACT)
    assert out["RESULT"] == [[True, "installed m-30 v7"]]
    (path, extracted, own), (rebooted_path, rebooted, own_again) = out["FEATURES"]
    assert path == "/flash/models/new/features.mpy" and rebooted_path == "/flash/models/champion/features.mpy"
    assert extracted == rebooted == [own[0] + 1000.0, *own[1:]] and own_again == own


def test_mpy_of_another_micropython_falls_back_to_the_compact_bytes_with_the_reason(tmp_path):
    train, test = _rows()
    forest = isoforest.train(train, 12, 64, 6)
    pkgs = {"only-mpy.pkg": _package(forest, "mpy", version=7, target=OLD_MICROPYTHON),
            "beside.pkg": _package(forest, "mpy+compact", version=8, target=OLD_MICROPYTHON)}
    out, stdout, _ = _install(tmp_path, pkgs, forest, test)
    refused, installed = out["RESULT"]
    # without the compact bytes beside it, nothing is installed and the reason names the .mpy
    assert refused[0] is False and "champion.mpy not loaded (incompatible .mpy file)" in refused[1]
    assert installed[0] is True and installed[1] == (
        "installed m-30 v8 (champion.mpy not loaded (incompatible .mpy file): compiled model.bin instead; "
        "features.mpy not loaded (incompatible .mpy file): own paper features instead)")
    assert "champion /flash/models/new: champion.mpy not loaded (incompatible .mpy file)" in stdout
    (want,) = out["STORED"]
    assert out["CHAMPION"] == [["m-30", "CompiledForest", want]]
    assert out["REBOOTED"] == [["m-30", "CompiledForest", want]]


def test_tampered_mpy_is_refused_by_the_package_checks(tmp_path):
    train, test = _rows()
    forest = isoforest.train(train, 12, 64, 6)
    good = _package(forest, "mpy", version=7)
    flipped = bytearray(good.data)
    e = next(f for f in good.files if f["name"] == "champion.mpy")
    flipped[good.head_size + e["offset"] + e["size"] // 2] ^= 0x10
    # a consistent package around another .mpy (every scorer says "normal"), signed without the device's key
    evil = da.mpy_compile(b"H=(3,12,64)\nC=(0,0,0)\nL=0\nG=(lambda q0,q1,q2:100,)*3\n", "champion", da.MpyTarget())
    forged = _package(forest, "mpy", version=8, key=bytes(32), runtime=evil)
    out, _, flash = _install(tmp_path, {"flipped.pkg": da.Package(bytes(flipped), "m-30", DEVICE, 7, "mpy"),
                                        "forged.pkg": forged, "good.pkg": good}, forest, test)
    flip_result, forged_result, good_result = out["RESULT"]
    assert flip_result == [False, "corrupted package: file champion.mpy hash mismatch"]
    assert forged_result == [False, "bad signature: hmac mismatch (unsigned or tampered)"]
    assert good_result == [True, "installed m-30 v7"]
    assert out["CHAMPION"][0][2] == out["STORED"][0]


def test_a_wear_champion_ships_its_feature_set_as_mpy_and_the_device_extracts_with_it(tmp_path):
    from firmware import features_wear

    xs = signal(250 * 60, seed=4, spike_every=23)
    rows = [features_wear.window_features(xs, k * 250, 250) for k in range(60)]
    forest = isoforest.train(rows[:50], 10, 32, 3)
    config = {"grid": forest.grid, "threshold": 0.6, "feature_set": "wear", "feature_params": {"steps": 128}}
    target = da.MpyTarget()
    pkg = da.build_package("w-10", ("model.bin", forest.to_bytes()), config, device_id=DEVICE, version=3, key=KEY,
                           encoding="mpy", target=target, runtime=da.runtime_mpy(forest, target))
    out, stdout, flash = _install(tmp_path, {"wear.pkg": pkg}, forest, rows[50:], then=(
        "import array, math\n"
        "buf = array.array('f', [math.sin(i * 0.3) * 2 for i in range(250)])\n"
        "from firmware import features_wear\n"
        "dev.step()\n"
        "m = dev.inference.feature_module\n"
        "print('WEAR ' + json.dumps([m.__file__, m.FEATURE_SET, list(dev.data_in.extract(buf)),"
        " list(features_wear.window_features(buf, 0, 250, 128))]))\n"))
    assert out["RESULT"] == [[True, "installed w-10 v3"]], stdout
    (want,) = out["STORED"]
    assert out["REBOOTED"] == [["w-10", "PrecompiledForest", want]]
    ((path, name, extracted, own),) = out["WEAR"]
    assert path == "/flash/models/champion/features.mpy" and name == "wear" and extracted == own
    assert (flash / "models" / "champion" / "features.mpy").read_bytes()[:2] == b"M\x06"
