"""The model repository as a Dagster resource."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.model_repository import ModelRepository


class ModelRepositoryResource(dg.ConfigurableResource):
    """The model repository (model files plus an index) under data/models/."""

    models_dir: str = Field(default="", description="repository root; empty: settings.models_dir() (<data>/models)")

    def open(self) -> ModelRepository:
        return ModelRepository(Path(self.models_dir) if self.models_dir else settings.models_dir())


defs = dg.Definitions(resources={"model_repository": ModelRepositoryResource()})
