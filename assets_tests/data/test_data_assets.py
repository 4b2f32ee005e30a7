"""The data assets under real Dagster: synthetic and real recordings through to Parquet feature windows."""

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import scipy.signal
import scipy.stats

from tinyml_dagster import features, ims
from tinyml_dagster.defs.data import assets
from tinyml_dagster.defs.data.partitions import feature_partition_key, feature_partitions

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ims"


def test_partitions_are_rate_by_bearing():
    keys = feature_partitions.get_partition_keys()
    assert len(keys) == 12
    assert feature_partition_key(1000, 3) in keys
    assert feature_partition_key(1000, 3).keys_by_dimension == {"rate": "1000", "bearing": "3"}


def test_synthetic_recording_to_feature_windows(data_dir):
    instance = dg.DagsterInstance.ephemeral()
    results = assets.materialize_data(rates_hz=(500, 2000), bearings=(3, 4), n_files=20, instance=instance)
    assert all(r.success for r in results) and len(results) == 5
    assert len(ims.list_ims_files(data_dir / "generated/ims/1st_test")) == 20

    df = features.load_feature_windows(2000, 3, data_dir=data_dir)
    assert tuple(df.columns) == features.COLUMNS
    assert len(df) == 20 * 2 * 2  # files x axes x 500-ms windows per 1.024-s file
    assert set(df.rate_hz) == {2000} and set(df.bearing) == {3} and set(df.axis) == {"x", "y"}
    assert df.life_fraction.min() == 0.0 and df.life_fraction.max() == 1.0
    assert (df.split == np.where(df.life_fraction < 0.6, "train", "test")).all()
    # bearing 3 degrades late in life: at 2 kHz its last windows leave the training ranges of mean and skewness
    x = df[df.axis == "x"]
    train, late = x[x.split == "train"], x[x.life_fraction > 0.9]
    assert late["mean"].median() > train["mean"].max() + 0.01
    names = list(features.FEATURE_NAMES)
    outside = ((late[names] > train[names].max()) | (late[names] < train[names].min())).any(axis=1)
    assert outside.mean() >= 0.5
    both = features.load_feature_windows(500, data_dir=data_dir)
    assert sorted(set(both.bearing)) == [3, 4] and len(both) == 2 * 20 * 2 * 2

    # the UI metadata a person reads
    mat = instance.get_latest_materialization_event(dg.AssetKey("feature_windows"))
    meta = mat.asset_materialization.metadata
    assert meta["rows"].value == 80 and meta["train_rows"].value + meta["test_rows"].value == 80
    assert "| train | x |" in meta["by_split"].value and "timestamp" in meta["preview"].value
    rec = instance.get_latest_materialization_event(dg.AssetKey("ims_recording")).asset_materialization.metadata
    assert rec["files"].value == 20 and rec["time_span"].value.startswith("2003-10-22 12:06:24 .. 2003-11-25 23:39:56")


def test_real_files_by_config_match_a_direct_scipy_pipeline(data_dir, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(FIXTURES / "1st_test", real)
    results = assets.materialize_data(rates_hz=(1000,), bearings=(2,), ims_dir=str(real))
    assert all(r.success for r in results)
    manifest = json.loads((data_dir / "ims_recording.json").read_text())
    assert manifest["directory"] == str(real) and not manifest["synthetic"]
    assert not (data_dir / "generated").exists()  # a real recording generates nothing

    df = features.load_feature_windows(1000, 2, data_dir=data_dir)
    assert len(df) == 2 * 2 * 2
    for (file_index, window_index, axis), row in df.set_index(["file_index", "window_index", "axis"]).iterrows():
        path = sorted(real.iterdir())[file_index]
        column = 2 if axis == "x" else 3  # bearing 2
        y = scipy.signal.resample(np.loadtxt(path)[:, column], 1024)[window_index * 500 : (window_index + 1) * 500]
        np.testing.assert_allclose(
            [row["mean"], row["skewness"], row["kurtosis"]],
            [y.mean(), scipy.stats.skew(y), scipy.stats.kurtosis(y)],
            rtol=1e-9, atol=1e-12,
        )
    assert df.timestamp.iloc[-1] == np.datetime64("2003-10-22T12:09:13.500")


def test_ims_dir_from_environment(data_dir, tmp_path, monkeypatch):
    real = tmp_path / "real"
    shutil.copytree(FIXTURES / "2nd_test", real)
    monkeypatch.setenv("TINYML_IMS_DIR", str(real))
    results = assets.materialize_data(rates_hz=(500,), bearings=(1,))
    assert all(r.success for r in results)
    df = features.load_feature_windows(500, 1, data_dir=data_dir)
    assert set(df.axis) == {"x"} and len(df) == 2  # set 2: one column per bearing, one file


def test_bad_recording_fails_naming_file_and_keeps_stored_data(data_dir, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(FIXTURES / "1st_test", real)
    assert all(r.success for r in assets.materialize_data(rates_hz=(500,), bearings=(1,), ims_dir=str(real)))
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}

    lines = (real / "2003.10.22.12.09.13").read_text().splitlines(keepends=True)
    lines[41] = lines[41].replace("\t", "\t?", 1)
    (real / "2003.10.22.12.09.13").write_text("".join(lines))
    with pytest.raises(ims.IMSFormatError, match=r"2003.10.22.12.09.13, line 42, column 2: non-numeric cell"):
        assets.materialize_data(rates_hz=(500,), bearings=(1,), ims_dir=str(real))
    after = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert after == before  # the manifest may be rewritten identically; no array or table half-written

    with pytest.raises(ims.IMSFormatError, match="IMS directory is empty"):
        empty = tmp_path / "empty"
        empty.mkdir()
        assets.materialize_data(ims_dir=str(empty))
