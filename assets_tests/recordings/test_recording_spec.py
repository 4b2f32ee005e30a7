"""The recording spec (TOML or Dagster config) and the inspector that drafts it: what it guesses, what it asks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyml_dagster.recordings import SpecError, load_spec, monitored_units, open_recording, spec_from_dict
from tinyml_dagster.recordings.inspect import inspect_path, spec_text
from tinyml_dagster.recordings.writers import make_signal, write_snapshot

IMS_SET1 = Path(__file__).parents[1] / "fixtures" / "ims" / "1st_test"
RATE = 25600.0


def folder_of(tmp_path: Path, kind: str, names=("DE", "FE")) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    for k, x in enumerate(make_signal()):
        write_snapshot(folder / f"2024-05-01_10-{k:02d}-00", kind, x, RATE, names=names)
    return folder


def test_spec_file_resolves_its_path_from_its_folder(tmp_path):
    folder_of(tmp_path, "parquet")
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[recording]\npath = "parquet"\nrate_hz = 25600\nfilename_format = "%Y-%m-%d_%H-%M-%S"\n'
                         'monitor = ["DE+FE"]\nshaft_hz = 29.95\n')
    spec = load_spec(spec_path)
    assert spec.path == str(tmp_path / "parquet") and spec.shaft_hz == 29.95
    rec = open_recording(spec)
    assert rec.channels == ["DE", "FE"] and len(rec) == 3
    assert monitored_units(spec, rec.channels) == [("DE", "FE")]


@pytest.mark.parametrize("text, field", [
    ('path = "x"\n', "rate_hz"),
    ('path = "x"\nrate_hz = 1000\nsample_rate = 5\n', "sample_rate"),
    ('path = "x"\nrate_hz = "fast"\n', "rate_hz"),
    ('path = "x"\nrate_hz = 1000\nformat = "xlsx"\n', "format"),
    ('path = "x"\nrate_hz = 1000\nlayout = "stream"\n', "snapshot_seconds"),
    ('path = "x"\nrate_hz = 1000\ntimestamps = "interval"\n', "start"),
    ('path = "x"\nrate_hz = 1000\ntimestamps = "column"\n', "time_column"),
    ('path = "x"\nrate_hz = 1000\nchannels = ["a", "b"]\nmonitor = ["a+c"]\n', "monitor"),
    ('path = "x"\nrate_hz = 1000\nchannels = ["a"]\ncolumns = ["0", "1"]\n', "channels"),
    ('path = "x"\nrate_hz = = 1\n', "not valid TOML"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, text, field):
    spec_path = tmp_path / "bad.toml"
    spec_path.write_text(text)
    with pytest.raises(SpecError, match=field) as e:
        load_spec(spec_path)
    assert str(spec_path) in str(e.value)


def test_spec_fields_are_the_dagster_config_fields():
    spec = spec_from_dict({"path": "/data/run", "rate_hz": 12000, "columns": ["*_DE_time"]}, "run config")
    assert spec.format == "" and spec.timestamps == "filename" and spec.columns == ["*_DE_time"]
    with pytest.raises(SpecError, match="run config: rate_hz"):
        spec_from_dict({"path": "/data/run"}, "run config")


def test_inspect_csv_folder_finds_rate_time_column_and_timestamps(tmp_path):
    f = inspect_path(folder_of(tmp_path, "csv"))
    assert f.fields["format"] == "delimited" and f.fields["delimiter"] == "," and f.fields["header"] is True
    assert f.fields["rate_hz"] == RATE and f.fields["time_column"] == "time_s"
    assert f.fields["channels"] == ["DE", "FE"] and f.fields["columns"] == ["DE", "FE"]
    assert f.fields["timestamps"] == "filename" and f.fields["filename_format"] == "%Y-%m-%d_%H-%M-%S"
    assert any("snapshot length 0.1 s" in x for x in f.facts)
    assert "rate_hz: 25600 Hz is measured from the time column 'time_s'; is that the rate?" in f.questions
    assert any(q.startswith("monitor") for q in f.questions)


def test_inspect_mat_asks_for_the_rate_and_offers_the_rpm(tmp_path):
    f = inspect_path(folder_of(tmp_path, "mat5"))
    assert f.fields["columns"] == ["X097_DE_time", "X097_FE_time"] and f.fields["rate_hz"] == 0.0
    asked = "\n".join(f.questions)
    assert "rate_hz: what is the sampling rate" in asked and "12000 or 48000" in asked
    assert "X097RPM" in asked
    with pytest.raises(SpecError, match="rate_hz"):  # the unanswered draft does not run on a guessed rate
        spec_from_dict(f.fields)


def test_inspect_ims_knows_rate_and_bearing_layout():
    f = inspect_path(IMS_SET1)
    assert f.fields["format"] == "ims" and f.fields["rate_hz"] == 20000
    assert f.fields["monitor"] == ["b1x+b1y", "b2x+b2y", "b3x+b3y", "b4x+b4y"]
    assert f.fields["filename_format"] == "%Y.%m.%d.%H.%M.%S"


def test_inspect_one_long_file_is_a_stream_with_questions(tmp_path):
    np.save(tmp_path / "run.npy", np.concatenate(list(make_signal())))
    f = inspect_path(tmp_path / "run.npy")
    assert f.fields["layout"] == "stream" and f.fields["timestamps"] == "interval"
    asked = "\n".join(f.questions)
    for field in ("rate_hz", "snapshot_seconds", "start"):
        assert field + ":" in asked
    answered = dict(f.fields, rate_hz=RATE, snapshot_seconds=0.05, start="2024-05-01T10:00:00")
    rec = open_recording(spec_from_dict(answered))
    assert len(rec) == 6 and rec.snapshot_samples == 1280
    assert rec.timestamps[1] - rec.timestamps[0] == np.timedelta64(50, "ms")


def test_inspect_cli_writes_a_spec_that_opens(tmp_path):
    folder = folder_of(tmp_path, "wav_float")
    out = tmp_path / "rec" / "recording.toml"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    run = [sys.executable, "-m", "tinyml_dagster.recordings", "inspect", str(folder), "--out", str(out)]
    p = subprocess.run(run, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "format: wav (3 files)" in p.stdout and "rate: 25600 Hz (from the WAV header)" in p.stdout
    assert "? monitor:" in p.stdout and "# QUESTION: monitor" in out.read_text()
    spec = load_spec(out)
    assert spec.path == str(folder) and open_recording(spec).channels == ["ch0", "ch1"]
    again = subprocess.run(run, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "exists" in again.stderr
    check = subprocess.run([sys.executable, "-m", "tinyml_dagster.recordings", "check", str(out)],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0 and "3 snapshots of 2560 samples (0.1 s) at 25600 Hz" in check.stdout


def test_spec_text_is_relative_to_the_spec(tmp_path):
    folder = folder_of(tmp_path, "npy")
    text = spec_text(inspect_path(folder), tmp_path / "specs")
    assert 'path = "../npy"' in text and text.startswith("# Recording spec")


def test_inspect_cli_error_leaves_no_spec(tmp_path):
    out = tmp_path / "recording.toml"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([sys.executable, "-m", "tinyml_dagster.recordings", "inspect", str(tmp_path / "none"),
                        "--out", str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "no such file or folder" in p.stderr and not out.exists()


def test_inspect_finds_a_time_inside_longer_file_names(tmp_path):
    folder = tmp_path / "rig"
    folder.mkdir()
    for k, x in enumerate(make_signal()):  # three 0.1-s snapshots, one after the other
        write_snapshot(folder / f"acc_20031022_120624_{k}00", "parquet", x, RATE)
    f = inspect_path(folder)
    assert f.fields["filename_format"] == "%Y%m%d_%H%M%S_%f" and f.fields["filename_regex"]
    rec = open_recording(spec_from_dict(dict(f.fields, rate_hz=RATE)))
    assert rec.timestamps[2] - rec.timestamps[0] == np.timedelta64(200, "ms")


def test_inspect_european_csv_and_one_long_file_with_a_time_column(tmp_path):
    x = np.concatenate(list(make_signal()))  # 0.3 s, 2 channels
    t = np.arange(len(x)) / RATE
    rows = [f"{float(ti)!r};{float(a)!r};{float(b)!r}".replace(".", ",") for ti, (a, b) in zip(t, x)]
    path = tmp_path / "run.csv"
    path.write_text("Zeit;DE;FE\n" + "\n".join(rows) + "\n")
    f = inspect_path(path)
    assert (f.fields["delimiter"], f.fields["decimal"], f.fields["header"]) == (";", ",", True)
    assert f.fields["rate_hz"] == RATE and f.fields["columns"] == ["DE", "FE"]
    assert "layout" not in f.fields and f.fields["timestamps"] == "interval"  # 0.3 s: one snapshot
    answered = dict(f.fields, time_column="Zeit", timestamps="column", start="2024-05-01T10:00:00",
                    layout="stream", snapshot_seconds=0.1)
    rec = open_recording(spec_from_dict(answered))
    assert len(rec) == 3 and rec.timestamps[1] - rec.timestamps[0] == np.timedelta64(100, "ms")
    np.testing.assert_array_equal(np.stack(list(rec.snapshots())), make_signal())


def test_inspect_reads_a_date_time_column_as_the_timestamps(tmp_path):
    import pandas as pd

    folder = tmp_path / "dated"
    folder.mkdir()
    for k, x in enumerate(make_signal()):
        t = pd.Timestamp("2024-05-01 10:00") + pd.Timedelta(minutes=k) + pd.to_timedelta(np.arange(len(x)) / RATE, "s")
        pd.DataFrame({"when": t, "DE": x[:, 0], "FE": x[:, 1]}).to_csv(folder / f"s{k}.csv", index=False)
    f = inspect_path(folder)
    assert f.fields["time_column"] == "when" and f.fields["timestamps"] == "column" and f.fields["rate_hz"] == RATE
    rec = open_recording(spec_from_dict(f.fields))
    assert rec.channels == ["DE", "FE"] and str(rec.timestamps[2]) == "2024-05-01T10:02:00.000000000"


def test_inspect_turns_per_file_variable_names_into_patterns(tmp_path):
    import scipy.io

    for n, x in zip((97, 98), make_signal(n_snapshots=2)):  # Case Western Reserve style: the file number in each name
        scipy.io.savemat(tmp_path / f"{n}.mat", {f"X{n:03d}_DE_time": x[:, :1], f"X{n:03d}_FE_time": x[:, 1:],
                                                 f"X{n:03d}RPM": np.array([[1796.0]])})
    f = inspect_path(tmp_path)
    assert f.fields["columns"] == ["X*_DE_time", "X*_FE_time"] and f.fields["channels"] == ["X_DE_time", "X_FE_time"]
    answered = dict(f.fields, rate_hz=12000.0, start="2024-05-01T10:00:00", interval_s=60.0)
    rec = open_recording(spec_from_dict(answered))
    np.testing.assert_array_equal(np.stack(list(rec.snapshots())), make_signal(n_snapshots=2))
