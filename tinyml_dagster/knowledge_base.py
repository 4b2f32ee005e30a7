"""Knowledge Base manager: every device upload, the pool's decisions, the ranking, champions, deploys, retraining.

SQLite in WAL mode by default (path from settings.kb_path()), or PostgreSQL through psycopg 3 when given a
postgresql:// URL (settings.kb_url()): one schema, one set of migrations and one set of SQL statements for both,
the few differences translated by _PgConnection. An upload is committed before it is acknowledged, and a
retransmission (same device, same upload number) is stored once: the device's upload number (u32, monotonic,
survives reboots) is the dedup key.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import psycopg
from psycopg.types.numeric import NumericLoader

from tinyml_dagster import settings

KINDS = ("normal", "anomaly", "champion")

# Each entry migrates the schema from version i to i+1; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        last_seq INTEGER NOT NULL
    );
    CREATE TABLE uploads (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('normal', 'anomaly', 'champion')),
        received_at REAL NOT NULL,
        sent_at REAL,
        window_start REAL,
        f_mean REAL,
        f_skewness REAL,
        f_kurtosis REAL,
        champion_id TEXT,
        champion_score REAL,
        champion_decision INTEGER,
        window BLOB,
        UNIQUE (device_id, seq)
    );
    CREATE INDEX uploads_kind ON uploads (kind, id);
    CREATE TABLE model_uploads (
        upload_id INTEGER PRIMARY KEY REFERENCES uploads (id),
        device_id TEXT NOT NULL,
        blob BLOB NOT NULL,
        window_from REAL,
        window_to REAL,
        model_id TEXT
    );
    CREATE TABLE pools (
        pool_id INTEGER PRIMARY KEY AUTOINCREMENT,
        model_ids TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE pool_decisions (
        upload_id INTEGER PRIMARY KEY REFERENCES uploads (id),
        pool_id INTEGER NOT NULL REFERENCES pools (pool_id),
        decided_at REAL NOT NULL,
        votes_anomaly INTEGER NOT NULL,
        votes_total INTEGER NOT NULL,
        pool_anomaly INTEGER NOT NULL,
        false_positive INTEGER NOT NULL,
        scores BLOB NOT NULL
    );
    CREATE INDEX pool_decisions_fp ON pool_decisions (false_positive, upload_id);
    CREATE TABLE ranking (
        model_id TEXT PRIMARY KEY,
        points INTEGER NOT NULL,
        agree INTEGER NOT NULL,
        disagree INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE ranking_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        through_upload_id INTEGER NOT NULL,
        points TEXT NOT NULL
    );
    CREATE TABLE champions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        model_id TEXT NOT NULL,
        source TEXT NOT NULL,
        since REAL NOT NULL,
        since_upload_id INTEGER NOT NULL,
        deploy_id INTEGER
    );
    CREATE INDEX champions_device ON champions (device_id, id);
    CREATE TABLE deploy_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        model_id TEXT NOT NULL,
        episode_id INTEGER,
        run_id TEXT,
        package BLOB,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
        requested_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        figures TEXT,
        UNIQUE (device_id, episode_id)
    );
    CREATE INDEX deploy_requests_status ON deploy_requests (status, id);
    CREATE TABLE retraining_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT,
        started_at REAL NOT NULL,
        finished_at REAL,
        since_upload_id INTEGER NOT NULL,
        through_upload_id INTEGER NOT NULL,
        n_windows INTEGER NOT NULL,
        model_ids TEXT,
        status TEXT NOT NULL
    );
    """,
    # 2: a failed deploy of an episode can be retried; count the attempts
    """
    ALTER TABLE deploy_requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
    """,
    # 3: uploads refused at the door (counted per device and reason), stored rows a later step could not use
    # (quarantined with the reason), and upload numbers the devices reported lost (ranges, with their count)
    """
    CREATE TABLE upload_refusals (
        device_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        last_seq INTEGER,
        last_at REAL NOT NULL,
        PRIMARY KEY (device_id, reason)
    );
    CREATE TABLE quarantine (
        upload_id INTEGER PRIMARY KEY REFERENCES uploads (id),
        step TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE TABLE upload_gaps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        lost INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX upload_gaps_device ON upload_gaps (device_id, first_seq);
    """,
    # 4: feature sets (every stored window keeps its three f_ columns and is the paper's set) and their vectors of
    # any length (float64 LE; NULL: the f_ columns), and the devices' alarm events
    """
    ALTER TABLE uploads ADD COLUMN feature_set TEXT NOT NULL DEFAULT 'paper';
    ALTER TABLE uploads ADD COLUMN features BLOB;
    CREATE TABLE alarms (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        start REAL NOT NULL,
        end REAL,
        peak_score REAL NOT NULL,
        feature_set TEXT NOT NULL,
        champion_id TEXT,
        champion_version INTEGER,
        received_at REAL NOT NULL,
        UNIQUE (device_id, start)
    );
    """,
    # 5: what each device's MicroPython imports, from its HELLO (sys.implementation._mpy; 0: no .mpy loader)
    """
    CREATE TABLE device_runtimes (
        device_id TEXT PRIMARY KEY,
        sys_mpy INTEGER NOT NULL,
        firmware_version INTEGER NOT NULL,
        reported_at REAL NOT NULL
    );
    """,
    # 6: signed settings updates (queued by Dagster, carried out by the link service) and the devices' health
    # reports (one row per reporting period; times in ms, energy from the power model in tinyml_dagster/health.py)
    """
    CREATE TABLE settings_updates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        settings TEXT NOT NULL,
        revert INTEGER NOT NULL DEFAULT 0,
        run_id TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'applied', 'refused', 'failed')),
        requested_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        reason TEXT,
        in_force TEXT,
        figures TEXT,
        UNIQUE (device_id, version)
    );
    CREATE INDEX settings_updates_status ON settings_updates (status, id);
    CREATE TABLE device_health (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        windows INTEGER NOT NULL,
        feature_ms_mean REAL NOT NULL,
        feature_ms_max REAL NOT NULL,
        inference_ms_mean REAL NOT NULL,
        inference_ms_max REAL NOT NULL,
        active_ms_mean REAL NOT NULL,
        free_heap_bytes INTEGER NOT NULL,
        largest_free_heap_bytes INTEGER NOT NULL,
        uptime_s INTEGER NOT NULL,
        resets INTEGER NOT NULL,
        reset_cause INTEGER NOT NULL,
        retransmits INTEGER NOT NULL,
        link_errors INTEGER NOT NULL,
        settings_version INTEGER NOT NULL,
        energy_mj_per_window REAL NOT NULL
    );
    CREATE INDEX device_health_device ON device_health (device_id, id);
    """,
    # 7: many gateways on one Knowledge Base: the gateway (its bus) each device hangs on, and the device's cohort
    # (JSON: machine, channel, rate_hz, feature_set) that chooses its candidates
    """
    ALTER TABLE devices ADD COLUMN gateway TEXT;
    ALTER TABLE devices ADD COLUMN cohort TEXT;
    CREATE INDEX devices_gateway ON devices (gateway, device_id);
    """,
    # 8: a device's alarm events are keyed by its alarm number (per device, survives reboots; the raise and the clear
    # of one alarm share it), no longer by their start: a device's clock may start over after a power loss. The
    # table is rebuilt without UNIQUE (device_id, start), its rows copied in order (alarm_no NULL: stored before)
    """
    CREATE TABLE alarm_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        alarm_no INTEGER,
        start REAL NOT NULL,
        end REAL,
        peak_score REAL NOT NULL,
        feature_set TEXT NOT NULL,
        champion_id TEXT,
        champion_version INTEGER,
        received_at REAL NOT NULL,
        UNIQUE (device_id, alarm_no)
    );
    INSERT INTO alarm_events (device_id, start, end, peak_score, feature_set, champion_id, champion_version,
        received_at)
        SELECT device_id, start, end, peak_score, feature_set, champion_id, champion_version, received_at FROM alarms
        ORDER BY id;
    DROP TABLE alarms;
    ALTER TABLE alarm_events RENAME TO alarms;
    CREATE INDEX alarms_device_start ON alarms (device_id, start);
    """,
    # 9: the scorer tag (an upload's champion_id) of the device's last window before a champion took over: windows
    # the previous champion scored and the device sent after the switch (its outbox) are not the new one's
    """
    ALTER TABLE champions ADD COLUMN prior_scorer TEXT;
    """,
)

# a device's self-trained champion (version v) is stored under upload number CHAMPION_SEQ_BASE + v
CHAMPION_SEQ_BASE = 1 << 40
MAX_ID = 64  # characters of a device or champion id
MAX_SEQ = (1 << 63) - 1
MAX_WINDOW_BYTES = 64 * 1024
MAX_MODEL_BYTES = 256 * 1024


@dataclass(frozen=True)
class Champion:
    """One champion's time on a device (an episode): what it is, where it came from, since when."""

    episode_id: int
    device_id: str
    model_id: str
    source: str  # device (trained itself), reported, deploy, manual
    since: float
    since_upload_id: int
    deploy_id: int | None = None


@dataclass(frozen=True)
class Episode:
    """A device's current champion and the false positives the pool found against it so far."""

    device_id: str
    episode_id: int
    champion: str
    false_positives: int
    last_false_positive_at: float | None


@dataclass(frozen=True)
class ChampionScore:
    """What the pool decided on the windows one champion version reported (keyed by its champion id)."""

    champion_id: str
    false_positives: int
    confirmed_anomalies: int


@dataclass(frozen=True)
class DecisionCounts:
    """How many windows the pool decided in a span of uploads, and what it found."""

    decided: int
    anomalies: int
    false_positives: int


@dataclass(frozen=True)
class FleetDevice:
    """One device as the operator sees it: champion now and before, false positives against it, last deploy."""

    device_id: str
    champion: Champion | None
    previous: Champion | None
    false_positives: int  # against the current champion, since it was installed
    last_deploy: dict | None  # deploy_request() row of the device's latest deploy
    last_seen: float | None


class KnowledgeBaseError(ValueError):
    """Bad input to the Knowledge Base (names the field and the upload)."""


@dataclass(frozen=True)
class Upload:
    """One message from a device: a feature window (normal or anomaly) or its self-trained champion."""

    device_id: str
    seq: int  # the device's upload number (monotonic per device): the dedup key
    kind: str
    features: tuple[float, ...] | None = None  # as many as the feature set has

    champion_id: str | None = None
    champion_score: float | None = None
    champion_decision: int | None = None
    window_start: float | None = None
    window: bytes | None = None
    sent_at: float | None = None
    model_blob: bytes | None = None
    window_from: float | None = None
    window_to: float | None = None
    feature_set: str = "paper"

    def validate(self) -> None:
        """Raise KnowledgeBaseError naming the bad field (its .reason: the field and rule, without the value)."""
        reason = self.problem()
        if reason is not None:
            err = KnowledgeBaseError("upload device=%.80r seq=%.40r: %s" % (self.device_id, self.seq, reason))
            err.reason = reason
            raise err

    def problem(self) -> str | None:
        """What is wrong with this upload (types, lengths, finiteness, sizes), or None when it can be stored."""
        if not valid_id(self.device_id):
            return "field device_id must be 1-%d printable characters without spaces" % MAX_ID
        if not _is_int(self.seq) or not 0 <= self.seq <= MAX_SEQ:
            return "field seq must be an int in 0..2**63-1"
        if self.kind not in KINDS:
            return "field kind must be one of %s" % (KINDS,)
        for name in ("window_start", "sent_at", "window_from", "window_to"):
            if getattr(self, name) is not None and not _is_finite(getattr(self, name)):
                return "field %s must be a finite number" % name
        if self.champion_id is not None and not valid_id(self.champion_id):
            return "field champion_id must be 1-%d printable characters without spaces" % MAX_ID
        if self.window is not None and (not isinstance(self.window, bytes) or len(self.window) > MAX_WINDOW_BYTES):
            return "field window must be at most %d bytes" % MAX_WINDOW_BYTES
        if self.kind == "champion":
            if not isinstance(self.model_blob, bytes) or not self.model_blob:
                return "field model_blob is required for a champion upload"
            if len(self.model_blob) > MAX_MODEL_BYTES:
                return "field model_blob must be at most %d bytes" % MAX_MODEL_BYTES
            return None
        from firmware import feature_sets

        try:
            names = feature_sets.module(self.feature_set).FEATURE_NAMES
        except (ValueError, TypeError) as e:
            return "field feature_set: %s" % e
        if not isinstance(self.features, (tuple, list)) or len(self.features) != len(names):
            return "field features must hold %d values (%s) of feature set %s" % (
                len(names), ", ".join(names), self.feature_set)
        if not all(_is_finite(x) for x in self.features):
            return "field features must be finite numbers"
        if self.champion_score is not None and not _is_finite(self.champion_score):
            return "field champion_score must be a finite number"
        if not _is_int(self.champion_decision) or self.champion_decision not in (0, 1):
            return "field champion_decision must be 0 or 1"
        return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    """A number (not a bool) that is finite as a float64 (an int too large for one is not)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _alarm_problem(device_id, alarm_no, start, end, peak_score, feature_set, champion_id,
                   champion_version) -> str | None:
    """What is wrong with an alarm event (the field and the rule), or None when it can be stored."""
    from firmware import feature_sets

    if not valid_id(device_id):
        return "field device_id must be 1-%d printable characters without spaces" % MAX_ID
    if alarm_no is not None and (not _is_int(alarm_no) or not 0 <= alarm_no <= MAX_SEQ):
        return "field alarm_no must be an int in 0..2**63-1"
    for name, value in (("start", start), ("end", end), ("peak_score", peak_score)):
        if (value is not None or name != "end") and not _is_finite(value):
            return "field %s must be a finite number" % name
    if end is not None and end < start:
        return "end %s before start %s" % (end, start)
    if feature_set not in feature_sets.CODES:
        return "field feature_set: unknown feature set %r" % (feature_set,)
    if champion_id is not None and not valid_id(champion_id):
        return "field champion_id must be 1-%d printable characters without spaces" % MAX_ID
    if champion_version is not None and not _is_int(champion_version):
        return "field champion_version must be an int"
    return None


def valid_id(x) -> bool:
    """A device or champion id: 1-MAX_ID printable ASCII characters, no spaces."""
    return isinstance(x, str) and 0 < len(x) <= MAX_ID and x.isascii() and x.isprintable() and " " not in x


@dataclass(frozen=True)
class WindowBatch:
    """Many feature windows as columns (one list per Upload field, row i is one upload): what a gateway ingests
    in bulk without building an Upload per window. Every row is a window of one feature set."""

    device_ids: list
    seqs: list
    kinds: list
    features: list  # per row: its feature values
    champion_ids: list
    champion_scores: list
    champion_decisions: list
    window_starts: list
    sent_ats: list
    feature_set: str = "paper"

    def __post_init__(self) -> None:
        n = len(self.device_ids)
        for name in ("seqs", "kinds", "features", "champion_ids", "champion_scores", "champion_decisions",
                     "window_starts", "sent_ats"):
            if len(getattr(self, name)) != n:
                raise KnowledgeBaseError("window batch: column %s has %d values, device_ids %d"
                                         % (name, len(getattr(self, name)), n))

    def __len__(self) -> int:
        return len(self.device_ids)

    def upload(self, i: int) -> Upload:
        """Row i as an Upload."""
        f = self.features[i]
        return Upload(self.device_ids[i], self.seqs[i], self.kinds[i], tuple(f) if isinstance(f, list) else f,
                      self.champion_ids[i], self.champion_scores[i], self.champion_decisions[i],
                      self.window_starts[i], sent_at=self.sent_ats[i], feature_set=self.feature_set)

    def subset(self, rows: Sequence[int]) -> "WindowBatch":
        """The batch of the given rows, in that order."""
        return WindowBatch(*([col[i] for i in rows] for col in self._columns()), feature_set=self.feature_set)

    @classmethod
    def concat(cls, batches: Sequence["WindowBatch"]) -> "WindowBatch":
        """One batch of the rows of batches of one feature set, in order."""
        if len({b.feature_set for b in batches}) > 1:
            raise KnowledgeBaseError("window batches of different feature sets cannot be joined")
        if len(batches) == 1:
            return batches[0]
        return cls(*([x for b in batches for x in b._columns()[k]] for k in range(9)),
                   feature_set=batches[0].feature_set if batches else "paper")

    def _columns(self) -> tuple[list, ...]:
        return (self.device_ids, self.seqs, self.kinds, self.features, self.champion_ids, self.champion_scores,
                self.champion_decisions, self.window_starts, self.sent_ats)

    def problems(self) -> dict[int, str]:
        """{row: what is wrong with it (Upload.problem)} for the rows that cannot be stored; {} when all can."""
        if self._all_storable():
            return {}
        return {i: reason for i in range(len(self)) if (reason := self.upload(i).problem()) is not None}

    def feature_matrix(self) -> np.ndarray:
        """(n, n_features) float64 features of a batch whose rows can all be stored."""
        return np.asarray(self.features, dtype=np.float64).reshape(len(self), -1)

    def _all_storable(self) -> bool:
        """True only when Upload.problem() would pass every row (checked column by column); False when some row
        may fail (problems() then asks each row)."""
        from firmware import feature_sets

        if not ({type(x) for x in self.device_ids} <= {str} and {type(x) for x in self.kinds} <= {str}
                and {type(x) for x in self.champion_ids} <= {str, type(None)}):
            return False
        if not set(self.kinds) <= {"normal", "anomaly"}:
            return False
        try:
            n_features = len(feature_sets.module(self.feature_set).FEATURE_NAMES)
        except (ValueError, TypeError):
            return False
        if not all(map(valid_id, set(self.device_ids))) or not all(
                c is None or valid_id(c) for c in set(self.champion_ids)):
            return False
        if {type(x) for x in self.seqs} != {int} or {type(x) for x in self.champion_decisions} != {int}:
            return len(self) == 0
        if not (0 <= min(self.seqs) and max(self.seqs) <= MAX_SEQ and set(self.champion_decisions) <= {0, 1}):
            return False
        if not {type(f) for f in self.features} <= {list, tuple} or not {
                type(x) for f in self.features for x in f} <= {int, float}:
            return False
        try:
            X = np.asarray(self.features, dtype=np.float64)
            optional = [x for col in (self.champion_scores, self.window_starts, self.sent_ats) for x in col
                        if x is not None]
            if not {type(x) for x in optional} <= {int, float}:
                return False
            return X.shape == (len(self), n_features) and bool(np.isfinite(X).all()) and bool(
                np.isfinite(np.asarray(optional, dtype=np.float64)).all())
        except (ValueError, OverflowError):  # ragged rows, an int too large for a float64
            return False


@dataclass
class IngestResult:
    """What one ingest committed: per upload its KB id and whether it was a retransmission."""

    upload_ids: list[int] = field(default_factory=list)
    duplicates: list[bool] = field(default_factory=list)
    # a repeat whose content differs from what is stored under its number (the stored one stays)
    conflicts: list[bool] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(1 for d in self.duplicates if not d)


# what a database fault looks like on either backend (the link service retries these, acknowledging nothing)
DatabaseError = (sqlite3.Error, psycopg.Error)
# a batch the database refused because of one of its uploads (the link service then stores them one by one)
UnstorableError = (sqlite3.InterfaceError, sqlite3.IntegrityError, psycopg.IntegrityError, psycopg.DataError)


def is_url(location) -> bool:
    """A PostgreSQL URL (postgresql://... or postgres://...), not a SQLite path."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def location(value: str | Path | None = None) -> str | Path:
    """Where a Knowledge Base lives: a postgresql:// URL as given, a sqlite:/// URL or a path as a Path;
    None: settings.kb_url() or settings.kb_path()."""
    if value is None or value == "":
        value = settings.kb_url() or settings.kb_path()
    if is_url(value):
        return value
    if isinstance(value, str) and value.startswith("sqlite:///"):  # sqlite:///relative, sqlite:////absolute
        return Path(value[len("sqlite:///"):])
    if isinstance(value, str) and "://" in value:
        raise KnowledgeBaseError("Knowledge Base %r: use sqlite:///<path>, postgresql://... or a path" % value)
    return Path(value)


class KnowledgeBase:
    """The Knowledge Base manager over one SQLite database (WAL) or one PostgreSQL database."""

    def __init__(self, path: str | Path | None = None, *, synchronous: str = "FULL", timeout_s: float = 60.0):
        """path: a SQLite path, sqlite:///<path> or postgresql://...; timeout_s: how long a write waits for another
        process's lock before sqlite3.OperationalError (psycopg.errors.LockNotAvailable)."""
        where = location(path)
        self._lock = threading.RLock()
        self._tx_depth = 0  # transactions open on this connection (nested ones are savepoints)
        self._staged = False  # the open transaction staged a batch already (see _ingest_staged)
        self._pool_ids: dict[str, int] = {}  # pools' ids by their model ids (a pool row is never deleted)
        self._last_seq: dict[str, int] = {}
        self.postgres = is_url(where)
        if self.postgres:
            self.path = _redacted(where)
            self._conn = _PgConnection(where, timeout_s)
        else:
            self.path = where
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                         check_same_thread=False)
        try:
            if not self.postgres:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=%s" % synchronous)
                self._conn.execute("PRAGMA foreign_keys=ON")
                self._conn.execute("CREATE TEMP TABLE upload_batch (%s)" % ", ".join(
                    "%s %s" % name_type for name_type in _UPLOAD_BATCH_COLUMNS))
            self.migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing -----------------------------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "KnowledgeBase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self) -> "_Tx":
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); writers are serialised across processes. Inside another
        transaction of this manager: a savepoint, undone alone on error, committed with the outer one."""
        return _Tx(self)

    def schema_version(self) -> int:
        if self.postgres:
            return self._conn.schema_version()
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def _set_schema_version(self, version: int) -> None:
        if self.postgres:
            self._conn.execute("CREATE TABLE IF NOT EXISTS kb_schema (version BIGINT NOT NULL)")
            self._conn.execute("DELETE FROM kb_schema")
            self._conn.execute("INSERT INTO kb_schema VALUES (?)", (version,))
        else:
            self._conn.execute("PRAGMA user_version=%d" % version)

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns it."""
        with self._lock:
            with self.transaction():
                version = self.schema_version()
                if version > len(MIGRATIONS):
                    raise KnowledgeBaseError(
                        "%s: schema version %d is newer than this code knows (%d)"
                        % (self.path, version, len(MIGRATIONS))
                    )
                for i in range(version, len(MIGRATIONS)):
                    for stmt in MIGRATIONS[i].split(";"):
                        if stmt.strip():
                            self._conn.execute(_pg_ddl(stmt) if self.postgres else stmt)
                    self._set_schema_version(i + 1)
            return self.schema_version()

    def query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        """Read-only query returning rows (tuples)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Sequence = ()):
        row = self.query(sql, params)
        return row[0][0] if row else None

    # -- uploads ------------------------------------------------------------------------------------------

    def ingest(self, uploads: Iterable[Upload], now: float | None = None, gateway: str | None = None) -> IngestResult:
        """Store a batch of uploads in one transaction; retransmissions are recognised and stored once. gateway:
        the one they came through, recorded for devices that hang on none yet."""
        uploads = list(uploads)
        for u in uploads:
            u.validate()
        now = time.time() if now is None else now
        if self.postgres:
            return self._ingest_copy(uploads, now, gateway)
        result = IngestResult()
        with self._lock:
            try:
                with self.transaction():
                    c = self._conn
                    for u in uploads:
                        seq = self._touch_device(u.device_id, u.seq if u.kind != "champion" else -1, now, gateway)
                        seq = u.seq if u.kind == "champion" else seq
                        paper = u.feature_set == "paper"
                        f = u.features if u.features is not None and paper else (None, None, None)
                        vector = None if paper or u.features is None else pack_features(u.features)
                        cur = c.execute(
                            "INSERT OR IGNORE INTO uploads (device_id, seq, kind, received_at, sent_at, window_start,"
                            " f_mean, f_skewness, f_kurtosis, champion_id, champion_score, champion_decision, window,"
                            " feature_set, features)"
                            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (u.device_id, seq, u.kind, now, u.sent_at, u.window_start, f[0], f[1], f[2],
                             u.champion_id, u.champion_score, u.champion_decision, u.window, u.feature_set, vector),
                        )
                        if cur.rowcount:
                            uid = cur.lastrowid
                            result.upload_ids.append(uid)
                            result.duplicates.append(False)
                            result.conflicts.append(False)
                            if u.kind == "champion":
                                c.execute(
                                    "INSERT INTO model_uploads (upload_id, device_id, blob, window_from, window_to)"
                                    " VALUES (?,?,?,?,?)",
                                    (uid, u.device_id, u.model_blob, u.window_from, u.window_to),
                                )
                            elif self.current_champion(u.device_id) is None and u.champion_id:
                                self._add_champion(u.device_id, u.champion_id, "reported", now, uid - 1)
                        else:
                            row = c.execute(
                                "SELECT id, kind, f_mean, f_skewness, f_kurtosis, champion_id, champion_score,"
                                " champion_decision, window_start, (SELECT blob FROM model_uploads m"
                                " WHERE m.upload_id = uploads.id), feature_set, features FROM uploads"
                                " WHERE device_id=? AND seq=?",
                                (u.device_id, seq),
                            ).fetchone()
                            result.upload_ids.append(row[0])
                            result.duplicates.append(True)
                            result.conflicts.append(tuple(row[1:]) != (
                                u.kind, *f, u.champion_id, u.champion_score, u.champion_decision, u.window_start,
                                u.model_blob, u.feature_set, vector))
            except BaseException:
                self._last_seq.clear()  # the rollback undid our view of the devices' upload numbers
                raise
        return result

    def ingest_windows(self, batch: WindowBatch, now: float | None = None, gateway: str | None = None
                       ) -> IngestResult:
        """Store a WindowBatch in one transaction, as ingest() its rows (KnowledgeBaseError naming the first row
        that cannot be stored; nothing stored then)."""
        problems = batch.problems()
        if problems:
            row = min(problems)
            batch.upload(row).validate()
        now = time.time() if now is None else now
        n = len(batch)
        paper = batch.feature_set == "paper"
        if paper:
            f0, f1, f2 = batch.feature_matrix().T.tolist() if n else ([], [], [])
            vectors = [None] * n
        else:
            f0 = f1 = f2 = [None] * n
            vectors = [pack_features(f) for f in batch.features]
        rows = list(zip(range(n), batch.device_ids, batch.seqs, batch.kinds, [now] * n, batch.sent_ats,
                        batch.window_starts, f0, f1, f2, batch.champion_ids, batch.champion_scores,
                        batch.champion_decisions, [None] * n, [batch.feature_set] * n, vectors))
        return self._ingest_staged(rows, [], now, gateway)

    def _ingest_copy(self, uploads: list[Upload], now: float, gateway: str | None) -> IngestResult:
        """PostgreSQL's ingest of Upload objects: their rows through _ingest_staged."""
        rows = []
        for i, u in enumerate(uploads):
            paper = u.feature_set == "paper"
            f = u.features if u.features is not None and paper else (None, None, None)
            vector = None if paper or u.features is None else pack_features(u.features)
            rows.append((i, u.device_id, u.seq, u.kind, now, u.sent_at, u.window_start, *f, u.champion_id,
                         u.champion_score, u.champion_decision, u.window, u.feature_set, vector))
        models = [(u.device_id, u.seq, u.model_blob, u.window_from, u.window_to) for u in uploads
                  if u.kind == "champion"]
        return self._ingest_staged(rows, models, now, gateway)

    def _ingest_staged(self, rows: list[tuple], models: list[tuple], now: float, gateway: str | None
                       ) -> IngestResult:
        """Ingest in bulk (PostgreSQL's, and SQLite's of a WindowBatch): rows (ord, then _UPLOAD_BATCH_TYPES'
        columns) put into a staging table (COPY on PostgreSQL) and inserted by one statement, retransmissions (and
        repeats inside the batch) recognised by the (device, upload number) key; models: (device, seq, blob,
        window_from, window_to) of the champion uploads; the outcome of SQLite's ingest one upload at a time."""
        result = IngestResult()
        with self._lock, self.transaction():
            c = self._conn
            if self._staged or not self.postgres:  # an earlier batch (PostgreSQL empties it at each commit)
                c.execute("DELETE FROM upload_batch")
            self._staged = True
            self._last_seq.clear()  # the devices' upload numbers move on below, not through _touch_device
            if self.postgres:
                c.copy_rows("upload_batch", _UPLOAD_BATCH_COLUMNS, rows)
            else:
                c.executemany("INSERT INTO upload_batch VALUES (%s)" % ",".join("?" * len(_UPLOAD_BATCH_COLUMNS)),
                              rows)
            c.execute(  # WHERE true: SQLite's upsert after a SELECT needs a WHERE
                "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, gateway)"
                " SELECT device_id, ?, ?, MAX(CASE WHEN kind = 'champion' THEN -1 ELSE seq END), ? FROM upload_batch"
                " WHERE true GROUP BY device_id ORDER BY device_id"
                " ON CONFLICT (device_id) DO UPDATE SET last_seen = excluded.last_seen, last_seq = excluded.last_seq,"
                " gateway = COALESCE(devices.gateway, excluded.gateway) WHERE excluded.last_seq > devices.last_seq",
                (now, now, gateway))
            new = {(d, s): uid for uid, d, s in c.execute(
                "INSERT INTO uploads (" + _UPLOAD_COLUMNS + ") SELECT " + _UPLOAD_COLUMNS + " FROM upload_batch"
                " WHERE true ORDER BY ord ON CONFLICT (device_id, seq) DO NOTHING RETURNING id, device_id, seq"
            ).fetchall()}
            stored = {}
            if len(new) < len(rows):  # retransmissions: compare each with what is stored under its number
                stored = {(r[0], r[1]): r[2:] for r in c.execute(
                    "SELECT u.device_id, u.seq, u.id, u.kind, u.f_mean, u.f_skewness, u.f_kurtosis, u.champion_id,"
                    " u.champion_score, u.champion_decision, u.window_start, m.blob, u.feature_set, u.features"
                    " FROM uploads u JOIN (SELECT DISTINCT device_id, seq FROM upload_batch) b"
                    " ON b.device_id = u.device_id AND b.seq = u.seq"
                    " LEFT JOIN model_uploads m ON m.upload_id = u.id").fetchall()}
            with_champion = {r[0] for r in c.execute("SELECT DISTINCT device_id FROM champions WHERE device_id IN"
                                                     " (SELECT device_id FROM upload_batch)").fetchall()}
            blobs = {(d, s): blob for d, s, blob, *_ in models}
            c.executemany(
                "INSERT INTO model_uploads (upload_id, device_id, blob, window_from, window_to) VALUES (?,?,?,?,?)",
                [(new[(d, s)], d, blob, w_from, w_to) for d, s, blob, w_from, w_to in models if (d, s) in new])
            reported = []  # the first champion a device reports, for devices without one
            for _, device_id, seq, kind, _, _, window_start, *f, champion_id, score, decision, _, fs, vector in (
                    rows):
                uid = new.pop((device_id, seq), None)
                if uid is None:
                    first = stored[(device_id, seq)]
                    result.upload_ids.append(first[0])
                    result.duplicates.append(True)
                    result.conflicts.append(tuple(first[1:]) != (
                        kind, *f, champion_id, score, decision, window_start, blobs.get((device_id, seq)), fs, vector))
                    continue
                result.upload_ids.append(uid)
                result.duplicates.append(False)
                result.conflicts.append(False)
                if kind != "champion" and champion_id and device_id not in with_champion:
                    with_champion.add(device_id)
                    reported.append((device_id, champion_id, "reported", now, uid - 1))
            if reported and self.postgres:
                c.copy_rows("champions", _CHAMPION_COLUMNS, reported)
            elif reported:
                c.executemany("INSERT INTO champions (device_id, model_id, source, since, since_upload_id)"
                              " VALUES (?,?,?,?,?)", reported)
        return result

    def _touch_device(self, device_id: str, seq: int, now: float, gateway: str | None = None) -> int:
        last = self._last_seq.get(device_id)
        if last is None:
            row = self._conn.execute("SELECT last_seq FROM devices WHERE device_id=?", (device_id,)).fetchone()
            last = row[0] if row else None
        if last is None:
            self._conn.execute(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, gateway) VALUES (?,?,?,?,?)",
                (device_id, now, now, max(seq, -1), gateway),
            )
            self._last_seq[device_id] = seq
        elif seq > last:
            self._conn.execute(
                "UPDATE devices SET last_seen=?, last_seq=? WHERE device_id=?", (now, seq, device_id)
            )
            self._last_seq[device_id] = seq
        else:
            self._last_seq[device_id] = last
        return seq

    def devices(self) -> list[str]:
        return [r[0] for r in self.query("SELECT device_id FROM devices ORDER BY device_id")]

    # -- gateways: which one each device hangs on, and the device's cohort --------------------------------

    def assign_devices(self, gateway: str, devices: dict[str, dict | None], move: bool = False) -> None:
        """Record that devices hang on gateway (their cohorts too, where given); a device belongs to exactly one
        gateway: one another gateway holds is refused by name unless move is set (it was moved to this bus)."""
        if not valid_id(gateway):
            raise KnowledgeBaseError("gateway id %.80r: must be 1-%d printable characters without spaces"
                                     % (gateway, MAX_ID))
        now = time.time()
        with self._lock, self.transaction():
            for device_id, cohort in devices.items():
                if not valid_id(device_id):
                    raise KnowledgeBaseError("device id %.80r: must be 1-%d printable characters without spaces"
                                             % (device_id, MAX_ID))
                row = self._conn.execute("SELECT gateway FROM devices WHERE device_id=?", (device_id,)).fetchone()
                if row and row[0] not in (None, gateway) and not move:
                    raise KnowledgeBaseError("device %s belongs to gateway %s, not %s (a device hangs on one bus;"
                                             " move it explicitly)" % (device_id, row[0], gateway))
                text = json.dumps(cohort, sort_keys=True) if cohort else None
                if row is None:
                    self._conn.execute("INSERT INTO devices (device_id, first_seen, last_seen, last_seq, gateway,"
                                       " cohort) VALUES (?,?,?,-1,?,?)", (device_id, now, now, gateway, text))
                else:
                    self._conn.execute("UPDATE devices SET gateway=?, cohort=COALESCE(?, cohort) WHERE device_id=?",
                                       (gateway, text, device_id))

    def device_gateway(self, device_id: str) -> str | None:
        """The gateway a device hangs on (None: not assigned, a single-gateway Knowledge Base)."""
        return self.scalar("SELECT gateway FROM devices WHERE device_id=?", (device_id,))

    def device_cohort(self, device_id: str) -> dict | None:
        """A device's cohort (machine, channel, rate_hz, feature_set as recorded), or None."""
        text = self.scalar("SELECT cohort FROM devices WHERE device_id=?", (device_id,))
        return json.loads(text) if text else None

    def gateway_devices(self, gateway: str) -> list[str]:
        return [r[0] for r in self.query("SELECT device_id FROM devices WHERE gateway=? ORDER BY device_id",
                                         (gateway,))]

    def max_upload_id(self) -> int:
        return self.scalar("SELECT COALESCE(MAX(id), 0) FROM uploads")

    def count_uploads(self, kind: str | None = None, device_id: str | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM uploads WHERE 1=1", []
        if kind:
            sql += " AND kind=?"
            params.append(kind)
        if device_id:
            sql += " AND device_id=?"
            params.append(device_id)
        return self.scalar(sql, params)

    def undecided(self, limit: int = 10_000, after_id: int = 0, feature_set: str = "paper",
                  gateway: str | None = None, cohort: dict | None = None) -> list[tuple]:
        """(id, device_id, f_mean, f_skewness, f_kurtosis, champion_decision) of windows of one feature set the pool
        has not decided (of one gateway's devices, of one cohort's devices: {} those without a cohort, if given);
        for a set other than the paper's the three f_ values are replaced by its whole vector.

        Upload ids grow in commit order, so a caller that decided everything through after_id passes it on.
        """
        where, params = "", [after_id, feature_set]
        if gateway:
            where += " AND u.device_id IN (SELECT device_id FROM devices WHERE gateway = ?)"
            params.append(gateway)
        if cohort is not None:
            where += " AND u.device_id IN (SELECT device_id FROM devices WHERE cohort %s)" % ("= ?" if cohort
                                                                                            else "IS NULL")
            params += [json.dumps(cohort, sort_keys=True)] if cohort else []
        sql = ("SELECT u.id, u.device_id, u.f_mean, u.f_skewness, u.f_kurtosis, u.champion_decision, u.features"
               " FROM uploads u WHERE u.id > ? AND u.kind != 'champion' AND u.feature_set = ?" + where +
               " AND NOT EXISTS (SELECT 1 FROM pool_decisions d WHERE d.upload_id = u.id)"
               " AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.upload_id = u.id)"
               " ORDER BY u.id LIMIT ?")
        with self._lock:
            if self.postgres:  # planned for this after_id: a plan for any after_id anti-joins every decision
                rows = self._conn.execute(sql, (*params, limit), prepare=False).fetchall()
            else:
                rows = self._conn.execute(sql, (*params, limit)).fetchall()
        if feature_set == "paper":
            return [tuple(r[:6]) for r in rows]
        return [(r[0], r[1], *unpack_features(r[6]), r[5]) for r in rows]

    def feature_vectors(self, upload_ids: Sequence[int]) -> list[tuple[str, tuple[float, ...]]]:
        """(feature set, feature vector) of stored windows, in the order of upload_ids."""
        out = []
        for uid in upload_ids:
            row = self.query("SELECT feature_set, f_mean, f_skewness, f_kurtosis, features FROM uploads WHERE id=?",
                             (uid,))
            if not row:
                raise KnowledgeBaseError("no upload with id %d" % uid)
            fs, a, b, c, blob = row[0]
            out.append((fs, unpack_features(blob) if blob is not None else (a, b, c)))
        return out

    # -- alarms -------------------------------------------------------------------------------------------

    def record_alarm(self, device_id: str, start: float, end: float | None, peak_score: float, feature_set: str,
                     champion_id: str | None = None, champion_version: int | None = None,
                     now: float | None = None, alarm_no: int | None = None) -> int:
        """Store a device's alarm event once, keyed by the device and its alarm number (without one: its start);
        a clear (end set) or a higher peak updates the row and its received_at, a repeat changes nothing."""
        problem = _alarm_problem(device_id, alarm_no, start, end, peak_score, feature_set, champion_id,
                                 champion_version)
        if problem is not None:
            raise KnowledgeBaseError("alarm of %.80r number %.40r: %s" % (device_id, alarm_no, problem))
        now = time.time() if now is None else now
        end = None if end is None else float(end)
        key = ("alarm_no=?", alarm_no) if alarm_no is not None else ("start=? AND alarm_no IS NULL", float(start))
        with self._lock, self.transaction():
            row = self._conn.execute("SELECT id, end, peak_score FROM alarms WHERE device_id=? AND " + key[0],
                                     (device_id, key[1])).fetchone()
            if row is None:
                return self._conn.execute(
                    "INSERT INTO alarms (device_id, alarm_no, start, end, peak_score, feature_set, champion_id,"
                    " champion_version, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (device_id, alarm_no, float(start), end, float(peak_score), feature_set, champion_id,
                     champion_version, now)).lastrowid
            new_end, new_peak = end if end is not None else row[1], max(float(peak_score), row[2])
            if (new_end, new_peak) != (row[1], row[2]):
                self._conn.execute("UPDATE alarms SET end=?, peak_score=?, received_at=? WHERE id=?",
                                   (new_end, new_peak, now, row[0]))
            return row[0]

    def record_device_runtime(self, device_id: str, sys_mpy: int, firmware_version: int,
                              now: float | None = None) -> None:
        """Store what a device's HELLO says its runtime imports (the latest HELLO wins)."""
        if not device_id:
            raise KnowledgeBaseError("device runtime: field device_id must be a non-empty string")
        if not 0 <= sys_mpy < 1 << 16:
            raise KnowledgeBaseError("device runtime of %s: sys_mpy %r outside 0..65535" % (device_id, sys_mpy))
        with self._lock, self.transaction():
            self._conn.execute(
                "INSERT INTO device_runtimes (device_id, sys_mpy, firmware_version, reported_at) VALUES (?,?,?,?)"
                " ON CONFLICT (device_id) DO UPDATE SET sys_mpy = excluded.sys_mpy,"
                " firmware_version = excluded.firmware_version, reported_at = excluded.reported_at",
                (device_id, int(sys_mpy), int(firmware_version), time.time() if now is None else now))

    def device_sys_mpy(self, device_id: str) -> int | None:
        """The sys.implementation._mpy the device last reported (0: no .mpy loader; None: never reported)."""
        return self.scalar("SELECT sys_mpy FROM device_runtimes WHERE device_id=?", (device_id,))

    def alarms(self, device_id: str | None = None, since_id: int = 0) -> list[dict]:
        """Alarm events (oldest first), as dicts."""
        sql = ("SELECT id, device_id, start, end, peak_score, feature_set, champion_id, champion_version, received_at,"
               " alarm_no FROM alarms WHERE id > ?")
        params: list = [since_id]
        if device_id is not None:
            sql += " AND device_id=?"
            params.append(device_id)
        keys = ("id", "device_id", "start", "end", "peak_score", "feature_set", "champion_id", "champion_version",
                "received_at", "alarm_no")
        return [dict(zip(keys, r)) for r in self.query(sql + " ORDER BY id", params)]

    def normal_windows(self, since_upload_id: int = 0, through_upload_id: int | None = None,
                       feature_set: str = "paper"):
        """The normal windows of one feature set stored after since_upload_id, as a DataFrame (for retraining)."""
        import pandas as pd

        from firmware import feature_sets

        names = list(feature_sets.module(feature_set).FEATURE_NAMES)
        through = self.max_upload_id() if through_upload_id is None else through_upload_id
        rows = self.query(
            "SELECT id, device_id, window_start, f_mean, f_skewness, f_kurtosis, features FROM uploads"
            " WHERE kind='normal' AND id > ? AND id <= ? AND feature_set = ? ORDER BY id",
            (since_upload_id, through, feature_set),
        )
        if feature_set != "paper":
            rows = [(*r[:3], *unpack_features(r[6])) for r in rows]
        else:
            rows = [tuple(r[:6]) for r in rows]
        return pd.DataFrame(rows, columns=["upload_id", "device_id", "window_start", *names])

    def model_uploads(self, unregistered_only: bool = True) -> list[tuple]:
        """(upload_id, device_id, blob, window_from, window_to, model_id) of champions devices uploaded."""
        sql = "SELECT upload_id, device_id, blob, window_from, window_to, model_id FROM model_uploads"
        if unregistered_only:
            sql += " WHERE model_id IS NULL AND upload_id NOT IN (SELECT upload_id FROM quarantine)"
        return self.query(sql + " ORDER BY upload_id")

    def register_model_upload(self, upload_id: int, model_id: str) -> None:
        """Record that a device's champion entered the repository as model_id; it is now that device's champion."""
        with self._lock, self.transaction():
            row = self._conn.execute(
                "SELECT device_id, model_id FROM model_uploads WHERE upload_id=?", (upload_id,)
            ).fetchone()
            if row is None:
                raise KnowledgeBaseError("model upload %d: no such upload" % upload_id)
            if row[1] is not None:
                return
            self._conn.execute("UPDATE model_uploads SET model_id=? WHERE upload_id=?", (model_id, upload_id))
            # the champion the device's uploads named before its model arrived is this one (a device's first, the only
            # one ever "reported", even when a deploy replaced it meanwhile): same episode, now with its repository id
            reported = self._conn.execute("SELECT id FROM champions WHERE device_id=? AND source='reported'",
                                          (row[0],)).fetchone()
            if reported is not None:
                self._conn.execute("UPDATE champions SET model_id=?, source='device' WHERE id=?",
                                   (model_id, reported[0]))
            else:
                self._add_champion(row[0], model_id, "device", time.time(), upload_id)

    # -- refusals at the door and quarantined rows --------------------------------------------------------

    def record_refusals(self, refusals: Iterable[tuple[str, str, int | None]], now: float | None = None) -> None:
        """Count refused uploads: (device_id, reason, upload number) each adds one to its (device, reason)."""
        now = time.time() if now is None else now
        with self._lock, self.transaction():
            self._conn.executemany(
                "INSERT INTO upload_refusals (device_id, reason, count, last_seq, last_at) VALUES (?,?,1,?,?)"
                " ON CONFLICT (device_id, reason) DO UPDATE SET count = upload_refusals.count + 1,"
                " last_seq = excluded.last_seq,"
                " last_at = excluded.last_at",
                [(d, r, s if _is_int(s) and 0 <= s <= MAX_SEQ else None, now) for d, r, s in refusals],
            )

    def refusals(self, device_id: str | None = None) -> dict[tuple[str, str], int]:
        """{(device_id, reason): count} of the uploads refused at the door."""
        sql, params = "SELECT device_id, reason, count FROM upload_refusals", ()
        if device_id is not None:
            sql, params = sql + " WHERE device_id=?", (device_id,)
        return {(d, r): n for d, r, n in self.query(sql, params)}

    def record_gaps(self, gaps: Iterable[tuple[str, int, int, int, str]], now: float | None = None) -> None:
        """Record upload numbers that will never be stored: (device_id, first, last, lost count, reason)."""
        now = time.time() if now is None else now
        with self._lock, self.transaction():
            self._conn.executemany(
                "INSERT INTO upload_gaps (device_id, first_seq, last_seq, lost, reason, at) VALUES (?,?,?,?,?,?)",
                [(d, a, b, n, r, now) for d, a, b, n, r in gaps])

    def gaps(self, device_id: str | None = None) -> list[tuple[str, int, int, int, str]]:
        """(device_id, first, last, lost count, reason) of the recorded gaps, oldest first."""
        sql, params = "SELECT device_id, first_seq, last_seq, lost, reason FROM upload_gaps", ()
        if device_id is not None:
            sql, params = sql + " WHERE device_id=?", (device_id,)
        return [tuple(r) for r in self.query(sql + " ORDER BY id", params)]

    def record_lost(self, device_id: str, first: int, last: int, reason: str) -> int:
        """A device says upload numbers first..last will never come: record those neither stored nor recorded
        before as one gap (with their count); returns that count (0: nothing new)."""
        with self._lock, self.transaction():
            stored = self._conn.execute(
                "SELECT COUNT(*) FROM uploads WHERE device_id=? AND kind != 'champion' AND seq BETWEEN ? AND ?",
                (device_id, first, last)).fetchone()[0]
            gapped = self._conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN last_seq < ? THEN last_seq ELSE ? END"
                " - CASE WHEN first_seq > ? THEN first_seq ELSE ? END + 1), 0) FROM upload_gaps"
                " WHERE device_id=? AND first_seq <= ? AND last_seq >= ?",
                (last, last, first, first, device_id, last, first)).fetchone()[0]
            lost = (last - first + 1) - stored - gapped
            if lost > 0:
                self._conn.execute(
                    "INSERT INTO upload_gaps (device_id, first_seq, last_seq, lost, reason, at) VALUES (?,?,?,?,?,?)",
                    (device_id, first, last, lost, reason, time.time()))
            return max(lost, 0)

    def lost_uploads(self, device_id: str | None = None) -> int:
        """How many upload numbers were recorded as lost (never to be stored)."""
        return sum(g[3] for g in self.gaps(device_id))

    def settled_through(self, device_id: str, start: int | None = None) -> int | None:
        """The highest upload number n such that every number from start (default: the lowest known) through n is
        stored or recorded as a gap; start - 1 when start itself is not, None when nothing is known."""
        spans = [(r[0], r[0]) for r in self.query(
            "SELECT seq FROM uploads WHERE device_id=? AND kind != 'champion'", (device_id,))]
        spans += [(r[0], r[1]) for r in self.query(
            "SELECT first_seq, last_seq FROM upload_gaps WHERE device_id=?", (device_id,))]
        if not spans:
            return None if start is None else start - 1
        spans.sort()
        n = (spans[0][0] if start is None else start) - 1
        for a, b in spans:
            if a > n + 1:
                break
            n = max(n, b)
        return n

    def quarantine(self, upload_ids: Iterable[int], step: str, reason: str) -> None:
        """Set stored rows aside that `step` cannot use (with the reason): later runs skip them."""
        now = time.time()
        with self._lock, self.transaction():
            self._conn.executemany("INSERT OR IGNORE INTO quarantine (upload_id, step, reason, at) VALUES (?,?,?,?)",
                                   [(int(i), step, reason[:500], now) for i in upload_ids])

    def quarantined(self) -> list[tuple[int, str, str, str]]:
        """(upload_id, device_id, step, reason) of the quarantined rows."""
        return [tuple(r) for r in self.query(
            "SELECT q.upload_id, u.device_id, q.step, q.reason FROM quarantine q JOIN uploads u ON u.id = q.upload_id"
            " ORDER BY q.upload_id")]

    # -- pool decisions and ranking -----------------------------------------------------------------------

    def pool_id(self, model_ids: Sequence[str]) -> int:
        key = json.dumps(list(model_ids))
        with self._lock:
            if key not in self._pool_ids:
                self._conn.execute(
                    "INSERT OR IGNORE INTO pools (model_ids, created_at) VALUES (?, ?)", (key, time.time())
                )
                self._pool_ids[key] = self._conn.execute("SELECT pool_id FROM pools WHERE model_ids=?",
                                                         (key,)).fetchone()[0]
            return self._pool_ids[key]

    def store_decisions(
        self, pool_id: int, model_ids: Sequence[str], rows: Sequence[tuple], now: float | None = None
    ) -> int:
        """Store (upload_id, votes_anomaly, votes_total, pool_anomaly, false_positive, scores_blob, agree_mask) rows.

        Updates the ranking (+1 per candidate agreeing with the pool, -1 otherwise) in the same transaction;
        uploads already decided are skipped, so a repeated call changes nothing.
        """
        now = time.time() if now is None else now
        n = len(model_ids)
        stored = 0
        with self._lock, self.transaction():
            c = self._conn
            agree = [0] * n
            disagree = [0] * n
            through = 0
            if rows:
                ids = [r[0] for r in rows]
                # another decider may have stored some meanwhile: skip those (the write lock is ours now)
                done = {r[0] for r in c.execute(
                    "SELECT upload_id FROM pool_decisions WHERE upload_id BETWEEN ? AND ?", (min(ids), max(ids)))}
                fresh = [r for r in rows if r[0] not in done] if done else list(rows)
                decisions = [(uid, pool_id, now, va, vt, pa, fp, blob) for uid, va, vt, pa, fp, blob, _ in fresh]
                if self.postgres:
                    c.copy_rows("pool_decisions", _DECISION_COLUMNS, decisions)
                else:
                    c.executemany("INSERT INTO pool_decisions (upload_id, pool_id, decided_at, votes_anomaly,"
                                  " votes_total, pool_anomaly, false_positive, scores) VALUES (?,?,?,?,?,?,?,?)",
                                  decisions)
                stored = len(fresh)
                if fresh:
                    through = max(r[0] for r in fresh)
                    agree = np.asarray([r[6] for r in fresh], dtype=bool).reshape(stored, n).sum(axis=0).tolist()
                    disagree = [stored - a for a in agree]
            if stored:
                c.executemany(
                    "INSERT INTO ranking (model_id, points, agree, disagree, updated_at) VALUES (?,?,?,?,?)"
                    " ON CONFLICT (model_id) DO UPDATE SET points = ranking.points + excluded.points,"
                    " agree = ranking.agree + excluded.agree, disagree = ranking.disagree + excluded.disagree,"
                    " updated_at = excluded.updated_at",
                    [(m, agree[i] - disagree[i], agree[i], disagree[i], now) for i, m in enumerate(model_ids)],
                )
                points = dict(c.execute("SELECT model_id, points FROM ranking").fetchall())
                c.execute(
                    "INSERT INTO ranking_history (at, through_upload_id, points) VALUES (?,?,?)",
                    (now, through, json.dumps(points, sort_keys=True)),
                )
        return stored

    def ranking(self, model_ids: Sequence[str] | None = None) -> list[tuple[str, int, int, int]]:
        """(model_id, points, agree, disagree), best first (ties: model id order)."""
        rows = self.query("SELECT model_id, points, agree, disagree FROM ranking ORDER BY points DESC, model_id")
        if model_ids is not None:
            keep = set(model_ids)
            rows = [r for r in rows if r[0] in keep]
        return [tuple(r) for r in rows]

    def ranking_history(self) -> list[tuple[float, int, dict]]:
        return [(r[0], r[1], json.loads(r[2])) for r in self.query(
            "SELECT at, through_upload_id, points FROM ranking_history ORDER BY id")]

    def count_false_positives(self, device_id: str | None = None) -> int:
        if device_id is None:
            return self.scalar("SELECT COUNT(*) FROM pool_decisions WHERE false_positive=1")
        return self.scalar(
            "SELECT COUNT(*) FROM pool_decisions d JOIN uploads u ON u.id = d.upload_id"
            " WHERE d.false_positive=1 AND u.device_id=?",
            (device_id,),
        )

    # -- champions and false-positive episodes -----------------------------------------------------------

    def _add_champion(self, device_id: str, model_id: str, source: str, now: float, since_upload_id: int,
                      deploy_id: int | None = None) -> int:
        prior = self._conn.execute(
            "SELECT champion_id FROM uploads WHERE device_id=? AND id<=? AND kind != 'champion'"
            " ORDER BY id DESC LIMIT 1", (device_id, since_upload_id)).fetchone()
        cur = self._conn.execute(
            "INSERT INTO champions (device_id, model_id, source, since, since_upload_id, deploy_id, prior_scorer)"
            " VALUES (?,?,?,?,?,?,?)",
            (device_id, model_id, source, now, since_upload_id, deploy_id, prior[0] if prior else None),
        )
        return cur.lastrowid

    def set_champion(self, device_id: str, model_id: str, source: str = "manual") -> int:
        with self._lock, self.transaction():
            return self._add_champion(device_id, model_id, source, time.time(), self.max_upload_id())

    _CHAMPION = "SELECT id, device_id, model_id, source, since, since_upload_id, deploy_id FROM champions"
    # an upload u of champion c's episode (c's device, after c took over, not scored by the champion before it)
    _IN_EPISODE = ("u.device_id = c.device_id AND u.id > c.since_upload_id"
                   " AND (c.prior_scorer IS NULL OR u.champion_id IS NULL OR u.champion_id != c.prior_scorer)")

    def current_champion(self, device_id: str) -> Champion | None:
        """The device's champion now, or None."""
        row = self._conn.execute(self._CHAMPION + " WHERE device_id=? ORDER BY id DESC LIMIT 1",
                                 (device_id,)).fetchone()
        return Champion(*row) if row else None

    def champions(self, device_id: str | None = None) -> list[Champion]:
        """Every champion a device (or every device) ran, oldest first."""
        if device_id:
            return [Champion(*r) for r in self.query(self._CHAMPION + " WHERE device_id=? ORDER BY id", (device_id,))]
        return [Champion(*r) for r in self.query(self._CHAMPION + " ORDER BY id")]

    def champion_scores(self) -> dict[str, ChampionScore]:
        """Per champion id the devices reported: false positives and confirmed anomalies the pool decided."""
        rows = self.query(
            "SELECT u.champion_id, SUM(d.false_positive), SUM(CASE WHEN u.kind = 'anomaly' THEN d.pool_anomaly END)"
            " FROM uploads u JOIN pool_decisions d ON d.upload_id = u.id WHERE u.kind != 'champion'"
            " GROUP BY u.champion_id")
        return {r[0]: ChampionScore(r[0], int(r[1] or 0), int(r[2] or 0)) for r in rows}

    def count_pool_anomalies(self) -> int:
        """Windows the pool called anomalous."""
        return self.scalar("SELECT COUNT(*) FROM pool_decisions WHERE pool_anomaly=1")

    def count_decisions(self) -> int:
        """Windows the pool decided."""
        return self.scalar("SELECT COUNT(*) FROM pool_decisions")

    def decided_windows(self) -> list[tuple[int, str, int]]:
        """(upload id, device, false positive 0/1) of every window the pool decided, in upload order."""
        return [tuple(r) for r in self.query(
            "SELECT u.id, u.device_id, d.false_positive FROM uploads u JOIN pool_decisions d ON d.upload_id = u.id"
            " WHERE u.kind != 'champion' ORDER BY u.id")]

    def episode_summaries(self) -> list[dict]:
        """Per device and champion episode: windows the pool decided, the champion's anomalies, false positives
        (a window counts in the last episode it belongs to, see _IN_EPISODE: late windows stay their scorer's)."""
        counts: dict[int, list[int]] = {}
        for episode, anomaly, fp in self.query(
                "SELECT (SELECT MAX(c.id) FROM champions c WHERE " + self._IN_EPISODE + "),"
                " CASE WHEN u.kind = 'anomaly' THEN 1 ELSE 0 END, d.false_positive"
                " FROM uploads u JOIN pool_decisions d ON d.upload_id = u.id WHERE u.kind != 'champion'"):
            n = counts.setdefault(episode, [0, 0, 0])
            n[0], n[1], n[2] = n[0] + 1, n[1] + anomaly, n[2] + fp
        rows = []
        for c in self.champions():
            decided, anomalies, fps = counts.get(c.episode_id, (0, 0, 0))
            rows.append({"device": c.device_id, "episode": c.episode_id, "champion": c.model_id, "source": c.source,
                         "windows_decided": decided, "champion_anomalies": anomalies, "false_positives": fps,
                         "fp_rate": fps / decided if decided else float("nan")})
        return sorted(rows, key=lambda r: (r["device"], r["episode"]))

    def upload_keys(self) -> set[tuple[str, int]]:
        """(device, upload number) of every stored upload."""
        return {(d, s) for d, s in self.query("SELECT device_id, seq FROM uploads")}

    def upload_to_decision_seconds(self) -> list[float]:
        """Per decided window, from the device sending it to the pool's decision."""
        return [r[0] for r in self.query(
            "SELECT d.decided_at - u.sent_at FROM uploads u JOIN pool_decisions d ON d.upload_id = u.id")]

    def count_windows_received_after(self, t: float) -> int:
        """Window uploads (not champions) the gateway received after time t."""
        return self.scalar("SELECT COUNT(*) FROM uploads WHERE kind != 'champion' AND received_at > ?", (t,))

    def episodes(self) -> list[Episode]:
        """Per device, its current champion's episode and the false positives so far.

        An episode is one champion's time on a device; its false positives are the pool-rejected anomalies
        uploaded since the champion took over, except those the previous champion scored (sent late).
        """
        return [Episode(*r) for r in self.query(
            "SELECT c.device_id, c.id, c.model_id,"
            " (SELECT COUNT(*) FROM uploads u JOIN pool_decisions d ON d.upload_id = u.id"
            "   WHERE " + self._IN_EPISODE + " AND d.false_positive = 1),"
            " (SELECT MAX(d.decided_at) FROM uploads u JOIN pool_decisions d ON d.upload_id = u.id"
            "   WHERE " + self._IN_EPISODE + " AND d.false_positive = 1)"
            " FROM champions c WHERE c.id = (SELECT MAX(id) FROM champions c2 WHERE c2.device_id = c.device_id)"
            " ORDER BY c.device_id"
        )]

    def nth_false_positive_time(self, episode_id: int, n: int) -> float | None:
        """When the pool decided the n-th false positive of an episode (None if not reached)."""
        row = self.query(
            "SELECT d.decided_at FROM champions c JOIN uploads u ON " + self._IN_EPISODE +
            " JOIN pool_decisions d ON d.upload_id = u.id AND d.false_positive = 1 WHERE c.id = ?"
            " ORDER BY u.id LIMIT 1 OFFSET ?",
            (episode_id, n - 1),
        )
        return row[0][0] if row else None

    # -- what changed, for the operator's view ----------------------------------------------------------

    def decided_through(self) -> int:
        """The highest upload id the pool decided (0 before the first decision)."""
        return self.scalar("SELECT COALESCE(MAX(upload_id), 0) FROM pool_decisions")

    def decisions_between(self, after_upload_id: int, through_upload_id: int) -> DecisionCounts:
        """What the pool decided on the uploads after after_upload_id through through_upload_id."""
        row = self.query(
            "SELECT COUNT(*), COALESCE(SUM(pool_anomaly), 0), COALESCE(SUM(false_positive), 0) FROM pool_decisions"
            " WHERE upload_id > ? AND upload_id <= ?", (after_upload_id, through_upload_id))[0]
        return DecisionCounts(*row)

    def decision_time(self, upload_id: int) -> float | None:
        """When the pool decided an upload (None: not yet)."""
        return self.scalar("SELECT decided_at FROM pool_decisions WHERE upload_id=?", (upload_id,))

    def count_undecided(self, received_before: float | None = None) -> int:
        """Windows the pool has not decided (received before a time, if given)."""
        return self.scalar(
            "SELECT COUNT(*) FROM uploads u WHERE u.kind != 'champion' AND u.received_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM pool_decisions d WHERE d.upload_id = u.id)",
            (float("inf") if received_before is None else received_before,))

    def count_unregistered_model_uploads(self) -> int:
        """Champions devices uploaded that have not entered the repository yet."""
        return self.scalar("SELECT COUNT(*) FROM model_uploads WHERE model_id IS NULL")

    def fleet(self) -> list[FleetDevice]:
        """Per device: its champion now and before, the false positives against it, its last deploy."""
        episodes = {e.device_id: e for e in self.episodes()}
        rows = []
        for device_id in self.devices():
            history = self.champions(device_id)
            deploys = self.deploys(device_id)
            episode = episodes.get(device_id)
            rows.append(FleetDevice(
                device_id=device_id,
                champion=history[-1] if history else None,
                previous=history[-2] if len(history) > 1 else None,
                false_positives=episode.false_positives if episode else 0,
                last_deploy=deploys[-1] if deploys else None,
                last_seen=self.scalar("SELECT last_seen FROM devices WHERE device_id=?", (device_id,)),
            ))
        return rows

    # -- deploy queue (carried out by the link service, which owns the ports) ----------------------------

    def request_deploy(self, device_id: str, model_id: str, package: bytes | None = None,
                       episode_id: int | None = None, run_id: str | None = None) -> int:
        """Queue a deploy of model_id to device_id; one request per (device, episode): a repeat returns the first,
        unless that one failed, which is then queued again (attempts + 1) with the new package."""
        now = time.time()
        with self._lock, self.transaction():
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO deploy_requests (device_id, model_id, episode_id, run_id, package, status,"
                " requested_at) VALUES (?,?,?,?,?,'pending',?)",
                (device_id, model_id, episode_id, run_id, package, now),
            )
            if cur.rowcount:
                return cur.lastrowid
            rid, status = self._conn.execute(
                "SELECT id, status FROM deploy_requests WHERE device_id=? AND episode_id=?", (device_id, episode_id)
            ).fetchone()
            if status == "failed":
                self._conn.execute(
                    "UPDATE deploy_requests SET status='pending', attempts=attempts+1, model_id=?, package=?,"
                    " run_id=?, requested_at=?, started_at=NULL, finished_at=NULL, error=NULL, figures=NULL"
                    " WHERE id=?",
                    (model_id, package, run_id, now, rid),
                )
            return rid

    def deploy_for_episode(self, device_id: str, episode_id: int) -> dict | None:
        """The deploy request of a device's episode (with its status and attempts), if any."""
        row = self.query("SELECT id FROM deploy_requests WHERE device_id=? AND episode_id=?", (device_id, episode_id))
        return self.deploy_request(row[0][0]) if row else None

    def claim_deploy(self, device_ids: Iterable[str] | None = None) -> tuple | None:
        """Take the oldest pending request (for one of device_ids): (id, device_id, model_id, package) or None."""
        with self._lock, self.transaction():
            rows = self._conn.execute(
                "SELECT id, device_id, model_id, package FROM deploy_requests WHERE status='pending' ORDER BY id"
            ).fetchall()
            allowed = None if device_ids is None else set(device_ids)
            for row in rows:
                if allowed is None or row[1] in allowed:
                    self._conn.execute(
                        "UPDATE deploy_requests SET status='running', started_at=? WHERE id=?", (time.time(), row[0])
                    )
                    return tuple(row)
        return None

    def requeue_running(self, device_ids: Iterable[str] | None = None) -> int:
        """Put deploys and settings updates a killed service left 'running' back in the queue (the service calls it
        at start, for its own devices: another gateway's running requests are that gateway's); the deploys put back."""
        sql = "UPDATE deploy_requests SET status='pending', started_at=NULL WHERE status='running'"
        with self._lock, self.transaction():
            n = 0
            for d in [None] if device_ids is None else device_ids:
                where, params = ("", ()) if d is None else (" AND device_id=?", (d,))
                self._conn.execute("UPDATE settings_updates SET status='pending', started_at=NULL"
                                   " WHERE status='running'" + where, params)
                n += self._conn.execute(sql + where, params).rowcount
            return n

    def update_deploy_progress(self, request_id: int, progress: dict) -> None:
        """Progress of a running deploy (bytes sent, link seconds, ETA), for whoever waits on it."""
        with self._lock, self.transaction():
            self._conn.execute("UPDATE deploy_requests SET figures=? WHERE id=? AND status='running'",
                               (json.dumps(progress), request_id))

    def finish_deploy(self, request_id: int, ok: bool, figures: dict | None = None, error: str | None = None) -> None:
        """Record a deploy's outcome and link figures; on success the model becomes the device's champion."""
        now = time.time()
        with self._lock, self.transaction():
            row = self._conn.execute(
                "SELECT device_id, model_id FROM deploy_requests WHERE id=?", (request_id,)
            ).fetchone()
            if row is None:
                raise KnowledgeBaseError("deploy request %d: no such request" % request_id)
            self._conn.execute(
                "UPDATE deploy_requests SET status=?, finished_at=?, error=?, figures=? WHERE id=?",
                ("done" if ok else "failed", now, error, json.dumps(figures or {}), request_id),
            )
            if ok:
                self._add_champion(row[0], row[1], "deploy", now, self.max_upload_id(), request_id)

    def deploy_request(self, request_id: int) -> dict | None:
        """A deploy request's row (status, attempts, error, figures, times), or None."""
        rows = self.query(
            "SELECT id, device_id, model_id, episode_id, run_id, status, requested_at, started_at, finished_at,"
            " error, figures, attempts FROM deploy_requests WHERE id=?",
            (request_id,),
        )
        if not rows:
            return None
        keys = ("id", "device_id", "model_id", "episode_id", "run_id", "status", "requested_at", "started_at",
                "finished_at", "error", "figures", "attempts")
        d = dict(zip(keys, rows[0]))
        d["figures"] = json.loads(d["figures"]) if d["figures"] else {}
        return d

    def deploys(self, device_id: str | None = None) -> list[dict]:
        ids = self.query(
            "SELECT id FROM deploy_requests" + (" WHERE device_id=?" if device_id else "") + " ORDER BY id",
            (device_id,) if device_id else (),
        )
        return [self.deploy_request(r[0]) for r in ids]

    def wait_deploy(self, request_id: int, timeout: float = 600.0, poll: float = 0.2, on_progress=None) -> dict:
        """Block until the link service finished the request (on_progress gets each new progress report);
        raise TimeoutError naming it otherwise."""
        deadline = time.monotonic() + timeout
        shown = None
        while True:
            d = self.deploy_request(request_id)
            if d is None:
                raise KnowledgeBaseError("deploy request %d: no such request" % request_id)
            if d["status"] in ("done", "failed"):
                return d
            if on_progress is not None and d["status"] == "running" and d["figures"] and d["figures"] != shown:
                shown = d["figures"]
                on_progress(dict(shown, request=request_id))
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "deploy request %d to %s still %s after %.0f s: is the link service running?"
                    % (request_id, d["device_id"], d["status"], timeout)
                )
            time.sleep(poll)

    # -- settings updates (queued here, carried out by the link service) ----------------------------------

    SETTINGS_KEYS = ("id", "device_id", "version", "settings", "revert", "run_id", "status", "requested_at",
                     "started_at", "finished_at", "reason", "in_force", "figures")

    def request_settings(self, device_id: str, version: int, values: dict, revert: bool = False,
                         run_id: str | None = None) -> int:
        """Queue a settings update (its version from the gateway's settings ledger) for device_id."""
        if not valid_id(device_id):
            raise KnowledgeBaseError("settings update: bad device id %r" % (device_id,))
        with self._lock, self.transaction():
            return self._conn.execute(
                "INSERT INTO settings_updates (device_id, version, settings, revert, run_id, status, requested_at)"
                " VALUES (?,?,?,?,?,'pending',?)",
                (device_id, int(version), json.dumps(values, sort_keys=True), int(revert), run_id, time.time()),
            ).lastrowid

    def claim_settings(self, device_ids: Iterable[str] | None = None) -> tuple | None:
        """Take the oldest pending settings update (for one of device_ids): (id, device_id, version, settings dict,
        revert) or None."""
        allowed = None if device_ids is None else set(device_ids)
        with self._lock, self.transaction():
            for rid, device_id, version, values, revert in self._conn.execute(
                    "SELECT id, device_id, version, settings, revert FROM settings_updates WHERE status='pending'"
                    " ORDER BY id").fetchall():
                if allowed is None or device_id in allowed:
                    self._conn.execute("UPDATE settings_updates SET status='running', started_at=? WHERE id=?",
                                       (time.time(), rid))
                    return rid, device_id, version, json.loads(values), bool(revert)
        return None

    def finish_settings(self, request_id: int, status: str, reason: str = "", in_force: dict | None = None,
                        figures: dict | None = None) -> None:
        """Record what became of a settings update: applied, refused (the device's reason) or failed (the link)."""
        with self._lock, self.transaction():
            self._conn.execute(
                "UPDATE settings_updates SET status=?, finished_at=?, reason=?, in_force=?, figures=? WHERE id=?",
                (status, time.time(), reason, json.dumps(in_force) if in_force is not None else None,
                 json.dumps(figures or {}), request_id))

    def settings_request(self, request_id: int) -> dict | None:
        rows = self.query("SELECT %s FROM settings_updates WHERE id=?" % ", ".join(self.SETTINGS_KEYS), (request_id,))
        if not rows:
            return None
        d = dict(zip(self.SETTINGS_KEYS, rows[0]))
        for k in ("settings", "in_force", "figures"):
            d[k] = json.loads(d[k]) if d[k] else ({} if k != "in_force" else None)
        d["revert"] = bool(d["revert"])
        return d

    def settings_updates(self, device_id: str | None = None) -> list[dict]:
        ids = self.query("SELECT id FROM settings_updates" + (" WHERE device_id=?" if device_id else "")
                         + " ORDER BY id", (device_id,) if device_id else ())
        return [self.settings_request(r[0]) for r in ids]

    def settings_in_force(self, device_id: str) -> dict | None:
        """The settings the device last reported in force (after an applied or a refused update), or None."""
        rows = self.query("SELECT in_force, version, status FROM settings_updates WHERE device_id=? AND in_force"
                          " IS NOT NULL ORDER BY finished_at DESC, id DESC LIMIT 1", (device_id,))
        return json.loads(rows[0][0]) if rows else None

    def wait_settings(self, request_id: int, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Block until the link service finished the settings update; TimeoutError naming it otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.settings_request(request_id)
            if d is None:
                raise KnowledgeBaseError("settings update %d: no such request" % request_id)
            if d["status"] in ("applied", "refused", "failed"):
                return d
            if time.monotonic() > deadline:
                raise TimeoutError("settings update %d to %s still %s after %.0f s: is the link service running?"
                                   % (request_id, d["device_id"], d["status"], timeout))
            time.sleep(poll)

    # -- device health ------------------------------------------------------------------------------------

    HEALTH_KEYS = ("windows", "feature_ms_mean", "feature_ms_max", "inference_ms_mean", "inference_ms_max",
                   "active_ms_mean", "free_heap_bytes", "largest_free_heap_bytes", "uptime_s", "resets",
                   "reset_cause", "retransmits", "link_errors", "settings_version", "energy_mj_per_window")

    def record_health(self, device_id: str, health: dict, now: float | None = None) -> int:
        """Store one health report (the keys of HEALTH_KEYS; tinyml_dagster.health.from_report makes them)."""
        if not valid_id(device_id):
            raise KnowledgeBaseError("health report: bad device id %r" % (device_id,))
        missing = [k for k in self.HEALTH_KEYS if k not in health]
        if missing:
            raise KnowledgeBaseError("health report of %s: missing %s" % (device_id, ", ".join(missing)))
        with self._lock, self.transaction():
            return self._conn.execute(
                "INSERT INTO device_health (device_id, received_at, %s) VALUES (?,?,%s)"
                % (", ".join(self.HEALTH_KEYS), ",".join("?" * len(self.HEALTH_KEYS))),
                (device_id, time.time() if now is None else now, *[health[k] for k in self.HEALTH_KEYS]),
            ).lastrowid

    def health_history(self, device_id: str, limit: int = 100, since: float | None = None) -> list[dict]:
        """A device's health reports, oldest first (the last `limit`, received after `since`)."""
        rows = self.query(
            "SELECT id, received_at, %s FROM device_health WHERE device_id=? AND received_at > ? ORDER BY id DESC"
            " LIMIT ?" % ", ".join(self.HEALTH_KEYS), (device_id, -1.0 if since is None else since, limit))
        return [dict(zip(("id", "received_at") + self.HEALTH_KEYS, r)) for r in reversed(rows)]

    def health_devices(self) -> list[str]:
        return [r[0] for r in self.query("SELECT DISTINCT device_id FROM device_health ORDER BY device_id")]

    # -- retraining runs ----------------------------------------------------------------------------------

    def last_retrained_through(self) -> int:
        return self.scalar(
            "SELECT COALESCE(MAX(through_upload_id), 0) FROM retraining_runs WHERE status='done'"
        )

    def record_retraining(self, since_upload_id: int, through_upload_id: int, n_windows: int,
                          model_ids: Sequence[str], status: str = "done", run_id: str | None = None,
                          started_at: float | None = None) -> int:
        with self._lock, self.transaction():
            now = time.time()
            return self._conn.execute(
                "INSERT INTO retraining_runs (run_id, started_at, finished_at, since_upload_id, through_upload_id,"
                " n_windows, model_ids, status) VALUES (?,?,?,?,?,?,?,?)",
                (run_id, started_at or now, now, since_upload_id, through_upload_id, n_windows,
                 json.dumps(list(model_ids)), status),
            ).lastrowid

    def retraining_runs(self) -> list[tuple]:
        return self.query("SELECT id, run_id, started_at, finished_at, since_upload_id, through_upload_id,"
                          " n_windows, model_ids, status FROM retraining_runs ORDER BY id")


class _Tx:
    """A transaction; inside another one, a savepoint of it (undone alone on error, committed with the outer)."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    def __enter__(self):
        self.kb._lock.acquire()
        try:
            depth = self.kb._tx_depth
            self.kb._conn.execute("SAVEPOINT tx%d" % depth if depth else "BEGIN IMMEDIATE")
        except BaseException:
            self.kb._lock.release()
            raise
        self.kb._tx_depth = depth + 1
        return self.kb._conn

    def __exit__(self, exc_type, exc, tb):
        self.kb._tx_depth -= 1
        depth = self.kb._tx_depth
        if exc_type is not None:  # the rollback undid our view of the devices' upload numbers and new pools
            self.kb._last_seq.clear()
            self.kb._pool_ids.clear()
        if not depth:
            self.kb._staged = False
        try:
            if depth and exc_type is None:
                self.kb._conn.execute("RELEASE tx%d" % depth)
            elif depth:
                self.kb._conn.execute("ROLLBACK TO tx%d" % depth)
                self.kb._conn.execute("RELEASE tx%d" % depth)
            else:
                self.kb._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.kb._lock.release()
        return False


_UPLOAD_COLUMNS = ("device_id, seq, kind, received_at, sent_at, window_start, f_mean, f_skewness, f_kurtosis,"
                   " champion_id, champion_score, champion_decision, window, feature_set, features")
# tables whose new rows get their id from the database: an INSERT returns it (sqlite3's lastrowid)
_GENERATED_IDS = {"uploads": "id", "pools": "pool_id", "ranking_history": "id", "champions": "id",
                  "deploy_requests": "id", "retraining_runs": "id", "upload_gaps": "id", "alarms": "id",
                  "settings_updates": "id", "device_health": "id"}
_RESERVED = re.compile(r'(?<![\w"])(end|window)(?![\w"])')  # column names PostgreSQL reserves (lower case only)
_PG_LOCK_KEY = 0x6B62  # the advisory lock that serialises writers, as SQLite's BEGIN IMMEDIATE does


def _pg_ddl(stmt: str) -> str:
    """A migration statement in PostgreSQL's types: 64-bit integers and identities, float8, bytea."""
    s = stmt.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    s = re.sub(r"\bINTEGER\b", "BIGINT", s)
    s = re.sub(r"\bREAL\b", "DOUBLE PRECISION", s)
    s = re.sub(r"\bBLOB\b", "BYTEA", s)
    return _RESERVED.sub(r'"\1"', s)


_PG_SQL: dict[tuple[str, bool], tuple[str, bool]] = {}


def _pg_sql(sql: str, many: bool = False) -> tuple[str, bool]:
    """A statement in PostgreSQL's terms (placeholders, INSERT OR IGNORE, quoted reserved names, RETURNING the
    generated id) and whether it returns that id."""
    key = (sql, many)
    if key not in _PG_SQL:
        s = _RESERVED.sub(r'"\1"', sql.replace("%", "%%").replace("?", "%s"))
        if sql == "BEGIN IMMEDIATE":
            s = "BEGIN; SELECT pg_advisory_xact_lock(%d)" % _PG_LOCK_KEY
        elif "INSERT OR IGNORE INTO" in s:
            s = s.replace("INSERT OR IGNORE INTO", "INSERT INTO") + " ON CONFLICT DO NOTHING"
        m = re.match(r"\s*INSERT INTO (\w+)", s)
        returns = bool(m and not many and m.group(1) in _GENERATED_IDS and "RETURNING" not in s)
        if returns:
            s += " RETURNING " + _GENERATED_IDS[m.group(1)]
        _PG_SQL[key] = (s, returns)
    return _PG_SQL[key]


class _PgCursor:
    """The part of a sqlite3 cursor the manager uses: rows, rowcount, lastrowid."""

    def __init__(self, cur, returns: bool):
        self._cur = cur
        self.rowcount = cur.rowcount
        self.lastrowid = None
        if returns:
            row = cur.fetchone()
            self.lastrowid = row[0] if row else None

    def fetchone(self):
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self):
        return self._cur.fetchall() if self._cur.description else []

    def __iter__(self):
        return iter(self.fetchall())


class _PgConnection:
    """A psycopg 3 connection behind the sqlite3 calls the manager makes (autocommit; BEGIN IMMEDIATE takes the
    writers' advisory lock); numeric results (SUM of integers) come back as int or float, never Decimal."""

    def __init__(self, url: str, timeout_s: float):
        self.raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)))
        try:
            self.raw.adapters.register_loader("numeric", _NumberLoader)
            self.raw.execute("SET lock_timeout = %d" % int(timeout_s * 1000))
            self.raw.execute("CREATE TEMP TABLE upload_batch (ord BIGINT, " + ", ".join(
                "%s %s" % (_RESERVED.sub(r'"\1"', name), kind) for name, kind in _UPLOAD_BATCH_TYPES)
                             + ") ON COMMIT DELETE ROWS")
        except BaseException:
            self.raw.close()
            raise

    def execute(self, sql: str, params: Sequence = (), prepare: bool | None = None) -> _PgCursor:
        """prepare: None lets psycopg prepare a statement run often; False plans it for these parameters."""
        text, returns = _pg_sql(sql)
        return _PgCursor(self.raw.execute(text, tuple(params), prepare=prepare), returns)

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:  # pipelined: one round trip for the batch
            with self.raw.cursor() as cur:
                cur.executemany(_pg_sql(sql, many=True)[0], rows)

    def copy_rows(self, table: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence]) -> None:
        """COPY rows of (name, SQL type) columns into a table, in PostgreSQL's binary format (no text to parse)."""
        names = ", ".join(_RESERVED.sub(r'"\1"', name) for name, _ in columns)
        with self.raw.cursor() as cur, cur.copy("COPY %s (%s) FROM STDIN (FORMAT BINARY)" % (table, names)) as copy:
            copy.set_types([kind.lower() for _, kind in columns])
            for row in rows:
                copy.write_row(row)

    def schema_version(self) -> int:
        """The schema version (0: a new database; its version table is made by the first migration, under the
        writers' lock, so that gateways opening a new database at once do not race)."""
        if self.raw.execute("SELECT to_regclass('kb_schema')").fetchone()[0] is None:
            return 0
        return self.raw.execute("SELECT version FROM kb_schema").fetchone()[0]

    def close(self) -> None:
        self.raw.close()


_UPLOAD_BATCH_TYPES = (
    ("device_id", "TEXT"), ("seq", "BIGINT"), ("kind", "TEXT"), ("received_at", "DOUBLE PRECISION"),
    ("sent_at", "DOUBLE PRECISION"), ("window_start", "DOUBLE PRECISION"), ("f_mean", "DOUBLE PRECISION"),
    ("f_skewness", "DOUBLE PRECISION"), ("f_kurtosis", "DOUBLE PRECISION"), ("champion_id", "TEXT"),
    ("champion_score", "DOUBLE PRECISION"), ("champion_decision", "BIGINT"), ("window", "BYTEA"),
    ("feature_set", "TEXT"), ("features", "BYTEA"))
_UPLOAD_BATCH_COLUMNS = (("ord", "BIGINT"), *_UPLOAD_BATCH_TYPES)
_CHAMPION_COLUMNS = (("device_id", "TEXT"), ("model_id", "TEXT"), ("source", "TEXT"), ("since", "DOUBLE PRECISION"),
                     ("since_upload_id", "BIGINT"))
_DECISION_COLUMNS = (("upload_id", "BIGINT"), ("pool_id", "BIGINT"), ("decided_at", "DOUBLE PRECISION"),
                     ("votes_anomaly", "BIGINT"), ("votes_total", "BIGINT"), ("pool_anomaly", "BIGINT"),
                     ("false_positive", "BIGINT"), ("scores", "BYTEA"))


class _NumberLoader(NumericLoader):
    """numeric as int when whole, else float."""

    def load(self, data):
        value = super().load(data)
        return int(value) if value == value.to_integral_value() else float(value)


def _redacted(url: str) -> str:
    """A URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def pack_features(values: Sequence[float]) -> bytes:
    """A feature vector as stored: float64 little-endian."""
    import struct

    return struct.pack("<%dd" % len(values), *values)


def unpack_features(blob: bytes) -> tuple[float, ...]:
    """The feature vector of pack_features."""
    import struct

    if len(blob) % 8:
        raise KnowledgeBaseError("stored feature vector of %d bytes is not float64s" % len(blob))
    return struct.unpack("<%dd" % (len(blob) // 8), blob)


def iter_batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
