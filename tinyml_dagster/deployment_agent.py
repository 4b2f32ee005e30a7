"""Embedded Model Deployment Agent: build, sign and version the packages that travel to the devices.

A package is the paper's MicroPython module (model, feature script, config.json, __init__.py) in the
container that firmware/package.py parses and verifies. Per-device HMAC keys come from TINYML_DEVICE_KEYS
(``dev-a=<hex>,dev-b=<hex>``) or from key files under <data>/keys/ (created on first use); never from code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from firmware import package as fpkg

from . import settings
from .storage import atomic_write

ENCODINGS = {"compact": fpkg.ENC_COMPACT, "json": fpkg.ENC_JSON}
# zlib window of 2**12 bytes: MicroPython's DeflateIO reads it from the zlib header and allocates only that
ZLIB_WBITS = 12
INIT_PY = '"""Champion package: the model, features.py, config.json (see config["model_file"])."""\n'
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PackagingError(ValueError):
    """A package that cannot be built (bad input), naming what was wrong."""



def deflate(data: bytes) -> bytes:
    """zlib stream (level 9, 4 KB window) that MicroPython's deflate.DeflateIO(…, ZLIB) inflates."""
    c = zlib.compressobj(9, zlib.DEFLATED, ZLIB_WBITS, 9)
    return c.compress(data) + c.flush()


def feature_script() -> bytes:
    """The device's feature extraction script: a copy of firmware/features.py."""
    return (Path(fpkg.__file__).parent / "features.py").read_bytes()


def _check_device_id(device_id: str) -> str:
    if not _DEVICE_ID.match(device_id or ""):
        raise PackagingError(f"bad device id {device_id!r}: 1-64 of [A-Za-z0-9_.-]")
    return device_id


class DeviceKeys:
    """The per-device HMAC keys the gateway holds: TINYML_DEVICE_KEYS, else <root>/<device>.key files."""

    def __init__(self, root: Path | None = None, env: str | None = None) -> None:
        self.root = Path(root) if root is not None else settings.data_dir() / "keys"
        self._env = {}
        spec = os.environ.get("TINYML_DEVICE_KEYS", "") if env is None else env
        for i, item in enumerate(filter(None, (s.strip() for s in spec.split(",")))):
            name, sep, hexkey = item.partition("=")
            try:
                key = bytes.fromhex(hexkey)
            except ValueError:
                key = b""
            if not sep or len(key) < 16:
                raise PackagingError(f"TINYML_DEVICE_KEYS item {i + 1} ({name!r}): expected <device>=<hex, >= 16 bytes>")
            self._env[name] = key

    def key(self, device_id: str) -> bytes:
        """The device's key; a new random one is created (and kept, mode 0600) for an unknown device."""
        _check_device_id(device_id)
        if device_id in self._env:
            return self._env[device_id]
        path = self.root / f"{device_id}.key"
        if not path.exists():
            atomic_write(path, os.urandom(32).hex().encode() + b"\n")
            os.chmod(path, 0o600)
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError as exc:
            raise PackagingError(f"{path}: line 1: not a hex key ({exc})") from None
        if len(key) < 16:
            raise PackagingError(f"{path}: line 1: key of {len(key)} bytes, need >= 16")
        return key

    def provision(self, device_id: str, flash_dir: Path) -> Path:
        """Put the device's key where firmware/transfer.py reads it: <flash>/deploy/key (raw bytes)."""
        path = Path(flash_dir) / "deploy" / "key"
        atomic_write(path, self.key(device_id))
        return path


class VersionLedger:
    """Monotonic package versions per device, kept in <data>/deploy/versions.json."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else settings.data_dir() / "deploy" / "versions.json"

    def _load(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise PackagingError(f"{self.path}: line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise PackagingError(f"{self.path}: expected an object of device -> int version")
        return data

    def current(self, device_id: str) -> int:
        return self._load().get(device_id, 0)

    def next(self, device_id: str) -> int:
        """Reserve and return the device's next version (never reused, even if that deploy fails)."""
        _check_device_id(device_id)
        data = self._load()
        data[device_id] = data.get(device_id, 0) + 1
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        return data[device_id]


@dataclass
class Package:
    """A built, signed package and what the transfer protocol needs to know of it."""

    data: bytes
    model_id: str
    device_id: str
    version: int
    encoding: str
    files: list[dict] = field(default_factory=list)
    head_size: int = 0

    @property
    def sha256(self) -> bytes:
        return self.data[-fpkg.TRAILER_SIZE:-fpkg.TRAILER_SIZE + 32]

    @property
    def size(self) -> int:
        return len(self.data)

    def stream(self, have_mask: int = 0) -> bytes:
        """The bytes that travel when the device already holds the files in have_mask (bit i = file i)."""
        if not have_mask:
            return self.data
        parts = [self.data[: self.head_size]]
        for i, e in enumerate(self.files):
            if not have_mask & (1 << i):
                start = self.head_size + e["offset"]
                parts.append(self.data[start : start + e["size"]])
        parts.append(self.data[-fpkg.TRAILER_SIZE:])
        return b"".join(parts)

    def file_sizes(self) -> dict[str, int]:
        return {e["name"]: e["size"] for e in self.files}

    def to_blob(self) -> bytes:
        """The package as the Knowledge Base's deploy queue stores it: u32 length, JSON head, package bytes."""
        head = {"model_id": self.model_id, "device_id": self.device_id, "version": self.version,
                "encoding": self.encoding, "head_size": self.head_size,
                "files": [dict(f, sha8=f["sha8"].hex()) for f in self.files]}
        h = json.dumps(head, separators=(",", ":")).encode()
        return struct.pack("<I", len(h)) + h + self.data

    @classmethod
    def from_blob(cls, blob: bytes | None) -> Package:
        """The package of a deploy request (the inverse of to_blob); PackagingError naming what is wrong."""
        try:
            (n,) = struct.unpack_from("<I", blob or b"", 0)
            head = json.loads(blob[4:4 + n])
            head["files"] = [dict(f, sha8=bytes.fromhex(f["sha8"])) for f in head["files"]]
            return cls(data=bytes(blob[4 + n:]), **head)
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise PackagingError(f"deploy request package: not a queued package blob ({exc})") from None


@dataclass(frozen=True)
class Footprint:
    """What a package occupies on the device once installed."""

    flash_bytes: int  # the staged package, the extracted champion and the previous champion kept for fallback
    heap_bytes: int  # the model held in RAM, the inflate window and the scoring buffers


SCORING_BUFFERS = 2048  # the Local Inference Engine's feature and path buffers


def footprint(pkg: Package) -> Footprint:
    """Flash and heap a package takes on the device (firmware/package.py's staging and model_deployment_agent.py)."""
    raw = {f["name"]: f["raw_size"] for f in pkg.files}
    model = raw.get("model.bin", raw.get("model.json", 0))
    inflate_window = 2**ZLIB_WBITS if pkg.encoding == "compact" else 0
    return Footprint(flash_bytes=pkg.size + 2 * sum(raw.values()),
                     heap_bytes=model + inflate_window + SCORING_BUFFERS)


def build_package(
    model_id: str,
    model_file: tuple[str, bytes],
    config: dict,
    *,
    device_id: str,
    version: int,
    key: bytes,
    encoding: str = "compact",
    features_src: bytes | None = None,
) -> Package:
    """Sign a package of (model file, features.py, config.json, __init__.py) for one device and version."""
    if encoding not in ENCODINGS:
        raise PackagingError(f"unknown encoding {encoding!r}: one of {sorted(ENCODINGS)}")
    _check_device_id(device_id)
    if not (0 < len(model_id.encode()) < 256):
        raise PackagingError(f"bad model id {model_id!r}")
    if not (0 < version < 2**32):
        raise PackagingError(f"version {version} out of range 1..2**32-1")
    if len(key) < 16:
        raise PackagingError("HMAC key shorter than 16 bytes")
    name, model_bytes = model_file
    cfg = dict(config, model_id=model_id, version=version, encoding=encoding, model_file=name)
    raw_files = [
        (name, model_bytes),
        ("features.py", features_src if features_src is not None else feature_script()),
        ("config.json", json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()),
        ("__init__.py", INIT_PY.encode()),
    ]
    compress = encoding == "compact"
    head = bytearray(fpkg.MAGIC)
    head += struct.pack("<BBIB", fpkg.FORMAT, ENCODINGS[encoding], version, len(raw_files))
    for text in (model_id, device_id):
        b = text.encode()
        head += bytes([len(b)]) + b
    contents = []
    files = []
    offset = 0
    for fname, raw in raw_files:
        stored = deflate(raw) if compress else raw
        flags = fpkg.FLAG_DEFLATED if compress else 0
        if len(raw) > fpkg.MAX_RAW_FILE:
            raise PackagingError(f"{model_id}: file {fname} of {len(raw)} bytes > {fpkg.MAX_RAW_FILE}")
        sha8 = hashlib.sha256(stored).digest()[: fpkg.SHA8]
        nb = fname.encode()
        head += bytes([len(nb)]) + nb + struct.pack("<BII", flags, len(stored), len(raw)) + sha8
        files.append({"name": fname, "flags": flags, "size": len(stored), "raw_size": len(raw),
                      "sha8": sha8, "offset": offset})
        contents.append(stored)
        offset += len(stored)
    body = bytes(head) + b"".join(contents)
    data = body + hashlib.sha256(body).digest() + hmac.new(key, body, hashlib.sha256).digest()
    if len(data) > fpkg.MAX_PACKAGE:
        raise PackagingError(f"{model_id}: {encoding} package of {len(data)} bytes > device limit {fpkg.MAX_PACKAGE}")
    return Package(data=data, model_id=model_id, device_id=device_id, version=version,
                   encoding=encoding, files=files, head_size=len(head))


def model_file(forest, encoding: str) -> tuple[str, bytes]:
    """The package's model file: compact bytes (model.bin) or the paper-like JSON (model.json)."""
    from firmware import isoforest

    if encoding == "compact":
        return "model.bin", forest.to_bytes()
    if encoding == "json":
        return "model.json", json.dumps(isoforest.to_json(forest), separators=(",", ":")).encode()
    raise PackagingError(f"unknown encoding {encoding!r}: one of {sorted(ENCODINGS)}")


def package_sizes(model_id: str, forest, config: dict) -> dict[str, int]:
    """Bytes of the model's whole package in each encoding (what a deploy sends, before delta)."""
    return {enc: build_package(model_id, model_file(forest, enc), config, device_id="sizes", version=1,
                               key=bytes(32), encoding=enc).size for enc in ("compact", "json")}


def package_model(repo, model_id: str, *, device_id: str, version: int, key: bytes,
                  encoding: str = "compact") -> Package:
    """The signed package of a repository model (its config: threshold, window, rate, feature schema, grid)."""
    forest, config = repo.load(model_id)
    return build_package(model_id, model_file(forest, encoding), config, device_id=device_id, version=version,
                         key=key, encoding=encoding)


def next_package(repo, model_id: str, device_id: str, encoding: str = "compact", *,
                 keys: DeviceKeys | None = None, ledger: VersionLedger | None = None) -> Package:
    """A repository model packaged for a device under its key and its next version: what every deploy sends."""
    keys, ledger = keys or DeviceKeys(), ledger or VersionLedger()
    return package_model(repo, model_id, device_id=device_id, version=ledger.next(device_id),
                         key=keys.key(device_id), encoding=encoding)


def deploy_through_link_service(kb, pkg: Package, *, timeout_s: float, episode_id: int | None = None,
                                run_id: str | None = None, on_progress=None) -> dict:
    """Queue pkg in the Knowledge Base for the link service that owns the device's port and wait for its outcome
    (the request's row: status done or failed, error, figures); the deploy is recorded either way."""
    request_id = kb.request_deploy(pkg.device_id, pkg.model_id, pkg.to_blob(), episode_id=episode_id, run_id=run_id)
    if on_progress is not None:
        on_progress({"request": request_id, "what": "queued", "bytes": 0, "total": pkg.size})
    return kb.wait_deploy(request_id, timeout=timeout_s, on_progress=on_progress)


def progress_line(p: dict) -> str:
    """One log line of a deploy's progress as the link service reports it."""
    if p.get("what") == "queued":
        return f"deploy request {p['request']} queued ({p['total']} bytes): waiting for the link service"
    return (f"deploy request {p['request']}: {p.get('what')} {p.get('bytes')}/{p.get('total')} bytes, "
            f"{p.get('frames')} frames, {p.get('retransmissions')} retransmissions, {p.get('link_seconds')} link s, "
            f"ETA {p.get('eta_seconds')} s")


def deploy_outcome_metadata(outcome: dict) -> dict:
    """The recorded deploy's figures as run metadata (what the link service measured on the wire)."""
    fig = outcome["figures"]
    keys = ("installed", "device_champion_id", "device_champion_version", "package_bytes", "stream_bytes",
            "delta_saved_bytes", "wire_bytes", "payload_bytes", "retransmissions", "link_seconds", "occupation")
    rounded = {"link_seconds": 1, "occupation": 3}
    return {"request": outcome["id"], **{k: round(fig[k], rounded[k]) if k in rounded else fig[k]
                                         for k in keys if fig.get(k) is not None}}


def failure_reason(error: str | None) -> str:
    """What a failed deploy's recorded error means: the device did not answer, or refused and why."""
    if not error:
        return ""
    kind, _, detail = error.partition(": ")
    if detail.startswith("device refused"):
        return "the device refused the package: " + detail.partition(": ")[2]
    if kind == "DeployError":
        return "the device did not answer (%s)" % detail
    return error
