"""lipdub: streaming, robust, fast Wav2Lip lip-sync.

    import lipdub
    lipdub.sync("talk.mp4", "speech.wav", "dubbed.mp4")
"""
from .errors import LipdubError

__version__ = "0.1.0"


def sync(face, audio, output, **options):
    """Lip-sync `face` (video or image) to `audio` and write an mp4; see lipdub.pipeline.SyncOptions."""
    from .pipeline import sync as _sync

    return _sync(face, audio, output, **options)


__all__ = ["LipdubError", "sync", "__version__"]
