"""Fixtures every layer's tests share."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
GATEWAY_ENV = ("TINYML_DEVICE_KEYS", "TINYML_KB_PATH", "TINYML_IMS_DIR", "TINYML_N_FP", "TINYML_SYNTHETIC_FILES",
               "TINYML_RECORDING")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """The test's own empty data directory (TINYML_DATA_DIR), with no other gateway setting from the environment."""
    root = tmp_path / "data"
    monkeypatch.setenv("TINYML_DATA_DIR", str(root))
    for name in GATEWAY_ENV:
        monkeypatch.delenv(name, raising=False)
    return root
