"""Verify phase: every candidate uses only what the firmware implements, and flags a sane share of its training data."""

import dagster as dg

from firmware import feature_sets
from firmware import features as fw_features
from firmware import isoforest
from tinyml_dagster import settings
from tinyml_dagster.model_repository import COMPACT_FORMAT

from .resources import ModelRepositoryResource

# a champion must fit the device: the compact forest is held in RAM next to the firmware (<= 24 KB of heap)
MAX_MODEL_BYTES = 24 * 1024
MAX_TRAIN_ANOMALY_RATE = 0.5


def firmware_problems(meta: dict, config: dict, data: bytes) -> list[str]:
    """What in one stored model the firmware could not run as-is (empty: nothing)."""
    problems = []
    if config.get("format") != COMPACT_FORMAT:
        problems.append(f"format {config.get('format')!r} (firmware reads {COMPACT_FORMAT!r})")
    name = config.get("feature_set", fw_features.FEATURE_SET)
    try:
        computed = list(feature_sets.module(name).FEATURE_NAMES)
    except ValueError as exc:
        computed = []
        problems.append(str(exc))
    if computed and list(config.get("feature_names", [])) != computed:
        problems.append(f"features {config.get('feature_names')} (firmware computes {computed} for set {name})")
    if config.get("window_ms") != settings.WINDOW_MS:
        problems.append(f"window {config.get('window_ms')} ms (devices: {settings.WINDOW_MS} ms)")
    if config.get("rate_hz") is not None and config["rate_hz"] not in settings.RATES_HZ:
        problems.append(f"rate {config['rate_hz']} Hz (device rates {list(settings.RATES_HZ)})")
    try:
        forest = isoforest.load(data, config.get("grid", []))
        if (forest.n_trees, forest.psi) != (config.get("n_trees"), config.get("psi")):
            problems.append(f"bytes say {forest.n_trees} trees psi {forest.psi}, config says "
                            f"{config.get('n_trees')} trees psi {config.get('psi')}")
    except ValueError as exc:
        problems.append(f"compact bytes rejected by the firmware parser: {exc}")
    if len(data) > MAX_MODEL_BYTES:
        problems.append(f"{len(data)} bytes > {MAX_MODEL_BYTES} device budget")
    if not 0.0 < float(config.get("threshold", 0.0)) < 1.0:
        problems.append(f"threshold {config.get('threshold')} outside (0, 1)")
    return problems


@dg.asset_check(asset="candidate_models", name="runs_on_firmware", blocking=True)
def candidate_models_run_on_firmware(model_repository: ModelRepositoryResource) -> dg.AssetCheckResult:
    """Each candidate uses only what the firmware implements: format, features, window, rate, size."""
    repo = model_repository.open()
    ids = repo.candidate_ids()
    failures = {}
    for model_id in ids:
        problems = firmware_problems(repo.get(model_id), repo.config(model_id), repo.model_bytes(model_id))
        if problems:
            failures[model_id] = problems
    return dg.AssetCheckResult(passed=bool(ids) and not failures,
                               metadata={"checked": len(ids), "failures": dg.MetadataValue.json(failures)})


@dg.asset_check(asset="candidate_models", name="sane_training_anomaly_rate", blocking=True)
def candidate_models_flag_a_sane_share_of_training(model_repository: ModelRepositoryResource) -> dg.AssetCheckResult:
    """Each candidate's anomaly rate on its own training windows is not most of them, nor none at a fixed threshold
    (a calibrated threshold targets windows the model did not grow on: its training windows may all fall below)."""
    repo = model_repository.open()
    candidates = repo.candidates()
    rates = {m["model_id"]: m.get("anomaly_rate_train") for m in candidates}
    calibrated = {m["model_id"] for m in candidates
                  if ((m.get("lineage") or {}).get("threshold") or {}).get("method", "fixed") != "fixed"}
    bad = {k: v for k, v in rates.items()
           if v is None or not (0.0 < v or k in calibrated) or v > MAX_TRAIN_ANOMALY_RATE}
    return dg.AssetCheckResult(
        passed=bool(rates) and not bad,
        metadata={"rates": dg.MetadataValue.json(rates), "insane": dg.MetadataValue.json(bad),
                  "bounds": f"0 < rate <= {MAX_TRAIN_ANOMALY_RATE}"},
    )
