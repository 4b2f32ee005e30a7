"""The ingest socket: a Unix socket taking one JSON upload (or one batch of windows) per line.

It is a trusted local interface (mode 0600: the service's user only; traffic generators, other gateways that
verified their devices): its lines carry no MAC, so it refuses the ids of the devices on this gateway's serial
ports, whose uploads are authenticated. Answers: `ack <device_id> <seq>` once an upload is committed, `acked
<batch> [<row>,<row>...]` once every window of a batch but the rows listed is committed, `refused <device_id>
<seq> <reason>` for an upload (or row) that will never be stored (do not resend it), `error <message>` for a line
that is neither."""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading

from tinyml_dagster.knowledge_base import KnowledgeBaseError, Upload, WindowBatch, valid_id


def _json_object(line: bytes | str) -> dict:
    try:
        o = json.loads(line)
    except ValueError as e:
        raise KnowledgeBaseError("ingest line is not JSON: %s" % e) from None
    if not isinstance(o, dict):
        raise KnowledgeBaseError("ingest line is not a JSON object")
    return o


def upload_from_json(line: bytes | str) -> Upload:
    """An upload from one JSON line: {"d": device, "s": seq, "k": kind, "f": [mean, skewness, kurtosis],
    "c": champion id, "cs": champion score, "cd": champion decision 0/1, "w": window start, "t": sent at}."""
    return _upload_from_object(_json_object(line))


def _upload_from_object(o: dict) -> Upload:
    f = o.get("f")
    try:
        return Upload(
            device_id=o["d"], seq=o["s"], kind=o.get("k", "normal"),
            features=tuple(f) if isinstance(f, list) else f,
            champion_id=o.get("c"), champion_score=o.get("cs"), champion_decision=o.get("cd"),
            window_start=o.get("w"), sent_at=o.get("t"),
        )
    except KeyError as e:
        raise KnowledgeBaseError("ingest line: missing field %s" % e) from None


# a batch's columns: the single upload's fields, each a list with one value per window ("d" and "s" required)
BATCH_COLUMNS = {"d": "device_ids", "s": "seqs", "k": "kinds", "f": "features", "c": "champion_ids",
                 "cs": "champion_scores", "cd": "champion_decisions", "w": "window_starts", "t": "sent_ats"}
BATCH_DEFAULTS = {"k": "normal"}  # a column left out: this value (else null) in every row


def windows_from_json(line: bytes | str) -> tuple[int, WindowBatch]:
    """(batch id, windows) from one JSON line {"b": batch id, "fs": feature set, "d": [devices], "s": [seqs], ...}
    holding the fields of upload_from_json as columns (lists of one length; "k" defaults to "normal", the others
    to null); a window that cannot be stored is refused on its own, the rest of the batch is stored."""
    return _windows_from_object(_json_object(line))


def _windows_from_object(o: dict) -> tuple[int, WindowBatch]:
    b = o.get("b")
    if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < 1 << 63:
        raise KnowledgeBaseError("ingest batch: field b (the batch id) must be an int in 0..2**63-1")
    unknown = sorted(set(o) - set(BATCH_COLUMNS) - {"b", "fs"})
    if unknown:
        raise KnowledgeBaseError("ingest batch %d: unknown field %s (known: b, fs, %s)"
                                 % (b, unknown[0], ", ".join(BATCH_COLUMNS)))
    for name in ("d", "s"):
        if name not in o:
            raise KnowledgeBaseError("ingest batch %d: missing field %s" % (b, name))
    n = len(o["d"]) if isinstance(o["d"], list) else -1
    columns = {}
    for name, attr in BATCH_COLUMNS.items():
        col = o.get(name, [BATCH_DEFAULTS.get(name)] * max(n, 0))
        if not isinstance(col, list) or len(col) != n:
            raise KnowledgeBaseError("ingest batch %d: field %s must be a list of one value per window (as d)"
                                     % (b, name))
        columns[attr] = col
    fs = o.get("fs", "paper")
    if not isinstance(fs, str):
        raise KnowledgeBaseError("ingest batch %d: field fs (the feature set) must be a string" % b)
    return b, WindowBatch(**columns, feature_set=fs)


def windows_to_json(batch_id: int, windows: dict[str, list]) -> bytes:
    """One batch line: windows holds BATCH_COLUMNS' keys, each a list of one value per window."""
    return (json.dumps({"b": batch_id, **windows}, separators=(",", ":")) + "\n").encode()


def upload_to_json(u: Upload) -> bytes:
    return (json.dumps({"d": u.device_id, "s": u.seq, "k": u.kind, "f": list(u.features or ()),
                        "c": u.champion_id, "cs": u.champion_score, "cd": u.champion_decision,
                        "w": u.window_start, "t": u.sent_at}, separators=(",", ":")) + "\n").encode()


# the ids of the devices on this gateway's serial ports are theirs alone: their uploads are authenticated there
PORT_OWNED = "device is served by a serial port of this gateway (authenticated uploads only)"
MAX_LINE = 64 * 1024  # bytes of one JSON line; a longer one closes the connection
MAX_PENDING_OUT = 1 << 20  # answers waiting for a client that does not read them; beyond, the client is dropped


def serve_socket(service) -> None:
    """Accept clients on service.ingest_socket and feed their lines to service.submit until it stops.

    All sockets are non-blocking with a buffer per client, written when the client can take it: a client that
    stops reading its answers is dropped when its buffer is full, it never stalls the loop or another client."""
    path = service.ingest_socket
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(path.name + ".new")
    if staging.exists():
        staging.unlink()
    srv.bind(str(staging))
    os.chmod(staging, 0o600)  # a trusted local interface: only the service's user may connect
    srv.listen(64)
    os.rename(staging, path)  # the path appears listening and restricted
    srv.setblocking(False)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    conns: set[_SocketConn] = set()

    def drop(c: _SocketConn) -> None:
        conns.discard(c)
        sel.unregister(c.conn)
        c.conn.close()

    try:
        while not service.stop_event.is_set():
            for key, events in sel.select(timeout=0.1):
                if key.data is None:
                    try:
                        conn, _ = srv.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    c = _SocketConn(service, conn, wake_w)
                    conns.add(c)
                    sel.register(conn, selectors.EVENT_READ, c)
                elif key.data == "wake":
                    try:
                        wake_r.recv(4096)
                    except OSError:
                        pass
                elif events & selectors.EVENT_READ and not key.data.read():
                    drop(key.data)
            for c in list(conns):
                ok = c.write()
                if not ok:
                    drop(c)
                else:
                    sel.modify(c.conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.pending() else 0), c)
    finally:
        for c in list(conns):
            drop(c)
        sel.close()
        srv.close()
        wake_r.close()
        wake_w.close()


class _SocketConn:
    """One client: its partial input line and the answers not yet written."""

    def __init__(self, service, conn: socket.socket, wake: socket.socket):
        self.service = service
        self.conn = conn
        self.wake = wake
        self.buf = b""
        self.out = bytearray()
        self.wlock = threading.Lock()
        self.overflow = False

    def read(self) -> bool:
        try:
            data = self.conn.recv(1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > MAX_LINE:
            self._send(b"error line longer than %d bytes\n" % MAX_LINE)
            self.write()
            return False
        for line in lines:
            if not line.strip():
                continue
            if len(line) > MAX_LINE:
                self._send(b"error line longer than %d bytes\n" % MAX_LINE)
                continue
            try:
                o = _json_object(line)
                if "b" in o:
                    self._submit_windows(*_windows_from_object(o))
                    continue
                u = _upload_from_object(o)
            except KnowledgeBaseError as e:
                self._send(b"error %s\n" % str(e).encode())
                continue
            owned = isinstance(u.device_id, str) and u.device_id in self.service.ports
            self.service.submit(u, self.ack, self.refuse, reason=PORT_OWNED if owned else None)
        return True

    def _submit_windows(self, batch_id: int, batch: WindowBatch) -> None:
        ports = self.service.ports
        owned = ({i: PORT_OWNED for i, d in enumerate(batch.device_ids) if isinstance(d, str) and d in ports}
                 if ports else {})
        def acked(refused_rows: list[int]) -> None:
            self._send(b"acked %d%s\n" % (batch_id, b" " + ",".join(map(str, refused_rows)).encode()
                                            if refused_rows else b""))

        self.service.submit_windows(batch, acked, self.refuse, owned)

    def ack(self, u: Upload, duplicate: bool) -> None:
        self._send(b"ack %s %d\n" % (u.device_id.encode(), u.seq))

    def refuse(self, u: Upload, reason: str) -> None:
        """`refused <device_id> <seq> <reason>`: this upload will never be stored, do not resend it."""
        d = u.device_id if valid_id(u.device_id) else "-"
        s_ = str(u.seq) if isinstance(u.seq, int) and not isinstance(u.seq, bool) else "-"
        self._send(("refused %s %s %s\n" % (d, s_[:40], reason.replace("\n", " "))).encode())

    def pending(self) -> bool:
        with self.wlock:
            return bool(self.out)

    def _send(self, data: bytes) -> None:
        """Queue an answer (any thread); the socket thread writes it when the client can take it."""
        with self.wlock:
            if len(self.out) + len(data) > MAX_PENDING_OUT:
                self.overflow = True
            else:
                self.out += data
        try:
            self.wake.send(b"w")
        except OSError:  # the wake pipe is full: the socket thread is awake anyway
            pass

    def write(self) -> bool:
        """Write what the client can take now; False when it is gone or fell too far behind."""
        with self.wlock:
            if self.overflow:
                return False
            if not self.out:
                return True
            try:
                n = self.conn.send(self.out)
            except BlockingIOError:
                return True
            except OSError:
                return False
            del self.out[:n]
        return True
