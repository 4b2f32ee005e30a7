"""Retraining schedule: new candidates from the Knowledge Base's data, as new asset materializations."""

import dagster as dg

from tinyml_dagster.defs.loop import jobs

retrain_schedule = dg.ScheduleDefinition(
    name="retrain_schedule", job=jobs.retrain_job, cron_schedule="0 3 * * *", execution_timezone="UTC",
    description="Nightly: train new candidates on the normal windows stored since the last retraining. Starts "
                "stopped: new candidates change the pool that judges the devices, an operator turns it on.",
)
