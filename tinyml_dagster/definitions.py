"""Dagster entry point: every definition under tinyml_dagster/defs/."""

from pathlib import Path

import dagster as dg

from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.resources import gateway_resources


@dg.definitions
def defs() -> dg.Definitions:
    """Load every asset, check, job, sensor and schedule from the defs folder."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


def defs_for(gateway: GatewayResource) -> dg.Definitions:
    """The same definitions on another gateway's paths and settings (the demo's own data directory, tests)."""
    d = defs()
    return dg.Definitions(assets=d.assets, asset_checks=d.asset_checks, jobs=d.jobs, sensors=d.sensors,
                          schedules=d.schedules, resources={**(d.resources or {}), **gateway_resources(gateway)})
