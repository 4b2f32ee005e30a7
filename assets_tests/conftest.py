"""Fixtures every layer's tests share."""

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
GATEWAY_ENV = ("TINYML_DEVICE_KEYS", "TINYML_KB_PATH", "TINYML_KB_URL", "TINYML_IMS_DIR", "TINYML_N_FP",
               "TINYML_SYNTHETIC_FILES", "TINYML_RECORDING")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """The test's own empty data directory (TINYML_DATA_DIR), with no other gateway setting from the environment."""
    root = tmp_path / "data"
    monkeypatch.setenv("TINYML_DATA_DIR", str(root))
    for name in GATEWAY_ENV:
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture(scope="session")
def ims_files(tmp_path_factory) -> list[Path]:
    """The first 5 files of the synthetic set 1, in the IMS format: what an emulated device samples."""
    from tinyml_dagster import ims, synthetic

    out = tmp_path_factory.mktemp("ims")
    stamps = synthetic.set1_timestamps()
    for i in range(5):
        (out / stamps[i].strftime(ims.NAME_FORMAT)).write_bytes(synthetic.format_ims(synthetic.synthesize_file(i)))
    return ims.list_ims_files(out)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster for the session, in a temporary directory on a unix socket; skipped where the
    server is not installed, failed instead when TINYML_REQUIRE_POSTGRES is set (CI installs it)."""
    from tinyml_dagster.pg_cluster import TempCluster, server_bin_dir

    if server_bin_dir() is None:
        if os.environ.get("TINYML_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL server binaries (initdb) not found, and TINYML_REQUIRE_POSTGRES is set")
        pytest.skip("PostgreSQL server binaries (initdb) not installed: the PostgreSQL backend is not tested here")
    cluster = TempCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=["sqlite", "postgresql"])
def kb_location(request, tmp_path):
    """A fresh Knowledge Base on each backend: a SQLite file's path, a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / "kb.sqlite"
    return request.getfixturevalue("postgres_cluster").create_database()
