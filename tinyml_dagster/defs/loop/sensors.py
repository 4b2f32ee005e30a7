"""Sensors of the loop: new device uploads, and champions that reached N_fp false positives."""


import json

import dagster as dg

from tinyml_dagster.defs.loop.assets import EPISODE_TAG, MODEL_TAG
from tinyml_dagster.defs.loop import jobs
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource, PoolResource


def _new_devices(context: dg.SensorEvaluationContext, devices: list[str]) -> list[dg.AddDynamicPartitionsRequest]:
    known = set(context.instance.get_dynamic_partitions(devices_partitions.name))
    new = [d for d in devices if d not in known]
    return [devices_partitions.build_add_request(new)] if new else []


@dg.sensor(job=jobs.pool_decisions_job, minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def device_uploads_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource) -> dg.SensorResult:
    """New uploads in the Knowledge Base: run the pool over them; new devices become partitions."""
    cursor = json.loads(context.cursor) if context.cursor else {"upload_id": 0}
    kb = knowledge_base.open()
    try:
        latest = kb.max_upload_id()
        devices = kb.devices()
    finally:
        kb.close()
    partitions = _new_devices(context, devices)
    if latest <= cursor["upload_id"]:
        return dg.SensorResult(skip_reason="no new uploads since %d" % cursor["upload_id"],
                               dynamic_partitions_requests=partitions)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key="uploads-through-%d" % latest,
                                    tags={"tinyml/uploads": "%d..%d" % (cursor["upload_id"] + 1, latest)})],
        cursor=json.dumps({"upload_id": latest}),
        dynamic_partitions_requests=partitions,
    )


@dg.sensor(job=jobs.replace_champion_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def false_positive_sensor(context: dg.SensorEvaluationContext, knowledge_base: KnowledgeBaseResource,
                          pool: PoolResource) -> dg.SensorResult:
    """A champion with N_fp false positives: deploy the top-ranked candidate, once per episode."""

    kb = knowledge_base.open()
    try:
        due = [e for e in kb.episodes() if e.false_positives >= knowledge_base.n_fp]
        if not due:
            return dg.SensorResult(skip_reason="no champion has %d false positives" % knowledge_base.n_fp)
        try:
            engine = pool.engine()
        except Exception as e:  # no repository yet: nothing to deploy
            return dg.SensorResult(skip_reason="no candidates to deploy: %s" % e)
        requests = []
        for e in due:
            device_id, episode_id = e.device_id, e.episode_id
            run_key = "replace-%s-episode-%d" % (device_id, episode_id)
            d = kb.deploy_for_episode(device_id, episode_id)
            if d is not None and d["status"] == "failed":  # the link failed: try again, a bounded number of times
                if d["attempts"] >= knowledge_base.max_deploy_attempts:
                    context.log.warning("%s: %d deploys of episode %d failed, last: %s"
                                        % (device_id, d["attempts"], episode_id, d["error"]))
                    continue
                run_key += "-retry-%d" % d["attempts"]
            top = engine.top_candidate(kb, exclude=[e.champion])
            requests.append(dg.RunRequest(
                run_key=run_key,
                partition_key=device_id,
                tags={EPISODE_TAG: str(episode_id), MODEL_TAG: top, "tinyml/false_positives": str(e.false_positives)},
            ))
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=_new_devices(context, kb.devices()))
    finally:
        kb.close()
