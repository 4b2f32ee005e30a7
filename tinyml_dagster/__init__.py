"""tinyml_dagster: the gateway side of Tiny-MLOps, orchestrated by Dagster."""
