"""Protobuf varints, the one piece of the wire format we write by hand (ONNX shape edits in
faces/centerface.py, TensorBoard event files in train/common.py) instead of depending on the
protobuf/onnx/tensorboard packages."""
from __future__ import annotations


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """(value, index after it) of the varint starting at buf[i]."""
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def varint(value: int) -> bytes:
    """Encode `value`; a negative value as its 64-bit two's complement, as protobuf does."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
