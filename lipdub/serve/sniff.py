"""Content sniffing for uploads: what a file *is*, from its first bytes, never from its name.

The web service stores every upload under a name it makes itself (``face.png``,
``audio.wav``...), with the extension taken from the sniffed kind, because the pipeline tells
stills from videos by extension. A file whose first bytes match no media format we can read
is refused before a job is created.
"""
from __future__ import annotations

from dataclasses import dataclass

HEAD_BYTES = 512  # how much of a file `sniff` looks at


@dataclass(frozen=True)
class Kind:
    label: str  # for messages: "a PNG image"
    ext: str  # extension of the stored file
    image: bool = False  # a still picture (face only)
    video: bool = False  # may carry a video stream (face)
    audio: bool = False  # may carry an audio stream (audio)


PNG = Kind("a PNG image", ".png", image=True)
JPEG = Kind("a JPEG image", ".jpg", image=True)
WEBP = Kind("a WebP image", ".webp", image=True)
BMP = Kind("a BMP image", ".bmp", image=True)
TIFF = Kind("a TIFF image", ".tiff", image=True)
GIF = Kind("a GIF animation", ".gif", video=True)
MP4 = Kind("an MP4 file", ".mp4", video=True, audio=True)
MOV = Kind("a QuickTime file", ".mov", video=True, audio=True)
MKV = Kind("a Matroska/WebM file", ".mkv", video=True, audio=True)
AVI = Kind("an AVI file", ".avi", video=True, audio=True)
FLV = Kind("an FLV file", ".flv", video=True, audio=True)
ASF = Kind("an ASF/WMV file", ".asf", video=True, audio=True)
MPEG_TS = Kind("an MPEG transport stream", ".ts", video=True, audio=True)
MPEG_PS = Kind("an MPEG program stream", ".mpg", video=True, audio=True)
OGG = Kind("an Ogg file", ".ogg", video=True, audio=True)
WAV = Kind("a WAV audio file", ".wav", audio=True)
FLAC = Kind("a FLAC audio file", ".flac", audio=True)
MP3 = Kind("an MP3 audio file", ".mp3", audio=True)
AAC = Kind("an AAC audio file", ".aac", audio=True)
AIFF = Kind("an AIFF audio file", ".aiff", audio=True)
AMR = Kind("an AMR audio file", ".amr", audio=True)
CAF = Kind("a CAF audio file", ".caf", audio=True)

_QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def _mp3_frame(head: bytes) -> bool:
    """An MPEG audio frame header (sync word, a valid layer, bitrate and sample rate)."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    layer = (head[1] >> 1) & 0x3
    bitrate = head[2] >> 4
    rate = (head[2] >> 2) & 0x3
    return layer != 0 and bitrate not in (0, 15) and rate != 3


def _adts(head: bytes) -> bool:
    return len(head) >= 7 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0 and (head[2] >> 2) & 0xF < 13


def sniff(head: bytes) -> Kind | None:
    """The media kind of a file from its first bytes (at least HEAD_BYTES when the file has them)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head[:4] == b"RIFF" and len(head) >= 12:
        return {b"WEBP": WEBP, b"WAVE": WAV, b"AVI ": AVI}.get(head[8:12])
    if head[:4] == b"RF64" and head[8:12] == b"WAVE":
        return WAV
    bmp_header = int.from_bytes(head[14:18], "little") if len(head) >= 18 else 0
    if head[:2] == b"BM" and bmp_header in (12, 40, 52, 56, 64, 108, 124):
        return BMP
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return TIFF
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if head[4:8] == b"ftyp":
        return MOV if head[8:12] == b"qt  " else MP4
    if head[4:8] in _QUICKTIME_ATOMS and int.from_bytes(head[:4], "big") >= 8:
        return MOV
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return MKV
    if head.startswith(b"FLV\x01"):
        return FLV
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return ASF
    if head[:1] == b"\x47" and len(head) > 188 and head[188:189] == b"\x47":
        return MPEG_TS
    if head.startswith(b"\x00\x00\x01\xba"):
        return MPEG_PS
    if head.startswith(b"OggS"):
        return OGG
    if head.startswith(b"fLaC"):
        return FLAC
    if head.startswith(b"ID3"):
        return MP3
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return AIFF
    if head.startswith(b"#!AMR"):
        return AMR
    if head.startswith(b"caff"):
        return CAF
    if _adts(head):
        return AAC
    if _mp3_frame(head):
        return MP3
    return None


def _shown(name: str, limit: int = 100) -> str:
    """A client's file name as it may appear in a one-line message: control and other
    unprintable characters as '?', at most `limit` characters."""
    text = "".join(c if c.isprintable() else "?" for c in str(name))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(role: str, head: bytes, name: str) -> Kind:
    """The kind of an upload for `role` ("face" or "audio"); ValueError with a one-line message
    otherwise (the name shown printable, whatever the client sent)."""
    name = _shown(name)
    if not head:
        raise ValueError(f"{role}: '{name}' is empty")
    kind = sniff(head)
    if kind is None:
        what = "a video or an image" if role == "face" else "an audio or video file"
        raise ValueError(f"{role}: '{name}' is not {what} lipdub can read (unrecognised content)")
    if role == "face" and not (kind.image or kind.video):
        raise ValueError(f"{role}: '{name}' is {kind.label}, not a video or an image")
    if role == "audio" and not kind.audio:
        raise ValueError(f"{role}: '{name}' is {kind.label}, not an audio or video file")
    return kind
