"""Device emulator: the firmware on a real MicroPython VM (or CPython), its link UART on a pseudo-terminal."""

from tinyml_dagster.emulator.device_emulator import DeviceEmulator, install_firmware, write_config

__all__ = ["DeviceEmulator", "install_firmware", "write_config"]
