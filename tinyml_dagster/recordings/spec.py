"""The recording spec: where the files are, how to read them, at which rate, which channels, and their timestamps."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field, ValidationError

FORMATS = ("ims", "delimited", "parquet", "wav", "npy", "npz", "mat")
TIMESTAMPS = ("filename", "column", "interval")
LAYOUTS = ("snapshots", "stream")
IMS_NAME_FORMAT = "%Y.%m.%d.%H.%M.%S"


class RecordingSpec(dg.Config):
    """A recording: a file, folder or glob of files in one format, read as channels x samples at rate_hz."""

    path: str = Field(description="File, folder or glob (relative paths: from the spec file's folder).")
    format: str = Field(default="", description="One of %s; empty: from the file extension." % ", ".join(FORMATS))
    rate_hz: float = Field(default=0.0, description="Source sampling rate in Hz (required: never assumed).")
    columns: list[str] = Field(
        default=[],
        description="What to read, in channel order: column names or 0-based indices (delimited, parquet, npy, wav), "
        "variable names or glob patterns such as '*_DE_time' (npz, mat); "
        "empty: every numeric column except time_column.",
    )
    channels: list[str] = Field(default=[], description="Channel names, one per column read; empty: the column names.")
    monitor: list[str] = Field(
        default=[],
        description="Monitored units, each a channel name or channels joined by '+' (axes of one bearing, e.g. "
        "'b1x+b1y'); empty: every channel on its own.",
    )
    layout: str = Field(default="snapshots", description="snapshots: one snapshot per file; "
                        "stream: files are one continuous stream.")
    snapshot_seconds: float = Field(default=0.0, description="stream layout: cut the stream into snapshots this long "
                                    "(0: one per file).")
    delimiter: str = Field(default="", description="delimited: ',', ';' or '\\t' (empty: from the file).")
    decimal: str = Field(default=".", description="delimited: the decimal mark, '.' or ','.")
    header: Optional[bool] = Field(default=None, description="delimited: first line holds column names "
                                   "(None: from the file).")
    samples_axis: int = Field(default=0, description="npy/npz/mat: the axis of samples "
                              "(0: rows are samples, 1: columns are).")
    scale: float = Field(default=1.0, description="Multiply every sample by this (e.g. volts to g).")
    timestamps: str = Field(default="filename", description="Snapshot times from the file name, "
                            "a time column, or start + interval.")
    filename_format: str = Field(default=IMS_NAME_FORMAT, description="strptime format of the file name (or its stem).")
    filename_regex: str = Field(default="", description="Regex picking the time out of the file name (its first group, "
                                "else the match) for filename_format; empty: the whole name or stem.")
    time_column: str = Field(default="", description="Time column (name or index): seconds since start, or date-times; "
                             "never a channel.")
    start: str = Field(default="", description="ISO start time for timestamps = interval or a numeric time column.")
    interval_s: float = Field(default=0.0, description="Seconds between snapshots "
                              "(timestamps = interval; 0: the snapshot length).")
    rates_hz: list[int] = Field(default=[], description="Device sampling rates to resample to "
                                "(empty: 500, 1000, 2000 Hz up to the source rate).")
    device_rate_hz: int = Field(default=0, description="The rate the device samples at "
                                "(0: 2000 Hz if among rates_hz, else the highest).")
    window_s: float = Field(default=0.5, description="Feature window length in seconds "
                            "(snapshots shorter than a window are joined, see README).")
    device_channel: str = Field(default="", description="The channel fed to the emulated device "
                                "(empty: the first monitored channel).")
    shaft_hz: float = Field(default=0.0, description="Shaft speed in Hz (0: unknown).")
    bearing_elements: int = Field(default=0, description="Rolling elements per bearing (0: unknown).")
    element_diameter_mm: float = Field(default=0.0, description="Rolling element diameter in mm (0: unknown).")
    pitch_diameter_mm: float = Field(default=0.0, description="Bearing pitch diameter in mm (0: unknown).")
    contact_angle_deg: float = Field(default=0.0, description="Contact angle in degrees.")


# tables a spec file may hold beside the recording's fields: [labels] (detection_quality.recording_labels)
OTHER_TABLES = ("labels",)


class SpecError(ValueError):
    """A spec that cannot be used; the message names the spec file and the field."""


def load_spec(path: str | os.PathLike) -> RecordingSpec:
    """A spec from a TOML file (its [recording] table or its top level); relative paths resolved from its folder."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    fields = doc["recording"] if "recording" in doc else {k: v for k, v in doc.items() if k not in OTHER_TABLES}
    spec = spec_from_dict(fields, str(path))
    if not Path(spec.path).is_absolute():
        spec = spec.model_copy(update={"path": str((path.parent / spec.path).resolve())})
    return spec


def spec_from_dict(fields: dict, where: str = "spec") -> RecordingSpec:
    """A checked spec from its fields (a TOML table or Dagster run config)."""
    unknown = sorted(set(fields) - set(RecordingSpec.model_fields))
    if unknown:
        raise SpecError(
            f"{where}: {', '.join(unknown)}: not a spec field (fields: {', '.join(RecordingSpec.model_fields)})"
        )
    try:
        spec = RecordingSpec(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise SpecError(f"{where}: {problems}") from None
    check_spec(spec, where)
    return spec


def check_spec(spec: RecordingSpec, where: str = "spec") -> None:
    """SpecError for fields that contradict each other or are missing."""
    def bad(field: str, message: str) -> None:
        raise SpecError(f"{where}: {field}: {message}")

    if spec.format and spec.format not in FORMATS:
        bad("format", f"{spec.format!r} is not one of {', '.join(FORMATS)}")
    if not spec.rate_hz > 0:
        bad("rate_hz", "the source sampling rate in Hz is required (it is never assumed)")
    if spec.layout not in LAYOUTS:
        bad("layout", f"{spec.layout!r} is not one of {', '.join(LAYOUTS)}")
    if spec.timestamps not in TIMESTAMPS:
        bad("timestamps", f"{spec.timestamps!r} is not one of {', '.join(TIMESTAMPS)}")
    if spec.timestamps == "column" and not spec.time_column:
        bad("time_column", "timestamps = 'column' needs the time column's name or index")
    if spec.timestamps == "interval" and not spec.start:
        bad("start", "timestamps = 'interval' needs an ISO start time, e.g. '2024-01-31T08:00:00'")
    if spec.delimiter not in ("", ",", ";", "\t", " ", "|"):
        bad("delimiter", f"{spec.delimiter!r} is not one of ',', ';', '\\t', ' ', '|'")
    if spec.filename_regex:
        try:
            re.compile(spec.filename_regex)
        except re.error as e:
            bad("filename_regex", f"not a regular expression ({e})")
    if spec.decimal not in (".", ","):
        bad("decimal", f"{spec.decimal!r} is not '.' or ','")
    if spec.layout == "stream" and not spec.snapshot_seconds > 0:
        bad("snapshot_seconds", "layout = 'stream' needs the snapshot length in seconds to cut the stream into")
    if spec.channels and spec.columns and len(spec.channels) != len(spec.columns):
        bad("channels", f"{len(spec.channels)} names for {len(spec.columns)} columns")
    if len(set(spec.channels)) != len(spec.channels):
        bad("channels", "names repeat")
    if spec.samples_axis not in (0, 1):
        bad("samples_axis", "must be 0 or 1")
    for rate in spec.rates_hz:
        if not 0 < rate <= spec.rate_hz:
            bad("rates_hz", f"{rate} Hz is not between 0 and the source rate {spec.rate_hz:g} Hz (no upsampling)")
    if spec.device_rate_hz and spec.device_rate_hz not in device_rates(spec):
        bad("device_rate_hz", f"{spec.device_rate_hz} Hz is not one of the rates {device_rates(spec)}")
    if not spec.window_s > 0:
        bad("window_s", "the window length in seconds must be positive")
    for rate in device_rates(spec):
        if rate * spec.window_s < 8:
            bad("window_s", f"{spec.window_s:g} s at {rate} Hz is {rate * spec.window_s:g} samples, fewer than 8")
    if not device_rates(spec):
        bad("rates_hz", "no default device rate (500, 1000, 2000 Hz) is at or below the source rate "
                        f"{spec.rate_hz:g} Hz; give rates_hz")
    if spec.snapshot_seconds < 0 or spec.interval_s < 0:
        bad("snapshot_seconds" if spec.snapshot_seconds < 0 else "interval_s", "must not be negative")
    if spec.device_channel and spec.channels and spec.device_channel not in spec.channels:
        bad("device_channel", f"{spec.device_channel!r} is not a channel ({', '.join(spec.channels)})")
    if spec.channels:
        for unit in spec.monitor:
            for name in unit.split("+"):
                if name not in spec.channels:
                    bad("monitor", f"{name!r} is not a channel ({', '.join(spec.channels)})")


DEFAULT_RATES_HZ = (500, 1000, 2000)


def device_rates(spec: RecordingSpec) -> list[int]:
    """The device rates features are computed at: spec.rates_hz, else the defaults up to the source rate."""
    return sorted(spec.rates_hz) if spec.rates_hz else [r for r in DEFAULT_RATES_HZ if r <= spec.rate_hz]


def device_rate(spec: RecordingSpec) -> int:
    """The rate the device samples at."""
    rates = device_rates(spec)
    return spec.device_rate_hz or (2000 if 2000 in rates else rates[-1])


def window_ms(spec: RecordingSpec) -> int:
    return int(round(spec.window_s * 1000))


def monitored_units(spec: RecordingSpec, channels: list[str]) -> list[tuple[str, ...]]:
    """The monitored units, each a tuple of channel names: spec.monitor, or every channel on its own."""
    units = [tuple(u.split("+")) for u in spec.monitor] or [(c,) for c in channels]
    for unit in units:
        for name in unit:
            if name not in channels:
                raise SpecError(f"monitor: {name!r} is not a channel of the recording ({', '.join(channels)})")
    return units
