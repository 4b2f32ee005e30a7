"""deploy_champion_job: stream a repository model's package to a device over the link."""


import dagster as dg
from pydantic import Field

from tinyml_dagster import settings
from tinyml_dagster.deployment_agent import DeviceKeys, VersionLedger, package_model
from tinyml_dagster.defs.deploy.resources import DeviceLinkResource
from tinyml_dagster.link import DeployError


class DeployConfig(dg.Config):
    model_id: str = Field(description="repository model id to deploy")
    device_id: str = Field(description="target device")
    encoding: str = Field(default="compact", description="model encoding: compact (default) or json")
    models_dir: str = Field(default="", description="model repository root; empty: settings.models_dir()")


def package_for(model_id: str, device_id: str, encoding: str, version: int, models_dir: str = ""):
    """Build the signed package of a repository model for one device and version."""
    from pathlib import Path

    from tinyml_dagster.model_repository import ModelRepository

    repo = ModelRepository(Path(models_dir) if models_dir else settings.models_dir())
    return package_model(repo, model_id, device_id=device_id, version=version,
                         key=DeviceKeys().key(device_id), encoding=encoding)


@dg.op(description="Stream the chosen package to the device; progress in the log, deployment metadata at the end.")
def deploy_champion(context: dg.OpExecutionContext, config: DeployConfig, device_link: DeviceLinkResource) -> dict:
    version = VersionLedger().next(config.device_id)
    pkg = package_for(config.model_id, config.device_id, config.encoding, version, config.models_dir)
    context.log.info(f"package {config.model_id} v{version} ({config.encoding}): {pkg.size} bytes, "
                     f"sha256 {pkg.sha256.hex()[:16]}")

    def progress(p: dict) -> None:
        context.log.info(f"{p['what']} {p['bytes']}/{p['total']} bytes, {p['frames']} frames, "
                         f"{p['retransmissions']} retransmissions, {p['link_seconds']} s, ETA {p['eta_seconds']} s")

    try:
        rep = device_link.deploy(pkg, progress, context.log.info)
    except DeployError as exc:
        raise dg.Failure(f"deploy of {config.model_id} to {config.device_id} failed: {exc}; the device keeps "
                         "its champion and the next attempt resumes") from exc
    meta = rep.as_metadata()
    context.add_output_metadata({k: v for k, v in meta.items() if v is not None})
    if not rep.installed:
        context.log.error(f"device {config.device_id} refused {config.model_id} v{version}: {rep.reason}")
        raise dg.Failure(f"device refused the package: {rep.reason}", metadata={"reason": rep.reason})
    context.log.info(f"device {config.device_id} runs {rep.device_champion_id} v{rep.device_champion_version}")
    return meta


@dg.job(description="Deploy a repository model to a device over the power-line link.")
def deploy_champion_job():
    deploy_champion()
