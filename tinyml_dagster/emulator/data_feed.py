"""The data UART of an emulated device: one channel of a recording (IMS files, or any recording spec), subsampled to
rate_hz, as float32 samples in real time."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import numpy as np

from firmware import features
from tinyml_dagster import ims, settings, subsampling


def channel_index(bearing: int, axis: str, n_channels: int) -> int:
    """Column of (bearing, axis) in an IMS file: set 1 has x and y per bearing (8 columns), sets 2-3 one (4)."""
    if not 1 <= bearing <= 4:
        raise ValueError(f"bearing must be 1..4, got {bearing}")
    if n_channels == 8:
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be x or y, got {axis!r}")
        return 2 * (bearing - 1) + (axis == "y")
    return bearing - 1


class DataFeed:
    """float32 LE samples of one channel at rate_hz, released as the (scaled) clock advances.

    Each file contributes its complete windows only, so the device's windows are the gateway's windows.
    """

    def __init__(self, files: list[Path], bearing: int, axis: str, rate_hz: int, time_scale: float = 1.0,
                 window_ms: int = features.WINDOW_MS, loop: bool = False) -> None:
        if not files:
            raise ValueError("no IMS files to feed")
        self.files = list(files)
        self.bearing, self.axis, self.rate_hz = bearing, axis, rate_hz
        self.time_scale = time_scale
        self.window = features.window_length(rate_hz, window_ms)
        self.loop = loop
        self._file = 0
        self._buf = b""
        self._pos = 0
        self._released = 0  # samples released so far
        self._t0: float | None = None
        self._lock = threading.Lock()
        self.files_fed = 0
        self._looped: dict[int, bytes] = {}  # a looping feed parses each file once (2 MB for the synthetic run)

    def file_samples(self, path: Path) -> np.ndarray:
        """The samples one file contributes (complete windows of the subsampled channel)."""
        data = ims.read_ims_file(path)
        col = channel_index(self.bearing, self.axis, data.shape[1])
        x = subsampling.subsample(data[:, col], self.rate_hz, ims.SAMPLE_RATE_HZ)
        return x[: len(x) // self.window * self.window]

    def windows_planned(self) -> int:
        """Windows the whole recording gives the device (one pass)."""
        per_file = subsampling.subsampled_length(ims.ROWS, self.rate_hz, ims.SAMPLE_RATE_HZ) // self.window
        return len(self.files) * per_file

    def _next_file(self) -> bool:
        if self._file >= len(self.files):
            if not self.loop:
                return False
            self._file = 0
        samples = self._looped.get(self._file)
        if samples is None:
            samples = np.asarray(self.file_samples(self.files[self._file]), dtype="<f4").tobytes()
            if self.loop:
                self._looped[self._file] = samples
        self._buf = samples
        self._file += 1
        self.files_fed += 1
        self._pos = 0
        return True

    def readinto(self, buf) -> int | None:
        """Copy the samples due by now (whole samples only) into buf."""
        with self._lock:
            now = time.perf_counter()
            if self._t0 is None:
                self._t0 = now
            due = int((now - self._t0) * self.rate_hz * self.time_scale) - self._released
            n = min(due, len(buf) // 4)
            if n <= 0:
                return None
            if self._pos >= len(self._buf) and not self._next_file():
                return None
            n = min(n, (len(self._buf) - self._pos) // 4)
            buf[0 : 4 * n] = self._buf[self._pos : self._pos + 4 * n]
            self._pos += 4 * n
            self._released += n
            return 4 * n

    def seconds_to_next_window(self) -> float:
        """Real seconds until the samples completing the current window are due."""
        with self._lock:
            if self._t0 is None:
                return 0.0
            missing = self.window - self._released % self.window
            due_at = self._t0 + (self._released + missing) / (self.rate_hz * self.time_scale)
            return max(0.0, due_at - time.perf_counter())

    def exhausted(self) -> bool:
        return self._file >= len(self.files) and self._pos >= len(self._buf) and not self.loop

    def read_hex(self, payload: bytes) -> str:
        """Host function for the VM: payload is the buffer size as ASCII; result the bytes as hex."""
        buf = bytearray(int(payload or b"256"))
        n = self.readinto(buf)
        return buf[: n or 0].hex()


class RecordingFeed(DataFeed):
    """The same feed from any recording: one channel, each group of snapshots resampled from the recording's rate.

    Groups are those of subsampling.subsample_recording (snapshots shorter than a window joined end to end), so
    the device's windows are the gateway's feature windows.
    """

    def __init__(self, recording, channel: str, rate_hz: int, time_scale: float = 1.0,
                 window_ms: int = settings.WINDOW_MS, loop: bool = False) -> None:
        if channel not in recording.channels:
            raise ValueError(f"channel {channel!r} is not in the recording ({', '.join(recording.channels)})")
        self.recording = recording
        self.column = recording.channels.index(channel)
        self.group = subsampling.snapshots_per_window(recording.snapshot_samples, recording.rate_hz, window_ms / 1000)
        groups = list(range(len(recording) // self.group))
        super().__init__(groups, 0, channel, rate_hz, time_scale, window_ms, loop)

    def file_samples(self, group: int) -> np.ndarray:
        """The complete windows of one group of snapshots of the channel, resampled to rate_hz."""
        k = self.group
        x = np.concatenate([self.recording.snapshot(group * k + j)[:, self.column] for j in range(k)])
        y = subsampling.subsample(x, self.rate_hz, self.recording.rate_hz)
        return y[: len(y) // self.window * self.window]

    def windows_planned(self) -> int:
        n = self.group * self.recording.snapshot_samples
        return len(self.files) * (subsampling.subsampled_length(n, self.rate_hz, self.recording.rate_hz) // self.window)


def float32_bytes(xs) -> bytes:
    return b"".join(struct.pack("<f", float(x)) for x in xs)
