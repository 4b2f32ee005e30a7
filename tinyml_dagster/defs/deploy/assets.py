"""model_packages: both encodings' package sizes (and link time at 2,400 baud) for every repository candidate."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.deployment_agent import package_sizes
from tinyml_dagster.link import LinkTiming
from tinyml_dagster.report import plot_metadata


class ModelPackagesConfig(dg.Config):
    models_dir: str = Field(default="", description="model repository root; empty: settings.models_dir()")


@dg.asset(group_name="deploy", deps=["candidate_models"], owners=["team:gateway"],
          description="Package sizes of every candidate in both encodings (compact default, paper-like json).")
def model_packages(context: dg.AssetExecutionContext, config: ModelPackagesConfig) -> dg.MaterializeResult:
    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(Path(config.models_dir) if config.models_dir else settings.models_dir())
    ids = repo.candidate_ids() or repo.ids()
    if not ids:
        raise dg.Failure(f"model repository {repo.root} has no models: materialize candidate_models first")
    rows = []
    for model_id in ids:
        forest, cfg = repo.load(model_id)
        sizes = package_sizes(model_id, forest, cfg)
        rows.append((model_id, forest.n_trees, sizes["compact"], sizes["json"]))
    table = "| model | trees | compact B | json B | json/compact | compact wire s |\n|---|---|---|---|---|---|\n" + "".join(
        f"| {m} | {t} | {c} | {j} | {j / c:.1f}x | {c * LinkTiming().byte_s:.1f} |\n" for m, t, c, j in rows)
    context.log.info(f"{len(rows)} candidates packaged in both encodings")
    return dg.MaterializeResult(metadata={
        "candidates": len(rows),
        "packages": dg.MetadataValue.md(table),
        "compact_bytes": {m: c for m, _, c, _ in rows},
        "json_bytes": {m: j for m, _, _, j in rows},
        "compact_bytes_total": sum(r[2] for r in rows),
        "json_bytes_total": sum(r[3] for r in rows),
        **plot_metadata("fig4a_occupation.png", "fig4b_deploy_time.png"),  # once `make report` ran
    })
