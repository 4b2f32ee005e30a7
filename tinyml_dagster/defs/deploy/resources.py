"""The link to a device as a Dagster resource: a real serial port, or the simulated line with the real firmware."""

from __future__ import annotations

from typing import Callable

import dagster as dg
from pydantic import Field

from tinyml_dagster.deployment_agent import DeviceKeys, Package
from tinyml_dagster.link import Deployer, DeployReport, LinkTiming, SerialTransport


class DeviceLinkResource(dg.ConfigurableResource):
    """A device's power-line modem on a serial port (2,400 baud 8N1, half-duplex)."""

    port: str = Field(default="", description="serial port of the device's modem, e.g. /dev/ttyUSB0 or /dev/pts/N")
    baud: int = Field(default=2400, description="link speed, 8N1")
    turnaround_s: float = Field(default=0.1, description="half-duplex turnaround per direction change")
    window: int = Field(default=65, description="fragments per acknowledgement (1..65)")
    retries: int = Field(default=6, description="resends of an unanswered message before giving up")

    def timing(self) -> LinkTiming:
        return LinkTiming(self.baud, self.turnaround_s)

    def deploy(self, pkg: Package, progress: Callable[[dict], None], log: Callable[[str], None]) -> DeployReport:
        """Stream pkg to the device and return what happened."""
        if not self.port:
            raise dg.Failure("device_link.port is not set")
        transport = SerialTransport(self.port, self.timing())
        try:
            return Deployer(transport, window=self.window, retries=self.retries, progress=progress, log=log).deploy(pkg)
        finally:
            transport.close()


class SimulatedDeviceLinkResource(DeviceLinkResource):
    """The real firmware on a flash directory behind the simulated line (wire time scaled by time_scale)."""

    flash_dir: str = Field(description="the simulated device's flash directory (provisioned on first use)")
    time_scale: float = Field(default=0.05, description="real seconds per link second")

    def timing(self) -> LinkTiming:
        return LinkTiming(self.baud, self.turnaround_s, self.time_scale)

    def deploy(self, pkg: Package, progress: Callable[[dict], None], log: Callable[[str], None]) -> DeployReport:
        from pathlib import Path

        from tinyml_dagster.link.sim import DeviceHost, SimulatedLink, provision_flash

        timing = self.timing()
        if not (Path(self.flash_dir) / "deploy" / "key").exists():
            provision_flash(self.flash_dir, pkg.device_id, DeviceKeys().key(pkg.device_id), timing)
        with SimulatedLink(timing) as link:
            device = DeviceHost(self.flash_dir, link.device_uart).start()
            transport = SerialTransport(link.gateway_port, timing)
            try:
                return Deployer(transport, window=self.window, retries=self.retries, progress=progress,
                                log=log).deploy(pkg)
            finally:
                transport.close()
                device.stop()


defs = dg.Definitions(resources={"device_link": DeviceLinkResource()})
