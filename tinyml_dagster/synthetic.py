"""Deterministic synthetic IMS set-1 run-to-failure recording, written in the real ASCII format.

Calibrated on the real set 1: healthy per-channel levels, spectra (band energies, the 493/986 Hz lines) and
kurtosis like its first files, the impulsiveness above 2 kHz only (below, the real files are near Gaussian, so
window features at 500 Hz-2 kHz match them too); a run-in rise of ~20% in level over the first days; from 70%
of life bearing 3 grows an inner-race defect (a spall of finite size at first, then growing: impacts at BPFI
ringing a structural resonance, modulated by the shaft, in bursts, ending at RMS ~0.5, kurtosis > 10 and
clipping at +-5 like the last real files) and bearing 4 a roller defect (impacts at 2 x BSF modulated by the
cage, most impulsive mid-way, then broadband). Impacts also have a one-sided low-frequency response, which
raises the low band and the mean as the real last files do: that is what the features show once subsampled.
File i of the 2,156 real timestamps has its own random stream, so a small recording is a subset of the full one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.fft

from tinyml_dagster import ims, settings

FULL_FILES = 2156
# 240 unless TINYML_SYNTHETIC_FILES: the demo stays fast, the life shape stays
DEFAULT_FILES = settings.synthetic_files()
DEFAULT_SEED = 2003
GENERATOR_VERSION = 3
MANIFEST = ".synthetic.json"

N = ims.ROWS
FS = float(ims.SAMPLE_RATE_HZ)
CLIP = 5.0
SHAFT_HZ = 2000.0 / 60.0
# Rexnord ZA-2115 at 2,000 rpm (set 1's documentation)
BPFI_HZ = 296.9
BPFO_HZ = 236.4
BSF_HZ = 139.9
FTF_HZ = 14.8
DEFECT_ONSET = 0.70
# a spall forms with a finite size: at their labelled onsets the real bearings' impulsiveness steps up within
# hours (per-file medians at 20 kHz: bearing 3's crest factor 4.7 -> 5.3 -> 8.9 over files 1,775-1,850, its
# kurtosis 0.5 -> 0.7 -> 2.6, its RMS only +1.5% -> +4%; bearing 4's crest factor 4.1 -> 5.9 over 1,400-1,475).
# Impacts start at this severity: bearing 3 x's first files after the onset then have crest factor 5.8-7.1,
# kurtosis 0.7-1.4 and RMS +5-12%.
SPALL_INITIAL = 0.10

# healthy level of the first real file of set 1, per channel (b1x, b1y, ..., b4x, b4y)
_OFFSET = np.array([-0.095, -0.094, -0.094, -0.094, -0.091, -0.091, -0.091, -0.094])
_KURTOSIS = np.array([1.07, 3.07, 0.21, 0.29, 0.41, 0.78, 0.79, 1.81])
_BAND_EDGES_HZ = np.array([0, 250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10001])
_BAND_STD = np.array(
    [  # standard deviation of the first real file in each band above, per channel
        [0.0107, 0.0132, 0.0468, 0.0205, 0.0159, 0.0343, 0.0357, 0.0225, 0.0137, 0.0097, 0.0118, 0.0072],
        [0.0099, 0.0133, 0.0311, 0.0243, 0.0230, 0.0206, 0.0276, 0.0146, 0.0150, 0.0114, 0.0158, 0.0251],
        [0.0133, 0.0205, 0.0593, 0.0186, 0.0147, 0.0181, 0.0403, 0.0236, 0.0128, 0.0179, 0.0195, 0.0131],
        [0.0178, 0.0218, 0.0450, 0.0186, 0.0173, 0.0189, 0.0234, 0.0145, 0.0133, 0.0209, 0.0208, 0.0195],
        [0.0120, 0.0194, 0.0355, 0.0213, 0.0227, 0.0249, 0.0296, 0.0432, 0.0289, 0.0270, 0.0137, 0.0224],
        [0.0170, 0.0206, 0.0239, 0.0251, 0.0279, 0.0354, 0.0219, 0.0287, 0.0281, 0.0284, 0.0288, 0.0380],
        [0.0091, 0.0128, 0.0245, 0.0146, 0.0136, 0.0325, 0.0248, 0.0138, 0.0102, 0.0085, 0.0115, 0.0139],
        [0.0088, 0.0195, 0.0183, 0.0217, 0.0158, 0.0269, 0.0236, 0.0167, 0.0213, 0.0191, 0.0119, 0.0193],
    ]
)
# the two machine lines of set 1 fall on FFT bins: 505 and 1010 (493.2 and 986.3 Hz)
_TONE_BINS = (505, 1010)
_TONE_AMP = np.array(
    [
        [0.012, 0.010, 0.021, 0.022, 0.020, 0.012, 0.007, 0.022],
        [0.055, 0.033, 0.069, 0.053, 0.034, 0.014, 0.027, 0.011],
    ]
)
# structural resonance each bearing's impacts ring (Hz, decay s), for its x and y channel
_RESONANCE = {3: ((4300.0, 5200.0), 0.0007), 4: ((3500.0, 3900.0), 0.0007)}
# impacts also move the sensor's low band (the real last files' low-band energy and mean rise): a one-sided
# response this strong per unit impact; it is what a detector sees once the signal is subsampled to <= 2 kHz
_SHOCK_GAIN = {3: 0.06, 4: 0.05}
_SHOCK_DECAY_S = 0.002
BURST_GAIN = 2.0
_ENVELOPE_ABOVE_HZ = 2000.0
_ENVELOPE_GAIN = 1.15


def set1_timestamps() -> list[datetime]:
    """The 2,156 real timestamps of IMS set 1 (packaged with tinyml_dagster)."""
    text = resources.files("tinyml_dagster").joinpath("data/ims_set1_timestamps.txt").read_text()
    return [datetime.strptime(line, ims.NAME_FORMAT) for line in text.split()]


def schedule(n_files: int = DEFAULT_FILES) -> list[int]:
    """Indices into the real timestamps for a recording of n_files: evenly spread, first and last included."""
    if not 2 <= n_files <= FULL_FILES:
        raise ValueError(f"n_files must be between 2 and {FULL_FILES}, got {n_files}")
    return sorted(set(np.round(np.linspace(0, FULL_FILES - 1, n_files)).astype(int).tolist()))


@lru_cache(maxsize=1)
def _life() -> np.ndarray:
    t = np.array(set1_timestamps(), dtype="datetime64[s]").astype(np.int64).astype(np.float64)
    return (t - t[0]) / (t[-1] - t[0])


def severity(life: float, power: float) -> float:
    """Wear growth (the broadband level's): 0 before DEFECT_ONSET, rising to 1 at the end of life."""
    return float(np.clip((life - DEFECT_ONSET) / (1.0 - DEFECT_ONSET), 0.0, 1.0) ** power)


def spall(life: float, power: float) -> float:
    """Impact severity of the defect: 0 before DEFECT_ONSET, SPALL_INITIAL at it, then growing to 1 with wear."""
    return 0.0 if life < DEFECT_ONSET else SPALL_INITIAL + (1.0 - SPALL_INITIAL) * severity(life, power)


@lru_cache(maxsize=1)
def _noise_shape() -> np.ndarray:
    """Per-bin amplitude (10241, 8) that gives white noise the healthy band energies, tones taken out."""
    freqs = np.fft.rfftfreq(N, 1.0 / FS)
    band = np.searchsorted(_BAND_EDGES_HZ, freqs, side="right") - 1
    var = _BAND_STD.T**2  # (12, 8)
    for b, amps in zip(_TONE_BINS, _TONE_AMP):
        k = band[b]
        var[k] = np.maximum(var[k] - amps**2 / 2, (0.3 * _BAND_STD.T[k]) ** 2)
    bins_per_band = np.bincount(band, minlength=len(var))[:, None]
    shape = np.sqrt(var / (2.0 * bins_per_band))[band] * N
    shape[0] = 0.0
    return shape


@lru_cache(maxsize=4)
def _ringing(freq_hz: float, decay_s: float) -> np.ndarray:
    """Spectrum of one unit impact ringing a resonance: exp(-t/decay) sin(2 pi f t)."""
    t = np.arange(N) / FS
    return scipy.fft.rfft(np.exp(-t / decay_s) * np.sin(2 * np.pi * freq_hz * t))


@lru_cache(maxsize=4)
def _shock(decay_s: float) -> np.ndarray:
    """Spectrum of one unit impact's low-frequency, one-sided response: exp(-t/decay)."""
    return scipy.fft.rfft(np.exp(-np.arange(N) / FS / decay_s))


def _impacts(
    rng: np.random.Generator,
    rate_hz: float,
    mod_hz: float,
    depth: float,
    amp: float,
    bursts_per_s: float,
    burst_gain: float,
) -> np.ndarray:
    """Impact train over one record: jittered period, amplitude modulated by mod_hz, log-normally scattered,
    and raised by burst_gain during short bursts (a spall rolling in and out of contact)."""
    n = int(N / FS * rate_hz) + 2
    t = (np.arange(n) + rng.uniform(0, 1)) / rate_hz + rng.normal(0, 0.01 / rate_hz, n)
    t = t[(t >= 0) & (t < N / FS)]
    a = amp * (1 - depth + depth * np.cos(2 * np.pi * mod_hz * t + rng.uniform(0, 2 * np.pi)))
    a *= rng.lognormal(0.0, 0.35, len(t))
    starts = rng.uniform(0, N / FS, rng.poisson(bursts_per_s * N / FS))
    ends = starts + rng.exponential(0.03, len(starts))
    in_burst = ((t[:, None] >= starts) & (t[:, None] < ends)).any(axis=1)
    a *= 1.0 + burst_gain * in_burst
    train = np.zeros(N)
    np.add.at(train, (t * FS).astype(int), a)
    return train


def synthesize_file(index: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Record `index` (0..2155) of the synthetic set 1: float64 (20480, 8), rounded to 3 decimals
    like the real files."""
    if not 0 <= index < FULL_FILES:
        raise ValueError(f"file index must be in 0..{FULL_FILES - 1}, got {index}")
    rng = np.random.default_rng([seed, index])
    life = float(_life()[index])
    s3, s4 = severity(life, 2.5), severity(life, 1.2)
    i3, i4 = spall(life, 2.5), spall(life, 1.2)
    run_in = 1.0 + 0.21 * (1.0 - np.exp(-life / 0.08))
    # broadband level per channel: run-in everywhere, late rise near the failing bearings
    level = np.full(8, run_in)
    level *= 1.0 + np.array([0.12, 0.08, 0.3, 0.3, 1.5, 1.3, 1.6, 1.6]) * np.array([s3, s3, s3, s3, s3, s3, s4, s4])

    spectrum = (rng.standard_normal((N // 2 + 1, 8)) + 1j * rng.standard_normal((N // 2 + 1, 8))) * np.sqrt(0.5)
    spectrum *= _noise_shape() * level
    split = int(_ENVELOPE_ABOVE_HZ * N / FS)
    low = spectrum.copy()
    low[split:] = 0.0
    spectrum[:split] = 0.0
    high = scipy.fft.irfft(spectrum, n=N, axis=0)
    # healthy impulsiveness lives above 2 kHz (the low band of the real files is near Gaussian): a slow
    # log-normal envelope on the high band gives each channel the real files' excess kurtosis
    frac = (_BAND_STD[:, 4:] ** 2).sum(axis=1) / (_BAND_STD**2).sum(axis=1)
    sigma = np.sqrt(np.log1p(_KURTOSIS / frac**2 / 3.0) / 4.0)
    knots = rng.standard_normal((129, 8))
    env = np.exp(np.stack([np.interp(np.arange(N), np.linspace(0, N, 129), knots[:, c]) for c in range(8)], axis=1)
                 * (sigma * _ENVELOPE_GAIN))
    high *= env / np.sqrt((env**2).mean(axis=0))
    noise = high + scipy.fft.irfft(low, n=N, axis=0)

    lines = np.zeros((N // 2 + 1, 8), dtype=complex)
    for b, amps in zip(_TONE_BINS, _TONE_AMP):
        lines[b] = amps * run_in * (N / 2) * np.exp(1j * rng.uniform(0, 2 * np.pi, 8))
    # bearing 3: inner race, impacts at BPFI with the shaft's load-zone modulation, in episodes
    episode3 = rng.lognormal(0.0, 0.35)
    if i3 > 0:
        train = scipy.fft.rfft(_impacts(rng, BPFI_HZ, SHAFT_HZ, 0.45, 2.6 * i3 * episode3, 4.0 * i3, BURST_GAIN))
        (fx, fy), decay = _RESONANCE[3]
        low = _SHOCK_GAIN[3] * _shock(_SHOCK_DECAY_S)
        lines[:, 4] += train * (_ringing(fx, decay) + low)
        lines[:, 5] += 0.85 * train * (_ringing(fy, decay) + low)
    # bearing 4: roller, impacts at 2 x BSF modulated by the cage; most impulsive mid-way, then broadband
    episode4 = rng.lognormal(0.0, 0.5)
    if i4 > 0:
        amp4 = 0.6 * np.sin(np.pi * min(i4, 1.0)) ** 2 * episode4
        train = scipy.fft.rfft(_impacts(rng, 2 * BSF_HZ, FTF_HZ, 0.5, amp4, 4.0 * i4, BURST_GAIN))
        (fx, fy), decay = _RESONANCE[4]
        low = _SHOCK_GAIN[4] * _shock(_SHOCK_DECAY_S)
        lines[:, 6] += train * (_ringing(fx, decay) + low)
        lines[:, 7] += 0.9 * train * (_ringing(fy, decay) + low)
    x = noise + scipy.fft.irfft(lines, n=N, axis=0) + _OFFSET * run_in
    return np.round(np.clip(x, -CLIP, CLIP), 3)


def format_ims(values: np.ndarray) -> bytes:
    """IMS ASCII text of an array with |x| < 10: '%.3f' cells, tab-separated, one row per line."""
    milli = np.rint(np.asarray(values, dtype=np.float64) * 1000.0).astype(np.int64)
    if milli.ndim != 2 or np.abs(milli).max(initial=0) >= 10000:
        raise ValueError("format_ims takes a 2-D array of values in (-10, 10)")
    rows, cols = milli.shape
    mag = np.abs(milli)
    cells = np.empty((rows, cols, 7), dtype=np.uint8)
    cells[..., 0] = np.where(milli < 0, ord("-"), 0)  # 0 marks a byte to drop
    cells[..., 1] = 48 + mag // 1000
    cells[..., 2] = ord(".")
    cells[..., 3] = 48 + mag // 100 % 10
    cells[..., 4] = 48 + mag // 10 % 10
    cells[..., 5] = 48 + mag % 10
    cells[..., 6] = ord("\t")
    cells[:, -1, 6] = ord("\n")
    flat = cells.reshape(-1)
    return flat[flat != 0].tobytes()


def _manifest(n_files: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "n_files": n_files, "seed": seed}


def is_generated(out_dir: str | os.PathLike, n_files: int = DEFAULT_FILES, seed: int = DEFAULT_SEED) -> bool:
    """True when out_dir already holds the recording these parameters generate."""
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text()) == _manifest(n_files, seed)
    except (OSError, ValueError):
        return False


def generate_recording(
    out_dir: str | os.PathLike,
    n_files: int = DEFAULT_FILES,
    seed: int = DEFAULT_SEED,
    workers: int | None = None,
    force: bool = False,
) -> list[Path]:
    """Write the synthetic recording into out_dir (replacing it whole, never leaving it half-written);
    its files in time order."""
    out_dir = Path(out_dir)
    indices = schedule(n_files)
    stamps = set1_timestamps()
    if not force and is_generated(out_dir, n_files, seed):
        return ims.list_ims_files(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:

        def write(i: int) -> None:
            (tmp / stamps[i].strftime(ims.NAME_FORMAT)).write_bytes(format_ims(synthesize_file(i, seed)))

        with ThreadPoolExecutor(workers or min(2, os.cpu_count() or 1)) as pool:
            list(pool.map(write, indices))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(n_files, seed)))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ims.list_ims_files(out_dir)
