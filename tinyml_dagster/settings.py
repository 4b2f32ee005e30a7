"""One place for paths and knobs: TINYML_DATA_DIR (generated content), TINYML_IMS_DIR (real IMS files) and
TINYML_RECORDING (a recording spec: a user's own recording, whose channels and rates then set the partitions)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "TINYML_DATA_DIR"
IMS_DIR_ENV = "TINYML_IMS_DIR"

# sampling rates of the paper's experiments, and the bearings of IMS set 1
RATES_HZ: tuple[int, ...] = (500, 1000, 2000)
# the project's default: the bearings' defect frequencies (~280-300 Hz) lie above 500 Hz sampling's 250 Hz limit, and
# docs/results.md measures the best detection at 2 kHz (the paper used 500 Hz)
DEFAULT_RATE_HZ = 2000
BEARINGS: tuple[int, ...] = (1, 2, 3, 4)
TRAIN_FRACTION = 0.6
# the power-line link: 8N1 at LINK_BAUD, half-duplex, a turnaround at every change of direction
LINK_BAUD = 2400
LINK_TURNAROUND_S = 0.1
WINDOW_MS = 500  # feature window length (a recording spec's window_s sets it)
RECORDING_ENV = "TINYML_RECORDING"


def recording_spec_file() -> Path | None:
    """The recording spec in use (TINYML_RECORDING), or None for the IMS recording."""
    chosen = os.environ.get(RECORDING_ENV)
    return Path(chosen).resolve() if chosen else None


def _apply_recording_spec() -> None:
    """With a recording spec, its rates, monitored units (numbered 1..n as "bearings") and window are the settings."""
    global RATES_HZ, DEFAULT_RATE_HZ, BEARINGS, WINDOW_MS
    path = recording_spec_file()
    if path is None:
        return
    from tinyml_dagster.recordings import spec as recording_spec

    spec = recording_spec.load_spec(path)
    units = spec.monitor or spec.channels
    if not units:
        raise recording_spec.SpecError(f"{path}: channels: name the channels (inspect writes them) so that the "
                                       "partitions can be made before any file is read")
    RATES_HZ = tuple(recording_spec.device_rates(spec))
    DEFAULT_RATE_HZ = recording_spec.device_rate(spec)
    BEARINGS = tuple(range(1, len(units) + 1))
    WINDOW_MS = recording_spec.window_ms(spec)


_apply_recording_spec()


def data_dir() -> Path:
    """Root of everything generated (TINYML_DATA_DIR, default ./data;
    a recording spec's own: ./data/recordings/<spec>)."""
    spec = recording_spec_file()
    default = Path("data") / "recordings" / spec.stem if spec else Path("data")
    return Path(os.environ.get(DATA_DIR_ENV) or default).resolve()


def generated_ims_dir(root: Path | None = None) -> Path:
    """Where the synthetic set-1 recording is written."""
    return (root or data_dir()) / "generated" / "ims" / "1st_test"


def ims_dir(override: str | os.PathLike | None = None) -> Path:
    """The IMS recording to use: override, else TINYML_IMS_DIR, else the synthetic one under data/."""
    chosen = override or os.environ.get(IMS_DIR_ENV)
    return Path(chosen).resolve() if chosen else generated_ims_dir()


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable and the rule."""


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    """An integer environment variable, parsed strictly (ConfigError naming it otherwise); default when unset."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip()
    if not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        raise ConfigError("%s=%r: not an integer" % (name, raw))
    value = int(text)
    if minimum is not None and value < minimum:
        raise ConfigError("%s=%d: must be >= %d" % (name, value, minimum))
    return value


def synthetic_files(default: int = 240) -> int:
    """Files of the synthetic recording (TINYML_SYNTHETIC_FILES; 2156 is full-scale set 1)."""
    return env_int("TINYML_SYNTHETIC_FILES", default, minimum=1)


def is_synthetic(directory: Path) -> bool:
    """True when directory is the generated recording (so the pipeline may (re)create it)."""
    return Path(directory).resolve() == generated_ims_dir().resolve()


def subsampled_dir(root: Path | None = None) -> Path:
    """Subsampled signals, one .npy per rate."""
    return (root or data_dir()) / "subsampled"


def features_dir(root: Path | None = None) -> Path:
    """Feature windows: features/rate=<hz>/bearing=<b>.parquet."""
    return (root or data_dir()) / "features"


def feature_path(rate_hz: int, bearing: int, root: Path | None = None) -> Path:
    """Parquet file of one (rate, bearing) partition."""
    return features_dir(root) / f"rate={int(rate_hz)}" / f"bearing={int(bearing)}.parquet"


def models_dir(root: Path | None = None) -> Path:
    """The model repository."""
    return (root or data_dir()) / "models"


def kb_path() -> Path:
    """The Knowledge Base database (TINYML_KB_PATH, default <data>/kb.sqlite)."""
    env = os.environ.get("TINYML_KB_PATH")
    return Path(env).resolve() if env else data_dir() / "kb.sqlite"


def kb_url() -> str | None:
    """The Knowledge Base as a URL (TINYML_KB_URL: sqlite:///<path> or postgresql://...), None: kb_path()."""
    return os.environ.get("TINYML_KB_URL") or None


def bench_dir(root: Path | None = None) -> Path:
    """Where benchmarks and the demo write their JSON figures."""
    return (root or data_dir()) / "bench"


def n_fp() -> int:
    """False positives of a champion that trigger its replacement (TINYML_N_FP, paper: 5)."""
    return env_int("TINYML_N_FP", 5, minimum=1)


def device_flash_dir(device_id: str, root: Path | None = None) -> Path:
    """An emulated device's flash filesystem."""
    return (root or data_dir()) / "devices" / device_id / "flash"


COHORT_ENV = "TINYML_COHORT"


def cohort() -> dict[str, int]:
    """The devices' cohort the pool serves (TINYML_COHORT, e.g. "bearing=3,rate_hz=2000"); {}: every candidate."""
    raw = os.environ.get(COHORT_ENV, "").strip()
    out = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("bearing", "rate_hz") or not value.isdigit():
            raise ValueError("%s=%r: expected bearing=<n>,rate_hz=<Hz> (got %r)" % (COHORT_ENV, raw, part))
        out[key] = int(value)
    return out
