"""Gateway side of the power-line link: transport (pySerialTransfer), deploy protocol, simulated line."""

from .protocol import DeployError, Deployer, DeployReport, LinkEstimate, estimate_deploy
from .transport import LinkTiming, SerialTransport

__all__ = ["DeployError", "Deployer", "DeployReport", "LinkEstimate", "LinkTiming", "SerialTransport",
           "estimate_deploy"]
