"""Devices are dynamic partitions: a fleet is a list in the UI."""

import dagster as dg

devices_partitions = dg.DynamicPartitionsDefinition(name="devices")
