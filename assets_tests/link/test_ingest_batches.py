"""Batches of windows over the ingest socket: columns in one JSON line, committed then acknowledged as a batch, a
bad row refused on its own, a bad line answered with an error naming the field; the same outcome as single uploads."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from gateway_harness import Pty, running, wait_for

from firmware import isoforest
from tinyml_dagster.knowledge_base import KnowledgeBase, KnowledgeBaseError, Upload, WindowBatch
from tinyml_dagster.link_service import IngestClient
from tinyml_dagster.link_service.ingest import windows_from_json
from tinyml_dagster.pool_inference import PoolInferenceEngine

GOOD = {"k": "normal", "f": [0.0, 0.1, 1.0], "c": "v1", "cs": 0.4, "cd": 0}
# rows of a batch that cannot be stored, each with what is wrong with it (the single upload's checks)
BAD_ROWS = [
    ({"f": [[1], [2], [3]]}, "field features must be finite numbers"),
    ({"f": ["a", "b", "c"]}, "field features must be finite numbers"),
    ({"f": 5}, "field features must hold 3 values"),
    ({"cd": 2}, "field champion_decision must be 0 or 1"),
    ({"cd": True}, "field champion_decision must be 0 or 1"),
    ({"cs": "x"}, "field champion_score must be a finite number"),
    ({"s": 1 << 70}, "field seq must be an int"),
    ({"s": -1}, "field seq must be an int"),
    ({"s": True}, "field seq must be an int"),
    ({"d": ["x"]}, "field device_id must be"),
    ({"d": "d 1"}, "field device_id must be"),
    ({"k": "champion"}, "field model_blob is required"),
    ({"k": "bogus"}, "field kind must be one of"),
    ({"w": float("inf")}, "field window_start must be a finite number"),
    ({"f": [1, 2, int("9" * 400)]}, "field features must be finite numbers"),  # an int no float64 holds
    ({"c": "has space"}, "field champion_id must be"),
]


def columns(rows: list[dict]) -> dict[str, list]:
    """The batch's columns from per-window dicts (GOOD's fields where a row does not say)."""
    rows = [{**GOOD, **r} for r in rows]
    return {k: [r.get(k) for r in rows] for k in ("d", "s", "k", "f", "c", "cs", "cd", "w", "t")}


def batch_of(rows: list[dict]) -> WindowBatch:
    return windows_from_json(json.dumps({"b": 1, **columns(rows)}))[1]


def forest(seed: int):
    rows = np.random.default_rng(seed).normal(0, [0.05, 0.2, 0.4], (200, 3)).tolist()
    return isoforest.train(rows, n_trees=10, psi=64, seed=seed)


def real_pool() -> PoolInferenceEngine:
    return PoolInferenceEngine.from_forests(["m1", "m2", "m3"], [forest(1), forest(2), forest(3)])


def drain(client: IngestClient, until, timeout: float = 20.0) -> list:
    got = []
    deadline = time.time() + timeout
    while time.time() < deadline and not until(got):
        got += client.receive_acks()
    return got


def test_the_column_check_flags_exactly_the_rows_a_single_upload_would_refuse():
    rows = [{"d": "d1", "s": 1}] + [{"d": "d1", "s": 2 + i, **bad} for i, (bad, _) in enumerate(BAD_ROWS)]
    rows.append({"d": "d2", "s": 1, "t": 1.5e9, "w": 1.5e9})
    batch = batch_of(rows)
    problems = batch.problems()
    assert sorted(problems) == list(range(1, 1 + len(BAD_ROWS)))
    for i, (_, reason) in enumerate(BAD_ROWS, start=1):
        assert problems[i].startswith(reason), (i, problems[i])
        assert problems[i] == batch.upload(i).problem()
    good = batch.subset([0, len(rows) - 1])
    assert good.problems() == {} and good.upload(1) == Upload("d2", 1, "normal", (0.0, 0.1, 1.0), "v1", 0.4, 0,
                                                              1.5e9, sent_at=1.5e9)


@pytest.mark.parametrize("line, named", [
    (b'[1, 2]', "not a JSON object"),
    (b'{"b": 1, "d": ["d1"], "s": [1]', "not JSON"),
    (b'{"b": "x", "d": ["d1"], "s": [1]}', "field b (the batch id) must be an int"),
    (b'{"b": -1, "d": ["d1"], "s": [1]}', "field b (the batch id) must be an int"),
    (b'{"b": 1, "s": [1]}', "ingest batch 1: missing field d"),
    (b'{"b": 1, "d": ["d1"]}', "ingest batch 1: missing field s"),
    (b'{"b": 1, "d": "d1", "s": [1]}', "ingest batch 1: field d must be a list"),
    (b'{"b": 1, "d": ["d1", "d2"], "s": [1]}', "ingest batch 1: field s must be a list of one value per window"),
    (b'{"b": 1, "d": ["d1"], "s": [1], "f": [[0, 0, 0]], "cd": 0}', "field cd must be a list"),
    (b'{"b": 1, "d": ["d1"], "s": [1], "x": [1]}', "ingest batch 1: unknown field x"),
    (b'{"b": 1, "d": ["d1"], "s": [1], "fs": 3}', "field fs (the feature set) must be a string"),
])
def test_a_batch_line_that_is_not_a_batch_names_what_is_wrong(line, named):
    with pytest.raises(KnowledgeBaseError, match=named.replace("(", r"\(").replace(")", r"\)")):
        windows_from_json(line)


def test_ingest_windows_stores_as_ingest_does_on_either_backend(kb_location):
    kb = KnowledgeBase(kb_location)
    first = batch_of([{"d": "d%d" % (i % 3), "s": i // 3, "cd": i % 2} for i in range(9)])
    r = kb.ingest_windows(first, gateway="gw-1")
    assert r.duplicates == [False] * 9 and r.conflicts == [False] * 9 and len(set(r.upload_ids)) == 9
    assert kb.count_uploads() == 9 and kb.device_gateway("d1") == "gw-1"
    assert [c.model_id for c in kb.champions()] == ["v1"] * 3  # each device's first reported champion
    # a retransmission is stored once; a reused number with other content is a conflict (the first stays)
    again = batch_of([{"d": "d0", "s": 0, "cd": 0}, {"d": "d1", "s": 0, "cd": 0, "f": [9.0, 9.0, 9.0]},
                      {"d": "d1", "s": 5}])
    r = kb.ingest_windows(again)
    assert r.duplicates == [True, True, False] and r.conflicts == [False, True, False]
    assert kb.count_uploads() == 10 and kb.feature_vectors([r.upload_ids[1]]) == [("paper", (0.0, 0.1, 1.0))]
    # a row that cannot be stored: the error names it, nothing of the batch is stored
    with pytest.raises(KnowledgeBaseError, match="seq=-1: field seq"):
        kb.ingest_windows(batch_of([{"d": "d9", "s": 1}, {"d": "d9", "s": -1}]))
    assert kb.count_uploads() == 10


def test_a_batch_is_acked_once_committed_and_its_bad_rows_are_refused_alone(kb_location, tmp_path):
    port = Pty()
    try:
        with running(kb_location, ports={"dev-a": port.path}, ingest_socket=tmp_path / "s.sock",
                     pool_factory=real_pool) as svc:
            c = IngestClient(tmp_path / "s.sock")
            c.send_windows(columns([{"d": "d1", "s": 1}]))
            assert drain(c, lambda got: got) == [("d1", 1)]
            rows = [{"d": "d1", "s": 2}, {"d": "dev-a", "s": 1},  # dev-a: a serial device's id
                    {"d": "d1", "s": 1, "f": [5.0, 5.0, 5.0]}]  # d1/1 again with other content
            rows += [{"d": "d1", "s": 10 + i, **bad} for i, (bad, _) in enumerate(BAD_ROWS)]
            rows += [{"d": "d2", "s": s} for s in range(1, 4)]
            b = c.send_windows(columns(rows))
            got = drain(c, lambda got: not c.batches)
            assert b not in c.batches and sorted(got) == [("d1", 2), ("d2", 1), ("d2", 2), ("d2", 3)]
            reasons = dict(c.refused)
            assert len(c.refused) == 2 + len(BAD_ROWS)
            assert "serial port" in reasons[("dev-a", 1)] and "reused" in reasons[("d1", 1)]
            assert reasons[("d1", 10)].startswith(BAD_ROWS[0][1])
            assert wait_for(lambda: svc.counters["decided"] == 5)
        kb = KnowledgeBase(kb_location)
        assert sorted(kb.upload_keys()) == [("d1", 1), ("d1", 2), ("d2", 1), ("d2", 2), ("d2", 3)]
        assert kb.feature_vectors([1]) == [("paper", (0.0, 0.1, 1.0))]  # the first content stays
        assert sum(kb.refusals().values()) == 2 + len(BAD_ROWS)
        assert kb.count_decisions() == 5
    finally:
        port.close()


def test_a_bad_batch_line_gets_an_error_and_the_service_goes_on(tmp_path):
    with running(tmp_path / "kb.sqlite", ingest_socket=tmp_path / "s.sock"):
        c = IngestClient(tmp_path / "s.sock")
        c.sock.sendall(b'{"b": 7, "d": ["d1", "d2"], "s": [1]}\n')
        with pytest.raises(KnowledgeBaseError, match="ingest batch 7: field s must be a list of one value"):
            drain(c, lambda got: False, timeout=5)
        c.close()
        c = IngestClient(tmp_path / "s.sock")
        c.send_windows(columns([{"d": "d1", "s": 1}]))
        assert drain(c, lambda got: got) == [("d1", 1)]
    assert KnowledgeBase(tmp_path / "kb.sqlite").upload_keys() == {("d1", 1)}


def test_windows_and_single_uploads_keep_the_devices_upload_numbers_in_step(kb_location):
    kb = KnowledgeBase(kb_location)
    kb.ingest([Upload("d1", 5, "normal", (0.0, 0.1, 1.0), "v1", 0.4, 0)])
    kb.ingest_windows(batch_of([{"d": "d1", "s": 10}]))
    kb.ingest([Upload("d1", 7, "normal", (0.0, 0.1, 1.0), "v1", 0.4, 0)])  # late, below the last number
    assert kb.scalar("SELECT last_seq FROM devices WHERE device_id='d1'") == 10
    with kb.transaction():  # two batches in one enclosing transaction: each stored once, as itself
        first = kb.ingest_windows(batch_of([{"d": "d2", "s": 1}, {"d": "d2", "s": 2}]))
        second = kb.ingest_windows(batch_of([{"d": "d2", "s": 3}]))
    assert first.duplicates == [False, False] and second.duplicates == [False]
    assert kb.count_uploads(device_id="d2") == 3 and len(set(first.upload_ids + second.upload_ids)) == 3
