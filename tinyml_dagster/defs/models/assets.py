"""The model repository asset: the paper's 20 candidates (4 bearings x 10..50 trees), trained on 60% of life."""

from datetime import timedelta

import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.defs.data.partitions import feature_partition_key
from tinyml_dagster.deployment_agent import package_sizes
from tinyml_dagster.features import PAPER_FEATURE_SET, load_feature_windows
from tinyml_dagster.report.inline import bar_plot
from tinyml_dagster.training import PSI, THRESHOLD, TREE_COUNTS, default_target_fa, train_candidates

from .resources import ModelRepositoryResource


class CandidateModelsConfig(dg.Config):
    """Training parameters of the candidate models."""

    rate_hz: int = Field(default=settings.DEFAULT_RATE_HZ,
                         description="feature windows of this sampling rate "
                                     "(paper: 500 Hz; default 2 kHz, see docs/results.md)")
    bearings: list[int] = Field(default=list(settings.BEARINGS), description="one model family per bearing")
    tree_counts: list[int] = Field(default=list(TREE_COUNTS), description="forest sizes (paper: 10..50)")
    psi: int = Field(default=PSI, description="subsample size per tree (paper: 100); height limit ceil(log2 psi)")
    threshold: float = Field(default=THRESHOLD, description="anomaly when score > threshold (paper: 0.6), when "
                             "thresholds are not calibrated")
    feature_set: str = Field(default=PAPER_FEATURE_SET, description="the feature set the models are trained on "
                             "(\"paper\", as the paper's figures, or \"wear\", the default for new deployments and the "
                             "loop's demo)")
    target_fa: float | None = Field(default=None, description="calibrate each model's threshold so that this share "
                                    "of healthy windows it did not grow on are anomalous (cross-fitted scores of "
                                    "its training windows); none: fixed threshold for the paper's set, 0.002 for "
                                    "any other")
    seed: int = Field(default=0, description="base seed; each model's seed derives from it, bearing and trees")


@dg.asset(group_name="models", deps=["feature_windows"], kinds={"python", "json"}, owners=["team:models"],
          freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(days=30)))
def candidate_models(context: dg.AssetExecutionContext, config: CandidateModelsConfig,
                     model_repository: ModelRepositoryResource) -> dg.MaterializeResult:
    """Candidate Isolation Forests in the model repository, one per bearing and forest size."""
    missing = [str(feature_partition_key(config.rate_hz, b)) for b in config.bearings
               if not settings.feature_path(config.rate_hz, b).exists()]
    if missing:
        raise dg.Failure(description="feature_windows partitions %s are not materialised: materialise them, or set "
                                     "bearings to those that are" % ", ".join(missing))
    repo = model_repository.open()
    windows = load_feature_windows(config.rate_hz, feature_set=config.feature_set)
    trained = train_candidates(windows, repo, rate_hz=config.rate_hz, bearings=config.bearings,
                               tree_counts=config.tree_counts, psi=config.psi, threshold=config.threshold,
                               seed=config.seed, lineage={"run_id": context.run.run_id},
                               target_fa=config.target_fa if config.target_fa is not None
                               else default_target_fa(config.feature_set), feature_set=config.feature_set)
    ids = [t.model_id for t in trained]
    repo.set_candidates(ids, note={"run_id": context.run.run_id, "rate_hz": config.rate_hz})
    context.log.info("%d candidate models in %s", len(ids), repo.root)
    rows = ["| model | bearing | trees | version | bytes | package compact B | package json B | threshold "
            "| anomaly rate (train) | anomaly rate (later) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in trained:
        sizes = package_sizes(t.model_id, *repo.load(t.model_id))
        rows.append(f"| `{t.model_id}` | {t.bearing} | {t.n_trees} | {repo.get(t.model_id)['version']} | "
                    f"{t.size_bytes} | {sizes['compact']} | {sizes['json']} | {t.threshold:.4f} | "
                    f"{t.anomaly_rate_train:.3f} | "
                    f"{t.anomaly_rate_later:.3f} |")
    return dg.MaterializeResult(metadata={
        "models": len(ids),
        "model_ids": dg.MetadataValue.json(ids),
        "candidates": dg.MetadataValue.md("\n".join(rows)),
        "train_seconds": round(sum(t.train_seconds for t in trained), 3),
        "largest_model_bytes": max(t.size_bytes for t in trained),
        "repository": dg.MetadataValue.path(str(repo.root)),
        "anomaly_rates": bar_plot(
            "Share of windows each candidate flags", "anomalous windows", [t.model_id for t in trained],
            {"training windows": [t.anomaly_rate_train for t in trained],
             "later windows": [t.anomaly_rate_later for t in trained]},
            "this run's candidates at their thresholds: the training share is the calibrated false-alarm rate; "
            "later windows include the degradation"),
    })
