"""Feature sets and alarms in the Knowledge Base, the link service and Dagster: an additive migration keeps an
existing Knowledge Base whole; windows of any length carry their set; only the pool of a set votes on its windows;
a device's ALARM reaches the Knowledge Base and the alarm sensor."""

import dagster as dg
import numpy as np
import pytest
from kb_backends import old_knowledge_base

from firmware import messages
from tinyml_dagster.knowledge_base import MIGRATIONS, KnowledgeBase, KnowledgeBaseError, Upload
from tinyml_dagster.pool_inference import PoolInferenceEngine


def _window(seq, features, feature_set="paper", anomaly=False):
    return Upload("d1", seq, "anomaly" if anomaly else "normal", features=features, champion_id="1",
                  champion_score=0.4, champion_decision=int(anomaly), window_start=seq * 0.5, feature_set=feature_set)


def test_migration_keeps_an_existing_knowledge_base(kb_location):
    # a Knowledge Base as the previous schema (version 2) left it
    old_knowledge_base(kb_location, 2, "INSERT INTO devices VALUES ('d0', 1, 1, 7)",
                       "INSERT INTO uploads (device_id, seq, kind, received_at, f_mean, f_skewness, f_kurtosis,"
                       " champion_decision) VALUES ('d0', 7, 'normal', 1, 0.1, 0.2, 0.3, 0)")
    kb = KnowledgeBase(kb_location)
    assert kb.schema_version() == len(MIGRATIONS) >= 4
    assert kb.query("SELECT f_mean, f_skewness, f_kurtosis, feature_set FROM uploads") == [(0.1, 0.2, 0.3, "paper")]
    assert kb.feature_vectors([1]) == [("paper", (0.1, 0.2, 0.3))]
    assert kb.alarms() == [] and kb.health_history("d0") == [] and kb.settings_updates() == []


def test_windows_carry_their_feature_set_and_only_its_pool_votes(kb_location):
    kb = KnowledgeBase(kb_location)
    wear = tuple(np.linspace(-1, 1, 7))
    kb.ingest([_window(1, (0.1, 0.2, 0.3)), _window(2, wear, "wear", anomaly=True), _window(3, (0.0, 0.1, 0.2))])
    assert [r[0] for r in kb.undecided()] == [1, 3]
    rows = kb.undecided(feature_set="wear")
    assert len(rows) == 1 and rows[0][0] == 2 and rows[0][2:-1] == wear and rows[0][-1] == 1
    assert kb.feature_vectors([2, 1]) == [("wear", wear), ("paper", (0.1, 0.2, 0.3))]
    with pytest.raises(KnowledgeBaseError, match="must hold 7 values .* of feature set wear"):
        kb.ingest([_window(4, (0.1, 0.2, 0.3), "wear")])
    with pytest.raises(KnowledgeBaseError, match="field feature_set: unknown feature set 'fft'"):
        kb.ingest([_window(4, (0.1, 0.2, 0.3), "fft")])
    # a pool of wear models decides the wear window only; the paper's windows wait for a paper pool
    from tinyml_dagster.pool_inference import FunctionCandidate

    seen = []
    pool = PoolInferenceEngine([FunctionCandidate("w1", lambda X: seen.append(X.shape) or np.full(len(X), 0.9))],
                               feature_set="wear")
    assert pool.decide_pending(kb).decided == 1 and seen == [(1, 7)]
    assert [r[0] for r in kb.undecided()] == [1, 3] and kb.undecided(feature_set="wear") == []


def test_alarm_events_are_stored_once_and_updated_when_cleared(kb_location):
    kb = KnowledgeBase(kb_location)
    a = kb.record_alarm("d1", 1000.0, None, 0.71, "wear", "b3-t50-x", 4, now=1.0)
    assert kb.record_alarm("d1", 1000.0, 1600.0, 0.69, "wear", "b3-t50-x", 4, now=2.0) == a
    (got,) = kb.alarms("d1")
    assert (got["start"], got["end"], got["peak_score"], got["feature_set"], got["champion_version"]) == \
        (1000.0, 1600.0, 0.71, "wear", 4)
    with pytest.raises(KnowledgeBaseError, match="end 900.0 before start 1000.0"):
        kb.record_alarm("d1", 1000.0, 900.0, 0.7, "wear")


def test_link_service_stores_a_devices_alarm(tmp_path):
    from tinyml_dagster.link_service import LinkService
    from tinyml_dagster.link_service.ports import SerialLink

    key = bytes(range(32))
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    service = LinkService(tmp_path / "kb.sqlite", keys={"esp-1": key}.get)
    link = SerialLink(service, "esp-1", "/dev/null")

    def sealed(body: bytes, k: bytes = key) -> bytes:
        return messages.seal(k, messages.TAG_ALARM, "esp-1", body)

    link._alarm(sealed(messages.pack_alarm(1000, 0, 0.8, 1, 3, "b3-t50-abc")), messages)
    link._alarm(sealed(messages.pack_alarm(1000, 1300, 0.75, 1, 3, "b3-t50-abc")), messages)
    link._alarm(sealed(b"\x01\x02"), messages)  # malformed: logged, nothing stored
    link._alarm(sealed(messages.pack_alarm(2000, 0, 0.9, 1, 3, "x"), bytes(32)), messages)  # forged: dropped
    service._record_writes(kb)
    (a,) = kb.alarms()
    assert (a["device_id"], a["start"], a["end"], a["peak_score"], a["feature_set"], a["champion_id"]) == \
        ("esp-1", 1000.0, 1300.0, pytest.approx(0.8), "wear", "b3-t50-abc")


def test_alarm_sensor_puts_alarms_on_the_device_partition(tmp_path):
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.loop.sensors import ALARM_ASSET, alarm_sensor
    from tinyml_dagster.defs.resources import gateway_resources

    def evaluate(**context):
        with dg.build_sensor_context(**context) as ctx:
            return alarm_sensor(ctx)

    path = tmp_path / "kb.sqlite"
    kb = KnowledgeBase(path)
    kb.ingest([_window(1, (0.1, 0.2, 0.3))])
    instance = dg.DagsterInstance.ephemeral()
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))
    result = evaluate(instance=instance, resources=resources)
    assert not result.asset_events
    kb.record_alarm("d1", 1000.0, None, 0.8, "wear", "m1", 2)
    result = evaluate(instance=instance, resources=resources)
    (obs,) = result.asset_events
    assert obs.asset_key == ALARM_ASSET and obs.partition == "d1"
    assert obs.metadata["alarm_state"].value == "active" and obs.metadata["alarm_feature_set"].value == "wear"
    again = evaluate(instance=instance, resources=resources, cursor=result.cursor)
    assert not again.asset_events


def test_normal_windows_of_a_feature_set_for_retraining(kb_location):
    kb = KnowledgeBase(kb_location)
    wear = tuple(np.linspace(-1, 1, 7))
    kb.ingest([_window(1, (0.1, 0.2, 0.3)), _window(2, wear, "wear"), _window(3, wear, "wear", anomaly=True)])
    paper = kb.normal_windows()
    assert list(paper.columns[3:]) == ["mean", "skewness", "kurtosis"] and len(paper) == 1
    w = kb.normal_windows(feature_set="wear")
    assert len(w) == 1 and list(w.columns[3:]) == ["log_rms", "crest", "skewness", "kurtosis", "band_hi",
                                                   "band_mid", "band_lo"]
    assert tuple(w.iloc[0, 3:]) == wear
