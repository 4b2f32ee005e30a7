"""FFT subsampling against scipy.signal.resample, on real IMS files."""

from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from tinyml_dagster import ims, subsampling

SET1 = Path(__file__).parents[1] / "fixtures" / "ims" / "1st_test"


@pytest.mark.parametrize("rate, length", [(500, 512), (1000, 1024), (2000, 2048)])
def test_matches_scipy_resample_on_real_file(rate, length):
    x = ims.read_ims_file(SET1 / "2003.10.22.12.06.24")
    y = subsampling.subsample(x, rate, 20000, axis=0)
    assert y.shape == (length, 8)
    np.testing.assert_allclose(y, scipy.signal.resample(x, length, axis=0), rtol=0, atol=1e-12)


def test_odd_length_matches_scipy():
    x = np.random.default_rng(0).normal(size=(3, 20000))
    np.testing.assert_allclose(
        subsampling.subsample(x, 1234, 20000), scipy.signal.resample(x, 1234, axis=-1), atol=1e-12
    )


def test_rectangular_low_pass_keeps_below_and_removes_above_nyquist():
    t = np.arange(20480) / 20000.0
    low, high = 350 * 20000 / 20480, 700 * 20000 / 20480  # on FFT bins: ~342 Hz kept, ~684 Hz above 500 Hz cut
    x = np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t)
    y = subsampling.subsample(x, 1000, 20000)
    t1 = np.arange(1024) / 1000.0
    np.testing.assert_allclose(y, np.sin(2 * np.pi * low * t1), atol=1e-9)


def test_subsample_files_gives_every_rate_per_file():
    paths = ims.list_ims_files(SET1)
    out = subsampling.subsample_files(paths, (500, 2000), workers=2)
    assert sorted(out) == [500, 2000] and out[500].shape == (2, 512, 8) and out[2000].shape == (2, 2048, 8)
    serial = subsampling.subsample_files(paths, (500,), workers=1)
    np.testing.assert_array_equal(serial[500], out[500])
    np.testing.assert_allclose(out[2000][1], scipy.signal.resample(np.loadtxt(paths[1]), 2048, axis=0), atol=1e-12)


def test_impossible_rates_are_refused():
    with pytest.raises(ValueError, match="cannot subsample"):
        subsampling.subsampled_length(20480, 40000, 20000)
    with pytest.raises(ValueError, match="no IMS file"):
        subsampling.subsample_files([], (500,))
