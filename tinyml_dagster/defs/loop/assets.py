"""The Tiny-MLOps loop's assets: pool decisions and ranking, the next champion's package, its deployment, retraining."""


import json
import time
from datetime import timedelta

import dagster as dg
from pydantic import Field

from tinyml_dagster.defs.deploy.link import deploy_or_fail
from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import DeviceBudgetResource, KnowledgeBaseResource, PoolResource
from tinyml_dagster.deployment_agent import (AUTO, Package, choose_encoding, deploy_outcome_metadata, footprint,
                                            next_package)
from tinyml_dagster.knowledge_base import KnowledgeBaseError
from tinyml_dagster.link import LinkTiming, estimate_deploy
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.model_repository import add_device_champion
from tinyml_dagster.report.inline import line_plot
from tinyml_dagster.storage import atomic_write
from tinyml_dagster.training import retrain

EPISODE_TAG = "tinyml/episode"
HEALTH_TAG = "tinyml/health"  # a run the device's health started (device_health_sensor): the limits it crossed
OWNERS = ["team:gateway"]
# streaming devices are decided continuously: an hour without a decision means the devices or the link are silent
DECISIONS_FRESHNESS = dg.FreshnessPolicy.time_window(warn_window=timedelta(minutes=15), fail_window=timedelta(hours=1))
MODEL_TAG = "tinyml/model_id"


def ranking_markdown(ranking: list[tuple], limit: int = 20) -> str:
    lines = ["| rank | model | points | agree | disagree |", "|---:|---|---:|---:|---:|"]
    for i, (m, p, a, d) in enumerate(ranking[:limit], start=1):
        lines.append("| %d | %s | %d | %d | %d |" % (i, m, p, a, d))
    return "\n".join(lines)


POOL_DECISIONS = dg.AssetKey("pool_decisions")


def reported_through(instance: dg.DagsterInstance) -> int:
    """The last upload id pool_decisions' latest materialisation reported (0 before the first)."""
    event = instance.get_latest_materialization_event(POOL_DECISIONS)
    mat = event.asset_materialization if event else None
    value = mat.metadata.get("through_upload_id") if mat else None
    return int(value.value) if value is not None else 0


def decisions_metadata(kb: KnowledgeBase, after: int, through: int, pool_ids: list[str], n_fp: int) -> dict:
    """What the pool decided on the uploads after..through, the totals, and the ranking of the pool's members."""
    new = kb.decisions_between(after, through)
    ranking = kb.ranking(pool_ids)
    return {
        "through_upload_id": through,
        "decided": new.decided,
        "pool_anomalies": new.anomalies,
        "false_positives": new.false_positives,
        "windows_decided_total": kb.count_decisions(),
        "false_positives_total": kb.count_false_positives(),
        "uploads_lost": kb.lost_uploads(),
        "uploads_refused": sum(kb.refusals().values()),
        "uploads_quarantined": len(kb.quarantined()),
        "pool_size": len(pool_ids),
        "top_candidate": ranking[0][0] if ranking else "",
        "ranking": dg.MetadataValue.md(ranking_markdown(ranking)),
        "devices_over_n_fp": sum(1 for e in kb.episodes() if e.false_positives >= n_fp),
    }


@dg.asset(group_name="loop", deps=["candidate_models"], kinds={"sqlite"}, owners=OWNERS,
          freshness_policy=DECISIONS_FRESHNESS)
def pool_decisions(context: dg.AssetExecutionContext, knowledge_base: KnowledgeBaseResource,
                   pool: PoolResource) -> dg.MaterializeResult:
    """The pool's majority decision on every uploaded window, the champions' false positives, the ranking.

    The link service decides every upload as it arrives; device_uploads_sensor reports its decisions here. A run
    only decides what no pool decided (a link service started without one)."""
    after = reported_through(context.instance)
    with knowledge_base.open() as kb:
        engine = pool.engine()
        s = engine.decide_pending(kb)
        context.log.info("pool of %d decided %d windows (%d anomalies, %d false positives)",
                         len(engine.model_ids), s.decided, s.anomalies, s.false_positives)
        return dg.MaterializeResult(metadata=decisions_metadata(kb, after, kb.decided_through(), engine.model_ids,
                                                                knowledge_base.n_fp))


@dg.asset(group_name="loop", deps=["candidate_models"], kinds={"sqlite"}, owners=OWNERS)
def device_champions(context: dg.AssetExecutionContext, knowledge_base: KnowledgeBaseResource,
                     pool: PoolResource) -> dg.MaterializeResult:
    """Champions the devices trained themselves, entered in the repository with their lineage."""
    with knowledge_base.open() as kb:
        added, quarantined = [], []
        uploads = kb.model_uploads()
        if uploads:
            repo = pool.repository()
            for upload_id, device_id, blob, wfrom, wto, _ in uploads:
                try:
                    model_id = add_device_champion(repo, device_id, blob, wfrom, wto, upload_id)
                except KnowledgeBaseError as e:  # one device's garbage must not keep the others' unregistered
                    context.log.warning("%s: champion upload %d quarantined: %s", device_id, upload_id, e)
                    kb.quarantine([upload_id], "device_champions", str(e))
                    quarantined.append(upload_id)
                    continue
                kb.register_model_upload(upload_id, model_id)
                added.append(model_id)
        if added:
            context.log.info("registered the devices' own champions: %s", ", ".join(added))
        return dg.MaterializeResult(metadata={"registered_now": len(added), "registered": dg.MetadataValue.json(added),
                                              "quarantined_now": len(quarantined)})


class ChampionPackageConfig(dg.Config):
    """Which candidate to package (empty: the top-ranked one that the device does not run)."""

    model_id: str = Field(default="", description="repository model id; empty: top of the ranking")
    encoding: str = Field(default=AUTO, description="package encoding: auto (mpy when the device's HELLO reported "
                          "a .mpy version the gateway compiles for, else compact), compact, json, mpy or mpy+compact "
                          "(see deploy_champion_job)")
    confirm_device: str = Field(default="", description="an operator's deploy outside a false-positive episode: "
                                "the device id (the partition), with model_id set, confirms it")


def authorise_deploy(context: dg.AssetExecutionContext, config: ChampionPackageConfig) -> str:
    """Why this run may deploy to its device: a false-positive episode, or a config naming model and device."""
    device_id = context.partition_key
    episode = context.run.tags.get(EPISODE_TAG)
    if episode:
        return "false-positive episode %s" % episode
    if context.run.tags.get(HEALTH_TAG):
        return "device health: %s" % context.run.tags[HEALTH_TAG]
    if config.model_id and config.confirm_device == device_id:
        return "operator's deploy of %s" % config.model_id
    raise dg.Failure(description=(
        "nothing deployed to %s: a deploy runs for a false-positive episode (false_positive_sensor's runs) or with "
        "a config naming the model and confirming the device: {model_id: <model>, confirm_device: %s}"
        % (device_id, device_id)))



@dg.asset(
    group_name="loop",
    partitions_def=devices_partitions,
    deps=[pool_decisions],
    kinds={"micropython"},
    owners=OWNERS,
    check_specs=[
        dg.AssetCheckSpec("fits_device_budget", asset="champion_package", blocking=True,
                          description="the package fits the device's flash and heap budget"),
        dg.AssetCheckSpec("link_time_within_deadline", asset="champion_package", blocking=True,
                          description="its estimated link time fits the configured deadline"),
    ],
)
def champion_package(context: dg.AssetExecutionContext, config: ChampionPackageConfig, gateway: GatewayResource,
                     knowledge_base: KnowledgeBaseResource, pool: PoolResource,
                     device_budget: DeviceBudgetResource) -> dg.MaterializeResult:
    """The next champion for a device, packaged and signed (the paper's Release phase checks it)."""
    device_id = context.partition_key
    why = authorise_deploy(context, config)
    with knowledge_base.open() as kb:
        current = kb.current_champion(device_id)
        model_id = config.model_id or context.run.tags.get(MODEL_TAG) or pool.engine().top_candidate(
            kb, exclude=[current.model_id] if current else [])
        sys_mpy = kb.device_sys_mpy(device_id)
    if config.encoding == AUTO:
        context.log.info("encoding for %s: %s (%s)", device_id, *choose_encoding(sys_mpy))
    pkg = next_package(gateway.repository(), model_id, device_id, config.encoding, keys=gateway.device_keys(),
                       ledger=gateway.version_ledger(), sys_mpy=sys_mpy)
    out = gateway.packages_dir(device_id)
    atomic_write(out / ("%s-v%d.pkg" % (model_id, pkg.version)), pkg.data)
    atomic_write(out / "next.blob", pkg.to_blob())
    atomic_write(out / "next.json", json.dumps({"run_id": context.run.run_id, "why": why}).encode())
    fits = footprint(pkg)
    link = estimate_deploy(pkg.size, len(pkg.files), pkg.model_id, pkg.version, device_budget.timing())
    context.log.info("packaged %s v%d (%s) for %s: %d bytes, flash %d, heap %d, link %.1f s", model_id, pkg.version,
                     pkg.encoding, device_id, pkg.size, fits.flash_bytes, fits.heap_bytes, link.seconds)
    return dg.MaterializeResult(
        metadata={"model_id": model_id, "version": pkg.version, "encoding": pkg.encoding, "package_bytes": pkg.size,
                  "files": dg.MetadataValue.json(pkg.file_sizes()), "flash_bytes": fits.flash_bytes,
                  "heap_bytes": fits.heap_bytes, "estimated_link_seconds": round(link.seconds, 1)},
        check_results=[
            dg.AssetCheckResult(
                check_name="fits_device_budget",
                passed=fits.flash_bytes <= device_budget.flash_bytes and fits.heap_bytes <= device_budget.heap_bytes,
                metadata={"flash_bytes": fits.flash_bytes, "flash_budget": device_budget.flash_bytes,
                          "heap_bytes": fits.heap_bytes, "heap_budget": device_budget.heap_bytes}),
            dg.AssetCheckResult(
                check_name="link_time_within_deadline", passed=link.seconds <= device_budget.deadline_s,
                metadata={"estimated_link_seconds": round(link.seconds, 1), "deadline_s": device_budget.deadline_s}),
        ],
    )


@dg.asset(group_name="loop", partitions_def=devices_partitions, deps=[champion_package], kinds={"sqlite"},
          owners=OWNERS)
def deployed_champion(context: dg.AssetExecutionContext, gateway: GatewayResource,
                      knowledge_base: KnowledgeBaseResource) -> dg.MaterializeResult:
    """The new champion running on the device: queued for the link service, which owns the port, and awaited."""
    device_id = context.partition_key
    out = gateway.packages_dir(device_id)
    made = json.loads((out / "next.json").read_text()) if (out / "next.json").is_file() else {}
    if made.get("run_id") != context.run.run_id:
        raise dg.Failure(description="nothing deployed to %s: deployed_champion deploys only the package "
                                     "champion_package made in the same run" % device_id)
    pkg = Package.from_blob((out / "next.blob").read_bytes())
    with knowledge_base.open() as kb:
        current = kb.current_champion(device_id)
        episode = context.run.tags.get(EPISODE_TAG)
        episode_id = int(episode) if episode else (current.episode_id if current else None)
        t_nfp = kb.nth_false_positive_time(episode_id, knowledge_base.n_fp) if episode_id else None
        outcome = deploy_or_fail(kb, pkg, knowledge_base.deploy_timeout_s, context, episode_id=episode_id)
        gateway_id, cohort = kb.device_gateway(device_id), kb.device_cohort(device_id)
    meta = deploy_outcome_metadata(outcome)
    replacement_s = (outcome["finished_at"] - t_nfp) if t_nfp else None
    return dg.MaterializeResult(metadata={
        "model_id": pkg.model_id, "version": pkg.version, **meta,
        # whichever gateway the device hangs on, its cohort chose the candidates
        "gateway": gateway_id or "", "cohort": dg.MetadataValue.json(cohort or {}),
        "replacement_seconds": round(replacement_s, 1) if replacement_s is not None else None,
        "deploy_progress": deploy_progress_plot(pkg, outcome),
    })


def deploy_progress_plot(pkg: Package, outcome: dict) -> dg.MetadataValue:
    """Bytes through the link over link time as the link service reported them, beside a clean line's estimate."""
    reports = [(p["link_seconds"], p["bytes"]) for p in outcome["progress"] if p.get("what") != "queued"]
    stream = outcome["figures"].get("stream_bytes") or pkg.size
    if outcome["figures"].get("link_seconds") is not None:
        reports.append((outcome["figures"]["link_seconds"], stream))
    estimate = estimate_deploy(stream, len(pkg.files), pkg.model_id, pkg.version, LinkTiming()).seconds
    return line_plot("Deploy of %s v%d to %s" % (pkg.model_id, pkg.version, pkg.device_id), "link seconds",
                     "bytes delivered", {"reported": ([t for t, _ in reports], [b for _, b in reports]),
                                         "clean-line estimate": ([0.0, estimate], [0, stream])},
                     "this deploy's progress reports; the estimate counts every frame, acknowledgement and "
                     "turnaround at %d baud" % LinkTiming().baud)


class RetrainConfig(dg.Config):
    """Retraining of the repository from the Knowledge Base's normal windows."""

    min_windows: int = Field(default=256, description="fewer new normal windows than this: skip")
    n_trees: list[int] = Field(default=[10, 20, 30, 40, 50], description="one model per forest size")
    psi: int = Field(default=100, description="subsampling size")
    seed: int = Field(default=7, description="training seed")


@dg.asset(group_name="loop", deps=["candidate_models"], kinds={"sqlite"}, owners=OWNERS)
def retrained_candidate_models(context: dg.AssetExecutionContext, config: RetrainConfig,
                               knowledge_base: KnowledgeBaseResource, pool: PoolResource) -> dg.MaterializeResult:
    """New candidates trained on the normal windows the devices uploaded since the last retraining."""
    with knowledge_base.open() as kb:
        since = kb.last_retrained_through()
        through = kb.max_upload_id()
        repo = pool.repository()
        candidates = repo.candidate_ids()
        feature_set = repo.config(candidates[0]).get("feature_set", "paper") if candidates else "paper"
        df = kb.normal_windows(since, through, feature_set)
        if len(df) < config.min_windows:
            context.log.info("%d new normal windows (< %d): nothing to retrain", len(df), config.min_windows)
            return dg.MaterializeResult(metadata={"new_windows": len(df), "trained": 0})
        started = time.time()
        span = {"kb_uploads": [since + 1, through], "windows": len(df)}
        ids = retrain(df, repo, feature_set=feature_set, tree_counts=config.n_trees, psi=config.psi,
                      seed=config.seed, training=span,
                      lineage={**span, "devices": sorted(df["device_id"].unique().tolist()),
                               "run_id": context.run.run_id})
        # the retrained models join the pool's candidates
        repo.set_candidates(list(dict.fromkeys(repo.candidate_ids() + ids)), note={"retrained_by": context.run.run_id})
        kb.record_retraining(since, through, len(df), ids, run_id=context.run.run_id, started_at=started)
        return dg.MaterializeResult(metadata={"new_windows": len(df), "trained": len(ids),
                                              "model_ids": dg.MetadataValue.json(ids)})
