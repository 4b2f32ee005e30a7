"""Command line of the link service: python -m tinyml_dagster.link_service (script: tinyml-link-service)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from tinyml_dagster.link_service.service import LinkService, PoolFactory


def repository_pool_factory(cohorts: list[dict] | None = None) -> PoolFactory:
    """The pool from the model repository under settings (its candidates), rebuilt only when they change; with the
    ports' cohorts, a pool per cohort voting on its devices' windows only."""
    built = None

    def make():
        nonlocal built
        from tinyml_dagster.pool_inference import cohort_pools, pool_from_repository

        built = cohort_pools(cohorts, previous=built) if cohorts else pool_from_repository(previous=built)
        return built

    return make


SUMMARY = "Gateway link service: the one long-running process that owns the devices' serial ports."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyml_dagster.link_service", description=SUMMARY)
    ap.add_argument("--kb", help="Knowledge Base: a SQLite path, sqlite:///<path> or postgresql://... (default: "
                                 "TINYML_KB_URL, else settings.kb_path())")
    ap.add_argument("--port", action="append", default=[], metavar="DEVICE_ID=PATH", help="a device's serial port")
    ap.add_argument("--gateway", default=os.environ.get("TINYML_GATEWAY_ID"),
                    help="this gateway's id (its bus) when many share one Knowledge Base; its ports' devices are "
                         "recorded as hanging on it (default: TINYML_GATEWAY_ID)")
    ap.add_argument("--cohort", action="append", default=[], metavar="DEVICE_ID=KEY=VALUE,...",
                    help="a device's cohort, e.g. pump-1=machine=p1,channel=b3x,rate_hz=2000,feature_set=paper")
    ap.add_argument("--ingest-socket", help="Unix socket for JSON-line uploads")
    ap.add_argument("--baud", type=int, default=2400)
    ap.add_argument("--time-scale", type=float, default=1.0, help="link time x this = real time (tests: < 1)")
    ap.add_argument("--reply-slack", type=float, default=1.0,
                    help="real seconds added to every deploy reply timeout (busy hosts, scaled time)")
    ap.add_argument("--db-timeout", type=float, default=5.0,
                    help="seconds a write waits for another process's database lock before retrying later")
    ap.add_argument("--no-pool", action="store_true", help="store uploads only; Dagster's runs decide them")
    ap.add_argument("--ready-file", help="written once the service listens")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s link_service %(levelname)s %(message)s")
    ports = {}
    for spec in args.port:
        if "=" not in spec:
            ap.error("--port %r: expected DEVICE_ID=PATH" % spec)
        dev, path = spec.split("=", 1)
        ports[dev] = path
    cohorts = {}
    for spec in args.cohort:
        dev, _, pairs = spec.partition("=")
        items = [p.partition("=") for p in pairs.split(",") if p]
        if not dev or not items or any(not k or not sep for k, sep, _ in items):
            ap.error("--cohort %r: expected DEVICE_ID=KEY=VALUE,KEY=VALUE" % spec)
        cohorts[dev] = {k: int(v) if v.isdigit() else v for k, _, v in items}
    from tinyml_dagster.link.transport import LinkTiming

    svc = LinkService(args.kb, ports=ports, ingest_socket=args.ingest_socket,
                      timing=LinkTiming(baud=args.baud, time_scale=args.time_scale),
                      pool_factory=None if args.no_pool else repository_pool_factory(list(cohorts.values())),
                      reply_slack_s=args.reply_slack, db_timeout_s=args.db_timeout, gateway_id=args.gateway,
                      cohorts=cohorts)
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())
    signal.signal(signal.SIGINT, lambda *_: svc.stop())
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file size limit fails the write (EFBIG), not the process
    if args.ready_file:
        def announce():
            svc.ready.wait()
            while args.ingest_socket and not Path(args.ingest_socket).exists():
                time.sleep(0.01)
            Path(args.ready_file).write_text(str(os.getpid()))
        threading.Thread(target=announce, daemon=True).start()
    svc.run()
    return 0
