"""The device's main loop: Data In -> (Local Training | Local Inference) -> Data Comm, with state on flash."""

import json
import time

from firmware import alarms, feature_sets, features, messages
from firmware._compat import collect, exists, makedirs, read_json, sleep_ms, ticks_ms, write_json
from firmware.data_comm import PHASE_COLLECTING, PHASE_INFERRING, DataComm, pack_hello
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

    def __init__(self, data_uart, link_uart, root=None, transfer_factory=None):
        self.root = default_root() if root is None else root
        makedirs(self.root + "/deploy")
        self.cfg = cfg = load_config(self.root)
        self.state = State(self.root)
        self.state.data["boots"] = self.state.data.get("boots", 0) + 1
        self.features = (cfg["feature_set"], cfg["feature_params"])
        self.data_in = DataIn(data_uart, cfg["rate_hz"], cfg["window_ms"],
                              feature_sets.extractor(cfg["feature_set"], cfg["feature_params"]))
        self.inference = LocalInference()
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
        self.windows = 0
        self.scored = {}  # champion version -> [windows scored, anomalies] since boot
        self.state.save()
        self.comm.send(messages.HELLO, self.hello())

    def hello(self):
        d = self.state.data
        model_id, version = self.agent.champion_info()
        phase = PHASE_INFERRING if self.inference.ready() else PHASE_COLLECTING
        return pack_hello(self.cfg["device_id"], version, model_id, d.get("windows", 0), d.get("anomalies", 0),
                          d.get("next_upload", 0), d.get("uploads_dropped", 0), len(self.comm.outbox), phase)

    def sync_features(self):
        """Extract the champion's feature set (the configured one before any champion); True when it changed."""
        want = self.inference.feature_set or (self.cfg["feature_set"], self.cfg["feature_params"])
        if feature_sets.same(want, self.features):
            self.features = want
            return False
        self.data_in.extract = feature_sets.extractor(want[0], want[1])
        self.data_in.fill = 0  # a window half-filled for the old features is dropped
        self.features = want
        self.alarm = self.new_alarm_rule()  # scores of other features: the rule starts over
        return True

    def new_alarm_rule(self):
        c = self.cfg
        return alarms.AlarmRule({"span_s": c["alarm_span_s"], "raise_fraction": c["alarm_raise"],
                                 "clear_fraction": c["alarm_clear"], "min_windows": c["alarm_min_windows"]})

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
        score, anomaly = self.inference.infer(feats)
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
            self.comm.send_alarm(messages.pack_alarm(int(a.start), now if event == "cleared" else 0, a.peak, code,
                                                     self.inference.version, self.inference.model_id))
        queued = self.comm.queue_upload(now, anomaly, self.inference.version, score, feats, code)
        # upload numbers must never be reused after a reboot: save with every queued upload
        if queued or self.windows % self.cfg["save_every"] == 0:
            self.state.save()
        return score, anomaly

    def step(self):
        """One turn: link in, data in (at most one window), link out; True when anything happened."""
        busy = self.comm.poll() > 0
        if self.inference.feature_set is not self._champion_features:
            self._champion_features = self.inference.feature_set
            self.sync_features()
        feats = self.data_in.poll()
        if feats is not None:
            self.on_window(feats)
            # collect at this safe point, once per window, so allocation never has to trigger a collection
            collect()
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


def main(data_uart=None, link_uart=None, root=None):
    """Board entry point: UART 2 carries the sensor's samples, UART 1 the power-line modem (2,400 baud)."""
    if data_uart is None or link_uart is None:
        from machine import UART

        if data_uart is None:
            data_uart = UART(2, 115200, timeout=0)
        if link_uart is None:
            link_uart = UART(1, 2400, timeout=0)
    Device(data_uart, link_uart, root).run()
