"""The Knowledge Base as a Dagster resource, and the device and link budgets the Release checks enforce."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.knowledge_base import KnowledgeBase


class KnowledgeBaseResource(dg.ConfigurableResource):
    """The Knowledge Base (SQLite, WAL) that the link service writes and the loop reads."""

    path: str = Field(default="", description="database path; empty: settings.kb_path() (TINYML_KB_PATH or <data>/kb.sqlite)")
    n_fp: int = Field(default=5, ge=1, description="false positives of a champion that trigger its replacement (paper: 5)")
    deploy_timeout_s: float = Field(default=900.0, gt=0, description="how long a deploy run waits for the link service")
    max_deploy_attempts: int = Field(default=3, ge=1, description="deploys of one episode tried before giving up")

    def open(self) -> KnowledgeBase:
        return KnowledgeBase(self.path or None)


class DeviceBudgetResource(dg.ConfigurableResource):
    """What a device can hold and how long a deploy may occupy the link (the paper's Release phase)."""

    flash_bytes: int = Field(default=256 * 1024, description="flash free for packages (staged + champion + previous)")
    heap_bytes: int = Field(default=96 * 1024, description="heap free for a loaded champion")
    baud: int = Field(default=2400, description="link speed, 8N1")
    turnaround_s: float = Field(default=0.1, description="half-duplex turnaround per direction change")
    deadline_s: float = Field(default=600.0, description="longest acceptable link time of one deploy")


class PoolResource(dg.ConfigurableResource):
    """The Pool Inference Engine over the model repository's candidates."""

    models_dir: str = Field(default="", description="model repository root; empty: settings.models_dir()")

    def engine(self):
        from tinyml_dagster.pool_inference import pool_from_repository

        return pool_from_repository(self.models_dir or None)

    def repository(self):
        from tinyml_dagster.model_repository import ModelRepository

        return ModelRepository(Path(self.models_dir) if self.models_dir else settings.models_dir())


defs = dg.Definitions(
    resources={
        "knowledge_base": KnowledgeBaseResource(n_fp=settings.n_fp()),
        "device_budget": DeviceBudgetResource(),
        "pool": PoolResource(),
    }
)
