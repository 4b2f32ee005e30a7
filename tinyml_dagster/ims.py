"""Reader for the NASA IMS bearing format: ASCII files named YYYY.MM.DD.hh.mm.ss,
20,480 tab-separated rows at 20 kHz."""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

ROWS = 20480
SAMPLE_RATE_HZ = 20000
CHANNEL_COUNTS = (8, 4)  # set 1: bearings 1-4 x and y; sets 2 and 3: one column per bearing
NAME_FORMAT = "%Y.%m.%d.%H.%M.%S"

_TAB, _LF, _MINUS, _DOT = 9, 10, 45, 46
# a cell: a plain decimal number (optional sign, digits with an optional point, optional exponent); not the
# forms only Python's float() takes (1_0.5, inf, nan, surrounding spaces)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
# the largest file worth reading: 20,480 rows of 8 cells of up to 24 characters (the real ones are ~1.1 MB)
MAX_FILE_BYTES = ROWS * 8 * 24
_POW10 = 10.0 ** np.arange(23)


class IMSFormatError(ValueError):
    """An IMS file or directory that does not follow the format; the message names the file and line."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None, column: int | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")


def file_timestamp(path: str | os.PathLike) -> datetime:
    """Timestamp encoded in an IMS file name."""
    name = Path(path).name
    try:
        if len(name) != 19:
            raise ValueError(name)
        return datetime.strptime(name, NAME_FORMAT)
    except ValueError:
        raise IMSFormatError(path, f"file name {name!r} is not a timestamp YYYY.MM.DD.hh.mm.ss") from None


def list_ims_files(directory: str | os.PathLike) -> list[Path]:
    """The IMS files of a directory sorted by time (hidden files ignored); errors on a missing or empty directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IMSFormatError(directory, "IMS directory does not exist")
    paths = [p for p in directory.iterdir() if not p.name.startswith(".")]
    if not paths:
        raise IMSFormatError(directory, "IMS directory is empty")
    stamped = sorted((file_timestamp(p), p) for p in paths)
    for (t0, p0), (t1, p1) in zip(stamped, stamped[1:]):
        if t0 == t1:
            raise IMSFormatError(p1, f"same timestamp as {p0.name}")
    return [p for _, p in stamped]


def file_timestamps(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Timestamps of IMS files as datetime64[ns]."""
    return np.array([file_timestamp(p) for p in paths], dtype="datetime64[ns]")


def read_ims_file(path: str | os.PathLike, n_channels: int | None = None) -> np.ndarray:
    """One IMS file as float64 (20480, n_channels); IMSFormatError names the file, line and column of bad input."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IMSFormatError(path, "file does not exist") from None
    if size > MAX_FILE_BYTES and path.is_file():
        raise IMSFormatError(path, f"file of {size} bytes, larger than any IMS file ({MAX_FILE_BYTES} at most)")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise IMSFormatError(path, "file does not exist") from None
    except (IsADirectoryError, PermissionError):
        if path.is_dir():
            raise IMSFormatError(path, "is a directory, not an IMS file") from None
        raise
    data = _parse_canonical(raw)
    if data is None:  # not the canonical layout: parse line by line, which also pinpoints any error
        data = _parse_lines(path, raw.tobytes())
    if data.shape[1] not in CHANNEL_COUNTS:
        raise IMSFormatError(path, f"{data.shape[1]} columns per row, expected one of {CHANNEL_COUNTS}", line=1)
    if n_channels is not None and data.shape[1] != n_channels:
        raise IMSFormatError(
            path, f"{data.shape[1]} columns per row, expected {n_channels} like the other files", line=1
        )
    if data.shape[0] > ROWS:
        raise IMSFormatError(path, f"more than {ROWS} rows", line=ROWS + 1)
    if data.shape[0] < ROWS:
        raise IMSFormatError(path, f"file ends after {data.shape[0]} rows, expected {ROWS}", line=data.shape[0] + 1)
    return data


def read_ims_files(paths: Iterable[str | os.PathLike], workers: int | None = None) -> np.ndarray:
    """Several IMS files with the same channel count as float64 (n_files, 20480, n_channels), parsed in threads."""
    paths = list(paths)
    if not paths:
        raise ValueError("no IMS file to read")
    first = read_ims_file(paths[0])
    out = np.empty((len(paths), ROWS, first.shape[1]))
    out[0] = first

    def one(i: int) -> None:
        out[i] = read_ims_file(paths[i], n_channels=first.shape[1])

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(1, len(paths))))
    return out


def _parse_canonical(raw: bytes | np.ndarray) -> np.ndarray | None:
    """Vectorised parse of fixed-point text ("-0.022\\t0.105\\n", one number of decimals throughout).

    Works on the tokens, anchored at their decimal points, and checks that the tokens, their separators and
    nothing else cover every byte; None when raw is not in that layout (the caller then parses line by line).
    """
    b = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    if len(b) == 0:
        return None
    if b[-1] != _LF:
        b = np.append(b, np.uint8(_LF))
    dots = np.flatnonzero(b == _DOT)
    n = len(dots)
    if n == 0:
        return None
    first_end = dots[0] + 1
    while first_end < len(b) and 48 <= b[first_end] <= 57:
        first_end += 1
    decimals = int(first_end - dots[0] - 1)
    if decimals == 0 or decimals > 15:
        return None
    ends = dots + (decimals + 1)
    if ends[-1] != len(b) - 1:
        return None
    sep = b[ends]
    if ((sep != _TAB) & (sep != _LF)).any():
        return None
    zero = np.uint8(48)
    ints = np.zeros(n, dtype=np.int32 if decimals <= 6 else np.int64)
    for j in range(1, decimals + 1):
        d = b[dots + j] - zero  # a non-digit wraps around above 9
        if (d > 9).any():
            return None
        ints *= 10
        ints += d
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    neg = b[starts] == _MINUS
    int_len = dots - starts - neg  # digits before the point; the tokens then cover every byte
    longest = int(int_len.max())
    if int_len.min() < 1 or longest + decimals > 15:  # beyond exact float64 integers: leave it to float()
        return None
    if longest + decimals > 9:
        ints = ints.astype(np.int64)
    scale = 10**decimals
    if longest == 1:  # the IMS files: one digit before the point
        d = b[dots - 1] - zero
        if (d > 9).any():
            return None
        ints += d.astype(ints.dtype) * scale
    else:
        for k in range(1, longest + 1):
            take = int_len >= k
            d = b[np.where(take, dots - k, 0)] - zero
            if (take & (d > 9)).any():
                return None
            ints += np.where(take, d.astype(ints.dtype) * (scale * 10 ** (k - 1)), 0)
    # digits read as an integer, over 10**decimals: the same correctly rounded float64 as float() of the
    # text, since both the integer and the power of ten are exact
    np.negative(ints, out=ints, where=neg)
    values = ints / float(scale)
    line_ends = np.flatnonzero(sep == _LF)
    n_cols = int(line_ends[0]) + 1
    if len(line_ends) * n_cols != n or (line_ends != np.arange(n_cols - 1, n, n_cols)).any():
        return None
    return values.reshape(len(line_ends), n_cols)


def _parse_lines(path: Path, raw: bytes) -> np.ndarray:
    """Line-by-line parse of any float text, raising IMSFormatError at the first bad line or cell."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise IMSFormatError(path, f"byte 0x{raw[e.start]:02x} is not ASCII", line=line) from None
    lines = text.splitlines()
    if not lines:
        raise IMSFormatError(path, f"file is empty, expected {ROWS} rows")
    rows = []
    n_cols = None
    for number, line in enumerate(lines, start=1):
        cells = line.split("\t")
        if n_cols is None:
            n_cols = len(cells)
            if n_cols not in CHANNEL_COUNTS:
                raise IMSFormatError(
                    path, f"{n_cols} tab-separated columns, expected one of {CHANNEL_COUNTS}", line=number
                )
        elif len(cells) != n_cols:
            raise IMSFormatError(path, f"{len(cells)} columns, expected {n_cols} as on line 1", line=number)
        row = []
        for column, cell in enumerate(cells, start=1):
            value = float(cell) if _NUMBER.fullmatch(cell) else math.nan
            if not math.isfinite(value):
                raise IMSFormatError(path, f"non-numeric cell {cell!r}", line=number, column=column)
            row.append(value)
        rows.append(row)
        if number > ROWS:
            raise IMSFormatError(path, f"more than {ROWS} rows", line=number)
    return np.array(rows, dtype=np.float64)
