# Firmware manifest for a frozen MicroPython build (`make BOARD=ESP32_GENERIC FROZEN_MANIFEST=...`).
metadata(description="tinyml_dagster device firmware (Tiny-MLOps)", version="0.1.0")

package(
    "firmware",
    files=(
        "__init__.py",
        "_compat.py",
        "features.py",
        "features_wear.py",
        "feature_sets.py",
        "alarms.py",
        "isoforest.py",
        "frames.py",
        "messages.py",
        "package.py",
        "transfer.py",
        "data_in.py",
        "local_training.py",
        "local_inference.py",
        "model_deployment_agent.py",
        "configure.py",
        "data_comm.py",
        "device.py",
    ),
    base_path="..",
)
