#!/usr/bin/env python3
"""Writes the seed corpus of the `vnc-websocket` fuzz target (tests/fuzz/corpus/vnc-websocket):
a noVNC-style WebSocket upgrade request followed by masked client frames carrying the RFB 3.8
handshake and client messages, in the framings a WebSocket peer may use: one frame per message,
16- and 64-bit lengths, fragments with continuation frames, ping and close control frames, and
base64 text frames for the old "base64" subprotocol. The first seed asks for a full raw update,
which the test uses to see that the seeds reach the RFB session. Rewrites the files in place."""
import base64, os, struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "vnc-websocket")
MASK = b"\x37\xfa\x21\x3d"


def request(protocol="binary"):
    return ("GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n"
            "Origin: http://127.0.0.1\r\n\r\n").encode()


def frame(payload, opcode=0x2, fin=True, width=None):
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if width is None:
        width = 7 if n < 126 else 16 if n < 65536 else 64
    if width == 7:
        head += bytes([0x80 | n])
    elif width == 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return head + MASK + masked


HANDSHAKE = [b"RFB 003.008\n", b"\x01", b"\x01"]  # version, security None, ClientInit shared
PIXEL_FORMAT = b"\x00\x00\x00\x00" + bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
ENCODINGS = b"\x02\x00\x00\x04" + b"".join(struct.pack(">i", e) for e in (7, 16, 0, -223))
RAW_ONLY = b"\x02\x00\x00\x01" + struct.pack(">i", 0)
UPDATE = b"\x03\x00" + struct.pack(">HHHH", 0, 0, 64, 48)
INCREMENTAL = b"\x03\x01" + struct.pack(">HHHH", 0, 0, 64, 48)
KEY = b"\x04\x01\x00\x00" + struct.pack(">I", 0x61) + b"\x04\x00\x00\x00" + struct.pack(">I", 0x61)
POINTER = b"\x05\x01" + struct.pack(">HH", 10, 20) + b"\x05\x00" + struct.pack(">HH", 11, 21)
CUT = b"\x06\x00\x00\x00" + struct.pack(">I", 5) + b"hello"

seeds = {
    "01-one-frame-per-message.bin": request() + b"".join(
        frame(m) for m in HANDSHAKE + [PIXEL_FORMAT, RAW_ONLY, UPDATE, KEY, POINTER]),
    "02-all-in-one-frame.bin": request() + frame(b"".join(HANDSHAKE + [ENCODINGS, INCREMENTAL, CUT])),
    "03-extended-lengths.bin": request() + b"".join(frame(m, width=16) for m in HANDSHAKE)
        + frame(CUT + b"x" * 200, width=16) + frame(UPDATE, width=64),
    "04-fragments-and-control.bin": request() + frame(HANDSHAKE[0][:5], fin=False)
        + frame(b"", opcode=0x9) + frame(HANDSHAKE[0][5:], opcode=0x0)
        + frame(HANDSHAKE[1]) + frame(HANDSHAKE[2]) + frame(POINTER, fin=False)
        + frame(KEY, opcode=0x0) + frame(struct.pack(">H", 1000) + b"bye", opcode=0x8),
    "05-base64-text.bin": request("base64") + b"".join(
        frame(base64.b64encode(m), opcode=0x1) for m in HANDSHAKE + [UPDATE, KEY]),
}

os.makedirs(HERE, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} seeds to {HERE}")
