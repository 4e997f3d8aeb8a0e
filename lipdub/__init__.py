"""lipdub: streaming, robust, fast Wav2Lip lip-sync.

    import lipdub
    lipdub.sync("talk.mp4", "speech.wav", "dubbed.mp4")

The library API: `sync` (lip-sync), `restore_video` (GFPGAN), `SyncOptions` (every run
option); `lipdub.evaluate.evaluate` measures LSE-D / LSE-C. They load on first use, so
`import lipdub` stays light.
"""
from __future__ import annotations

from .errors import LipdubError
from .options import SyncOptions

__version__ = "0.1.0"


def __getattr__(name: str):
    # Deferred (PEP 562): the job modules pull in torch, OpenCV and PyAV, which `import lipdub`
    # and `lipdub --help` do not need.
    if name in ("sync", "SyncResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "restore_video":
        from .enhance import restore_video

        return restore_video
    raise AttributeError(f"module 'lipdub' has no attribute {name!r}")


__all__ = ["LipdubError", "SyncOptions", "SyncResult", "__version__", "restore_video", "sync"]
