"""Device health on the gateway (the paper's Monitor phase): the devices' reports, their energy, their limits.

Energy per window comes from the device's measured active time (feature extraction + inference + the loop's work
on that window) with an ESP32 power model from Espressif's ESP32 Series Datasheet (v3.5, Table 6 "Power Consumption by
Power Modes"): the CPU on, radio off (Modem-sleep) at 240 MHz, dual-core, draws 30-68 mA; light-sleep 0.8 mA. The
model takes the upper figure, 68 mA, at the 3.3 V supply: 224.4 mW while the window is worked on. Time between
windows (sampling, waiting for the UART) is not counted: it depends on the power mode the board idles in.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPLY_V = 3.3
ACTIVE_MA = 68.0  # ESP32 Modem-sleep, 240 MHz dual-core, upper figure of 30-68 mA
LIGHT_SLEEP_MA = 0.8
ACTIVE_MW = SUPPLY_V * ACTIVE_MA
# the emulator's device clock: VM instructions (wasmtime fuel) x this; the calibration of docs/results.md (the
# paper-like forest's 8.7 ms for a 10-tree inference)
NS_PER_FUEL = 23.84
RESET_CAUSES = {0: "unknown", 1: "power on", 2: "hard reset", 3: "watchdog", 4: "deep sleep", 5: "soft reset"}


def energy_mj(active_ms: float) -> float:
    """Energy of active_ms of ESP32 work under the power model, in mJ."""
    return ACTIVE_MW * active_ms / 1000.0


def from_report(report: dict) -> dict:
    """A device's HEALTH fields (firmware.messages.HEALTH_FIELDS, times in us) as the Knowledge Base stores them."""
    out = {
        "windows": report["windows"],
        "feature_ms_mean": report["feature_us_mean"] / 1000.0,
        "feature_ms_max": report["feature_us_max"] / 1000.0,
        "inference_ms_mean": report["inference_us_mean"] / 1000.0,
        "inference_ms_max": report["inference_us_max"] / 1000.0,
        "active_ms_mean": report["active_us_mean"] / 1000.0,
        "free_heap_bytes": report["free_heap"],
        "largest_free_heap_bytes": report["largest_free_heap"],
        "uptime_s": report["uptime_s"],
        "resets": max(0, report["boots"] - 1),
        "reset_cause": report["reset_cause"],
        "retransmits": report["retransmits"],
        "link_errors": report["link_errors"],
        "settings_version": report["settings_version"],
    }
    out["energy_mj_per_window"] = round(energy_mj(out["active_ms_mean"]), 4)
    return out


@dataclass(frozen=True)
class HealthLimits:
    """When a device's health calls for the loop: slow inference, too little heap, too many resets."""

    inference_ms_max: float = 100.0  # mean inference time of a reporting period
    free_heap_min_bytes: int = 16 * 1024
    resets_max: int = 3  # resets within resets_window_s
    resets_window_s: float = 24 * 3600.0


def resets_within(history: list[dict], window_s: float) -> int:
    """Resets in the last window_s of a health history (oldest first): the newest count less the count before the
    window (or the lowest count inside it when nothing older is known)."""
    if not history:
        return 0
    start = history[-1]["received_at"] - window_s
    before = [h["resets"] for h in history if h["received_at"] < start]
    inside = [h["resets"] for h in history if h["received_at"] >= start]
    return history[-1]["resets"] - (before[-1] if before else min(inside))


def problems(history: list[dict], limits: HealthLimits) -> list[str]:
    """What crosses the limits in a device's health history (oldest first), in words; empty when healthy."""
    out = []
    periods = [h for h in history if h["windows"] > 0]  # a report at boot has no windows
    if periods and periods[-1]["inference_ms_mean"] > limits.inference_ms_max:
        out.append("inference %.1f ms > %.1f ms" % (periods[-1]["inference_ms_mean"], limits.inference_ms_max))
    if history and 0 < history[-1]["free_heap_bytes"] < limits.free_heap_min_bytes:
        out.append("free heap %d B < %d B" % (history[-1]["free_heap_bytes"], limits.free_heap_min_bytes))
    resets = resets_within(history, limits.resets_window_s)
    if resets > limits.resets_max:
        out.append("%d resets in %.0f h > %d (last: %s)" % (resets, limits.resets_window_s / 3600, limits.resets_max,
                                                             RESET_CAUSES.get(history[-1]["reset_cause"], "?")))
    return out
