"""Gateway link service: the one long-running process that owns the devices' serial ports.

It ingests uploads into the Knowledge Base (acknowledging each only after its commit; a retransmission is
stored once), lets the Pool Inference Engine decide them, and carries out the deploy requests queued in the
Knowledge Base, so nothing is lost while Dagster is down and no two processes open one port.

Two ways in:
- serial ports (`--port DEVICE_ID=/dev/ttyUSB0`, pySerialTransfer frames, `firmware.messages` envelopes);
- the ingest socket (`--ingest-socket PATH`, a Unix socket; one JSON object per line, see `upload_from_json`;
  the service answers `ack <device_id> <seq>` per line once committed): traffic generators, other gateways.

    python -m tinyml_dagster.link_service --port dev-1=/dev/pts/3 --ingest-socket data/link.sock
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tinyml_dagster import settings
from tinyml_dagster.knowledge_base import KnowledgeBase, KnowledgeBaseError, Upload

log = logging.getLogger("tinyml_dagster.link_service")

# (device_id, package blob, model_id, transport) -> link figures; default: tinyml_dagster.link's Deployer
Deployer = Callable[[str, bytes, str, object], dict]
PoolFactory = Callable[[], object]
# a device's self-trained champion (version v) is stored under upload number CHAMPION_SEQ_BASE + v
CHAMPION_SEQ_BASE = 1 << 40


@dataclass
class _Item:
    upload: Upload
    ack: Callable[[Upload, bool], None]


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


class LinkService:
    """Ingest loop, ports, ingest socket and deploy queue of one gateway."""

    def __init__(self, kb_path: str | Path | None = None, *, ports: dict[str, str] | None = None,
                 ingest_socket: str | Path | None = None, pool_factory: PoolFactory | None = None,
                 deployer: Deployer | None = None, timing=None, batch_max: int = 5000,
                 pool_refresh_s: float = 5.0, reply_slack_s: float = 1.0):
        self.kb_path = Path(kb_path) if kb_path else settings.kb_path()
        self.ports = dict(ports or {})
        self.ingest_socket = Path(ingest_socket) if ingest_socket else None
        self.pool_factory = pool_factory
        self.deployer = deployer
        if timing is None:
            from tinyml_dagster.link.transport import LinkTiming

            timing = LinkTiming()
        self.timing = timing
        self.batch_max = batch_max
        self.pool_refresh_s = pool_refresh_s
        self.reply_slack_s = reply_slack_s
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._q: queue.Queue[_Item] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._links: dict[str, "_SerialLink"] = {}
        self.counters = {"ingested": 0, "duplicates": 0, "rejected": 0, "decided": 0, "deploys": 0}

    # -- main loop: commit, acknowledge, decide, deploy --------------------------------------------------

    def run(self) -> None:
        kb = KnowledgeBase(self.kb_path)
        kb.requeue_running()
        for device_id, path in self.ports.items():
            link = _SerialLink(self, device_id, path, kb)
            self._links[device_id] = link
            self._spawn(link.run, "port-%s" % device_id)
        if self.ingest_socket:
            self._spawn(self._serve_socket, "ingest-socket")
        pool, pool_at = None, 0.0
        next_deploy_check = next_decide = 0.0
        self.ready.set()
        log.info("link service up: kb=%s ports=%s socket=%s", self.kb_path, self.ports, self.ingest_socket)
        try:
            while not self.stop_event.is_set():
                batch = self._take_batch(timeout=0.05)
                if batch:
                    self._commit(kb, batch)
                now = time.monotonic()
                if self.pool_factory is not None and (not pool_at or now - pool_at > self.pool_refresh_s):
                    try:
                        pool = self.pool_factory()
                    except Exception as e:  # no repository yet: ingest anyway, decide later
                        if pool is not None or not pool_at:
                            log.warning("pool unavailable (retrying every %.0f s): %s", self.pool_refresh_s, e)
                        pool = None
                    pool_at = now
                if pool is not None and (batch or now >= next_decide):
                    self.counters["decided"] += pool.decide_pending(kb).decided
                    next_decide = now + 1.0
                if now >= next_deploy_check:
                    self._dispatch_deploys(kb)
                    next_deploy_check = now + 0.2
        finally:
            self.stop_event.set()
            for t in self._threads:
                t.join(timeout=5)
            kb.close()

    def stop(self) -> None:
        self.stop_event.set()

    def submit(self, upload: Upload, ack: Callable[[Upload, bool], None]) -> None:
        """Queue an upload; ack(upload, duplicate) is called once it is committed."""
        self._q.put(_Item(upload, ack))

    def _take_batch(self, timeout: float) -> list[_Item]:
        try:
            first = self._q.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_max:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def _commit(self, kb: KnowledgeBase, batch: list[_Item]) -> None:
        good = []
        for item in batch:
            try:
                item.upload.validate()
                good.append(item)
            except KnowledgeBaseError as e:
                self.counters["rejected"] += 1
                log.warning("rejected: %s", e)
        if not good:
            return
        result = kb.ingest([i.upload for i in good])  # committed when this returns
        for item, dup in zip(good, result.duplicates):
            self.counters["duplicates" if dup else "ingested"] += 1
            try:
                item.ack(item.upload, dup)
            except OSError:
                pass  # the sender went away; it retransmits and the KB recognises the repeat

    def _dispatch_deploys(self, kb: KnowledgeBase) -> None:
        for device_id, link in self._links.items():
            if link.deploy_pending is None:
                req = kb.claim_deploy([device_id])
                if req is not None:
                    link.deploy_pending = req

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- ingest socket ------------------------------------------------------------------------------------

    def _serve_socket(self) -> None:
        path = self.ingest_socket
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
            while not self.stop_event.is_set():
                for key, _ in sel.select(timeout=0.1):
                    if key.data is None:
                        conn, _ = srv.accept()
                        conn.setblocking(True)
                        sel.register(conn, selectors.EVENT_READ, _SocketConn(self, conn))
                    else:
                        if not key.data.read():
                            sel.unregister(key.fileobj)
                            key.fileobj.close()
        finally:
            sel.close()
            srv.close()


class _SocketConn:
    def __init__(self, service: LinkService, conn: socket.socket):
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


class IngestClient:
    """A sender over the ingest socket that survives service restarts: unacked uploads are resent on reconnect."""

    def __init__(self, socket_path: str | Path, connect_timeout: float = 60.0):
        self.socket_path = str(socket_path)
        self.connect_timeout = connect_timeout
        self.in_flight: dict[tuple[str, int], bytes] = {}
        self.reconnects = 0
        self.sock: socket.socket | None = None
        self._buf = b""
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.socket_path)
                s.settimeout(1.0)
                self.sock, self._buf = s, b""
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("no link service listening on %s" % self.socket_path) from None
                time.sleep(0.02)

    def _reconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.reconnects += 1
        self._connect()
        if self.in_flight:
            self._sendall(b"".join(self.in_flight.values()))

    def _sendall(self, data: bytes) -> None:
        while True:
            try:
                self.sock.sendall(data)
                return
            except OSError:
                self._reconnect()
                return  # the resend of everything in flight included data

    def send(self, lines: list[tuple[str, int, bytes]]) -> None:
        """Send (device_id, seq, JSON line) uploads; they stay in flight until acknowledged."""
        for d, s_, line in lines:
            self.in_flight[(d, s_)] = line
        self._sendall(b"".join(line for _, _, line in lines))

    def receive_acks(self) -> list[tuple[str, int]]:
        """Acks that arrived (waits up to 1 s); reconnects and resends when the service went away."""
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return []
        except OSError:
            data = b""
        if not data:
            self._reconnect()
            return []
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        acked = []
        for line in lines:
            parts = line.split(b" ")
            if parts[0] == b"ack" and len(parts) == 3:
                key = (parts[1].decode(), int(parts[2]))
                self.in_flight.pop(key, None)
                acked.append(key)
            elif parts[0] == b"error":
                raise KnowledgeBaseError(line[6:].decode())
        return acked

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


# -- serial ports ---------------------------------------------------------------------------------------------

class _SerialLink:
    """One device's port: uploads in, cumulative UPLOAD_ACKs out, and the deploys queued for this device."""

    def __init__(self, service: LinkService, device_id: str, path: str, kb: KnowledgeBase):
        self.service = service
        self.device_id = device_id
        self.path = path
        self.deploy_pending: tuple | None = None
        self.lock = threading.Lock()
        self.tx_seq = 0
        # highest upload number such that all before it (from the first this gateway saw) are committed
        self.contiguous = self._contiguous_from_kb(kb)
        self.committed_above: set[int] = set()
        self.transport = None
        self.champion_parts: dict[int, dict[int, bytes]] = {}
        self.kb = kb

    def _contiguous_from_kb(self, kb: KnowledgeBase) -> int | None:
        return kb.scalar(
            "SELECT MIN(seq) FROM uploads u WHERE device_id=? AND kind != 'champion' AND NOT EXISTS"
            " (SELECT 1 FROM uploads v WHERE v.device_id = u.device_id AND v.seq = u.seq + 1)",
            (self.device_id,),
        )

    def run(self) -> None:
        from firmware import messages
        from tinyml_dagster.link.transport import SerialTransport

        self.transport = SerialTransport(self.path, self.service.timing)
        try:
            while not self.service.stop_event.is_set():
                try:
                    self._step(messages)
                except Exception:  # one bad message or a failing KB must not take the port down
                    log.exception("%s: port loop error", self.device_id)
                    time.sleep(0.5)
        finally:
            self.transport.close()

    def _step(self, messages) -> None:
        if self.deploy_pending is not None:
            self._deploy()
            return
        with self.lock:
            msg = self.transport.recv(0.02)
        if msg is None:
            return
        mtype, _seq, body = msg
        if mtype == messages.UPLOAD:
            try:
                no, wtime, anomaly, version, score, feats, fset_code = messages.unpack_upload(body)
                from firmware import feature_sets

                fset = feature_sets.name_of_code(fset_code)
            except ValueError as e:
                log.warning("%s: %s", self.device_id, e)
                return
            u = Upload(self.device_id, no, "anomaly" if anomaly else "normal",
                       features=tuple(float(x) for x in feats), champion_id=str(version),
                       champion_score=float(score), champion_decision=int(anomaly),
                       window_start=float(wtime), sent_at=time.time(), feature_set=fset)
            self.service.submit(u, self.ack)
        elif mtype == messages.CHAMPION_CHUNK:
            self._champion_chunk(bytes(body))
        elif mtype == messages.ALARM:
            self._alarm(messages, bytes(body))

    def _alarm(self, messages, body: bytes) -> None:
        """Store an alarm event in the Knowledge Base (raised, then the same start again when it clears)."""
        from firmware import feature_sets

        try:
            start, end, peak, code, version, champion = messages.unpack_alarm(body)
            fset = feature_sets.name_of_code(code)
        except ValueError as e:
            log.warning("%s: %s", self.device_id, e)
            return
        self.kb.record_alarm(self.device_id, float(start), None if end is None else float(end), float(peak), fset,
                             champion or None, int(version))

    def _champion_chunk(self, body: bytes) -> None:
        """Reassemble the device's self-trained champion; complete, it is stored once like an upload."""
        from firmware.data_comm import CHAMPION_CHUNK_FORMAT

        head = struct.calcsize(CHAMPION_CHUNK_FORMAT)
        if len(body) < head:
            log.warning("%s: short CHAMPION_CHUNK", self.device_id)
            return
        version, index, total = struct.unpack_from(CHAMPION_CHUNK_FORMAT, body, 0)
        parts = self.champion_parts.setdefault(version, {})
        parts[index] = body[head:]
        if len(parts) == total:
            blob = b"".join(parts[i] for i in range(total))
            del self.champion_parts[version]
            self.service.submit(Upload(self.device_id, CHAMPION_SEQ_BASE + version, "champion", model_blob=blob,
                                       sent_at=time.time()), lambda u, dup: None)

    def ack(self, u: Upload, duplicate: bool) -> None:
        from firmware import messages

        with self.lock:
            n = u.seq
            if self.contiguous is None or n <= self.contiguous + 1:
                self.contiguous = n if self.contiguous is None else max(self.contiguous, n)
                while self.contiguous + 1 in self.committed_above:
                    self.committed_above.discard(self.contiguous + 1)
                    self.contiguous += 1
            else:
                self.committed_above.add(n)
            self.tx_seq = (self.tx_seq + 1) & 0xFFFF
            self.transport.send(messages.UPLOAD_ACK, self.tx_seq, struct.pack("<I", self.contiguous))

    def _deploy(self) -> None:
        req_id, device_id, model_id, blob = self.deploy_pending
        kb = None
        try:
            kb = KnowledgeBase(self.service.kb_path)
            if self.service.deployer is not None:
                figures = self.service.deployer(device_id, blob or b"", model_id, self.transport)
            else:
                from tinyml_dagster.link.protocol import Deployer

                pkg = package_from_blob(blob)
                last = [0.0]

                def progress(p: dict) -> None:
                    if time.monotonic() - last[0] > 0.5:
                        last[0] = time.monotonic()
                        kb.update_deploy_progress(req_id, p)

                with self.lock:
                    report = Deployer(self.transport, progress=progress,
                                      reply_slack_s=self.service.reply_slack_s).deploy(pkg)
                figures = report.as_metadata()
                if not report.installed:
                    raise RuntimeError("device refused the package: %s" % report.reason)
            kb.finish_deploy(req_id, True, figures)
            self.service.counters["deploys"] += 1
        except Exception as e:
            log.exception("deploy %d of %s to %s failed", req_id, model_id, device_id)
            if kb is not None:
                kb.finish_deploy(req_id, False, error="%s: %s" % (type(e).__name__, e))
        finally:
            if kb is not None:
                kb.close()
            self.deploy_pending = None


def package_to_blob(pkg) -> bytes:
    """A deployment_agent.Package as bytes for the KB's deploy queue (JSON head + the package bytes)."""
    head = {"model_id": pkg.model_id, "device_id": pkg.device_id, "version": pkg.version,
            "encoding": pkg.encoding, "head_size": pkg.head_size,
            "files": [dict(f, sha8=f["sha8"].hex()) for f in pkg.files]}
    h = json.dumps(head, separators=(",", ":")).encode()
    return struct.pack("<I", len(h)) + h + pkg.data


def package_from_blob(blob: bytes):
    from tinyml_dagster.deployment_agent import Package

    if not blob or len(blob) < 4:
        raise KnowledgeBaseError("deploy request has no package")
    (n,) = struct.unpack_from("<I", blob, 0)
    head = json.loads(blob[4:4 + n])
    head["files"] = [dict(f, sha8=bytes.fromhex(f["sha8"])) for f in head["files"]]
    return Package(data=bytes(blob[4 + n:]), **head)


# -- CLI ------------------------------------------------------------------------------------------------------

def repository_pool_factory() -> PoolFactory:
    """The pool from the model repository under settings (its candidates, as the forest engineer stores them)."""

    def make():
        from tinyml_dagster.pool_inference import pool_from_repository

        return pool_from_repository()

    return make


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.link_service", description=__doc__.split("\n")[0])
    ap.add_argument("--kb", help="Knowledge Base path (default: settings.kb_path())")
    ap.add_argument("--port", action="append", default=[], metavar="DEVICE_ID=PATH", help="a device's serial port")
    ap.add_argument("--ingest-socket", help="Unix socket for JSON-line uploads")
    ap.add_argument("--baud", type=int, default=2400)
    ap.add_argument("--time-scale", type=float, default=1.0, help="link time x this = real time (tests: < 1)")
    ap.add_argument("--reply-slack", type=float, default=1.0,
                    help="real seconds added to every deploy reply timeout (busy hosts, scaled time)")
    ap.add_argument("--no-pool", action="store_true", help="store uploads only; Dagster's runs decide them")
    ap.add_argument("--ready-file", help="written once the service listens")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s link_service %(levelname)s %(message)s")
    ports = {}
    for spec in args.port:
        if "=" not in spec:
            ap.error("--port %r: expected DEVICE_ID=PATH" % spec)
        dev, path = spec.split("=", 1)
        ports[dev] = path
    from tinyml_dagster.link.transport import LinkTiming

    svc = LinkService(args.kb, ports=ports, ingest_socket=args.ingest_socket,
                      timing=LinkTiming(baud=args.baud, time_scale=args.time_scale),
                      pool_factory=None if args.no_pool else repository_pool_factory(),
                      reply_slack_s=args.reply_slack)
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())
    signal.signal(signal.SIGINT, lambda *_: svc.stop())
    if args.ready_file:
        def announce():
            svc.ready.wait()
            while args.ingest_socket and not Path(args.ingest_socket).exists():
                time.sleep(0.01)
            Path(args.ready_file).write_text(str(os.getpid()))
        threading.Thread(target=announce, daemon=True).start()
    svc.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
