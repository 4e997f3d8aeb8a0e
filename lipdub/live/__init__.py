"""Live lip-sync: a talking avatar driven by a stream of audio, in real time on a CPU.

`LiveSession` is the Python API (`LiveSession.open(avatar_dir).push(pcm) -> frames`, see
`session`); `server` is `lipdub live`, the web page and the WebRTC and speech endpoints
(aiortc, FastAPI), imported only by that command.
"""
from __future__ import annotations

from .session import LiveFrame, LiveSession, MelStream, MouthGate, Performer

__all__ = ["LiveFrame", "LiveSession", "MelStream", "MouthGate", "Performer"]
