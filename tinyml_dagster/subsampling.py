"""Subsampling as the paper does it: FFT of each 1-s file, rectangular low-pass at fs/2, inverse FFT at the new rate.

The source rate is always given: the same ideal low-pass (anti-aliasing) serves any source rate.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import scipy.fft

from tinyml_dagster import ims


def subsampled_length(n: int, rate_hz: int, source_rate_hz: float) -> int:
    """Samples of an n-sample record at source_rate_hz once resampled to rate_hz
    (20,480 at 20 kHz -> 1,024 at 1 kHz)."""
    m = int(n * rate_hz // source_rate_hz)
    if m < 2 or m > n:
        raise ValueError(f"cannot subsample {n} samples at {source_rate_hz} Hz to {rate_hz} Hz")
    return m


def _band_limit(spectrum: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the bins below the new Nyquist frequency; the unpaired bin at m/2 folds its mirror in
    (as scipy.signal.resample)."""
    y = spectrum[..., : m // 2 + 1] * (m / n)
    if m % 2 == 0 and m < n:
        y[..., m // 2] *= 2.0
    return y


def subsample(x: np.ndarray, rate_hz: int, source_rate_hz: float, axis: int = -1) -> np.ndarray:
    """x resampled along axis from source_rate_hz to rate_hz by an ideal (rectangular) low-pass in the FFT domain."""
    return subsample_many(x, (rate_hz,), source_rate_hz, axis)[rate_hz]


def subsample_many(
    x: np.ndarray, rates_hz: Iterable[int], source_rate_hz: float, axis: int = -1
) -> dict[int, np.ndarray]:
    """x at several rates from one forward FFT."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    spectrum = scipy.fft.rfft(x, axis=-1)
    out = {}
    for rate in rates_hz:
        m = subsampled_length(n, rate, source_rate_hz)
        out[rate] = np.moveaxis(scipy.fft.irfft(_band_limit(spectrum, n, m), n=m, axis=-1), -1, axis)
    return out


def keep_freed_memory() -> None:
    """Ask glibc to keep large freed blocks for reuse instead of unmapping them.

    The per-file arrays are a few MB each; returning them to the kernel and faulting them back in on every
    file costs more than the arithmetic on virtual machines. A no-op where mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 512 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def subsample_files(
    paths: Sequence[str | os.PathLike], rates_hz: Iterable[int], workers: int | None = None
) -> dict[int, np.ndarray]:
    """Read IMS files and subsample them: {rate: float64 array (n_files, samples at rate, n_channels)}."""
    rates = tuple(int(r) for r in rates_hz)
    paths = list(paths)
    if not paths:
        raise ValueError("no IMS file to subsample")
    keep_freed_memory()
    first = ims.read_ims_file(paths[0])
    n_channels = first.shape[1]
    out = {r: np.empty((len(paths), subsampled_length(ims.ROWS, r, ims.SAMPLE_RATE_HZ), n_channels)) for r in rates}

    def one(i: int, data: np.ndarray | None = None) -> None:
        data = ims.read_ims_file(paths[i], n_channels=n_channels) if data is None else data
        for r, y in subsample_many(data, rates, ims.SAMPLE_RATE_HZ, axis=0).items():
            out[r][i] = y

    one(0, first)
    workers = workers or min(2, os.cpu_count() or 1)
    if workers == 1:
        for i in range(1, len(paths)):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(1, len(paths))))
    return out


def snapshots_per_window(snapshot_samples: int, source_rate_hz: float, window_s: float) -> int:
    """Snapshots joined end to end to hold one window: 1 unless a snapshot is shorter than the window."""
    need = int(np.ceil(window_s * source_rate_hz - 1e-9))
    return max(1, -(-need // snapshot_samples))


def subsample_recording(
    recording, rates_hz: Iterable[int], window_s: float, workers: int | None = None
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """A recording at several rates: ({rate: (n_groups, samples, channels)}, the groups' timestamps).

    A group is one snapshot, or, when snapshots are shorter than a window, that many consecutive snapshots
    joined end to end (the timestamp is the first one's; a last incomplete group is dropped). Each group is
    resampled from the recording's own rate by the FFT low-pass above.
    """
    rates = tuple(int(r) for r in rates_hz)
    k = snapshots_per_window(recording.snapshot_samples, recording.rate_hz, window_s)
    n_groups = len(recording) // k
    if n_groups < 1:
        raise ValueError(f"{len(recording)} snapshots of {recording.snapshot_seconds:g} s do not fill one "
                         f"{window_s:g}-s window")
    n = k * recording.snapshot_samples
    keep_freed_memory()
    out = {r: np.empty((n_groups, subsampled_length(n, r, recording.rate_hz), len(recording.channels))) for r in rates}

    def one(g: int) -> None:
        parts = [recording.snapshot(g * k + j) for j in range(k)]
        x = parts[0] if k == 1 else np.concatenate(parts)
        for r, y in subsample_many(x, rates, recording.rate_hz, axis=0).items():
            out[r][g] = y

    workers = workers or min(2, os.cpu_count() or 1)
    one(0)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(1, n_groups)))
    return out, recording.timestamps[: n_groups * k : k]
