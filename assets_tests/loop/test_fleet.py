"""The fleet view: the Knowledge Base's read model per device, and fleet_sensor reporting only what changed."""

import json

import dagster as dg

from tinyml_dagster.defs.loop.fleet import fleet_sensor
from tinyml_dagster.defs.gateway import GatewayResource
from tinyml_dagster.defs.resources import gateway_resources
from tinyml_dagster.knowledge_base import KnowledgeBase, Upload


def _anomalies(kb: KnowledgeBase, device: str, seqs, pool_says_normal: bool = True, champion: str = "v1") -> None:
    """Anomalies the device's champion (its tag in uploads) reported; the pool calls them normal: false positives."""
    ids = kb.ingest([Upload(device, s, "anomaly", features=(0.0, 0.0, 9.0), champion_id=champion,
                            champion_decision=1)
                     for s in seqs]).upload_ids
    pool = kb.pool_id(["m1"])
    fp = int(pool_says_normal)
    kb.store_decisions(pool, ["m1"], [(i, 1 - fp, 1, 1 - fp, fp, b"", [True]) for i in ids])


def _deploy(kb: KnowledgeBase, device: str, model: str, episode: int | None, ok: bool, **kw) -> None:
    rid = kb.request_deploy(device, model, b"pkg", episode_id=episode)
    kb.claim_deploy([device])
    kb.finish_deploy(rid, ok, **kw)


def _fleet_kb(path) -> KnowledgeBase:
    """dev-a: its own champion, 5 false positives, replaced by b3-t40; dev-b: a deploy the device refused."""
    kb = KnowledgeBase(path)
    _anomalies(kb, "dev-a", range(1, 6))
    first = kb.current_champion("dev-a")
    _deploy(kb, "dev-a", "b3-t40", first.episode_id, True,
            figures={"package_bytes": 6123, "link_seconds": 31.26, "reason": "installed v1"})
    _anomalies(kb, "dev-b", [1])
    _deploy(kb, "dev-b", "b3-t50", None, False, error="RuntimeError: device refused the package: bad signature")
    return kb


def test_fleet_read_model(tmp_path):
    kb = _fleet_kb(tmp_path / "kb.sqlite")
    a, b = kb.fleet()
    assert a.device_id == "dev-a" and a.champion.model_id == "b3-t40" and a.champion.source == "deploy"
    assert a.previous.model_id == "v1" and a.previous.source == "reported"  # the device's own first champion
    assert a.false_positives == 0 and a.last_deploy["figures"]["link_seconds"] == 31.26
    assert b.champion.model_id == "v1" and b.previous is None and b.false_positives == 1
    assert b.last_deploy["status"] == "failed"


def test_fleet_sensor_reports_only_what_changed(tmp_path):
    path = tmp_path / "kb.sqlite"
    kb = _fleet_kb(path)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("devices", ["dev-a"])  # dev-b is not a partition yet

    resources = gateway_resources(GatewayResource(data_dir=str(tmp_path), kb_path=str(path)))

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
            return fleet_sensor(ctx)

    first = tick()
    (obs,) = [e for e in first.asset_events if isinstance(e, dg.AssetObservation)]
    assert obs.asset_key == dg.AssetKey("deployed_champion") and obs.partition == "dev-a"
    meta = {k: v.value for k, v in obs.metadata.items()}
    assert meta["champion"] == "b3-t40" and meta["source"] == "deployed" and meta["previous_champion"] == "v1"
    assert meta["false_positives_since_install"] == 0 and meta["last_deploy"] == "done (attempt 1)"
    assert meta["last_deploy_bytes"] == 6123 and meta["last_deploy_link_s"] == 31.3
    assert meta["last_deploy_reason"].startswith("replaced v1 after false-positive episode")
    assert meta["last_deploy_reason"].endswith("device: installed v1")
    (table,) = [e for e in first.asset_events if isinstance(e, dg.AssetMaterialization)]
    assert table.asset_key == dg.AssetKey("fleet") and table.metadata["devices"].value == 2
    md = table.metadata["table"].value
    assert "| dev-b | v1 |" in md and "the device refused the package: bad signature" in md

    # nothing changed: nothing reported
    again = tick(first.cursor)
    assert not again.asset_events and again.skip_reason
    # dev-b became a partition: its observation now, the table unchanged
    instance.add_dynamic_partitions("devices", ["dev-b"])
    joined = tick(again.cursor)
    assert [(type(e).__name__, e.partition) for e in joined.asset_events] == [("AssetObservation", "dev-b")]
    # a false positive against dev-a's champion (version 2 on the device): dev-a's observation and a new table
    _anomalies(kb, "dev-a", [7], champion="v2")
    fp = tick(joined.cursor)
    assert sorted(e.asset_key.to_user_string() + "/" + str(e.partition) for e in fp.asset_events) == [
        "deployed_champion/dev-a", "fleet/None"]
    assert json.loads(fp.cursor)["dev-b"] == json.loads(joined.cursor)["dev-b"]
