"""Packages of the precompiled champion: the device's .mpy target, the files, the per-file delta over the link."""

import json
import struct

import pytest
from test_link_protocol import KEY, forest, rig  # noqa: F401  (rig: the deploy protocol's device on a pty)

from firmware import package as fpkg
from tinyml_dagster import deployment_agent as da
from tinyml_dagster.link import Deployer


def package(f, version, encoding, model_id="m"):
    return da.forest_package(model_id, f, {"threshold": 0.6, "grid": f.grid}, device_id="dev-1", version=version,
                             key=KEY, encoding=encoding)


def test_a_device_target_decodes_its_sys_implementation_mpy():
    assert da.MpyTarget.from_sys_mpy(da.VM_SYS_MPY) == da.MpyTarget(6, 3, "")
    esp32 = da.MpyTarget.from_sys_mpy(6 | (3 | 10 << 2) << 8)  # MicroPython 1.27 on an ESP32
    assert esp32 == da.MpyTarget(6, 3, "xtensawin") and esp32.mpy_cross_args() == ["-march=xtensawin"]
    assert da.MpyTarget(5, 0, "").mpy_cross_args() == ["-b", "5"]
    with pytest.raises(da.PackagingError, match="_mpy 0: not a MicroPython .mpy version"):
        da.MpyTarget.from_sys_mpy(0)


def test_the_encoding_is_chosen_per_device_from_the_runtime_its_hello_reported():
    esp32 = 6 | (3 | 10 << 2) << 8
    assert da.choose_encoding(esp32) == ("mpy", "the device imports .mpy v6.3 (xtensawin)")
    assert da.choose_encoding(da.VM_SYS_MPY) == ("mpy", "the device imports .mpy v6.3 (bytecode)")
    assert da.device_mpy_target(esp32).arch == "xtensawin" and da.device_mpy_target(None) == da.MpyTarget()
    # MicroPython 1.12-1.18 (.mpy v5), a CPython device, one that never said, nonsense: the compact bytes
    assert da.choose_encoding(5) == ("compact", "the device's .mpy v5.0 is not the gateway's mpy-cross v6.3")
    assert da.choose_encoding(0)[0] == da.choose_encoding(None)[0] == "compact"
    assert da.choose_encoding(None)[1].startswith("the device has not reported")
    assert da.choose_encoding(0xFFFF) == ("compact", "sys.implementation._mpy 65535: not a MicroPython .mpy "
                                                     "version (e.g. 774)")


def test_mpy_packages_carry_the_runtime_module_instead_of_or_beside_the_sources(tmp_path):
    f = forest(10)
    target = da.MpyTarget()
    runtime = da.runtime_mpy(f, target)
    assert runtime[:2] == b"M\x06" and runtime[2] >> 2 == 0  # .mpy v6, no native architecture
    # for an ESP32 (-march=xtensawin): the runtime module is bytecode only, so the same importable .mpy
    assert da.runtime_mpy(f, da.MpyTarget.from_sys_mpy(11014)) == runtime
    assert da.runtime_mpy(f, da.MpyTarget(5, 0, ""))[:2] == b"M\x05"  # MicroPython 1.12-1.18
    only, beside = package(f, 1, "mpy"), package(f, 1, "mpy+compact")
    assert [e["name"] for e in only.files] == ["champion.mpy", "features.mpy", "config.json", "__init__.py"]
    assert [e["name"] for e in beside.files] == ["champion.mpy", "features.mpy", "model.bin", "config.json",
                                                 "__init__.py"]
    for pkg in (only, beside):
        path = tmp_path / f"{pkg.encoding}.pkg"
        path.write_bytes(pkg.data)
        info = fpkg.verify(str(path), KEY, "dev-1", 0)
        assert info["encoding"] == fpkg.ENC_MPY
        out = tmp_path / pkg.encoding
        out.mkdir()
        fpkg.extract(str(path), info, str(out))
        assert (out / "champion.mpy").read_bytes() == runtime
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["runtime_file"] == "champion.mpy" and cfg["encoding"] == pkg.encoding
        assert cfg["features_file"] == "features.mpy"
    assert "model_file" not in json.loads((tmp_path / "mpy" / "config.json").read_text())
    assert json.loads((tmp_path / "mpy+compact" / "config.json").read_text())["model_file"] == "model.bin"
    assert da.footprint(only).heap_bytes == len(runtime) + 2**da.ZLIB_WBITS + da.SCORING_BUFFERS


def test_mpy_compile_errors_name_the_module():
    with pytest.raises(da.PackagingError, match=r'mpy-cross champion.py .*: File "champion.py", line 2 SyntaxError'):
        da.mpy_compile(b"G=(lambda q0:\n", "champion", da.MpyTarget())
    with pytest.raises(da.PackagingError, match="needs the champion's .mpy"):
        da.build_package("m", ("model.bin", b"x"), {}, device_id="dev-1", version=1, key=KEY, encoding="mpy")


def test_delta_reuses_the_precompiled_features_and_a_cpython_device_falls_back(rig):  # noqa: F811
    link, device, transport, root = rig
    first = package(forest(10), 1, "mpy+compact", "first")
    rep = Deployer(transport, reply_slack_s=0.5).deploy(first)
    # the firmware under CPython has no .mpy loader: it compiles model.bin and says so (in the result, unless a
    # loaded host made the gateway offer again and learn the install from the device's champion instead)
    why = device.device.agent.last_reason
    assert rep.installed and rep.device_champion_id == "first"
    assert why.startswith(rep.reason) or rep.reason == "replayed or old package: version 1 <= 1"  # cut to a frame
    assert why.startswith("installed first v1 (champion.mpy not loaded (cannot import")
    assert why.endswith("compiled model.bin instead; features.mpy not loaded (cannot import features.mpy: No "
                        "module named 'features'): own paper features instead)")
    second = package(forest(10, seed=2), 2, "mpy+compact", "second")
    rep = Deployer(transport, reply_slack_s=0.5).deploy(second)
    reused = ("features.mpy", "__init__.py")
    assert rep.installed and rep.device_champion_id == "second"
    assert rep.delta_saved_bytes == sum(e["size"] for e in second.files if e["name"] in reused)
    # a package with the .mpy alone cannot be installed there: refused, the champion in use stays
    rep = Deployer(transport, reply_slack_s=0.5).deploy(package(forest(10, seed=3), 3, "mpy", "third"))
    assert not rep.installed and "and no model file to compile instead" in rep.reason
    assert rep.device_champion_id == "second"


def test_link_service_stores_the_runtime_a_devices_hello_reports(tmp_path, caplog):
    from firmware.data_comm import pack_hello
    from tinyml_dagster.knowledge_base import KnowledgeBase
    from tinyml_dagster.link_service import LinkService
    from tinyml_dagster.link_service.ports import SerialLink

    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    service = LinkService(tmp_path / "kb.sqlite", keys={}.get)
    link = SerialLink(service, "esp-1", "/dev/null")

    def hello(device_id="esp-1"):
        return pack_hello(device_id, 0, "", 0, 0, 0, 0, 0, 0)

    link._hello(hello())  # an older device's HELLO: nothing to record
    service._record_writes(kb)
    assert kb.device_sys_mpy("esp-1") is None
    link._hello(hello() + struct.pack("<H", 11014))  # MicroPython 1.27 on an ESP32
    link._hello(hello("esp-2") + struct.pack("<H", 774))  # another device's id on this port: not recorded
    link._hello(b"\x01\x02")  # malformed: logged
    service._record_writes(kb)
    assert kb.device_sys_mpy("esp-1") == 11014 and kb.device_sys_mpy("esp-2") is None
    assert da.choose_encoding(kb.device_sys_mpy("esp-1"))[0] == "mpy"
    assert "HELLO names device 'esp-2': not recorded" in caplog.text
    assert "malformed HELLO: HELLO of 2 bytes" in caplog.text
    link._hello(hello() + struct.pack("<H", 0))  # the same device now reports a runtime without .mpy
    service._record_writes(kb)
    assert kb.device_sys_mpy("esp-1") == 0
