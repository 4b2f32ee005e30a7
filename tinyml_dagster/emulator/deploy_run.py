"""Deploy packages to a fresh emulated device over its exact wire, and account for the wire's time afterwards."""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from firmware import isoforest, messages
from tinyml_dagster import ims, settings
from tinyml_dagster import deployment_agent as da
from tinyml_dagster.emulator.device_emulator import DeviceEmulator
from tinyml_dagster.link import Deployer, LinkTiming, SerialTransport
from tinyml_dagster.model_repository import DEFAULT_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent.parent
BAUD, TURNAROUND_S = settings.LINK_BAUD, settings.LINK_TURNAROUND_S
KEY = bytes(range(32))


def ims_files() -> list[Path]:
    """One IMS file for the emulator's data UART (the device never trains here: n_train is out of reach)."""
    d = settings.ims_dir()
    files = ims.list_ims_files(d) if d.is_dir() else []
    return (files or sorted((ROOT / "assets_tests" / "fixtures" / "ims" / "1st_test").iterdir()))[:1]


def training_rows(n: int = 2000, seed: int = 2):
    """Feature-like rows (mean, skewness, kurtosis) with a bearing's spread."""
    rng = random.Random(seed)
    return [[rng.gauss(0.0, 0.02), rng.gauss(0.0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(n)]


def package(rows, n: int, encoding: str, version: int = 1, seed: int = 7, name: str = "") -> da.Package:
    """A signed package for the emulated device: an n-tree forest trained on rows, in the given encoding."""
    forest = isoforest.train(rows, n, 100, seed)
    return da.forest_package(name or f"bench_t{n}", forest, {"threshold": DEFAULT_THRESHOLD, "grid": forest.grid},
                             device_id="bench-0", version=version, key=KEY, encoding=encoding)


def deploy_on_emulator(pkgs: list[da.Package], runtime: str, speedup: float, with_log: bool = False,
                       reply_slack_s: float = 0.0) -> tuple:
    """Deploy pkgs in turn to one fresh emulated device; (DeployReports, the wire's stats[, the wire's log])."""
    with tempfile.TemporaryDirectory() as tmp:
        flash = Path(tmp) / "bench-0" / "flash"
        (flash / "deploy").mkdir(parents=True)
        (flash / "deploy" / "key").write_bytes(KEY)
        emu = DeviceEmulator("bench-0", flash_dir=flash, ims_files=ims_files(), runtime=runtime, baud=BAUD,
                             turnaround_ms=TURNAROUND_S * 1000, time_scale=speedup, config={"n_train": 100000})
        emu.start(boot_timeout_s=120)
        try:
            if runtime == "vm":  # the VM thread is up before the firmware has booted
                out, deadline = flash.parent / "vm.stdout", time.monotonic() + 120
                while not (out.exists() and "BOOTED" in out.read_text()):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"emulator did not boot: {emu.errors}")
                    time.sleep(0.1)
            transport = SerialTransport(emu.port_path, LinkTiming(BAUD, TURNAROUND_S, 1.0 / speedup))
            reps = []
            try:
                _await_hello(transport)
                for pkg in pkgs:
                    rep = Deployer(transport, install_s=120, reply_slack_s=reply_slack_s).deploy(pkg)
                    if not rep.installed:
                        raise RuntimeError(f"emulated deploy refused: {rep.reason}")
                    reps.append(rep)
            finally:
                transport.close()
            stats, log = emu.wire.stats(), list(emu.wire.log)
        finally:
            emu.stop()
    return (reps, stats, log) if with_log else (reps, stats)


def _await_hello(transport: SerialTransport, timeout_s: float = 10.0) -> None:
    """Take the boot HELLO and HEALTH off the line, so that only the deploy's bytes are counted."""
    deadline = time.monotonic() + timeout_s
    want = {messages.HELLO, messages.HEALTH}
    while want and time.monotonic() < deadline:
        msg = transport.recv(deadline - time.monotonic())
        if msg is not None:
            want.discard(msg[0])
    if want:
        raise RuntimeError("no boot HELLO and HEALTH from the emulated device")


@dataclass(frozen=True)
class WireAccount:
    """Where a stretch of the wire's log spent its real time."""

    span_s: float  # first byte's start to last byte's end
    busy_s: float  # bytes on the wire
    turnaround_s: float  # direction changes
    idle_s: float  # waiting for an endpoint to write (its processing), the wire free
    waited_while_free: int  # writes that started later than written and wire free allow (0 for an exact wire)

    @property
    def idle_share(self) -> float:
        return self.idle_s / self.span_s if self.span_s else 0.0


def account(log: list[tuple], turn_s: float) -> WireAccount:
    """Split a wire log (direction, written, start, end, turnaround) into bytes, turnarounds and idle time."""
    idle, waited, turns = 0.0, 0, 0
    prev_end = log[0][3]
    for _, written, start, end, turn in log[1:]:
        free = prev_end + (turn_s if turn else 0.0)
        if abs(start - max(written, free)) > 1e-9:
            waited += 1
        idle += max(0.0, start - free)
        turns += bool(turn)
        prev_end = end
    return WireAccount(span_s=log[-1][3] - log[0][2], busy_s=sum(e[3] - e[2] for e in log),
                       turnaround_s=turn_s * turns, idle_s=idle, waited_while_free=waited)


def deploy_log(log: list[tuple], since: float) -> list[tuple]:
    """The part of a wire log from the gateway's offer on (drops the boot HELLO before it)."""
    log = [e for e in log if e[1] >= since]
    return log[[d for d, *_ in log].index("down"):]
