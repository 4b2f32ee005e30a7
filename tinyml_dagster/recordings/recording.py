"""A recording: channels x samples at a known rate, as timestamped snapshots (one per file, or cut from a stream)."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from tinyml_dagster.recordings.readers import READERS, RecordingError, Table, guess_format, read_table, sniff_delimited
from tinyml_dagster.recordings.spec import RecordingSpec, SpecError, check_spec

RATE_TOLERANCE = 0.01  # a time column's spacing may differ from 1 / rate_hz by this fraction


@dataclass
class Recording:
    """Snapshots of equal length, in time order; snapshot(i) reads one as float64 (samples, channels)."""

    spec: RecordingSpec
    format: str
    files: list[Path]
    channels: list[str]
    rate_hz: float
    snapshot_samples: int
    timestamps: np.ndarray  # datetime64[ns], one per snapshot, strictly increasing
    _file_of: list[int] = field(repr=False)  # snapshot -> file (snapshot layout)
    _stream: np.ndarray | None = field(default=None, repr=False)  # stream layout: every sample in memory
    _first: np.ndarray | None = field(default=None, repr=False)  # snapshot 0, read when the recording was opened

    def __len__(self) -> int:
        return len(self.timestamps)

    @property
    def snapshot_seconds(self) -> float:
        return self.snapshot_samples / self.rate_hz

    def snapshot(self, i: int) -> np.ndarray:
        """Snapshot i as float64 (snapshot_samples, channels); RecordingError if its file differs from the first."""
        if self._stream is not None:
            return self._stream[i * self.snapshot_samples : (i + 1) * self.snapshot_samples]
        if i == 0 and self._first is not None:
            return self._first
        path = self.files[self._file_of[i]]
        table = read_table(path, self.spec, self.format)
        check_like(path, table, self.channels, self.snapshot_samples)
        if table.time is not None:
            check_time_column(path, self.spec, table.time, table.first_line)
        return table.data

    def snapshots(self) -> Iterator[np.ndarray]:
        return (self.snapshot(i) for i in range(len(self)))


def check_like(path: Path, table: Table, channels: list[str], samples: int | None) -> None:
    """RecordingError unless a file has the first file's channel count and (snapshot layout) length."""
    if table.data.shape[1] != len(channels):
        raise RecordingError(path, f"{table.data.shape[1]} channels ({', '.join(table.names)}), expected "
                                   f"{len(channels)} like the first file (mixed channel counts)")
    if samples is not None and table.data.shape[0] != samples:
        raise RecordingError(path, f"{table.data.shape[0]} samples, expected {samples} like the first file",
                             line=table.data.shape[0] + 1 if table.data.shape[0] < samples else samples + 1)


def recording_files(spec: RecordingSpec) -> list[Path]:
    """The files of spec.path (a file, a folder's visible files, or a glob), sorted by name."""
    path = Path(spec.path)
    if any(c in spec.path for c in "*?["):
        files = [Path(p) for p in glob.glob(spec.path, recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".toml"]
    elif path.is_file():
        files = [path]
    else:
        raise RecordingError(path, "no such file or folder")
    if not files:
        raise RecordingError(path, "no recording files found")
    return sorted(files)


def file_format(spec: RecordingSpec, files: list[Path]) -> str:
    """spec.format, else the one the files' names suggest (all files alike)."""
    if spec.format:
        return spec.format
    formats = {p: guess_format(p) for p in files}
    first = formats[files[0]]
    if first is None:
        raise SpecError(f"format: cannot tell the format of {files[0]} from its name; set format to one of "
                        f"{', '.join(READERS)}")
    for p, fmt in formats.items():
        if fmt != first:
            raise RecordingError(p, f"looks like {fmt or 'an unknown format'}, the first file like {first}; "
                                    "give a glob that selects one kind of file")
    return first


def name_time(path: Path, fmt: str, regex: str = "") -> datetime:
    """The time in a file's name (the regex's first group or match, else the whole name or its stem) by strptime fmt."""
    if regex:
        m = re.search(regex, path.name)
        if m is None:
            raise RecordingError(path, f"file name {path.name!r} does not match filename_regex {regex!r}")
        texts = (m.group(1) if m.groups() else m.group(0),)
    else:
        texts = (path.name, path.stem)
    for text in texts:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    raise RecordingError(path, f"file name {path.name!r} does not match filename_format {fmt!r}")


def parse_start(spec: RecordingSpec) -> np.datetime64:
    try:
        return np.datetime64(datetime.fromisoformat(spec.start), "ns")
    except ValueError:
        raise SpecError(f"start: {spec.start!r} is not an ISO date-time such as 2024-01-31T08:00:00") from None


def check_time_column(path: Path, spec: RecordingSpec, time: np.ndarray, first_line: int = 1) -> None:
    """RecordingError unless a file's time column rises strictly, 1 / rate_hz apart."""
    ns = time.astype(np.int64).astype(np.float64) if np.issubdtype(time.dtype, np.datetime64) else time * 1e9
    step = np.diff(ns)
    if (step <= 0).any():
        row = int(np.flatnonzero(step <= 0)[0]) + 1
        what = "repeats" if step[row - 1] == 0 else "goes back from"
        raise RecordingError(path, f"time {time[row]} {what} the previous row's {time[row - 1]} "
                                   "(timestamps must be sorted and unique)", line=first_line + row,
                             column=spec.time_column)
    if len(step):
        measured = 1e9 / float(np.median(step))
        if abs(measured - spec.rate_hz) > RATE_TOLERANCE * spec.rate_hz:
            raise RecordingError(path, f"the time column is sampled at {measured:.6g} Hz, but rate_hz is "
                                       f"{spec.rate_hz:g} (wrong rate)", column=spec.time_column)


def as_datetimes(path: Path, spec: RecordingSpec, time: np.ndarray) -> np.ndarray:
    """A time column as datetime64[ns]: date-times as they are, seconds counted from spec.start."""
    if np.issubdtype(time.dtype, np.datetime64):
        return time.astype("datetime64[ns]")
    if not spec.start:
        raise SpecError(f"start: the time column {spec.time_column!r} of {path} counts seconds; set start to the "
                        "ISO date-time its 0 stands for")
    return parse_start(spec) + np.round(time * 1e9).astype("timedelta64[ns]")


def check_rate(path: Path, spec: RecordingSpec, table: Table) -> None:
    if table.rate_hz is not None and abs(table.rate_hz - spec.rate_hz) > 1e-9 * spec.rate_hz:
        raise RecordingError(path, f"the file says {table.rate_hz:g} Hz, but rate_hz is {spec.rate_hz:g} (wrong rate)")


def check_increasing(spec: RecordingSpec, files: list[Path], stamps: np.ndarray) -> None:
    """Per-snapshot times must be unique once sorted (two files of one instant are an error, not a choice)."""
    order = np.argsort(stamps, kind="stable")
    s = stamps[order]
    for k in np.flatnonzero(s[1:] == s[:-1]):
        a, b = files[order[k]], files[order[k + 1]]
        raise RecordingError(b, f"same timestamp {s[k]} as {a.name} (duplicate timestamps)")


def open_recording(spec: RecordingSpec) -> Recording:
    """The recording a spec describes, checked: the first file is read; snapshot files are read on demand."""
    check_spec(spec)
    files = recording_files(spec)
    fmt = file_format(spec, files)
    if fmt == "delimited" and (not spec.delimiter or spec.header is None):  # sniffed once, from the first file
        delimiter, header = sniff_delimited(files[0], spec.delimiter, spec.decimal)
        spec = spec.model_copy(
            update={"delimiter": delimiter, "header": header if spec.header is None else spec.header}
        )
    if spec.layout == "stream":
        return _open_stream(spec, files, fmt)
    first = read_table(files[0], spec, fmt)
    check_rate(files[0], spec, first)
    if first.time is not None:
        check_time_column(files[0], spec, first.time, first.first_line)
    n = first.data.shape[0]
    if spec.timestamps == "filename":
        stamps = np.array([name_time(p, spec.filename_format, spec.filename_regex) for p in files],
                          dtype="datetime64[ns]")
    elif spec.timestamps == "interval":
        step = spec.interval_s or n / spec.rate_hz
        stamps = parse_start(spec) + (np.arange(len(files)) * step * 1e9).astype("timedelta64[ns]")
    else:
        stamps = np.empty(len(files), dtype="datetime64[ns]")
        for k, p in enumerate(files):
            table = first if k == 0 else read_table(p, spec, fmt)
            if table.time is None:
                raise RecordingError(p, "has no time column", column=spec.time_column)
            check_time_column(p, spec, table.time, table.first_line)
            stamps[k] = as_datetimes(p, spec, table.time[:1])[0]
    check_increasing(spec, files, stamps)
    order = np.argsort(stamps, kind="stable")
    first.data.flags.writeable = False  # handed out again as snapshot 0
    return Recording(spec, fmt, [files[i] for i in order], _channel_names(spec, first), spec.rate_hz, n,
                     stamps[order], list(range(len(files))), _first=first.data if order[0] == 0 else None)


def _open_stream(spec: RecordingSpec, files: list[Path], fmt: str) -> Recording:
    """Files that continue one another (in name order), cut into snapshots of snapshot_seconds."""
    tables = []
    for p in files:
        table = read_table(p, spec, fmt)
        check_rate(p, spec, table)
        if tables:
            check_like(p, table, tables[0].names, None)
        tables.append(table)
    size = int(round(spec.snapshot_seconds * spec.rate_hz))
    data = np.concatenate([t.data for t in tables]) if len(tables) > 1 else tables[0].data
    count = data.shape[0] // size
    if count < 1:
        raise RecordingError(files[0], f"{data.shape[0]} samples in all, fewer than one snapshot of {size} "
                                       f"({spec.snapshot_seconds:g} s at {spec.rate_hz:g} Hz)")
    if spec.timestamps == "column":
        for p, t in zip(files, tables):
            if t.time is None:
                raise RecordingError(p, "has no time column", column=spec.time_column)
        time = np.concatenate([t.time for t in tables])
        check_time_column(files[0], spec, time, tables[0].first_line)
        stamps = as_datetimes(files[0], spec, time[: count * size : size])
    else:
        if spec.timestamps == "filename":
            start = name_time(files[0], spec.filename_format, spec.filename_regex)
        else:
            start = parse_start(spec)
        step = spec.interval_s or spec.snapshot_seconds
        stamps = np.datetime64(start, "ns") + (np.arange(count) * step * 1e9).astype("timedelta64[ns]")
    return Recording(spec, fmt, files, _channel_names(spec, tables[0]), spec.rate_hz, size, stamps,
                     [0] * count, _stream=data[: count * size])


def _channel_names(spec: RecordingSpec, first: Table) -> list[str]:
    if spec.channels and len(spec.channels) != len(first.names):
        raise SpecError(f"channels: {len(spec.channels)} names for the {len(first.names)} columns read "
                        f"({', '.join(first.names)})")
    return list(spec.channels) or list(first.names)
