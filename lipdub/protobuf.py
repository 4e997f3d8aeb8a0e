"""The bits of the protobuf wire format we handle by hand (ONNX shape edits in
faces/centerface.py, TensorBoard event files in train/common.py) instead of depending on the
protobuf/onnx/tensorboard packages: varints and splitting a message into its fields."""
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


def fields(buf: bytes) -> list[tuple[int, int, object]]:
    """Split a protobuf message into (field number, wire type, value) triples: an int for
    varints, the raw bytes for the other wire types (length-delimited, 64-bit, 32-bit)."""
    out, i = [], 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((num, wire, value))
    return out
