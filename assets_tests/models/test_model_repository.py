"""The model repository (files + index, versions, lineage) and the candidate_models asset with its checks."""

import json

import dagster as dg
import numpy as np
import pytest

from firmware import isoforest as iso
from tinyml_dagster.model_repository import (
    ModelNotFoundError,
    ModelRepository,
    ModelRepositoryError,
    content_hash,
)


def _forest(seed=1, n_trees=10, n=300):
    rows = np.random.default_rng(seed).normal(size=(n, 3)).tolist()
    return iso.train(rows, n_trees, 64, seed)


def test_add_get_list_load_round_trip(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    forest = _forest()
    mid = repo.add(forest, lineage={"source": "gateway"}, threshold=0.6, rate_hz=500, seed=1,
                   training={"bearing": 3, "split": "train", "n_windows": 300},
                   metrics={"anomaly_rate_train": 0.05, "anomaly_rate_later": 0.2})
    assert mid.startswith("b3-t10-") and len(mid) == len("b3-t10-") + 8
    meta = repo.get(mid)
    for field in ("model_id", "content_hash", "hyperparameters", "seed", "training", "feature_schema",
                  "size_bytes", "anomaly_rate_train", "anomaly_rate_later", "lineage", "version", "threshold"):
        assert field in meta, field
    assert meta["hyperparameters"] == {"n_trees": 10, "psi": 64, "height_limit": 6, "threshold": 0.6}
    assert meta["feature_schema"] == {"names": ["mean", "skewness", "kurtosis"], "order": [0, 1, 2],
                                      "rate_hz": 500, "window_ms": 500, "feature_set": "paper"}
    assert meta["size_bytes"] == len(forest.to_bytes())
    assert meta["content_hash"] == content_hash(forest.to_bytes(), repo.config(mid))
    assert [e["model_id"] for e in repo.list()] == [mid] == repo.ids()
    loaded, cfg = repo.load(mid)
    assert loaded.to_bytes() == forest.to_bytes() and cfg["grid"] == forest.grid and cfg["threshold"] == 0.6
    x = [0.1, -0.2, 0.3]
    assert loaded.score(x) == forest.score(x)


def test_adding_never_overwrites_and_retraining_adds_versions(tmp_path):
    repo = ModelRepository(tmp_path)
    training = {"bearing": 1}
    first = repo.add(_forest(seed=1), training=training)
    files = {p.name: p.read_bytes() for p in repo.path(first).iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in repo.path(first).iterdir()}
    assert repo.add(_forest(seed=1), training=training) == first  # same content: the same model
    second = repo.add(_forest(seed=2), training=training)  # retrained: a new version of the family
    assert second != first
    assert [repo.get(m)["version"] for m in (first, second)] == [1, 2]
    assert repo.get(first)["family"] == repo.get(second)["family"] == "b1-t10"
    assert {p.name: p.read_bytes() for p in repo.path(first).iterdir()} == files
    assert {p.name: p.stat().st_mtime_ns for p in repo.path(first).iterdir()} == mtimes
    assert len(repo.list(family="b1-t10")) == 2


def test_device_champion_keeps_its_lineage(tmp_path):
    repo = ModelRepository(tmp_path)
    lineage = {"source": "device", "device_id": "esp32-01", "window_from": "2003-10-22T12:06:24",
               "window_to": "2003-10-23T01:00:00"}
    mid = repo.add(_forest(seed=5, n_trees=20), lineage=lineage, threshold=0.65)
    assert mid.startswith("esp32-01-t20-")
    meta = repo.get(mid)
    assert meta["source"] == "device" and meta["lineage"] == lineage and meta["threshold"] == 0.65
    assert [m["model_id"] for m in repo.list(source="device")] == [mid]
    assert repo.list(source="gateway") == []


def test_damage_is_detected_and_the_index_recovers(tmp_path):
    repo = ModelRepository(tmp_path)
    a = repo.add(_forest(seed=1), training={"bearing": 2})
    b = repo.add(_forest(seed=2), training={"bearing": 2})
    # a lost or damaged index is rebuilt from the model directories
    (tmp_path / "index.json").write_text("{not json")
    assert repo.ids() == [a, b]
    (tmp_path / "index.json").unlink()
    assert repo.ids() == [a, b]
    assert [e["model_id"] for e in repo.rebuild_index()] == [a, b]
    # a model directory that was renamed into place but not indexed (crash in between) still shows up
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps(index[:1]))
    assert repo.ids() == [a, b]
    # tampered bytes are refused, naming the file
    path = repo.path(a) / "forest.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match="forest.bin: content hash"):
        repo.load_forest(a)
    with pytest.raises(ModelNotFoundError, match="not found"):
        repo.get("b9-t10-00000000")
    with pytest.raises(ModelNotFoundError, match="not a model id"):
        repo.get("../etc")
    with pytest.raises(ValueError, match="threshold must be in"):
        repo.add(_forest(), threshold=1.5)
    with pytest.raises(ModelNotFoundError, match="unknown models"):
        repo.set_candidates([a, "b9-t10-00000000"])


@pytest.fixture(scope="module")
def pipeline_data(tmp_path_factory):
    """A small real recording run through the data assets: feature windows at 500 Hz for the 4 bearings."""
    from tinyml_dagster.defs.data.assets import materialize_data

    root = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYML_DATA_DIR", str(root))
    mp.delenv("TINYML_IMS_DIR", raising=False)
    results = materialize_data(rates_hz=(500,), n_files=40, instance=dg.DagsterInstance.ephemeral())
    assert all(r.success for r in results)
    yield root
    mp.undo()


def _materialize(root, seed=0):
    from tinyml_dagster.defs.models.assets import candidate_models
    from tinyml_dagster.defs.models.checks import (
        candidate_models_flag_a_sane_share_of_training,
        candidate_models_run_on_firmware,
    )
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.models.resources import ModelRepositoryResource

    return dg.materialize(
        [candidate_models, candidate_models_run_on_firmware, candidate_models_flag_a_sane_share_of_training],
        resources={"model_repository": ModelRepositoryResource(gateway=GatewayResource(data_dir=str(root)))},
        run_config={"ops": {"candidate_models": {"config": {"seed": seed, "rate_hz": 500}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_candidate_models_asset_trains_20_verified_candidates(pipeline_data, monkeypatch):
    monkeypatch.setenv("TINYML_DATA_DIR", str(pipeline_data))
    result = _materialize(pipeline_data)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"runs_on_firmware": True, "sane_training_anomaly_rate": True}
    repo = ModelRepository(pipeline_data / "models")
    ids = repo.candidate_ids()
    assert len(ids) == 20 and len(set(ids)) == 20
    metas = repo.candidates()
    assert sorted((m["training"]["bearing"], m["hyperparameters"]["n_trees"]) for m in metas) == [
        (b, t) for b in (1, 2, 3, 4) for t in (10, 20, 30, 40, 50)]
    for m in metas:
        assert m["training"]["split"] == "train" and m["training"]["life_fraction"][1] < 0.6
        assert m["hyperparameters"]["psi"] == min(100, m["training"]["n_windows"])
        assert m["threshold"] == 0.6 and 0 < m["anomaly_rate_train"] < 0.5
        assert m["anomaly_rate_later"] is not None and m["lineage"]["run_id"] == result.run_id
    md = result.asset_materializations_for_node("candidate_models")[0].metadata
    assert md["models"].value == 20
    assert "](data:image/png;base64,iVBOR" in md["anomaly_rates"].value  # this run's candidates, plotted
    table = md["candidates"].value.splitlines()  # both encodings' package sizes for every candidate
    assert "package compact B" in table[0] and "package json B" in table[0] and len(table) == 22
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0 < int(cells[5]) < int(cells[6])
    # the same data and seed again: the same 20 models, no new versions; a new seed adds 20 new versions
    assert _materialize(pipeline_data).success and len(repo.list()) == 20
    before = {m: (repo.path(m) / "forest.bin").read_bytes() for m in ids}
    assert _materialize(pipeline_data, seed=1).success
    assert len(repo.list()) == 40 and set(repo.candidate_ids()).isdisjoint(ids)
    assert {repo.get(m)["version"] for m in repo.candidate_ids()} == {2}
    assert {m: (repo.path(m) / "forest.bin").read_bytes() for m in ids} == before


def test_candidate_models_names_the_feature_partitions_it_misses(pipeline_data, monkeypatch):
    monkeypatch.setenv("TINYML_DATA_DIR", str(pipeline_data))
    instance = dg.DagsterInstance.ephemeral()
    from tinyml_dagster.defs.models.assets import candidate_models
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.models.resources import ModelRepositoryResource

    repository = ModelRepositoryResource(gateway=GatewayResource(data_dir=str(pipeline_data / "elsewhere")))
    result = dg.materialize([candidate_models], instance=instance, raise_on_error=False,
                            resources={"model_repository": repository},
                            run_config={"ops": {"candidate_models": {"config": {"rate_hz": 1000, "bearings": [2, 3]}}}})
    assert not result.success
    (failure,) = [e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_failure]
    why = failure.dagster_event.step_failure_data.user_failure_data.description
    assert "feature_windows partitions 2|1000, 3|1000 are not materialised" in why
    assert not (pipeline_data / "m").exists() or not ModelRepository(pipeline_data / "m").list()


def test_firmware_check_fails_on_a_model_the_firmware_cannot_run(tmp_path):
    from tinyml_dagster.defs.models.checks import candidate_models_run_on_firmware
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.models.resources import ModelRepositoryResource

    repo = ModelRepository(tmp_path / "models")
    good = repo.add(_forest(seed=1), training={"bearing": 1}, rate_hz=500)
    odd = repo.add(_forest(seed=2), training={"bearing": 1}, rate_hz=500, feature_names=("rms", "peak", "crest"))
    slow = repo.add(_forest(seed=3), training={"bearing": 1}, rate_hz=333)
    resource = ModelRepositoryResource(gateway=GatewayResource(data_dir=str(tmp_path)))
    repo.set_candidates([good])
    assert candidate_models_run_on_firmware(resource).passed
    repo.set_candidates([good, odd, slow])
    result = candidate_models_run_on_firmware(resource)
    assert not result.passed
    failures = result.metadata["failures"].data
    assert set(failures) == {odd, slow}
    assert "features" in failures[odd][0] and "rate 333 Hz" in failures[slow][0]


def test_definitions_hold_the_models_domain():
    from tinyml_dagster.definitions import defs

    d = defs()
    assert d.resolve_assets_def("candidate_models") is not None
    check_keys = {k.name for k in d.resolve_asset_graph().asset_check_keys}
    assert {"runs_on_firmware", "sane_training_anomaly_rate"} <= check_keys


def test_training_rejects_bad_windows_naming_them(tmp_path):
    import pandas as pd

    from tinyml_dagster.training import train_candidates

    rng = np.random.default_rng(0)
    n = 50
    df = pd.DataFrame({
        "timestamp": pd.date_range("2003-10-22", periods=n, freq="10min"), "file_index": np.arange(n),
        "window_index": 0, "bearing": 3, "axis": "x", "rate_hz": 500, "life_fraction": np.linspace(0, 1, n),
        "split": np.where(np.linspace(0, 1, n) < 0.6, "train", "test"),
        "mean": rng.normal(size=n), "skewness": rng.normal(size=n), "kurtosis": rng.normal(size=n)})
    repo = ModelRepository(tmp_path)
    bad = df.copy()
    bad.loc[7, "kurtosis"] = np.nan
    with pytest.raises(ValueError, match="bearing=3, axis=x, file_index=7, window_index=0 has a non-finite kurtosis"):
        train_candidates(bad, repo, rate_hz=500, bearings=(3,), tree_counts=(10,))
    with pytest.raises(ValueError, match="bearing 2: 0 training windows"):
        train_candidates(df, repo, rate_hz=500, bearings=(2,), tree_counts=(10,))
    assert repo.list() == []  # nothing half-written
    out = train_candidates(df, repo, rate_hz=500, bearings=(3,), tree_counts=(10, 20))
    assert [c.n_trees for c in out] == [10, 20] and len(repo.list()) == 2
    assert repo.get(out[0].model_id)["training"]["n_windows"] == int((df.split == "train").sum())
