"""Jobs of the loop: decide uploads, replace a device's champion, retrain the repository."""

import dagster as dg

from tinyml_dagster.defs.loop import assets

pool_decisions_job = dg.define_asset_job(
    "pool_decisions_job", selection=[assets.device_champions, assets.pool_decisions],
    description="Score new uploads with the pool, update the ranking, register devices' champions.",
)

replace_champion_job = dg.define_asset_job(
    "replace_champion_job", selection=[assets.champion_package, assets.deployed_champion],
    description="Package the top-ranked candidate for a device, check it, and deploy it through the link service.",
)

retrain_job = dg.define_asset_job(
    "retrain_job", selection=[assets.retrained_candidate_models],
    description="Train new candidates from the Knowledge Base's normal windows.",
)
