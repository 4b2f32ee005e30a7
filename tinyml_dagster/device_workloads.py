"""The device's work as MicroPython VM snippets: loading and scoring each kind of champion, collecting, heap.

The device benchmark (benchmarks/device.py) and the report's device-time model (report/device_time.py) both
measure these, so the work they count is one definition.
"""

from __future__ import annotations

from pathlib import Path

from tinyml_dagster.micropython_vm import MicroPythonVM

SETUP = """
import gc, json, math
gc.enable()
from firmware import isoforest, features, compiled_forest
rows = json.load(open('/flash/rows.json'))
grid = json.load(open('/flash/grid.json'))
q = [0, 0, 0]
"""

LOAD_OURS = """
f = open('/flash/m%(n)d.bin', 'rb')
forest = isoforest.load(f.read(), grid)
f.close()
f = None
model = compiled_forest.CompiledForest(forest)
forest = None
"""

# the champion precompiled by the gateway (mpy-cross): imported, nothing compiled on the device
LOAD_MPY = """
model = compiled_forest.PrecompiledForest(compiled_forest.import_runtime('/flash', 'm%(n)d.mpy'), grid)
"""

LOAD_NODE_ARRAYS = """
f = open('/flash/m%(n)d.bin', 'rb')
model = isoforest.load(f.read(), grid)
f.close()
f = None
"""

LOAD_BASELINE = """
f = open('/flash/m%(n)d.json')
model = json.load(f)
f.close()
f = None
"""

BASELINE_SCORER = """
def path_length(node, q):
    while 'leaf' not in node:
        node = node['left'] if q[node['feature']] < node['threshold'] else node['right']
    return node['path_length']

def score_baseline(doc, x):
    isoforest.quantise(x, doc['grid'], q)
    total = 0.0
    for t in doc['trees']:
        total += path_length(t, q)
    return 2.0 ** (-(total / len(doc['trees'])) / isoforest.c(doc['psi']))
"""

SCORE_OURS = """
for r in rows:
    model.score(r)
"""

SCORE_BASELINE = """
for r in rows:
    score_baseline(model, r)
"""

# the conservative GC also scans stale stack slots: overwrite them (deep calls) before collecting; a device
# collects after loading a champion too, so every scoring run starts from a collected heap
COLLECT = """
def _clear_stack(n):
    a = b = c = d = e = g = h = 0
    if n:
        _clear_stack(n - 1)
for _ in range(3):
    _clear_stack(40)
gc.collect()
"""

HEAP = COLLECT + """
print('HEAP', gc.mem_alloc())
"""


def vm(flash: Path) -> MicroPythonVM:
    """The VM the device figures are measured in."""
    # a heap large enough that no collection runs inside a function (the WASI build's GC misses wasm locals);
    # heap figures come from top-level gc.collect() only
    return MicroPythonVM(flash_dir=flash, heap_bytes=32 * 1024 * 1024, memory_bytes=64 * 1024 * 1024)


def fuel(vm: MicroPythonVM, code: str) -> tuple[int, str]:
    """(instructions, stdout) of one run of code."""
    r = vm.run(code=code).check()
    return r.fuel_used, r.stdout


def heap(stdout: str) -> int:
    """The heap figure a HEAP snippet printed."""
    return int([ln for ln in stdout.splitlines() if ln.startswith("HEAP")][-1].split()[1])
