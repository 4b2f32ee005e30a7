"""Gateway side of the power-line link: transport (pySerialTransfer), deploy protocol, simulated line."""

from .protocol import DeployError, Deployer, DeployReport
from .transport import LinkTiming, SerialTransport

__all__ = ["DeployError", "Deployer", "DeployReport", "LinkTiming", "SerialTransport"]
