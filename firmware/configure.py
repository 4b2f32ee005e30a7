"""Settings updates on the device (the paper's Configure phase): run-time parameters without a package.

A CONFIG_UPDATE is sealed by the gateway under the device's key and numbered: only a version above every one the
device applied passes (no replay). Its settings are checked against the champion's manifest (its config.json) and
the device's limits, then written atomically to <root>/settings.json with the settings they replace, which a
later update with CONFIG_REVERT restores. A refused update changes nothing; the reason goes back to the gateway.

settings.json: {"version": v, "values": {name: value}, "previous": {name: value}, "champion": [id, version],
"previous_champion": [id, version]} ("champion": the champion a threshold was set for, a new champion brings its
own threshold; "previous_champion": that of the previous settings, for a revert).
"""

import json
import struct

from firmware import alarms, messages
from firmware._compat import read_json, write_json

# name -> (type, lowest, highest); window_ms is further limited to what the champion's manifest allows
LIMITS = {
    "threshold": (float, 0.0, 1.0),  # an Isolation Forest score is in (0, 1): both ends excluded
    "alarm_span_s": (int, 1, 86400),
    "alarm_raise": (float, 0.0, 1.0),
    "alarm_clear": (float, 0.0, 1.0),
    "alarm_min_windows": (int, 1, 10000),
    "upload_every": (int, 1, 100000),
    "window_ms": (int, 50, 10000),
    "health_every": (int, 0, 65535),
}


class SettingsError(ValueError):
    """A settings update that must not be applied; str() is the reason sent to the gateway."""


def load(root):
    """The settings file's content ({} before the first update)."""
    try:
        return read_json(root + "/settings.json", {}) or {}
    except ValueError:
        return {}  # never trust flash: a corrupt file means the defaults


def check_value(name, value):
    """value as the setting's type; SettingsError naming an unknown or out-of-range setting."""
    if name not in LIMITS:
        raise SettingsError("unknown setting %s (known: %s)" % (name, ", ".join(sorted(LIMITS))))
    kind, low, high = LIMITS[name]
    if type(value) is bool or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise SettingsError("setting %s must be %s, got %r" % (name, kind.__name__, value))
    value = kind(value)
    if name == "threshold" and not low < value < high:
        raise SettingsError("setting threshold %r out of range: need %s < threshold < %s" % (value, low, high))
    if not low <= value <= high:
        raise SettingsError("setting %s %r out of range %s..%s" % (name, value, low, high))
    return value


def check(values, cfg, champion):
    """Validate the settings in force after an update (values over the device's cfg) against the champion's
    manifest (its config.json, None before the first champion); SettingsError with the reason."""
    for k in values:
        values[k] = check_value(k, values[k])
    eff = dict(cfg)
    eff.update(values)
    try:
        alarms.check({"span_s": eff["alarm_span_s"], "raise_fraction": eff["alarm_raise"],
                      "clear_fraction": eff["alarm_clear"], "min_windows": eff["alarm_min_windows"]})
    except ValueError as e:
        raise SettingsError(str(e)) from None
    if eff["alarm_span_s"] * 1000 < eff["alarm_min_windows"] * eff["window_ms"]:
        raise SettingsError("alarm span %d s cannot hold alarm_min_windows %d windows of %d ms"
                            % (eff["alarm_span_s"], eff["alarm_min_windows"], eff["window_ms"]))
    if "window_ms" in values and values["window_ms"] != cfg["window_ms"]:
        manifest = champion or {}
        allowed = manifest.get("window_ms_allowed") or [manifest.get("window_ms", cfg["window_ms"])]
        if values["window_ms"] not in allowed:
            raise SettingsError("window_ms %d not allowed by champion %s (it takes %s ms)"
                                % (values["window_ms"], manifest.get("model_id", "-"),
                                   ", ".join(str(w) for w in allowed)))
    return values


def parse(body):
    """(version, flags, changes dict) of a verified CONFIG_UPDATE body; SettingsError when malformed."""
    head = struct.calcsize(messages.CONFIG_FORMAT)
    if len(body) < head:
        raise SettingsError("malformed settings update: %d bytes" % len(body))
    version, flags = struct.unpack_from(messages.CONFIG_FORMAT, body, 0)
    changes = {}
    if len(body) > head:
        try:
            changes = json.loads(bytes(body[head:]).decode())
        except (ValueError, UnicodeError):
            raise SettingsError("malformed settings update: settings are not JSON") from None
        if not isinstance(changes, dict):
            raise SettingsError("malformed settings update: settings are not a JSON object")
    return version, flags, changes


def propose(stored, version, flags, changes, cfg, champion):
    """The new settings file of an update (validated), or SettingsError; stored is the current file."""
    have = stored.get("version", 0)
    if version <= have:
        raise SettingsError("replayed or old settings update: version %d <= %d" % (version, have))
    current = stored.get("values", {})
    if flags & messages.CONFIG_REVERT:
        if "previous" not in stored:
            raise SettingsError("no previous settings to revert to")
        values = dict(stored["previous"])
    else:
        values = dict(current)
        values.update(changes)
    if "threshold" in changes and not flags & messages.CONFIG_REVERT and champion is None:
        raise SettingsError("no champion yet: a threshold is set for the champion in force")
    values = check(values, cfg, champion)
    new = {"version": version, "values": values, "previous": current}
    # the champion a threshold holds for: the one in force when it was set
    if flags & messages.CONFIG_REVERT:
        bound = stored.get("previous_champion")
    elif "threshold" in changes:
        bound = [champion.get("model_id", ""), int(champion.get("version", 0))]
    else:
        bound = stored.get("champion")
    if "threshold" in values and bound:
        new["champion"] = bound
    if stored.get("champion"):
        new["previous_champion"] = stored["champion"]
    return new


def commit(root, new):
    """Write the new settings file atomically (a reboot leaves the old or the new one)."""
    write_json(root + "/settings.json", new)


def result_body(echo, applied, version, reason, in_force):
    """CONFIG_RESULT body: status, the settings version, the reason (cut to fit), the settings in force (JSON)."""
    settings = json.dumps(in_force, separators=(",", ":")).encode()
    why = reason.encode()[:max(0, messages.MAX_BODY - struct.calcsize(messages.CONFIG_RESULT_FORMAT) - len(settings))]
    return struct.pack(messages.CONFIG_RESULT_FORMAT, echo, messages.CONFIG_APPLIED if applied else
                       messages.CONFIG_REFUSED, version, len(why)) + why + settings


def unpack_result(body):
    """(applied, version, reason, settings in force dict or None) of a CONFIG_RESULT body."""
    n = struct.calcsize(messages.CONFIG_RESULT_FORMAT)
    if len(body) < n:
        raise ValueError("CONFIG_RESULT body of %d bytes" % len(body))
    _, status, version, nr = struct.unpack_from(messages.CONFIG_RESULT_FORMAT, body, 0)
    reason = bytes(body[n:n + nr]).decode()
    try:
        in_force = json.loads(bytes(body[n + nr:]).decode())
    except ValueError:
        in_force = None
    return status == messages.CONFIG_APPLIED, version, reason, in_force


def pack_update(key, device_id, version, changes, revert=False):
    """A sealed CONFIG_UPDATE body (the gateway's side; here so both ends share one definition)."""
    body = struct.pack(messages.CONFIG_FORMAT, version, messages.CONFIG_REVERT if revert else 0)
    if changes:
        body += json.dumps(changes).encode()
    return messages.seal(key, messages.TAG_CONFIG, device_id, body)
