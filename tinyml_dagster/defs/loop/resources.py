"""The Knowledge Base as a Dagster resource, and the device and link budgets the Release checks enforce."""


import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.link import LinkTiming
from tinyml_dagster.model_repository import ModelRepository


class KnowledgeBaseResource(dg.ConfigurableResource):
    """The Knowledge Base (SQLite, WAL) that the link service writes and the loop reads."""

    gateway: GatewayResource
    deploy_timeout_s: float = Field(default=900.0, gt=0, description="how long a deploy run waits for the link service")
    max_deploy_attempts: int = Field(default=3, ge=1, description="deploys of one episode tried before giving up")

    @property
    def n_fp(self) -> int:
        return self.gateway.n_fp

    def open(self) -> KnowledgeBase:
        return self.gateway.knowledge_base()


class DeviceBudgetResource(dg.ConfigurableResource):
    """What a device can hold and how long a deploy may occupy the link (the paper's Release phase)."""

    flash_bytes: int = Field(default=256 * 1024, description="flash free for packages (staged + champion + previous)")
    heap_bytes: int = Field(default=96 * 1024, description="heap free for a loaded champion")
    baud: int = Field(default=settings.LINK_BAUD, description="link speed, 8N1")
    turnaround_s: float = Field(
        default=settings.LINK_TURNAROUND_S, description="half-duplex turnaround per direction change"
    )
    deadline_s: float = Field(default=600.0, description="longest acceptable link time of one deploy")

    def timing(self) -> LinkTiming:
        return LinkTiming(self.baud, self.turnaround_s)


class PoolResource(dg.ConfigurableResource):
    """The Pool Inference Engine over the gateway's model repository's candidates."""

    gateway: GatewayResource

    def engine(self):
        from tinyml_dagster.pool_inference import pool_from_repository

        return pool_from_repository(self.gateway.models_dir())

    def repository(self) -> ModelRepository:
        return self.gateway.repository()
