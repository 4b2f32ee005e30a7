"""Gateway link service: the one long-running process that owns the devices' serial ports.

It ingests uploads into the Knowledge Base (acknowledging each only after its commit; a retransmission is
stored once), lets the Pool Inference Engine decide them, and carries out the deploy requests queued in the
Knowledge Base, so nothing is lost while Dagster is down and no two processes open one port.

Two ways in:
- serial ports (`--port DEVICE_ID=/dev/ttyUSB0`, pySerialTransfer frames, `firmware.messages` envelopes);
- the ingest socket (`--ingest-socket PATH`, a Unix socket; one JSON object per line, see `upload_from_json`;
  the service answers `ack <device_id> <seq>` per line once committed): traffic generators, other gateways.

    python -m tinyml_dagster.link_service --port dev-1=/dev/pts/3 --ingest-socket data/link.sock

Modules: service (the loop: commit, acknowledge, decide, deploy), ports (one device's serial port),
ingest (the socket server and its line format), client (IngestClient), cli (the command line).
"""

from tinyml_dagster.link_service.cli import main, repository_pool_factory
from tinyml_dagster.link_service.client import IngestClient
from tinyml_dagster.link_service.ingest import upload_from_json, upload_to_json
from tinyml_dagster.knowledge_base import CHAMPION_SEQ_BASE
from tinyml_dagster.link_service.service import Deployer, LinkService, PoolFactory

__all__ = ["CHAMPION_SEQ_BASE", "Deployer", "IngestClient", "LinkService", "PoolFactory", "main",
           "repository_pool_factory", "upload_from_json", "upload_to_json"]
