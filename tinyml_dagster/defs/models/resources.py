"""The model repository as a Dagster resource."""

import dagster as dg

from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.model_repository import ModelRepository


class ModelRepositoryResource(dg.ConfigurableResource):
    """The gateway's model repository (model files plus an index) under <data_dir>/models."""

    gateway: GatewayResource

    def open(self) -> ModelRepository:
        return self.gateway.repository()
