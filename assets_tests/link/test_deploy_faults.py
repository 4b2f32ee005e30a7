"""Faults: a seeded lossy line, bad packages, power loss mid-install. Either the right package is installed
or the old champion keeps running, and the refusal reason reaches the gateway's log."""

import dataclasses
import hashlib
import os
import threading

import pytest

from firmware import messages
from firmware import package as fpkg
from tinyml_dagster import deployment_agent as da
from tinyml_dagster.link import DeployError, Deployer, SerialTransport
from tinyml_dagster.link.sim import DeviceHost, Faults, SimulatedLink, provision_flash

from test_link_protocol import KEY, TIMING, forest, package


def _rig(tmp_path, faults=None, seed=0):
    faults = faults if faults is not None else Faults()
    root = tmp_path / "flash"
    provision_flash(root, "dev-1", KEY, TIMING)
    link = SimulatedLink(TIMING, faults, seed=seed)
    device = DeviceHost(str(root), link.device_uart).start()
    transport = SerialTransport(link.gateway_port, TIMING)
    return link, device, transport, root


def _close(link, device, transport):
    transport.close()
    device.stop()
    link.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_lossy_line_still_delivers_the_exact_package(tmp_path, seed):
    faults = Faults(corrupt=0.0005, drop=0.0005, duplicate=0.0005, burst=0.0003, repeat=0.1)
    link, device, transport, root = _rig(tmp_path, faults, seed)
    kinds = ("corrupted", "dropped", "duplicated", "repeated")
    try:
        # deploy newer versions until the line has shown every kind of fault (how many bytes cross, and so which
        # faults fall, depends on timing); every deploy must deliver the exact package
        for version in range(1, 5):
            pkg = package(forest(20, seed=version), version, "lossy")  # a new model: the whole file travels
            logs = []
            rep = Deployer(transport, window=8, retries=10, log=logs.append).deploy(pkg)
            assert rep.installed, logs
            assert rep.retransmissions > 0 or rep.timeouts > 0
            active = (root / "deploy" / "active.pkg").read_bytes()
            assert hashlib.sha256(active).digest() == hashlib.sha256(pkg.data).digest()
            assert device.device.agent.champion_info() == ("lossy", version)
            if all(link.stats[k] > 0 for k in kinds):
                break
        assert all(link.stats[k] > 0 for k in kinds), link.stats
    finally:
        _close(link, device, transport)


def test_a_lost_install_answer_is_confirmed_on_the_next_offer(tmp_path):
    """The device installed the package but its answer was lost: offering the same package again finds the device
    running it (installed), while an older one is still refused as a replay."""
    link, device, transport, root = _rig(tmp_path)
    try:
        old, pkg = package(forest(10, seed=3), 1, "first"), package(forest(10, seed=4), 2, "second")
        assert Deployer(transport).deploy(old).installed and Deployer(transport).deploy(pkg).installed
        logs = []
        again = Deployer(transport, log=logs.append).deploy(pkg)
        assert again.installed and again.payload_bytes == 0, logs
        assert any("already runs second v2" in line for line in logs), logs
        replay = Deployer(transport).deploy(old)
        assert not replay.installed and "replayed or old package" in replay.reason
        assert device.device.agent.champion_info() == ("second", 2)
    finally:
        _close(link, device, transport)


def _offered(good: da.Package, data: bytes) -> da.Package:
    """good with other bytes, offered by a gateway that holds the device key (the offer itself verifies)."""
    pkg = dataclasses.replace(good, data=data)
    pkg.offer_mac = messages.mac(KEY, messages.TAG_OFFER, pkg.device_id, pkg.offer_body())
    return pkg


def _bad_packages(good: da.Package, old: da.Package):
    data = good.data
    body = bytearray(data[:-64])
    body[good.head_size + 20] ^= 0xFF  # inside the model file; the attacker recomputes the sha256
    tampered = bytes(body) + hashlib.sha256(bytes(body)).digest() + data[-32:]
    yield "corrupted", _offered(good, data[:-64] + bytes(32) + data[-32:]), "sha256 mismatch"
    yield "unsigned", _offered(good, data[:-32] + bytes(32)), "bad signature"
    yield "tampered", _offered(good, tampered), "hash mismatch"
    other_key = da.build_package("evil", ("model.bin", b"x" * 100), {}, device_id="dev-1", version=9,
                                 key=b"not-the-device-key!")
    yield "forged", other_key, "bad signature"
    yield "truncated", _offered(good, data[:300] + data[-64:]), "truncated"
    yield "replayed", old, "replayed or old package"
    yield "oversized", _offered(good, data + bytes(fpkg.MAX_PACKAGE)), "oversized package"
    yield "unauthenticated offer", dataclasses.replace(good, offer_mac=bytes(16)), "unauthenticated offer"


def test_bad_packages_are_never_activated(tmp_path):
    link, device, transport, root = _rig(tmp_path)
    try:
        old = package(forest(5), 1, "previous")  # replayed below: an older package the device once ran
        assert Deployer(transport).deploy(old).installed
        assert Deployer(transport).deploy(package(forest(5, seed=2), 2, "champion")).installed
        champion = (root / "models" / "champion" / "model.bin").read_bytes()
        good = package(forest(5, seed=3), 3, "candidate")
        for name, bad, reason in _bad_packages(good, old):
            logs = []
            rep = Deployer(transport, install_s=5, log=logs.append).deploy(bad)
            assert not rep.installed, name
            assert reason in rep.reason and any(reason in line for line in logs), (name, rep.reason, logs)
            assert device.device.agent.champion_info() == ("champion", 2), name
            assert (root / "models" / "champion" / "model.bin").read_bytes() == champion
        assert Deployer(transport).deploy(good).installed  # the device is still fine
    finally:
        _close(link, device, transport)


class PowerLoss(BaseException):
    """The device loses power: its loop stops where it is."""


def test_power_loss_at_every_step_of_an_install(tmp_path, monkeypatch):
    link, device, transport, root = _rig(tmp_path)
    real_rename = os.rename
    calls = {"n": 0, "crash_at": None}

    def rename(src, dst):
        if threading.current_thread().name == "device" and calls["crash_at"] is not None:
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise PowerLoss(f"power lost before rename {src} -> {dst}")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    try:
        f1, f2 = forest(3, seed=1), forest(3, seed=2)
        assert Deployer(transport).deploy(package(f1, 1, "v1")).installed
        version = 1
        prev = ("v1", 1)
        crashed_points = 0
        for crash_at in range(1, 30):
            version += 1
            calls.update(n=0, crash_at=crash_at)
            try:
                rep = Deployer(transport, retries=1, install_s=5).deploy(package(f2, version, f"v{version}"))
                finished = rep.installed
            except DeployError:
                finished = False
            calls["crash_at"] = None
            if device.error is None and finished:
                break  # no rename left to interrupt
            assert isinstance(device.error, PowerLoss)
            crashed_points += 1
            device.restart()
            model_id, v = device.device.agent.champion_info()
            # the old champion, or the complete new one: never nothing, never a mix
            assert (model_id, v) in (prev, (f"v{version}", version)), (crash_at, model_id, v, prev)
            assert (root / "models" / "champion" / "model.bin").read_bytes() in (f1.to_bytes(), f2.to_bytes())
            # and the device recovers: the same package completes (or is already in place)
            rep = Deployer(transport, install_s=5).deploy(package(f2, version + 100, f"r{version}"))
            version += 100
            assert rep.installed, (crash_at, rep.reason)
            prev = (f"r{version - 100}", version)
        assert crashed_points >= 3
    finally:
        calls["crash_at"] = None
        _close(link, device, transport)
