"""Gateway link service: commit-then-ack over the ingest socket and a real pty serial port, SIGKILL + restart."""

import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from gateway_harness import Pty, acks, running, wait_for

from firmware import messages
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.link_service import IngestClient


def line(d, s, k=1.0):
    return (d, s, (
        '{"d":"%s","s":%d,"k":"normal","f":[0.0,0.1,%g],"c":"v1","cs":0.4,"cd":0,"t":%f}\n' % (d, s, k, time.time())
    ).encode())


def start_service(tmp_path):
    sock = tmp_path / "ingest.sock"
    ready = tmp_path / "ready"
    if ready.exists():
        ready.unlink()
    p = subprocess.Popen([sys.executable, "-m", "tinyml_dagster.link_service", "--kb", str(tmp_path / "kb.sqlite"),
                          "--ingest-socket", str(sock), "--no-pool", "--ready-file", str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not ready.exists():
        assert p.poll() is None and time.time() < deadline, "link service did not start"
        time.sleep(0.05)
    return p, sock


def drain(client, n, timeout=30):
    got = []
    deadline = time.time() + timeout
    while len(got) < n and time.time() < deadline:
        got += client.receive_acks()
    return got


def test_socket_ingest_acks_after_commit_and_survives_sigkill(tmp_path):
    p, sock = start_service(tmp_path)
    restarted = []
    try:
        c = IngestClient(sock)
        c.send([line("d1", s) for s in range(1, 51)])
        acked = drain(c, 50)
        assert sorted(acked) == [("d1", s) for s in range(1, 51)]
        # every acked upload is already in the database, seen from another connection
        kb = KnowledgeBase(tmp_path / "kb.sqlite")
        assert kb.count_uploads(device_id="d1") == 50
        # a retransmission is acked again and stored once
        c.send([line("d1", 7)])
        assert drain(c, 1) == [("d1", 7)]
        assert kb.count_uploads() == 50
        # bad input gets an error naming the field; nothing is stored
        c.sock.sendall(b'{"d":"d1","k":"normal"}\n')
        with pytest.raises(Exception, match="missing field 's'"):
            drain(c, 1, timeout=5)
        c.close()
        c = IngestClient(sock)
        p.send_signal(signal.SIGKILL)
        p.wait()
        timer = threading.Timer(0.5, lambda: restarted.append(start_service(tmp_path)[0]))
        timer.start()
        c.send([line("d2", s) for s in range(1, 101)])  # reconnects once the service is back, resends
        c.send_windows({"d": ["d3"] * 40, "s": list(range(1, 41)), "f": [[0.0, 0.1, 1.0]] * 40, "cd": [0] * 40})
        acked = drain(c, 140)
        timer.join()
        p = restarted[0]
        assert len(acked) == 140
        assert c.reconnects >= 1 and not c.in_flight and not c.batches
        assert kb.count_uploads(device_id="d2") == 100 and kb.count_uploads(device_id="d3") == 40
        assert kb.scalar("SELECT COUNT(*) FROM (SELECT DISTINCT device_id, seq FROM uploads)") == 190
    finally:
        for proc in [p] + restarted:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def test_serial_port_upload_is_committed_then_acked(tmp_path):
    port = Pty()
    try:
        with running(tmp_path / "kb.sqlite", ports={"dev-a": port.path}):
            # a device whose uploads 0..9 a gateway acknowledged before says so: this KB moves on from there
            port.send(messages.UPLOAD_GAP, port.sealed(messages.TAG_GAP, struct.pack(messages.GAP_FORMAT, 0, 9,
                                                                                     messages.GAP_SETTLED)))
            for no in (10, 11, 13):  # 12 is lost on the line: the ack must not pass it
                port.upload(no, anomaly=no == 11, score=0.71 if no == 11 else 0.3)
            kb = KnowledgeBase(tmp_path / "kb.sqlite")
            assert wait_for(lambda: kb.count_uploads(device_id="dev-a") == 3)
            got = port.read(10, timeout=3)  # acks coalesce: at least one, never past 11
            assert acks(got) and set(acks(got)) <= {10, 11} and acks(got)[-1] == 11
            rows = kb.query("SELECT seq, kind, champion_id, champion_decision, window_start FROM uploads ORDER BY seq")
            assert rows == [(10, "normal", "3", 0, 1010.0), (11, "anomaly", "3", 1, 1011.0),
                            (13, "normal", "3", 0, 1013.0)]
            # the device retransmits 12 and 13: acked up to 13, 13 stored once
            for no in (12, 13):
                port.upload(no)
            assert acks(port.read(10, until=lambda g: 13 in acks(g)))[-1] == 13
            assert kb.count_uploads(device_id="dev-a") == 4
            assert [g[1:4] for g in kb.gaps("dev-a")] == [(0, 9, 10)]
    finally:
        port.close()
