"""CLI: python -m tinyml_dagster.emulator --device-id dev-1 [options]; prints the link port, runs until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from tinyml_dagster import ims, settings
from tinyml_dagster.emulator.device_emulator import RUNTIMES, DeviceEmulator


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinyml_dagster.emulator", description=__doc__)
    p.add_argument("--device-id", default="dev-1")
    p.add_argument("--flash", type=Path, help="flash directory (default <data>/devices/<id>/flash)")
    p.add_argument("--ims-dir", type=Path, help="IMS files fed to the data UART (default: settings.ims_dir())")
    p.add_argument("--recording", type=Path, help="recording spec fed instead of IMS files (default: TINYML_RECORDING)")
    p.add_argument("--bearing", type=int, default=3, help="IMS bearing whose channel is fed (3: inner-race defect)")
    p.add_argument("--axis", default="x", help="IMS axis (x or y), or the recording's channel fed")
    p.add_argument("--rate-hz", type=int, default=settings.DEFAULT_RATE_HZ)
    p.add_argument("--runtime", choices=RUNTIMES, default="vm", help="MicroPython VM (default) or CPython")
    p.add_argument("--baud", type=int, default=settings.LINK_BAUD)
    p.add_argument("--turnaround-ms", type=float, default=100.0, help="half-duplex turnaround each way")
    p.add_argument("--time-scale", type=float, default=1.0, help="run the wire and the data this many times faster")
    p.add_argument("--link", type=Path, help="also make this path a symlink to the link pty")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="device config.json field (n_train, n_trees, psi, threshold, upload_every, ...)")
    p.add_argument("--loop", action="store_true", help="start the IMS files over when they run out")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    spec = args.recording or (None if args.ims_dir else settings.recording_spec_file())
    feed = files = None
    try:
        if spec is not None:
            from tinyml_dagster.emulator.data_feed import RecordingFeed
            from tinyml_dagster.recordings import load_spec, open_recording

            feed = RecordingFeed(open_recording(load_spec(spec)), args.axis, args.rate_hz, args.time_scale,
                                 loop=args.loop)
        else:
            files = ims.list_ims_files(args.ims_dir or settings.ims_dir())
    except Exception as exc:  # the readers' errors name the file and line
        where = "recording " + str(spec) if spec else "IMS files in " + str(args.ims_dir or settings.ims_dir())
        print(f"error: {where}: {exc}", file=sys.stderr)
        return 2
    emu = DeviceEmulator(args.device_id, flash_dir=args.flash, ims_files=files, bearing=args.bearing,
                         axis=args.axis, rate_hz=args.rate_hz, runtime=args.runtime, baud=args.baud,
                         turnaround_ms=args.turnaround_ms, time_scale=args.time_scale, link_path=args.link,
                         config=dict(args.set), loop_data=args.loop, feed=feed)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    emu.start()
    print(f"PORT {emu.port_path}", flush=True)
    print(f"FLASH {emu.flash}", flush=True)
    done.wait(args.duration)
    emu.stop()
    print(json.dumps({"reboots": emu.reboots, "errors": emu.errors[-3:], **emu.wire.stats()}), flush=True)
    return 0
