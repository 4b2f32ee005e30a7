"""The device's framing (firmware/frames.py) against the real pySerialTransfer over a pseudo-terminal."""

import os
import random
import time
import tty

import pytest
from pySerialTransfer import pySerialTransfer as txfer

from firmware import frames, messages


@pytest.fixture
def gateway_link():
    """The real pySerialTransfer on the slave end of a pty; the test holds the master end as the device."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    link = txfer.SerialTransfer(os.ttyname(slave), baud=115200, debug=False, restrict_ports=False)
    link.open()
    yield master, link
    link.close()
    os.close(master)
    os.close(slave)


def _payloads(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(1, frames.MAX_PAYLOAD)
        yield bytes(rng.choice((0x7E, 0x81, 0x00, rng.randrange(256))) for _ in range(n))


def _read_exactly(fd: int, n: int) -> bytes:
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        got += os.read(fd, n - len(got))
    return got


def test_gateway_frames_decode_on_device_byte_for_byte(gateway_link):
    master, link = gateway_link
    decoder = frames.FrameDecoder()
    for i, payload in enumerate(_payloads(1, 150)):
        link.tx_buff[: len(payload)] = list(payload)
        link.send(len(payload), packet_id=i % 4)
        wire = _read_exactly(master, len(payload) + 6)
        assert wire == bytes(frames.encode(payload, i % 4))
        completed = [decoder.feed(b) for b in wire]
        assert completed[-1] == len(payload) and not any(completed[:-1])
        assert bytes(decoder.payload()) == payload and decoder.packet_id == i % 4


def test_device_frames_parse_in_pyserialtransfer(gateway_link):
    master, link = gateway_link
    for payload in _payloads(2, 150):
        os.write(master, frames.encode(payload, 1))
        deadline = time.monotonic() + 5
        while not link.available():
            assert time.monotonic() < deadline, f"pySerialTransfer status {link.status}"
        assert bytes(link.rx_buff[: link.bytes_read]) == payload and link.id_byte == 1


def test_decoder_rejects_corruption_and_resynchronises():
    decoder = frames.FrameDecoder()
    good = frames.encode(b"\x7e hello \x7e", 0)
    corrupt = bytearray(good)
    corrupt[6] ^= 0x10
    completed = [decoder.feed(b) for b in bytes(corrupt) + b"\x00\x81" + bytes(good)]
    assert decoder.crc_errors == 1
    assert completed.count(len(b"\x7e hello \x7e")) == 1
    assert bytes(decoder.payload()) == b"\x7e hello \x7e"


def test_encode_refuses_empty_and_oversized_payloads():
    with pytest.raises(ValueError, match="1..254"):
        frames.encode(b"")
    with pytest.raises(ValueError, match="1..254"):
        frames.encode(bytes(255))


def test_envelope_roundtrip_and_check():
    body = messages.pack_upload(7, 1_700_000_000, True, 3, 0.71, (0.1, -0.2, 3.5))
    envelope = messages.pack(messages.UPLOAD, 65535, body)
    msg_type, seq, got = messages.unpack(envelope)
    assert (msg_type, seq) == (messages.UPLOAD, 65535)
    upload_no, window_time, anomaly, version, score, features = messages.unpack_upload(got)
    assert (upload_no, window_time, anomaly, version) == (7, 1_700_000_000, True, 3)
    assert score == pytest.approx(0.71) and features == pytest.approx((0.1, -0.2, 3.5))
    for i in range(len(envelope)):
        flipped = bytearray(envelope)
        flipped[i] ^= 0x01
        assert messages.unpack(flipped) is None
    with pytest.raises(ValueError, match="exceeds"):
        messages.pack(messages.UPLOAD, 0, bytes(messages.MAX_BODY + 1))
    with pytest.raises(ValueError, match="malformed"):
        messages.unpack_upload(b"\x00" * 5)
