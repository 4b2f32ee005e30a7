"""Feature windows are partitioned by sampling rate and bearing."""

import dagster as dg

from tinyml_dagster import settings

rate_partitions = dg.StaticPartitionsDefinition([str(r) for r in settings.RATES_HZ])
bearing_partitions = dg.StaticPartitionsDefinition([str(b) for b in settings.BEARINGS])
feature_partitions = dg.MultiPartitionsDefinition({"rate": rate_partitions, "bearing": bearing_partitions})


def feature_partition_key(rate_hz: int, bearing: int) -> dg.MultiPartitionKey:
    """The feature_windows partition of one (rate, bearing)."""
    return dg.MultiPartitionKey({"rate": str(int(rate_hz)), "bearing": str(int(bearing))})
