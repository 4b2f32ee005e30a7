"""One reader per file format, each returning a file's samples as float64 (samples, channels) with their names."""

from __future__ import annotations

import csv
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyml_dagster import ims
from tinyml_dagster.recordings.spec import RecordingSpec

WAV_SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")
EXTENSIONS = {
    ".csv": "delimited", ".txt": "delimited", ".tsv": "delimited", ".dat": "delimited",
    ".parquet": "parquet", ".pq": "parquet", ".wav": "wav", ".npy": "npy", ".npz": "npz", ".mat": "mat",
}


class RecordingError(ims.IMSFormatError):
    """A recording file that cannot be read as specified; the message names the file, line and column or variable."""


@dataclass
class Table:
    """A file's chosen channels: data (samples, channels), their names, the file's own rate and time column."""

    data: np.ndarray
    names: list[str]
    rate_hz: float | None = None
    time: np.ndarray | None = None  # seconds (float64) or datetime64[ns], one per sample
    first_line: int = 1  # line (text) or row number of the first sample


def guess_format(path: Path) -> str | None:
    """The format a file's name suggests: its extension, or an IMS timestamp name."""
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        try:
            ims.file_timestamp(path)
            fmt = "ims"
        except ims.IMSFormatError:
            pass
    return fmt


def read_table(path: Path, spec: RecordingSpec, fmt: str) -> Table:
    """The spec's columns of one file, scaled, finite, as float64 (samples, channels)."""
    table = READERS[fmt](Path(path), spec)
    if table.data.ndim != 2 or table.data.shape[0] == 0:
        raise RecordingError(path, "holds no samples")
    bad = ~np.isfinite(table.data)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise RecordingError(path, f"sample {table.data[row, col]} is not a finite number",
                             line=table.first_line + int(row), column=table.names[col])
    if spec.scale != 1.0:
        table.data *= spec.scale
    return table


def pick(names: list[str], wanted: list[str], path: Path, what: str = "column", skip: str = "") -> list[int]:
    """Indices of the wanted names, 0-based indices or glob patterns (each must match exactly one);
    all but skip when empty."""
    if not wanted:
        return [i for i, n in enumerate(names) if n != skip and str(i) != skip]
    out = []
    for w in wanted:
        if w.isdigit():
            if int(w) >= len(names):
                raise RecordingError(
                    path, f"{what} index {w} is missing: the file has {len(names)} ({', '.join(names)})"
                )
            out.append(int(w))
            continue
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, w)]
        if len(hits) != 1:
            found = "no" if not hits else f"{len(hits)} ({', '.join(names[i] for i in hits)})"
            raise RecordingError(path, f"{what} {w!r} matches {found} of {', '.join(names)}; expected exactly one",
                                 column=w)
        out.append(hits[0])
    return out


# -- IMS ASCII: the project's vectorised parser ---------------------------------------------------------------

def ims_channel_names(n_channels: int) -> list[str]:
    """IMS set 1 has an x and y channel per bearing, sets 2-3 one channel per bearing."""
    if n_channels == 8:
        return [f"b{b}{a}" for b in range(1, 5) for a in "xy"]
    return [f"b{b}" for b in range(1, n_channels + 1)]


def read_ims(path: Path, spec: RecordingSpec) -> Table:
    try:
        data = ims.read_ims_file(path)
    except ims.IMSFormatError as e:
        raise RecordingError(path, str(e).split(": ", 1)[-1], line=e.line, column=e.column) from None
    names = ims_channel_names(data.shape[1])
    cols = pick(names, spec.columns, path)
    return Table(data if cols == list(range(len(names))) else data[:, cols], [names[i] for i in cols],
                 rate_hz=float(ims.SAMPLE_RATE_HZ))


# -- delimited text: pyarrow.csv -----------------------------------------------------------------------------

def sniff_delimited(path: Path, delimiter: str = "", decimal: str = ".") -> tuple[str, bool]:
    """(delimiter, header) of a text file from its first lines: the delimiter csv.Sniffer finds,
    a header if any cell is not a number."""
    with open(path, newline="", errors="replace") as f:
        head = [f.readline() for _ in range(5)]
    sample = "".join(head)
    if not delimiter:
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t| ").delimiter
        except csv.Error:
            delimiter = ","  # one column: any delimiter reads it
    first = head[0].rstrip("\r\n").split(delimiter)
    return delimiter, not all(_is_number(c, decimal) for c in first)


def _is_number(cell: str, decimal: str = ".") -> bool:
    try:
        float(cell.strip().replace(decimal, ".") if decimal != "." else cell)
        return True
    except ValueError:
        return False


def read_delimited(path: Path, spec: RecordingSpec) -> Table:
    import pyarrow as pa
    import pyarrow.csv as pc

    if spec.delimiter and spec.header is not None:
        delimiter, header = spec.delimiter, spec.header
    else:
        delimiter, header = sniff_delimited(path, spec.delimiter, spec.decimal)
        header = header if spec.header is None else spec.header
    read = pc.ReadOptions(autogenerate_column_names=not header)
    parse = pc.ParseOptions(delimiter=delimiter)
    wanted = [*spec.columns, *([spec.time_column] if spec.time_column else [])]
    plain = spec.columns and all((w.isdigit() != header) and not any(c in w for c in "*?[") for w in wanted)
    include = [w if header else f"f{w}" for w in wanted] if plain else []  # convert only the columns asked for
    try:
        try:
            table = pc.read_csv(path, read_options=read, parse_options=parse,
                                convert_options=pc.ConvertOptions(decimal_point=spec.decimal, include_columns=include))
        except (KeyError, pa.ArrowInvalid):
            if not include:
                raise
            table = pc.read_csv(path, read_options=read, parse_options=parse,  # names the missing column below
                                convert_options=pc.ConvertOptions(decimal_point=spec.decimal))
    except FileNotFoundError:
        raise RecordingError(path, "file does not exist") from None
    except pa.ArrowInvalid as e:
        raise _locate_ragged(path, delimiter, header, str(e)) from None
    names = table.column_names if header else [n[1:] for n in table.column_names]  # f0, f1, ...: 0, 1, ...
    included = bool(include) and table.num_columns == len(include)  # the table holds the wanted columns, in order
    cols = list(range(len(spec.columns))) if included else pick(names, spec.columns, path, skip=spec.time_column)
    data = np.empty((table.num_rows, len(cols)))
    for j, i in enumerate(cols):
        column = table.column(i)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)) or column.null_count:
            raise _locate_cell(path, column, names[i], header, "a number")
        data[:, j] = column.to_numpy()
    time = None
    if spec.time_column:
        at = len(spec.columns) if included else pick(names, [spec.time_column], path, "time column")[0]
        column = table.column(at)
        time = _time_values(path, column, spec.time_column, header)
    return Table(data, [names[i] for i in cols], time=time, first_line=1 + header)


def _time_values(path: Path, column, name: str, header: bool) -> np.ndarray:
    """A time column as float seconds or datetime64[ns]."""
    import pyarrow as pa

    if column.null_count:
        raise _locate_cell(path, column, name, header, "a time")
    if pa.types.is_timestamp(column.type):
        return column.to_numpy().astype("datetime64[ns]")
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return column.to_numpy().astype(np.float64)
    raise _locate_cell(path, column, name, header, "a number of seconds or an ISO date-time")


def _locate_cell(path: Path, column, name: str, header: bool, expected: str) -> RecordingError:
    """The first cell of a column that is not what was expected, with its line."""
    values = column.to_pylist()
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not _is_number(value)):
            return RecordingError(path, f"{value!r} is not {expected}", line=row + 1 + header, column=name)
    return RecordingError(path, f"values of type {column.type} are not {expected}", column=name)


def _locate_ragged(path: Path, delimiter: str, header: bool, message: str) -> RecordingError:
    """The first line whose number of cells differs from the first line's (pyarrow names the row's text only)."""
    with open(path, newline="", errors="replace") as f:
        rows = csv.reader(f, delimiter=delimiter)
        width = None
        for line, cells in enumerate(rows, start=1):
            if not cells:
                continue
            width = width or len(cells)
            if len(cells) != width:
                return RecordingError(
                    path, f"{len(cells)} cells, expected {width} as on line 1 (ragged rows)", line=line
                )
    return RecordingError(path, message)


# -- Parquet: pyarrow ------------------------------------------------------------------------------------------

def read_parquet(path: Path, spec: RecordingSpec) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except FileNotFoundError:
        raise RecordingError(path, "file does not exist") from None
    except pa.ArrowInvalid as e:
        raise RecordingError(path, f"not a Parquet file ({e})") from None
    cols = pick(names, spec.columns, path, skip=spec.time_column)
    wanted = [names[i] for i in cols]
    time_name = names[pick(names, [spec.time_column], path, "time column")[0]] if spec.time_column else None
    table = pq.read_table(path, columns=wanted + ([time_name] if time_name else []))
    data = np.empty((table.num_rows, len(cols)))
    for j, name in enumerate(wanted):
        column = table.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)) or column.null_count:
            raise _locate_cell(path, column, name, False, "a number")
        data[:, j] = column.to_numpy()
    time = _time_values(path, table.column(time_name), time_name, False) if time_name else None
    return Table(data, wanted, time=time)


# -- WAV: soundfile (libsndfile) ---------------------------------------------------------------------------------

def read_wav(path: Path, spec: RecordingSpec) -> Table:
    import soundfile

    try:
        info = soundfile.info(str(path))
    except soundfile.LibsndfileError as e:
        raise RecordingError(path, f"not a readable WAV file ({e})") from None
    if info.subtype not in WAV_SUBTYPES:
        raise RecordingError(path, f"sample format {info.subtype} ({info.subtype_info}) is not supported; "
                                   f"expected one of {', '.join(WAV_SUBTYPES)}")
    data, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    names = [f"ch{i}" for i in range(data.shape[1])]
    cols = pick(names, spec.columns, path)
    return Table(data[:, cols], [names[i] for i in cols], rate_hz=float(rate))


# -- NumPy and MATLAB: arrays picked by variable name ------------------------------------------------------------

def _orient(path: Path, name: str, array: np.ndarray, samples_axis: int) -> np.ndarray:
    """A variable as (samples, channels): 1-D is one channel; 2-D has its samples along samples_axis."""
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise RecordingError(path, f"holds {array.dtype}, expected real numbers", column=name)
    if array.ndim == 1:
        return np.asarray(array, dtype=np.float64)[:, None]
    if array.ndim != 2:
        raise RecordingError(path, f"has shape {array.shape}, expected 1-D or 2-D", column=name)
    return np.asarray(array if samples_axis == 0 else array.T, dtype=np.float64)


def _stack_variables(path: Path, arrays: dict[str, np.ndarray], samples_axis: int, chosen: list[str] | None) -> Table:
    """The chosen variables side by side as channels (default: every variable with the most samples, so that a
    scalar such as an RPM is not a channel); every one must have the same number of samples."""
    names = list(arrays)
    if chosen is None:
        lengths = {n: _orient(path, n, np.asarray(arrays[n]), samples_axis).shape[0] for n in names
                   if np.issubdtype(np.asarray(arrays[n]).dtype, np.number) and np.asarray(arrays[n]).ndim in (1, 2)}
        chosen = [n for n in lengths if lengths[n] == max(lengths.values()) and lengths[n] > 1]
    if not chosen:
        raise RecordingError(path, "holds no numeric variable with more than one sample")
    parts, out_names = [], []
    for name in chosen:
        x = _orient(path, name, np.asarray(arrays[name]), samples_axis)
        if parts and x.shape[0] != parts[0].shape[0]:
            raise RecordingError(path, f"has {x.shape[0]} samples, expected {parts[0].shape[0]} like {chosen[0]}",
                                 column=name)
        parts.append(x)
        out_names += [name] if x.shape[1] == 1 else [f"{name}[{k}]" for k in range(x.shape[1])]
    return Table(parts[0] if len(parts) == 1 else np.hstack(parts), out_names)


def read_npy(path: Path, spec: RecordingSpec) -> Table:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise RecordingError(path, "file does not exist") from None
    except ValueError as e:
        raise RecordingError(path, f"not a NumPy .npy array ({e})") from None
    x = _orient(path, "array", array, spec.samples_axis)
    names = [f"ch{i}" for i in range(x.shape[1])]
    cols = pick(names, spec.columns, path)
    return Table(x if cols == list(range(x.shape[1])) else x[:, cols], [names[i] for i in cols])


def read_npz(path: Path, spec: RecordingSpec) -> Table:
    try:
        with np.load(path, allow_pickle=False) as z:
            chosen = [z.files[i] for i in pick(z.files, spec.columns, path, "variable")] if spec.columns else None
            return _stack_variables(path, {n: z[n] for n in (chosen or z.files)}, spec.samples_axis, chosen)
    except FileNotFoundError:
        raise RecordingError(path, "file does not exist") from None
    except (ValueError, OSError) as e:
        if isinstance(e, RecordingError):
            raise
        raise RecordingError(path, f"not a NumPy .npz archive ({e})") from None


def is_mat73(path: Path) -> bool:
    """MATLAB v7.3 files are HDF5 (their header says 'MATLAB 7.3')."""
    import h5py

    return h5py.is_hdf5(path)


def read_mat(path: Path, spec: RecordingSpec) -> Table:
    import scipy.io

    if not path.exists():
        raise RecordingError(path, "file does not exist")
    if is_mat73(path):
        return _read_mat73(path, spec)
    try:
        names = [n for n, _, _ in scipy.io.whosmat(path)]
    except (ValueError, TypeError, OSError) as e:
        raise RecordingError(path, f"not a MATLAB .mat file ({e})") from None
    chosen = [names[i] for i in pick(names, spec.columns, path, "variable")] if spec.columns else None
    arrays = scipy.io.loadmat(path, variable_names=chosen or names)
    return _stack_variables(path, {n: _squeeze_column(arrays[n]) for n in chosen or names}, spec.samples_axis, chosen)


def _squeeze_column(array: np.ndarray) -> np.ndarray:
    """MATLAB vectors are (n, 1) or (1, n) matrices: one channel of n samples."""
    return array.ravel() if array.ndim == 2 and 1 in array.shape else array


def _read_mat73(path: Path, spec: RecordingSpec) -> Table:
    import h5py

    with h5py.File(path, "r") as f:
        names = [n for n, v in f.items() if isinstance(v, h5py.Dataset)]
        chosen = [names[i] for i in pick(names, spec.columns, path, "variable")] if spec.columns else None
        # HDF5 holds MATLAB's column-major arrays transposed: .T gives MATLAB's (rows, columns)
        arrays = {n: _squeeze_column(f[n][()].T) for n in chosen or names}
    return _stack_variables(path, arrays, spec.samples_axis, chosen)


READERS = {
    "ims": read_ims, "delimited": read_delimited, "parquet": read_parquet, "wav": read_wav,
    "npy": read_npy, "npz": read_npz, "mat": read_mat,
}
