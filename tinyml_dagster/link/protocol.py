"""Gateway side of the deploy protocol: offer, delta, fragments in windows, selective retransmission, resume, commit.

One exchange per window: the gateway sends up to `window` fragments, the last one asking for an
acknowledgement; the device answers with its contiguous offset and a bitmap of what it holds beyond it,
so the half-duplex turnaround is paid once per window and only lost fragments travel again.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from firmware import messages as m

from ..deployment_agent import Package
from .transport import FRAME_WIRE, LinkTiming, SerialTransport

MESSAGE_WIRE = FRAME_WIRE + m.HEADER_SIZE + m.CHECK_SIZE  # a message's wire bytes besides its body
ACK_WIRE = MESSAGE_WIRE + struct.calcsize(m.ACK_FORMAT)
HAVE_WIRE = MESSAGE_WIRE + struct.calcsize(m.HAVE_FORMAT)
RESULT_WIRE_MAX = FRAME_WIRE + 254
# real seconds added to every reply timeout (thread scheduling on a busy gateway)
REAL_SLACK_S = 0.25
# link seconds a device may take to verify and install a package
INSTALL_S = 30.0
MAX_WINDOW = m.ACK_BITS + 1  # the ack bitmap covers the fragments after the contiguous offset


@dataclass(frozen=True)
class LinkEstimate:
    """A deploy's cost on a clean line, from the protocol's own message sizes."""

    wire_bytes: int
    turnarounds: int
    seconds: float


def estimate_deploy(stream_bytes: int, n_files: int, model_id: str, version: int, timing: LinkTiming,
                    window: int = MAX_WINDOW) -> LinkEstimate:
    """Wire bytes, turnarounds and link seconds of one installing deploy on a clean line: offer, have,
    fragments in windows, acks, result (the device's processing is not counted)."""
    n_frag = max(1, math.ceil(stream_bytes / m.DEPLOY_FRAG))
    windows = math.ceil(n_frag / window)
    offer = (MESSAGE_WIRE + struct.calcsize(m.OFFER_FORMAT) + n_files * struct.calcsize(m.OFFER_FILE_FORMAT)
             + m.MAC_SIZE)
    data = n_frag * (MESSAGE_WIRE + struct.calcsize(m.DATA_FORMAT)) + stream_bytes
    reason = "installed %s v%d" % (model_id, version)  # firmware/model_deployment_agent.py
    result = MESSAGE_WIRE + struct.calcsize(m.RESULT_FORMAT) + 1 + len(model_id.encode()) + len(reason.encode())
    wire = offer + HAVE_WIRE + data + (windows - 1) * ACK_WIRE + result
    turnarounds = 2 * windows + 1  # offer -> have -> first window, then window -> ack -> next window, ..., result
    return LinkEstimate(wire, turnarounds, wire * timing.byte_s + turnarounds * timing.turnaround_s)


class DeployError(RuntimeError):
    """The link failed (no answer after all retries); the device keeps its champion and can resume."""


@dataclass
class DeployReport:
    """What a deployment did on the wire and what the device answered."""

    installed: bool
    reason: str
    device_champion_id: str = ""
    device_champion_version: int = 0
    package_sha256: str = ""
    package_bytes: int = 0
    stream_bytes: int = 0  # after the delta
    delta_saved_bytes: int = 0
    resumed_from: int = 0
    payload_bytes: int = 0  # fragment bytes sent, first copies only
    wire_bytes: int = 0  # every byte on the wire, both directions
    data_frames: int = 0
    retransmissions: int = 0
    timeouts: int = 0
    windows: int = 0
    link_seconds: float = 0.0
    occupation: float = 0.0
    # from the end of the last fragment on the wire to the result's arrival, less turnarounds and its wire time:
    # the device's verify + install time
    device_seconds: float = 0.0
    events: list = field(default_factory=list)

    def as_metadata(self) -> dict:
        d = asdict(self)
        d.pop("events")
        return d


class Deployer:
    """Streams one package to one device over a SerialTransport."""

    def __init__(
        self,
        transport: SerialTransport,
        *,
        window: int = MAX_WINDOW,
        retries: int = 6,
        progress: Callable[[dict], None] | None = None,
        log: Callable[[str], None] | None = None,
        install_s: float = INSTALL_S,
        reply_slack_s: float = 0.0,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window {window} out of 1..{MAX_WINDOW}")
        self.t = transport
        self.window = window
        self.retries = retries
        self.progress = progress or (lambda info: None)
        self.log = log or (lambda msg: None)
        self.install_s = install_s
        self.reply_slack_s = reply_slack_s  # real seconds more for every reply: a busy host or device answers late
        self.seq = 0
        self.timeouts = 0

    # --- exchanges
    def _reply_timeout(self, reply_wire: int, extra_s: float = 0.0) -> float:
        tm = self.t.timing
        link_s = 2 * tm.turnaround_s + reply_wire * tm.byte_s + 0.5 + extra_s
        return self.t.drain_time() + link_s * tm.time_scale + REAL_SLACK_S + self.reply_slack_s

    def _exchange(self, msg_type: int, body: bytes, want: tuple[int, ...], reply_wire: int,
                  extra_s: float = 0.0, tries: int | None = None) -> tuple[int, bytes] | None:
        """Send, wait for a reply of a wanted type echoing our seq; resend on timeout. None when all tries fail."""
        for _ in range(tries or self.retries):
            self.seq = (self.seq + 1) & 0xFFFF
            self.t.send(msg_type, self.seq, body)
            got = self._await(want, reply_wire, extra_s)
            if got is not None:
                return got
        return None

    def _await(self, want: tuple[int, ...], reply_wire: int, extra_s: float = 0.0) -> tuple[int, bytes] | None:
        deadline = time.monotonic() + self._reply_timeout(reply_wire, extra_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.timeouts += 1
                return None
            msg = self.t.recv(left)
            if msg is None:
                continue
            mtype, _, body = msg
            if mtype in want and len(body) >= 2 and struct.unpack_from("<H", body, 0)[0] == self.seq:
                return mtype, body
            # stale, duplicated or unrelated: ignore

    @staticmethod
    def _result(body: bytes) -> tuple[bool, int, str, str]:
        _, status, version = struct.unpack_from(m.RESULT_FORMAT, body, 0)
        pos = struct.calcsize(m.RESULT_FORMAT)
        n = body[pos]
        champion = body[pos + 1 : pos + 1 + n].decode(errors="replace")
        reason = body[pos + 1 + n :].decode(errors="replace")
        return status == m.RESULT_INSTALLED, version, champion, reason

    # --- the deployment
    def deploy(self, pkg: Package) -> DeployReport:
        """Deploy pkg; returns the report (installed or refused with the device's reason), or raises DeployError."""
        t0 = time.monotonic()
        w0_out, w0_in = self.t.wire_bytes_out, self.t.wire_bytes_in
        rep = DeployReport(installed=False, reason="", package_sha256=pkg.sha256.hex(), package_bytes=pkg.size)
        offer = pkg.offer()
        sent_once: set[int] = set()
        try:
            for attempt in range(self.retries):
                got = self._exchange(m.DEPLOY_OFFER, offer, (m.DEPLOY_HAVE, m.DEPLOY_RESULT), HAVE_WIRE)
                if got is None:
                    raise DeployError("link cut: no answer to the offer after %d tries" % self.retries)
                mtype, body = got
                if mtype == m.DEPLOY_RESULT:
                    rep.installed, rep.device_champion_version, rep.device_champion_id, rep.reason = self._result(body)
                    if (rep.device_champion_id, rep.device_champion_version) == (pkg.model_id, pkg.version):
                        # an earlier commit installed it and its answer was lost: the device runs this package
                        rep.installed = True
                        self.log(f"the device already runs {pkg.model_id} v{pkg.version} ({rep.reason})")
                    else:
                        self.log(f"device refused the offer: {rep.reason}")
                    return rep
                _, mask, stream_size, resume = struct.unpack_from(m.HAVE_FORMAT, body, 0)
                stream = pkg.stream(mask)
                if len(stream) != stream_size:
                    raise DeployError(f"device computed a stream of {stream_size} bytes, gateway {len(stream)}")
                if attempt == 0:
                    rep.stream_bytes = stream_size
                    rep.delta_saved_bytes = pkg.size - stream_size
                    rep.resumed_from = resume
                    held = [e["name"] for i, e in enumerate(pkg.files) if mask & (1 << i)]
                    self.log(f"offer accepted: {stream_size} of {pkg.size} bytes to send"
                             + (f", device holds {', '.join(held)}" if held else "")
                             + (f", resuming at {resume}" if resume else ""))
                result = self._send_stream(stream, resume, rep, sent_once, t0)
                if result is not None:
                    break
                self.log("device stopped answering: offering again to resume")
            else:
                raise DeployError("link cut: transfer did not complete after %d offers" % self.retries)
            if result is True:  # the stream was complete before we sent anything: ask for the result
                got = self._exchange(m.DEPLOY_COMMIT, struct.pack(m.COMMIT_FORMAT, pkg.sha256), (m.DEPLOY_RESULT,),
                                     RESULT_WIRE_MAX, extra_s=self.install_s)
                if got is None:
                    raise DeployError("link cut: no result after the commit")
                result = got[1]
            rep.installed, rep.device_champion_version, rep.device_champion_id, rep.reason = self._result(result)
            self.log(("installed: " if rep.installed else "device refused the package: ") + rep.reason)
            return rep
        finally:
            rep.timeouts = self.timeouts
            tm = self.t.timing
            rep.link_seconds = (time.monotonic() - t0) / tm.time_scale
            rep.wire_bytes = self.t.wire_bytes_out - w0_out + self.t.wire_bytes_in - w0_in
            if rep.link_seconds > 0:
                rep.occupation = rep.payload_bytes * tm.byte_s / rep.link_seconds

    def _report(self, done: int, total: int, rep: DeployReport, t0: float, what: str) -> None:
        tm = self.t.timing
        elapsed = (time.monotonic() - t0) / tm.time_scale
        # what is left crosses the wire at 10 bits a byte plus the frames' overhead
        eta = (total - done) * tm.byte_s * (m.DEPLOY_FRAG + 13) / m.DEPLOY_FRAG + self.t.drain_time() / tm.time_scale
        self.progress({"what": what, "bytes": done, "total": total, "frames": rep.data_frames,
                       "retransmissions": rep.retransmissions, "link_seconds": round(elapsed, 2),
                       "eta_seconds": round(eta, 1)})

    def _send_stream(self, stream: bytes, base: int, rep: DeployReport, sent_once: set[int],
                     t0: float) -> bytes | bool | None:
        """Send from base until the device has everything: its DEPLOY_RESULT body (it installs as soon as the
        last fragment is in), True when nothing was left to send, None when the device stopped answering."""
        if base >= len(stream):
            return True
        frag = m.DEPLOY_FRAG
        total = len(stream)
        n_frags = math.ceil(total / frag)
        have: set[int] = set()  # fragment indices the device holds beyond base
        while base < total:
            first = base // frag
            todo = [i for i in range(first, min(n_frags, first + self.window)) if i not in have]
            for k, i in enumerate(todo):
                off = i * frag
                word = i | (m.DATA_POLL if k == len(todo) - 1 else 0)
                if k == len(todo) - 1:
                    self.seq = (self.seq + 1) & 0xFFFF
                self.t.send(m.DEPLOY_DATA, self.seq, struct.pack(m.DATA_FORMAT, word) + stream[off : off + frag])
                rep.data_frames += 1
                if i in sent_once:
                    rep.retransmissions += 1
                else:
                    sent_once.add(i)
                    rep.payload_bytes += len(stream[off : off + frag])
            last = todo and todo[-1] == n_frags - 1
            self._report(min(total, (todo[-1] + 1) * frag) if todo else base, total, rep, t0, "sent")
            want = (m.DEPLOY_ACK, m.DEPLOY_RESULT)
            extra = self.install_s if last else 0.0
            wire_end = time.monotonic() + self.t.drain_time()
            got = self._await(want, RESULT_WIRE_MAX if last else ACK_WIRE, extra)
            if got is None:
                poll = struct.pack(m.DATA_FORMAT, (base // frag) | m.DATA_POLL)
                got = self._exchange(m.DEPLOY_DATA, poll, want, RESULT_WIRE_MAX, extra, tries=min(3, self.retries))
                if got is None:
                    return None
            rep.windows += 1
            if got[0] == m.DEPLOY_RESULT:
                tm = self.t.timing
                rep.device_seconds = round(max(0.0, (time.monotonic() - wire_end) / tm.time_scale
                                               - tm.turnaround_s - (MESSAGE_WIRE + len(got[1])) * tm.byte_s), 3)
                self._report(total, total, rep, t0, "acknowledged")
                return got[1]
            _, new_base, bits = struct.unpack_from(m.ACK_FORMAT, got[1], 0)
            if new_base < base:
                self.log(f"device went back from {base} to {new_base} (restarted?)")
            base = new_base
            have = {base // frag + 1 + j for j in range(m.ACK_BITS) if bits & (1 << j)}
            self._report(base, total, rep, t0, "acknowledged")
        return True  # not reached: the last acknowledgement is a result


@dataclass
class SettingsReport:
    """What a settings update did on the wire and what the device answered."""

    applied: bool
    reason: str
    device_settings_version: int
    in_force: dict | None
    body_bytes: int
    wire_bytes: int
    timeouts: int
    link_seconds: float

    def as_metadata(self) -> dict:
        return asdict(self)


def send_settings(transport: SerialTransport, body: bytes, version: int, *, retries: int = 6,
                  reply_slack_s: float = 0.0) -> SettingsReport:
    """Send one sealed CONFIG_UPDATE (firmware.configure.pack_update) and return the device's answer; DeployError
    when it never answers. A repeat whose first answer was lost finds the device at this version: applied."""
    from firmware import configure

    t0, w0 = time.monotonic(), transport.wire_bytes_out + transport.wire_bytes_in
    sender = Deployer(transport, retries=retries, reply_slack_s=reply_slack_s)
    got = sender._exchange(m.CONFIG_UPDATE, body, (m.CONFIG_RESULT,), RESULT_WIRE_MAX)
    if got is None:
        raise DeployError("link cut: no answer to the settings update after %d tries" % retries)
    applied, device_version, reason, in_force = configure.unpack_result(got[1])
    if not applied and device_version == version and reason.startswith("replayed"):
        applied, reason = True, "applied settings v%d (an earlier answer was lost)" % version
    return SettingsReport(applied, reason, device_version, in_force, len(body),
                          transport.wire_bytes_out + transport.wire_bytes_in - w0, sender.timeouts,
                          round((time.monotonic() - t0) / transport.timing.time_scale, 3))
