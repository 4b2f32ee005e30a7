"""Model package on the device: parse, verify (SHA-256, HMAC-SHA256, version, size), extract.

Layout (all integers little-endian), written by tinyml_dagster/deployment_agent.py:

    header   b"TMPK" | format u8 | encoding u8 | version u32 | n_files u8
             | id_len u8 | model_id | dev_len u8 | device_id
    table    n_files x (name_len u8 | name | flags u8 | size u32 | raw_size u32 | sha8)
    contents the files' stored bytes, in table order (flags & 1: zlib-deflated)
    trailer  sha256(header+table+contents) (32) | hmac_sha256(key, header+table+contents) (32)

sha8 is the first 8 bytes of the SHA-256 of a file's stored bytes; it names the file for deltas only,
authenticity rests on the trailer. Runs unchanged on MicroPython 1.27 and CPython.
"""

import hashlib
import struct

MAGIC = b"TMPK"
FORMAT = 1
ENC_COMPACT = 0
ENC_JSON = 1
ENC_MPY = 2  # the champion precompiled (.mpy files), with or without its sources beside
FLAG_DEFLATED = 1
TRAILER_SIZE = 64
SHA8 = 8
MAX_PACKAGE = 512 * 1024  # bytes; an ESP32 (4 MB flash) stages one beside the champion
MAX_FILES = 8
MAX_RAW_FILE = 512 * 1024
_CHUNK = 512


class PackageError(Exception):
    """A package that must not be installed; str() is the refusal reason sent to the gateway."""


def _xor(key, pad):
    out = bytearray(64)
    for i in range(64):
        out[i] = (key[i] if i < len(key) else 0) ^ pad
    return out


class HmacSha256:
    """HMAC-SHA256 (RFC 2104) on hashlib.sha256 alone, since MicroPython has no hmac module."""

    def __init__(self, key):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        self._outer_key = _xor(key, 0x5C)
        self._inner = hashlib.sha256(_xor(key, 0x36))

    def update(self, data):
        self._inner.update(data)

    def digest(self):
        outer = hashlib.sha256(self._outer_key)
        outer.update(self._inner.digest())
        return outer.digest()


def hmac_sha256(key, data):
    h = HmacSha256(key)
    h.update(data)
    return h.digest()


def equal(a, b):
    """Constant-time comparison of two byte strings."""
    if len(a) != len(b):
        return False
    d = 0
    for i in range(len(a)):
        d |= a[i] ^ b[i]
    return d == 0


def _need(buf, pos, n, what):
    if pos + n > len(buf):
        raise PackageError("truncated package: %s" % what)


def parse_header(buf):
    """Header and table of a package from its first bytes: a dict, with 'files' and 'head_size'."""
    _need(buf, 0, 8, "header")
    if bytes(buf[0:4]) != MAGIC:
        raise PackageError("not a package: bad magic")
    if buf[4] != FORMAT:
        raise PackageError("unknown package format %d" % buf[4])
    encoding = buf[5]
    _need(buf, 6, 6, "header")
    version, n_files = struct.unpack_from("<IB", buf, 6)
    if n_files < 1 or n_files > MAX_FILES:
        raise PackageError("bad file count %d" % n_files)
    pos = 11
    names = []
    for what in ("model id", "device id"):
        _need(buf, pos, 1, what)
        n = buf[pos]
        _need(buf, pos + 1, n, what)
        names.append(bytes(buf[pos + 1:pos + 1 + n]).decode())
        pos += 1 + n
    files = []
    offset = 0
    for _ in range(n_files):
        _need(buf, pos, 1, "file table")
        n = buf[pos]
        _need(buf, pos + 1, n + 9 + SHA8, "file table")
        name = bytes(buf[pos + 1:pos + 1 + n]).decode()
        pos += 1 + n
        flags, size, raw_size = struct.unpack_from("<BII", buf, pos)
        pos += 9
        sha8 = bytes(buf[pos:pos + SHA8])
        pos += SHA8
        if raw_size > MAX_RAW_FILE or size > MAX_PACKAGE:
            raise PackageError("oversized file %s (%d bytes)" % (name, raw_size))
        if "/" in name or name.startswith("."):
            raise PackageError("bad file name %s" % name)
        files.append({"name": name, "flags": flags, "size": size, "raw_size": raw_size,
                      "sha8": sha8, "offset": offset})
        offset += size
    return {"encoding": encoding, "version": version, "model_id": names[0], "device_id": names[1],
            "files": files, "head_size": pos, "body_size": pos + offset}


def verify(path, key, device_id, min_version, max_size=MAX_PACKAGE):
    """Verify a package file; return its header dict or raise PackageError with the refusal reason.

    min_version is the highest version this device ever accepted: only newer ones pass (no replay).
    """
    import os

    try:
        size = os.stat(path)[6]
    except OSError:
        raise PackageError("no staged package") from None
    if size > max_size:
        raise PackageError("oversized package: %d bytes > %d" % (size, max_size))
    if size < 12 + TRAILER_SIZE:
        raise PackageError("truncated package: %d bytes" % size)
    with open(path, "rb") as f:
        head = f.read(min(size, 1024))
        info = parse_header(head)
        body = info["body_size"]
        if body + TRAILER_SIZE != size:
            raise PackageError("truncated package: %d bytes, header says %d" % (size, body + TRAILER_SIZE))
        sha = hashlib.sha256()
        mac = HmacSha256(key)
        files = info["files"]
        f.seek(0)
        pos = 0
        buf = bytearray(_CHUNK)
        mv = memoryview(buf)
        # one pass: whole-package hash, signature, and each file's sha8 (fi == -1: header and table)
        for fi in range(-1, len(files)):
            end = info["head_size"] + (files[fi]["offset"] + files[fi]["size"] if fi >= 0 else 0)
            file_sha = hashlib.sha256() if fi >= 0 else None
            while pos < end:
                n = f.readinto(mv[:min(_CHUNK, end - pos)])
                if not n:
                    raise PackageError("truncated package")
                chunk = mv[:n]
                sha.update(chunk)
                mac.update(chunk)
                if file_sha is not None:
                    file_sha.update(chunk)
                pos += n
            if file_sha is not None and not equal(file_sha.digest()[:SHA8], files[fi]["sha8"]):
                raise PackageError("corrupted package: file %s hash mismatch" % files[fi]["name"])
        trailer = f.read(TRAILER_SIZE)
    if not equal(sha.digest(), trailer[:32]):
        raise PackageError("corrupted package: sha256 mismatch")
    if not equal(mac.digest(), trailer[32:]):
        raise PackageError("bad signature: hmac mismatch (unsigned or tampered)")
    if info["device_id"] != device_id:
        raise PackageError("package for device %s, not %s" % (info["device_id"], device_id))
    if info["version"] <= min_version:
        raise PackageError("replayed or old package: version %d <= %d" % (info["version"], min_version))
    info["sha256"] = bytes(trailer[:32])
    return info


def extract(path, info, dest_dir):
    """Write the package's files (inflated) into dest_dir, which must exist; return the names written."""
    names = []
    with open(path, "rb") as f:
        for e in info["files"]:
            f.seek(info["head_size"] + e["offset"])
            out_path = dest_dir + "/" + e["name"]
            with open(out_path, "wb") as out:
                if e["flags"] & FLAG_DEFLATED:
                    _inflate(f, e["size"], e["raw_size"], out, e["name"])
                else:
                    copy_range(f, e["size"], out.write, "file " + e["name"])
            names.append(e["name"])
    return names


def copy_range(src, n, sink, what):
    """Feed the next n bytes of src to sink(chunk), in small chunks; PackageError('truncated <what>') if short."""
    while n:
        chunk = src.read(min(_CHUNK, n))
        if not chunk:
            raise PackageError("truncated " + what)
        sink(chunk)
        n -= len(chunk)


def _inflate(f, size, raw_size, out, name):
    try:
        import deflate  # MicroPython

        # DeflateIO needs a native stream: the file itself, positioned at the entry (it stops at the zlib end)
        stream = deflate.DeflateIO(f, deflate.ZLIB)
        total = 0
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > raw_size:
                raise PackageError("file %s inflates past %d bytes" % (name, raw_size))
            out.write(chunk)
    except ImportError:
        import zlib  # CPython

        d = zlib.decompressobj()
        total = 0
        left = size
        while left:
            chunk = f.read(min(_CHUNK, left))
            left -= len(chunk)
            data = d.decompress(chunk, raw_size + 1 - total)
            total += len(data)
            if total > raw_size:
                raise PackageError("file %s inflates past %d bytes" % (name, raw_size)) from None
            out.write(data)
        data = d.flush()
        total += len(data)
        out.write(data)
    if total != raw_size:
        raise PackageError("file %s inflates to %d bytes, not %d" % (name, total, raw_size))
