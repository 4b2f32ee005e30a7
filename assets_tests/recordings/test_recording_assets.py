"""A user's recording spec through the real Dagster data assets: partitions from its channels and rates, features
equal to the reader's, errors that name the file and leave the earlier output whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from tinyml_dagster import features, subsampling
from tinyml_dagster.recordings import load_spec, open_recording
from tinyml_dagster.recordings.writers import make_signal, write_snapshot

ROOT = Path(__file__).resolve().parents[2]
RATE = 25600.0
SCRIPT = """
import json, sys
from tinyml_dagster import features, settings
from tinyml_dagster.defs.data import assets
from tinyml_dagster.defs.data.partitions import feature_partitions
results = assets.materialize_data(rates_hz=settings.RATES_HZ, bearings=settings.BEARINGS)
out = {"keys": sorted(str(k) for k in feature_partitions.get_partition_keys()), "ok": [r.success for r in results],
       "rates": list(settings.RATES_HZ), "window_ms": settings.WINDOW_MS, "data_dir": str(settings.data_dir())}
if all(out["ok"]):
    for rate in settings.RATES_HZ:
        features.load_feature_windows(rate).to_parquet(f"{settings.data_dir()}/check_{rate}.parquet")
print(json.dumps(out))
"""


def make_recording(tmp_path: Path, n: int = 12) -> Path:
    """0.1-s CSV snapshots of 2 channels at 25.6 kHz with a time column, and its spec (two units, 1 and 2 kHz)."""
    folder = tmp_path / "rig"
    folder.mkdir()
    for k, x in enumerate(make_signal(n_snapshots=n)):
        write_snapshot(folder / f"acc_20240501_1000{k:02d}", "csv", x, RATE)
    spec = tmp_path / "rig.toml"
    spec.write_text('[recording]\npath = "rig"\nrate_hz = 25600\ntime_column = "time_s"\nchannels = ["DE", "FE"]\n'
                    'columns = ["DE", "FE"]\nfilename_format = "%Y%m%d_%H%M%S"\nfilename_regex = "\\\\d{8}_\\\\d{6}"\n'
                    'rates_hz = [1000, 2000]\nwindow_s = 0.25\n')
    return spec


def run_assets(spec: Path, data_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINYML_RECORDING=str(spec), TINYML_DATA_DIR=str(data_dir))
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_spec_recording_through_the_data_assets(tmp_path):
    spec = make_recording(tmp_path)
    out = run_assets(spec, tmp_path / "data")
    assert all(out["ok"]) and out["rates"] == [1000, 2000] and out["window_ms"] == 250
    assert out["keys"] == ["1|1000", "1|2000", "2|1000", "2|2000"]  # monitored unit (DE, FE) x rate
    rec = open_recording(load_spec(spec))
    signals, stamps = subsampling.subsample_recording(rec, (2000,), 0.25)  # 3 snapshots of 0.1 s per 0.25-s window
    want = pd.concat([features.feature_windows_frame(signals[2000], stamps, 2000, unit, axes=[(name, unit - 1)],
                                                     window_ms=250) for unit, name in ((1, "DE"), (2, "FE"))])
    got = pd.read_parquet(tmp_path / "data" / "check_2000.parquet")
    assert len(got) == 4 * 2 and set(got.axis) == {"DE", "FE"} and set(got.bearing) == {1, 2}
    cols = ["timestamp", "bearing", "axis", "mean", "skewness", "kurtosis"]
    pd.testing.assert_frame_equal(got[cols].sort_values(["bearing", "timestamp"]).reset_index(drop=True),
                                  want[cols].sort_values(["bearing", "timestamp"]).reset_index(drop=True),
                                  check_dtype=False)


def test_bad_file_fails_the_run_by_name_and_keeps_the_earlier_signals(tmp_path):
    spec = make_recording(tmp_path)
    data = tmp_path / "data"
    assert all(run_assets(spec, data)["ok"])
    before = (data / "subsampled" / "rate=2000.npy").read_bytes()
    bad = sorted((tmp_path / "rig").iterdir())[5]
    lines = bad.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 1)[0]  # a row one cell short
    bad.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINYML_RECORDING=str(spec), TINYML_DATA_DIR=str(data))
    script = ("from tinyml_dagster.defs.data import assets\n"
              "assets.materialize_data(rates_hz=(2000,), bearings=(1,))\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0
    assert f"{bad}, line 8: 2 cells, expected 3 as on line 1 (ragged rows)" in p.stderr
    assert (data / "subsampled" / "rate=2000.npy").read_bytes() == before


def test_recording_config_in_the_launchpad_must_fit_the_partitions(tmp_path, monkeypatch):
    from tinyml_dagster.defs.data import assets

    spec = load_spec(make_recording(tmp_path))
    monkeypatch.setenv("TINYML_DATA_DIR", str(tmp_path / "data"))
    config = {"ops": {"ims_recording": {"config": {"recording": spec.model_dump()}}}}
    r = dg.materialize([assets.ims_recording], run_config=config, raise_on_error=False)
    assert not r.success  # this process's partitions are IMS's 4 bearings at 500, 1000, 2000 Hz
    failure = [e for e in r.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "2 monitored units at [1000, 2000] Hz, 250-ms windows" in str(failure.event_specific_data.error.message)
    assert "TINYML_RECORDING" in str(failure.event_specific_data.error.message)


def test_device_feed_from_a_recording_gives_the_gateway_s_windows(tmp_path):
    """The firmware's DataIn, reading a RecordingFeed of 0.1-s snapshots, computes the gateway's feature windows."""
    from firmware.data_in import DataIn
    from tinyml_dagster.emulator.data_feed import RecordingFeed

    rec = open_recording(load_spec(make_recording(tmp_path)))
    feed = RecordingFeed(rec, "FE", 1000, time_scale=1e6, window_ms=250)
    data_in = DataIn(feed, 1000, 250)
    got = []
    while not feed.exhausted() or data_in.fill:
        r = data_in.poll()
        if r is not None:
            got.append(r)
    assert feed.windows_planned() == len(got) == 4  # 12 snapshots, 3 per window
    signals, stamps = subsampling.subsample_recording(rec, (1000,), 0.25)
    want = features.feature_windows_frame(signals[1000], stamps, 1000, 2, axes=[("FE", 1)], window_ms=250)
    np.testing.assert_allclose(np.array(got), want[["mean", "skewness", "kurtosis"]].to_numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="channel 'BA' is not in the recording \\(DE, FE\\)"):
        RecordingFeed(rec, "BA", 1000)


def test_emulator_cli_runs_the_firmware_on_a_recording(tmp_path):
    spec = make_recording(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINYML_RECORDING=str(spec), TINYML_DATA_DIR=str(tmp_path / "data"))
    cmd = [sys.executable, "-m", "tinyml_dagster.emulator", "--device-id", "rig-1", "--flash", str(tmp_path / "f"),
           "--axis", "DE", "--rate-hz", "1000", "--runtime", "cpython", "--time-scale", "20", "--loop",
           "--set", "n_train=4", "--set", "psi=4", "--duration", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("PORT /dev/") and '"reboots": 0' in p.stdout
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["window_ms"] == 250 and config["rate_hz"] == 1000
    assert (tmp_path / "f" / "models" / "champion" / "forest.bin").exists()  # trained on the recording's windows
    bad = subprocess.run(cmd[:-2] + ["--axis", "BA", "--duration", "1"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and "channel 'BA' is not in the recording (DE, FE)" in bad.stderr
