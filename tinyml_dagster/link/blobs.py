"""A device's self-trained champion as it arrives in CHAMPION_CHUNKs, checked before anything trusts it."""

from __future__ import annotations

import json
import struct

from firmware import isoforest, messages
from tinyml_dagster.knowledge_base import KnowledgeBaseError


def parse_device_champion(blob: bytes) -> tuple[dict, isoforest.Forest]:
    """(config dict, Forest) of a champion blob (messages.pack_champion); KnowledgeBaseError naming what is wrong
    with a blob that is not one."""
    try:
        config_json, compact = messages.unpack_champion(blob)
        cfg = json.loads(config_json)
        if not isinstance(cfg, dict) or not isinstance(cfg.get("grid"), list):
            raise ValueError("config.json is not an object with a grid")
        grid = [tuple(float(v) for v in g) for g in cfg["grid"]]
        if any(len(g) != 2 for g in grid):
            raise ValueError("config.json grid entries must be [low, high] pairs")
        threshold = cfg.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError("config.json threshold must be a number")
        forest = isoforest.load(compact, grid)
    except (ValueError, TypeError, struct.error, RecursionError) as e:
        raise KnowledgeBaseError("device champion blob: %s" % e) from None
    return cfg, forest
