"""Tiny test runner for MicroPython and CPython: runs test_* functions of firmware/tests/test_*.py.

Prints PASS/FAIL per test and a summary line; main() returns the failure count.
"""

import os
import sys

from firmware._compat import collect


def _dir():
    f = __file__
    i = f.rfind("/")
    return f[:i] if i >= 0 else "."


def run_module(name, only=None):
    mod = __import__("firmware.tests." + name, None, None, ["x"])
    passed = failed = 0
    for attr in sorted(dir(mod)):
        if not attr.startswith("test_") or (only and attr != only):
            continue
        fn = getattr(mod, attr)
        collect()
        try:
            fn()
            print("PASS %s.%s" % (name, attr))
            passed += 1
        except Exception as e:
            print("FAIL %s.%s: %s: %s" % (name, attr, type(e).__name__, e))
            sys.print_exception(e) if hasattr(sys, "print_exception") else None
            failed += 1
    return passed, failed


PRELOAD = ("_compat", "features", "isoforest", "frames", "messages", "package", "data_in", "local_inference",
           "local_training", "model_deployment_agent", "data_comm", "device", "tests.util")


def preload():
    for name in PRELOAD:
        collect()
        try:
            __import__("firmware." + name)
        except ImportError as e:
            print("SKIP import firmware.%s: %s" % (name, e))
    collect()


def main(modules=None):
    preload()
    if modules is None:
        modules = sorted(n[:-3] for n in os.listdir(_dir()) if n.startswith("test_") and n.endswith(".py"))
    passed = failed = 0
    for m in modules:
        collect()
        p, f = run_module(m)
        passed += p
        failed += f
    print("%d passed, %d failed" % (passed, failed))
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
