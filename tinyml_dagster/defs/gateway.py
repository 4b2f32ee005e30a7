"""The gateway's configuration as one Dagster resource: where it stores everything and the loop's settings."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.deployment_agent import DeviceKeys, VersionLedger
from tinyml_dagster.knowledge_base import KnowledgeBase, location
from tinyml_dagster.model_repository import ModelRepository


class GatewayResource(dg.ConfigurableResource):
    """Paths and settings of one gateway; every other resource, asset and sensor reads them from here."""

    data_dir: str = Field(default="", description="root of everything the gateway stores; empty: TINYML_DATA_DIR "
                                                   "or ./data")
    kb_path: str = Field(default="", description="the Knowledge Base; empty: TINYML_KB_PATH or <data_dir>/kb.sqlite")
    kb_url: str = Field(default="", description="the Knowledge Base as a URL, before kb_path: sqlite:///<path> or "
                                                "postgresql://user@host/db (shared by many gateways); empty: "
                                                "TINYML_KB_URL, else kb_path")
    n_fp: int = Field(default_factory=settings.n_fp, ge=1,
                      description="false positives of a champion that trigger its replacement (paper: 5; TINYML_N_FP)")

    def root(self) -> Path:
        return Path(self.data_dir).resolve() if self.data_dir else settings.data_dir()

    def knowledge_base_path(self) -> Path:
        if self.kb_path:
            return Path(self.kb_path).resolve()
        return self.root() / "kb.sqlite" if self.data_dir else settings.kb_path()

    def models_dir(self) -> Path:
        return settings.models_dir(self.root())

    def knowledge_base_location(self) -> str | Path:
        """The Knowledge Base's URL (kb_url, TINYML_KB_URL) or its SQLite file's path."""
        url = self.kb_url or settings.kb_url()
        return location(url) if url else self.knowledge_base_path()

    def knowledge_base(self) -> KnowledgeBase:
        return KnowledgeBase(self.knowledge_base_location())

    def repository(self) -> ModelRepository:
        return ModelRepository(self.models_dir())

    def device_keys(self) -> DeviceKeys:
        """The per-device HMAC keys (TINYML_DEVICE_KEYS, else <data_dir>/keys/)."""
        return DeviceKeys(self.root() / "keys")

    def version_ledger(self) -> VersionLedger:
        """The devices' package versions."""
        return VersionLedger(self.root() / "deploy" / "versions.json")

    def packages_dir(self, device_id: str) -> Path:
        """Where a device's built packages are kept."""
        return self.root() / "packages" / device_id

    def device_flash_dir(self, device_id: str) -> Path:
        """An emulated device's flash filesystem."""
        return settings.device_flash_dir(device_id, self.root())
