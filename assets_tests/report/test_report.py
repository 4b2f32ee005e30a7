"""The report: detection-quality metrics, the packaged real IMS excerpt, the KB episodes, and the generator itself."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io

from tinyml_dagster import detection_quality as dq
from tinyml_dagster import subsampling
from tinyml_dagster.report import generate
from tinyml_dagster.knowledge_base import KnowledgeBase, Upload

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_roc_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    healthy = np.round(rng.normal(0.45, 0.05, 300), 2)  # rounding makes ties
    eol = np.round(rng.normal(0.52, 0.08, 80), 2)
    y = np.r_[np.zeros(len(healthy)), np.ones(len(eol))]
    assert dq.roc_auc(healthy, eol) == pytest.approx(roc_auc_score(y, np.r_[healthy, eol]), abs=1e-12)
    assert dq.roc_auc([0.1, 0.2], [0.3]) == 1.0
    assert dq.roc_auc([0.5, 0.5], [0.5]) == 0.5
    assert dq.roc_auc([], [0.3]) is None


def test_first_alarm_needs_a_run_after_monitoring_starts():
    life = np.linspace(0, 1, 11)
    alarms = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1], bool)
    assert dq.first_alarm(alarms, life, run=3) is None  # the early run is in the training period; 9-10 is too short
    alarms[8] = True
    assert dq.first_alarm(alarms, life, run=3) == 7
    assert dq.first_alarm(alarms, life, run=1) == 7
    files, snap = dq.snapshot_alarms(np.array([0, 0, 1, 1, 2, 2]), np.array([1, 0, 0, 0, 1, 1], bool))
    assert files.tolist() == [0, 1, 2] and snap.tolist() == [True, False, True]


def test_packaged_real_excerpt_is_the_real_recording():
    """The excerpt's segments equal the pipeline's subsampling of the real files kept as the forest's fixtures."""
    ex = dq.real_excerpt()
    first24 = np.load(FIXTURES / "forest" / "set1_first24_b3x_b4x.npz")["milli_g"] / 1000.0  # (24, 20480, 2)
    want = subsampling.subsample(first24, dq.REAL_SEGMENT_RATE_HZ, 20000, axis=1)
    np.testing.assert_allclose(ex["healthy_2khz"][:24], want, atol=1e-6)
    end_b3 = scipy.io.loadmat(FIXTURES / "forest" / "IF.mat")["data"].ravel().reshape(6, 20480)
    np.testing.assert_allclose(ex["eol_2khz"][:, :, 0], subsampling.subsample(end_b3, 2000, 20000, axis=1), atol=1e-6)
    assert ex["file_features"].shape == (2156, 8, 3)
    # per-file mean of the first real file, bearing 3 x, against the raw signal of the fixture
    assert ex["file_features"][0, 4, 0] == pytest.approx(first24[0, :, 0].mean(), abs=2e-5)
    windows = dq.real_segment_windows(500, ex)
    assert set(windows.bearing) == {3, 4} and set(windows.split) == {"train", "test"}
    assert windows[windows.split == "test"].life_fraction.min() > 0.99


def test_detection_quality_separates_the_failing_bearing():
    cfg = dq.QualityConfig(n_files=80, rates=(2000,), tree_counts=(10,), bearings=(1, 3), real=False)
    df = dq.evaluate(cfg, log=lambda *_: None)
    assert len(df) == 2 * 2  # 2 bearings x 1 size x (firmware, sklearn)
    b3 = df[(df.bearing == 3) & (df.model == "firmware")].iloc[0]
    b1 = df[(df.bearing == 1) & (df.model == "firmware")].iloc[0]
    assert b3.auc > 0.9 and b3.fails and b3.lead_time_h > 0
    assert 0.2 < b1.auc < 0.8 and not b1.fails
    assert df.fa_rate.between(0, 0.2).all()
    with pytest.raises(ValueError, match="no feature windows"):
        dq.evaluate_windows(pd.DataFrame(columns=["rate_hz"]), "empty", cfg)


def test_false_positive_episodes_from_a_real_knowledge_base(tmp_path):
    kb = KnowledgeBase(tmp_path / "kb.sqlite")

    def window(seq, kind, champion="0"):  # champion: the version tag the device puts on what it scored
        return Upload("dev-1", seq, kind, features=(0.0, 0.1, 0.2), champion_id=champion, champion_score=0.7,
                      champion_decision=int(kind == "anomaly"))

    kb.set_champion("dev-1", "first-model", source="device")
    ids = kb.ingest([window(i, "anomaly" if i % 2 else "normal") for i in range(10)]).upload_ids
    pool = kb.pool_id(["p"])
    # 5 anomalies, the pool rejects 4 of them: 4 false positives in 10 windows
    kb.store_decisions(pool, ["p"], [(u, 0, 1, int(i == 9), int(i % 2 == 1 and i != 9), b"", [1])
                                     for i, u in enumerate(ids)])
    kb.set_champion("dev-1", "second-model", source="deploy")
    ids = kb.ingest([window(10 + i, "anomaly" if i == 3 else "normal", "1") for i in range(20)]).upload_ids
    kb.store_decisions(pool, ["p"], [(u, 0, 1, 0, int(i == 3), b"", [1]) for i, u in enumerate(ids)])
    kb.close()
    ep = generate.false_positive_episodes(tmp_path / "kb.sqlite")
    assert ep.champion.tolist() == ["first-model", "second-model"]
    assert ep.windows_decided.tolist() == [10, 20]
    assert ep.false_positives.tolist() == [4, 1]
    assert ep.fp_rate.tolist() == pytest.approx([0.4, 0.05])
    windows, changes = generate.false_positive_timeline(tmp_path / "kb.sqlite")
    assert len(windows) == 30 and windows.false_positive.sum() == 5
    assert changes.model_id.tolist() == ["first-model", "second-model"]
    assert changes.since_upload_id.tolist() == [0, windows.upload_id.iloc[9]]
    png = generate.plot_loop(ep, tmp_path / "plots", (windows, changes))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_generator_runs_on_a_small_configuration(tmp_path, data_dir):
    path = generate.build(generate.SMALL, tmp_path / "docs", log=lambda *_: None)
    text = path.read_text()
    for heading in ("## Device time (Fig. 3a, 3b, 3c)", "## Deploy (Fig. 4a, 4b)", "## Detection quality",
                    "### What follows for the default sampling rate", "## Detection per feature set on whole lives",
                    "## Closing note"):
        assert heading in text
    detection = json.loads((tmp_path / "data" / "bench" / "detection.json").read_text())
    assert detection["default_feature_set"] == "wear"
    assert {r["source"] for r in detection["records"]} == {"synthetic-2khz", "ims-set1-files", "ims-set2-files",
                                                          "ims-set1-raw-2khz"}
    assert "detection, default set (wear): " in text
    assert "ns per instruction" in text and "8.7 ms" in text
    pngs = sorted((tmp_path / "docs" / "results").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"fig3a_inference_bearing1.png", "fig3c_load.png", "quality_synthetic.png", "score_over_life.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"(results/{p.name})" in text
    csv = pd.read_csv(tmp_path / "data" / "report" / "detection_quality.csv")
    assert len(pd.read_csv(tmp_path / "docs" / "results" / "detection_quality.csv")) == len(csv)
    assert set(csv.source) == {"synthetic", "ims-real-segments", "ims-real-files"}
    assert csv.auc.dropna().between(0, 1).all()


def test_a_runs_plot_is_a_png_in_dagster_markdown():
    import base64
    import io

    import dagster as dg
    from matplotlib.image import imread

    from tinyml_dagster.report.inline import bar_plot, line_plot

    for value in (bar_plot("t", "y", ["a", "b"], {"s1": [1, 2], "s2": [2, 1]}, "two series"),
                  line_plot("t", "x", "y", {"l": ([0, 1], [0, 2])}, "one line")):
        assert isinstance(value, dg.MarkdownMetadataValue)
        data = value.md_str.split("base64,")[1].split(")")[0]
        height, width, _ = imread(io.BytesIO(base64.b64decode(data))).shape
        assert width >= 400 and height >= 200


def test_definitions_still_load_with_the_report_metadata():
    import dagster as dg

    from tinyml_dagster.definitions import defs

    d = defs() if callable(defs) else defs
    keys = {k.to_user_string() for k in d.get_repository_def().asset_graph.get_all_asset_keys()}
    assert {"candidate_models", "model_packages", "deployed_champion"} <= keys
    assert isinstance(d, dg.Definitions)


def test_model_packages_materialization_plots_its_own_packages(tmp_path, data_dir):
    """A real Dagster materialization carries a plot of the link time of the packages it measured."""
    import random

    import dagster as dg

    from firmware import isoforest
    from tinyml_dagster.defs.deploy.assets import model_packages
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.resources import gateway_resources
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(tmp_path / "data" / "models")
    rng = random.Random(3)
    rows = [[rng.gauss(0, 0.02), rng.gauss(0, 0.3), rng.gauss(0.5, 0.8)] for _ in range(200)]
    repo.add(isoforest.train(rows, 10, 100, 1), threshold=0.6, rate_hz=500)
    result = dg.materialize([model_packages], resources=gateway_resources(GatewayResource()))
    assert result.success
    meta = result.asset_materializations_for_node("model_packages")[0].metadata
    assert "](data:image/png;base64,iVBOR" in meta["link_seconds"].value
    (mpy,) = meta["mpy_bytes"].value.values()  # the precompiled package, built with mpy-cross
    (compact,) = meta["compact_bytes"].value.values()
    assert compact < mpy < 2 * compact
