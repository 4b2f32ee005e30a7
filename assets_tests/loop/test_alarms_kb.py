"""Feature sets and alarms in the Knowledge Base, the link service and Dagster: an additive migration keeps an
existing Knowledge Base whole; windows of any length carry their set; only the pool of a set votes on its windows;
a device's ALARM reaches the Knowledge Base and the alarm sensor."""

import logging
import sqlite3
import struct

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
    a = kb.record_alarm("d1", 1000.0, None, 0.71, "wear", "b3-t50-x", 4, now=1.0, alarm_no=0)
    assert kb.record_alarm("d1", 1000.0, None, 0.71, "wear", "b3-t50-x", 4, now=1.5, alarm_no=0) == a  # a resend
    assert kb.alarms("d1")[0]["received_at"] == 1.0  # changed nothing: the alarm sensor does not see it again
    assert kb.record_alarm("d1", 1000.0, 1600.0, 0.69, "wear", "b3-t50-x", 4, now=2.0, alarm_no=0) == a
    (got,) = kb.alarms("d1")
    assert (got["alarm_no"], got["start"], got["end"], got["peak_score"], got["feature_set"], got["champion_version"],
            got["received_at"]) == (0, 1000.0, 1600.0, 0.71, "wear", 4, 2.0)
    # the device's clock started over after a power loss: another alarm with the same start is another row
    b = kb.record_alarm("d1", 1000.0, None, 0.8, "wear", "b3-t50-x", 4, alarm_no=1)
    assert b != a and [x["alarm_no"] for x in kb.alarms("d1")] == [0, 1]
    with pytest.raises(KnowledgeBaseError, match="end 900.0 before start 1000.0"):
        kb.record_alarm("d1", 1000.0, 900.0, 0.7, "wear", alarm_no=2)
    for bad, field in (({"peak_score": float("nan")}, "peak_score must be a finite number"),
                       ({"feature_set": "fft"}, "unknown feature set 'fft'"),
                       ({"champion_id": "has space"}, "field champion_id"), ({"alarm_no": -1}, "field alarm_no")):
        args = dict(dict(device_id="d1", start=1.0, end=None, peak_score=0.7, feature_set="wear", alarm_no=3), **bad)
        with pytest.raises(KnowledgeBaseError, match=field):
            kb.record_alarm(**args)
    assert len(kb.alarms()) == 2


def test_alarms_stored_before_alarm_numbers_are_kept_by_the_migration(kb_location):
    # a Knowledge Base as schema 7 left it: alarms keyed by their start
    old_knowledge_base(kb_location, 7, 'INSERT INTO alarms (device_id, start, "end", peak_score, feature_set,'
                       ' champion_id, champion_version, received_at) VALUES'
                       " ('d0', 1000, 1300, 0.8, 'wear', 'm1', 3, 5), ('d0', 2000, NULL, 0.7, 'paper', NULL, 0, 6)")
    kb = KnowledgeBase(kb_location)
    assert kb.schema_version() == len(MIGRATIONS) >= 8
    assert [(a["id"], a["device_id"], a["alarm_no"], a["start"], a["end"], a["peak_score"], a["champion_id"],
             a["received_at"]) for a in kb.alarms()] == [(1, "d0", None, 1000.0, 1300.0, 0.8, "m1", 5.0),
                                                          (2, "d0", None, 2000.0, None, 0.7, None, 6.0)]
    assert kb.record_alarm("d0", 2000.0, 2100.0, 0.7, "paper", now=7.0) == 2  # an old alarm is still keyed by start
    assert kb.record_alarm("d0", 1000.0, None, 0.9, "wear", "m2", 4, alarm_no=0) == 3  # numbered: a new row
    assert [(a["alarm_no"], a["end"]) for a in kb.alarms("d0")] == [(None, 1300.0), (None, 2100.0), (0, None)]


def _sealed_alarm(body: bytes, key: bytes, device_id: str = "esp-1") -> bytes:
    return messages.seal(key, messages.TAG_ALARM, device_id, body)


def _answers(link) -> list[tuple[int, int, int]]:
    out = [struct.unpack(messages.ALARM_ACK_FORMAT, b) for t, b in link.outgoing if t == messages.ALARM_ACK]
    link.outgoing.clear()
    return out


def test_link_service_stores_an_alarm_once_and_acknowledges_it_after_the_commit(tmp_path, caplog):
    from tinyml_dagster.link_service import LinkService
    from tinyml_dagster.link_service.ports import SerialLink

    caplog.set_level(logging.WARNING, logger="tinyml_dagster.link_service")
    key = bytes(range(32))
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    service = LinkService(tmp_path / "kb.sqlite", keys={"esp-1": key}.get)
    link = SerialLink(service, "esp-1", "/dev/null")
    raised = _sealed_alarm(messages.pack_alarm(4, 1000, 0, 0.8, 1, 3, "b3-t50-abc"), key)
    link._alarm(raised, messages)
    assert _answers(link) == []  # nothing acknowledged before it is committed
    service._record_writes(kb)
    assert _answers(link) == [(4, 0, messages.ALARM_STORED)]
    (first,) = kb.alarms()
    link._alarm(raised, messages)  # its ack was lost: the device sends it again
    service._record_writes(kb)
    assert _answers(link) == [(4, 0, messages.ALARM_STORED)] and kb.alarms() == [first]
    cleared = _sealed_alarm(messages.pack_alarm(4, 1000, 1300, 0.75, 1, 3, "b3-t50-abc"), key)
    link._alarm(cleared, messages)
    link._alarm(cleared, messages)
    # a database fault: the write waits for the next turn and nothing is acknowledged
    kb.close()
    with pytest.raises(sqlite3.ProgrammingError):
        service._record_writes(kb)
    assert _answers(link) == []
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    service._record_writes(kb)
    assert _answers(link) == [(4, 1300, messages.ALARM_STORED)] * 2
    (a,) = kb.alarms()
    assert (a["device_id"], a["alarm_no"], a["start"], a["end"], a["peak_score"], a["feature_set"],
            a["champion_id"]) == ("esp-1", 4, 1000.0, 1300.0, pytest.approx(0.8), "wear", "b3-t50-abc")
    # bad bodies: a clear error, nothing stored, refused when the number is there (the device stops sending them)
    caplog.clear()
    link._alarm(_sealed_alarm(struct.pack("<I", 9) + b"\x02", key), messages)
    link._alarm(_sealed_alarm(b"\x01\x02", key), messages)
    link._alarm(_sealed_alarm(messages.pack_alarm(10, 2000, 0, 0.9, 15, 3, "x"), key), messages)  # unknown set
    link._alarm(_sealed_alarm(messages.pack_alarm(11, 2000, 1000, 0.9, 1, 3, "x"), key), messages)  # ends first
    link._alarm(_sealed_alarm(messages.pack_alarm(12, 2000, 0, float("nan"), 1, 3, "x"), key), messages)
    link._alarm(_sealed_alarm(messages.pack_alarm(13, 2000, 0, 0.9, 1, 3, "x"), bytes(32)), messages)  # forged
    service._record_writes(kb)
    assert sorted(_answers(link)) == [(9, 0, messages.ALARM_REFUSED), (10, 0, messages.ALARM_REFUSED),
                                      (11, 1000, messages.ALARM_REFUSED), (12, 0, messages.ALARM_REFUSED)]
    assert len(kb.alarms()) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("ALARM refused, nothing stored: ALARM body of 5 bytes is malformed" in e for e in errors), errors
    assert any("ALARM body of 2 bytes is malformed" in e for e in errors)
    assert any("unknown feature set code 15" in e for e in errors)
    assert any("alarm 11 refused, nothing stored" in e and "end 1000.0 before start 2000.0" in e for e in errors)
    assert any("alarm 12 refused" in e and "peak_score must be a finite number" in e for e in errors)
    assert any("unauthenticated ALARM dropped" in r.getMessage() for r in caplog.records)


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
