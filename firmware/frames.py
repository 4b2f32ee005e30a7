"""pySerialTransfer framing on the device: 0x7E, id, overhead, len, stuffed payload, CRC-8 (0x9B), 0x81."""

START_BYTE = 0x7E
STOP_BYTE = 0x81
MAX_PAYLOAD = 254
NO_START_IN_PAYLOAD = 0xFF


def _crc8_table(poly):
    table = bytearray(256)
    for i in range(256):
        c = i
        for _ in range(8):
            c = ((c << 1) ^ poly) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table[i] = c
    return bytes(table)


CRC8_TABLE = _crc8_table(0x9B)


def crc8(buf, n):
    """CRC-8 (poly 0x9B, init 0) of the first n bytes of buf, as pySerialTransfer computes it."""
    crc = 0
    t = CRC8_TABLE
    for i in range(n):
        crc = t[crc ^ buf[i]]
    return crc


def encode(payload, packet_id=0):
    """One complete frame for payload (1..254 bytes), byte-for-byte what pySerialTransfer.send() writes."""
    n = len(payload)
    if n < 1 or n > MAX_PAYLOAD:
        raise ValueError("frame payload must be 1..254 bytes, got %d" % n)
    frame = bytearray(n + 6)
    frame[0] = START_BYTE
    frame[1] = packet_id
    frame[3] = n
    frame[4:4 + n] = payload
    # COBS-like stuffing: each START_BYTE in the payload becomes the distance to the next one (0 for the last).
    overhead = NO_START_IN_PAYLOAD
    last = -1
    for i in range(n - 1, -1, -1):
        if frame[4 + i] == START_BYTE:
            frame[4 + i] = (last - i) if last >= 0 else 0
            last = i
    if last >= 0:
        overhead = last
    frame[2] = overhead
    frame[4 + n] = crc8(memoryview(frame)[4:], n)
    frame[5 + n] = STOP_BYTE
    return frame


# decoder states
_START = 0
_ID = 1
_OVERHEAD = 2
_LEN = 3
_PAYLOAD = 4
_CRC = 5
_STOP = 6


class FrameDecoder:
    """Incremental frame parser over a preallocated buffer; counts what it rejects."""

    def __init__(self):
        self.buf = bytearray(MAX_PAYLOAD)
        self.state = _START
        self.packet_id = 0
        self.overhead = 0
        self.length = 0
        self.index = 0
        self.crc_errors = 0
        self.framing_errors = 0

    def feed(self, byte):
        """Consume one byte; return the payload length when a frame is complete (payload in self.buf), else 0."""
        s = self.state
        if s == _START:
            if byte == START_BYTE:
                self.state = _ID
        elif s == _ID:
            self.packet_id = byte
            self.state = _OVERHEAD
        elif s == _OVERHEAD:
            self.overhead = byte
            self.state = _LEN
        elif s == _LEN:
            if 0 < byte <= MAX_PAYLOAD:
                self.length = byte
                self.index = 0
                self.state = _PAYLOAD
            else:
                self.framing_errors += 1
                self.state = _START
        elif s == _PAYLOAD:
            self.buf[self.index] = byte
            self.index += 1
            if self.index == self.length:
                self.state = _CRC
        elif s == _CRC:
            if crc8(self.buf, self.length) == byte:
                self.state = _STOP
            else:
                self.crc_errors += 1
                self.state = _START
        else:
            self.state = _START
            if byte == STOP_BYTE:
                return self._unstuff()
            self.framing_errors += 1
        return 0

    def _unstuff(self):
        i = self.overhead
        n = self.length
        buf = self.buf
        if i < n:
            while True:
                step = buf[i]
                buf[i] = START_BYTE
                if step == 0:
                    break
                i += step
                if i >= n:
                    self.framing_errors += 1
                    return 0
        return n

    def payload(self):
        """The last complete payload, as a memoryview into the decoder's buffer (valid until the next feed)."""
        return memoryview(self.buf)[:self.length]
