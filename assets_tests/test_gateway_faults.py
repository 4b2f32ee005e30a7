"""The gateway against hostile or careless input: validation at the door, quarantine, no head-of-line blocking."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time

import dagster as dg
import numpy as np

from gateway_harness import Pty, acks, refusals, running, wait_for
from firmware import isoforest, messages
from firmware.data_comm import CHAMPION_CHUNK_FORMAT
from tinyml_dagster.knowledge_base import KnowledgeBase, Upload
from tinyml_dagster.link_service import IngestClient
from tinyml_dagster.pool_inference import PoolInferenceEngine

NAN = float("nan")


def forest(seed: int = 1):
    rows = np.random.default_rng(seed).normal(0, [0.05, 0.2, 0.4], (200, 3)).tolist()
    return isoforest.train(rows, n_trees=10, psi=64, seed=seed)


def real_pool() -> PoolInferenceEngine:
    return PoolInferenceEngine.from_forests(["m1", "m2", "m3"], [forest(1), forest(2), forest(3)])


def good_line(d: str, s: int) -> bytes:
    return b'{"d":"%s","s":%d,"k":"normal","f":[0.0,0.1,1.0],"c":"v1","cs":0.4,"cd":0}\n' % (d.encode(), s)


def champion_blob(f=None) -> bytes:
    f = f or forest(4)
    cfg = json.dumps({"model_id": "local-x", "version": 0, "grid": [list(g) for g in f.grid],
                      "threshold": 0.6}).encode()
    return struct.pack("<H", len(cfg)) + cfg + f.to_bytes()


# -- validation at the door ---------------------------------------------------------------------------------

def test_serial_upload_with_nan_or_inf_is_refused_counted_and_the_pool_goes_on(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}, pool_factory=real_pool) as svc:
            port.upload(0, feats=(NAN, 0.1, 1.0))
            port.upload(1, feats=(0.0, float("inf"), 1.0))
            port.upload(2)
            got = port.read(10, until=lambda g: 2 in acks(g))
            assert [n for n, _ in refusals(got)] == [0, 1]
            assert "finite" in refusals(got)[0][1]
            assert acks(got)[-1] == 2  # the refused numbers are settled: the ack moves past them
            assert wait_for(lambda: svc.counters["decided"] == 1)
        kb = KnowledgeBase(tmp_path / "kb.sqlite")
        assert kb.query("SELECT seq FROM uploads") == [(2,)]
        assert kb.refusals("dev-a") == {("dev-a", "field features must be finite numbers"): 2}
        assert [g[1:4] for g in kb.gaps("dev-a")] == [(0, 0, 1), (1, 1, 1)]
    finally:
        port.close()


def test_a_stored_row_the_pool_cannot_score_is_quarantined_and_every_other_is_decided(tmp_path):
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    kb.ingest([Upload("d1", i, "normal", features=(0.0, 0.1, 1.0), champion_id="v1", champion_decision=0)
               for i in range(3)])
    # a row as an older gateway stored it: features that are not numbers
    kb._conn.execute("INSERT INTO uploads (device_id, seq, kind, received_at, f_mean, f_skewness, f_kurtosis,"
                     " champion_decision) VALUES ('d2', 0, 'normal', 0, 'a', 'b', 'c', 0)")
    kb._conn.execute("INSERT INTO uploads (device_id, seq, kind, received_at, f_mean, f_skewness, f_kurtosis,"
                     " champion_decision) VALUES ('d2', 1, 'normal', 0, NULL, 0.1, 1.0, 0)")
    pool = real_pool()
    assert pool.decide_pending(kb).decided == 3
    assert [(q[1], q[2]) for q in kb.quarantined()] == [("d2", "pool_decisions")] * 2
    kb.ingest([Upload("d1", 3, "normal", features=(0.0, 0.1, 1.0), champion_id="v1", champion_decision=0)])
    assert real_pool().decide_pending(kb).decided == 1  # a fresh pool (a restart) skips the quarantined rows


def test_garbage_socket_lines_are_refused_and_never_take_the_service_down(tmp_path):
    bad = [
        b'{"d":"d1","s":6,"k":"normal","f":[[1],[2],[3]],"cd":0}',  # was a SQLite binding error in the main loop
        b'{"d":"d1","s":7,"k":"normal","f":["a","b","c"],"cd":0}',  # was committed, then crashed the pool
        b'{"d":"d1","s":8,"k":"normal","f":5,"cd":0}',
        b'{"d":"d1","s":9,"k":"normal","f":[1,2,3],"cd":2}',
        b'{"d":"d1","s":10,"k":"normal","f":[1,2,3],"cd":0,"cs":"x"}',
        b'{"d":"d1","s":%d,"k":"normal","f":[1,2,3],"cd":0}' % (1 << 70),
        b'{"d":"d1","s":-1,"k":"normal","f":[1,2,3],"cd":0}',
        b'{"d":"d1","s":true,"k":"normal","f":[1,2,3],"cd":0}',
        b'{"d":["x"],"s":11,"k":"normal","f":[1,2,3],"cd":0}',
        b'{"d":"d 1","s":12,"k":"normal","f":[1,2,3],"cd":0}',
        b'{"d":"d1","s":13,"k":"champion"}',
        b'{"d":"d1","s":14,"k":"normal","f":[1,2,3],"cd":0,"w":1e999}',
    ]
    with running(tmp_path / "kb.sqlite", ingest_socket=tmp_path / "s.sock", pool_factory=real_pool) as svc:
        c = IngestClient(tmp_path / "s.sock")
        c.send([("d1", 100 + i, line + b"\n") for i, line in enumerate(bad)])
        c.send([("d1", 1, good_line("d1", 1))])
        deadline = time.time() + 20
        got = []
        while time.time() < deadline and (len(c.refused) < len(bad) or ("d1", 1) not in got):
            got += c.receive_acks()
        assert got == [("d1", 1)]
        assert len(c.refused) == len(bad), c.refused
        assert wait_for(lambda: svc.counters["decided"] == 1)
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    assert kb.count_uploads() == 1
    assert sum(kb.refusals().values()) == len(bad)
    assert kb.gaps() == []  # socket refusals settle nothing of a port's numbering


def test_a_garbage_champion_upload_is_quarantined_and_the_other_devices_champions_register(tmp_path):
    from tinyml_dagster.defs.loop.assets import device_champions
    from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource, PoolResource

    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    kb.ingest([Upload("dev-bad", 1 << 40, "champion", model_blob=b"\x05\x00{]garbage"),
               Upload("dev-good", 1 << 40, "champion", model_blob=champion_blob())])
    resources = {"knowledge_base": KnowledgeBaseResource(path=str(tmp_path / "kb.sqlite")),
                 "pool": PoolResource(models_dir=str(tmp_path / "models"))}
    for _ in range(2):  # the next run is not blocked either
        result = dg.materialize([device_champions], resources=resources)
        assert result.success
    assert [c[1] for c in kb.champions()] == ["dev-good"]
    assert [(q[1], q[2]) for q in kb.quarantined()] == [("dev-bad", "device_champions")]


def test_a_garbage_champion_over_serial_is_refused_at_the_door(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}) as svc:
            blob = b"\x10\x00" + b"{" * 16 + b"junk"
            port.send(messages.CHAMPION_CHUNK, struct.pack(CHAMPION_CHUNK_FORMAT, 0, 0, 1) + blob)
            assert wait_for(lambda: svc.counters["rejected"] == 1)
        kb = KnowledgeBase(tmp_path / "kb.sqlite")
        assert kb.model_uploads() == []
        assert list(kb.refusals("dev-a").values()) == [1]
    finally:
        port.close()


# -- no head-of-line blocking ---------------------------------------------------------------------------------

def test_a_socket_client_that_stops_reading_stalls_nobody(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}, ingest_socket=tmp_path / "s.sock") as svc:
            stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stuck.connect(str(tmp_path / "s.sock"))
            # enough uploads that their acks overflow the socket's buffers; this client never reads one
            stuck.sendall(b"".join(good_line("slow", s) for s in range(30_000)))
            assert wait_for(lambda: svc.counters["ingested"] >= 30_000, timeout=120)
            port.upload(0)
            assert acks(port.read(1)) == [0]
            c = IngestClient(tmp_path / "s.sock")
            c.send([("fast", 1, good_line("fast", 1))])
            assert wait_for(lambda: c.receive_acks() == [("fast", 1)] or not c.in_flight, timeout=20)
            stuck.close()
    finally:
        port.close()


def test_a_port_nobody_reads_stalls_neither_the_loop_nor_the_socket(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}, ingest_socket=tmp_path / "s.sock") as svc:
            for no in range(1500):  # ~16 KB of acks that the device side never reads
                port.upload(no)
            assert wait_for(lambda: svc.counters["ingested"] >= 1500, timeout=60)
            c = IngestClient(tmp_path / "s.sock")
            c.send([("fast", s, good_line("fast", s)) for s in range(10)])
            got = []
            assert wait_for(lambda: len(got.__iadd__(c.receive_acks())) == 10, timeout=30)
    finally:
        port.close()


def test_a_missing_port_is_retried_with_backoff_and_logged_once_per_change(tmp_path, caplog):
    link = tmp_path / "ttyDEV"  # not there yet
    port = Pty()
    caplog.set_level(logging.INFO, logger="tinyml_dagster.link_service")
    try:
        with running(tmp_path / "kb.sqlite", wait_ports=False, ports={"dev-a": str(link)}):
            time.sleep(3)  # several retries
            assert [r.getMessage() for r in caplog.records if "port unavailable" in r.getMessage()] != []
            assert len([r for r in caplog.records if "port unavailable" in r.getMessage()]) == 1
            os.symlink(port.path, link)
            assert wait_for(lambda: any("port open" in r.getMessage() for r in caplog.records), timeout=60)
            port.upload(0)
            assert acks(port.read(1)) == [0]
        assert not any(r.exc_info for r in caplog.records)
    finally:
        port.close()
