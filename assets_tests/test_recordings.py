"""Recordings: the same signal written in every format reads back the same through each reader; one real IMS file too."""

from pathlib import Path

import numpy as np
import pytest

from tinyml_dagster import ims
from tinyml_dagster.recordings import RecordingSpec, open_recording
from tinyml_dagster.recordings.writers import FORMATS, make_signal, spec_fields, tolerance, write_snapshot

RATE = 25600.0
IMS_FILE = Path(__file__).parent / "fixtures" / "ims" / "1st_test" / "2003.10.22.12.06.24"


def write_folder(folder: Path, kind: str, signal: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, x in enumerate(signal):
        write_snapshot(folder / f"2024.05.01.10.{k:02d}.00", kind, x, RATE)
    return folder


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_reads_back_the_signal(tmp_path, kind):
    signal = make_signal()
    folder = write_folder(tmp_path / kind, kind, signal)
    rec = open_recording(RecordingSpec(path=str(folder), rate_hz=RATE, **spec_fields(kind)))
    assert len(rec) == 3 and rec.snapshot_samples == 2560 and rec.rate_hz == RATE
    assert rec.timestamps[1] - rec.timestamps[0] == np.timedelta64(60, "s")  # from the file names
    got = np.stack(list(rec.snapshots()))
    assert got.shape == signal.shape
    if tolerance(kind):
        assert np.abs(got - signal).max() <= tolerance(kind)
    else:
        np.testing.assert_array_equal(got, signal)


@pytest.mark.parametrize("kind", ["csv", "parquet", "npy", "mat5", "mat73", "wav_float"])
def test_real_ims_file_converted_reads_back_identically(tmp_path, kind):
    x = ims.read_ims_file(IMS_FILE)
    names = [f"b{b}{a}" for b in range(1, 5) for a in "xy"]
    scale = 1 / 8.0 if kind.startswith("wav") else 1.0  # the IMS file spans +-5; a WAV stores [-1, 1)
    path = write_snapshot(tmp_path / IMS_FILE.name, kind, x * scale, 20000.0, names=names)
    fields = {"columns": [f"*_{n}_time" for n in names]} if kind.startswith("mat") else {}
    fields.update({"time_column": "time_s"} if kind == "csv" else {})
    rec = open_recording(RecordingSpec(path=str(path), rate_hz=20000, timestamps="filename", scale=1 / scale, **fields))
    np.testing.assert_array_equal(rec.snapshot(0), x)
    direct = open_recording(RecordingSpec(path=str(IMS_FILE), rate_hz=20000))
    assert direct.format == "ims" and direct.channels == names
    np.testing.assert_array_equal(direct.snapshot(0), x)
