"""model_packages: both encodings' package sizes (and link time at 2,400 baud) for every repository candidate."""

import dagster as dg

from tinyml_dagster.defs.models.resources import ModelRepositoryResource
from tinyml_dagster.deployment_agent import package_sizes
from tinyml_dagster.link import LinkTiming
from tinyml_dagster.report.inline import bar_plot


@dg.asset(group_name="deploy", deps=["candidate_models"], owners=["team:gateway"],
          description="Package sizes of every candidate per encoding (compact default, paper-like json, "
                      "precompiled mpy).")
def model_packages(
    context: dg.AssetExecutionContext, model_repository: ModelRepositoryResource
) -> dg.MaterializeResult:
    repo = model_repository.open()
    ids = repo.candidate_ids() or repo.ids()
    if not ids:
        raise dg.Failure(f"model repository {repo.root} has no models: materialize candidate_models first")
    timing = LinkTiming()
    rows = []
    for model_id in ids:
        forest, cfg = repo.load(model_id)
        sizes = package_sizes(model_id, forest, cfg, ("compact", "json", "mpy"))
        rows.append((model_id, forest.n_trees, sizes["compact"], sizes["json"], sizes["mpy"]))
    table = ("| model | trees | compact B | json B | json/compact | compact wire s | mpy B (precompiled) |\n"
             "|---|---|---|---|---|---|---|\n") + "".join(
        f"| {m} | {t} | {c} | {j} | {j / c:.1f}x | {c * timing.byte_s:.1f} | {p} |\n" for m, t, c, j, p in rows)
    context.log.info(f"{len(rows)} candidates packaged in both encodings")
    return dg.MaterializeResult(metadata={
        "candidates": len(rows),
        "packages": dg.MetadataValue.md(table),
        "compact_bytes": {m: c for m, _, c, _, _ in rows},
        "json_bytes": {m: j for m, _, _, j, _ in rows},
        "mpy_bytes": {m: p for m, *_, p in rows},
        "compact_bytes_total": sum(r[2] for r in rows),
        "json_bytes_total": sum(r[3] for r in rows),
        "link_seconds": bar_plot(
            "Link time of each candidate's package at %d baud" % timing.baud, "seconds on the wire",
            [m for m, *_ in rows], {"compact": [c * timing.byte_s for _, _, c, _, _ in rows],
                                    "json": [j * timing.byte_s for _, _, _, j, _ in rows],
                                    "mpy": [p * timing.byte_s for *_, p in rows]},
            "package bytes times the wire's seconds per byte, before framing and turnarounds"),
    })
