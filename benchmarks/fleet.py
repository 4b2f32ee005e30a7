"""Fleet benchmark: 1,000 devices' uploads through the link service into the Knowledge Base and the pool.

A traffic generator speaks the service's ingest interface (Unix socket, a batch of windows per JSON line) for
1,000 devices; the service (a separate process) commits, acknowledges and lets a pool of real compact Isolation
Forests decide every window. Half-way the service is SIGKILLed and restarted; the generator resends what was not acked.
Figures: uploads/s (first send to last ack, outage included), p99 upload-to-decision (upload's send time to
the pool's decision committed), lost (sent but not stored), duplicates (stored twice).
Scale-out (`scaleout`): 10,000 devices over 10 gateways (10 link service processes, each its own socket, pool and
devices) into one PostgreSQL Knowledge Base (a throwaway cluster); one gateway is SIGKILLed and restarted and the
PostgreSQL server crash-restarted mid-run; beside it the same traffic through one gateway into SQLite.
Writes data/bench/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firmware import isoforest  # noqa: E402
from tinyml_dagster import settings  # noqa: E402
from tinyml_dagster.knowledge_base import KnowledgeBase  # noqa: E402
from tinyml_dagster.link_service import IngestClient  # noqa: E402

POOL_SERVER = """
import sys, pickle
from tinyml_dagster import link_service
from tinyml_dagster.pool_inference import PoolInferenceEngine
from firmware import isoforest
spec = pickle.load(open(sys.argv[1], "rb"))
forests = [isoforest.load(buf, grid) for buf, grid in spec["forests"]]
pool = PoolInferenceEngine.from_forests(spec["model_ids"], forests)  # built before the socket opens
factory = lambda: pool
sock, gateway = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else (spec["sock"], None)
svc = link_service.LinkService(spec["kb"], ingest_socket=sock, pool_factory=factory, pool_refresh_s=1e9,
                               gateway_id=gateway)
import signal
signal.signal(signal.SIGTERM, lambda *_: svc.stop())
svc.run()
"""


def normal_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.normal(0, 0.05, n), rng.normal(0, 0.2, n), rng.normal(0, 0.4, n)])


def train_pool(n_models: int) -> tuple[list[str], list]:
    rows = normal_rows(400, 1).tolist()
    ids, forests = [], []
    for i in range(n_models):
        n_trees = 10 * (i % 5 + 1)
        ids.append("fleet-pool-%02d-t%d" % (i, n_trees))
        forests.append(isoforest.train(rows, n_trees=n_trees, psi=100, seed=11 + i))
    return ids, forests


def start_service(spec_path: Path, log, *gateway: str) -> subprocess.Popen:
    """A link service with the pool (gateway: its socket and id, when many share the Knowledge Base)."""
    return subprocess.Popen([sys.executable, "-c", POOL_SERVER, str(spec_path), *gateway], cwd=ROOT, stdout=log,
                            stderr=log)


def generate(client: IngestClient, devices: list[str], per_device: int, window: int, seed: int,
             acked: list, stop_at: dict) -> None:
    rng = np.random.default_rng(seed)
    todo = [(d, s) for s in range(1, per_device + 1) for d in devices]
    i = 0
    while i < len(todo) or client.pending:
        if i < len(todo) and client.pending < window:
            chunk = todo[i:i + min(window - client.pending, 256)]
            i += len(chunk)
            feats = normal_rows(len(chunk), int(rng.integers(1 << 30)))
            anomalous = rng.random(len(chunk)) < 0.05
            feats[anomalous, 2] += 8.0  # real anomalies: heavy tails
            champ = anomalous | (rng.random(len(chunk)) < 0.03)  # the champion also flags some normal windows
            n = len(chunk)
            # one line per chunk: the windows as columns (the link service's batch format)
            client.send_windows({"d": [d for d, _ in chunk], "s": [s for _, s in chunk],
                                 "k": np.where(champ, "anomaly", "normal").tolist(),
                                 "f": np.round(feats, 6).tolist(), "c": ["v1"] * n,
                                 "cs": np.where(champ, 0.7, 0.4).tolist(), "cd": champ.astype(int).tolist(),
                                 "t": [time.time()] * n})
        got = client.receive_acks()
        acked.extend(got)
        if got:
            stop_at.setdefault("ack_times", []).append(time.time())
        if stop_at.get("done"):
            break


def run_once(args, ids, forests, devices_n: int, per_device: int, connections: int, window: int, kill: bool) -> dict:
    """One pass of traffic through a fresh service and KB; the figures of that pass."""
    tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
    spec = {"kb": str(tmp / "kb.sqlite"), "sock": str(tmp / "ingest.sock"), "model_ids": ids,
            "forests": [(f.buf, f.grid) for f in forests]}
    import pickle

    spec_path = tmp / "spec.pkl"
    spec_path.write_bytes(pickle.dumps(spec))
    log = open(tmp / "service.log", "wb")
    svc = start_service(spec_path, log)
    devices = ["dev%04d" % i for i in range(devices_n)]
    total = devices_n * per_device
    acked_lists = [[] for _ in range(connections)]
    clients = [IngestClient(spec["sock"]) for _ in range(connections)]
    stop = {}
    t0 = time.time()
    threads = [threading.Thread(target=generate, args=(clients[c], devices[c::connections], per_device,
                                                       window, c, acked_lists[c], stop), daemon=True)
               for c in range(connections)]
    for t in threads:
        t.start()
    killed_at = None
    if kill:
        while sum(map(len, acked_lists)) < total // 2:
            time.sleep(0.01)
        svc.send_signal(signal.SIGKILL)
        svc.wait()
        killed_at = time.time()
        svc = start_service(spec_path, log)
    for t in threads:
        t.join(timeout=600)
    t_last_ack = time.time()
    kb = KnowledgeBase(spec["kb"])
    wait_decided(kb)
    svc.send_signal(signal.SIGTERM)
    svc.wait(timeout=30)
    out = {"devices": devices_n, "uploads": total, "connections": connections, "in_flight_per_connection": window,
           "pool_models": len(ids), **figures(kb, devices, per_device, acked_lists, t_last_ack - t0),
           "killed": kill,
           "recovery_s": round(min(t for t in stop.get("ack_times", []) if t > killed_at) - killed_at, 3)
           if killed_at else None,
           "reconnects": sum(c.reconnects for c in clients)}
    kb.close()
    for c in clients:
        c.close()
    return out


def wait_decided(kb: KnowledgeBase, timeout_s: float = 120.0) -> None:
    """Until the pools decided every stored window (or timeout_s passed)."""
    deadline = time.time() + timeout_s
    while kb.count_decisions() < kb.count_uploads() and time.time() < deadline:
        time.sleep(0.05)


def figures(kb: KnowledgeBase, devices: list[str], per_device: int, acked_lists: list[list], elapsed: float) -> dict:
    """Throughput, upload-to-decision latency, lost and duplicated uploads of one pass, from the Knowledge Base."""
    acked = {k for lst in acked_lists for k in lst}
    stored = kb.count_uploads()
    expected = {(d, s) for d in devices for s in range(1, per_device + 1)}
    stored_keys = kb.upload_keys()
    lat = np.array(kb.upload_to_decision_seconds())
    return {
        "uploads_per_s": round(len(expected) / elapsed, 1),
        "elapsed_s": round(elapsed, 3),
        "p50_upload_to_decision_s": round(float(np.percentile(lat, 50)), 4) if len(lat) else None,
        "p99_upload_to_decision_s": round(float(np.percentile(lat, 99)), 4) if len(lat) else None,
        "max_upload_to_decision_s": round(float(lat.max()), 4) if len(lat) else None,
        "decided": int(len(lat)),
        "false_positives": kb.count_false_positives(),
        "lost": len(expected - stored_keys),
        "acked_but_missing": len(acked - stored_keys),
        "duplicates": stored - len(stored_keys),
        "top_candidate": (kb.ranking() or [[None]])[0][0],
    }


def run_scaleout(ids, forests, devices_n: int, gateways: int, per_device: int, window: int,
                 faults: bool = True) -> dict:
    """devices_n devices over `gateways` link services into one PostgreSQL Knowledge Base; gateway 0 SIGKILLed and
    restarted after a third of the uploads were acked, the server crash-restarted after two thirds."""
    import pickle

    from tinyml_dagster.pg_cluster import TempCluster

    tmp = Path(tempfile.mkdtemp(prefix="fleet-scaleout-"))
    cluster = TempCluster(settings={"max_connections": "200", "shared_buffers": "256MB"}).start()
    try:
        spec = {"kb": cluster.create_database("kb"), "model_ids": ids, "forests": [(f.buf, f.grid) for f in forests]}
        KnowledgeBase(spec["kb"]).close()  # the schema, before ten gateways open it at once
        spec_path = tmp / "spec.pkl"
        spec_path.write_bytes(pickle.dumps(spec))
        log = open(tmp / "services.log", "wb")
        names = ["gw%02d" % g for g in range(gateways)]
        socks = {g: str(tmp / ("%s.sock" % g)) for g in names}
        svcs = {g: start_service(spec_path, log, socks[g], g) for g in names}
        devices = ["dev%05d" % i for i in range(devices_n)]
        total = devices_n * per_device
        acked_lists = [[] for _ in names]
        clients = [IngestClient(socks[g]) for g in names]
        stop: dict = {}
        t0 = time.time()
        threads = [threading.Thread(target=generate, args=(clients[i], devices[i::gateways], per_device, window, i,
                                                           acked_lists[i], stop), daemon=True)
                   for i in range(gateways)]
        for t in threads:
            t.start()
        events = {}
        for fraction, what in ((1 / 3, "gateway_killed_at_s"), (2 / 3, "server_restarted_at_s")) if faults else ():
            while sum(map(len, acked_lists)) < total * fraction and any(t.is_alive() for t in threads):
                time.sleep(0.01)
            events[what] = round(time.time() - t0, 3)
            if what == "gateway_killed_at_s":
                svcs[names[0]].send_signal(signal.SIGKILL)
                svcs[names[0]].wait()
                svcs[names[0]] = start_service(spec_path, log, socks[names[0]], names[0])
            else:
                cluster.restart("immediate")
                events["server_down_s"] = round(time.time() - t0 - events[what], 3)
        for t in threads:
            t.join(timeout=900)
        t_last_ack = time.time()
        kb = KnowledgeBase(spec["kb"])
        wait_decided(kb)
        for svc in svcs.values():
            svc.send_signal(signal.SIGTERM)
            svc.wait(timeout=30)
        out = {"devices": devices_n, "gateways": gateways, "uploads": total, "backend": "postgresql",
               **figures(kb, devices, per_device, acked_lists, t_last_ack - t0), **events,
               "longest_ack_gap_s": round(float(np.diff(sorted(stop.get("ack_times", [t0]))).max(initial=0)), 3),
               "reconnects": sum(c.reconnects for c in clients)}
        kb.close()
        for c in clients:
            c.close()
        return out
    finally:
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--per-device", type=int, default=30)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--window", type=int, default=250, help="uploads in flight per connection")
    ap.add_argument("--models", type=int, default=5, help="candidates in the pool (10..50 trees, psi 100)")
    ap.add_argument("--no-kill", action="store_true", help="do not SIGKILL the service mid-run")
    ap.add_argument("--scaleout-devices", type=int, default=10_000)
    ap.add_argument("--scaleout-gateways", type=int, default=10)
    ap.add_argument("--scaleout-per-device", type=int, default=10)
    ap.add_argument("--no-scaleout", action="store_true", help="skip the PostgreSQL scale-out run")
    ap.add_argument("--out", default=str(settings.bench_dir() / "fleet.json"))
    args = ap.parse_args(argv)

    ids, forests = train_pool(args.models)
    out = run_once(args, ids, forests, args.devices, args.per_device, args.connections, args.window, not args.no_kill)
    # the comparison, measured in the same run: stop-and-wait (one upload in flight per device link, as a
    # device on the 2,400-baud line does), i.e. one commit per upload
    base = run_once(args, ids, forests, 50, 20, 1, 1, False)
    out["baseline_stop_and_wait"] = {
        k: base[k] for k in ("uploads", "uploads_per_s", "p99_upload_to_decision_s", "lost")
    }
    out["speedup_vs_stop_and_wait"] = round(out["uploads_per_s"] / base["uploads_per_s"], 1)
    out["targets"] = {"uploads_per_s": ">= 5000", "p99_upload_to_decision_s": "<= 1", "lost": "0"}
    if not args.no_scaleout:
        out["scaleout"] = scaleout(args, ids, forests)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out + ".tmp")
    tmp_out.write_text(json.dumps(out, indent=2))
    os.replace(tmp_out, args.out)
    print(json.dumps(out, indent=2))
    p99 = out["p99_upload_to_decision_s"]
    ok = out["uploads_per_s"] >= 5000 and p99 is not None and p99 <= 1 and out["lost"] == 0
    print("fleet: %s (uploads/s %.0f vs >= 5000 [stop-and-wait %.0f], p99 %.3f s vs <= 1 s, lost %d vs 0, "
          "SIGKILL+restart %s, recovered in %s s)" % (
              "targets met" if ok else "TARGETS MISSED", out["uploads_per_s"], base["uploads_per_s"],
              p99 if p99 is not None else -1, out["lost"], "yes" if out["killed"] else "no", out["recovery_s"]))
    if "uploads_per_s" in out.get("scaleout", {}):
        so, one = out["scaleout"], out["scaleout"]["sqlite_one_gateway"]
        print("fleet scale-out: %d devices over %d gateways into PostgreSQL: %.0f uploads/s vs >= 50000 [one gateway "
              "into SQLite %.0f], p99 %s s vs <= 1 s, lost %d, duplicates %d (gateway SIGKILLed at %.1f s, server "
              "restarted at %.1f s)" % (so["devices"], so["gateways"], so["uploads_per_s"], one["uploads_per_s"],
                                        so["p99_upload_to_decision_s"], so["lost"], so["duplicates"],
                                        so["gateway_killed_at_s"], so["server_restarted_at_s"]))
    return 0


def scaleout(args, ids, forests) -> dict:
    """The scale-out run and, beside it, the same traffic through one gateway into SQLite (its SIGKILL too)."""
    from tinyml_dagster.pg_cluster import server_bin_dir

    if server_bin_dir() is None:
        return {"skipped": "PostgreSQL server binaries (initdb) not installed"}
    out = run_scaleout(ids, forests, args.scaleout_devices, args.scaleout_gateways, args.scaleout_per_device,
                       args.window)
    one = run_once(args, ids, forests, args.scaleout_devices, args.scaleout_per_device, args.connections, args.window,
                   True)
    out["sqlite_one_gateway"] = {k: one[k] for k in ("uploads_per_s", "p99_upload_to_decision_s", "lost",
                                                      "duplicates")}
    out["targets"] = {"uploads_per_s": ">= 50000", "p99_upload_to_decision_s": "<= 1", "lost": "0",
                      "duplicates": "0"}
    return out


if __name__ == "__main__":
    sys.exit(main())
