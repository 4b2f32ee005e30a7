"""Data Comm manager (device side): the gateway link in pySerialTransfer frames, paced to the link's baud rate.

Sends HELLO at boot and on STATUS_REQUEST, an UPLOAD for every anomaly and every `upload_every`-th normal
window; uploads stay in a bounded outbox (persisted in outbox.bin) until the gateway's UPLOAD_ACK; unacked ones
are re-sent after ack_timeout_ms; a full outbox drops its oldest normal upload (else its oldest) and counts it.
Deploy messages go to firmware/transfer.py. Replies and control messages go before uploads.
"""

import struct

from firmware import frames, messages
from firmware._compat import const, exists, read_bytes, ticks_add, ticks_diff, write_atomic

FIRMWARE_VERSION = const(1)
HELLO_FORMAT = "<16sHI16sIIIIHB"
PHASE_COLLECTING = const(0)
PHASE_INFERRING = const(1)
# champion version, chunk index, chunk count; the chunks' data concatenated is
# u16 LE length of config.json | config.json | compact forest bytes
CHAMPION_CHUNK_FORMAT = "<IHH"
CHAMPION_CHUNK_DATA = const(240)
_DEPLOY_TYPES = (messages.DEPLOY_OFFER, messages.DEPLOY_DATA, messages.DEPLOY_COMMIT)
_BITS_PER_BYTE = const(10)  # 8N1


def _fixed(text, n):
    b = text.encode()[:n]
    return b + bytes(n - len(b))


def pack_hello(device_id, champion_version, champion_id, windows, anomalies, next_upload, dropped, outbox, phase):
    """HELLO body (HELLO_FORMAT)."""
    return struct.pack(HELLO_FORMAT, _fixed(device_id, 16), FIRMWARE_VERSION, champion_version,
                       _fixed(champion_id, 16), windows, anomalies, next_upload, dropped, outbox, phase)


def unpack_hello(body):
    """dict of a HELLO body."""
    v = struct.unpack(HELLO_FORMAT, bytes(body))
    return {"device_id": v[0].rstrip(b"\0").decode(), "firmware_version": v[1], "champion_version": v[2],
            "champion_id": v[3].rstrip(b"\0").decode(), "windows": v[4], "anomalies": v[5],
            "next_upload": v[6], "uploads_dropped": v[7], "outbox": v[8], "phase": v[9]}


class DataComm:
    """Frames in and out over `link` (readinto/write: machine.UART or the emulator's bridge)."""

    def __init__(self, link, root, state, baud=2400, outbox_max=64, upload_every=10, ack_timeout_ms=5000,
                 transfer=None, status=None):
        self.link = link
        self.root = root
        self.state = state
        self.ms_per_byte = _BITS_PER_BYTE * 1000 / baud
        self.outbox_max = outbox_max
        self.upload_every = upload_every
        self.ack_timeout_ms = ack_timeout_ms
        self.transfer = transfer  # object with handle(msg_type, body, seq) -> [(type, body), ...]
        self.status = status  # callable returning the HELLO body
        self.decoder = frames.FrameDecoder()
        self.rx = bytearray(64)
        self.rx_mv = memoryview(self.rx)
        self.control = []  # (type, body) to send before any upload
        self.outbox = []  # [upload_no, anomaly, body, sent_at or None]
        self.seq = 0
        self.busy_until = None  # ticks_ms when the link is free again
        self.frames_in = 0
        self.frames_out = 0
        self.bad_messages = 0
        self.uploads_sent = 0
        self.uploads_acked = 0
        self._normal_count = 0
        self._load_outbox()

    # --- outbox (survives reboots)
    def _outbox_path(self):
        return self.root + "/outbox.bin"

    def _load_outbox(self):
        path = self._outbox_path()
        if not exists(path):
            return
        buf = read_bytes(path)
        pos = 0
        while pos + 3 <= len(buf):
            n, flag = struct.unpack_from("<HB", buf, pos)
            pos += 3
            if pos + n > len(buf):
                break  # a torn tail cannot happen with write_atomic, but never trust flash
            body = bytes(buf[pos:pos + n])
            pos += n
            self.outbox.append([struct.unpack_from("<I", body, 0)[0], flag, body, None])

    def _save_outbox(self):
        out = bytearray()
        for e in self.outbox:
            out += struct.pack("<HB", len(e[2]), 1 if e[1] else 0)
            out += e[2]
        write_atomic(self._outbox_path(), out)

    def queue_upload(self, window_time, anomaly, champion_version, score, feats):
        """Queue an UPLOAD for this window when it is an anomaly or the periodic normal one; True if queued."""
        if not anomaly:
            self._normal_count += 1
            if self._normal_count < self.upload_every:
                return False
            self._normal_count = 0
        data = self.state.data
        no = data.get("next_upload", 0)
        data["next_upload"] = no + 1
        body = messages.pack_upload(no, window_time, anomaly, champion_version, score, feats)
        if len(self.outbox) >= self.outbox_max:
            drop = 0
            for i in range(len(self.outbox)):
                if not self.outbox[i][1]:
                    drop = i
                    break
            self.outbox.pop(drop)
            data["uploads_dropped"] = data.get("uploads_dropped", 0) + 1
        self.outbox.append([no, anomaly, bytes(body), None])
        self._save_outbox()
        return True

    # --- sending
    def send(self, msg_type, body=b""):
        """Queue a control message (sent before uploads)."""
        self.control.append((msg_type, body))

    def _write(self, msg_type, body, now):
        self.seq = (self.seq + 1) & 0xFFFF
        frame = frames.encode(messages.pack(msg_type, self.seq, body))
        self.link.write(frame)
        self.frames_out += 1
        self.busy_until = ticks_add(now, int(len(frame) * self.ms_per_byte) + 1)

    def service(self, now):
        """Send at most one frame if the link has finished the previous one; True when something was sent."""
        if self.busy_until is not None and ticks_diff(self.busy_until, now) > 0:
            return False
        if self.control:
            t, b = self.control.pop(0)
            self._write(t, b, now)
            return True
        for e in self.outbox:
            if e[3] is None or ticks_diff(now, e[3]) >= self.ack_timeout_ms:
                if e[3] is None:
                    self.uploads_sent += 1
                e[3] = now
                self._write(messages.UPLOAD, e[2], now)
                return True
        return False

    # --- receiving
    def poll(self):
        """Read what the link has and handle complete messages; the number of messages handled."""
        n = self.link.readinto(self.rx_mv)
        if not n:
            return 0
        handled = 0
        dec = self.decoder
        for i in range(n):
            length = dec.feed(self.rx[i])
            if length:
                self.frames_in += 1
                m = messages.unpack(dec.payload())
                if m is None:
                    self.bad_messages += 1
                    continue
                self.handle(m[0], m[2], m[1])
                handled += 1
        return handled

    def handle(self, msg_type, body, seq=0):
        if msg_type == messages.STATUS_REQUEST:
            if self.status is not None:
                self.send(messages.HELLO, self.status())
        elif msg_type == messages.UPLOAD_ACK:
            if len(body) < 4:
                self.bad_messages += 1
                return
            upto = struct.unpack_from("<I", body, 0)[0]
            before = len(self.outbox)
            self.outbox = [e for e in self.outbox if e[0] > upto]
            if len(self.outbox) != before:
                self.uploads_acked += before - len(self.outbox)
                self._save_outbox()
        elif msg_type in _DEPLOY_TYPES:
            if self.transfer is None:
                self.send(messages.ERROR, b"no transfer module")
                return
            for t, b in self.transfer.handle(msg_type, bytes(body), seq):
                self.send(t, b)
        else:
            self.bad_messages += 1

    def queue_champion(self, version, config_json, compact):
        """Queue the self-trained champion (config.json and compact bytes) as CHAMPION_CHUNK messages."""
        compact = messages.pack_champion(config_json, compact)
        total = (len(compact) + CHAMPION_CHUNK_DATA - 1) // CHAMPION_CHUNK_DATA
        for i in range(total):
            head = struct.pack(CHAMPION_CHUNK_FORMAT, version, i, total)
            self.send(messages.CHAMPION_CHUNK, head + compact[i * CHAMPION_CHUNK_DATA:(i + 1) * CHAMPION_CHUNK_DATA])
