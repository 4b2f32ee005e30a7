"""Every resource of the definitions, built on one GatewayResource."""

import dagster as dg

from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.loop.resources import DeviceBudgetResource, KnowledgeBaseResource, PoolResource
from tinyml_dagster.defs.models.resources import ModelRepositoryResource
from tinyml_dagster.defs.monitor.health import HealthLimitsResource


def gateway_resources(gateway: GatewayResource) -> dict:
    """The resources of one gateway, keyed as the assets, jobs and sensors ask for them."""
    return {
        "gateway": gateway,
        "knowledge_base": KnowledgeBaseResource(gateway=gateway),
        "pool": PoolResource(gateway=gateway),
        "model_repository": ModelRepositoryResource(gateway=gateway),
        "device_budget": DeviceBudgetResource(),
        "health_limits": HealthLimitsResource(),
    }


@dg.definitions
def defs() -> dg.Definitions:
    """The default gateway: paths from the environment (TINYML_DATA_DIR, TINYML_KB_PATH), N_fp from TINYML_N_FP."""
    return dg.Definitions(resources=gateway_resources(GatewayResource()))
