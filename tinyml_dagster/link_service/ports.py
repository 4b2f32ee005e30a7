"""One device's serial port: uploads and champion chunks in, cumulative UPLOAD_ACKs out, queued deploys."""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from serial import SerialException

from firmware import feature_sets

from tinyml_dagster.knowledge_base import CHAMPION_SEQ_BASE, KnowledgeBase, Upload
from tinyml_dagster.deployment_agent import Package

log = logging.getLogger("tinyml_dagster.link_service")

if TYPE_CHECKING:
    from tinyml_dagster.link_service.service import LinkService

RETRY_MIN_S = 0.5  # a missing or failed port is reopened after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
MAX_CHAMPION_CHUNKS = 1200  # 1200 x 240 bytes > the largest champion the KB takes (MAX_MODEL_BYTES)
MAX_PARTIAL_CHAMPIONS = 2  # versions being reassembled at once; a third evicts the oldest
CHAMPION_EXPIRY_S = 600.0  # a partial champion not completed in this time is dropped
KEY_RETRY_S = 10.0
UNAUTHENTICATED = "unauthenticated upload (bad or missing MAC)"
UNAUTHENTICATED_GAP = "unauthenticated UPLOAD_GAP (bad or missing MAC)"
UNAUTHENTICATED_CHAMPION = "unauthenticated champion upload (bad or missing MAC)"
WRITE_TIMEOUT_S = 2.0  # a frame that cannot leave in this time (nobody reads the port) fails its send


class SerialLink:
    """One device's port: uploads in, cumulative UPLOAD_ACKs out, and the deploys queued for this device.

    Everything that goes on the wire is written by the port's own thread (the loop only queues acks and
    refusals), so a port nobody reads never stalls the loop or another port. A port that cannot be opened or
    fails is reopened with exponential backoff, logged once per change of state."""

    def __init__(self, service: LinkService, device_id: str, path: str):
        self.service = service
        self.device_id = device_id
        self.path = path
        self.deploy_pending: tuple | None = None
        self.settings_pending: tuple | None = None  # (request id, device id, version, settings, revert)
        self.lock = threading.Lock()  # the transport (receive, deploy)
        self.state_lock = threading.Lock()  # contiguous, committed_above, outgoing, ack_due
        self.tx_seq = 0
        # highest upload number such that all from 0 through it are settled: committed, refused or recorded lost
        # (-1: not even upload 0; a device numbers its uploads from 0 and says which numbers will never come);
        # read from the Knowledge Base once it opens (resume_from)
        self.contiguous = -1
        self.committed_above: set[int] = set()
        self.ranges_above: list[tuple[int, int]] = []  # settled ranges above contiguous + 1 (told gaps)
        self.outgoing: deque[tuple[int, bytes]] = deque()  # refusals, in order
        self.ack_due: int | None = None  # the newest cumulative ack not sent yet
        self.transport = None
        self.port_state = "closed"
        self.key: bytes | None = None
        self.key_checked = -KEY_RETRY_S
        self.champion_parts: dict[int, tuple[float, int, dict[int, bytes]]] = {}  # version: (started, total, chunks)

    def resume_from(self, kb: KnowledgeBase) -> None:
        """How far this device's uploads are settled, from the Knowledge Base (the loop calls it when it opens)."""
        through = kb.settled_through(self.device_id, start=0)
        with self.state_lock:
            self.contiguous = max(self.contiguous, through)
            self._absorb()

    def run(self) -> None:
        from firmware import messages

        backoff = RETRY_MIN_S
        try:
            while not self.service.stop_event.is_set():
                if self.transport is None:
                    if not self._open():
                        self.service.stop_event.wait(backoff)
                        backoff = min(RETRY_MAX_S, backoff * 2)
                        continue
                    backoff = RETRY_MIN_S
                try:
                    self._step(messages)
                except (OSError, SerialException) as e:  # the port went away or nobody reads it: reopen it
                    self._set_state("failed", "%s: %s" % (type(e).__name__, e))
                    self._close()
                except Exception:  # one bad message must not take the port down
                    log.exception("%s: port loop error", self.device_id)
                    time.sleep(0.5)
        finally:
            self._close()

    def _open(self) -> bool:
        from tinyml_dagster.link.transport import SerialTransport

        try:
            self.transport = SerialTransport(self.path, self.service.timing, write_timeout_s=WRITE_TIMEOUT_S)
        except (OSError, SerialException) as e:
            self._set_state("unavailable", "%s (retrying with backoff up to %.0f s)" % (e, RETRY_MAX_S))
            return False
        self._set_state("open", self.path)
        return True

    def _close(self) -> None:
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:
                pass
            self.transport = None

    def _set_state(self, state: str, detail: str) -> None:
        """Log a change of the port's state (once per change, never once per retry)."""
        if state != self.port_state:
            (log.info if state == "open" else log.warning)("%s: port %s: %s", self.device_id, state, detail)
            self.port_state = state

    def _step(self, messages) -> None:
        self._flush()
        if self.deploy_pending is not None:
            self._deploy()
            return
        if self.settings_pending is not None:
            self._configure()
            return
        with self.lock:
            msg = self.transport.recv(0.02)
        if msg is None:
            return
        mtype, _seq, body = msg
        if mtype == messages.UPLOAD:
            body = messages.unseal(self._key(), messages.TAG_UPLOAD, self.device_id, body)
            if body is None:  # forged or from a device without its key: counted, and never answered (a refusal
                # would make the real device drop its own upload of that number)
                stub = Upload(self.device_id, -1, "normal")
                self.service.submit(stub, self.ack, None, reason=UNAUTHENTICATED)
                return
            try:
                no, wtime, anomaly, version, score, feats, fset_code = messages.unpack_upload(body)
                fset = feature_sets.name_of_code(fset_code)
            except ValueError as e:
                if len(body) >= 4:  # the number is there: refuse it, so the device stops resending it
                    stub = Upload(self.device_id, struct.unpack_from("<I", body, 0)[0], "normal")
                    self.service.submit(stub, self.ack, self.refuse, reason="malformed UPLOAD body", settles=True)
                else:
                    log.warning("%s: %s", self.device_id, e)
                return
            u = Upload(self.device_id, no, "anomaly" if anomaly else "normal",
                       features=tuple(float(x) for x in feats), champion_id=str(version),
                       champion_score=float(score), champion_decision=int(anomaly),
                       window_start=float(wtime), sent_at=time.time(), feature_set=fset)
            self.service.submit(u, self.ack, self.refuse, settles=True)
        elif mtype == messages.CHAMPION_CHUNK:
            self._champion_chunk(bytes(body))
        elif mtype == messages.UPLOAD_GAP:
            self._gap(bytes(body), messages)
        elif mtype == messages.ALARM:
            self._alarm(bytes(body), messages)
        elif mtype == messages.HELLO:
            self._hello(bytes(body))
        elif mtype == messages.HEALTH:
            self._health(bytes(body), messages)

    def _hello(self, body: bytes) -> None:
        """A HELLO with the runtime tail: what the device's MicroPython imports, stored for its next packages."""
        from firmware.data_comm import unpack_hello

        try:
            hello = unpack_hello(body)
        except (ValueError, struct.error, UnicodeError) as e:
            log.warning("%s: malformed HELLO: %s", self.device_id, e)
            return
        if hello["device_id"] != self.device_id:
            log.warning("%s: HELLO names device %r: not recorded", self.device_id, hello["device_id"])
        elif "sys_mpy" in hello:
            self.service.submit_write(
                lambda kb: kb.record_device_runtime(self.device_id, hello["sys_mpy"], hello["firmware_version"]))

    def _health(self, body: bytes, messages) -> None:
        """A health report of the device (verified, like its uploads): stored by the service's loop."""
        from tinyml_dagster.health import from_report

        body = messages.unseal(self._key(), messages.TAG_HEALTH, self.device_id, body)
        if body is None:
            self.service._log_once("health-" + self.device_id, "%s: unauthenticated HEALTH dropped" % self.device_id)
            return
        try:
            report = from_report(messages.unpack_health(body))
        except ValueError as e:
            log.warning("%s: %s", self.device_id, e)
            return
        self.service.submit_write(lambda kb: kb.record_health(self.device_id, report))

    def _configure(self) -> None:
        """Carry out a queued settings update: sealed under the device's key, sent, the answer recorded."""
        from firmware import configure
        from tinyml_dagster.link.protocol import send_settings

        req_id, device_id, version, values, revert = self.settings_pending
        try:
            key = self._key()
            if not key:
                raise RuntimeError("the gateway holds no key for %s: nothing can be signed" % device_id)
            with self.lock:
                rep = send_settings(self.transport, configure.pack_update(key, device_id, version, values, revert),
                                    version, reply_slack_s=self.service.reply_slack_s)
            outcome = ("applied" if rep.applied else "refused", rep.reason, rep.in_force, rep.as_metadata())
            (log.info if rep.applied else log.warning)("%s: settings v%d %s: %s", device_id, version, outcome[0],
                                                       rep.reason)
        except Exception as e:
            log.warning("%s: settings update %d failed: %s: %s", device_id, req_id, type(e).__name__, e)
            outcome = ("failed", "%s: %s" % (type(e).__name__, e), None, {})
        finally:
            self.settings_pending = None
        self.service.submit_write(lambda kb: kb.finish_settings(req_id, *outcome))

    def _alarm(self, body: bytes, messages) -> None:
        """An alarm raised or cleared on the device (verified, like its uploads): stored by the service's loop, then
        answered with ALARM_ACK; a malformed one is refused (the device stops sending it), a forged one not answered."""
        body = messages.unseal(self._key(), messages.TAG_ALARM, self.device_id, body)
        if body is None:
            self.service._log_once("alarm-" + self.device_id, "%s: unauthenticated ALARM dropped" % self.device_id)
            return
        try:
            no, start, end, peak, code, version, champion = messages.unpack_alarm(body)
            fset = feature_sets.name_of_code(code)
        except ValueError as e:
            log.error("%s: ALARM refused, nothing stored: %s", self.device_id, e)
            if len(body) >= 4:  # the number is there: refuse it, so the device stops resending it
                self.alarm_answer(struct.unpack_from("<I", body, 0)[0], None, False)
            return
        self.service.submit_alarm(self.device_id, no, float(start), None if end is None else float(end), float(peak),
                                  fset, champion or None, int(version), self.alarm_answer)

    def alarm_answer(self, alarm_no: int, end: float | None, stored: bool) -> None:
        """Queue the ALARM_ACK of an alarm event committed (stored) or refused for good."""
        from firmware import messages

        status = messages.ALARM_STORED if stored else messages.ALARM_REFUSED
        with self.state_lock:
            self.outgoing.append((messages.ALARM_ACK, struct.pack(messages.ALARM_ACK_FORMAT, alarm_no, int(end or 0),
                                                                  status)))

    def _key(self) -> bytes | None:
        """This device's key; looked up again every KEY_RETRY_S while the gateway holds none."""
        now = time.monotonic()
        if self.key is None and now >= self.key_checked + KEY_RETRY_S:
            self.key_checked = now
            self.key = self.service.device_key(self.device_id)
            self.service._log_once("key-" + self.device_id, None if self.key else
                                   "%s: the gateway holds no key for it: its uploads cannot be verified and are"
                                   " not stored" % self.device_id)
        return self.key

    def _flush(self) -> None:
        """Send what the loop queued (refusals, then the latest cumulative ack) from this port's thread; while the
        device does not read its port they wait (acks coalesce into the newest), and reading goes on."""
        if self.ack_due is None and not self.outgoing:
            return
        if not self.transport.writable():
            self._set_state("not reading", "the device does not read its port; acks wait, uploads are still read")
            return
        self._set_state("open", self.path)
        from firmware import messages

        while self.outgoing:
            with self.state_lock:
                mtype, body = self.outgoing.popleft()
            self._send(mtype, body)
        with self.state_lock:
            upto, self.ack_due = self.ack_due, None
        if upto is not None:
            self._send(messages.UPLOAD_ACK, struct.pack("<I", upto))

    def _send(self, mtype: int, body: bytes) -> None:
        self.tx_seq = (self.tx_seq + 1) & 0xFFFF
        with self.lock:
            self.transport.send(mtype, self.tx_seq, body)

    def _champion_chunk(self, body: bytes) -> None:
        """Reassemble the device's self-trained champion; complete, it is stored once like an upload and answered
        with CHAMPION_ACK. Partial ones are bounded (versions, chunks) and expire."""
        from firmware import messages
        from firmware.data_comm import CHAMPION_CHUNK_FORMAT

        head = struct.calcsize(CHAMPION_CHUNK_FORMAT)
        if len(body) < head:
            log.warning("%s: short CHAMPION_CHUNK", self.device_id)
            return
        version, index, total = struct.unpack_from(CHAMPION_CHUNK_FORMAT, body, 0)
        now = time.monotonic()
        for v in [v for v, p in self.champion_parts.items() if now - p[0] > CHAMPION_EXPIRY_S]:
            del self.champion_parts[v]
        if not 0 <= index < total <= MAX_CHAMPION_CHUNKS:
            log.warning("%s: CHAMPION_CHUNK %d of %d refused (at most %d chunks)", self.device_id, index, total,
                        MAX_CHAMPION_CHUNKS)
            return
        if version not in self.champion_parts and len(self.champion_parts) >= MAX_PARTIAL_CHAMPIONS:
            oldest = min(self.champion_parts, key=lambda v: self.champion_parts[v][0])
            del self.champion_parts[oldest]
        started, want, parts = self.champion_parts.setdefault(version, (now, total, {}))
        if want != total:  # a new transfer of this version with another layout: start it over
            started, want, parts = self.champion_parts[version] = (now, total, {})
        parts[index] = body[head:]
        if len(parts) == total:
            blob = messages.unseal(self._key(), messages.TAG_CHAMPION, self.device_id,
                                   b"".join(parts[i] for i in range(total)))
            del self.champion_parts[version]
            if blob is None:  # not the device's: counted, not answered
                self.service.submit(Upload(self.device_id, -1, "champion"), self.ack, None,
                                    reason=UNAUTHENTICATED_CHAMPION)
                return
            self.service.submit(
                Upload(self.device_id, CHAMPION_SEQ_BASE + version, "champion", model_blob=blob, sent_at=time.time()),
                lambda u, dup: self._champion_answer(version, messages.CHAMPION_STORED),
                lambda u, reason: self._champion_answer(version, messages.CHAMPION_REFUSED), settles=True)

    def _settle(self, first: int, last: int | None = None) -> int | None:
        """Mark upload numbers first..last settled (stored, refused or lost); the new cumulative ack (None: none)."""
        last = first if last is None else last
        if first <= self.contiguous + 1:
            self.contiguous = max(self.contiguous, last)
        elif first == last:
            self.committed_above.add(first)
        else:
            self.ranges_above.append((first, last))
        return self._absorb()

    def _absorb(self) -> int | None:
        """Move contiguous over the settled numbers and ranges that now join it; the cumulative ack (or None)."""
        while True:
            if self.contiguous + 1 in self.committed_above:
                self.committed_above.discard(self.contiguous + 1)
                self.contiguous += 1
                continue
            joined = [r for r in self.ranges_above if r[0] <= self.contiguous + 1]
            if not joined:
                break
            self.ranges_above = [r for r in self.ranges_above if r[0] > self.contiguous + 1]
            self.contiguous = max([self.contiguous] + [r[1] for r in joined])
        return self.contiguous if self.contiguous >= 0 else None

    def ack(self, u: Upload, duplicate: bool) -> None:
        """Upload u is committed: the cumulative UPLOAD_ACK is due (sent by the port's thread)."""
        with self.state_lock:
            self.ack_due = self._settle(u.seq)

    def refuse(self, u: Upload, reason: str) -> None:
        """Upload u will never be stored: queue UPLOAD_REFUSED (the device drops it); the ack moves past it."""
        from firmware import messages

        with self.state_lock:
            self.outgoing.append((messages.UPLOAD_REFUSED, messages.pack_upload_refused(u.seq, reason)))
            self.ack_due = self._settle(u.seq)

    def gap_recorded(self, first: int, last: int) -> None:
        """The numbers the device said will never come are recorded lost: the ack moves past them."""
        with self.state_lock:
            self.ack_due = self._settle(first, last)

    def _champion_answer(self, version: int, status: int) -> None:
        from firmware import messages

        with self.state_lock:
            self.outgoing.append((messages.CHAMPION_ACK, struct.pack(messages.CHAMPION_ACK_FORMAT, version, status)))

    def _gap(self, body: bytes, messages) -> None:
        body = messages.unseal(self._key(), messages.TAG_GAP, self.device_id, body)
        if body is None:  # only the device may say that its numbers will never come
            self.service.submit(Upload(self.device_id, -1, "normal"), self.ack, None, reason=UNAUTHENTICATED_GAP)
            return
        if len(body) < struct.calcsize(messages.GAP_FORMAT):
            log.warning("%s: short UPLOAD_GAP", self.device_id)
            return
        first, last, why = struct.unpack_from(messages.GAP_FORMAT, body, 0)
        if first > last:
            log.warning("%s: UPLOAD_GAP %d..%d is empty", self.device_id, first, last)
            return
        reason = {messages.GAP_DROPPED: "dropped by the device (outbox full)",
                  messages.GAP_SETTLED: "acknowledged before (not in this Knowledge Base)"}.get(why, "lost (%d)" % why)
        self.service.submit_gap(self.device_id, first, last, reason, self.gap_recorded)

    def _deploy(self) -> None:
        req_id, device_id, model_id, blob = self.deploy_pending
        kb = None
        try:
            kb = KnowledgeBase(self.service.kb_path)
            if self.service.deployer is not None:
                figures = self.service.deployer(device_id, blob or b"", model_id, self.transport)
            else:
                from tinyml_dagster.link.protocol import Deployer

                pkg = Package.from_blob(blob)
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
