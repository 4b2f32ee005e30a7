"""Dagster entry point: every definition under tinyml_dagster/defs/."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    """Load every asset, check, job, sensor and schedule from the defs folder."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
