"""`python -m tinyml_dagster.recordings inspect PATH`: sniff a recording, say what was found, draft its spec.

Every field it cannot tell from the files is a question in its output (and a QUESTION comment in the spec),
never a silent default: above all the sampling rate, which only IMS, WAV and a time column carry.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from tinyml_dagster.recordings.readers import RecordingError, guess_format, read_table, sniff_delimited
from tinyml_dagster.recordings.recording import RATE_TOLERANCE, name_time, recording_files
from tinyml_dagster.recordings.spec import IMS_NAME_FORMAT, RecordingSpec

# (regex finding a time in a file name, its strptime format), most specific first
NAME_FORMATS = (
    (r"\d{4}\.\d{2}\.\d{2}\.\d{2}\.\d{2}\.\d{2}", IMS_NAME_FORMAT),
    (r"\d{4}-\d{2}-\d{2}[T_ ]\d{2}[-:]\d{2}[-:]\d{2}[._]\d{1,6}", None),
    (r"\d{4}-\d{2}-\d{2}[T_ ]\d{2}[-:]\d{2}[-:]\d{2}", None),
    (r"\d{8}[T_]\d{6}[._]\d{1,6}", None),
    (r"\d{8}[T_]\d{6}", None),
    (r"\d{4}-\d{2}-\d{2}_\d{6}", "%Y-%m-%d_%H%M%S"),
    (r"\d{14}", "%Y%m%d%H%M%S"),
)
TIME_NAMES = re.compile(r"^(t|time|times|time_s|time\[s\]|timestamp|date|datetime|seconds|sec|s)$", re.I)
INDEX_NAMES = re.compile(r"^(|index|idx|sample|samples|n|no|nr|row|unnamed: 0)$", re.I)
RATE_NAMES = re.compile(r"^(fs|sr|sample_?rate|sampling_?rate|rate_?hz)$", re.I)
STREAM_SECONDS = 10.0  # one file longer than this is taken for a stream to cut into snapshots


@dataclass
class Finding:
    """What inspect found: the spec fields it could tell, the facts, and its questions."""

    fields: dict
    facts: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)


def inspect_path(path: str | os.PathLike) -> Finding:
    """Sniff a file, folder or glob; never raises on a guess it cannot make (it asks instead)."""
    text = str(path)
    files = recording_files(RecordingSpec(path=text))
    kinds = Counter(guess_format(p) for p in files)
    fmt, _ = kinds.most_common(1)[0]
    f = Finding({"path": text})
    if fmt is None:
        f.questions.append(f"format: none of {files[0].name}, ... has a known extension; which of ims, delimited, "
                           "parquet, wav, npy, npz, mat is it?")
        return f
    chosen = [p for p in files if guess_format(p) == fmt]
    if len(chosen) < len(files):
        others = sorted({p.suffix or p.name for p in files if guess_format(p) != fmt})
        f.fields["path"] = (
            str(Path(text) / f"*{chosen[0].suffix}") if Path(text).is_dir() and chosen[0].suffix else text
        )
        f.questions.append(f"path: {len(files) - len(chosen)} other files ({', '.join(others)}) are left out; "
                           "is the recording only the " + fmt + " files?")
    f.fields["format"] = fmt
    f.facts.append(f"format: {fmt} ({len(chosen)} file{'s' * (len(chosen) > 1)})")
    probe = RecordingSpec(path=text)
    if fmt == "delimited":
        delimiter, header = sniff_delimited(chosen[0])
        decimal = "," if delimiter == ";" and _has_decimal_comma(chosen[0]) else "."
        f.fields.update(delimiter=delimiter, header=header, decimal=decimal)
        probe = probe.model_copy(update={"delimiter": delimiter, "header": header, "decimal": decimal})
        f.facts.append(f"delimiter {delimiter!r}, {'a header line' if header else 'no header'}, "
                       f"decimal mark {decimal!r}")
    dated = _datetime_column(chosen[0], fmt, probe)
    if dated:  # date-times are a time column, never a channel
        probe = probe.model_copy(update={"time_column": dated})
    try:
        table = read_table(chosen[0], probe, fmt)
    except RecordingError as e:
        f.questions.append(f"the first file does not read as {fmt}: {e}")
        return f
    names = list(table.names)
    rate = table.rate_hz
    time_col = _time_column(table, names) if fmt in ("delimited", "parquet") and not dated else None
    if dated:
        f.fields["time_column"] = dated
        t = table.time.astype(np.int64) / 1e9
        measured = _rate_of(t)
        rate = rate or measured
        f.facts.append(f"column {dated!r} holds date-times: {measured:.6g} Hz, from {table.time[0]}; "
                       "it is not a channel")
        f.questions.append(f"rate_hz: {measured:g} Hz is measured from the time column {dated!r}; is that the rate?")
    if time_col is not None:
        name = names[time_col]
        f.fields["time_column"] = name
        t = table.data[:, time_col]
        measured = _rate_of(t)
        rate = rate or measured
        f.facts.append(f"column {name!r} looks like time in seconds: {measured:.6g} Hz; it is not a channel")
        f.questions.append(f"rate_hz: {measured:g} Hz is measured from the time column {name!r}; is that the rate?")
    skipped = [i for i in _index_columns(table, names) if i != time_col]
    for i in skipped:
        f.facts.append(f"column {names[i]!r} counts rows (an index): not a channel")
    keep = [i for i in range(len(names)) if i != time_col and i not in skipped]
    if keep != list(range(len(names))):
        f.fields["columns"] = [names[i] if fmt != "delimited" or table.first_line > 1 else str(i) for i in keep]
    channels = [names[i] for i in keep]
    names_of_channels = channels
    if fmt in ("mat", "npz"):
        f.fields["columns"] = channels
        last = _variables(chosen[-1], fmt)
        if len(chosen) > 1 and not set(channels) <= set(last):  # e.g. X097_DE_time, X098_DE_time: numbers vary
            patterns = [re.sub(r"\d+", "*", c) for c in channels]
            first = _variables(chosen[0], fmt)
            if all(len(fnmatch.filter(v, p)) == 1 for p in patterns for v in (first, last)):
                f.fields["columns"] = patterns
                names_of_channels = [p.replace("*", "").strip("_") for p in patterns]
                f.facts.append(f"variable names vary with the file: read as {', '.join(patterns)}")
            else:
                f.questions.append(f"columns: {chosen[-1].name} has no {', '.join(channels)}; which variables "
                                   "are the channels in every file (names or patterns such as '*_DE_time')?")
        others = _other_variables(chosen[0], fmt, channels)
        if others:
            f.facts.append(f"variables left out (not as long as the channels): {', '.join(others)}")
            rate_var = [v for v in others if RATE_NAMES.match(v)]
            if rate_var:
                f.questions.append(f"rate_hz: is variable {rate_var[0]!r} the sampling rate?")
            rpm = [v for v in others if "rpm" in v.lower()]
            if rpm:
                f.questions.append(f"shaft_hz: variable {rpm[0]!r} looks like the shaft speed in rpm; "
                                   "shaft_hz = rpm / 60?")
    samples = table.data.shape[0]
    f.facts.append(f"channels: {len(channels)} ({', '.join(channels)}); {samples} samples in the first file")
    f.fields["channels"] = [_clean(c) for c in names_of_channels]
    if fmt == "ims" and len(channels) == 8:
        f.fields["monitor"] = [f"b{b}x+b{b}y" for b in range(1, 5)]
        f.facts.append("IMS set 1 layout: bearings 1-4, an x and a y channel each")
    elif len(channels) > 1:
        f.fields["monitor"] = list(f.fields["channels"])
        f.questions.append("monitor: every channel is monitored on its own; join the axes of one bearing with '+' "
                           "(e.g. 'b1x+b1y') or drop channels that are not vibration")
    if rate:
        f.fields["rate_hz"] = float(rate)
        source = {"ims": "the IMS format", "wav": "the WAV header"}.get(fmt, "the time column")
        f.facts.append(f"rate: {rate:g} Hz (from {source}); snapshot length {samples / rate:.4g} s")
    else:
        f.fields["rate_hz"] = 0.0
        is_cwru = any(re.match(r"X\d+_(DE|FE|BA)_time$", c) for c in channels)
        cwru = " (Case Western Reserve files: 12000 or 48000)" if is_cwru else ""
        f.questions.append(f"rate_hz: what is the sampling rate in Hz? The files do not say{cwru} "
                           "(required; never assumed)")
    if len(chosen) == 1 and (not rate or samples / rate > STREAM_SECONDS):
        f.fields["layout"] = "stream"
        f.fields["snapshot_seconds"] = 1.0
        f.questions.append("snapshot_seconds: one long file is read as a stream cut into snapshots; "
                           "1 s each is a guess: how long should a snapshot be?")
    _timestamps(f, chosen, table, time_col, rate)
    f.questions.append("shaft_hz, bearing_elements, element_diameter_mm, pitch_diameter_mm, contact_angle_deg: "
                       "the machine's facts, if known (optional)")
    return f


def _clean(name: str) -> str:
    """A channel name fit for partition keys and file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "ch"


def _has_decimal_comma(path: Path) -> bool:
    with open(path, errors="replace") as fh:
        lines = [fh.readline() for _ in range(5)]
    return any(re.search(r"\d,\d", line) for line in lines[1:])


def _time_column(table, names: list[str]) -> int | None:
    """A column named like time, or the first column if it rises in even steps (seconds)."""
    for i, n in enumerate(names):
        if TIME_NAMES.match(n.strip()) and _even_steps(table.data[:, i]):
            return i
    return 0 if len(names) > 1 and _even_steps(table.data[:, 0]) and table.data[0, 0] >= 0 \
        and np.median(np.diff(table.data[:, 0])) < 0.1 else None


def dated_times(table) -> bool:
    return table.time is not None and np.issubdtype(table.time.dtype, np.datetime64)


def _datetime_column(path: Path, fmt: str, probe: RecordingSpec) -> str | None:
    """The first column pyarrow reads as date-times (delimited text, Parquet), if any."""
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
        elif fmt == "delimited":
            import pyarrow.csv as pc

            with pc.open_csv(path, read_options=pc.ReadOptions(autogenerate_column_names=not probe.header),
                             parse_options=pc.ParseOptions(delimiter=probe.delimiter),
                             convert_options=pc.ConvertOptions(decimal_point=probe.decimal)) as reader:
                schema = reader.schema
        else:
            return None
    except (pa.ArrowInvalid, OSError):
        return None
    names = [n if probe.header or fmt == "parquet" else n[1:] for n in schema.names]
    return next((n for n, t in zip(names, schema.types) if pa.types.is_timestamp(t)), None)


def _rate_of(t: np.ndarray) -> float:
    """Samples per second of a time column over its whole span; a whole number when within 0.01% of one
    (times printed with few digits put a single step's error in the 4th digit)."""
    rate = (len(t) - 1) / float(t[-1] - t[0])
    return float(round(rate)) if abs(rate - round(rate)) <= 1e-4 * rate else float(f"{rate:.6g}")


def _even_steps(x: np.ndarray) -> bool:
    if len(x) < 3:
        return False
    d = np.diff(x)
    return bool((d > 0).all() and np.ptp(d) <= RATE_TOLERANCE * np.median(d) + 1e-12)


def _index_columns(table, names: list[str]) -> list[int]:
    out = []
    for i, n in enumerate(names):
        x = table.data[:, i]
        if INDEX_NAMES.match(n.strip()) and len(x) > 2 and (np.diff(x) == 1).all():
            out.append(i)
    return out


def _other_variables(path: Path, fmt: str, channels: list[str]) -> list[str]:
    return [n for n in _variables(path, fmt) if n not in channels]


def _variables(path: Path, fmt: str) -> list[str]:
    """The variable names of an .npz or .mat file."""
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    from tinyml_dagster.recordings.readers import is_mat73

    if is_mat73(path):
        import h5py

        with h5py.File(path, "r") as h:
            return [n for n in h if not n.startswith("#")]
    import scipy.io

    return [n for n, _, _ in scipy.io.whosmat(path)]


def _timestamps(f: Finding, files: list[Path], table, time_col: int | None, rate: float | None) -> None:
    """Timestamps from the names if one format fits them all, else a time column, else questions."""
    for regex, fmt in NAME_FORMATS:
        m = re.search(regex, files[0].name)
        if m is None:
            continue
        fmt = fmt or _strptime_format(m.group(0))
        whole = m.group(0) in (files[0].name, files[0].stem) and regex == NAME_FORMATS[0][0]
        try:
            stamps = sorted(name_time(p, fmt, "" if whole else regex) for p in files)
        except RecordingError:
            continue
        if len(set(stamps)) < len(stamps):
            continue
        f.fields.update(timestamps="filename", filename_format=fmt)
        if not whole:
            f.fields["filename_regex"] = regex
        _span(f, stamps, len(files))
        return
    if dated_times(table):
        f.fields["timestamps"] = "column"
        return
    if time_col is not None and f.fields.get("layout") == "stream":
        f.fields["timestamps"] = "column"
        f.fields["start"] = ""
        f.questions.append(f"start: the time column {f.fields['time_column']!r} counts seconds; "
                           "at what ISO date-time is its 0 (e.g. 2024-01-31T08:00:00)?")
        return
    f.fields.update(timestamps="interval", start="", interval_s=0.0)
    f.questions.append("start: the file names carry no time; when was the first snapshot taken (ISO date-time)?")
    if f.fields.get("layout") != "stream":
        f.questions.append(f"interval_s: how many seconds apart are the {len(files)} snapshots "
                           "(0: back to back, each snapshot's own length)?")


def _strptime_format(text: str) -> str:
    """The strptime format of a date-time text as the regexes above find it (separators kept)."""
    out, fields, k = [], ["%Y", "%m", "%d", "%H", "%M", "%S", "%f"], 0
    for run in re.finditer(r"\d+|\D+", text):
        part = run.group(0)
        if not part.isdigit():
            out.append(part.replace("%", "%%"))
            continue
        if fields[k] == "%Y" and len(part) >= 8:  # 20031022 or 20031022120624
            out.append("%Y%m%d" if len(part) == 8 else "%Y%m%d%H%M%S")
            k += 3 if len(part) == 8 else 6
        elif fields[k] == "%H" and len(part) == 6:
            out.append("%H%M%S")
            k += 3
        else:
            out.append(fields[k])
            k += 1
    return "".join(out)


def _span(f: Finding, stamps: list[datetime], count: int) -> None:
    days = (stamps[-1] - stamps[0]).total_seconds() / 86400
    f.facts.append(f"timestamps from the file names: {count} snapshots, {stamps[0]} .. {stamps[-1]} ({days:.2f} days)")


def spec_text(f: Finding, spec_dir: Path) -> str:
    """The drafted spec as TOML, its questions as comments on top; path relative to the spec's folder."""
    import tomli_w

    fields = dict(f.fields)
    target = Path(fields["path"]).resolve() if not any(c in fields["path"] for c in "*?[") else None
    if target is not None:
        fields["path"] = os.path.relpath(target, spec_dir.resolve())
    elif not Path(fields["path"]).is_absolute():
        fields["path"] = os.path.relpath(Path(fields["path"]).absolute(), spec_dir.resolve())
    head = ["# Recording spec drafted by `python -m tinyml_dagster.recordings inspect`."]
    head += [f"# QUESTION: {q}" for q in f.questions]
    return "\n".join(head) + "\n\n" + tomli_w.dumps({"recording": fields})


def report(f: Finding) -> str:
    lines = ["found:"] + [f"  {x}" for x in f.facts]
    if f.questions:
        lines += ["questions (answer them in the spec):"] + [f"  ? {q}" for q in f.questions]
    return "\n".join(lines)
