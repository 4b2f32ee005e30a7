"""The champion package as one blob in the Knowledge Base's deploy queue: u32 head length | JSON head | package bytes."""

from __future__ import annotations

import json
import struct

from tinyml_dagster.knowledge_base import KnowledgeBaseError


def package_to_blob(pkg) -> bytes:
    """A deployment_agent.Package as bytes for the KB's deploy queue (JSON head + the package bytes)."""
    head = {"model_id": pkg.model_id, "device_id": pkg.device_id, "version": pkg.version,
            "encoding": pkg.encoding, "head_size": pkg.head_size,
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
    return Package(data=bytes(blob[4 + n:]), **head)
