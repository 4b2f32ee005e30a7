"""CLI: python -m tinyml_dagster.recordings inspect PATH [--out recording.toml] | check SPEC."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyml_dagster.recordings.readers import RecordingError
from tinyml_dagster.recordings.spec import SpecError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.recordings")
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="sniff a file, folder or glob and draft its recording spec")
    ins.add_argument("path")
    ins.add_argument(
        "--out", type=Path, default=Path("recording.toml"), help="spec to write (default ./recording.toml)"
    )
    ins.add_argument("--force", action="store_true", help="overwrite an existing spec")
    chk = sub.add_parser("check", help="open the recording a spec describes and print what it holds")
    chk.add_argument("spec", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        return _check(args.spec)
    except (RecordingError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _inspect(args) -> int:
    from tinyml_dagster.recordings.inspect import inspect_path, report, spec_text
    from tinyml_dagster.storage import atomic_write

    finding = inspect_path(args.path)
    print(report(finding))
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; --force to overwrite it", file=sys.stderr)
        return 2
    atomic_write(args.out, spec_text(finding, args.out.parent), mode=0o644)
    print(f"wrote {args.out}" + (f" with {len(finding.questions)} questions to answer" if finding.questions else ""))
    return 0


def _check(spec_path: Path) -> int:
    from tinyml_dagster.recordings.recording import open_recording
    from tinyml_dagster.recordings.spec import load_spec, monitored_units

    spec = load_spec(spec_path)
    rec = open_recording(spec)
    units = monitored_units(spec, rec.channels)
    print(f"{spec_path}: {rec.format}, {len(rec.files)} files, {len(rec)} snapshots of {rec.snapshot_samples} samples "
          f"({rec.snapshot_seconds:.4g} s) at {rec.rate_hz:g} Hz, {rec.timestamps[0]} .. {rec.timestamps[-1]}")
    print(f"channels: {', '.join(rec.channels)}; monitored units: {', '.join('+'.join(u) for u in units)}")
    for i in range(len(rec)):  # every file, so that a bad one is named now rather than mid-pipeline
        rec.snapshot(i)
    print("every snapshot reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
