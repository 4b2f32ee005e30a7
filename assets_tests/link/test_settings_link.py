"""The link service's side of Configure and Monitor on a real pty: a settings update goes out sealed under the
device's key and a silent device fails it with the reason; only the device's own HEALTH reports are stored."""

from __future__ import annotations

from gateway_harness import KEY, Pty, running, wait_for

from firmware import configure, messages
from tinyml_dagster.knowledge_base import KnowledgeBase
from tinyml_dagster.link.transport import LinkTiming

HEALTH = {"windows": 10, "feature_us_mean": 190000, "feature_us_max": 200000, "inference_us_mean": 2300,
          "inference_us_max": 2500, "active_us_mean": 195000, "free_heap": 90000, "largest_free_heap": 60000,
          "uptime_s": 600, "boots": 4, "reset_cause": 3, "retransmits": 2, "link_errors": 1, "settings_version": 7}


def test_a_settings_update_is_sealed_for_the_device_and_a_silent_device_fails_it(tmp_path):
    kb_path = tmp_path / "kb.sqlite"
    port = Pty("dev-a")
    kb = KnowledgeBase(kb_path)
    rid = kb.request_settings("dev-a", 3, {"threshold": 0.55})
    try:
        with running(kb_path, ports={"dev-a": port.path}, timing=LinkTiming(time_scale=0.05)):
            got = port.read(1, until=lambda g: any(t == messages.CONFIG_UPDATE for t, _ in g))
            (body,) = [b for t, b in got if t == messages.CONFIG_UPDATE]
            assert configure.parse(messages.unseal(KEY, messages.TAG_CONFIG, "dev-a", body)) == (
                3, 0, {"threshold": 0.55})
            assert messages.unseal(KEY, messages.TAG_CONFIG, "dev-b", body) is None  # bound to its device
            assert wait_for(lambda: kb.settings_request(rid)["status"] == "failed", timeout=60)
    finally:
        port.close()
    outcome = kb.settings_request(rid)
    assert "no answer to the settings update" in outcome["reason"] and outcome["in_force"] is None


def test_only_the_devices_own_health_reports_are_stored(tmp_path):
    kb_path = tmp_path / "kb.sqlite"
    port = Pty("dev-a")
    try:
        with running(kb_path, ports={"dev-a": port.path}):
            body = messages.pack_health(HEALTH)
            port.send(messages.HEALTH, messages.seal(b"not the device's key", messages.TAG_HEALTH, "dev-a", body))
            port.send(messages.HEALTH, port.sealed(messages.TAG_HEALTH, body))
            kb = KnowledgeBase(kb_path)
            assert wait_for(lambda: kb.health_history("dev-a"))
    finally:
        port.close()
    (h,) = kb.health_history("dev-a")
    assert (h["inference_ms_mean"], h["feature_ms_max"], h["resets"], h["reset_cause"]) == (2.3, 200.0, 3, 3)
    assert h["energy_mj_per_window"] == round(3.3 * 68 * 0.195, 4)
