"""The link service's loop: commit a batch of uploads, acknowledge it, let the pool decide, hand out deploys."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from tinyml_dagster.knowledge_base import (DatabaseError, IngestResult, KnowledgeBase, KnowledgeBaseError,
                                           UnstorableError, Upload, WindowBatch, location, valid_id)

log = logging.getLogger("tinyml_dagster.link_service")

# (device_id, package blob, model_id, transport) -> link figures; default: tinyml_dagster.link's Deployer
Deployer = Callable[[str, bytes, str, object], dict]
PoolFactory = Callable[[], object]
DECIDE_BATCH = 5000  # windows the pool decides per turn of the loop
MAX_QUEUED = 200_000  # uploads waiting for the database; beyond, new ones are dropped unacknowledged
DB_RETRY_MIN_S = 0.25  # after a database fault the loop retries after this, doubling up to DB_RETRY_MAX_S
DB_RETRY_MAX_S = 0.5  # a retry is one connection attempt: a restarted database server is back in use within this
REUSED = "upload number reused with different content"
INVALID_ID = "(invalid id)"  # refusals of uploads without a usable device id are counted under this name


@dataclass
class _Item:
    upload: Upload
    ack: Callable[[Upload, bool], None]
    refuse: Callable[[Upload, str], None] | None = None
    reason: str | None = None  # refused before it reached the door (e.g. a body that does not unpack)
    settles: bool = False  # a refusal settles the number for good (a port's device drops it): record it as a gap


@dataclass
class _WindowsItem:
    """A batch of windows from the ingest socket: acked(refused rows) once every other row is committed."""

    batch: WindowBatch
    acked: Callable[[list[int]], None]  # with the rows refused
    refuse: Callable[[Upload, str], None] | None = None
    reasons: dict[int, str] = field(default_factory=dict)  # rows refused before they reached the door

    def __len__(self) -> int:
        return len(self.batch)


def door_problem(u: Upload) -> str | None:
    """Why an upload must not be stored (types, lengths, finiteness, sizes, a champion blob that does not
    parse), or None."""
    reason = u.problem()
    if reason is None and u.kind == "champion":
        from tinyml_dagster.link.blobs import parse_device_champion

        try:
            parse_device_champion(u.model_blob)
        except KnowledgeBaseError as e:
            reason = str(e).split(":")[0] + ": not a champion (u16 length | config.json | compact forest)"
    return reason


def _size(item: _Item | _WindowsItem) -> int:
    return len(item) if isinstance(item, _WindowsItem) else 1


def _no_ack(upload: Upload, duplicate: bool) -> None:
    """The ack of a window of a batch: the batch is acknowledged as a whole."""


def _transient(e: Exception) -> bool:
    """A fault the open connection outlives (a lock, a full disk); others reopen the database."""
    text = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text or "full" in text)


class LinkService:
    """Ingest loop, ports, ingest socket and deploy queue of one gateway."""

    def __init__(self, kb_path: str | Path | None = None, *, ports: dict[str, str] | None = None,
                 ingest_socket: str | Path | None = None, pool_factory: PoolFactory | None = None,
                 deployer: Deployer | None = None, timing=None, batch_max: int = 5000,
                 pool_refresh_s: float = 5.0, reply_slack_s: float = 1.0, db_timeout_s: float = 5.0,
                 keys: Callable[[str], bytes | None] | None = None, gateway_id: str | None = None,
                 cohorts: dict[str, dict] | None = None):
        self.kb_path = location(kb_path)  # a SQLite path or a postgresql:// URL
        self.ports = dict(ports or {})
        # with many gateways on one Knowledge Base: this one's id (its bus), which its ports' devices hang on
        self.gateway_id = gateway_id
        self.cohorts = dict(cohorts or {})
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
        # the device keys that authenticate uploads (default: DeviceKeys().existing; never a new key)
        self.keys = keys
        self.db_timeout_s = db_timeout_s  # a write waits this long for another process's lock, then retries later
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._q: queue.Queue[_Item | _WindowsItem] = queue.Queue()
        self._queued = 0  # uploads in _q (a batch counts its windows)
        self._writes: queue.Queue[Callable[[KnowledgeBase], None]] = queue.Queue()  # the ports' gaps and alarms
        self._threads: list[threading.Thread] = []
        self._links: dict[str, object] = {}
        self._problems: dict[str, str] = {}
        self._refusals_logged: set[tuple[str, str]] = set()
        self._retry: list[_Item] = []
        self._answers: list[Callable[[], None]] = []  # acks and refusals of the turn, sent once it is committed
        self._pool, self._pool_at, self._next_decide, self._next_deploy_check = None, 0.0, 0.0, 0.0
        self.counters = {"ingested": 0, "duplicates": 0, "rejected": 0, "decided": 0, "deploys": 0,
                         "dropped": 0}

    # -- main loop: commit, acknowledge, decide, deploy --------------------------------------------------

    def run(self) -> None:
        from tinyml_dagster.link_service.ingest import serve_socket
        from tinyml_dagster.link_service.ports import SerialLink

        for device_id, path in self.ports.items():
            link = SerialLink(self, device_id, path)
            self._links[device_id] = link
            self._spawn(link.run, "port-%s" % device_id)
        if self.ingest_socket:
            self._spawn(lambda: serve_socket(self), "ingest-socket")
        self.ready.set()
        log.info("link service up: kb=%s ports=%s socket=%s", self.kb_path, self.ports, self.ingest_socket)
        kb: KnowledgeBase | None = None
        backoff = DB_RETRY_MIN_S
        try:
            while not self.stop_event.is_set():
                try:
                    if kb is None:
                        kb = self._open_kb()
                    self._turn(kb)
                except DatabaseError as e:  # locked, full, corrupted, gone: nothing acked, keep the ports up, retry
                    self._log_once("database", "Knowledge Base %s: %s: %s (nothing acknowledged; retrying with"
                                   " backoff up to %g s)" % (self.kb_path, type(e).__name__, e, DB_RETRY_MAX_S))
                    if kb is not None and not _transient(e):
                        kb.close()
                        kb = None
                    self.stop_event.wait(backoff)
                    backoff = min(DB_RETRY_MAX_S, backoff * 2)
                else:
                    if backoff != DB_RETRY_MIN_S:
                        self._log_once("database", None)
                        backoff = DB_RETRY_MIN_S
        finally:
            self.stop_event.set()
            for t in self._threads:
                t.join(timeout=5)
            if kb is not None:
                kb.close()

    def _open_kb(self) -> KnowledgeBase:
        """Open the Knowledge Base; each port then learns from it how far its device's uploads are settled."""
        kb = KnowledgeBase(self.kb_path, timeout_s=self.db_timeout_s)
        try:
            if self.gateway_id and self.ports:
                kb.assign_devices(self.gateway_id, {d: self.cohorts.get(d) for d in self.ports})
            kb.requeue_running(list(self.ports))
            for link in self._links.values():
                link.resume_from(kb)
        except BaseException:
            kb.close()
            raise
        return kb

    def _turn(self, kb: KnowledgeBase) -> None:
        """One turn of the loop: commit a batch with the pool's decisions on it (then acknowledge it), record gaps,
        hand out deploys."""
        batch = self._retry or self._take_batch(timeout=0.05)
        self._retry = batch  # until committed: a database fault leaves it for the next turn
        now = time.monotonic()
        self._refresh_pool(now)
        if batch:
            self._answers = []
            with kb.transaction():  # one commit (and one turn of the writers' lock) for the batch and its decisions
                self._commit(kb, batch)
                self._decide(kb, now)
            answers, self._answers = self._answers, []
            for answer in answers:  # committed: acknowledge
                try:
                    answer()
                except OSError:
                    pass  # the sender went away; it retransmits and the KB recognises the repeat
        elif now >= self._next_decide:
            self._decide(kb, now)
        self._retry = []
        self._record_writes(kb)
        if now >= self._next_deploy_check:
            self._dispatch_deploys(kb)
            self._next_deploy_check = now + 0.2

    def _refresh_pool(self, now: float) -> None:
        if self.pool_factory is not None and (not self._pool_at or now - self._pool_at > self.pool_refresh_s):
            try:
                self._pool = self.pool_factory()
                self._pool.gateway = self.gateway_id  # many gateways: each decides its own devices' windows
            except Exception as e:  # no repository yet: ingest anyway, decide later
                if self._pool is not None or not self._pool_at:
                    log.warning("pool unavailable (retrying every %.0f s): %s", self.pool_refresh_s, e)
                self._pool = None
            self._pool_at = now

    def _decide(self, kb: KnowledgeBase, now: float) -> None:
        """The pool decides one batch of the windows stored and not decided yet."""
        if self._pool is None:
            return
        self._next_decide = now + 1.0
        try:  # one batch a turn: a backlog of decisions never holds the acks of new uploads back for long
            decided = self._pool.decide_pending(kb, batch=DECIDE_BATCH, max_batches=1).decided
            self.counters["decided"] += decided
            if decided >= DECIDE_BATCH:
                self._next_decide = now
        except DatabaseError:
            raise
        except Exception as e:  # the rows it could not use are quarantined; anything else: next round
            self._log_once("pool", "pool decisions failed (retrying every second): %s: %s"
                           % (type(e).__name__, e))
        else:
            self._log_once("pool", None)

    def stop(self) -> None:
        self.stop_event.set()

    def submit(self, upload: Upload, ack: Callable[[Upload, bool], None],
               refuse: Callable[[Upload, str], None] | None = None, reason: str | None = None,
               settles: bool = False) -> None:
        """Queue an upload; ack(upload, duplicate) is called once it is committed, refuse(upload, reason) when
        it will never be stored (reason: refused already)."""
        if self._queued >= MAX_QUEUED:  # the database is down for long: not acknowledged, the sender resends
            self.counters["dropped"] += 1
            return
        self._q.put(_Item(upload, ack, refuse, reason, settles))
        self._queued += 1

    def submit_windows(self, batch: WindowBatch, acked: Callable[[list[int]], None],
                       refuse: Callable[[Upload, str], None] | None = None, reasons: dict[int, str] | None = None
                       ) -> None:
        """Queue a batch of windows; refuse(upload, reason) is called for each row that will never be stored
        (reasons: rows refused already), then acked(those rows) once every other row is committed."""
        if self._queued >= MAX_QUEUED:  # as submit: not acknowledged, the sender resends
            self.counters["dropped"] += len(batch)
            return
        self._q.put(_WindowsItem(batch, acked, refuse, dict(reasons or {})))
        self._queued += len(batch)

    def device_key(self, device_id: str) -> bytes | None:
        """The key of a device (None: the gateway holds none, so nothing of it can be verified)."""
        if self.keys is None:
            from tinyml_dagster.deployment_agent import DeviceKeys

            self.keys = DeviceKeys().existing
        try:
            return self.keys(device_id)
        except ValueError as e:  # a bad key file or TINYML_DEVICE_KEYS: named, and nothing is verified
            self._log_once("keys-" + device_id, "%s: no usable key: %s" % (device_id, e))
            return None

    def submit_gap(self, device_id: str, first: int, last: int, reason: str, done: Callable[[int, int], None]
                   ) -> None:
        """A port's device says first..last will never come: done(first, last) once that is recorded."""
        def record(kb: KnowledgeBase) -> None:
            lost = kb.record_lost(device_id, first, last, reason)
            if lost:
                log.warning("%s: uploads %d..%d recorded lost (%d never stored): %s", device_id, first, last, lost,
                            reason)
            done(first, last)

        self._writes.put(record)

    def submit_alarm(self, device_id: str, alarm_no: int, start: float, end: float | None, peak: float,
                     feature_set: str, champion_id: str | None, champion_version: int,
                     done: Callable[[int, float | None, bool], None]) -> None:
        """A port's device raised or cleared an alarm: stored by the loop, then done(alarm_no, end, stored) (not
        called while the database fails: the device sends it again)."""
        def record(kb: KnowledgeBase) -> None:
            try:
                kb.record_alarm(device_id, start, end, peak, feature_set, champion_id, champion_version,
                                alarm_no=alarm_no)
            except KnowledgeBaseError as e:
                log.error("%s: alarm %d refused, nothing stored: %s", device_id, alarm_no, e)
                done(alarm_no, end, False)
                return
            done(alarm_no, end, True)

        self._writes.put(record)

    def submit_write(self, write: Callable[[KnowledgeBase], None]) -> None:
        """A port's Knowledge Base write (a health report, a settings outcome), carried out by the loop."""
        def guarded(kb: KnowledgeBase) -> None:
            try:
                write(kb)
            except KnowledgeBaseError as e:
                log.warning("Knowledge Base refused a write: %s", e)

        self._writes.put(guarded)

    def _record_writes(self, kb: KnowledgeBase) -> None:
        """Carry out the ports' queued writes; one the database refuses waits for the next turn."""
        while True:
            try:
                write = self._writes.get_nowait()
            except queue.Empty:
                return
            try:
                write(kb)
            except DatabaseError:
                self._writes.put(write)
                raise

    def _take_batch(self, timeout: float) -> list[_Item | _WindowsItem]:
        """Queued items up to batch_max uploads (at least one item)."""
        try:
            batch = [self._q.get(timeout=timeout)]
        except queue.Empty:
            return []
        size = _size(batch[0])
        while size < self.batch_max:
            try:
                batch.append(self._q.get_nowait())
            except queue.Empty:
                break
            size += _size(batch[-1])
        self._queued -= size
        return batch

    def _commit(self, kb: KnowledgeBase, batch: list[_Item | _WindowsItem]) -> None:
        sets: dict[str, list[_WindowsItem]] = {}  # one transaction per feature set
        for item in batch:
            if isinstance(item, _WindowsItem):
                sets.setdefault(item.batch.feature_set, []).append(item)
        for items in sets.values():
            self._commit_windows(kb, items)
        good, refused = [], []
        for item in batch:
            if isinstance(item, _WindowsItem):
                continue
            reason = item.reason or door_problem(item.upload)
            (good.append(item) if reason is None else refused.append((item, reason)))
        try:
            result = kb.ingest([i.upload for i in good], gateway=self.gateway_id)  # committed when this returns
        except (KnowledgeBaseError, *UnstorableError, OverflowError, TypeError):
            good, result = self._commit_one_by_one(kb, good, refused)
        reused = [(i, REUSED) for i, conflict in zip(good, result.conflicts) if conflict]
        if refused or reused:
            self._refuse(kb, refused, reused)
        for item, dup, conflict in zip(good, result.duplicates, result.conflicts):
            if conflict:
                continue
            self.counters["duplicates" if dup else "ingested"] += 1
            self._answers.append(partial(item.ack, item.upload, dup))

    def _commit_windows(self, kb: KnowledgeBase, items: list[_WindowsItem]) -> None:
        """Commit the storable windows of the batches in one transaction, then refuse the others and acknowledge
        each batch."""
        refused: list[tuple[_Item, str]] = []
        refused_rows: dict[int, list[int]] = {id(item): [] for item in items}
        parts, origin = [], []  # origin: (item, row) of each row of the joined batch
        for item in items:
            reasons = {**item.batch.problems(), **item.reasons}
            refused += [(_Item(item.batch.upload(i), _no_ack, item.refuse), r) for i, r in sorted(reasons.items())]
            refused_rows[id(item)] += sorted(reasons)
            keep = [i for i in range(len(item)) if i not in reasons]
            parts.append(item.batch.subset(keep) if reasons else item.batch)
            origin += [(item, i) for i in keep]
        joined = WindowBatch.concat(parts)
        try:
            # committed when this returns
            result = kb.ingest_windows(joined, gateway=self.gateway_id) if len(joined) else IngestResult()
            kept = range(len(joined))
        except (KnowledgeBaseError, *UnstorableError, OverflowError, TypeError):
            singles = [_Item(joined.upload(j), _no_ack, item.refuse) for j, (item, _) in enumerate(origin)]
            position = {id(single): j for j, single in enumerate(singles)}
            stored, result = self._commit_one_by_one(kb, singles, refused)
            kept = [position[id(single)] for single in stored]
            for j in set(range(len(joined))) - set(kept):
                refused_rows[id(origin[j][0])].append(origin[j][1])
        reused = []
        for j, conflict in zip(kept, result.conflicts):
            if conflict:
                item, row = origin[j]
                reused.append((_Item(joined.upload(j), _no_ack, item.refuse), REUSED))
                refused_rows[id(item)].append(row)
        if refused or reused:
            self._refuse(kb, refused, reused)
        self.counters["ingested"] += result.stored
        self.counters["duplicates"] += sum(result.duplicates) - sum(result.conflicts)
        self._answers += [partial(item.acked, sorted(refused_rows[id(item)])) for item in items]

    def _commit_one_by_one(
        self, kb: KnowledgeBase, items: list[_Item], refused: list
    ) -> tuple[list[_Item], IngestResult]:
        """Store what can be stored of a batch the database refused as a whole; the rest joins `refused`."""
        kept, result = [], IngestResult()
        for item in items:
            try:
                one = kb.ingest([item.upload], gateway=self.gateway_id)
            except (KnowledgeBaseError, *UnstorableError, OverflowError, TypeError) as e:
                refused.append((item, "not storable: %s" % type(e).__name__))
                continue
            kept.append(item)
            result.upload_ids += one.upload_ids
            result.duplicates += one.duplicates
            result.conflicts += one.conflicts
        return kept, result

    def _refuse(self, kb: KnowledgeBase, refused: list[tuple[_Item, str]], reused: list[tuple[_Item, str]] = ()
                ) -> None:
        """Count the refusals per device and reason in the KB, log each (device, reason) once, tell the senders;
        a refused number a port's device drops is recorded as lost (a reused one stays stored as first sent)."""
        refused = list(refused) + list(reused)
        rows = [(i.upload.device_id if valid_id(i.upload.device_id) else INVALID_ID, r, i.upload.seq)
                for i, r in refused]
        kb.record_refusals(rows)
        kb.record_gaps([(d, s, s, 1, "refused: " + r) for (item, _), (d, r, s) in zip(refused, rows)
                        if item.settles and r != REUSED and item.upload.kind != "champion"])
        for (item, reason), (device_id, _, seq) in zip(refused, rows):
            self.counters["rejected"] += 1
            if (device_id, reason) not in self._refusals_logged:
                self._refusals_logged.add((device_id, reason))
                log.warning("%s: upload %.40r refused: %s (counted in the KB, logged once)", device_id, seq, reason)
            if item.refuse is not None:
                self._answers.append(partial(item.refuse, item.upload, reason))

    def _dispatch_deploys(self, kb: KnowledgeBase) -> None:
        for device_id, link in self._links.items():
            if link.deploy_pending is None:
                req = kb.claim_deploy([device_id])
                if req is not None:
                    link.deploy_pending = req
            if link.deploy_pending is None and link.settings_pending is None:
                link.settings_pending = kb.claim_settings([device_id])

    def _log_once(self, topic: str, message: str | None) -> None:
        """Log a topic's problem when it starts or changes, and once when it clears (message None)."""
        last = self._problems.get(topic)
        if message == last or (message is None and last is None):
            return
        if message is None:
            log.info("%s: recovered", topic)
            del self._problems[topic]
        else:
            log.warning("%s", message)
            self._problems[topic] = message

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)
