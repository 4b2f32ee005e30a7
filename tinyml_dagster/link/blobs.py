"""The champion package as one blob in the Knowledge Base's deploy queue: u32 head length | JSON head | package bytes."""

from __future__ import annotations

import json
import struct

from tinyml_dagster.knowledge_base import KnowledgeBaseError


def package_to_blob(pkg) -> bytes:
    """A deployment_agent.Package as bytes for the KB's deploy queue (JSON head + the package bytes)."""
    head = {"model_id": pkg.model_id, "device_id": pkg.device_id, "version": pkg.version,
            "encoding": pkg.encoding, "head_size": pkg.head_size, "offer_mac": pkg.offer_mac.hex(),
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
    head["offer_mac"] = bytes.fromhex(head.get("offer_mac", ""))
    return Package(data=bytes(blob[4 + n:]), **head)


def parse_device_champion(blob: bytes):
    """(config dict, Forest) of a champion a device uploaded: u16 length | config.json | compact forest bytes;
    KnowledgeBaseError naming what is wrong with a blob that is not one."""
    from firmware import isoforest

    try:
        if len(blob) < 2:
            raise ValueError("%d bytes, shorter than its length field" % len(blob))
        (n,) = struct.unpack_from("<H", blob, 0)
        if 2 + n > len(blob):
            raise ValueError("config.json of %d bytes runs past the blob's %d" % (n, len(blob)))
        cfg = json.loads(bytes(blob[2:2 + n]))
        if not isinstance(cfg, dict) or not isinstance(cfg.get("grid"), list):
            raise ValueError("config.json is not an object with a grid")
        grid = [tuple(float(v) for v in g) for g in cfg["grid"]]
        if any(len(g) != 2 for g in grid):
            raise ValueError("config.json grid entries must be [low, high] pairs")
        threshold = cfg.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError("config.json threshold must be a number")
        forest = isoforest.load(bytes(blob[2 + n:]), grid)
    except (ValueError, TypeError, struct.error, RecursionError) as e:
        raise KnowledgeBaseError("device champion blob: %s" % e) from None
    return cfg, forest
