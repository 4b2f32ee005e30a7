"""Feature sets: every set gives the same numbers on the real MicroPython VM as its numpy twin; the "wear" set's
features mean what their names say."""

import array
import json

import numpy as np
import pytest
import scipy.stats

from firmware import feature_sets
from firmware import features_wear as wear
from tinyml_dagster import features as tf
from tinyml_dagster.micropython_vm import MicroPythonVM

WINDOW = 1000  # 500 ms at 2 kHz


def _signals(seed=0):
    """Windows of different kinds, float32 like the device's samples: (n_windows * WINDOW,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / 2000.0
    parts = [
        rng.standard_t(4, WINDOW) * 0.04 - 0.1,  # healthy, heavy-tailed, around an offset
        np.clip(rng.standard_t(3, WINDOW) * 1.5, -5, 5),  # loud and clipped
        np.sin(2 * np.pi * 700 * t) * 0.3 + rng.normal(0, 0.01, WINDOW),  # a tone high in the band
        np.full(WINDOW, 0.25),  # flat
        np.where(np.arange(WINDOW) % 97 == 0, 3.0, 0.0) + rng.normal(0, 0.02, WINDOW),  # impacts
    ]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("name", feature_sets.NAMES)
def test_feature_set_agrees_with_its_numpy_twin_on_micropython_vm(name):
    x = _signals()
    code = (
        "import array, json\nfrom firmware import feature_sets\n"
        f"x = array.array('f', {json.dumps(x.tolist())})\n"
        f"extract = feature_sets.extractor({name!r})\n"
        f"print(json.dumps([list(extract(x[s:s + {WINDOW}])) for s in range(0, len(x), {WINDOW})]))\n"
    )
    r = MicroPythonVM(heap_bytes=4 * 1024 * 1024, memory_bytes=16 * 1024 * 1024).run(code=code).check()
    on_device = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    fs = tf.feature_set(name)
    twin = fs.compute(x, WINDOW)
    assert on_device.shape == twin.shape == (5, len(fs.names))
    np.testing.assert_allclose(on_device, twin, rtol=1e-9, atol=1e-12)
    # and CPython running the firmware module agrees too (the gateway's trainers use the twin)
    here = [feature_sets.extractor(name)(array.array("f", x[s:s + WINDOW])) for s in range(0, len(x), WINDOW)]
    np.testing.assert_allclose(here, twin, rtol=1e-12, atol=1e-12)


def test_wear_features_mean_what_they_say():
    x = _signals(1).astype(np.float64).reshape(5, WINDOW)
    f = tf.feature_set("wear").compute(x.astype(np.float32), WINDOW)[:, 0, :]
    names = list(wear.FEATURE_NAMES)
    col = {n: f[:, names.index(n)] for n in names}
    for k in (0, 1, 4):  # quantised to ~50 steps per standard deviation: close to the exact statistics
        seg = x[k]
        assert col["log_rms"][k] == pytest.approx(np.log10(seg.std()), abs=0.01)
        assert col["skewness"][k] == pytest.approx(scipy.stats.skew(seg), abs=0.05 + 0.02 * abs(scipy.stats.skew(seg)))
        assert col["kurtosis"][k] == pytest.approx(scipy.stats.kurtosis(seg), rel=0.03, abs=0.1)
        assert col["crest"][k] == pytest.approx(np.abs(seg - seg.mean()).max() / seg.std(), rel=0.03)
    # the three bands split the power: their powers add up to the window's
    p = 10 ** (2 * f[:, 4:7])
    np.testing.assert_allclose(p[[0, 1, 2, 4]].sum(axis=1), 10 ** (2 * col["log_rms"][[0, 1, 2, 4]]), rtol=1e-6)
    # a 700 Hz tone at 2 kHz (w = 0.7 pi) splits as the bands' power responses say, mostly into the high band
    c = np.cos(0.7 * np.pi)
    np.testing.assert_allclose(p[2] / p[2].sum(), [(1 - c) ** 2 / 4, (1 - c * c) / 2, (1 + c) ** 2 / 4], atol=0.01)
    # impacts are impulsive: kurtosis and crest far above the healthy window's
    assert col["kurtosis"][4] > 20 and col["crest"][4] > 3 * col["crest"][0] / 2
    # a flat window: no spread, no shape, every power at the quantisation floor
    assert tuple(f[3, 1:4]) == (0.0, 0.0, 0.0) and f[3, 0] == f[3, 4] == f[3, 5] == f[3, 6]


def test_feature_set_registry_and_bad_parameters():
    assert set(tf.FEATURE_SETS) == set(feature_sets.NAMES) and tf.DEFAULT_FEATURE_SET == "wear"
    for name, fs in tf.FEATURE_SETS.items():
        mod = feature_sets.module(name)
        assert fs.names == tuple(mod.FEATURE_NAMES) and len(fs.names) == mod.N_FEATURES
        assert fs.version == mod.VERSION and fs.script().startswith(b'"""')
    assert tf.feature_set("wear").config() == {"feature_set": "wear", "feature_set_version": 1,
                                               "feature_params": {"steps": 256}}
    with pytest.raises(ValueError, match="unknown feature set 'fft'"):
        tf.feature_set("fft")
    with pytest.raises(ValueError, match="unknown feature set 'fft'"):
        feature_sets.extractor("fft")
    with pytest.raises(ValueError, match="unknown parameter gain"):
        feature_sets.extractor("wear", {"gain": 2})
    with pytest.raises(ValueError, match="steps must be an integer"):
        feature_sets.extractor("wear", {"steps": 2.5})
    with pytest.raises(ValueError, match="paper: unknown parameters steps"):
        feature_sets.extractor("paper", {"steps": 256})
    with pytest.raises(ValueError, match="holds no window"):
        tf.feature_set("wear").compute(np.zeros(10), WINDOW)


def test_a_wear_model_names_its_set_and_its_package_carries_the_set_module(tmp_path):
    from firmware import isoforest, package as fpkg
    from firmware.local_inference import ChampionError, load_champion
    from tinyml_dagster import deployment_agent as da
    from tinyml_dagster.model_repository import ModelRepository

    x = _signals(3)
    rows = tf.feature_set("wear").compute(x, 100).tolist()
    forest = isoforest.train(rows, 5, 16, 1)
    repo = ModelRepository(tmp_path / "models")
    mid = repo.add(forest, training={"bearing": 3}, rate_hz=2000, feature_set="wear")
    cfg = repo.config(mid)
    assert cfg["feature_set"] == "wear" and cfg["feature_names"] == list(wear.FEATURE_NAMES)
    assert cfg["feature_params"] == {"steps": 256} and repo.get(mid)["feature_schema"]["feature_set"] == "wear"
    pkg = da.package_model(repo, mid, device_id="dev-a", version=1, key=bytes(32))
    path = tmp_path / "p.pkg"
    path.write_bytes(pkg.data)
    out = tmp_path / "out"
    out.mkdir()
    fpkg.extract(str(path), fpkg.verify(str(path), bytes(32), "dev-a", 0), str(out))
    assert (out / "features.py").read_bytes() == tf.feature_set("wear").script()
    got, got_cfg = load_champion(str(out))
    assert got.n_features == 7 and feature_sets.of_config(got_cfg) == ("wear", {"steps": 256})
    # a config naming a set whose feature count is not the forest's is refused, naming both
    bad = dict(got_cfg, feature_set="paper", feature_params={})
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ChampionError, match="forest of 7 features for feature set paper of 3"):
        load_champion(str(out))
    # paper models keep the config they always had (no feature-set fields: their content hashes do not move)
    paper = repo.add(isoforest.train([r[:3] for r in rows], 5, 16, 1), training={"bearing": 3}, rate_hz=2000)
    assert "feature_set" not in repo.config(paper)


def test_feature_windows_of_another_set_are_stored_beside_the_papers(tmp_path):
    rng = np.random.default_rng(5)
    signals = rng.standard_t(4, (3, 2048, 8)) * 0.1
    ts = np.array(["2003-10-22T12:06:24", "2003-10-22T12:16:24", "2003-10-22T12:56:24"], dtype="datetime64[ns]")
    df = tf.feature_windows_frame(signals, ts, 2000, 3, feature_set="wear")
    assert list(df.columns[-7:]) == list(wear.FEATURE_NAMES) and len(df) == 3 * 2 * 2
    x32 = signals[1, 1000:2000, 5].astype(np.float32)  # file 1, window 1, bearing 3 y
    row = df[(df.file_index == 1) & (df.window_index == 1) & (df.axis == "y")].iloc[0]
    np.testing.assert_allclose(row[list(wear.FEATURE_NAMES)].to_numpy(float),
                               feature_sets.extractor("wear")(array.array("f", x32.tolist())), rtol=1e-12)
    path = tf.feature_windows_path(2000, 3, "wear", tmp_path)
    assert path.parent.name == "set=wear"
    tf.write_feature_windows(df, path, "wear")
    tf.write_feature_windows(
        tf.feature_windows_frame(signals, ts, 2000, 3), tf.feature_windows_path(2000, 3, "paper", tmp_path)
    )
    got = tf.load_feature_windows(2000, 3, data_dir=tmp_path, feature_set="wear")
    assert list(got.columns) == tf.schema_of("wear").names and len(got) == 12
    assert list(tf.load_feature_windows(2000, data_dir=tmp_path).columns) == list(tf.COLUMNS)  # the paper's alone


def test_a_device_champion_on_wear_enters_the_repository_with_its_set(tmp_path):
    import struct

    from firmware import isoforest
    from tinyml_dagster.defs.loop.assets import add_device_champion
    from tinyml_dagster.model_repository import ModelRepository

    rows = tf.feature_set("wear").compute(_signals(6), 100).tolist()
    forest = isoforest.train(rows, 5, 16, 1)
    cfg = {"model_id": "local-d1", "version": 0, "grid": forest.grid, "threshold": 0.6, "feature_set": "wear",
           "feature_params": {"steps": 256}}
    raw = json.dumps(cfg).encode()
    blob = struct.pack("<H", len(raw)) + raw + forest.to_bytes()
    repo = ModelRepository(tmp_path)
    mid = add_device_champion(repo, "d1", blob, 0.0, 10.0, 3)
    assert repo.config(mid)["feature_set"] == "wear" and repo.get(mid)["lineage"]["device_id"] == "d1"
