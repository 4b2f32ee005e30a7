"""Deploy protocol: the gateway's real pySerialTransfer over a pty to the real firmware (CPython), timed line."""

import json
import random
from pathlib import Path

import pytest

from firmware import isoforest
from tinyml_dagster import deployment_agent as da
from tinyml_dagster.link import Deployer, LinkTiming, SerialTransport
from tinyml_dagster.link.sim import DeviceHost, SimulatedLink, provision_flash

KEY = bytes(range(100, 132))
TIMING = LinkTiming(time_scale=0.02)


def forest(n_trees, seed=1):
    rng = random.Random(seed)
    rows = [[rng.gauss(0, 1), rng.gauss(0, 1), rng.gauss(3, 1)] for _ in range(300)]
    return isoforest.train(rows, n_trees, 100, seed)


def package(f, version, model_id="m", encoding="compact"):
    model = ("model.bin", f.to_bytes()) if encoding == "compact" else (
        "model.json", json.dumps(isoforest.to_json(f)).encode())
    return da.build_package(model_id, model, {"threshold": 0.6, "grid": f.grid}, device_id="dev-1",
                            version=version, key=KEY, encoding=encoding)


@pytest.fixture
def rig(tmp_path):
    root = tmp_path / "flash"
    provision_flash(root, "dev-1", KEY, TIMING)
    link = SimulatedLink(TIMING)
    device = DeviceHost(str(root), link.device_uart).start()
    transport = SerialTransport(link.gateway_port, TIMING)
    yield link, device, transport, root
    transport.close()
    device.stop()
    link.close()


def test_deploy_installs_and_reports(rig):
    link, device, transport, root = rig
    logs, progress = [], []
    f = forest(20)
    pkg = package(f, 1, "b1_t20")
    rep = Deployer(transport, window=8, log=logs.append, progress=progress.append).deploy(pkg)
    assert rep.installed and rep.reason == "installed b1_t20 v1", logs
    assert (rep.device_champion_id, rep.device_champion_version) == ("b1_t20", 1)
    assert device.device.agent.champion_info() == ("b1_t20", 1)
    installed = root / "models" / "champion"
    assert (installed / "model.bin").read_bytes() == f.to_bytes()
    assert json.loads((installed / "config.json").read_text())["grid"] == f.grid
    assert rep.payload_bytes == rep.stream_bytes == pkg.size and rep.retransmissions == 0
    assert rep.windows >= 2 and progress and progress[-1]["bytes"] <= pkg.size
    # wire time is honoured: the link cannot beat 10 bits per byte at 2,400 baud
    assert rep.link_seconds >= rep.wire_bytes / 240
    assert 0.5 < rep.occupation <= 1.0
    assert (root / "deploy" / "active.pkg").read_bytes() == pkg.data


def test_delta_sends_only_what_the_device_lacks(rig):
    link, device, transport, root = rig
    f = forest(10)
    assert Deployer(transport).deploy(package(f, 1, "first")).installed
    # same forest, new config: only config.json (and the header and trailer) travel
    second = package(f, 2, "second")
    rep = Deployer(transport).deploy(second)
    assert rep.installed and rep.device_champion_id == "second"
    held = sum(e["size"] for e in second.files if e["name"] != "config.json")
    assert rep.delta_saved_bytes == held and rep.stream_bytes == second.size - held
    assert (root / "deploy" / "active.pkg").read_bytes() == second.data
    # a new forest still reuses features.py and __init__.py
    third = package(forest(10, seed=2), 3, "third")
    rep = Deployer(transport).deploy(third)
    assert rep.installed and rep.delta_saved_bytes == sum(
        e["size"] for e in third.files if e["name"] in ("features.py", "__init__.py"))


def test_resume_after_cut_link_and_device_restart(rig):
    link, device, transport, root = rig
    pkg = package(forest(30), 1, "big")
    cut_after = []

    def progress(info):
        if not cut_after and info["what"] == "acknowledged":
            cut_after.append(info["bytes"])
            link.cut()

    with pytest.raises(Exception, match="link cut"):
        Deployer(transport, window=4, retries=2, progress=progress).deploy(pkg)
    assert device.device.agent.champion_info()[1] in (0, None)  # nothing installed
    state = json.loads((root / "deploy" / "xfer.json").read_text())
    assert state["acked"] == cut_after[0] > 0
    device.restart()
    link.restore()
    rep = Deployer(transport, window=4).deploy(pkg)
    assert rep.installed and rep.resumed_from == cut_after[0]
    assert rep.payload_bytes == pkg.size - cut_after[0]
    assert device.device.agent.champion_info() == ("big", 1)


def test_json_encoding_deploys_too(rig):
    link, device, transport, root = rig
    f = forest(2)
    rep = Deployer(transport).deploy(package(f, 1, "js", encoding="json"))
    assert rep.installed
    doc = json.loads((root / "models" / "champion" / "model.json").read_text())
    assert isoforest.from_json(doc).to_bytes() == f.to_bytes()


def test_interop_gateway_pyserialtransfer_with_firmware_in_micropython_vm(tmp_path):
    """The device emulator runs the firmware in the real MicroPython 1.27 VM behind a half-duplex pty."""
    import time

    from tinyml_dagster.emulator import DeviceEmulator

    scale = 20  # the emulator's wire runs 20x faster than 2,400 baud; the gateway's timing says the same
    flash = tmp_path / "vm-1" / "flash"
    (flash / "deploy").mkdir(parents=True)
    (flash / "deploy" / "key").write_bytes(KEY)
    ims_file = sorted((Path(__file__).parents[1] / "fixtures" / "ims" / "1st_test").iterdir())[0]
    emu = DeviceEmulator("dev-1", flash_dir=flash, ims_files=[ims_file], runtime="vm", baud=2400,
                         turnaround_ms=100, time_scale=scale, config={"n_train": 100000})
    emu.start()
    transport = None
    try:
        out = tmp_path / "vm-1" / "vm.stdout"
        deadline = time.monotonic() + 120
        while not (out.exists() and "BOOTED" in out.read_text()):
            assert time.monotonic() < deadline, emu.errors
            time.sleep(0.1)
        transport = SerialTransport(emu.port_path, LinkTiming(time_scale=1 / scale))
        f = forest(5)
        logs = []
        rep = Deployer(transport, install_s=120, log=logs.append).deploy(package(f, 1, "vm-a"))
        assert rep.installed and (rep.device_champion_id, rep.device_champion_version) == ("vm-a", 1), logs
        assert (flash / "models" / "champion" / "model.bin").read_bytes() == f.to_bytes()
        rep = Deployer(transport, install_s=120, log=logs.append).deploy(package(f, 2, "vm-b"))
        assert rep.installed and rep.delta_saved_bytes > 0 and rep.device_champion_version == 2
        forged = da.build_package("evil", ("model.bin", f.to_bytes()), {"grid": f.grid}, device_id="dev-1",
                                  version=3, key=b"attacker-key-0123456789")
        rep = Deployer(transport, install_s=120, log=logs.append).deploy(forged)
        assert not rep.installed and "bad signature" in rep.reason and "bad signature" in logs[-1]
        assert rep.device_champion_id == "vm-b"
        assert not emu.errors
    finally:
        if transport is not None:
            transport.close()
        emu.stop()
