"""The paper's Monitor phase in Dagster: the devices' health on their partitions and in the fleet view, and a
sensor that starts the loop (retrain or redeploy) for a device whose inference time, heap or resets cross limits."""

import json

import dagster as dg
from pydantic import Field

from tinyml_dagster import health
from tinyml_dagster.defs.loop import jobs
from tinyml_dagster.defs.loop.assets import HEALTH_TAG
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.report.inline import line_plot

ACTIONS = ("retrain", "redeploy", "none")
HISTORY = 200  # health reports a view or a check looks at, per device
TREND = 30  # reports in a view's small plot


class HealthLimitsResource(dg.ConfigurableResource):
    """Limits of a device's health, and what the loop does when one is crossed."""

    inference_ms_max: float = Field(default=100.0, gt=0, description="mean inference time of a reporting period")
    free_heap_min_bytes: int = Field(default=16 * 1024, ge=0, description="free MicroPython heap")
    resets_max: int = Field(default=3, ge=0, description="resets allowed within resets_window_s")
    resets_window_s: float = Field(default=24 * 3600.0, gt=0, description="the window the resets are counted over")
    action: str = Field(default="retrain", description="retrain (retrain_job), redeploy (replace_champion_job for "
                                                       "the device) or none (flag only)")

    def limits(self) -> health.HealthLimits:
        return health.HealthLimits(self.inference_ms_max, self.free_heap_min_bytes, self.resets_max,
                                   self.resets_window_s)


def monitor_view(kb: KnowledgeBase, device_id: str, history: list[dict] | None = None) -> dict:
    """A device's settings in force and latest health (also a row of the fleet table); `history`: its recent health
    reports when the caller has read them already."""
    history = kb.health_history(device_id, limit=TREND) if history is None else history[-TREND:]
    last = history[-1] if history else None
    periods = [h for h in history if h["windows"]]
    latest = periods[-1] if periods else last
    settings = kb.settings_in_force(device_id) or {}
    return {
        "settings_version": int(last["settings_version"]) if last else 0,
        "threshold": float(settings.get("threshold", 0.0)),
        "settings_in_force": json.dumps(settings, sort_keys=True) if settings else "-",
        "inference_ms_mean": round(latest["inference_ms_mean"], 2) if latest else 0.0,
        "inference_ms_max": round(latest["inference_ms_max"], 2) if latest else 0.0,
        "feature_ms_mean": round(latest["feature_ms_mean"], 2) if latest else 0.0,
        "energy_mj_per_window": latest["energy_mj_per_window"] if latest else 0.0,
        "free_heap_bytes": int(last["free_heap_bytes"]) if last else 0,
        "uptime_s": int(last["uptime_s"]) if last else 0,
        "resets": int(last["resets"]) if last else 0,
        "last_reset_cause": health.RESET_CAUSES.get(last["reset_cause"], "?") if last else "-",
        "retransmits_last_period": int(last["retransmits"]) if last else 0,
        "link_errors_last_period": int(last["link_errors"]) if last else 0,
    }


def health_plot(device_id: str, periods: list[dict]) -> dg.MetadataValue:
    """Feature-extraction and inference time of the recent reporting periods (a reset does not bend the axis)."""
    hours = [(h["received_at"] - periods[-1]["received_at"]) / 3600 for h in periods]
    return line_plot("%s: time per window" % device_id, "hours before the latest report", "ms (period mean)",
                     {"feature extraction": (hours, [h["feature_ms_mean"] for h in periods]),
                      "inference": (hours, [h["inference_ms_mean"] for h in periods])},
                     "measured by the device's own clock, one point per health report (the last %d)" % TREND)


def action_request(action: str, device_id: str, reasons: list[str], health_id: int) -> dg.RunRequest | None:
    """The run that starts the loop for an unhealthy device (None: flag only)."""
    tags = {HEALTH_TAG: "; ".join(reasons)[:200]}
    key = "health-%s-%d" % (device_id, health_id)
    if action == "retrain":
        return dg.RunRequest(run_key=key, job_name=jobs.retrain_job.name, tags=tags)
    if action == "redeploy":
        return dg.RunRequest(run_key=key, job_name=jobs.replace_champion_job.name, partition_key=device_id,
                             tags={**tags, **jobs.REPLACEMENT_PRIORITY})
    return None


SENSOR_DESCRIPTION = ("New health reports as observations of the devices' deployed_champion partitions; a device "
                      "whose inference time, free heap or resets cross the health limits is flagged once per "
                      "crossing and starts the configured action (retrain or redeploy).")


@dg.sensor(jobs=[jobs.retrain_job, jobs.replace_champion_job], minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING, description=SENSOR_DESCRIPTION)
def device_health_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource,
                         health_limits: HealthLimitsResource) -> dg.SensorResult:
    """Health since the last tick; a run for each device that just became unhealthy."""
    if health_limits.action not in ACTIONS:
        raise dg.Failure(description="health_limits.action %r: one of %s" % (health_limits.action, ACTIONS))
    cursor = json.loads(context.cursor) if context.cursor else {"seen": {}, "flagged": {}}
    known = set(context.instance.get_dynamic_partitions(devices_partitions.name))
    events, requests = [], []
    with knowledge_base.open() as kb:
        for device_id in kb.health_devices():
            history = kb.health_history(device_id, limit=HISTORY)
            newest = history[-1]["id"]
            if newest == cursor["seen"].get(device_id):
                continue
            cursor["seen"][device_id] = newest
            problems = health.problems(history, health_limits.limits())
            view = monitor_view(kb, device_id, history)
            view["health"] = "; ".join(problems) or "ok"
            periods = [h for h in history[-TREND:] if h["windows"]]
            if len(periods) > 1:
                view["health_plot"] = health_plot(device_id, periods)
            if device_id in known:
                events.append(dg.AssetObservation("deployed_champion", partition=device_id, metadata=view,
                                                  description="%s health: %s" % (device_id, view["health"])))
            was = cursor["flagged"].get(device_id, False)
            cursor["flagged"][device_id] = bool(problems)
            if problems and not was:
                context.log.warning("%s unhealthy: %s (action: %s)", device_id, view["health"], health_limits.action)
                req = action_request(health_limits.action, device_id, problems, newest)
                if req is not None:
                    requests.append(req)
    if not (events or requests):
        return dg.SensorResult(skip_reason="no new health reports", cursor=json.dumps(cursor))
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=json.dumps(cursor))
