"""The fleet view: per device, what runs on it, since when, why, and how its last deploy went.

fleet_sensor reads the Knowledge Base and reports only what changed: an observation on the device's partition of
deployed_champion when that device changed, and a new materialisation of the `fleet` table when any device did.
"""

import hashlib
import json
import time

import dagster as dg

from tinyml_dagster.defs.loop.assets import OWNERS
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource
from tinyml_dagster.deployment_agent import failure_reason
from tinyml_dagster.knowledge_base import FleetDevice

SOURCES = {"device": "device-trained", "reported": "device-trained (not yet in the repository)",
           "deploy": "deployed", "manual": "set by hand"}

fleet = dg.AssetSpec(
    "fleet", group_name="loop", owners=OWNERS, kinds={"sqlite"},
    description="One row per device: champion, since when, source, false positives since install, episode, "
                "previous champion, last deploy (status, bytes, link time, reason). fleet_sensor materialises it "
                "when something changed.",
)


def monitor_view(kb, device_id: str) -> dict:
    """The device's settings and health columns (tinyml_dagster/defs/monitor)."""
    from tinyml_dagster.defs.monitor.health import monitor_view as view

    return view(kb, device_id)


def _utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"


def last_deploy_reason(d: dict | None, previous: str) -> str:
    """Why the last deploy happened and what the device said, in words."""
    if d is None:
        return "no deploy yet"
    if d["status"] == "failed":
        return failure_reason(d["error"])
    if d["status"] in ("pending", "running"):
        return "waiting for the link service" if d["status"] == "pending" else "on the wire"
    why = ("replaced %s after false-positive episode %d" % (previous, d["episode_id"]) if d["episode_id"]
           else "operator's deploy")
    said = d["figures"].get("reason")
    return why + ("; device: %s" % said if said else "")


def device_view(row: FleetDevice) -> dict:
    """One device's fleet row as plain, rounded values (the keys read as a sentence in the UI)."""
    c, d = row.champion, row.last_deploy
    fig = (d or {}).get("figures") or {}
    previous = row.previous.model_id if row.previous else "-"
    link = fig.get("link_seconds")
    return {
        "champion": c.model_id if c else "-",
        "champion_since": _utc(c.since if c else None),
        "source": SOURCES.get(c.source, c.source) if c else "-",
        "false_positives_since_install": row.false_positives,
        "episode": c.episode_id if c else 0,
        "previous_champion": previous,
        "last_deploy": "%s (attempt %d)" % (d["status"], d["attempts"]) if d else "none",
        "last_deploy_model": d["model_id"] if d else "-",
        "last_deploy_bytes": int(fig.get("package_bytes") or 0),
        "last_deploy_link_s": round(float(link), 1) if link is not None else 0.0,
        "last_deploy_reason": last_deploy_reason(d, previous),
    }


def fleet_markdown(views: dict[str, dict]) -> str:
    """The fleet as a markdown table, one device per row."""
    lines = ["| device | champion | since | source | false positives | episode | previous | last deploy | bytes "
             "| link s | reason | settings | inference ms | free heap | resets | mJ/window |",
             "|---|---|---|---|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for device, v in sorted(views.items()):
        lines.append("| %s | %s | %s | %s | %d | %d | %s | %s | %d | %.1f | %s | v%d | %.2f | %d | %d | %.3f |" % (
            device, v["champion"], v["champion_since"], v["source"], v["false_positives_since_install"],
            v["episode"], v["previous_champion"], v["last_deploy"], v["last_deploy_bytes"],
            v["last_deploy_link_s"], v["last_deploy_reason"], v.get("settings_version", 0),
            v.get("inference_ms_mean", 0.0), v.get("free_heap_bytes", 0), v.get("resets", 0),
            v.get("energy_mj_per_window", 0.0)))
    return "\n".join(lines)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="The fleet view: an observation on a device's deployed_champion partition when that device "
                       "changed (champion, false positives, deploy), and the fleet table when any device did. "
                       "Never launches a run.")
def fleet_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource) -> dg.SensorResult:
    """What changed in the fleet since the last tick, as asset events."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    with knowledge_base.open() as kb:
        views = {row.device_id: {**device_view(row), **monitor_view(kb, row.device_id)} for row in kb.fleet()}
    known = set(context.instance.get_dynamic_partitions(devices_partitions.name))
    events, seen = [], {}
    for device, view in views.items():
        seen[device] = _digest(view)
        if device in known and cursor.get(device) != seen[device]:
            events.append(dg.AssetObservation("deployed_champion", partition=device, metadata=view,
                                              description="%s runs %s" % (device, view["champion"])))
        elif device not in known:
            seen[device] = cursor.get(device)  # reported once device_uploads_sensor made it a partition
    seen["fleet"] = _digest(views)
    if seen["fleet"] != cursor.get("fleet"):
        events.append(dg.AssetMaterialization("fleet", metadata={
            "devices": len(views), "table": dg.MetadataValue.md(fleet_markdown(views))}))
    if not events:
        return dg.SensorResult(skip_reason="the fleet did not change", cursor=json.dumps(seen))
    return dg.SensorResult(asset_events=events, cursor=json.dumps(seen))
