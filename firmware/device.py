"""The device's main loop: Data In -> (Local Training | Local Inference) -> Data Comm, with state on flash."""

import json
import time

from firmware import alarms, configure, feature_sets, features, messages
from firmware._compat import (clock_us, collect, exists, heap_info, makedirs, read_json, reset_cause, sleep_ms,
                              ticks_diff, ticks_ms, write_json)
from firmware.data_comm import (PHASE_COLLECTING, PHASE_INFERRING, DataComm, pack_hello, pack_hello_health,
                                pack_hello_runtime)
from firmware.data_in import DataIn
from firmware.local_inference import LocalInference
from firmware.local_training import LocalTraining
from firmware.model_deployment_agent import ModelDeploymentAgent

DEFAULT_CONFIG = {
    "device_id": "esp32-0",
    "rate_hz": 2000,
    "window_ms": features.WINDOW_MS,
    "n_train": 64,
    "n_trees": 50,
    "psi": 64,
    "seed": 1,
    "threshold": 0.6,
    "upload_every": 10,
    "outbox_max": 64,
    "baud": 2400,
    "ack_timeout_ms": 5000,
    "save_every": 20,
    # the features the first (self-trained) champion uses; a received champion's config.json names its own
    "feature_set": feature_sets.PAPER,
    "feature_params": {},
    # the self-trained champion's threshold on a set other than the paper's: the share of its training windows
    # above it (local_training.calibrated_threshold); the paper's set keeps `threshold`
    "target_fa": 0.002,
    # alarm rule (firmware/alarms.py): raised when >= alarm_raise of the windows of the last alarm_span_s seconds
    # are anomalous (at least alarm_min_windows of them), cleared when <= alarm_clear
    "alarm_span_s": 600,
    "alarm_raise": 0.5,
    "alarm_clear": 0.1,
    "alarm_min_windows": 4,
    # a HEALTH report every health_every windows (0: only at boot)
    "health_every": 50,
}


def default_root():
    """/flash in the VM and the emulator, the filesystem root on a board."""
    return "/flash" if exists("/flash") else ""


class State:
    """Counters and numbers that survive a reboot, in <root>/state.json."""

    def __init__(self, root):
        self.path = root + "/state.json"
        self.data = read_json(self.path, {})

    def save(self):
        write_json(self.path, self.data)


def load_config(root):
    """Device config: defaults overlaid with <root>/config.json; ValueError naming a bad field."""
    cfg = dict(DEFAULT_CONFIG)
    user = read_json(root + "/config.json", {})
    for k in user:
        if k not in cfg:
            raise ValueError("%s/config.json: unknown field %s" % (root, k))
        if type(user[k]) is not type(cfg[k]) and not (isinstance(cfg[k], float) and isinstance(user[k], int)):
            raise ValueError("%s/config.json: field %s must be %s" % (root, k, type(cfg[k]).__name__))
        cfg[k] = user[k]
    return cfg


class Device:
    """Wires the paper's device components together; step() is one turn of the main loop."""

    def __init__(self, data_uart, link_uart, root=None, transfer_factory=None, reset_cause=None):
        self.root = default_root() if root is None else root
        makedirs(self.root + "/deploy")
        self.cfg = cfg = load_config(self.root)
        self.base_cfg = dict(cfg)  # before the settings updates
        self.settings = configure.load(self.root)
        cfg.update(self._settings_values())
        self.state = State(self.root)
        self.state.data["boots"] = self.state.data.get("boots", 0) + 1
        self.state.data["reset_cause"] = _reset_cause() if reset_cause is None else reset_cause
        self.booted_at = ticks_ms()
        self.uptime_ms = 0
        self.health = Health()
        self.features = (cfg["feature_set"], cfg["feature_params"])
        self._shipped_features = None  # the feature module that came with the champion, when it is in use
        self.data_in = DataIn(data_uart, cfg["rate_hz"], cfg["window_ms"],
                              feature_sets.extractor(cfg["feature_set"], cfg["feature_params"]))
        self.inference = LocalInference()
        self.alarm_no = 0  # the number of the alarm raised last (its clear carries it too)
        self.alarm = self.new_alarm_rule()
        self.training = LocalTraining(cfg["n_train"], cfg["n_trees"], cfg["psi"], cfg["seed"])
        self.agent = ModelDeploymentAgent(self.root, cfg["device_id"], self.inference, self.state,
                                          cfg["threshold"])
        self.agent.boot()
        self._champion_features = self.inference.feature_set
        self.sync_features()
        transfer = None
        if transfer_factory is None:
            try:
                from firmware import transfer as _transfer

                transfer = _transfer.Receiver(self.root, self.agent)
            except ImportError:
                transfer = None
        else:
            transfer = transfer_factory(self.root, self.agent)
        self.comm = DataComm(link_uart, self.root, self.state, cfg["baud"], cfg["outbox_max"],
                             cfg["upload_every"], cfg["ack_timeout_ms"], transfer, self.hello, cfg["device_id"])
        self.comm.configure = self.handle_config
        self.apply_threshold()
        self.windows = 0
        self.scored = {}  # champion version -> [windows scored, anomalies] since boot
        self.state.save()
        self.last_health = self.health.report(self, 0)
        self.comm.send(messages.HELLO, self.hello())
        self.send_health(self.last_health)

    def hello(self):
        d = self.state.data
        model_id, version = self.agent.champion_info()
        phase = PHASE_INFERRING if self.inference.ready() else PHASE_COLLECTING
        return pack_hello(self.cfg["device_id"], version, model_id, d.get("windows", 0), d.get("anomalies", 0),
                          d.get("next_upload", 0), d.get("uploads_dropped", 0), len(self.comm.outbox),
                          phase) + pack_hello_runtime() + pack_hello_health(self.last_health)

    # --- Configure: signed settings updates (firmware/configure.py)
    def _settings_values(self):
        return {k: v for k, v in self.settings.get("values", {}).items() if k != "threshold"}

    def apply_threshold(self):
        """The threshold of the settings, when they set one for the champion in use."""
        values = self.settings.get("values", {})
        champion = self.settings.get("champion")
        if "threshold" in values and champion and list(self.agent.champion_info()) == champion:
            self.inference.threshold = values["threshold"]

    def settings_in_force(self):
        """The run-time settings in force, as the gateway records them."""
        out = {k: self.cfg[k] for k in configure.LIMITS if k != "threshold"}
        out["threshold"] = self.inference.threshold if self.inference.ready() else self.cfg["threshold"]
        return out

    def handle_config(self, sealed, seq):
        """Replies to a CONFIG_UPDATE: verify, validate against the champion, apply atomically, or refuse."""
        body = messages.unseal(self.comm._key(), messages.TAG_CONFIG, self.cfg["device_id"], sealed)
        try:
            if body is None:
                raise configure.SettingsError("bad signature: unauthenticated settings update")
            version, flags, changes = configure.parse(body)
            new = configure.propose(self.settings, version, flags, changes, self.base_cfg, self.inference.manifest)
            configure.commit(self.root, new)
        except (configure.SettingsError, OSError) as e:
            why = str(e) if isinstance(e, configure.SettingsError) else "flash error: %s" % e
            return [(messages.CONFIG_RESULT, configure.result_body(seq, False, self.settings.get("version", 0), why,
                                                                   self.settings_in_force()))]
        old = self.cfg
        self.settings = new
        self.cfg = dict(self.base_cfg)
        self.cfg.update(self._settings_values())
        self.comm.upload_every = self.cfg["upload_every"]
        if self.cfg["window_ms"] != old["window_ms"]:
            self.data_in = DataIn(self.data_in.uart, self.cfg["rate_hz"], self.cfg["window_ms"], self.data_in.extract)
        if [old[k] for k in ALARM_KEYS] != [self.cfg[k] for k in ALARM_KEYS]:
            self.alarm = self.new_alarm_rule()
        if self.inference.ready():
            self.inference.threshold = float(self.inference.manifest["threshold"])
        self.apply_threshold()
        return [(messages.CONFIG_RESULT, configure.result_body(seq, True, new["version"], "applied settings v%d"
                                                               % new["version"], self.settings_in_force()))]

    # --- Monitor: health per reporting period
    def send_health(self, report):
        self.comm.send(messages.HEALTH, messages.seal(self.comm._key(), messages.TAG_HEALTH, self.cfg["device_id"],
                                                      messages.pack_health(report)))

    def sync_features(self):
        """Extract the champion's feature set (the configured one before any champion); True when it changed."""
        want = self.inference.feature_set or (self.cfg["feature_set"], self.cfg["feature_params"])
        shipped = self.inference.feature_module
        if feature_sets.same(want, self.features):
            self.features = want
            if shipped is not self._shipped_features:  # the same features, from the champion's module or the own
                self.data_in.extract = feature_sets.extractor(want[0], want[1], shipped)
                self._shipped_features = shipped
            return False
        self.data_in.extract = feature_sets.extractor(want[0], want[1], shipped)
        self._shipped_features = shipped
        self.data_in.fill = 0  # a window half-filled for the old features is dropped
        self.features = want
        self.alarm = self.new_alarm_rule()  # scores of other features: the rule starts over
        return True

    def new_alarm_rule(self):
        """The alarm rule of the settings; an alarm still open (before a reboot, or under the rule replaced) stays
        open in it, so that its clear comes, with its number."""
        c = self.cfg
        rule = alarms.AlarmRule({"span_s": c["alarm_span_s"], "raise_fraction": c["alarm_raise"],
                                 "clear_fraction": c["alarm_clear"], "min_windows": c["alarm_min_windows"]})
        open_alarm = self.state.data.get("open_alarm")
        if open_alarm:
            self.alarm_no, rule.start, rule.peak = open_alarm
            rule.active = True
        return rule

    def on_window(self, feats):
        """One window's features: train towards the first champion, or score and report it."""
        d = self.state.data
        d["windows"] = d.get("windows", 0) + 1
        self.windows += 1
        if not self.inference.ready():
            if self.training.add(feats):
                calibrate = self.features[0] != feature_sets.PAPER
                forest = self.training.train(self.cfg["target_fa"] if calibrate else 0.0)
                threshold = self.training.threshold if calibrate else self.cfg["threshold"]
                cfg = self.agent.install_local(forest, threshold, self.features)
                self.comm.queue_champion(0, json.dumps(cfg).encode(), forest.to_bytes())
                self.state.save()
            return None
        t0 = clock_us()
        score, anomaly = self.inference.infer(feats)
        self.health.inference(ticks_diff(clock_us(), t0))
        counts = self.scored.setdefault(self.inference.version, [0, 0])
        counts[0] += 1
        if anomaly:
            counts[1] += 1
            d["anomalies"] = d.get("anomalies", 0) + 1
        now = int(time.time())
        code = feature_sets.CODES[self.features[0]]
        event = self.alarm.push(now, score, anomaly)
        if event is not None:
            a = self.alarm
            if event == "raised":
                d["alarms"] = d.get("alarms", 0) + 1
                self.alarm_no = d.get("next_alarm", 0)
                d["next_alarm"] = self.alarm_no + 1
                d["open_alarm"] = [self.alarm_no, a.start, a.peak]
            else:
                d.pop("open_alarm", None)
            self.state.save()  # before the event is on flash: a number is never used again, an alarm cleared once
            self.comm.queue_alarm(messages.pack_alarm(self.alarm_no, int(a.start), now if event == "cleared" else 0,
                                                      a.peak, code, self.inference.version, self.inference.model_id))
        queued = self.comm.queue_upload(now, anomaly, self.inference.version, score, feats, code)
        # upload numbers must never be reused after a reboot: save with every queued upload
        if queued or self.windows % self.cfg["save_every"] == 0:
            self.state.save()
        return score, anomaly

    def step(self):
        """One turn: link in, data in (at most one window), link out; True when anything happened."""
        busy = self.comm.poll() > 0
        if self.inference.feature_set is not self._champion_features:  # another champion (installed, fallback)
            self._champion_features = self.inference.feature_set
            self.sync_features()
            self.apply_threshold()
        t0 = clock_us()
        feats = self.data_in.poll()
        if feats is not None:
            t1 = clock_us()
            self.on_window(feats)
            self.health.window(ticks_diff(t1, t0), ticks_diff(clock_us(), t0))
            # collect at this safe point, once per window, so allocation never has to trigger a collection
            collect()
            every = self.cfg["health_every"]
            if every and self.health.windows >= every:
                self.last_health = self.health.report(self, self.health.windows)
                self.send_health(self.last_health)
            busy = True
        if self.comm.service(ticks_ms()):
            busy = True
        return busy

    def run(self, max_windows=-1, idle_ms=1):
        """Loop forever (or until max_windows windows were processed)."""
        while max_windows < 0 or self.windows < max_windows:
            if not self.step():
                sleep_ms(idle_ms)
        self.state.save()


ALARM_KEYS = ("alarm_span_s", "alarm_raise", "alarm_clear", "alarm_min_windows")
_reset_cause = reset_cause


class Health:
    """The device's health over one reporting period, measured with its own clock and heap."""

    def __init__(self):
        self.start()
        self.link_base = 0
        self.retransmit_base = 0

    def start(self):
        self.windows = self.inferred = 0
        self.feature_sum = self.feature_max = self.inference_sum = self.inference_max = self.active_sum = 0

    def window(self, feature_us, active_us):
        self.windows += 1
        self.feature_sum += feature_us
        self.active_sum += active_us
        if feature_us > self.feature_max:
            self.feature_max = feature_us

    def inference(self, us):
        self.inferred += 1
        self.inference_sum += us
        if us > self.inference_max:
            self.inference_max = us

    def report(self, dev, windows):
        """The period's HEALTH fields (then a new period starts)."""
        free, largest = heap_info()
        now = ticks_ms()
        dev.uptime_ms += ticks_diff(now, dev.booted_at)
        dev.booted_at = now
        c = dev.comm
        link_errors = c.bad_messages + c.decoder.crc_errors + c.decoder.framing_errors
        n, k = max(1, self.windows), max(1, self.inferred)
        out = {"windows": windows, "feature_us_mean": self.feature_sum // n, "feature_us_max": self.feature_max,
               "inference_us_mean": self.inference_sum // k, "inference_us_max": self.inference_max,
               "active_us_mean": self.active_sum // n, "free_heap": free, "largest_free_heap": largest,
               "uptime_s": dev.uptime_ms // 1000, "boots": dev.state.data.get("boots", 0),
               "reset_cause": dev.state.data.get("reset_cause", 0),
               "retransmits": c.retransmits - self.retransmit_base, "link_errors": link_errors - self.link_base,
               "settings_version": dev.settings.get("version", 0)}
        self.retransmit_base, self.link_base = c.retransmits, link_errors
        self.start()
        return out


def main(data_uart=None, link_uart=None, root=None):
    """Board entry point: UART 2 carries the sensor's samples, UART 1 the power-line modem (2,400 baud)."""
    if data_uart is None or link_uart is None:
        from machine import UART

        if data_uart is None:
            data_uart = UART(2, 115200, timeout=0)
        if link_uart is None:
            link_uart = UART(1, 2400, timeout=0)
    Device(data_uart, link_uart, root).run()
