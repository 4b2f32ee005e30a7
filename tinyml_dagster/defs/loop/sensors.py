"""Sensors of the loop: new device uploads, and champions that reached N_fp false positives."""


import json
import time

import dagster as dg

from tinyml_dagster.defs.loop.assets import (EPISODE_TAG, MODEL_TAG, POOL_DECISIONS, decisions_metadata,
                                             reported_through)
from tinyml_dagster.defs.loop import jobs
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource, PoolResource
from tinyml_dagster.pool_inference import HYSTERESIS_POINTS, cohort_candidates, next_champion, pool_ids


def _new_devices(context: dg.SensorEvaluationContext, devices: list[str]) -> list[dg.AddDynamicPartitionsRequest]:
    known = set(context.instance.get_dynamic_partitions(devices_partitions.name))
    new = [d for d in devices if d not in known]
    return [devices_partitions.build_add_request(new)] if new else []


UNDECIDED_GRACE_S = 5.0  # the link service's pool decides an upload within a second of its commit

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def run_in_flight(instance: dg.DagsterInstance, job_name: str) -> bool:
    """A run of the job is queued or running."""
    return instance.get_runs_count(dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT)) > 0


@dg.sensor(job=jobs.pool_decisions_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Reports the link service's pool decisions as pool_decisions materialisations (no run); "
                       "launches pool_decisions_job only for windows no pool decided or devices' own champions to "
                       "register, never while one is queued or running. New devices become partitions.")
def device_uploads_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource,
                          pool: PoolResource) -> dg.SensorResult:
    """What the pool decided since the last report, as an asset event; a run only when there is work."""
    with knowledge_base.open() as kb:
        partitions = _new_devices(context, kb.devices())
        through, reported = kb.decided_through(), reported_through(context.instance)
        events = []
        if through > reported:
            events.append(dg.AssetMaterialization(
                POOL_DECISIONS, description="decided by the link service's pool",
                metadata=decisions_metadata(kb, reported, through, pool_ids(pool.repository()),
                                            knowledge_base.n_fp)))
        undecided = kb.count_undecided(received_before=time.time() - UNDECIDED_GRACE_S)
        unregistered = kb.count_unregistered_model_uploads()
        latest = kb.max_upload_id()
    requests = []
    if (undecided or unregistered) and not run_in_flight(context.instance, jobs.pool_decisions_job.name):
        requests.append(dg.RunRequest(run_key="decide-through-%d" % latest,
                                      tags={"tinyml/undecided": str(undecided),
                                            "tinyml/device_models": str(unregistered)}))
    if not (events or requests):
        return dg.SensorResult(skip_reason="nothing new since upload %d" % reported,
                               dynamic_partitions_requests=partitions)
    return dg.SensorResult(run_requests=requests, asset_events=events, dynamic_partitions_requests=partitions)


@dg.sensor(job=jobs.replace_champion_job, minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING,
           description="A champion with N_fp false positives (TINYML_N_FP): replace_champion_job for its device, "
                       "once per episode (a failed link is retried a bounded number of times), at high priority.")
def false_positive_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource,
                          pool: PoolResource) -> dg.SensorResult:
    """A champion with N_fp false positives: deploy the top-ranked candidate, once per episode."""

    kb = knowledge_base.open()
    try:
        due = [e for e in kb.episodes() if e.false_positives >= knowledge_base.n_fp]
        if not due:
            return dg.SensorResult(skip_reason="no champion has %d false positives" % knowledge_base.n_fp)
        repo = pool.repository()
        if not pool_ids(repo):
            return dg.SensorResult(skip_reason="no candidates to deploy: the model repository has none yet")
        requests = []
        for e in due:
            device_id, episode_id = e.device_id, e.episode_id
            cohort = kb.device_cohort(device_id)
            members = cohort_candidates(repo, cohort)
            if not members:
                context.log.warning("%s: no candidate of its cohort %s in the repository" % (device_id, cohort))
                continue
            run_key = "replace-%s-episode-%d" % (device_id, episode_id)
            d = kb.deploy_for_episode(device_id, episode_id)
            if d is not None and d["status"] == "failed":  # the link failed: try again, a bounded number of times
                if d["attempts"] >= knowledge_base.max_deploy_attempts:
                    context.log.warning("%s: %d deploys of episode %d failed, last: %s"
                                        % (device_id, d["attempts"], episode_id, d["error"]))
                    continue
                run_key += "-retry-%d" % d["attempts"]
            sizes = {m: (repo.get(m).get("hyperparameters") or {}).get("n_trees", 0) for m in members}
            top = next_champion(kb, members, e.champion, sizes=sizes)
            if top is None:
                context.log.info("%s: %s keeps its place, no candidate ranks %d points above it"
                                 % (device_id, e.champion, HYSTERESIS_POINTS))
                continue
            requests.append(dg.RunRequest(
                run_key=run_key,
                partition_key=device_id,
                tags={EPISODE_TAG: str(episode_id), MODEL_TAG: top, "tinyml/false_positives": str(e.false_positives),
                      # one deploy at a time per bus: dagster.yaml's tag concurrency limit per value of this tag
                      jobs.BUS_TAG: kb.device_gateway(device_id) or jobs.DEFAULT_BUS, **jobs.REPLACEMENT_PRIORITY},
            ))
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=_new_devices(context, kb.devices()))
    finally:
        kb.close()


ALARM_ASSET = dg.AssetKey("deployed_champion")  # device-partitioned: an alarm is metadata of its device's partition


def alarm_observations(alarms: list[dict]) -> list[dg.AssetObservation]:
    """One observation per alarm event on its device's partition: start, end, peak score, feature set, champion."""
    out = []
    for a in alarms:
        out.append(dg.AssetObservation(
            asset_key=ALARM_ASSET, partition=a["device_id"],
            metadata={"alarm_id": a["id"], "alarm_state": "cleared" if a["end"] is not None else "active",
                      "alarm_start": dg.MetadataValue.timestamp(a["start"]),
                      **({"alarm_end": dg.MetadataValue.timestamp(a["end"])} if a["end"] is not None else {}),
                      "alarm_peak_score": round(float(a["peak_score"]), 4), "alarm_feature_set": a["feature_set"],
                      "alarm_champion": f"{a['champion_id'] or ''} v{a['champion_version']}"}))
    return out


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def alarm_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource) -> dg.SensorResult:
    """Alarm events the devices raised or cleared since the last tick, as metadata of the devices' partitions
    (hook a notification to this sensor, or to the observations of deployed_champion)."""
    cursor = json.loads(context.cursor) if context.cursor else {"received_at": 0.0}
    kb = knowledge_base.open()
    try:
        new = [a for a in kb.alarms() if a["received_at"] > cursor["received_at"]]
        devices = kb.devices()
    finally:
        kb.close()
    if not new:
        return dg.SensorResult(skip_reason="no alarm events since the last tick",
                               dynamic_partitions_requests=_new_devices(context, devices))
    for a in new:
        context.log.warning("alarm %s on %s: peak score %.3f (%s, champion %s)", "cleared" if a["end"] else "raised",
                            a["device_id"], a["peak_score"], a["feature_set"], a["champion_id"])
    return dg.SensorResult(asset_events=alarm_observations(new),
                           cursor=json.dumps({"received_at": max(a["received_at"] for a in new)}),
                           dynamic_partitions_requests=_new_devices(context, devices))
