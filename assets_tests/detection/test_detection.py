"""Whole-life detection per feature set: labels, the alarm's smoothed score, records and data/bench/detection.json."""

import json

import numpy as np
import pytest

from firmware.alarms import AlarmRule
from tinyml_dagster import detection_quality as dq


def test_packaged_per_file_tables_are_the_real_recordings():
    t = dq.per_file_tables()
    assert t["set1"].shape == (2156, 8, len(dq.PER_FILE_COLUMNS)) and t["set2"].shape == (982, 4, 5)
    hours = (t["set2_time"][-1] - t["set2_time"][0]) / 3600
    assert 163 < hours < 164  # 2004-02-12 10:32:39 .. 2004-02-19 06:02:39, the last file before the stop
    std = t["set2"][:, 0, 0]
    assert std[:500].max() < 0.09 and std[950:].mean() > 0.2  # bearing 1 wears out at the end of set 2
    channels = dq.ims_file_channels("ims-set1-files", t)
    b3 = channels[2]
    assert b3.labels == dq.BearingLabels(True, 1800, 2100) and len(b3.t) == 2 * 2156
    assert b3.features["paper"].shape == (4312, 3) and b3.features["wear"].shape == (4312, 4)
    assert np.all(np.diff(b3.t) >= 0)


def test_span_score_is_what_the_k_of_n_rule_acts_on():
    rng = np.random.default_rng(0)
    t = np.arange(400) * 60.0  # a window a minute, on bucket boundaries of a 1,800-s span
    s = np.clip(rng.normal(0.45, 0.05, 400) + np.where(np.arange(400) > 250, 0.2, 0.0), 0, 1)
    thr = 0.6
    smooth = dq.span_score(t, s, 1800, 0.5)
    rule = AlarmRule({"span_s": 1800, "raise_fraction": 0.5, "clear_fraction": 0.0, "min_windows": 1})
    for i in range(len(s)):
        rule.push(t[i], s[i], s[i] > thr)
        assert (rule.share >= 0.5) == (smooth[i] > thr), i
    assert dq.roc_auc(smooth[:200], smooth[300:]) == 1.0


def test_a_held_out_rate_comes_with_its_exact_interval():
    assert dq.rate_interval(0, 0) is None
    low, high = dq.rate_interval(0, 1722)
    assert low == 0.0 and 0.0017 < high < 0.0022  # about 3 / n for none seen
    low, high = dq.rate_interval(1, 50)  # 2% seen, compatible with a 0.5% rate
    assert low < 0.005 < 0.02 < high
    assert dq.rate_interval(28, 1722)[0] > 0.005  # 1.6% of 1,722 is not


def test_the_report_shows_how_far_a_healthy_part_moved_when_its_held_out_windows_alarm():
    from tinyml_dagster.report.generate import detection_markdown

    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(0, 1, 2000), rng.normal(5, 1, 2000) + np.where(np.arange(2000) >= 1000, 2, 0)])
    train = np.arange(2000) < 1000
    drift = dq.healthy_drift(X, train, ~train, ("a", "b"))
    assert abs(drift["a"][0] - drift["a"][2]) < 0.2 and abs(drift["b"][2] - drift["b"][0] - 2) < 0.2
    assert drift["b"][1] > drift["b"][0] and dq.healthy_drift(X, train, np.zeros(2000, bool), ("a", "b")) == {}
    record = {"source": "rig", "bearing": 3, "feature_set": "wear", "model": "firmware", "threshold_mode":
              "calibrated", "failing": True, "auc": 0.99, "auc_window": 0.9, "fa_rate_heldout": 0.016,
              "fa_rate_heldout_ci95": dq.rate_interval(28, 1722), "target_fa": 0.002, "heldout_drift": drift,
              "alarms_in_healthy": 0, "alarms_after_recording_onset": 0, "first_alarm_h_before_failure": 50.0,
              "first_alarm_h_after_onset": 3.0}
    text = "\n".join(detection_markdown([record], None, []))
    assert "how the held-out part differs" in text and "| rig | 3 | b |" in text
    calm = {**record, "fa_rate_heldout_ci95": dq.rate_interval(1, 1722)}
    assert "how the held-out part differs" not in "\n".join(detection_markdown([calm], None, []))


def test_detection_records_and_json(tmp_path):
    cfg = dq.DetectionConfig(sources=("ims-set2-files",), sklearn=False, n_trees=20)
    records = dq.detection_records(cfg, log=lambda *_: None)
    assert {(r["bearing"], r["feature_set"], r["threshold_mode"]) for r in records} == {
        (b, fs, m) for b in (1, 2, 3, 4) for fs, m in (("paper", "calibrated"), ("paper", "paper-0.6"),
                                                       ("wear", "calibrated"))}
    b1 = next(r for r in records if r["bearing"] == 1 and r["feature_set"] == "wear")
    assert b1["failing"] and b1["features"] == list(dq.WEAR_TIME_DOMAIN) and "20 kHz" in b1["note"]
    assert b1["auc"] > 0.7 and b1["auc_window"] > 0.9 and b1["fa_rate_heldout"] <= 0.05
    assert b1["first_alarm_h_before_failure"] is not None and b1["first_alarm_h_before_failure"] > 0
    assert all(r["auc"] is None and r["first_alarm_h_before_failure"] is None for r in records if not r["failing"])
    paper = next(r for r in records if r["bearing"] == 1 and r["threshold_mode"] == "paper-0.6")
    assert paper["threshold"] == 0.6
    path = dq.write_detection(records, tmp_path / "detection.json")
    doc = json.loads(path.read_text())
    assert doc["default_feature_set"] == "wear" and len(doc["records"]) == len(records)
    for key in ("source", "bearing", "feature_set", "failing", "auc", "fa_rate_heldout", "fa_rate_heldout_ci95",
                "alarms_in_healthy", "alarms_after_recording_onset", "first_alarm_h_before_failure"):
        assert key in doc["records"][0]
    with pytest.raises(ValueError, match="unknown source 'ims-set9'"):
        dq.detection_records(dq.DetectionConfig(sources=("ims-set9",)), log=lambda *_: None)


def test_healthy_part_ends_at_the_recordings_first_onset():
    """Bearings on one shaft see each other: a recording is healthy until its first labelled onset."""
    assert dq.recording_onset(dq.IMS_LABELS["ims-set1-files"]) == 1400  # bearing 4 degrades before bearing 3
    assert dq.recording_onset(dq.IMS_LABELS["ims-set2-files"]) == 530
    assert dq.recording_onset({1: dq.BearingLabels(False), 2: dq.BearingLabels(False)}) is None
    assert all(ch.healthy_until == 1400 for ch in dq.ims_file_channels("ims-set1-files"))


def test_the_real_raw_files_through_the_devices_extraction_are_a_source():
    b3, b4 = dq.raw_segment_channels()
    assert (b3.bearing, b4.bearing) == (3, 4) and not b3.lead_time
    assert set(np.unique(b3.file)) == set(range(50)) | set(range(2150, 2156))
    assert b3.features["wear"].shape == (2 * 56, 7) and b3.features["paper"].shape == (2 * 56, 3)
    records = dq.detection_records(dq.DetectionConfig(sources=(dq.RAW_SOURCE,), sklearn=False, n_trees=20),
                                   log=lambda *_: None)
    wear = [r for r in records if r["feature_set"] == "wear"]
    # the first 25 healthy files train, the other 25 are held out, the last 6 files are failed
    assert [(r["n_train"], r["n_heldout_healthy"], r["n_degraded"]) for r in wear] == [(50, 50, 12)] * 2
    assert all(r["auc_window"] > 0.9 and r["first_alarm_h_before_failure"] is None for r in wear)
    assert not any(r["lead_time_measured"] for r in wear)


def test_models_train_on_the_first_share_of_the_windows_and_only_healthy_ones():
    """A share of the windows, not of calendar time: set 1's long stops would leave a quarter of its time 252 files."""
    for source, last_train_file in (("ims-set1-files", 538), ("ims-set2-files", 244)):
        for ch in dq.ims_file_channels(source):
            train = dq.training_windows(ch, 0.25)
            n = int(0.25 * len(ch.t))
            assert train[:n].all() and not train[n:].any()
            assert ch.file[train].max() == last_train_file < ch.healthy_until
    b4 = dq.ims_file_channels("ims-set1-files")[3]
    with pytest.raises(ValueError, match="training windows reach file 1508, past the healthy part .before file 1400"):
        dq.training_windows(b4, 0.7)
    with pytest.raises(ValueError, match="train_fraction must be in"):
        dq.training_windows(b4, 0.0)
