"""Embedded Model Deployment Agent: build, sign and version the packages that travel to the devices.

A package is the paper's MicroPython module (model, feature script, config.json, __init__.py) in the
container that firmware/package.py parses and verifies. In the `mpy` encodings the champion's runtime module
(firmware/compiled_forest.module_source) and features.py travel precompiled by mpy-cross for the device's
MicroPython (its `sys.implementation._mpy`, which its HELLO reports and the Knowledge Base keeps), so the device
compiles nothing at install or boot; `mpy+compact` keeps the compact model beside them for a device that cannot
load the .mpy. Encoding `auto` is `mpy` for a device whose reported .mpy version the gateway's mpy-cross writes,
else compact.
Per-device HMAC keys come from TINYML_DEVICE_KEYS (``dev-a=<hex>,dev-b=<hex>``) or from key files under
<data>/keys/ (created on first use); never from code.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from firmware import messages as fmsg
from firmware import package as fpkg

from . import settings
from .storage import atomic_write

ENCODINGS = {"compact": fpkg.ENC_COMPACT, "json": fpkg.ENC_JSON, "mpy": fpkg.ENC_MPY, "mpy+compact": fpkg.ENC_MPY}
AUTO = "auto"  # chosen per device from the runtime its HELLO reported (choose_encoding)
RUNTIME_FILE = "champion.mpy"
FEATURES_FILE = "features.mpy"  # the feature set's module, precompiled: the device imports it
# sys.implementation._mpy of the MicroPython 1.27 WASI VM (emulator and tests): .mpy v6.3, no native architecture
VM_SYS_MPY = 774
# MicroPython's native architectures in the order of sys.implementation._mpy's arch field (py/persistentcode.h)
MPY_ARCHS = ("", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp", "xtensa",
             "xtensawin", "rv32imc", "rv64imc")
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


def feature_script(feature_set: str = "paper") -> bytes:
    """The device's feature extraction script of a feature set: a copy of its firmware module."""
    from tinyml_dagster.features import feature_set as named_set

    return named_set(feature_set).script()


@dataclass(frozen=True)
class MpyTarget:
    """What .mpy a device imports: its sys.implementation._mpy decoded (format version, sub-version, architecture)."""

    version: int = 6
    sub_version: int = 3
    arch: str = ""  # "" bytecode only (the VM); "xtensawin" an ESP32

    @classmethod
    def from_sys_mpy(cls, value: int) -> MpyTarget:
        """The target of a device reporting sys.implementation._mpy == value (774 for the 1.27 VM)."""
        arch = (value >> 10) & 0x3F
        if not 0 < value & 0xFF <= 6 or arch >= len(MPY_ARCHS):
            raise PackagingError(f"sys.implementation._mpy {value}: not a MicroPython .mpy version (e.g. 774)")
        return cls(value & 0xFF, (value >> 8) & 3, MPY_ARCHS[arch])

    def mpy_cross_args(self) -> list[str]:
        """mpy-cross options: the installed 1.27 binary for v6.3, its archived binaries for older versions."""
        args = [] if (self.version, self.sub_version) == (6, 3) else [
            "-b", f"{self.version}.{self.sub_version}" if self.sub_version else str(self.version)]
        return args + ([f"-march={self.arch}"] if self.arch else [])


GATEWAY_MPY = MpyTarget()  # what the installed mpy-cross (MicroPython 1.27) writes without -b: .mpy v6.3


def device_mpy_target(sys_mpy: int | None) -> MpyTarget:
    """The .mpy target of a device that reported sys_mpy (its sys.implementation._mpy); the 1.27 VM's (bytecode
    .mpy v6.3) for a device that reported none."""
    return MpyTarget.from_sys_mpy(sys_mpy or VM_SYS_MPY)


def choose_encoding(sys_mpy: int | None) -> tuple[str, str]:
    """(encoding, why) for a device that reported sys_mpy in its HELLO (None: it never did): mpy when the gateway's
    mpy-cross writes that .mpy version (for its architecture), else compact."""
    if sys_mpy is None:
        return "compact", "the device has not reported its MicroPython's .mpy version (no HELLO with it yet)"
    if sys_mpy == 0:
        return "compact", "the device's runtime imports no .mpy (sys.implementation._mpy 0)"
    try:
        target = MpyTarget.from_sys_mpy(sys_mpy)
    except PackagingError as e:
        return "compact", str(e)
    if (target.version, target.sub_version) != (GATEWAY_MPY.version, GATEWAY_MPY.sub_version):
        return "compact", (f"the device's .mpy v{target.version}.{target.sub_version} is not the gateway's "
                           f"mpy-cross v{GATEWAY_MPY.version}.{GATEWAY_MPY.sub_version}")
    return "mpy", f"the device imports .mpy v{target.version}.{target.sub_version} ({target.arch or 'bytecode'})"


@functools.lru_cache(maxsize=16)  # features.py is the same for every package of a target
def mpy_compile(source: bytes, name: str, target: MpyTarget) -> bytes:
    """The .mpy of a module's source for the target, by mpy-cross; PackagingError with its message on failure."""
    with tempfile.TemporaryDirectory(prefix="tinyml-mpy-") as tmp:
        src, out = Path(tmp) / f"{name}.py", Path(tmp) / f"{name}.mpy"
        src.write_bytes(source)
        r = subprocess.run([sys.executable, "-m", "mpy_cross", *target.mpy_cross_args(), "-s", f"{name}.py",
                            "-o", str(out), str(src)], capture_output=True, text=True)
        if r.returncode or not out.is_file():
            why = (r.stderr or r.stdout).replace(str(src), f"{name}.py")
            why = why.replace("Traceback (most recent call last):", "")
            raise PackagingError(f"mpy-cross {name}.py for {target}: {' '.join(why.split())[-500:]}")
        return out.read_bytes()


def runtime_mpy(forest, target: MpyTarget) -> bytes:
    """The champion's runtime module (the bytecode the device would compile from the compact bytes) as a .mpy."""
    from firmware import compiled_forest

    return mpy_compile(compiled_forest.module_source(forest).encode(), RUNTIME_FILE[:-4], target)


def _check_device_id(device_id: str) -> str:
    if not _DEVICE_ID.match(device_id or ""):
        raise PackagingError(f"bad device id {device_id!r}: 1-64 of [A-Za-z0-9_.-]")
    return device_id


class DeviceKeys:
    """The per-device HMAC keys the gateway holds: TINYML_DEVICE_KEYS, else <root>/<device>.key files."""

    def __init__(self, root: Path | None = None, env: str | None = None) -> None:
        self.root = Path(root) if root is not None else settings.data_dir() / "keys"
        self._env: dict[str, bytes] = {}
        spec = os.environ.get("TINYML_DEVICE_KEYS", "") if env is None else env
        for i, item in enumerate(filter(None, (s.strip() for s in spec.split(",")))):
            name, sep, hexkey = item.partition("=")
            where = f"TINYML_DEVICE_KEYS item {i + 1} ({name!r})"
            if not sep or not _DEVICE_ID.match(name):
                raise PackagingError(f"{where}: expected <device>=<hex>, device id 1-64 of [A-Za-z0-9_.-] exactly")
            if not re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,}", hexkey):
                raise PackagingError(f"{where}: key must be hex digits only, >= 16 bytes")
            if name in self._env:
                raise PackagingError(f"{where}: device {name} is listed twice")
            self._env[name] = bytes.fromhex(hexkey)

    def key(self, device_id: str) -> bytes:
        """The device's key: from TINYML_DEVICE_KEYS when it is set (an id not listed is an error), else its key
        file, created with a new random key (mode 0600) on first use."""
        _check_device_id(device_id)
        if device_id in self._env:
            return self._env[device_id]
        if self._env:  # the keys come from the environment: never a new random key for an id not listed
            raise PackagingError(f"device {device_id!r} has no key in TINYML_DEVICE_KEYS (listed: "
                                 f"{', '.join(sorted(self._env))})")
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

    def existing(self, device_id: str) -> bytes | None:
        """The device's key if the gateway holds one (TINYML_DEVICE_KEYS or its key file), never a new one."""
        if device_id in self._env:
            return self._env[device_id]
        if self._env or not _DEVICE_ID.match(device_id or "") or not (self.root / f"{device_id}.key").exists():
            return None
        return self.key(device_id)

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
    offer_mac: bytes = b""  # the DEPLOY_OFFER's MAC under the device's key (firmware.messages.seal)

    def offer_body(self) -> bytes:
        """The DEPLOY_OFFER body before its MAC: sha256, size, version, file count, then sha8 + size per file."""
        return struct.pack(fmsg.OFFER_FORMAT, self.sha256, self.size, self.version, len(self.files)) + b"".join(
            struct.pack(fmsg.OFFER_FILE_FORMAT, e["sha8"], e["size"]) for e in self.files)

    def offer(self) -> bytes:
        """The authenticated DEPLOY_OFFER body."""
        return self.offer_body() + self.offer_mac

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
                "encoding": self.encoding, "head_size": self.head_size, "offer_mac": self.offer_mac.hex(),
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
            head["offer_mac"] = bytes.fromhex(head.get("offer_mac", ""))
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
    model = raw.get(RUNTIME_FILE, raw.get("model.bin", raw.get("model.json", 0)))
    inflate_window = 2**ZLIB_WBITS if pkg.encoding != "json" else 0
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
    runtime: bytes | None = None,
    target: MpyTarget | None = None,
) -> Package:
    """Sign a package of (model file, features.py, config.json, __init__.py) for one device and version.

    The mpy encodings need runtime (the champion's .mpy, see runtime_mpy) and ship features.py as features.mpy
    compiled for target, which the device imports; `mpy` leaves the model file out, `mpy+compact` keeps it beside
    (a device that cannot import the .mpy files compiles it and uses its firmware's own feature module).
    """
    if encoding not in ENCODINGS:
        raise PackagingError(f"unknown encoding {encoding!r}: one of {sorted(ENCODINGS)}")
    _check_device_id(device_id)
    if not (0 < len(model_id.encode()) < 256):
        raise PackagingError(f"bad model id {model_id!r}")
    if not (0 < version < 2**32):
        raise PackagingError(f"version {version} out of range 1..2**32-1")
    if len(key) < 16:
        raise PackagingError("HMAC key shorter than 16 bytes")
    features = features_src if features_src is not None else feature_script(config.get("feature_set", "paper"))
    cfg = {k: v for k, v in config.items() if k not in ("model_file", "runtime_file", "features_file")}
    cfg.update(model_id=model_id, version=version, encoding=encoding)
    sources = [model_file, ("features.py", features)]
    if encoding.startswith("mpy"):
        if runtime is None:
            raise PackagingError(f"{model_id}: encoding {encoding} needs the champion's .mpy (runtime_mpy)")
        features_mpy = mpy_compile(features, "features", target or MpyTarget())
        sources = [(RUNTIME_FILE, runtime), (FEATURES_FILE, features_mpy)]
        if encoding == "mpy+compact":
            sources.append(model_file)
        cfg.update(runtime_file=RUNTIME_FILE, features_file=FEATURES_FILE)
    if encoding != "mpy":
        cfg["model_file"] = model_file[0]
    raw_files = sources + [
        ("config.json", json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()),
        ("__init__.py", INIT_PY.encode()),
    ]
    compress = encoding != "json"
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
    pkg = Package(data=data, model_id=model_id, device_id=device_id, version=version,
                  encoding=encoding, files=files, head_size=len(head))
    pkg.offer_mac = fmsg.mac(key, fmsg.TAG_OFFER, device_id, pkg.offer_body())
    return pkg


def model_file(forest, encoding: str) -> tuple[str, bytes]:
    """The package's model file: compact bytes (model.bin; the mpy encodings' source) or the paper-like JSON."""
    from firmware import isoforest

    if encoding in ("compact", "mpy", "mpy+compact"):
        return "model.bin", forest.to_bytes()
    if encoding == "json":
        return "model.json", json.dumps(isoforest.to_json(forest), separators=(",", ":")).encode()
    raise PackagingError(f"unknown encoding {encoding!r}: one of {sorted(ENCODINGS)}")


def forest_package(model_id: str, forest, config: dict, *, device_id: str, version: int, key: bytes,
                   encoding: str = "compact", sys_mpy: int | None = None) -> Package:
    """A forest's signed package in an encoding; the mpy ones compiled for the device's reported runtime (sys_mpy,
    see device_mpy_target)."""
    target = device_mpy_target(sys_mpy) if encoding.startswith("mpy") else None
    return build_package(model_id, model_file(forest, encoding), config, device_id=device_id, version=version,
                         key=key, encoding=encoding, target=target,
                         runtime=runtime_mpy(forest, target) if target else None)


def package_sizes(model_id: str, forest, config: dict, encodings: tuple[str, ...] = ("compact", "json")
                  ) -> dict[str, int]:
    """Bytes of the model's whole package in each encoding (what a deploy sends, before delta; mpy: for the VM)."""
    return {enc: forest_package(model_id, forest, config, device_id="sizes", version=1, key=bytes(32),
                                encoding=enc).size for enc in encodings}


def package_model(repo, model_id: str, *, device_id: str, version: int, key: bytes,
                  encoding: str = "compact", sys_mpy: int | None = None) -> Package:
    """The signed package of a repository model (its config: threshold, window, rate, feature schema, grid)."""
    forest, config = repo.load(model_id)
    return forest_package(model_id, forest, config, device_id=device_id, version=version, key=key,
                          encoding=encoding, sys_mpy=sys_mpy)


def next_package(repo, model_id: str, device_id: str, encoding: str = "compact", *,
                 keys: DeviceKeys | None = None, ledger: VersionLedger | None = None,
                 sys_mpy: int | None = None) -> Package:
    """A repository model packaged for a device under its key and its next version: what every deploy sends.
    sys_mpy: what the device's HELLO reported (KnowledgeBase.device_sys_mpy); encoding auto chooses by it."""
    if encoding == AUTO:
        encoding = choose_encoding(sys_mpy)[0]
    if encoding not in ENCODINGS:
        raise PackagingError(f"unknown encoding {encoding!r}: one of {sorted(ENCODINGS)} or {AUTO}")
    keys, ledger = keys or DeviceKeys(), ledger or VersionLedger()
    return package_model(repo, model_id, device_id=device_id, version=ledger.next(device_id),
                         key=keys.key(device_id), encoding=encoding, sys_mpy=sys_mpy)


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
