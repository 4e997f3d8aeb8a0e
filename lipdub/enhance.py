"""Streaming face restoration (GFPGAN v1.3 / v1.4) and the ``lipdub restore`` command.

Two entry points:

* :class:`RestoreStage` restores a *stream* of frames given their five-point landmarks. It is
  what ``lipdub run --restore gfpgan`` calls on the lip-synced frames (with the face track's
  landmarks) and what :func:`restore_video` calls on a decoded video. Faces from consecutive
  frames are batched for the network; only a bounded window of frames is held.
* :func:`restore_video` restores a video or a still image file on its own: a *scan* pass
  detects faces on every frame and builds a smoothed landmark track (as ``run`` does), then a
  second decode pass restores and encodes, streaming (no intermediate image files).

Outputs:

* video input -> ``.mp4`` output (H.264; the input's first audio stream, when it has one, is
  re-encoded to AAC alongside). Other containers/suffixes are refused.
* image input (jpg/png/webp/bmp/tif) -> image output in the format named by the output suffix
  (``.png``, ``.jpg``/``.jpeg``, ``.webp``, ``.bmp``, ``.tif``/``.tiff``); writing a still
  image into a video file is refused (use ``lipdub run`` to animate a still). An alpha channel
  in the input is not kept.

Every output is written to a hidden temporary file next to the target and renamed into place
only when complete, so a failure never leaves a half-written file.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .device import pick_device
from .errors import LipdubError
from .faces import load_detector, track_video
from .media import (
    VideoSource, VideoWriter, check_readable, check_writable, has_audio, is_image, prefetch, video_start_in_audio,
    write_atomic,
)
from .progress import Timer, bar
from .restore import DEFAULT_CHECKPOINT, RestoreStage, check_options

__all__ = ["RestoreResult", "restore_video", "IMAGE_WRITE_SUFFIXES", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = {".mp4"}
IMAGE_WRITE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class RestoreResult:
    output: Path
    n_frames: int
    fps: float  # 0 for an image
    width: int  # output size (input size x upscale)
    height: int
    frames_with_face: int  # frames whose landmarks were known
    frames_restored: int
    faces_restored: int
    is_image: bool
    has_audio: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    landmarks: np.ndarray | None = field(default=None, repr=False)  # (n, 5, 2) used, NaN = no face

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("landmarks")
        d["output"] = str(self.output)
        return d


def encode_image(path: Path, image: np.ndarray) -> bytes:
    """The image in the format its suffix names (JPEG and WebP at quality 95)."""
    suffix = path.suffix.lower()
    params: list[int] = []
    if suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, 95]
    elif suffix == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 95]
    ok, data = cv2.imencode(suffix, image, params)
    if not ok:
        raise LipdubError(f"cannot encode {path.name} as {suffix}")
    return data.tobytes()


def restore_video(input: str | os.PathLike, output: str | os.PathLike, *, checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
                  region: str = "face", weight: float = 1.0, upscale: int = 1, detector: str = "centerface",
                  detector_weights: str | None = None, device="auto", batch_size: int | None = None, det_stride: int = 1,
                  max_frames: int | None = None, skip_sha256: bool = False, progress: bool = True,
                  precision: str = "auto", stage: RestoreStage | None = None) -> RestoreResult:
    """Restore the faces of a video or image file; see the module docstring for the outputs.

    Faces are detected on every ``det_stride``-th frame (1: every frame; cheap next to the
    restorer), linked into the main face's track (the largest, most central one, as ``run``
    chooses it), interpolated and smoothed over time; the track's landmarks drive the
    alignment. Frames without that face pass through (resized when ``upscale`` > 1); next to
    such a gap the restoration fades in and out over a few frames (the track's alpha) instead
    of popping.
    ``max_frames`` restores only the first N frames (a preview; the output then has no audio).
    ``precision``: the network's arithmetic (``auto``, ``fp32``, ``bf16``; see ``lipdub.restore.Restorer``).
    ``stage``: a ready :class:`RestoreStage` to reuse a loaded network; its checkpoint, region,
    weight, upscale, batch size and precision then apply and those arguments are ignored.

    Raises LipdubError for anything the user can fix; on any failure no output is left behind.
    """
    started = time.perf_counter()
    timer = Timer()
    if stage is None:
        check_options(region, weight, upscale, batch_size)
    if det_stride < 1:
        raise LipdubError("detection stride must be at least 1")
    if max_frames is not None and max_frames < 1:
        raise LipdubError("max frames must be at least 1")
    in_path = check_readable(input)
    out_path = check_writable(output)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise LipdubError(f"output {out_path} would overwrite the input")
    suffix = out_path.suffix.lower()
    image_in = is_image(in_path)
    if image_in and suffix not in IMAGE_WRITE_SUFFIXES:
        raise LipdubError(f"the input is an image, so the output must be one too "
                          f"({', '.join(sorted(IMAGE_WRITE_SUFFIXES))}), got '{out_path.name}'")
    if not image_in and suffix not in VIDEO_SUFFIXES:
        raise LipdubError(f"the input is a video, so the output must be an .mp4 file, got '{out_path.name}'")

    source = VideoSource(in_path, max_frames=max_frames)  # LipdubError for unreadable media
    with timer("load"):
        if stage is None:
            stage = RestoreStage(checkpoint, pick_device(device), region, weight, upscale, batch_size, skip_sha256,
                                 progress, precision)
        det = load_detector(detector, stage.device or "cpu", detector_weights)

    tick_pts, track = track_video(source, det, stride=det_stride, timer=timer, progress=progress)
    n = len(tick_pts)
    width, height = source.info.width, source.info.height
    landmarks = track.landmarks.copy()
    landmarks[~track.valid] = np.nan
    known = np.all(np.isfinite(landmarks.reshape(n, -1)), axis=1)
    if track.valid.any() and not known.any():
        raise LipdubError(f"the '{detector}' detector gives no facial landmarks, which restoration needs; "
                          f"use --detector centerface")

    out_w, out_h = width * stage.upscale, height * stage.upscale
    stats_before = dict(stage.stats)
    audio = False
    if image_in:
        result = next(stage.process([next(source.frames())], [landmarks[0]]))
        with timer("encode"):
            write_atomic(out_path, encode_image(out_path, result))
    else:
        audio = max_frames is None and has_audio(in_path)
        frames = prefetch(source.frames(), size=max(4, stage.batch_size))
        progress_bar = bar(n, "restore", progress)
        written = 0
        try:
            with VideoWriter(out_path, out_w, out_h, source.info.fps, audio_path=in_path if audio else None,
                             audio_start=video_start_in_audio(in_path)) as writer:
                for frame in stage.process(frames, landmarks, weights=track.alpha):
                    with timer("encode"):
                        writer.write(frame)
                    written += 1
                    progress_bar.update(1)
                if written != n:
                    raise LipdubError(f"{in_path}: {written} frames on the second read, {n} on the first")
        finally:
            progress_bar.close()
            frames.close()
    delta = {k: stage.stats[k] - stats_before[k] for k in stage.stats}
    timings = dict(timer.seconds)
    for key in ("align_s", "network_s", "paste_s", "resize_s"):
        timings[key[:-2]] = delta[key]
    timings["total"] = time.perf_counter() - started
    return RestoreResult(out_path, n, 0.0 if image_in else float(source.info.fps), out_w, out_h,
                         int(known.sum()), int(delta["frames_restored"]), int(delta["faces"]), image_in, audio,
                         timings, landmarks)
