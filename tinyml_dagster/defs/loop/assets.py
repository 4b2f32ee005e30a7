"""The Tiny-MLOps loop's assets: pool decisions and ranking, the next champion's package, its deployment, retraining."""


import json
import math
import time
from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field

from firmware import messages
from tinyml_dagster import settings
from tinyml_dagster.defs.loop.partitions import devices_partitions
from tinyml_dagster.defs.loop.resources import DeviceBudgetResource, KnowledgeBaseResource, PoolResource
from tinyml_dagster.report import plot_metadata

EPISODE_TAG = "tinyml/episode"
MODEL_TAG = "tinyml/model_id"


def ranking_markdown(ranking: list[tuple], limit: int = 20) -> str:
    lines = ["| rank | model | points | agree | disagree |", "|---:|---|---:|---:|---:|"]
    for i, (m, p, a, d) in enumerate(ranking[:limit], start=1):
        lines.append("| %d | %s | %d | %d | %d |" % (i, m, p, a, d))
    return "\n".join(lines)


@dg.asset(group_name="loop", deps=["candidate_models"], kinds={"sqlite"})
def pool_decisions(context: dg.AssetExecutionContext, knowledge_base: KnowledgeBaseResource,
                   pool: PoolResource) -> dg.MaterializeResult:
    """The pool's majority decision on every uploaded window, the champions' false positives, the ranking."""
    kb = knowledge_base.open()
    try:
        engine = pool.engine()
        s = engine.decide_pending(kb)
        ranking = kb.ranking(engine.model_ids)
        episodes = kb.episodes()
        context.log.info("pool of %d decided %d windows (%d anomalies, %d false positives)",
                         len(engine.model_ids), s.decided, s.anomalies, s.false_positives)
        return dg.MaterializeResult(metadata={
            "decided_now": s.decided,
            "anomalies_now": s.anomalies,
            "false_positives_now": s.false_positives,
            "windows_total": kb.count_uploads() - kb.count_uploads(kind="champion"),
            "false_positives_total": kb.count_false_positives(),
            "pool_size": len(engine.model_ids),
            "top_candidate": ranking[0][0] if ranking else "",
            "ranking": dg.MetadataValue.md(ranking_markdown(ranking)),
            "devices_over_n_fp": sum(1 for e in episodes if e[3] >= knowledge_base.n_fp),
        })
    finally:
        kb.close()


@dg.asset(group_name="loop", deps=["candidate_models"], kinds={"sqlite"})
def device_champions(context: dg.AssetExecutionContext, knowledge_base: KnowledgeBaseResource,
                     pool: PoolResource) -> dg.MaterializeResult:
    """Champions the devices trained themselves, entered in the repository with their lineage; who runs what."""
    kb = knowledge_base.open()
    try:
        added = []
        uploads = kb.model_uploads()
        if uploads:
            repo = pool.repository()
            for upload_id, device_id, blob, wfrom, wto, _ in uploads:
                model_id = add_device_champion(repo, device_id, blob, wfrom, wto, upload_id)
                kb.register_model_upload(upload_id, model_id)
                added.append(model_id)
        rows = ["| device | champion | since | source |", "|---|---|---|---|"]
        for dev in kb.devices():
            c = kb.current_champion(dev)
            if c:
                rows.append("| %s | %s | %s | %s |" % (dev, c[1], time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c[3])), c[2]))
        return dg.MaterializeResult(metadata={
            "registered_now": len(added),
            "registered": dg.MetadataValue.json(added),
            "champions": dg.MetadataValue.md("\n".join(rows)),
        })
    finally:
        kb.close()


def parse_device_champion(blob: bytes):
    """(config dict, Forest) of a champion a device uploaded: u16 length | config.json | compact forest bytes."""
    import struct

    from firmware import isoforest

    (n,) = struct.unpack_from("<H", blob, 0)
    cfg = json.loads(blob[2:2 + n])
    forest = isoforest.load(bytes(blob[2 + n:]), [tuple(g) for g in cfg["grid"]])
    return cfg, forest


def add_device_champion(repo, device_id: str, blob: bytes, window_from, window_to, upload_id: int) -> str:
    """Put a device's self-trained champion in the repository with its lineage (device, windows' time range)."""
    cfg, forest = parse_device_champion(blob)
    lineage = {"source": "device", "device_id": device_id, "device_model_id": cfg.get("model_id"),
               "device_version": cfg.get("version"), "window_from": window_from, "window_to": window_to,
               "kb_upload_id": upload_id}
    return repo.add(forest, lineage=lineage, threshold=cfg.get("threshold"),
                    feature_set=cfg.get("feature_set", "paper"), feature_params=cfg.get("feature_params") or None)


class ChampionPackageConfig(dg.Config):
    """Which candidate to package (empty: the top-ranked one that the device does not run)."""

    model_id: str = Field(default="", description="repository model id; empty: top of the ranking")
    encoding: str = Field(default="compact", description="package encoding: compact or json")


def estimate_link_seconds(stream_bytes: int, budget: DeviceBudgetResource) -> float:
    """Link time of a deploy: fragments in windows of 32, one ack per window, a turnaround per direction change."""
    frag = messages.DEPLOY_FRAG
    n_frag = max(1, math.ceil(stream_bytes / frag))
    data_wire = stream_bytes + n_frag * (6 + messages.HEADER_SIZE + messages.CHECK_SIZE + 2)
    windows = math.ceil(n_frag / 32)
    control_wire = 4 * 80 + windows * 30  # offer/have/commit/result + acks
    byte_s = 10.0 / budget.baud
    return (data_wire + control_wire) * byte_s + (2 * windows + 6) * budget.turnaround_s


def packages_dir(device_id: str) -> Path:
    return settings.data_dir() / "packages" / device_id


@dg.asset(
    group_name="loop",
    partitions_def=devices_partitions,
    deps=[pool_decisions],
    kinds={"micropython"},
    check_specs=[
        dg.AssetCheckSpec("fits_device_budget", asset="champion_package", blocking=True,
                          description="the package fits the device's flash and heap budget"),
        dg.AssetCheckSpec("link_time_within_deadline", asset="champion_package", blocking=True,
                          description="its estimated link time fits the configured deadline"),
    ],
)
def champion_package(context: dg.AssetExecutionContext, config: ChampionPackageConfig,
                     knowledge_base: KnowledgeBaseResource, pool: PoolResource,
                     device_budget: DeviceBudgetResource) -> dg.MaterializeResult:
    """The next champion for a device, packaged and signed (the paper's Release phase checks it)."""
    from tinyml_dagster.deployment_agent import DeviceKeys, VersionLedger, build_package
    from tinyml_dagster.storage import atomic_write
    from tinyml_dagster.link_service import package_to_blob

    device_id = context.partition_key
    kb = knowledge_base.open()
    try:
        engine = pool.engine()
        current = kb.current_champion(device_id)
        model_id = config.model_id or context.run.tags.get(MODEL_TAG) or engine.top_candidate(
            kb, exclude=[current[1]] if current else [])
    finally:
        kb.close()
    repo = pool.repository()
    forest = repo.load_forest(model_id)
    threshold = float(repo.get(model_id).get("threshold") or 0.6)
    stored = repo.config(model_id)
    # the model's own threshold, and its feature set when not the paper's (the device switches its extraction)
    features = {k: stored[k] for k in ("feature_set", "feature_set_version", "feature_params") if k in stored}
    pkg = build_package(model_id, ("model.bin", forest.to_bytes()),
                        {"grid": [list(g) for g in forest.grid], "threshold": threshold, **features},
                        device_id=device_id, version=VersionLedger().next(device_id),
                        key=DeviceKeys().key(device_id), encoding=config.encoding)
    blob = package_to_blob(pkg)
    out = packages_dir(device_id)
    atomic_write(out / ("%s-v%d.pkg" % (model_id, pkg.version)), pkg.data)
    atomic_write(out / "next.blob", blob)
    sizes = pkg.file_sizes()
    raw_sizes = {f["name"]: f["raw_size"] for f in pkg.files}
    # flash: the staged package plus the extracted champion and previous champion
    flash = pkg.size + 2 * sum(raw_sizes.values())
    # heap: the compact model held in RAM, the inflate window, and the scoring buffers
    heap = raw_sizes.get("model.bin", 0) + 4096 + 2048
    link_s = estimate_link_seconds(pkg.size, device_budget)
    context.log.info("packaged %s for %s: %d bytes, flash %d, heap %d, link %.1f s", model_id, device_id,
                     pkg.size, flash, heap, link_s)
    return dg.MaterializeResult(
        metadata={"model_id": model_id, "version": pkg.version, "package_bytes": pkg.size,
                  "files": dg.MetadataValue.json(sizes), "flash_bytes": flash, "heap_bytes": heap,
                  "estimated_link_seconds": round(link_s, 1)},
        check_results=[
            dg.AssetCheckResult(
                check_name="fits_device_budget", passed=flash <= device_budget.flash_bytes and heap <= device_budget.heap_bytes,
                metadata={"flash_bytes": flash, "flash_budget": device_budget.flash_bytes,
                          "heap_bytes": heap, "heap_budget": device_budget.heap_bytes}),
            dg.AssetCheckResult(
                check_name="link_time_within_deadline", passed=link_s <= device_budget.deadline_s,
                metadata={"estimated_link_seconds": round(link_s, 1), "deadline_s": device_budget.deadline_s}),
        ],
    )


@dg.asset(group_name="loop", partitions_def=devices_partitions, deps=[champion_package], kinds={"sqlite"})
def deployed_champion(context: dg.AssetExecutionContext, knowledge_base: KnowledgeBaseResource) -> dg.MaterializeResult:
    """The new champion running on the device: queued for the link service, which owns the port, and awaited."""
    from tinyml_dagster.link_service import package_from_blob

    device_id = context.partition_key
    blob = (packages_dir(device_id) / "next.blob").read_bytes()
    pkg = package_from_blob(blob)
    kb = knowledge_base.open()
    try:
        current = kb.current_champion(device_id)
        episode = context.run.tags.get(EPISODE_TAG)
        episode_id = int(episode) if episode else (current[0] if current else None)
        t_nfp = kb.nth_false_positive_time(episode_id, knowledge_base.n_fp) if episode_id else None
        rid = kb.request_deploy(device_id, pkg.model_id, blob, episode_id=episode_id, run_id=context.run.run_id)
        context.log.info("deploy request %d: %s v%d (%d bytes) to %s, waiting for the link service",
                         rid, pkg.model_id, pkg.version, pkg.size, device_id)
        d = _await_deploy(context, kb, rid, knowledge_base.deploy_timeout_s)
        if d["status"] != "done":
            raise dg.Failure(description="deploy %d of %s to %s failed: %s" % (rid, pkg.model_id, device_id, d["error"]),
                             metadata={"request": rid})
        fig = d["figures"]
        replacement_s = (d["finished_at"] - t_nfp) if t_nfp else None
        return dg.MaterializeResult(metadata={
            "model_id": pkg.model_id, "version": pkg.version, "request": rid,
            "link_seconds": fig.get("link_seconds"), "occupation": fig.get("occupation"),
            "wire_bytes": fig.get("wire_bytes"), "retransmissions": fig.get("retransmissions"),
            "replacement_seconds": round(replacement_s, 3) if replacement_s is not None else None,
            **plot_metadata("fig4a_occupation.png", "fig4b_deploy_time.png"),  # once `make report` ran
        })
    finally:
        kb.close()


def _await_deploy(context: dg.AssetExecutionContext, kb, rid: int, timeout_s: float) -> dict:
    """Wait for the link service to finish a deploy, logging its progress as it goes."""
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        d = kb.deploy(rid)
        if d["status"] in ("done", "failed"):
            return d
        if d["status"] == "running" and d["figures"] and d["figures"] != shown:
            shown = p = d["figures"]
            context.log.info("deploy %d: %s/%s bytes, %s frames, %s retransmissions, %s link s, ETA %s s" % (
                rid, p.get("bytes"), p.get("total"), p.get("frames"), p.get("retransmissions"),
                p.get("link_seconds"), p.get("eta_seconds")))
        if time.monotonic() > deadline:
            raise dg.Failure(description="deploy request %d still %s after %.0f s: is the link service running?"
                             % (rid, d["status"], timeout_s))
        time.sleep(0.2)


class RetrainConfig(dg.Config):
    """Retraining of the repository from the Knowledge Base's normal windows."""

    min_windows: int = Field(default=256, description="fewer new normal windows than this: skip")
    n_trees: list[int] = Field(default=[10, 20, 30, 40, 50], description="one model per forest size")
    psi: int = Field(default=100, description="subsampling size")
    seed: int = Field(default=7, description="training seed")


@dg.asset(group_name="loop", deps=["candidate_models"], kinds={"sqlite"})
def retrained_candidate_models(context: dg.AssetExecutionContext, config: RetrainConfig,
                               knowledge_base: KnowledgeBaseResource, pool: PoolResource) -> dg.MaterializeResult:
    """New candidates trained on the normal windows the devices uploaded since the last retraining."""
    from firmware import isoforest

    kb = knowledge_base.open()
    try:
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
        from tinyml_dagster.features import feature_set as _feature_set
        from tinyml_dagster.forest import score_forest
        from tinyml_dagster.training import calibrated_threshold, default_target_fa

        rows = df[list(_feature_set(feature_set).names)].to_numpy().tolist()
        target_fa = default_target_fa(feature_set)
        lineage = {"source": "retraining", "kb_uploads": [since + 1, through], "windows": len(rows),
                   "devices": sorted(df["device_id"].unique().tolist()), "run_id": context.run.run_id}
        ids = []
        for i, n_trees in enumerate(config.n_trees):
            forest = isoforest.train(rows, n_trees=n_trees, psi=config.psi, seed=config.seed + i)
            threshold = None if target_fa is None else calibrated_threshold(score_forest(forest, np.array(rows)),
                                                                            target_fa)
            ids.append(repo.add(forest, lineage=dict(lineage, threshold={"target_fa": target_fa}), seed=config.seed + i,
                                threshold=threshold, feature_set=feature_set,
                                training={"kb_uploads": [since + 1, through], "windows": len(rows)}))
        # the retrained models join the pool's candidates
        repo.set_candidates(list(dict.fromkeys(repo.candidate_ids() + ids)), note={"retrained_by": context.run.run_id})
        kb.record_retraining(since, through, len(rows), ids, run_id=context.run.run_id, started_at=started)
        return dg.MaterializeResult(metadata={"new_windows": len(rows), "trained": len(ids),
                                              "model_ids": dg.MetadataValue.json(ids)})
    finally:
        kb.close()

