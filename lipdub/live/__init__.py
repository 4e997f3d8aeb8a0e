"""Live lip-sync: a talking avatar driven by a stream of audio, in real time on a CPU.

`session.LiveSession` is the Python API (PCM in, frames out); `server` is `lipdub live`, the web
page and WebRTC endpoint (aiortc, FastAPI), imported only by that command.
"""
from __future__ import annotations

from .session import LiveFrame, LiveSession, MelStream, MouthGate, Performer

__all__ = ["LiveFrame", "LiveSession", "MelStream", "MouthGate", "Performer"]
