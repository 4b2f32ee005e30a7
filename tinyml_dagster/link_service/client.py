"""IngestClient: a sender over the ingest socket that resends what was not acknowledged after a reconnect."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tinyml_dagster.knowledge_base import KnowledgeBaseError


class IngestClient:
    """A sender over the ingest socket that survives service restarts: unacked uploads are resent on reconnect."""

    def __init__(self, socket_path: str | Path, connect_timeout: float = 60.0):
        self.socket_path = str(socket_path)
        self.connect_timeout = connect_timeout
        self.in_flight: dict[tuple[str, int], bytes] = {}
        self.batches: dict[int, tuple[list[tuple[str, int]], bytes]] = {}  # batch id -> (its uploads, its line)
        self._next_batch = 0
        self.reconnects = 0
        self.refused: list[tuple[tuple[str, int], str]] = []  # ((device_id, seq), reason) the service refused
        self.sock: socket.socket | None = None
        self._buf = b""
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.socket_path)
                s.settimeout(1.0)
                self.sock, self._buf = s, b""
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("no link service listening on %s" % self.socket_path) from None
                time.sleep(0.02)

    def _reconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.reconnects += 1
        self._connect()
        if self.in_flight or self.batches:
            self._sendall(b"".join([*self.in_flight.values(), *(line for _, line in self.batches.values())]))

    def _sendall(self, data: bytes) -> None:
        while True:
            try:
                self.sock.sendall(data)
                return
            except OSError:
                self._reconnect()
                return  # the resend of everything in flight included data

    def send(self, lines: list[tuple[str, int, bytes]]) -> None:
        """Send (device_id, seq, JSON line) uploads; they stay in flight until acknowledged."""
        for d, s_, line in lines:
            self.in_flight[(d, s_)] = line
        self._sendall(b"".join(line for _, _, line in lines))

    def send_windows(self, windows: dict[str, list]) -> int:
        """Send a batch of windows as columns (see windows_from_json: "d", "s" and any of "k", "f", "c", "cs",
        "cd", "w", "t", each a list of one value per window); they stay in flight until the batch is acknowledged.
        Returns the batch id."""
        from tinyml_dagster.link_service.ingest import windows_to_json

        self._next_batch += 1
        line = windows_to_json(self._next_batch, windows)
        self.batches[self._next_batch] = (list(zip(windows["d"], windows["s"])), line)
        self._sendall(line)
        return self._next_batch

    @property
    def pending(self) -> int:
        """Uploads sent and not acknowledged yet (single ones and the windows of batches)."""
        return len(self.in_flight) + sum(len(keys) for keys, _ in self.batches.values())

    def receive_acks(self) -> list[tuple[str, int]]:
        """Acks that arrived (waits up to 1 s); reconnects and resends when the service went away."""
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return []
        except OSError:
            data = b""
        if not data:
            self._reconnect()
            return []
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        acked = []
        for line in lines:
            parts = line.split(b" ")
            if parts[0] == b"ack" and len(parts) == 3:
                key = (parts[1].decode(), int(parts[2]))
                self.in_flight.pop(key, None)
                acked.append(key)
            elif parts[0] == b"acked" and len(parts) in (2, 3):  # acked <batch> [<refused row>,...]
                keys, _ = self.batches.pop(int(parts[1]), ([], b""))
                refused = {int(r) for r in parts[2].split(b",")} if len(parts) == 3 else ()
                acked.extend(k for r, k in enumerate(keys) if r not in refused)
            elif parts[0] == b"refused" and len(parts) >= 3:
                key = (parts[1].decode(errors="replace"), int(parts[2]) if parts[2].isdigit() else -1)
                self.in_flight.pop(key, None)
                self.refused.append((key, b" ".join(parts[3:]).decode(errors="replace")))
            elif parts[0] == b"error":
                raise KnowledgeBaseError(line[6:].decode())
        return acked

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
