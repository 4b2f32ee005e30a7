"""Jobs of the loop: decide uploads, replace a device's champion, retrain the repository.

Each runs its few steps in the run's own process (in_process_executor: no process per step on a small gateway);
the shipped dagster.yaml limits how many run at once by their tinyml/job tag, and replacements go first.
"""

import dagster as dg

from tinyml_dagster.defs.loop import assets

JOB_TAG = "tinyml/job"
REPLACEMENT_PRIORITY = {"dagster/priority": "10"}  # ahead of any queued decision or retraining run
# the half-duplex bus (gateway) a deploy run occupies: dagster.yaml allows one run per value at a time
BUS_TAG = "tinyml/bus"
DEFAULT_BUS = "local"  # a device no gateway id was recorded for: the single gateway's bus

pool_decisions_job = dg.define_asset_job(
    "pool_decisions_job", selection=[assets.device_champions, assets.pool_decisions],
    executor_def=dg.in_process_executor, tags={JOB_TAG: "decide"},
    description="Register the devices' own champions; decide the windows no pool decided yet (the link service "
                "decides as they arrive); device_uploads_sensor runs it only when there is such work.",
)

replace_champion_job = dg.define_asset_job(
    "replace_champion_job", selection=[assets.champion_package, assets.deployed_champion],
    executor_def=dg.in_process_executor, tags={JOB_TAG: "replace", **REPLACEMENT_PRIORITY},
    description="Package the top-ranked candidate for a device, check it, and deploy it through the link service "
                "(false_positive_sensor runs it for an episode; an operator names model and device in its config).",
)

retrain_job = dg.define_asset_job(
    "retrain_job", selection=[assets.retrained_candidate_models],
    executor_def=dg.in_process_executor, tags={JOB_TAG: "retrain"},
    description="Train new candidates from the Knowledge Base's normal windows.",
)
