"""update_settings_job: a signed settings update (threshold, alarm rule, upload rate, window) for one device, a
list or a cohort, without a package: queued for the link service, recorded in the Knowledge Base."""

import dagster as dg
from pydantic import Field

from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.settings_updates import (SETTINGS, checked_settings, configure_through_link_service,
                                             settings_ledger)

ALL = "all"


class SettingsUpdateConfig(dg.Config):
    """Which devices, and the settings to change (unset: unchanged)."""

    device_id: str = Field(default="", description="one device")
    device_ids: list[str] = Field(default=[], description="a list of devices")
    cohort: str = Field(default="", description="every device whose champion is this model id; 'all': every device")
    threshold: float | None = Field(default=None, description="the champion's decision threshold, in (0, 1)")
    alarm_span_s: int | None = Field(default=None, description="seconds the alarm rule looks back over")
    alarm_raise: float | None = Field(default=None, description="anomalous share of the span that raises an alarm")
    alarm_clear: float | None = Field(default=None, description="share at or below which an alarm clears")
    alarm_min_windows: int | None = Field(default=None, description="windows in the span before an alarm can rise")
    upload_every: int | None = Field(default=None, description="upload every N-th normal window")
    window_ms: int | None = Field(default=None, description="window length; only one the champion's manifest allows")
    health_every: int | None = Field(default=None, description="windows per health report (0: at boot only)")
    revert: bool = Field(default=False, description="go back to the settings before the last update")
    timeout_s: float = Field(default=120.0, gt=0, description="how long to wait for the link service per device")

    def values(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None}


def selected_devices(kb: KnowledgeBase, config: SettingsUpdateConfig) -> list[str]:
    """The devices the config names: device_id, device_ids and the cohort's, in order, each once."""
    chosen = ([config.device_id] if config.device_id else []) + list(config.device_ids)
    if config.cohort == ALL:
        chosen += sorted(set(kb.devices()) | set(kb.health_devices()))
    elif config.cohort:
        chosen += [r.device_id for r in kb.fleet() if r.champion and r.champion.model_id == config.cohort]
    return list(dict.fromkeys(chosen))


def settings_observation(outcome: dict) -> dg.AssetObservation:
    """The settings in force on a device, as metadata of its deployed_champion partition."""
    return dg.AssetObservation(
        "deployed_champion", partition=outcome["device_id"],
        description="settings v%d %s" % (outcome["version"], outcome["status"]),
        metadata={"settings_version": outcome["version"], "settings_status": outcome["status"],
                  "settings_reason": outcome["reason"] or "",
                  "settings_in_force": dg.MetadataValue.json(outcome["in_force"] or {})})


@dg.op(description="Queue the settings update for the selected devices and wait for each device's answer.")
def update_settings(context: dg.OpExecutionContext, config: SettingsUpdateConfig,
                    knowledge_base: KnowledgeBaseResource, gateway: GatewayResource) -> list:
    def fail(why: str) -> dg.Failure:
        context.log.error(why)
        return dg.Failure(description=why)

    values = config.values()
    if not values and not config.revert:
        raise fail("no setting given: name at least one of %s, or revert" % ", ".join(SETTINGS))
    try:
        values = checked_settings(values)
    except ValueError as e:
        raise fail("settings update refused by the gateway: %s" % e) from None
    with knowledge_base.open() as kb:
        devices = selected_devices(kb, config)
        if not devices:
            raise fail("no device selected: set device_id, device_ids or cohort (a champion's model id, or 'all')")
        try:
            outcomes = configure_through_link_service(kb, devices, values, settings_ledger(gateway.root()),
                                                      revert=config.revert, timeout_s=config.timeout_s,
                                                      run_id=context.run.run_id)
        except TimeoutError as e:
            raise fail("settings update: %s" % e) from None
    known = set(context.instance.get_dynamic_partitions(devices_partitions.name))
    for o in outcomes:
        context.log.info("%s: settings v%d %s: %s" % (o["device_id"], o["version"], o["status"], o["reason"]))
        if o["device_id"] in known:
            context.log_event(settings_observation(o))
    summary = [{k: o[k] for k in ("device_id", "version", "status", "reason", "settings", "in_force", "figures")}
               for o in outcomes]
    context.add_output_metadata({"devices": len(outcomes), "applied": sum(o["status"] == "applied" for o in outcomes),
                                 "outcomes": dg.MetadataValue.json(summary),
                                 "link_seconds": max((o["figures"].get("link_seconds", 0.0) for o in outcomes),
                                                     default=0.0)})
    failed = [o for o in outcomes if o["status"] != "applied"]
    if failed:
        raise dg.Failure(description="; ".join("%s: %s (%s)" % (o["device_id"], o["status"], o["reason"])
                                               for o in failed))
    return summary


@dg.job(description="Change run-time settings (threshold, alarm rule, upload rate, window) of one device, a list or "
                    "a cohort without a package: signed per device, checked by the device against its champion.")
def update_settings_job():
    update_settings()
