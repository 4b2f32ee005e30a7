"""Model Deployment Agent: verifies a package, installs it atomically, hot-swaps the champion, falls back.

Directories under <root>/models/: champion (in use), previous (fallback), new (being installed).
The swap is two renames (champion -> previous, new -> champion); boot() repairs a swap cut by a reboot.
"""

import os

from firmware import package
from firmware._compat import exists, makedirs, read_bytes, rmtree, write_atomic, write_json
from firmware.local_inference import ChampionError, load_champion

LOCAL_MODEL_FILE = "forest.bin"


class ModelDeploymentAgent:
    """Installs champions (self-trained or received) into the flash and into the Local Inference Engine."""

    def __init__(self, root, device_id, inference, state, default_threshold):
        self.root = root
        self.device_id = device_id
        self.inference = inference
        self.state = state  # device.State: .data dict, .save()
        self.default_threshold = default_threshold
        self.models = root + "/models"
        self.champion_dir = self.models + "/champion"
        self.previous_dir = self.models + "/previous"
        self.new_dir = self.models + "/new"
        self.installs = 0
        self.refusals = 0
        self.fallbacks = 0
        self.last_reason = ""
        makedirs(self.models)

    def _load(self, path):
        forest, cfg = load_champion(path, self.default_threshold)
        if "load_note" in cfg:  # a precompiled champion this device cannot import: logged, compiled instead
            self.last_reason = cfg["load_note"]
            print("champion %s: %s" % (path, cfg["load_note"]))
        return forest, cfg

    def boot(self):
        """Load the champion (repairing a cut swap, else falling back to previous); True when one is loaded."""
        if not exists(self.champion_dir) and exists(self.new_dir):
            try:
                self._load(self.new_dir)
                os.rename(self.new_dir, self.champion_dir)
            except ChampionError:
                rmtree(self.new_dir)
        for path in (self.champion_dir, self.previous_dir):
            if not exists(path):
                continue
            try:
                forest, cfg = self._load(path)
            except ChampionError as e:
                self.last_reason = str(e)
                continue
            if path == self.previous_dir:
                self.fallbacks += 1
                rmtree(self.champion_dir)
                os.rename(self.previous_dir, self.champion_dir)
            self.inference.set_champion(forest, cfg)
            return True
        return False

    def champion_info(self):
        """(model_id, version) of the champion in use ("", 0 when none)."""
        return self.inference.model_id, self.inference.version

    def _swap_in(self):
        """new -> champion, keeping the old champion as previous; then load it into the inference engine."""
        forest, cfg = self._load(self.new_dir)
        rmtree(self.previous_dir)
        if exists(self.champion_dir):
            os.rename(self.champion_dir, self.previous_dir)
        os.rename(self.new_dir, self.champion_dir)
        self.inference.set_champion(forest, cfg)
        self.installs += 1
        return cfg

    def install_local(self, forest, threshold, features=("paper", {})):
        """Install a self-trained forest (on the (name, params) feature set) as champion version 0."""
        rmtree(self.new_dir)
        makedirs(self.new_dir)
        write_atomic(self.new_dir + "/" + LOCAL_MODEL_FILE, forest.to_bytes())
        cfg = {"model_id": "local-" + self.device_id, "version": 0, "encoding": "compact",
               "model_file": LOCAL_MODEL_FILE, "grid": forest.grid, "threshold": threshold,
               "feature_set": features[0], "feature_params": features[1]}
        write_json(self.new_dir + "/config.json", cfg)
        return self._swap_in()

    def install(self, package_path):
        """Verify and install a staged package; (ok, reason). Nothing in use changes when it is refused."""
        try:
            key_path = self.root + "/deploy/key"
            if not exists(key_path):
                raise package.PackageError("no deploy key provisioned")
            info = package.verify(package_path, read_bytes(key_path), self.device_id,
                                  self.state.data.get("accepted_version", 0))
            rmtree(self.new_dir)
            makedirs(self.new_dir)
            package.extract(package_path, info, self.new_dir)
            cfg = self._swap_in()
        except (package.PackageError, ChampionError, OSError, ValueError) as e:
            rmtree(self.new_dir)
            self.refusals += 1
            self.last_reason = str(e)
            return False, str(e)
        self.state.data["accepted_version"] = info["version"]
        self.state.save()
        self.last_reason = "installed %s v%d" % (cfg["model_id"], info["version"])
        if "load_note" in cfg:
            self.last_reason += " (%s)" % cfg["load_note"]
        return True, self.last_reason

    def fallback(self):
        """Swap back to the previous champion; (ok, reason)."""
        if not exists(self.previous_dir):
            return False, "no previous champion"
        try:
            forest, cfg = self._load(self.previous_dir)
        except ChampionError as e:
            return False, str(e)
        rmtree(self.new_dir)
        os.rename(self.champion_dir, self.new_dir)
        os.rename(self.previous_dir, self.champion_dir)
        os.rename(self.new_dir, self.previous_dir)
        self.inference.set_champion(forest, cfg)
        self.fallbacks += 1
        return True, "fell back to %s v%d" % (cfg["model_id"], int(cfg["version"]))
