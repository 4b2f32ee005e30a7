"""Data Comm manager (device side): the gateway link in pySerialTransfer frames, paced to the link's baud rate.

Sends HELLO at boot and on STATUS_REQUEST, an UPLOAD for every anomaly and every `upload_every`-th normal
window; uploads stay in a bounded outbox (persisted in outbox.bin) until the gateway's UPLOAD_ACK; unacked ones
are re-sent after ack_timeout_ms, one the gateway refuses (UPLOAD_REFUSED) is dropped; a full outbox drops its
oldest normal upload (else its oldest) and counts it.
Alarm events (ALARM) go first, from their own bounded box (persisted in alarms.bin), again every ack_timeout_ms
until the gateway's ALARM_ACK; an alarm's clear replaces its raise not yet acknowledged; a full box drops its oldest
alarm and counts it.
Deploy messages go to firmware/transfer.py. Replies and control messages go before uploads. While a deploy is
under way (an accepted offer, a deploy message within the last 2 x ack_timeout_ms, no result yet) the bus is the
deploy's: no alarm or upload is sent or sent again (the gateway acknowledges none of them meanwhile, and their
resends would keep the half-duplex line busy under the deploy's frames).
"""

import struct
import sys

from firmware import frames, messages
from firmware._compat import const, exists, read_bytes, ticks_add, ticks_diff, write_atomic

FIRMWARE_VERSION = const(1)
HELLO_FORMAT = "<16sHI16sIIIIHB"
# the HELLO's runtime tail, right after HELLO_FORMAT (a HELLO without it is an older device's): the .mpy version
# and architecture this MicroPython imports, its sys.implementation._mpy (0: none, e.g. CPython)
HELLO_RUNTIME_FORMAT = "<H"
# after the runtime tail (a gateway reads it only from a body long enough): the device's last health report
HELLO_HEALTH_FORMAT = "<IIIHBIII"
HELLO_HEALTH_FIELDS = ("uptime_s", "free_heap", "largest_free_heap", "boots", "reset_cause", "feature_us_mean",
                       "inference_us_mean", "settings_version")
PHASE_COLLECTING = const(0)
PHASE_INFERRING = const(1)
# champion version, chunk index, chunk count; the chunks' data concatenated is
# u16 LE length of config.json | config.json | compact forest bytes
CHAMPION_CHUNK_FORMAT = "<IHH"
CHAMPION_CHUNK_DATA = const(240)
_DEPLOY_TYPES = (messages.DEPLOY_OFFER, messages.DEPLOY_DATA, messages.DEPLOY_COMMIT)
_BITS_PER_BYTE = const(10)  # 8N1
ALARM_OUTBOX_MAX = const(16)


def _fixed(text, n):
    b = text.encode()[:n]
    return b + bytes(n - len(b))


def pack_hello(device_id, champion_version, champion_id, windows, anomalies, next_upload, dropped, outbox, phase):
    """HELLO body (HELLO_FORMAT)."""
    return struct.pack(HELLO_FORMAT, _fixed(device_id, 16), FIRMWARE_VERSION, champion_version,
                       _fixed(champion_id, 16), windows, anomalies, next_upload, dropped, outbox, phase)


def pack_hello_runtime():
    """The HELLO's runtime tail (HELLO_RUNTIME_FORMAT): sys.implementation._mpy, 0 where there is none."""
    return struct.pack(HELLO_RUNTIME_FORMAT, getattr(sys.implementation, "_mpy", 0) & 0xFFFF)


def pack_hello_health(health):
    """The HELLO's health tail (HELLO_HEALTH_FORMAT) of a health report dict; nothing before the first report."""
    if health is None:
        return b""
    return struct.pack(HELLO_HEALTH_FORMAT, *[health.get(k, 0) for k in HELLO_HEALTH_FIELDS])


def unpack_hello(body):
    """dict of a HELLO body; sys_mpy and health only when the body carries their tails."""
    body = bytes(body)
    base = struct.calcsize(HELLO_FORMAT)
    if len(body) < base:
        raise ValueError("HELLO of %d bytes, need %d" % (len(body), base))
    v = struct.unpack(HELLO_FORMAT, body[:base])
    out = {"device_id": v[0].rstrip(b"\0").decode(), "firmware_version": v[1], "champion_version": v[2],
           "champion_id": v[3].rstrip(b"\0").decode(), "windows": v[4], "anomalies": v[5],
           "next_upload": v[6], "uploads_dropped": v[7], "outbox": v[8], "phase": v[9]}
    tail = struct.calcsize(HELLO_RUNTIME_FORMAT)
    if len(body) >= base + tail:
        out["sys_mpy"] = struct.unpack(HELLO_RUNTIME_FORMAT, body[base:base + tail])[0]
    health_at = base + tail
    if len(body) >= health_at + struct.calcsize(HELLO_HEALTH_FORMAT):
        out["health"] = dict(zip(HELLO_HEALTH_FIELDS, struct.unpack_from(HELLO_HEALTH_FORMAT, body, health_at)))
    return out


def _alarm_entry(sealed):
    """An alarm box entry of a sealed ALARM body: [alarm number, end (0: raised), body, sent at (None: not yet)]."""
    return [struct.unpack_from("<I", sealed, 0)[0], struct.unpack_from("<I", sealed, messages.ALARM_END_OFFSET)[0],
            sealed, None]


class DataComm:
    """Frames in and out over `link` (readinto/write: machine.UART or the emulator's bridge)."""

    def __init__(self, link, root, state, baud=2400, outbox_max=64, upload_every=10, ack_timeout_ms=5000,
                 transfer=None, status=None, device_id="", alarm_outbox_max=ALARM_OUTBOX_MAX):
        self.link = link
        self.root = root
        self.device_id = device_id
        self.key = None  # the deploy key (<root>/deploy/key), read once it is provisioned
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
        self.alarm_box = []  # [alarm_no, end, sealed body, sent_at or None]
        self.alarm_outbox_max = alarm_outbox_max
        self.seq = 0
        self.busy_until = None  # ticks_ms when the link is free again
        self.deploy_hold = None  # True: a deploy message just arrived; ticks_ms: uploads and alarms wait until then
        self.frames_in = 0
        self.frames_out = 0
        self.bad_messages = 0
        self.uploads_sent = 0
        self.uploads_acked = 0
        self.uploads_refused = 0  # the gateway will never store them (UPLOAD_REFUSED): dropped, not resent
        self.retransmits = 0  # uploads, alarms and champion chunks sent again after an ack timeout
        self.alarms_acked = 0
        self.configure = None  # callable(body, seq) -> [(type, body), ...] for a CONFIG_UPDATE
        self._normal_count = 0
        self.champion = None  # (version, CHAMPION_CHUNK bodies) until the gateway's CHAMPION_ACK
        self.champion_sent_at = None
        self.gap_sent_at = None
        # after a boot: the numbers a gateway acknowledged before, told once more (a gateway whose Knowledge Base
        # is new moves its ack past them); state's "gaps": the numbers dropped from a full outbox
        through = state.data.get("acked_through", -1)
        self.settled = [[0, through, messages.GAP_SETTLED]] if through >= 0 else []
        for flag, body in self._read_box("outbox.bin"):
            self.outbox.append([struct.unpack_from("<I", body, 0)[0], flag, body, None])
        for _, body in self._read_box("alarms.bin"):
            if len(body) > messages.ALARM_HEAD_SIZE:
                self.alarm_box.append(_alarm_entry(body))

    # --- outboxes (survive reboots): records of u16 length, u8 flag, body
    def _read_box(self, name):
        """(flag, body) of each record of the box file <root>/<name> (none when it does not exist)."""
        path = self.root + "/" + name
        if not exists(path):
            return []
        buf = read_bytes(path)
        out = []
        pos = 0
        while pos + 3 <= len(buf):
            n, flag = struct.unpack_from("<HB", buf, pos)
            pos += 3
            if pos + n > len(buf):
                break  # a torn tail cannot happen with write_atomic, but never trust flash
            out.append((flag, bytes(buf[pos:pos + n])))
            pos += n
        return out

    def _write_box(self, name, box):
        out = bytearray()
        for e in box:
            out += struct.pack("<HB", len(e[2]), 1 if e[1] else 0)
            out += e[2]
        write_atomic(self.root + "/" + name, out)

    def _save_outbox(self):
        self._write_box("outbox.bin", self.outbox)

    def _drop(self, settled):
        """Remove the uploads whose number is settled(no) from the outbox (and flash); how many went."""
        before = len(self.outbox)
        self.outbox = [e for e in self.outbox if not settled(e[0])]
        if len(self.outbox) != before:
            self._save_outbox()
        return before - len(self.outbox)

    def queue_alarm(self, body):
        """Keep an ALARM event (messages.pack_alarm body, sealed like the uploads) until the gateway's ALARM_ACK: it
        replaces the event of the same alarm not yet acknowledged; a full box drops its oldest alarm and counts it."""
        e = _alarm_entry(messages.seal(self._key(), messages.TAG_ALARM, self.device_id, body))
        box = [a for a in self.alarm_box if a[0] != e[0]]
        if len(box) >= self.alarm_outbox_max:
            box.pop(0)
            self.state.data["alarms_dropped"] = self.state.data.get("alarms_dropped", 0) + 1
        box.append(e)
        self.alarm_box = box
        self._write_box("alarms.bin", box)

    def _alarm_acked(self, no, end, status):
        """ALARM_ACK: the event of alarm `no` that ended at `end` is stored (refused: the alarm, whatever its end)."""
        box = [a for a in self.alarm_box if a[0] != no or (a[1] != end and status != messages.ALARM_REFUSED)]
        if len(box) != len(self.alarm_box):
            self.alarms_acked += 1
            self.alarm_box = box
            self._write_box("alarms.bin", box)

    def queue_upload(self, window_time, anomaly, champion_version, score, feats, feature_set=0):
        """Queue an UPLOAD for this window when it is an anomaly or the periodic normal one; True if queued."""
        if not anomaly:
            self._normal_count += 1
            if self._normal_count < self.upload_every:
                return False
            self._normal_count = 0
        data = self.state.data
        no = data.get("next_upload", 0)
        data["next_upload"] = no + 1
        body = messages.seal(self._key(), messages.TAG_UPLOAD, self.device_id,
                             messages.pack_upload(no, window_time, anomaly, champion_version, score, feats,
                                                  feature_set))
        if len(self.outbox) >= self.outbox_max:
            drop = 0
            for i in range(len(self.outbox)):
                if not self.outbox[i][1]:
                    drop = i
                    break
            lost = self.outbox.pop(drop)[0]
            data["uploads_dropped"] = data.get("uploads_dropped", 0) + 1
            self._add_gap(lost, lost)
        self.outbox.append([no, anomaly, bytes(body), None])
        self._save_outbox()
        return True

    def _key(self):
        """The device's key, which authenticates its uploads (empty until provisioned: the gateway refuses them)."""
        if self.key is None and exists(self.root + "/deploy/key"):
            self.key = read_bytes(self.root + "/deploy/key")
        return self.key or b""

    # --- gaps: upload numbers that will never come, told to the gateway until its ack passes them
    def _add_gap(self, first, last):
        gaps = self.state.data.setdefault("gaps", [])
        if gaps and gaps[-1][1] + 1 == first and gaps[-1][2] == messages.GAP_DROPPED:
            gaps[-1][1] = last
        else:
            gaps.append([first, last, messages.GAP_DROPPED])

    def _queue_gaps(self, now):
        """Every ack timeout while gaps are untold: queue an UPLOAD_GAP for each (at most 16 a round)."""
        gaps = self.settled + self.state.data.get("gaps", [])
        if not gaps or (self.gap_sent_at is not None and ticks_diff(now, self.gap_sent_at) < self.ack_timeout_ms):
            return False
        self.gap_sent_at = now
        for g in gaps[:16]:
            self.control.append((messages.UPLOAD_GAP, messages.seal(self._key(), messages.TAG_GAP, self.device_id,
                                                                    struct.pack(messages.GAP_FORMAT, *g))))
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

    def _tx_done(self):
        """True when the link's UART has sent everything written to it (machine.UART.txdone where it has one): a
        frame never queues behind others in the modem, where a reply would wait behind a backlog."""
        txdone = getattr(self.link, "txdone", None)
        return txdone is None or txdone()

    def service(self, now):
        """Send at most one frame if the link has finished the previous one; True when something was sent."""
        if self.busy_until is not None and ticks_diff(self.busy_until, now) > 0:
            return False
        if not self.control and self.champion is not None and (
                self.champion_sent_at is None or ticks_diff(now, self.champion_sent_at) >= self.ack_timeout_ms):
            if self.champion_sent_at is not None:
                self.retransmits += len(self.champion[1])
            self.champion_sent_at = now
            for b in self.champion[1]:
                self.control.append((messages.CHAMPION_CHUNK, b))
        if not self.control:
            self._queue_gaps(now)
        if self.control:
            if not self._tx_done():
                return False
            t, b = self.control.pop(0)
            self._write(t, b, now)
            return True
        if self.deploy_hold is True:
            self.deploy_hold = ticks_add(now, 2 * self.ack_timeout_ms)
        if self.deploy_hold is not None:
            if ticks_diff(self.deploy_hold, now) > 0:
                return False
            self.deploy_hold = None
        for box, msg_type in ((self.alarm_box, messages.ALARM), (self.outbox, messages.UPLOAD)):
            for e in box:
                if e[3] is None or ticks_diff(now, e[3]) >= self.ack_timeout_ms:
                    if not self._tx_done():
                        return False
                    if e[3] is not None:
                        self.retransmits += 1
                    elif msg_type == messages.UPLOAD:
                        self.uploads_sent += 1
                    e[3] = now
                    self._write(msg_type, e[2], now)
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
            self._acked(upto)
            self.uploads_acked += self._drop(lambda no: no <= upto)
        elif msg_type == messages.UPLOAD_REFUSED:
            if len(body) < 4:
                self.bad_messages += 1
                return
            refused = struct.unpack_from(messages.UPLOAD_REFUSED_FORMAT, body, 0)[0]
            self.uploads_refused += self._drop(lambda no: no == refused)
        elif msg_type == messages.ALARM_ACK:
            if len(body) < 9:
                self.bad_messages += 1
                return
            self._alarm_acked(*struct.unpack_from(messages.ALARM_ACK_FORMAT, body, 0))
        elif msg_type == messages.CHAMPION_ACK:
            if len(body) < 5:
                self.bad_messages += 1
                return
            version = struct.unpack_from(messages.CHAMPION_ACK_FORMAT, body, 0)[0]
            if self.champion is not None and self.champion[0] == version:
                self.champion = None
        elif msg_type == messages.CONFIG_UPDATE and self.configure is not None:
            for t, b in self.configure(bytes(body), seq):
                self.send(t, b)
        elif msg_type in _DEPLOY_TYPES:
            if self.transfer is None:
                self.send(messages.ERROR, b"no transfer module")
                return
            replies = self.transfer.handle(msg_type, bytes(body), seq)
            for t, b in replies:
                self.send(t, b)
            done = any(t == messages.DEPLOY_RESULT for t, _ in replies)
            self.deploy_hold = None if done or self.transfer.state is None else True
        else:
            self.bad_messages += 1

    def _acked(self, upto):
        """The gateway's cumulative ack: the gaps it passed are told; the next acked-before range starts there."""
        data = self.state.data
        data["acked_through"] = max(data.get("acked_through", -1), upto)
        self.settled = [g for g in self.settled if g[1] > upto]
        gaps = data.get("gaps", [])
        if gaps and any(g[1] <= upto for g in gaps):
            data["gaps"] = [g for g in gaps if g[1] > upto]
            self.state.save()  # acked_through is saved with the other counters otherwise

    def queue_champion(self, version, config_json, compact):
        """Send the self-trained champion (config.json and compact bytes) as CHAMPION_CHUNK messages, again
        every ack timeout until the gateway's CHAMPION_ACK."""
        compact = messages.seal(self._key(), messages.TAG_CHAMPION, self.device_id,
                                messages.pack_champion(config_json, compact))
        total = (len(compact) + CHAMPION_CHUNK_DATA - 1) // CHAMPION_CHUNK_DATA
        chunks = []
        for i in range(total):
            head = struct.pack(CHAMPION_CHUNK_FORMAT, version, i, total)
            chunks.append(head + compact[i * CHAMPION_CHUNK_DATA:(i + 1) * CHAMPION_CHUNK_DATA])
        self.champion = (version, chunks)
        self.champion_sent_at = None
