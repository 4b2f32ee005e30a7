"""Synthetic set-1 generator: same seed same bytes, the real format, calibrated on the real recording."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from tinyml_dagster import ims, synthetic

REAL_FIRST = Path(__file__).parents[1] / "fixtures" / "ims" / "1st_test" / "2003.10.22.12.06.24"


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ims.list_ims_files(directory)}


def test_same_seed_same_bytes_and_real_schedule(tmp_path):
    a = synthetic.generate_recording(tmp_path / "a", n_files=6, seed=7, workers=2)
    synthetic.generate_recording(tmp_path / "b", n_files=6, seed=7, workers=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    synthetic.generate_recording(tmp_path / "c", n_files=6, seed=8)
    assert _digest(tmp_path / "c").keys() == _digest(tmp_path / "a").keys()
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")
    # the real schedule: first and last timestamps of set 1, files named like the real ones
    assert [p.name for p in a][0] == "2003.10.22.12.06.24" and a[-1].name == "2003.11.25.23.39.56"
    # a small recording is a subset of the full one: file i has the same bytes at any size
    assert synthetic.format_ims(synthetic.synthesize_file(2155, seed=7)) == a[-1].read_bytes()


def test_full_schedule_is_the_real_one():
    stamps = synthetic.set1_timestamps()
    assert len(stamps) == 2156 and stamps == sorted(stamps)
    gaps = np.diff(np.array(stamps, dtype="datetime64[s]")).astype(int)
    assert (gaps == 600).sum() == 1962 and (gaps == 300).sum() == 145  # 10-min snapshots, the first every 5 min
    assert synthetic.schedule(2156) == list(range(2156))
    small = synthetic.schedule(50)
    assert len(small) == 50 and small[0] == 0 and small[-1] == 2155


def test_files_are_in_the_real_format_and_read_back_exactly(tmp_path):
    x = synthetic.synthesize_file(3)
    path = tmp_path / "2003.10.22.12.19.13"
    path.write_bytes(synthetic.format_ims(x))
    assert path.read_bytes().split(b"\n")[0].count(b"\t") == 7
    np.testing.assert_array_equal(ims.read_ims_file(path), x)
    np.testing.assert_array_equal(np.loadtxt(path), x)


def test_regenerating_replaces_whole_and_skips_when_current(tmp_path):
    out = tmp_path / "rec"
    synthetic.generate_recording(out, n_files=4, seed=1)
    assert synthetic.is_generated(out, 4, 1) and not synthetic.is_generated(out, 5, 1)
    first = out.joinpath("2003.10.22.12.06.24").stat().st_mtime_ns
    synthetic.generate_recording(out, n_files=4, seed=1)
    assert out.joinpath("2003.10.22.12.06.24").stat().st_mtime_ns == first
    synthetic.generate_recording(out, n_files=3, seed=1)
    assert len(ims.list_ims_files(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]  # no temp or old directory left
    with pytest.raises(ValueError, match="n_files"):
        synthetic.generate_recording(out, n_files=1)


def test_healthy_start_is_calibrated_on_the_first_real_file():
    real = ims.read_ims_file(REAL_FIRST)
    fake = synthetic.synthesize_file(0)
    def rms(a):
        return np.sqrt((a**2).mean(axis=0))

    np.testing.assert_allclose(rms(fake), rms(real), rtol=0.1)
    np.testing.assert_allclose(fake.mean(axis=0), real.mean(axis=0), atol=0.01)
    np.testing.assert_allclose(fake.std(axis=0), real.std(axis=0), rtol=0.1)
    # excess kurtosis varies from file to file: compare medians over the first files (real: derived_features)
    real_first3 = [[1.07, 3.07, 0.21, 0.29, 0.41, 0.78, 0.79, 1.81], [1.16, 2.00, 0.23, 0.29, 0.45, 0.68, 1.24, 1.87],
                   [0.99, 1.97, 0.21, 0.17, 0.39, 0.75, 0.93, 1.43]]
    fake_kurt = [scipy.stats.kurtosis(synthetic.synthesize_file(i)) for i in range(5)]
    np.testing.assert_allclose(np.median(fake_kurt, axis=0), np.median(real_first3, axis=0), atol=0.8)
    # the same spectral lines: 493 Hz and 986 Hz stand out in both
    spectrum = np.abs(np.fft.rfft(fake - fake.mean(axis=0), axis=0))
    assert set(np.argsort(spectrum[:, 0])[-2:]) == {505, 1010}


def test_life_shape_healthy_then_bearings_3_and_4_degrade():
    # per-file trajectories of the real set 1 (derived_features): RMS of every channel rises ~20% during
    # run-in then stays flat; bearing 3 x ends at RMS 0.3-0.6 with kurtosis above 10 and clipping at +-5
    life = synthetic._life()
    def rms(a):
        return np.sqrt((a**2).mean(axis=0))

    early, mid = synthetic.synthesize_file(0), synthetic.synthesize_file(1000)
    assert (rms(mid) / rms(early) > 1.1).all() and (rms(mid) / rms(early) < 1.35).all()
    healthy = [synthetic.synthesize_file(i) for i in range(0, 2156, 150) if life[i] < 0.6]
    for x in healthy:
        assert (rms(x) < 0.2).all() and (scipy.stats.kurtosis(x)[4:] < 3.5).all()
    last = [synthetic.synthesize_file(i) for i in range(2146, 2156)]
    b3x_rms = np.array([rms(x)[4] for x in last])
    b3x_kurt = np.array([scipy.stats.kurtosis(x[:, 4]) for x in last])
    assert 0.3 <= np.median(b3x_rms) <= 0.6
    assert b3x_kurt.max() > 10 and np.median(b3x_kurt) > 4
    assert max(np.abs(x[:, 4]).max() for x in last) == 5.0
    # bearing 4 x: louder at the end than healthy (real: 0.109 -> ~0.21), bearings 1 and 2 much less changed
    assert np.median([rms(x)[6] for x in last]) > 0.18
    assert np.median([rms(x)[0] for x in last]) < 0.18
    assert synthetic.severity(0.69, 2.5) == 0.0 and synthetic.severity(1.0, 2.5) == 1.0
    assert synthetic.spall(0.69, 2.5) == 0.0 and synthetic.spall(0.70, 2.5) == synthetic.SPALL_INITIAL


def test_healthy_features_at_device_rates_match_the_real_files():
    """What the detectors see: 500-ms window features after subsampling, synthetic vs the real first files."""
    from tinyml_dagster import features, subsampling

    real_paths = sorted(REAL_FIRST.parent.iterdir())
    real = subsampling.subsample_files(real_paths, (500, 1000, 2000))
    fake = {r: [] for r in (500, 1000, 2000)}
    for i in range(8):
        for r, y in subsampling.subsample_many(synthetic.synthesize_file(i), (500, 1000, 2000), 20000, axis=0).items():
            fake[r].append(y)
    for rate in (500, 1000, 2000):
        fr = features.window_features_np(np.moveaxis(real[rate], 1, 2), rate // 2)  # (files, channels, windows, 3)
        ff = features.window_features_np(np.moveaxis(np.array(fake[rate]), 1, 2), rate // 2)
        np.testing.assert_allclose(ff[..., 0].mean(axis=(0, 2)), fr[..., 0].mean(axis=(0, 2)), atol=0.005)
        # medians: a few real windows at 500 Hz have kurtosis outliers
        assert abs(np.median(ff[..., 1]) - np.median(fr[..., 1])) < 0.1, rate
        assert abs(np.median(ff[..., 2]) - np.median(fr[..., 2])) < 0.3, rate
        assert np.percentile(np.abs(ff[..., 2]), 90) < 1.5
