"""Settings updates from the gateway (the paper's Configure phase): versioned, checked, queued for the link service.

The device checks every update again against its champion's manifest and answers with the settings in force;
firmware/configure.py holds both checks' rules and the message's layout.
"""

from __future__ import annotations

from pathlib import Path

from firmware import configure
from tinyml_dagster.deployment_agent import VersionLedger
from tinyml_dagster.knowledge_base import KnowledgeBase

SETTINGS = tuple(configure.LIMITS)


def settings_ledger(root: Path) -> VersionLedger:
    """The devices' settings versions (strictly increasing per device, like package versions: no replay)."""
    return VersionLedger(Path(root) / "deploy" / "settings_versions.json")


def checked_settings(values: dict) -> dict:
    """values with each setting's type and range checked by the device's own rules; ValueError naming the first
    that fails."""
    try:
        return {k: configure.check_value(k, v) for k, v in values.items()}
    except configure.SettingsError as e:
        raise ValueError(str(e)) from None


def queue_settings(kb: KnowledgeBase, device_ids: list[str], values: dict, ledger: VersionLedger, *,
                   revert: bool = False, run_id: str | None = None) -> list[int]:
    """Queue one settings update per device, each under the device's next settings version; the request ids."""
    values = checked_settings(values)
    return [kb.request_settings(d, ledger.next(d), values, revert, run_id) for d in device_ids]


def configure_through_link_service(kb: KnowledgeBase, device_ids: list[str], values: dict, ledger: VersionLedger, *,
                                   revert: bool = False, timeout_s: float = 120.0, run_id: str | None = None
                                   ) -> list[dict]:
    """Queue the update for every device and wait for the link service's outcomes (applied, refused or failed)."""
    ids = queue_settings(kb, device_ids, values, ledger, revert=revert, run_id=run_id)
    return [kb.wait_settings(i, timeout=timeout_s) for i in ids]
