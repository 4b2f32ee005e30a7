"""Model repository: every trained forest (candidates, device champions, retrained versions), stored durably.

Layout under `root` (settings.models_dir(), i.e. data/models/):
    <model_id>/forest.bin    compact forest bytes (firmware.isoforest layout; the deploy `compact` encoding)
    <model_id>/config.json   what the firmware needs to use it: grid, threshold, feature schema, n_trees, psi
    <model_id>/model.json    metadata: id, content hash, version, hyperparameters, seed, training range,
                             feature schema, size, anomaly rates, lineage
    index.json               one metadata entry per model, in the order they were added (rebuilt from the
                             model directories when missing or unreadable)
    candidates.json          the ids of the current candidate set (the last `candidate_models` materialisation)

Model id = "<prefix>-t<n_trees>-<hash8>" (prefix "b3" for bearing 3, a device id, "r" for retraining);
content hash = sha256(compact bytes + canonical JSON of config.json). A model directory is written in a temporary
directory and renamed into place, the index and candidates files are replaced atomically under a lock: adding the
same content again returns the existing id, nothing is ever overwritten, retraining adds versions of a family
("<prefix>-t<n_trees>").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from firmware import features as fw_features
from firmware import isoforest, messages
from tinyml_dagster import settings
from tinyml_dagster.storage import atomic_write

MODEL_FILE = "forest.bin"
CONFIG_FILE = "config.json"
META_FILE = "model.json"
INDEX_FILE = "index.json"
CANDIDATES_FILE = "candidates.json"
LOCK_FILE = ".lock"
COMPACT_FORMAT = "isoforest-compact-%d" % isoforest.FORMAT_VERSION
DEFAULT_THRESHOLD = 0.6


class ModelNotFoundError(KeyError):
    """No model with this id in the repository."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


class ModelRepositoryError(ValueError):
    """A stored model or index that is not what it should be; the message names the file and the field."""


def canonical_json(obj: Any) -> bytes:
    """The bytes hashed and stored: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_hash(forest_bytes: bytes, config: dict) -> str:
    """sha256 hex of the compact bytes followed by the canonical config."""
    return hashlib.sha256(bytes(forest_bytes) + canonical_json(config)).hexdigest()


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_]+", "-", str(text).lower()).strip("-")
    return slug or "m"


def model_config(forest: isoforest.Forest, threshold: float = DEFAULT_THRESHOLD, rate_hz: int | None = None,
                 window_ms: int = fw_features.WINDOW_MS,
                 feature_names: Sequence[str] = tuple(fw_features.FEATURE_NAMES)) -> dict:
    """The config a device needs with the compact bytes (covered by the content hash)."""
    if len(feature_names) != forest.n_features:
        raise ValueError(f"{len(feature_names)} feature names for a forest of {forest.n_features} features")
    return {
        "format": COMPACT_FORMAT,
        "n_features": forest.n_features,
        "feature_names": list(feature_names),
        "n_trees": forest.n_trees,
        "psi": forest.psi,
        "grid": [[int(e), int(b)] for e, b in forest.grid],
        "threshold": float(threshold),
        "rate_hz": None if rate_hz is None else int(rate_hz),
        "window_ms": int(window_ms),
    }



class ModelRepository:
    """The repository of trained forests under root (default data/models/)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else settings.models_dir()

    # ---- reading

    def list(self, source: str | None = None, family: str | None = None) -> list[dict]:
        """Metadata of every model, oldest first (optionally one lineage source or one family)."""
        entries = self._read_index()
        if source is not None:
            entries = [e for e in entries if e.get("source") == source]
        if family is not None:
            entries = [e for e in entries if e.get("family") == family]
        return entries

    def ids(self) -> list[str]:
        """Every model id, oldest first."""
        return [e["model_id"] for e in self._read_index()]

    def __contains__(self, model_id: str) -> bool:
        return (self._dir(model_id) / META_FILE).is_file()

    def get(self, model_id: str) -> dict:
        """Metadata of one model."""
        return self._read_json(self._dir(model_id) / META_FILE, model_id)

    def config(self, model_id: str) -> dict:
        """The device config of one model (grid, threshold, feature schema, n_trees, psi)."""
        return self._read_json(self._dir(model_id) / CONFIG_FILE, model_id)

    def model_bytes(self, model_id: str) -> bytes:
        """The compact forest bytes, checked against the stored content hash."""
        path = self._dir(model_id) / MODEL_FILE
        if not path.is_file():
            raise ModelNotFoundError(f"model {model_id!r} not found under {self.root}")
        data = path.read_bytes()
        meta = self.get(model_id)
        digest = content_hash(data, self.config(model_id))
        if digest != meta.get("content_hash"):
            raise ModelRepositoryError(f"{path}: content hash {digest[:12]} does not match model.json "
                                       f"content_hash {str(meta.get('content_hash'))[:12]}")
        return data

    def load_forest(self, model_id: str) -> isoforest.Forest:
        """The forest of one model, ready to score."""
        data = self.model_bytes(model_id)
        cfg = self.config(model_id)
        try:
            return isoforest.load(data, cfg["grid"])
        except (KeyError, ValueError) as exc:
            raise ModelRepositoryError(f"{self._dir(model_id)}: {exc}") from exc

    def load(self, model_id: str) -> tuple[isoforest.Forest, dict]:
        """(forest, config) of one model."""
        return self.load_forest(model_id), self.config(model_id)

    def path(self, model_id: str) -> Path:
        """The directory of one model."""
        return self._dir(model_id)

    def candidate_ids(self) -> list[str]:
        """The current candidate set (written by the candidate_models asset); [] before the first one."""
        path = self.root / CANDIDATES_FILE
        if not path.is_file():
            return []
        doc = self._read_json(path, CANDIDATES_FILE)
        ids = doc.get("model_ids")
        if not isinstance(ids, list):
            raise ModelRepositoryError(f"{path}: field model_ids is not a list")
        return ids

    def candidates(self) -> list[dict]:
        """Metadata of the current candidate set."""
        return [self.get(m) for m in self.candidate_ids()]

    # ---- writing

    def add(self, forest: isoforest.Forest, *, lineage: dict | None = None, threshold: float | None = None,
            rate_hz: int | None = None, window_ms: int = fw_features.WINDOW_MS,
            feature_names: Sequence[str] = tuple(fw_features.FEATURE_NAMES), seed: int | None = None,
            training: dict | None = None, metrics: dict | None = None, prefix: str | None = None,
            created_at: str | None = None) -> str:
        """Store a forest as a new model (or find the identical one); returns its id. Never overwrites."""
        lineage = dict(lineage or {})
        training = dict(training or {})
        threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if rate_hz is None:
            rate_hz = training.get("rate_hz", lineage.get("rate_hz"))
        config = model_config(forest, threshold, rate_hz, window_ms, feature_names)
        data = forest.to_bytes()
        digest = content_hash(data, config)
        if prefix is None:
            if training.get("bearing") is not None:
                prefix = "b%d" % int(training["bearing"])
            elif lineage.get("device_id"):
                prefix = str(lineage["device_id"])
            elif lineage.get("source") == "retraining":
                prefix = "r"
            else:
                prefix = str(lineage.get("source") or "m")
        family = f"{_slug(prefix)}-t{forest.n_trees}"
        model_id = f"{family}-{digest[:8]}"
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            final = self._dir(model_id)
            if final.exists():
                return self._existing(model_id, digest)
            index = self._read_index()
            meta = {
                "model_id": model_id,
                "content_hash": digest,
                "family": family,
                "version": 1 + sum(1 for e in index if e.get("family") == family),
                "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": lineage.get("source", "gateway"),
                "algorithm": "isolation_forest",
                "format": COMPACT_FORMAT,
                "threshold": threshold,
                "hyperparameters": {"n_trees": forest.n_trees, "psi": forest.psi,
                                    "height_limit": forest.height_limit, "threshold": threshold},
                "seed": seed,
                "training": training,
                "feature_schema": {"names": list(feature_names), "order": list(range(len(feature_names))),
                                   "rate_hz": config["rate_hz"], "window_ms": int(window_ms)},
                "size_bytes": len(data),
                "metrics": dict(metrics or {}),
                "lineage": lineage,
                "files": {"model": MODEL_FILE, "config": CONFIG_FILE},
            }
            for key in ("anomaly_rate_train", "anomaly_rate_later"):
                if metrics and key in metrics:
                    meta[key] = metrics[key]
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-" + model_id + "-"))
            try:
                for name, payload in ((MODEL_FILE, data), (CONFIG_FILE, canonical_json(config)),
                                      (META_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())):
                    with open(tmp / name, "wb") as f:
                        f.write(payload)
                        f.flush()
                        os.fsync(f.fileno())
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            index.append(meta)
            atomic_write(self.root / INDEX_FILE, json.dumps(index, indent=1).encode())
        return model_id

    def set_candidates(self, model_ids: Sequence[str], note: dict | None = None) -> None:
        """Record the current candidate set (ids must exist)."""
        missing = [m for m in model_ids if m not in self]
        if missing:
            raise ModelNotFoundError(f"cannot make unknown models candidates: {missing}")
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"model_ids": list(model_ids), "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               **(note or {})}
        with self._lock():
            atomic_write(self.root / CANDIDATES_FILE, json.dumps(doc, indent=1).encode())

    def rebuild_index(self) -> list[dict]:
        """Rewrite index.json from the model directories (e.g. after it was lost); returns the entries."""
        with self._lock():
            entries = self._scan()
            atomic_write(self.root / INDEX_FILE, json.dumps(entries, indent=1).encode())
        return entries

    # ---- internals

    def _dir(self, model_id: str) -> Path:
        if not isinstance(model_id, str) or not re.fullmatch(r"[a-z0-9_][a-z0-9_-]*", model_id):
            raise ModelNotFoundError(f"not a model id: {model_id!r}")
        return self.root / model_id

    def _existing(self, model_id: str, digest: str) -> str:
        stored = self.get(model_id).get("content_hash")
        if stored != digest:
            raise ModelRepositoryError(f"{self._dir(model_id)}: id collision, stored content_hash {stored} "
                                       f"differs from {digest}")
        return model_id

    def _read_json(self, path: Path, what: str) -> dict:
        try:
            return json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise ModelNotFoundError(f"model {what!r} not found under {self.root} (no {path.name})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelRepositoryError(f"{path}: not valid JSON: {exc}") from exc

    def _read_index(self) -> list[dict]:
        path = self.root / INDEX_FILE
        try:
            entries = json.loads(path.read_text("utf-8"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return self._scan()
        stored = {d.name for d in self.root.iterdir() if not d.name.startswith(".") and (d / META_FILE).is_file()}
        if (not isinstance(entries, list) or not all(isinstance(e, dict) and "model_id" in e for e in entries)
                or {e["model_id"] for e in entries} != stored):
            return self._scan()  # a model written but not yet indexed (crash in between), or a damaged index
        return entries

    def _scan(self) -> list[dict]:
        if not self.root.is_dir():
            return []
        entries = []
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / META_FILE).is_file():
                entries.append(self._read_json(d / META_FILE, d.name))
        return sorted(entries, key=lambda e: (e.get("created_at", ""), e.get("family", ""), e.get("version", 0)))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def add_device_champion(repo: ModelRepository, device_id: str, blob: bytes, window_from, window_to,
                        upload_id: int) -> str:
    """Put a champion a device trained itself (its CHAMPION_CHUNK blob) in the repository with its lineage."""
    try:
        config_json, compact = messages.unpack_champion(blob)
        cfg = json.loads(config_json)
        forest = isoforest.load(compact, [tuple(g) for g in cfg["grid"]])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"champion upload {upload_id} of device {device_id}: {exc}") from None
    lineage = {"source": "device", "device_id": device_id, "device_model_id": cfg.get("model_id"),
               "device_version": cfg.get("version"), "window_from": window_from, "window_to": window_to,
               "kb_upload_id": upload_id}
    return repo.add(forest, lineage=lineage, threshold=cfg.get("threshold"))
