"""One device's serial port: uploads and champion chunks in, cumulative UPLOAD_ACKs out, queued deploys."""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING

from tinyml_dagster.knowledge_base import KnowledgeBase, Upload
from tinyml_dagster.link.blobs import package_from_blob
from tinyml_dagster.link_service.service import CHAMPION_SEQ_BASE, log

if TYPE_CHECKING:
    from tinyml_dagster.link_service.service import LinkService


class SerialLink:
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
                no, wtime, anomaly, version, score, feats = messages.unpack_upload(body)
            except ValueError as e:
                log.warning("%s: %s", self.device_id, e)
                return
            u = Upload(self.device_id, no, "anomaly" if anomaly else "normal",
                       features=tuple(float(x) for x in feats[:3]), champion_id=str(version),
                       champion_score=float(score), champion_decision=int(anomaly),
                       window_start=float(wtime), sent_at=time.time())
            self.service.submit(u, self.ack)
        elif mtype == messages.CHAMPION_CHUNK:
            self._champion_chunk(bytes(body))

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
