"""Data assets: the recording (IMS real or synthetic, or a user's recording spec), its subsampled signals, and the
feature windows."""

import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from tinyml_dagster import features, ims, recordings, settings, subsampling, synthetic
from tinyml_dagster.recordings.spec import device_rates, window_ms
from tinyml_dagster.storage import atomic_write
from tinyml_dagster.defs.data.partitions import feature_partition_key, feature_partitions

OWNERS = ["team:data"]
# the candidates are trained on these: a month-old recording judges today's machine by last month's data
DATA_FRESHNESS = dg.FreshnessPolicy.time_window(warn_window=timedelta(days=7), fail_window=timedelta(days=30))
RECORDING_MANIFEST = "ims_recording.json"
SUBSAMPLED_INDEX = "index.json"
ATTEMPTS_DIR = "attempts"  # <asset>.json: when each data asset was last attempted


class IMSRecordingConfig(dg.Config):
    """Which recording the pipeline reads."""

    ims_dir: str = Field(
        default="",
        description="Directory of real IMS files (e.g. a full copy of set 1); empty: TINYML_IMS_DIR, "
        "else the synthetic recording.",
    )
    n_files: int = Field(default=synthetic.DEFAULT_FILES, description="Files of the synthetic recording "
                         "(2,156 = full scale; default TINYML_SYNTHETIC_FILES or 240).")
    seed: int = Field(default=synthetic.DEFAULT_SEED,
                      description="Seed of the synthetic recording: same seed, same bytes.")
    spec_file: str = Field(default="", description="A recording spec (TOML, see `python -m tinyml_dagster.recordings "
                           "inspect`); empty: TINYML_RECORDING, else the IMS recording.")
    recording: Optional[recordings.RecordingSpec] = Field(
        default=None,
        description="A recording spec's fields given here instead of a spec file (same channels and rates "
        "as the partitions, which come from TINYML_RECORDING).")


def active_spec(config: IMSRecordingConfig) -> recordings.RecordingSpec | None:
    """The recording spec in use: the config's fields, its spec file, TINYML_RECORDING; None for IMS."""
    try:
        if config.recording is not None:
            return recordings.spec_from_dict(config.recording.model_dump(), "config recording")
        path = config.spec_file or settings.recording_spec_file()
        return recordings.load_spec(path) if path else None
    except recordings.SpecError as e:
        raise dg.Failure(str(e)) from None


def _check_partitions(spec: recordings.RecordingSpec, units: list) -> None:
    """The spec must fit the partitions, made from TINYML_RECORDING when the code location loaded."""
    rates, n_units = device_rates(spec), len(units)
    if tuple(rates) != tuple(settings.RATES_HZ) or n_units != len(settings.BEARINGS) or \
            window_ms(spec) != settings.WINDOW_MS:
        raise dg.Failure(
            f"the recording has {n_units} monitored units at {rates} Hz, {window_ms(spec)}-ms windows; the partitions "
            f"were made for {len(settings.BEARINGS)} at {list(settings.RATES_HZ)} Hz, {settings.WINDOW_MS}-ms windows: "
            f"start Dagster with {settings.RECORDING_ENV}=<spec file> (make dev RECORDING=...)")


def _write_json(path: Path, payload: Any) -> None:
    atomic_write(path, json.dumps(payload, indent=1), mode=0o644)


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path, upstream: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise dg.Failure(f"{path} is missing: materialize {upstream} first") from None


def _attempt(asset: str, context: dg.AssetExecutionContext) -> float:
    """Record that asset is being materialized now (data/attempts/<asset>.json); its output carries the time."""
    at = time.time()
    _write_json(settings.data_dir() / ATTEMPTS_DIR / f"{asset}.json", {"at": at, "run_id": context.run.run_id})
    return at


def _check_upstream(asset: str, used_at: float | None, what: str) -> None:
    """dg.Failure when `asset` was attempted after the output of it this step would read (used_at): that attempt
    failed or was not followed through, and the data here is older than it."""
    path = settings.data_dir() / ATTEMPTS_DIR / f"{asset}.json"
    if not path.exists():
        return
    last = json.loads(path.read_text())
    if used_at is None or last["at"] > used_at:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
        raise dg.Failure(
            f"{what} comes from before the latest attempt of {asset} (run {last['run_id']} at {when}), which failed "
            f"or was not followed through: materialize {asset} (and what depends on it) again")


def _span(timestamps: Iterable) -> str:
    ts = pd.to_datetime(list(timestamps))
    return (f"{ts[0]:%Y-%m-%d %H:%M:%S} .. {ts[-1]:%Y-%m-%d %H:%M:%S} "
            f"({(ts[-1] - ts[0]).total_seconds() / 86400:.1f} days)")


@dg.asset(group_name="data", kinds={"ascii"}, owners=OWNERS, freshness_policy=DATA_FRESHNESS)
def ims_recording(context: dg.AssetExecutionContext, config: IMSRecordingConfig) -> dg.MaterializeResult:
    """The recording: a recording spec's files, else IMS files from ims_dir, else the synthetic set 1 under data/."""
    attempt_at = _attempt("ims_recording", context)
    spec = active_spec(config)
    if spec is not None:
        return _spec_recording(context, spec, attempt_at)
    directory = settings.ims_dir(config.ims_dir or None)
    synthetic_run = settings.is_synthetic(directory)
    if synthetic_run:
        started = time.perf_counter()
        fresh = not synthetic.is_generated(directory, config.n_files, config.seed)
        paths = synthetic.generate_recording(directory, n_files=config.n_files, seed=config.seed)
        context.log.info(
            "%s synthetic recording of %d files in %s (%.1f s)",
            "generated" if fresh else "kept the current", len(paths), directory, time.perf_counter() - started,
        )
    else:
        paths = ims.list_ims_files(directory)
    first = ims.read_ims_file(paths[0])  # format check; every file is parsed by subsampled_signals
    stamps = ims.file_timestamps(paths)
    manifest = {
        "directory": str(directory),
        "synthetic": synthetic_run,
        "seed": config.seed if synthetic_run else None,
        "n_channels": int(first.shape[1]),
        "files": [p.name for p in paths],
        "attempt_at": attempt_at,
    }
    _write_json(settings.data_dir() / RECORDING_MANIFEST, manifest)
    rms = np.sqrt((first**2).mean(axis=0))
    return dg.MaterializeResult(
        metadata={
            "directory": dg.MetadataValue.path(str(directory)),
            "source": "synthetic set 1 (seed %d)" % config.seed if synthetic_run else "real IMS files",
            "files": len(paths),
            "channels": int(first.shape[1]),
            "rows_per_file": ims.ROWS,
            "time_span": _span(stamps),
            "size_mb": round(sum(p.stat().st_size for p in paths) / 1e6, 1),
            "first_file_rms": dg.MetadataValue.md(
                "| channel | " + " | ".join(str(c + 1) for c in range(len(rms))) + " |\n|---|"
                + "---:|" * len(rms) + "\n| RMS | " + " | ".join(f"{v:.3f}" for v in rms) + " |"
            ),
        }
    )


def _spec_recording(context: dg.AssetExecutionContext, spec: recordings.RecordingSpec,
                    attempt_at: float) -> dg.MaterializeResult:
    """A user's recording: opened and checked (its first file read), its layout written to the manifest."""
    try:
        rec = recordings.open_recording(spec)
        units = recordings.monitored_units(spec, rec.channels)
    except (recordings.RecordingError, recordings.SpecError) as e:
        raise dg.Failure(str(e)) from None
    _check_partitions(spec, units)
    _write_json(settings.data_dir() / RECORDING_MANIFEST, {
        "spec": spec.model_dump(), "directory": spec.path, "format": rec.format, "files": [str(p) for p in rec.files],
        "n_channels": len(rec.channels), "channels": rec.channels, "units": [list(u) for u in units],
        "rate_hz": rec.rate_hz, "snapshot_samples": rec.snapshot_samples, "snapshots": len(rec),
        "attempt_at": attempt_at})
    first = rec.snapshot(0)
    rms = np.sqrt((first**2).mean(axis=0))
    context.log.info("%s recording: %d snapshots of %d channels at %g Hz", rec.format, len(rec), len(rec.channels),
                     rec.rate_hz)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(spec.path),
            "source": f"{rec.format} recording spec",
            "files": len(rec.files),
            "snapshots": len(rec),
            "channels": ", ".join(rec.channels),
            "monitored_units": ", ".join(f"{k}: {'+'.join(u)}" for k, u in enumerate(units, start=1)),
            "rate_hz": rec.rate_hz,
            "snapshot_seconds": round(rec.snapshot_seconds, 6),
            "time_span": _span(rec.timestamps),
            "first_snapshot_rms": dg.MetadataValue.md(
                "| channel | " + " | ".join(rec.channels) + " |\n|---|" + "---:|" * len(rms)
                + "\n| RMS | " + " | ".join(f"{v:.4g}" for v in rms) + " |"
            ),
        }
    )


@dg.asset(group_name="data", deps=[ims_recording], kinds={"numpy"}, owners=OWNERS,
          freshness_policy=DATA_FRESHNESS)
def subsampled_signals(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Every file at 500 Hz, 1 kHz and 2 kHz: FFT, rectangular low-pass at fs/2, inverse FFT at the new rate."""
    manifest = _read_json(settings.data_dir() / RECORDING_MANIFEST, "ims_recording")
    _check_upstream("ims_recording", manifest.get("attempt_at"), "the recording manifest")
    attempt_at = _attempt("subsampled_signals", context)
    if "spec" in manifest:
        return _subsample_spec_recording(context, manifest, attempt_at)
    paths = [Path(manifest["directory"]) / name for name in manifest["files"]]
    started = time.perf_counter()
    signals = subsampling.subsample_files(paths, settings.RATES_HZ)
    seconds = time.perf_counter() - started
    out = settings.subsampled_dir()
    out.mkdir(parents=True, exist_ok=True)
    for rate, array in signals.items():
        _save_npy(out / f"rate={rate}.npy", array)
    stamps = ims.file_timestamps(paths)
    _write_json(
        out / SUBSAMPLED_INDEX,
        {
            "directory": manifest["directory"],
            "files": manifest["files"],
            "timestamps": [str(t) for t in stamps.astype("datetime64[s]")],
            "n_channels": manifest["n_channels"],
            "rates_hz": list(signals),
            "attempt_at": attempt_at,
            "recording_attempt_at": manifest.get("attempt_at"),
        },
    )
    context.log.info("subsampled %d files to %s Hz in %.2f s", len(paths), list(signals), seconds)
    table = "| rate (Hz) | samples per file | array | MB |\n|---:|---:|---|---:|\n" + "\n".join(
        f"| {r} | {a.shape[1]} | {a.shape} | {a.nbytes / 1e6:.1f} |" for r, a in signals.items()
    )
    return dg.MaterializeResult(
        metadata={
            "files": len(paths),
            "rates_hz": ", ".join(str(r) for r in signals),
            "seconds": round(seconds, 2),
            "files_per_second": round(len(paths) / seconds, 1),
            "arrays": dg.MetadataValue.md(table),
            "directory": dg.MetadataValue.path(str(out)),
        }
    )


def _subsample_spec_recording(context: dg.AssetExecutionContext, manifest: dict,
                              attempt_at: float) -> dg.MaterializeResult:
    """A spec recording at its device rates: each snapshot (or group of short ones) FFT-resampled from its own rate."""
    spec = recordings.spec_from_dict(manifest["spec"], "manifest")
    started = time.perf_counter()
    try:
        rec = recordings.open_recording(spec)
        signals, stamps = subsampling.subsample_recording(rec, device_rates(spec), spec.window_s)
    except (recordings.RecordingError, recordings.SpecError, ValueError) as e:
        raise dg.Failure(str(e)) from None  # nothing written yet: the earlier signals stay whole
    seconds = time.perf_counter() - started
    out = settings.subsampled_dir()
    out.mkdir(parents=True, exist_ok=True)
    for rate, array in signals.items():
        _save_npy(out / f"rate={rate}.npy", array)
    group = subsampling.snapshots_per_window(rec.snapshot_samples, rec.rate_hz, spec.window_s)
    _write_json(out / SUBSAMPLED_INDEX, {
        "directory": spec.path, "files": [str(p) for p in rec.files], "timestamps": [str(t) for t in stamps],
        "n_channels": len(rec.channels), "channels": rec.channels, "units": manifest["units"],
        "rates_hz": list(signals), "window_ms": window_ms(spec), "snapshots_per_group": group,
        "attempt_at": attempt_at, "recording_attempt_at": manifest.get("attempt_at")})
    context.log.info("resampled %d snapshots from %g Hz to %s Hz in %.2f s",
                     len(rec), rec.rate_hz, list(signals), seconds)
    return dg.MaterializeResult(metadata={
        "snapshots": len(rec), "source_rate_hz": rec.rate_hz, "rates_hz": ", ".join(str(r) for r in signals),
        "snapshots_per_group": group, "groups": len(stamps), "seconds": round(seconds, 2),
        "directory": dg.MetadataValue.path(str(out))})


def _preview(df: pd.DataFrame, rows: int = 6) -> str:
    cols = ["timestamp", "file_index", "window_index", "axis", "life_fraction", "split", *features.FEATURE_NAMES]
    sample = pd.concat([df.head(rows // 2), df.tail(rows // 2)])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in sample.iterrows():
        cells = [
            str(r.timestamp), str(r.file_index), str(r.window_index), r.axis, f"{r.life_fraction:.3f}", r.split,
            *(f"{r[name]:.4f}" for name in features.FEATURE_NAMES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_summary(df: pd.DataFrame) -> str:
    lines = ["| split | axis | windows | life | " + " | ".join(f"median {n}" for n in features.FEATURE_NAMES) + " |",
             "|---|---|---:|---|" + "---:|" * len(features.FEATURE_NAMES)]
    groups = [(f"{split}", g) for split, g in df.groupby("split", sort=False)]
    groups.append(("test, last 10% of life", df[df.life_fraction >= 0.9]))
    for name, part in groups:
        for axis, g in part.groupby("axis"):
            med = " | ".join(f"{g[n].median():.4f}" for n in features.FEATURE_NAMES)
            lines.append(f"| {name} | {axis} | {len(g)} | "
                         f"{g.life_fraction.min():.2f}-{g.life_fraction.max():.2f} | {med} |")
    return "\n".join(lines)


@dg.asset(group_name="data", deps=[subsampled_signals], partitions_def=feature_partitions, kinds={"parquet"},
          owners=OWNERS, freshness_policy=DATA_FRESHNESS)
def feature_windows(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Mean, skewness and excess kurtosis of every non-overlapping 500-ms window, per rate and bearing."""
    key = context.partition_key.keys_by_dimension
    rate, bearing = int(key["rate"]), int(key["bearing"])
    src = settings.subsampled_dir()
    index = _read_json(src / SUBSAMPLED_INDEX, "subsampled_signals")
    _check_upstream("subsampled_signals", index.get("attempt_at"), "the subsampled signals")
    _check_upstream("ims_recording", index.get("recording_attempt_at"), "the recording of the subsampled signals")
    signals = np.load(src / f"rate={rate}.npy", mmap_mode="r")
    stamps = np.array(index["timestamps"], dtype="datetime64[ns]")
    axes = None
    if "units" in index:  # a spec recording: the partition's unit and its channels
        if not 1 <= bearing <= len(index["units"]):
            raise dg.Failure(f"partition {bearing}: the recording has {len(index['units'])} monitored units")
        axes = [(name, index["channels"].index(name)) for name in index["units"][bearing - 1]]
    df = features.feature_windows_frame(signals, stamps, rate, bearing, axes=axes, window_ms=index.get("window_ms"))
    path = features.write_feature_windows(df, settings.feature_path(rate, bearing))
    # every other feature set's windows beside them (the default set's models train on those)
    other_paths = {}
    for name in features.FEATURE_SETS:
        if name != features.PAPER_FEATURE_SET:
            other = features.feature_windows_frame(signals, stamps, rate, bearing, axes=axes,
                                                   window_ms=index.get("window_ms"), feature_set=name)
            other_paths[name] = str(features.write_feature_windows(
                other, features.feature_windows_path(rate, bearing, name), name))
    train = df[df.split == "train"]
    test = df[df.split == "test"]
    split_at = test.timestamp.min() if len(test) else None
    context.log.info("%d feature windows at %d Hz for bearing %d -> %s", len(df), rate, bearing, path)
    return dg.MaterializeResult(
        metadata={
            "rows": len(df),
            "files": int(df.file_index.nunique()),
            "windows_per_file_and_axis": int(df.window_index.max()) + 1,
            "samples_per_window": features.window_length(rate, index.get("window_ms") or features.WINDOW_MS),
            "axes": ", ".join(sorted(df.axis.unique())),
            "time_span": _span([df.timestamp.min(), df.timestamp.max()]),
            "train_rows": len(train),
            "test_rows": len(test),
            "train_test_split": f"train = life_fraction < {settings.TRAIN_FRACTION} (until {train.timestamp.max()}), "
            f"test from {split_at}",
            "kurtosis_definition": "excess (Fisher), population moments: m4 / m2**2 - 3",
            "by_split": dg.MetadataValue.md(_split_summary(df)),
            "preview": dg.MetadataValue.md(_preview(df)),
            "path": dg.MetadataValue.path(str(path)),
            "other_feature_sets": dg.MetadataValue.json(other_paths),
        }
    )


def materialize_data(
    rates_hz: Iterable[int] = settings.RATES_HZ,
    bearings: Iterable[int] = settings.BEARINGS,
    ims_dir: str = "",
    n_files: int | None = None,
    seed: int = synthetic.DEFAULT_SEED,
    instance: dg.DagsterInstance | None = None,
    spec_file: str = "",
    with_recording: bool = True,
) -> list[dg.ExecuteInProcessResult]:
    """Materialize the recording, its subsampled signals (unless with_recording is False: they exist) and the feature
    windows of every (rate, bearing) given."""
    n_files = n_files or settings.synthetic_files()
    config = {"ops": {"ims_recording": {"config": {"ims_dir": ims_dir, "n_files": n_files, "seed": seed,
                                                   "spec_file": spec_file}}}}
    results = [dg.materialize([ims_recording, subsampled_signals], run_config=config, instance=instance)
               ] if with_recording else []
    for rate in rates_hz:
        for bearing in bearings:
            results.append(
                dg.materialize(
                    [feature_windows, subsampled_signals, ims_recording],
                    selection=[feature_windows],
                    partition_key=feature_partition_key(rate, bearing),
                    instance=instance,
                )
            )
    return results
