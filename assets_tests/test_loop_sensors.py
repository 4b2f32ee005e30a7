"""Loop sensors: cursor on the Knowledge Base, devices as dynamic partitions, once-per-episode replacement."""

import json

import dagster as dg
import pytest

from tinyml_dagster.defs.loop.resources import KnowledgeBaseResource
from tinyml_dagster.defs.loop.sensors import device_uploads_sensor
from tinyml_dagster.definitions import defs
from tinyml_dagster.knowledge_base import KnowledgeBase, Upload


def test_definitions_load_with_the_loop():
    d = defs()
    d.get_repository_def().load_all_definitions()
    keys = {a.key.to_user_string() for a in d.resolve_all_asset_specs()}
    assert {"pool_decisions", "device_champions", "champion_package", "deployed_champion",
            "retrained_candidate_models"} <= keys
    assert {s.name for s in d.sensors} >= {"device_uploads_sensor", "false_positive_sensor"}
    assert "retrain_schedule" in {s.name for s in d.schedules}
    assert {j.name for j in d.jobs} >= {"pool_decisions_job", "replace_champion_job", "retrain_job"}


def test_device_uploads_sensor_cursor_and_partitions(tmp_path):
    path = tmp_path / "kb.sqlite"
    kb = KnowledgeBase(path)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"knowledge_base": KnowledgeBaseResource(path=str(path))}

    ctx = dg.build_sensor_context(instance=instance, resources=resources)
    result = device_uploads_sensor(ctx)
    assert not result.run_requests and result.skip_reason

    kb.ingest([Upload(d, s, "normal", features=(0, 0, 0), champion_id="v1", champion_decision=0)
               for d in ("dev-a", "dev-b") for s in (1, 2)])
    ctx = dg.build_sensor_context(instance=instance, resources=resources)
    result = device_uploads_sensor(ctx)
    (req,) = result.run_requests
    assert req.run_key == "uploads-through-4"
    assert json.loads(result.cursor) == {"upload_id": 4}
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "devices" and sorted(add.partition_keys) == ["dev-a", "dev-b"]
    instance.add_dynamic_partitions("devices", list(add.partition_keys))

    # re-evaluation with the same cursor: nothing new, no new partitions
    ctx = dg.build_sensor_context(instance=instance, resources=resources, cursor=result.cursor)
    again = device_uploads_sensor(ctx)
    assert not again.run_requests and not again.dynamic_partitions_requests

    kb.ingest([Upload("dev-c", 1, "anomaly", features=(0, 0, 9), champion_id="v1", champion_decision=1)])
    ctx = dg.build_sensor_context(instance=instance, resources=resources, cursor=result.cursor)
    third = device_uploads_sensor(ctx)
    assert [r.run_key for r in third.run_requests] == ["uploads-through-5"]
    assert list(third.dynamic_partitions_requests[0].partition_keys) == ["dev-c"]
