"""Message envelope inside a frame's payload: type u8 | seq u16 LE | body | crc16 (CCITT-FALSE), and the types."""

import struct

HEADER_SIZE = 3
CHECK_SIZE = 2
MAX_BODY = 254 - HEADER_SIZE - CHECK_SIZE  # 249

# device -> gateway
HELLO = 0x01  # device status: id, champion, version, counters (body: data_comm.HELLO_FORMAT)
UPLOAD = 0x10  # one window: features, champion score and decision (body: UPLOAD_FORMAT, then its MAC)
CHAMPION_CHUNK = 0x12  # the self-trained champion, compact encoding, in chunks
UPLOAD_GAP = 0x15  # upload numbers that will never come (body: GAP_FORMAT): the gateway records them as lost
ALARM = 0x16  # an alarm raised (end 0) or cleared (body: ALARM_FORMAT, then its MAC), until ALARM_ACK
DEPLOY_HAVE = 0x21  # what the device holds / where a transfer resumes
DEPLOY_ACK = 0x23  # acknowledgement of a window of data frames
DEPLOY_RESULT = 0x25  # installed or refused (+ reason), champion id and version
# gateway -> device
STATUS_REQUEST = 0x02
UPLOAD_ACK = 0x11  # uploads up to and including an upload number are committed
UPLOAD_REFUSED = 0x14  # this upload will never be stored (body: UPLOAD_REFUSED_FORMAT + reason): drop it
CHAMPION_ACK = 0x13  # the champion upload is stored or refused for good (body: CHAMPION_ACK_FORMAT)
DEPLOY_OFFER = 0x20  # a package is coming: id, version, size, hash, manifest, then its MAC
DEPLOY_DATA = 0x22  # one fragment: offset + bytes
DEPLOY_COMMIT = 0x24  # all fragments sent: verify and install
# either way
ERROR = 0x7F

# UPLOAD body: upload number (u32, monotonic per device, survives reboots), window time (u32, s),
# flags (u8: FLAG_ANOMALY; high nibble: the feature set's code, firmware.feature_sets.CODES, 0 = the paper's),
# champion version (u16), champion score (f32), then the features (f32 each, as many as the set has).
UPLOAD_FORMAT = "<IIBHf"
UPLOAD_HEAD_SIZE = struct.calcsize(UPLOAD_FORMAT)
FLAG_ANOMALY = 0x01
FEATURE_SET_SHIFT = 4


def pack_champion(config_json, compact):
    """A self-trained champion as it travels in CHAMPION_CHUNKs: u16 length | config.json | compact forest bytes."""
    return struct.pack("<H", len(config_json)) + config_json + compact


def unpack_champion(blob):
    """(config.json bytes, compact forest bytes) of a champion blob; ValueError when it is cut short."""
    if len(blob) < 2:
        raise ValueError("champion blob of %d bytes: no length" % len(blob))
    n = struct.unpack_from("<H", blob, 0)[0]
    if len(blob) < 2 + n:
        raise ValueError("champion blob of %d bytes: config.json of %d bytes cut short" % (len(blob), n))
    return bytes(blob[2:2 + n]), bytes(blob[2 + n:])


def _crc16_table():
    table = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
        table.append(c)
    return tuple(table)


CRC16_TABLE = _crc16_table()


def crc16(buf, n):
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) of the first n bytes of buf."""
    crc = 0xFFFF
    t = CRC16_TABLE
    for i in range(n):
        crc = ((crc << 8) & 0xFFFF) ^ t[((crc >> 8) ^ buf[i]) & 0xFF]
    return crc


def pack(msg_type, seq, body=b""):
    """Envelope bytes for a message (ready to be a frame's payload)."""
    n = len(body)
    if n > MAX_BODY:
        raise ValueError("message body of %d bytes exceeds %d" % (n, MAX_BODY))
    out = bytearray(HEADER_SIZE + n + CHECK_SIZE)
    out[0] = msg_type
    out[1] = seq & 0xFF
    out[2] = (seq >> 8) & 0xFF
    out[HEADER_SIZE:HEADER_SIZE + n] = body
    c = crc16(out, HEADER_SIZE + n)
    out[HEADER_SIZE + n] = c & 0xFF
    out[HEADER_SIZE + n + 1] = c >> 8
    return out


def unpack(payload):
    """(type, seq, body memoryview) of an envelope, or None when it is too short or its check fails."""
    n = len(payload)
    if n < HEADER_SIZE + CHECK_SIZE:
        return None
    c = crc16(payload, n - CHECK_SIZE)
    if payload[n - 2] != (c & 0xFF) or payload[n - 1] != (c >> 8):
        return None
    mv = memoryview(payload)
    return payload[0], payload[1] | (payload[2] << 8), mv[HEADER_SIZE:n - CHECK_SIZE]


def pack_upload(upload_no, window_time, anomaly, champion_version, score, features, feature_set=0):
    """UPLOAD body for one window (feature_set: the code of the set the features belong to)."""
    nf = len(features)
    if not 0 <= feature_set < 16:
        raise ValueError("feature set code %d outside 0..15" % feature_set)
    body = bytearray(UPLOAD_HEAD_SIZE + 4 * nf)
    struct.pack_into(UPLOAD_FORMAT, body, 0, upload_no, window_time,
                     (FLAG_ANOMALY if anomaly else 0) | (feature_set << FEATURE_SET_SHIFT), champion_version, score)
    for i in range(nf):
        struct.pack_into("<f", body, UPLOAD_HEAD_SIZE + 4 * i, features[i])
    return body


def unpack_upload(body):
    """(upload_no, window_time, anomaly, champion_version, score, features tuple, feature set code) of an UPLOAD."""
    if len(body) < UPLOAD_HEAD_SIZE or (len(body) - UPLOAD_HEAD_SIZE) % 4:
        raise ValueError("UPLOAD body of %d bytes is malformed" % len(body))
    upload_no, window_time, flags, version, score = struct.unpack_from(UPLOAD_FORMAT, body, 0)
    nf = (len(body) - UPLOAD_HEAD_SIZE) // 4
    features = struct.unpack_from("<%df" % nf, body, UPLOAD_HEAD_SIZE)
    return upload_no, window_time, bool(flags & FLAG_ANOMALY), version, score, features, flags >> FEATURE_SET_SHIFT


# ALARM body: alarm number (u32, per device, monotonic, survives reboots; its raise and its clear share it), start
# (u32, s), end (u32, s; 0 while active), peak score (f32), feature set code (u8), champion version (u16), then the
# champion id (u8 length + bytes). The device sends it again every ack timeout until the gateway's ALARM_ACK.
ALARM_FORMAT = "<IIIfBH"
ALARM_HEAD_SIZE = struct.calcsize(ALARM_FORMAT)
ALARM_END_OFFSET = 8


def pack_alarm(alarm_no, start, end, peak, feature_set, champion_version, champion_id):
    """ALARM body of one alarm event (end 0: still active)."""
    cid = champion_id.encode()[:255]
    return (struct.pack(ALARM_FORMAT, alarm_no, start, end, peak, feature_set, champion_version)
            + bytes([len(cid)]) + cid)


def unpack_alarm(body):
    """(alarm number, start, end or None, peak, feature set code, champion version, champion id) of an ALARM body."""
    if len(body) < ALARM_HEAD_SIZE + 1 or len(body) != ALARM_HEAD_SIZE + 1 + body[ALARM_HEAD_SIZE]:
        raise ValueError("ALARM body of %d bytes is malformed (need %d + 1 + champion id length)"
                         % (len(body), ALARM_HEAD_SIZE))
    no, start, end, peak, code, version = struct.unpack_from(ALARM_FORMAT, body, 0)
    cid = bytes(body[ALARM_HEAD_SIZE + 1:]).decode()
    return no, start, (end or None), peak, code, version, cid


# Authentication: an UPLOAD, UPLOAD_GAP or ALARM body, a champion blob and a DEPLOY_OFFER body end with a MAC
# (MAC_SIZE bytes) over the body before it, taken as opaque bytes:
# HMAC-SHA256(device key, tag | u8 length | device id | body), cut to MAC_SIZE. The
# upload number inside the UPLOAD body is covered; the gateway stores only uploads whose MAC verifies under the
# key of the device the port (or id) belongs to, the device starts a transfer only on a verified offer.
MAC_SIZE = 16
TAG_UPLOAD = b"TMUP"
TAG_OFFER = b"TMOF"
TAG_GAP = b"TMGP"  # an UPLOAD_GAP body is sealed too: only the device may say its numbers will never come
TAG_CHAMPION = b"TMCH"  # and the champion blob, before it is cut into CHAMPION_CHUNKs
TAG_ALARM = b"TMAL"  # and an ALARM body: only the device raises or clears its alarms


def mac(key, tag, device_id, body):
    """The MAC of a body sent by (UPLOAD) or to (DEPLOY_OFFER) device_id."""
    from firmware.package import hmac_sha256

    d = device_id.encode()
    return hmac_sha256(key, tag + bytes([len(d)]) + d + bytes(body))[:MAC_SIZE]


def seal(key, tag, device_id, body):
    """body followed by its MAC."""
    return bytes(body) + mac(key, tag, device_id, body)


def unseal(key, tag, device_id, sealed):
    """The body of a sealed message whose MAC verifies under key, else None."""
    from firmware.package import equal

    if not key or len(sealed) < MAC_SIZE:
        return None
    body = bytes(sealed[:len(sealed) - MAC_SIZE])
    if not equal(mac(key, tag, device_id, body), bytes(sealed[len(sealed) - MAC_SIZE:])):
        return None
    return body


# UPLOAD_REFUSED body: the refused upload number (u32), then the reason (ASCII, the rest of the body).
UPLOAD_REFUSED_FORMAT = "<I"


def pack_upload_refused(upload_no, reason):
    """UPLOAD_REFUSED body: the number, then the reason cut to fit one message."""
    return struct.pack(UPLOAD_REFUSED_FORMAT, upload_no) + reason.encode()[:MAX_BODY - 4]


# UPLOAD_GAP body: first and last upload number (inclusive) and why they will never come: GAP_DROPPED (the
# outbox was full), GAP_SETTLED (acknowledged by a gateway before: sent after a boot, so that a gateway with an
# empty Knowledge Base moves its ack past them). The gateway answers with its cumulative UPLOAD_ACK.
GAP_FORMAT = "<IIB"
GAP_DROPPED = 0
GAP_SETTLED = 1
# CHAMPION_ACK body: champion version, status (CHAMPION_STORED or CHAMPION_REFUSED; either way: stop sending it).
CHAMPION_ACK_FORMAT = "<IB"
CHAMPION_STORED = 0
CHAMPION_REFUSED = 1

# Deploy bodies (firmware/transfer.py <-> tinyml_dagster/link/protocol.py). Replies start with the u16 seq of
# the message they answer, so the gateway can tell a fresh reply from a stale or duplicated one.
# DEPLOY_OFFER: package sha256, package size, version, file count, then per file: sha8 + stored size.
OFFER_FORMAT = "<32sIIB"
OFFER_FILE_FORMAT = "<8sI"
# DEPLOY_HAVE: echo, files held (bit i = file i), stream size, resume offset (bytes already acknowledged).
HAVE_FORMAT = "<HBII"
# DEPLOY_DATA: fragment number (offset / DEPLOY_FRAG; bit 15: acknowledgement requested), then the fragment
# (empty: a poll).
DATA_FORMAT = "<H"
DATA_POLL = 0x8000
DEPLOY_FRAG = MAX_BODY - 2  # 247
# DEPLOY_ACK: echo, contiguous bytes received, bitmap of the next 64 fragments after it (bit i: base + (i+1)*frag).
ACK_FORMAT = "<HIQ"
ACK_BITS = 64
# DEPLOY_COMMIT: package sha256.
COMMIT_FORMAT = "<32s"
# DEPLOY_RESULT: echo, status, champion version, then champion id (u8 length + bytes) and the reason (rest).
RESULT_FORMAT = "<HBI"
RESULT_INSTALLED = 0
RESULT_REFUSED = 1

# Settings (the paper's Configure phase) and health (its Monitor phase); codes after ALARM.
HEALTH = 0x17  # device -> gateway: one reporting period's health (body: HEALTH_FORMAT, then its MAC)
CONFIG_UPDATE = 0x18  # gateway -> device: a signed settings update (body: CONFIG_FORMAT + JSON, then its MAC)
CONFIG_RESULT = 0x19  # device -> gateway: applied or refused (body: CONFIG_RESULT_FORMAT, reason, settings JSON)
TAG_CONFIG = b"TMCF"  # a settings update is sealed by the gateway under the device's key
TAG_HEALTH = b"TMHL"  # a health report is sealed by the device: only it may say how it is
# CONFIG_UPDATE: settings version (u32, strictly above every version the device applied: no replay), flags (u8:
# CONFIG_REVERT, go back to the settings before the last update), then the changed settings as a JSON object.
CONFIG_FORMAT = "<IB"
CONFIG_REVERT = 0x01
# CONFIG_RESULT: echo, status, the device's settings version, reason length (u8), reason, then the settings in
# force as a JSON object (the rest).
CONFIG_RESULT_FORMAT = "<HBIB"
CONFIG_APPLIED = 0
CONFIG_REFUSED = 1

# Alarm delivery; codes after CONFIG_RESULT.
ALARM_ACK = 0x1A  # gateway -> device: an ALARM event is stored (or refused for good): stop sending it
# ALARM_ACK: alarm number, the acknowledged event's end (0: its raise), status (ALARM_STORED: the event with that
# number and end is committed; ALARM_REFUSED: that alarm will never be stored, whatever its end).
ALARM_ACK_FORMAT = "<IIB"
ALARM_STORED = 0
ALARM_REFUSED = 1
# HEALTH: windows in the period (u16), feature extraction mean and max (us, u32 each), inference mean and max (us),
# active time per window mean (us), free heap and largest free block (bytes, u32), uptime (s, u32), boots (u16),
# last reset cause (u8: machine.reset_cause(), 0 unknown), frames retransmitted and link errors in the period
# (u16 each), settings version (u32).
HEALTH_FORMAT = "<HIIIIIIIIHBHHI"
HEALTH_FIELDS = ("windows", "feature_us_mean", "feature_us_max", "inference_us_mean", "inference_us_max",
                 "active_us_mean", "free_heap", "largest_free_heap", "uptime_s", "boots", "reset_cause",
                 "retransmits", "link_errors", "settings_version")


def pack_health(h):
    """HEALTH body of a dict with HEALTH_FIELDS (values clamped to their field's range)."""
    vals = []
    for i in range(len(HEALTH_FIELDS)):
        v = int(h.get(HEALTH_FIELDS[i], 0))
        top = 0xFF if HEALTH_FORMAT[i + 1] == "B" else 0xFFFF if HEALTH_FORMAT[i + 1] == "H" else 0xFFFFFFFF
        vals.append(0 if v < 0 else top if v > top else v)
    return struct.pack(HEALTH_FORMAT, *vals)


def unpack_health(body):
    """dict of a HEALTH body (HEALTH_FIELDS); ValueError when it is too short."""
    n = struct.calcsize(HEALTH_FORMAT)
    if len(body) < n:
        raise ValueError("HEALTH body of %d bytes, need %d" % (len(body), n))
    return dict(zip(HEALTH_FIELDS, struct.unpack_from(HEALTH_FORMAT, body, 0)))
