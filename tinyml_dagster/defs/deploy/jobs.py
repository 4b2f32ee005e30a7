"""deploy_champion_job: an operator's deploy of a chosen repository model to a device, through the link service."""

import dagster as dg
from pydantic import Field

from tinyml_dagster.defs.deploy.link import deploy_or_fail
from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource
from tinyml_dagster.deployment_agent import AUTO, ENCODINGS, choose_encoding, deploy_outcome_metadata, next_package


class DeployConfig(dg.Config):
    model_id: str = Field(description="repository model id to deploy")
    device_id: str = Field(description="target device")
    encoding: str = Field(default=AUTO, description=(
        "model encoding: auto (default: mpy for a device whose HELLO reported a .mpy version the gateway's "
        "mpy-cross writes, else compact), compact, json, mpy (precompiled for the device's MicroPython) or "
        "mpy+compact (the sources beside, for a device that cannot load the .mpy)"))


@dg.op(description="Package the model for the device, queue it for the link service and wait for the device's answer.")
def deploy_champion(context: dg.OpExecutionContext, config: DeployConfig, knowledge_base: KnowledgeBaseResource,
                    gateway: GatewayResource) -> dict:
    if config.encoding not in (AUTO, *ENCODINGS):
        raise dg.Failure(f"encoding {config.encoding!r}: one of {[AUTO, *sorted(ENCODINGS)]}")
    with knowledge_base.open() as kb:
        sys_mpy = kb.device_sys_mpy(config.device_id)
        if config.encoding == AUTO:
            context.log.info("encoding %s: %s" % choose_encoding(sys_mpy))
        pkg = next_package(gateway.repository(), config.model_id, config.device_id, config.encoding,
                           keys=gateway.device_keys(), ledger=gateway.version_ledger(), sys_mpy=sys_mpy)
        context.log.info(f"package {pkg.model_id} v{pkg.version} ({pkg.encoding}): {pkg.size} bytes, "
                         f"sha256 {pkg.sha256.hex()[:16]}")
        outcome = deploy_or_fail(kb, pkg, knowledge_base.deploy_timeout_s, context)
    meta = deploy_outcome_metadata(outcome)
    context.add_output_metadata(meta)
    context.log.info(f"device {pkg.device_id} runs {meta.get('device_champion_id')} "
                     f"v{meta.get('device_champion_version')}")
    return meta


@dg.job(description="Deploy a chosen repository model to one device "
                    "(the loop's replacements use replace_champion_job).")
def deploy_champion_job():
    deploy_champion()
