"""The ingest socket: a Unix socket taking one JSON upload per line and answering `ack <device_id> <seq>`."""

from __future__ import annotations

import json
import selectors
import socket
import threading

from tinyml_dagster.knowledge_base import KnowledgeBaseError, Upload


def upload_from_json(line: bytes | str) -> Upload:
    """An upload from one JSON line: {"d": device, "s": seq, "k": kind, "f": [mean, skewness, kurtosis],
    "c": champion id, "cs": champion score, "cd": champion decision 0/1, "w": window start, "t": sent at}."""
    try:
        o = json.loads(line)
    except ValueError as e:
        raise KnowledgeBaseError("ingest line is not JSON: %s" % e) from None
    if not isinstance(o, dict):
        raise KnowledgeBaseError("ingest line is not a JSON object")
    try:
        return Upload(
            device_id=o["d"], seq=o["s"], kind=o.get("k", "normal"),
            features=tuple(o["f"]) if o.get("f") is not None else None,
            champion_id=o.get("c"), champion_score=o.get("cs"), champion_decision=o.get("cd"),
            window_start=o.get("w"), sent_at=o.get("t"),
        )
    except KeyError as e:
        raise KnowledgeBaseError("ingest line: missing field %s" % e) from None


def upload_to_json(u: Upload) -> bytes:
    return (json.dumps({"d": u.device_id, "s": u.seq, "k": u.kind, "f": list(u.features or ()),
                        "c": u.champion_id, "cs": u.champion_score, "cd": u.champion_decision,
                        "w": u.window_start, "t": u.sent_at}, separators=(",", ":")) + "\n").encode()


def serve_socket(service) -> None:
    """Accept clients on service.ingest_socket and feed their lines to service.submit until it stops."""
    path = service.ingest_socket
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(64)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    try:
        while not service.stop_event.is_set():
            for key, _ in sel.select(timeout=0.1):
                if key.data is None:
                    conn, _ = srv.accept()
                    conn.setblocking(True)
                    sel.register(conn, selectors.EVENT_READ, _SocketConn(service, conn))
                else:
                    if not key.data.read():
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
    finally:
        sel.close()
        srv.close()


class _SocketConn:
    def __init__(self, service, conn: socket.socket):
        self.service = service
        self.conn = conn
        self.buf = b""
        self.wlock = threading.Lock()

    def read(self) -> bool:
        try:
            data = self.conn.recv(1 << 16)
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                u = upload_from_json(line)
            except KnowledgeBaseError as e:
                self._send(b"error %s\n" % str(e).encode())
                continue
            self.service.submit(u, self.ack)
        return True

    def ack(self, u: Upload, duplicate: bool) -> None:
        self._send(b"ack %s %d\n" % (u.device_id.encode(), u.seq))

    def _send(self, data: bytes) -> None:
        with self.wlock:
            self.conn.sendall(data)
