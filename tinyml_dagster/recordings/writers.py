"""Writers of one signal in every format the readers take: the tests and the benchmark read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMATS = ("csv", "csv_semicolon", "tsv_no_header", "parquet", "wav_float", "wav_pcm16", "wav_pcm24", "wav_pcm32",
           "npy", "npz", "mat5", "mat73")


def make_signal(n_snapshots: int = 3, samples: int = 2560, rate_hz: float = 25600.0, seed: int = 7) -> np.ndarray:
    """(snapshots, samples, 2) of a vibration-like signal inside [-1, 1): tones, noise and sparse impacts."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate_hz
    x = np.empty((n_snapshots, samples, 2))
    for k in range(n_snapshots):
        impacts = (rng.random(samples) < 0.002) * rng.normal(0, 0.4, samples)
        x[k, :, 0] = 0.2 * np.sin(2 * np.pi * 157 * t + k) + 0.05 * rng.normal(size=samples) + impacts
        x[k, :, 1] = 0.1 * np.sin(2 * np.pi * 311 * t) + 0.05 * rng.normal(size=samples) - 0.02
    return np.clip(x, -0.99, 0.99)


def _named(stem: Path, extension: str) -> Path:
    """stem + extension (with_suffix would eat a dotted time stamp's last field)."""
    return stem.parent / (stem.name + extension)


def write_snapshot(path_stem: Path, kind: str, x: np.ndarray, rate_hz: float, names=("DE", "FE")) -> Path:
    """One snapshot x (samples, channels) as a file of the given kind; returns its path."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.io
    import soundfile

    if kind in ("csv", "csv_semicolon", "tsv_no_header"):
        path = _named(path_stem, ".tsv" if kind == "tsv_no_header" else ".csv")
        sep = {"csv": ",", "csv_semicolon": ";", "tsv_no_header": "\t"}[kind]
        t = np.arange(len(x)) / rate_hz
        lines = [] if kind == "tsv_no_header" else [sep.join(("time_s", *names))]
        lines += [sep.join([repr(float(a)) for a in (ti, *row)]) for ti, row in zip(t, x)]
        path.write_text("\n".join(lines) + "\n")
    elif kind == "parquet":
        path = _named(path_stem, ".parquet")
        pq.write_table(pa.table({n: x[:, i] for i, n in enumerate(names)}), path)
    elif kind.startswith("wav"):
        path = _named(path_stem, ".wav")
        subtype = {"wav_float": "DOUBLE", "wav_pcm16": "PCM_16", "wav_pcm24": "PCM_24", "wav_pcm32": "PCM_32"}[kind]
        soundfile.write(str(path), x, int(rate_hz), subtype=subtype)
    elif kind == "npy":
        path = _named(path_stem, ".npy")
        np.save(path, x)
    elif kind == "npz":
        path = _named(path_stem, ".npz")
        np.savez(path, **{f"X097_{n}_time": x[:, i] for i, n in enumerate(names)}, X097RPM=np.array(1796.0))
    elif kind == "mat5":  # laid out like the Case Western Reserve files: (n, 1) columns and a scalar RPM
        path = _named(path_stem, ".mat")
        scipy.io.savemat(path, {**{f"X097_{n}_time": x[:, i : i + 1] for i, n in enumerate(names)},
                                "X097RPM": np.array([[1796.0]])})
    elif kind == "mat73":  # HDF5 with MATLAB's 512-byte header; datasets hold the transpose of MATLAB's matrices
        path = _named(path_stem, ".mat")
        with h5py.File(path, "w", userblock_size=512) as f:
            for i, n in enumerate(names):
                f[f"X097_{n}_time"] = x[:, i : i + 1].T
            f["X097RPM"] = np.array([[1796.0]])
        with open(path, "r+b") as f:
            f.write(b"MATLAB 7.3 MAT-file, written by the tests".ljust(116))
    else:
        raise ValueError(kind)
    return path


def spec_fields(kind: str) -> dict:
    """The spec fields that read back what write_snapshot wrote (channels DE and FE)."""
    if kind in ("csv", "csv_semicolon"):
        return {"columns": ["DE", "FE"]}
    if kind == "tsv_no_header":
        return {"columns": ["1", "2"], "header": False}
    if kind in ("npz", "mat5", "mat73"):
        return {"columns": ["*_DE_time", "*_FE_time"]}
    return {}


def tolerance(kind: str) -> float:
    """Largest difference a format's storage may make to samples in [-1, 1) (PCM quantises)."""
    return {"wav_pcm16": 2.0**-15, "wav_pcm24": 2.0**-23, "wav_pcm32": 2.0**-31}.get(kind, 0.0)
