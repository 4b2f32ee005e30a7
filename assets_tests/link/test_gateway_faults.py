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

from gateway_harness import KEY, Pty, PtyLink, State, acks, refusals, running, wait_for
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
        b'{"d":"d1","s":15,"k":"normal","f":[1,2,%s],"cd":0}' % (b"9" * 400),  # an int no float64 holds
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
    from tinyml_dagster.defs.gateway import GatewayResource
    from tinyml_dagster.defs.loop.assets import device_champions
    from tinyml_dagster.defs.resources import gateway_resources

    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    kb.ingest([Upload("dev-bad", 1 << 40, "champion", model_blob=b"\x05\x00{]garbage"),
               Upload("dev-good", 1 << 40, "champion", model_blob=champion_blob())])
    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path)))
    for _ in range(2):  # the next run is not blocked either
        result = dg.materialize([device_champions], resources=resources)
        assert result.success
    assert [c.device_id for c in kb.champions()] == ["dev-good"]
    assert [(q[1], q[2]) for q in kb.quarantined()] == [("dev-bad", "device_champions")]


def test_a_garbage_champion_over_serial_is_refused_at_the_door(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}) as svc:
            blob = port.sealed(messages.TAG_CHAMPION, b"\x10\x00" + b"{" * 16 + b"junk")
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


# -- acknowledgement that means stored ------------------------------------------------------------------------

def test_an_outage_longer_than_the_outbox_is_recorded_lost_and_the_ack_moves_on(tmp_path):
    from firmware._compat import ticks_ms
    from firmware.data_comm import DataComm

    port = Pty()
    root = tmp_path / "flash"
    (root / "deploy").mkdir(parents=True)
    (root / "deploy" / "key").write_bytes(KEY)
    comm = DataComm(PtyLink(port), str(root), State(), baud=1_000_000, outbox_max=4, upload_every=1,
                    ack_timeout_ms=300, device_id="dev-a")
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}):
            for i in range(10):  # the gateway is out of reach: 10 uploads for an outbox of 4
                comm.queue_upload(1000 + i, False, 1, 0.3, (0.01, -0.2, 1.5))
            assert [e[0] for e in comm.outbox] == [6, 7, 8, 9]
            kb = KnowledgeBase(tmp_path / "kb.sqlite")
            deadline = time.time() + 30
            while (comm.outbox or comm.state.data["gaps"]) and time.time() < deadline:
                comm.poll()
                comm.service(ticks_ms())
                time.sleep(0.002)
            assert not comm.outbox and comm.state.data["gaps"] == [] and comm.state.data["acked_through"] == 9
            assert comm.frames_out < 30  # no resend loop
            assert kb.query("SELECT seq FROM uploads ORDER BY seq") == [(6,), (7,), (8,), (9,)]
            assert [g[1:4] for g in kb.gaps("dev-a")] == [(0, 5, 6)] and kb.lost_uploads("dev-a") == 6
    finally:
        port.close()


def test_first_contact_is_explicit_a_lost_upload_0_is_never_acknowledged_as_stored(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}) as svc:
            port.upload(1)
            port.upload(2)
            assert wait_for(lambda: svc.counters["ingested"] == 2)
            assert acks(port.read(5, timeout=2)) == []  # 0 has not arrived: nothing is acknowledged
            port.upload(0)
            assert acks(port.read(5, until=lambda g: 2 in acks(g)))[-1] == 2
    finally:
        port.close()


def test_a_reused_upload_number_with_new_content_is_refused_and_logged(tmp_path, caplog):
    port = Pty()
    caplog.set_level(logging.WARNING, logger="tinyml_dagster.link_service")
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}, ingest_socket=tmp_path / "s.sock"):
            port.upload(0, feats=(0.01, -0.2, 1.5))
            assert acks(port.read(5, until=lambda g: 0 in acks(g))) == [0]
            port.upload(0, feats=(0.5, 0.5, 0.5))  # same number, other window
            got = port.read(5, until=lambda g: refusals(g))
            assert [n for n, _ in refusals(got)] == [0]
            port.upload(0, feats=(0.01, -0.2, 1.5))  # a true retransmission is still acknowledged
            assert 0 in acks(port.read(5, until=lambda g: 0 in acks(g)))
            c = IngestClient(tmp_path / "s.sock")
            c.send([("d1", 1, good_line("d1", 1))])
            assert wait_for(lambda: c.receive_acks() == [("d1", 1)] or not c.in_flight)
            c.send([("d1", 1, good_line("d1", 1).replace(b"1.0]", b"2.0]"))])
            assert wait_for(lambda: c.receive_acks() == [] and c.refused)
        kb = KnowledgeBase(tmp_path / "kb.sqlite")
        assert kb.query("SELECT f_mean FROM uploads WHERE device_id='dev-a'") == [(messages_f32(0.01),)]
        assert kb.refusals() == {("dev-a", "upload number reused with different content"): 1,
                                 ("d1", "upload number reused with different content"): 1}
        assert any("reused" in r.getMessage() for r in caplog.records)
    finally:
        port.close()


def messages_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def test_champion_uploads_are_acknowledged_and_partial_ones_are_bounded(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}) as svc:
            link = svc._links["dev-a"]
            for version in range(5000):  # first halves of champions that never complete
                port.send(messages.CHAMPION_CHUNK, struct.pack(CHAMPION_CHUNK_FORMAT, 100 + version, 0, 2) + b"x" * 200)
            port.send(messages.CHAMPION_CHUNK, struct.pack(CHAMPION_CHUNK_FORMAT, 7, 5, 60000) + b"x")
            blob = port.sealed(messages.TAG_CHAMPION, champion_blob())
            chunks = [blob[i:i + 240] for i in range(0, len(blob), 240)]
            for i, c in enumerate(chunks):
                port.send(messages.CHAMPION_CHUNK, struct.pack(CHAMPION_CHUNK_FORMAT, 0, i, len(chunks)) + c)
            port.send(messages.CHAMPION_CHUNK, struct.pack(CHAMPION_CHUNK_FORMAT, 1, 0, 1)
                      + port.sealed(messages.TAG_CHAMPION, b"\x03\x00{}}"))
            got = port.read(2, timeout=60)
            answers = [struct.unpack(messages.CHAMPION_ACK_FORMAT, b) for t, b in got if t == messages.CHAMPION_ACK]
            assert sorted(answers) == [(0, messages.CHAMPION_STORED), (1, messages.CHAMPION_REFUSED)]
            assert len(link.champion_parts) <= 2
        assert len(KnowledgeBase(tmp_path / "kb.sqlite").model_uploads()) == 1
    finally:
        port.close()


# -- faults of the database -----------------------------------------------------------------------------------

def database_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Knowledge Base ")]


def test_a_database_locked_longer_than_the_timeout_delays_acks_and_nothing_else(tmp_path, caplog):
    import sqlite3

    port = Pty()
    kb_path = tmp_path / "kb.sqlite"
    caplog.set_level(logging.INFO, logger="tinyml_dagster.link_service")
    try:
        with running(kb_path, ports={"dev-a": port.path}, db_timeout_s=0.2) as svc:
            port.upload(0)
            assert acks(port.read(5, until=lambda g: 0 in acks(g))) == [0]
            other = sqlite3.connect(str(kb_path), isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for longer than the timeout
            for no in range(1, 6):
                port.upload(no)
            assert acks(port.read(5, timeout=3)) == []  # nothing is acknowledged that is not committed
            assert svc._links["dev-a"].port_state == "open"
            other.execute("ROLLBACK")
            other.close()
            assert acks(port.read(10, until=lambda g: 5 in acks(g)))[-1] == 5
        assert KnowledgeBase(kb_path).count_uploads() == 6
        warned = database_warnings(caplog)
        assert len(warned) == 1 and str(kb_path) in warned[0] and "locked" in warned[0]
        assert any(r.getMessage() == "database: recovered" for r in caplog.records)
    finally:
        port.close()


def test_a_corrupted_database_file_keeps_the_service_up_and_it_resumes_once_replaced(tmp_path, caplog):
    port = Pty()
    kb_path = tmp_path / "kb.sqlite"
    kb_path.write_bytes(b"this is not a database" * 100)
    caplog.set_level(logging.INFO, logger="tinyml_dagster.link_service")
    try:
        with running(kb_path, ports={"dev-a": port.path}, ingest_socket=tmp_path / "s.sock"):
            port.upload(0)
            assert acks(port.read(5, timeout=3)) == []
            warned = database_warnings(caplog)
            assert len(warned) == 1 and str(kb_path) in warned[0] and "not a database" in warned[0]
            kb_path.unlink()  # the operator restores (here: removes) the file
            port.upload(0)
            assert acks(port.read(5, until=lambda g: 0 in acks(g))) == [0]
        assert KnowledgeBase(kb_path).count_uploads() == 1
    finally:
        port.close()


def test_a_full_disk_acks_nothing_keeps_running_and_resumes_when_space_returns(tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    sock, ready, kb_path = tmp_path / "s.sock", tmp_path / "ready", tmp_path / "kb.sqlite"
    p = subprocess.Popen([sys.executable, "-m", "tinyml_dagster.link_service", "--kb", str(kb_path), "--no-pool",
                          "--ingest-socket", str(sock), "--ready-file", str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(ready.exists, timeout=60)
        c = IngestClient(sock)
        c.send([("d1", s, good_line("d1", s)) for s in range(50)])
        assert wait_for(lambda: c.receive_acks() is not None and not c.in_flight)
        # the disk fills up: no file of the service's may grow any more
        hard = resource.prlimit(p.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (1, hard))
        c.send([("d1", s, good_line("d1", s)) for s in range(50, 5000)])
        got = []
        deadline = time.time() + 4
        while time.time() < deadline:
            got += c.receive_acks()
        assert p.poll() is None
        stored = set(KnowledgeBase(kb_path).query("SELECT device_id, seq FROM uploads"))
        assert set(got) <= stored and len(stored) < 5000  # acked only what is stored; the rest waits
        resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space returns
        assert wait_for(lambda: c.receive_acks() is not None and not c.in_flight, timeout=60)
        assert KnowledgeBase(kb_path).count_uploads() == 5000
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert err.decode().count("Knowledge Base %s" % kb_path) == 1, err.decode()[-3000:]


# -- configuration --------------------------------------------------------------------------------------------

def test_n_fp_is_parsed_strictly_and_names_the_variable(monkeypatch):
    import pytest

    from tinyml_dagster import settings
    from tinyml_dagster.defs.gateway import GatewayResource

    for raw, message in (("0", "TINYML_N_FP=0: must be >= 1"), ("-1", "TINYML_N_FP=-1: must be >= 1"),
                         ("abc", "TINYML_N_FP='abc': not an integer"), ("2.5", "TINYML_N_FP='2.5': not an integer")):
        monkeypatch.setenv("TINYML_N_FP", raw)
        with pytest.raises(settings.ConfigError, match=message):
            settings.n_fp()
    monkeypatch.setenv("TINYML_N_FP", " 7 ")
    assert settings.n_fp() == 7
    monkeypatch.delenv("TINYML_N_FP")
    assert settings.n_fp() == 5
    with pytest.raises(Exception, match="greater than or equal to 1"):
        GatewayResource(n_fp=0)


def test_device_keys_match_ids_exactly_and_never_fall_back_to_a_new_key(tmp_path):
    import pytest

    from tinyml_dagster.deployment_agent import DeviceKeys, PackagingError

    k = "ab" * 16
    for spec, message in ((f"dev-1 ={k}", "item 1 \\('dev-1 '\\)"), (f"={k}", "item 1 \\(''\\)"),
                          (f"dev-1={k},dev-1={k}", "item 2 .*listed twice"), (f"dev-1=ab cd{k}", "hex digits only"),
                          ("dev-1=abcd", ">= 16 bytes")):
        with pytest.raises(PackagingError, match=message):
            DeviceKeys(root=tmp_path / "keys", env=spec)
    keys = DeviceKeys(root=tmp_path / "keys", env=f"dev-1={k}")
    assert keys.key("dev-1") == bytes.fromhex(k)
    with pytest.raises(PackagingError, match="'dev-2' has no key in TINYML_DEVICE_KEYS"):
        keys.key("dev-2")
    assert not (tmp_path / "keys").exists()  # no random key was made up


# -- authentication -------------------------------------------------------------------------------------------

def test_only_uploads_with_the_device_key_are_stored_and_forgeries_are_not_answered(tmp_path):
    port = Pty()
    forger = Pty(key=b"not the device key 0123456789abc")
    forger.master, forger.slave, forger.decoder = port.master, port.slave, port.decoder  # the same line
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}) as svc:
            forger.upload(0, feats=(9.0, 9.0, 9.0), anomaly=True, score=0.9)  # the next number, first
            port.send(messages.UPLOAD, messages.pack_upload(1, 1001, True, 3, 0.9, (9.0, 9.0, 9.0)))  # no MAC
            # nor may anyone but the device say its numbers are lost, or upload its champion
            forger.send(messages.UPLOAD_GAP, forger.sealed(messages.TAG_GAP, struct.pack(messages.GAP_FORMAT, 0, 99,
                                                                                         messages.GAP_DROPPED)))
            forger.send(messages.CHAMPION_CHUNK, struct.pack(CHAMPION_CHUNK_FORMAT, 0, 0, 1)
                        + forger.sealed(messages.TAG_CHAMPION, champion_blob(isoforest.train(
                            [[0.0, 0.1, float(i)] for i in range(20)], n_trees=1, psi=4, seed=1))))
            assert wait_for(lambda: svc.counters["rejected"] == 4)
            assert port.read(5, timeout=2) == []  # no answer: a refusal would make the real device drop its own
            port.upload(0)
            assert acks(port.read(5, until=lambda g: 0 in acks(g))) == [0]
        kb = KnowledgeBase(tmp_path / "kb.sqlite")
        assert kb.query("SELECT device_id, seq, kind FROM uploads") == [("dev-a", 0, "normal")]
        assert kb.refusals() == {("dev-a", "unauthenticated upload (bad or missing MAC)"): 2,
                                 ("dev-a", "unauthenticated UPLOAD_GAP (bad or missing MAC)"): 1,
                                 ("dev-a", "unauthenticated champion upload (bad or missing MAC)"): 1}
        assert kb.gaps() == [] and kb.model_uploads() == []
    finally:
        port.close()


def test_the_socket_is_local_only_and_refuses_the_ids_of_the_serial_devices(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}, ingest_socket=tmp_path / "s.sock"):
            assert (tmp_path / "s.sock").stat().st_mode & 0o777 == 0o600
            c = IngestClient(tmp_path / "s.sock")
            c.send([("dev-a", 0, good_line("dev-a", 0)), ("gw-7", 0, good_line("gw-7", 0))])
            got = []
            assert wait_for(lambda: len(got.__iadd__(c.receive_acks())) == 1 and c.refused)
            assert got == [("gw-7", 0)] and c.refused[0][0] == ("dev-a", 0)
        assert KnowledgeBase(tmp_path / "kb.sqlite").query("SELECT device_id FROM uploads") == [("gw-7",)]
    finally:
        port.close()
