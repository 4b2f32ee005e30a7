"""Recordings: the same signal written in every format reads back the same through each reader;
one real IMS file too."""

from pathlib import Path

import numpy as np
import pytest

from tinyml_dagster import ims
from tinyml_dagster.recordings import RecordingSpec, open_recording
from tinyml_dagster.recordings.writers import FORMATS, make_signal, spec_fields, tolerance, write_snapshot

RATE = 25600.0
IMS_FILE = Path(__file__).parents[1] / "fixtures" / "ims" / "1st_test" / "2003.10.22.12.06.24"


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


def feature_windows_of(rec, rate_hz=2000, window_s=0.05):
    """Every channel's feature windows (one unit per channel) after resampling to rate_hz."""
    from tinyml_dagster import features, subsampling

    signals, stamps = subsampling.subsample_recording(rec, (rate_hz,), window_s)
    cols = [(name, k) for k, name in enumerate(rec.channels)]
    return features.feature_windows_frame(
        signals[rate_hz], stamps, rate_hz, 1, axes=cols, window_ms=int(window_s * 1000)
    )


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_gives_the_same_feature_windows(tmp_path, kind):
    signal = make_signal()
    reference = feature_windows_of(open_recording(RecordingSpec(
        path=str(write_folder(tmp_path / "npy", "npy", signal)), rate_hz=RATE, channels=["DE", "FE"])))
    assert len(reference) == 3 * 2 * 2  # snapshots x channels x 50-ms windows of a 0.1-s snapshot
    rec = open_recording(RecordingSpec(path=str(write_folder(tmp_path / kind, kind, signal)), rate_hz=RATE,
                                       channels=["DE", "FE"], **spec_fields(kind)))
    got = feature_windows_of(rec)
    names = ["mean", "skewness", "kurtosis"]
    assert got.drop(columns=names).equals(reference.drop(columns=names))
    if tolerance(kind):
        np.testing.assert_allclose(got[names], reference[names], atol=200 * tolerance(kind))
    else:
        np.testing.assert_array_equal(got[names].to_numpy(), reference[names].to_numpy())


def test_snapshots_shorter_than_a_window_are_joined(tmp_path):
    signal = make_signal(n_snapshots=7)  # 0.1-s snapshots, 0.25-s windows: 3 snapshots per window, the 7th dropped
    rec = open_recording(RecordingSpec(path=str(write_folder(tmp_path / "npy", "npy", signal)), rate_hz=RATE))
    df = feature_windows_of(rec, rate_hz=1000, window_s=0.25)
    assert sorted(set(df.file_index)) == [0, 1] and set(df.window_index) == {0}
    assert list(df.timestamp.drop_duplicates()) == list(rec.timestamps[[0, 3]])
    from tinyml_dagster import features, subsampling

    joined = np.concatenate(list(signal[3:6]))[:, 1]  # the second group, channel FE
    want = features.window_features_np(subsampling.subsample(joined, 1000, RATE), 250)[0]
    np.testing.assert_allclose(df[(df.file_index == 1) & (df.axis == "ch1")][["mean", "skewness", "kurtosis"]]
                               .to_numpy()[0], want, rtol=1e-12)


def test_resampling_from_any_rate_removes_what_the_device_rate_cannot_hold(tmp_path):
    from tinyml_dagster import subsampling

    t = np.arange(25600) / RATE  # 1 s at 25.6 kHz: 300 Hz kept at 1 kHz, 700 Hz (would alias to 300 Hz) removed
    x = np.sin(2 * np.pi * 300 * t) + np.sin(2 * np.pi * 700 * t)
    np.save(tmp_path / "2024.05.01.10.00.00.npy", x)
    rec = open_recording(RecordingSpec(path=str(tmp_path), rate_hz=RATE))
    signals, _ = subsampling.subsample_recording(rec, (1000,), 0.5)
    np.testing.assert_allclose(signals[1000][0, :, 0], np.sin(2 * np.pi * 300 * np.arange(1000) / 1000), atol=1e-9)
