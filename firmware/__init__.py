"""tinyml_dagster firmware: the far-edge device of Tiny-MLOps, MicroPython 1.27 (ESP32) and CPython."""
