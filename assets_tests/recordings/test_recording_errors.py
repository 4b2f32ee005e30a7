"""Bad recordings: every error names the file, the line or row, the column or variable, and what was expected."""

from pathlib import Path

import numpy as np
import pytest

from tinyml_dagster.recordings import RecordingError, RecordingSpec, SpecError, open_recording
from tinyml_dagster.recordings.writers import make_signal, write_snapshot

RATE = 25600.0
X = make_signal(n_snapshots=2, samples=256)


def spec(path, **fields) -> RecordingSpec:
    return RecordingSpec(path=str(path), rate_hz=fields.pop("rate_hz", RATE), **fields)


def csv_lines(tmp_path: Path, lines: list[str], name="2024.05.01.10.00.00.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def read_all(s: RecordingSpec):
    rec = open_recording(s)
    return [rec.snapshot(i) for i in range(len(rec))]


def test_wav_at_another_rate(tmp_path):
    path = write_snapshot(tmp_path / "2024.05.01.10.00.00", "wav_float", X[0], 48000)
    with pytest.raises(RecordingError, match=r"says 48000 Hz, but rate_hz is 25600 \(wrong rate\)") as e:
        open_recording(spec(path))
    assert e.value.path == str(path)


def test_time_column_at_another_rate(tmp_path):
    path = write_snapshot(tmp_path / "2024.05.01.10.00.00", "csv", X[0], 12800)
    with pytest.raises(
        RecordingError, match=r"column time_s: the time column is sampled at 12800 Hz, but rate_hz is 25600"
    ):
        open_recording(spec(path, time_column="time_s"))


def test_ragged_row_names_its_line(tmp_path):
    path = csv_lines(tmp_path, ["a,b", "1,2", "3,4", "5", "6,7"])
    with pytest.raises(RecordingError, match=r"line 4: 1 cells, expected 2 as on line 1 \(ragged rows\)"):
        open_recording(spec(path))


def test_non_numeric_cell_names_line_and_column(tmp_path):
    path = csv_lines(tmp_path, ["a,b", "1,2", "3,x", "5,6"])
    with pytest.raises(RecordingError, match=r"line 3, column b: 'x' is not a number") as e:
        open_recording(spec(path))
    assert (e.value.line, e.value.column) == (3, "b")


def test_missing_cell_and_nan(tmp_path):
    with pytest.raises(RecordingError, match=r"line 3, column b: None is not a number"):
        open_recording(spec(csv_lines(tmp_path, ["a,b", "1,2", "3,", "5,6"])))
    np.save(tmp_path / "nan.npy", np.array([[1.0, 2.0], [3.0, np.nan]]))
    with pytest.raises(RecordingError, match=r"line 2, column ch1: sample nan is not a finite number"):
        open_recording(spec(tmp_path / "nan.npy", layout="stream", snapshot_seconds=1 / RATE,
                            timestamps="interval", start="2024-05-01T10:00:00"))


@pytest.mark.parametrize("kind", ["mat5", "mat73", "npz"])
def test_missing_variable_lists_the_file_s_variables(tmp_path, kind):
    path = write_snapshot(tmp_path / "2024.05.01.10.00.00", kind, X[0], RATE)
    with pytest.raises(RecordingError, match=r"column \*_BA_time: variable '\*_BA_time' matches no of "
                                             r".*X097_DE_time.*; expected exactly one"):
        open_recording(spec(path, columns=["*_DE_time", "*_BA_time"]))
    with pytest.raises(RecordingError, match=r"matches 2 \(X097_DE_time, X097_FE_time\)"):
        open_recording(spec(path, columns=["X097_*_time"]))


def test_missing_column(tmp_path):
    path = write_snapshot(tmp_path / "2024.05.01.10.00.00", "parquet", X[0], RATE)
    with pytest.raises(RecordingError, match=r"column 'BA' matches no of DE, FE"):
        open_recording(spec(path, columns=["DE", "BA"]))


def test_unsupported_wav_sample_format(tmp_path):
    import soundfile

    path = tmp_path / "2024.05.01.10.00.00.wav"
    soundfile.write(str(path), X[0], int(RATE), subtype="ULAW")
    with pytest.raises(RecordingError, match=r"sample format ULAW .* is not supported; expected one of PCM_16"):
        open_recording(spec(path))


def test_mixed_channel_counts_name_the_odd_file(tmp_path):
    write_snapshot(tmp_path / "2024.05.01.10.00.00", "npy", X[0], RATE)
    odd = write_snapshot(tmp_path / "2024.05.01.10.01.00", "npy", np.hstack([X[1], X[1][:, :1]]), RATE)
    rec = open_recording(spec(tmp_path))
    with pytest.raises(RecordingError, match=r"3 channels \(ch0, ch1, ch2\), expected 2 like the first file "
                                             r"\(mixed channel counts\)") as e:
        rec.snapshot(1)
    assert e.value.path == str(odd)


def test_short_snapshot_names_its_end(tmp_path):
    write_snapshot(tmp_path / "2024.05.01.10.00.00", "npy", X[0], RATE)
    write_snapshot(tmp_path / "2024.05.01.10.01.00", "npy", X[1][:200], RATE)
    with pytest.raises(RecordingError, match=r"line 201: 200 samples, expected 256 like the first file"):
        read_all(spec(tmp_path))


def test_duplicate_file_timestamps_name_both_files(tmp_path):
    write_snapshot(tmp_path / "2024.05.01.10.00.00", "npy", X[0], RATE)
    write_snapshot(tmp_path / "2024.5.1.10.0.0", "npy", X[1], RATE)  # strptime reads both as the same instant
    with pytest.raises(RecordingError, match=r"2024.5.1.10.0.0.npy: same timestamp 2024-05-01T10:00:00.* as "
                                             r"2024.05.01.10.00.00.npy \(duplicate timestamps\)"):
        open_recording(spec(tmp_path))


@pytest.mark.parametrize("times, message", [
    ([0.0, 0.001, 0.0005, 0.002], r"line 4, column time: time .* goes back from the previous row's"),
    ([0.0, 0.001, 0.001, 0.002], r"line 4, column time: time .* repeats the previous row's"),
])
def test_unsorted_or_duplicate_time_column(tmp_path, times, message):
    path = csv_lines(tmp_path, ["time,a"] + [f"{t},{k}" for k, t in enumerate(times)])
    with pytest.raises(RecordingError, match=message):
        open_recording(spec(path, rate_hz=1000, timestamps="column", time_column="time", start="2024-05-01T10:00:00"))


def test_file_name_that_is_not_a_timestamp(tmp_path):
    write_snapshot(tmp_path / "2024.05.01.10.00.00", "npy", X[0], RATE)
    write_snapshot(tmp_path / "notes", "npy", X[1], RATE)
    with pytest.raises(RecordingError, match=r"notes.npy: file name 'notes.npy' does not match filename_format"):
        open_recording(spec(tmp_path))


def test_numeric_time_column_needs_a_start(tmp_path):
    path = write_snapshot(tmp_path / "run", "csv", X[0], RATE)
    with pytest.raises(SpecError, match="start: the time column 'time_s' of .* counts seconds"):
        open_recording(spec(path, timestamps="column", time_column="time_s"))


def test_folder_of_unknown_files_asks_for_the_format(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * 16)
    with pytest.raises(SpecError, match="format: cannot tell the format of .*a.bin"):
        open_recording(spec(tmp_path))
    with pytest.raises(RecordingError, match="no such file or folder"):
        open_recording(spec(tmp_path / "missing"))
