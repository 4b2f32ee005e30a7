"""One place for the gateway's settings: where generated data lives, where the IMS recording is."""

import os
from pathlib import Path


def data_dir() -> Path:
    """Everything generated goes here (TINYML_DATA_DIR, default ./data)."""
    return Path(os.environ.get("TINYML_DATA_DIR", "data")).resolve()


def ims_dir() -> Path:
    """The IMS recording: TINYML_IMS_DIR when set, else the synthetic one under data/generated/."""
    env = os.environ.get("TINYML_IMS_DIR")
    if env:
        return Path(env).resolve()
    return data_dir() / "generated" / "ims" / "1st_test"


def kb_path() -> Path:
    """The Knowledge Base database (TINYML_KB_PATH, default <data>/kb.sqlite)."""
    env = os.environ.get("TINYML_KB_PATH")
    return Path(env).resolve() if env else data_dir() / "kb.sqlite"


def bench_dir() -> Path:
    """Where benchmarks and the demo write their JSON figures."""
    return data_dir() / "bench"


def n_fp() -> int:
    """False positives of a champion that trigger its replacement (TINYML_N_FP, paper: 5)."""
    return int(os.environ.get("TINYML_N_FP", "5"))
