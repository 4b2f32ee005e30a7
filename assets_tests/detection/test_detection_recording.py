"""Detection judged on a user's recording: its spec's [labels], the device's extraction, the alarm span in seconds."""

import json

import numpy as np
import pytest

from tinyml_dagster import detection_quality as dq
from tinyml_dagster import synthetic

N_FILES = 90


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """A synthetic IMS-format run of N_FILES snapshots, bearing 3 degrading from 70% of its life."""
    root = tmp_path_factory.mktemp("rig")
    synthetic.generate_recording(root / "files", n_files=N_FILES)
    index = synthetic.schedule(N_FILES)
    onset = int(np.argmax(synthetic._life()[index] >= synthetic.DEFECT_ONSET))
    stamps = synthetic.set1_timestamps()
    return root, onset, stamps[index[onset]]


def write_spec(root, labels: str, table: str = "[recording]\n") -> str:
    path = root / "rig.toml"
    path.write_text(table + 'path = "files"\nformat = "ims"\nrate_hz = 20000\nrates_hz = [2000]\n'
                    'monitor = ["b3x+b3y", "b1x+b1y"]\n\n[labels]\n' + labels)
    return str(path)


def records(spec: str) -> list[dict]:
    cfg = dq.DetectionConfig(sources=(dq.RECORDING + spec,), sklearn=False, n_trees=20)
    return dq.detection_records(cfg, log=lambda *_: None)


def test_a_labelled_recording_is_judged_per_unit(rig):
    root, onset, _ = rig
    out = records(write_spec(root, f'"b3x+b3y" = {{onset = {onset}, failure = {N_FILES - 1}}}\n'))
    modes = (("paper", "calibrated"), ("paper", "paper-0.6"), ("wear", "calibrated"))
    assert {(r["bearing"], r["feature_set"], r["threshold_mode"]) for r in out} == {
        (u, fs, m) for u in (1, 2) for fs, m in modes}
    b3 = next(r for r in out if r["bearing"] == 1 and r["feature_set"] == "wear")
    b1 = next(r for r in out if r["bearing"] == 2 and r["feature_set"] == "wear")
    assert b3["source"] == "recording:rig" and "b3x+b3y" in b3["note"] and "2000 Hz" in b3["note"]
    assert b3["failing"] and not b1["failing"] and b3["healthy_until_file"] == onset == b1["healthy_until_file"]
    assert b3["n_degraded"] == 4 * (N_FILES - onset)  # 2 windows of 500 ms per 1-s snapshot, 2 axes
    assert b3["auc"] > 0.9 and b3["first_alarm_h_before_failure"] > 0 and b3["alarms_in_healthy"] == 0
    assert b3["lead_time_measured"] and not b1["lead_time_measured"]
    # snapshots ~3.6 h apart: the span holds 6 of them, not the device's 600 s
    gap = np.median(np.diff(np.array(synthetic.set1_timestamps(), "datetime64[s]")[synthetic.schedule(N_FILES)]))
    assert b3["alarm_span_s"] == pytest.approx(6 * gap / np.timedelta64(1, "s"))


def test_an_onset_given_as_a_time_is_the_same_label(rig):
    root, onset, when = rig
    by_index = records(write_spec(root, f'"b3x+b3y" = {{onset = {onset}}}\n'))
    by_time = records(write_spec(root, f'"b3x+b3y" = {{onset = "{when.isoformat()}"}}\n'))
    # a TOML date-time, and a spec with its fields at the top level
    by_toml_time = records(write_spec(root, f'"b3x+b3y" = {{onset = {when.isoformat()}}}\n', table=""))
    key = ["healthy_until_file", "n_degraded", "auc", "threshold"]
    assert [[r[k] for k in key] for r in by_index] == [[r[k] for k in key] for r in by_time]
    assert [[r[k] for k in key] for r in by_time] == [[r[k] for k in key] for r in by_toml_time]


@pytest.mark.parametrize("labels, message", [
    ('"b2x+b2y" = {onset = 10}\n', "'b2x\\+b2y': not a monitored unit \\(b3x\\+b3y, b1x\\+b1y\\)"),
    ('"b3x+b3y" = {onset = 80, failure = 70}\n', "b3x\\+b3y: failure \\(70\\) comes before onset \\(80\\)"),
    ('"b3x+b3y" = {onset = 500}\n', "b3x\\+b3y.onset: snapshot 500 is not in 0..89"),
    ('"b3x+b3y" = {onset = "soon"}\n', "b3x\\+b3y.onset: 'soon' is not an ISO time"),
    ('"b3x+b3y" = {onset = "2030-01-01T00:00:00"}\n', "is after the recording's last snapshot"),
    ('"b3x+b3y" = {start = 3}\n', "b3x\\+b3y: give \\{onset = ..., failure = ...\\}"),
    ('"b3x+b3y" = {onset = 5}\n', "training windows reach file .*lower train_fraction"),
])
def test_bad_labels_are_named(rig, labels, message):
    root, _, _ = rig
    with pytest.raises(ValueError, match=message):
        records(write_spec(root, labels))


def test_the_command_line_judges_a_recording_and_names_a_bad_one(rig, tmp_path, capsys):
    root, onset, _ = rig
    spec = write_spec(root, f'"b3x+b3y" = {{onset = {onset}}}\n')
    out = tmp_path / "rig.json"
    dq.main(["--recording", spec, "--no-sklearn", "--alarm-span-s", "86400", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert {r["source"] for r in doc["records"]} == {"recording:rig"}
    assert {r["alarm_span_s"] for r in doc["records"]} == {86400}
    assert "recording:rig" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        dq.main(["--recording", write_spec(root, '"b9" = {onset = 1}\n'), "--no-sklearn", "--out", str(out)])
    assert e.value.code == 2 and "'b9': not a monitored unit" in capsys.readouterr().err
    assert json.loads(out.read_text()) == doc  # the earlier records stay whole


def test_labels_of_snapshots_shorter_than_a_window_fall_in_their_window(tmp_path):
    """0.1-s snapshots joined 3 to a 0.25-s window: snapshot 22 of 30 is in window 7, at that window's time."""
    from tinyml_dagster.recordings.writers import make_signal, write_snapshot

    folder = tmp_path / "short"
    folder.mkdir()
    for k, x in enumerate(make_signal(n_snapshots=30)):
        write_snapshot(folder / f"acc_20240501_1000{k:02d}", "npy", x, 25600.0)
    spec = tmp_path / "short.toml"

    def unit_with_onset(onset: str) -> dq.Channel:
        spec.write_text('[recording]\npath = "short"\nrate_hz = 25600\nchannels = ["DE", "FE"]\n'
                        'filename_format = "%Y%m%d_%H%M%S"\nfilename_regex = "\\\\d{8}_\\\\d{6}"\n'
                        'rates_hz = [2000]\nwindow_s = 0.25\nmonitor = ["DE+FE"]\n\n[labels]\n'
                        f'"DE+FE" = {{onset = {onset}}}\n')
        (unit,) = dq.recording_channels(spec)
        return unit

    unit = unit_with_onset("22")
    assert len(np.unique(unit.file)) == 10 and unit.labels == dq.BearingLabels(True, 7, 9)
    assert unit.t[np.argmax(unit.file == 7)] == 21.0  # the window starts with snapshot 21, 21 s in
    for when in ("10:00:22", "10:00:21.5"):  # the snapshot at that time, or the first after it
        assert unit_with_onset(f'"2024-05-01T{when}"').labels == unit.labels
