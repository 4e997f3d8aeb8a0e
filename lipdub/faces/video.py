"""From a face video to one face track: the path every job takes (run, restore, eval, preprocess).

`scan` decodes every frame once, detects faces on a stride of frames at reduced resolution and
notes shot cuts; `track_video` then links the detections into the target face's `FaceTrack`
(see `lipdub.faces.track`). What is kept per frame is a few numbers, so memory does not grow
with the video's length.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..media import VideoSource, prefetch
from ..progress import ProgressCallback, Timer, bar
from .base import Detector, Face, iou
from .track import FaceTrack, build_track

DETECT_SIZE = 480  # longest side of the frames the detector sees


def downscale(frame: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """`frame` shrunk so its longest side is at most `size` (INTER_AREA), and the factor used."""
    h, w = frame.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale == 1.0:
        return frame, 1.0
    return cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA), scale


def signature(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What shot-cut detection compares: a 32x32 grey thumbnail and an 8x8x8 colour histogram."""
    gray = cv2.resize(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    hist = cv2.calcHist([small], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel()
    return gray.astype(np.float32), hist / max(1.0, hist.sum())


def is_cut(prev: tuple[np.ndarray, np.ndarray] | None, cur: tuple[np.ndarray, np.ndarray]) -> bool:
    """A hard cut changes both the coarse picture and the colour histogram at once."""
    if prev is None:
        return False
    thumb_diff = float(np.abs(cur[0] - prev[0]).mean()) / 255.0
    hist_diff = 0.5 * float(np.abs(cur[1] - prev[1]).sum())
    return thumb_diff > 0.08 and hist_diff > 0.1


def changed(a: list[Face], b: list[Face]) -> bool:
    """Whether faces appeared, vanished or moved a lot between two detections."""
    if len(a) != len(b):
        return True
    return any(max((iou(fa.box, fb.box) for fb in b), default=0.0) < 0.5 for fa in a)


@dataclass
class Scan:
    tick_pts: list[int]  # pts of the input frame shown on each tick of the source's clock
    detections: dict[int, list[Face]]  # tick -> faces, on the detected ticks only
    cuts: list[int]  # first tick of every shot after the first


def scan(
    source: VideoSource,
    detector: Detector,
    stride: int,
    timer: Timer | None = None,
    progress: bool = False,
    callback: ProgressCallback | None = None,
) -> Scan:
    """Decode every frame once; detect on a stride, and on every frame around a change.

    Frames since the last detection are kept at detection resolution only (a few hundred KB
    each), so when a strided detection disagrees with the previous one (a face appeared,
    vanished or jumped) the frames in between are detected too instead of guessed.
    """
    timer = timer or Timer()
    tick_pts: list[int] = []
    detections: dict[int, list[Face]] = {}
    cuts: list[int] = []
    pending: list[tuple[int, np.ndarray, float]] = []  # undetected frames since the last detection
    last_detected: int | None = None
    prev_sig = None

    def detect(items: list[tuple[int, np.ndarray, float]]) -> None:
        with timer("detect"):
            results = detector.detect([small for _, small, _ in items])
        for (index, _, scale), faces in zip(items, results):
            detections[index] = [
                Face(tuple(float(v) / scale for v in f.box), f.score, None if f.landmarks is None else f.landmarks / scale)
                for f in faces
            ]

    def flush(index: int, small: np.ndarray, scale: float) -> None:
        nonlocal last_detected, pending
        detect([(index, small, scale)])
        if last_detected is not None and pending and changed(detections[last_detected], detections[index]):
            detect(pending)
        pending = []
        last_detected = index

    total = source.info.n_frames_estimate
    progress_bar = bar(total, "scan", progress, leave=False)
    frames = prefetch(source.clock(), size=8)
    shot_start = 0
    last: tuple[int, np.ndarray, float] | None = None
    try:
        while True:
            with timer("decode"):
                item = next(frames, None)
            if item is None:
                break
            pts, frame = item
            index = len(tick_pts)
            tick_pts.append(pts)
            small, scale = downscale(frame, DETECT_SIZE)
            sig = signature(small)
            if is_cut(prev_sig, sig):
                if last is not None and last[0] != last_detected:  # close the previous shot with a detection
                    pending = [p for p in pending if p[0] != last[0]]
                    flush(*last)
                cuts.append(index)
                shot_start, last_detected, pending = index, None, []
            prev_sig = sig
            if (index - shot_start) % stride == 0:
                flush(index, small, scale)
            else:
                pending.append((index, small, scale))
            last = (index, small, scale)
            progress_bar.update(1)
            if callback is not None:
                callback("scan", index + 1, total)
        if last is not None and last[0] != last_detected:
            pending = [p for p in pending if p[0] != last[0]]
            flush(*last)
    finally:
        frames.close()
        progress_bar.close()
    return Scan(tick_pts, detections, cuts)


def default_stride(fps: float) -> int:
    """About six detections per second: faces rarely move far in 1/6 s, and changes are re-detected."""
    return max(1, round(float(fps) / 6))


def track_video(
    source: VideoSource,
    detector: Detector,
    *,
    stride: int = 1,
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    smooth: bool = True,
    face_index: int | None = None,
    timer: Timer | None = None,
    progress: bool = False,
    callback: ProgressCallback | None = None,
) -> tuple[list[int], FaceTrack]:
    """The pts of every tick of `source`'s clock and the target face's track over them.

    Detection runs every `stride` frames (plus around changes); between detections boxes are
    interpolated over gaps of up to 2 * stride + 2 frames. `pads` (TOP BOTTOM LEFT RIGHT) are
    added to the boxes, `smooth` averages them over 5 frames, `face_index` picks the N-th face
    from the left instead of the largest, most central one. The track's `cuts` are the shots.
    """
    found = scan(source, detector, stride, timer, progress, callback)
    track = build_track(
        found.detections, found.cuts, len(found.tick_pts), source.info.width, source.info.height,
        pads=pads, smooth=smooth, face_index=face_index, max_gap=2 * stride + 2,
    )
    return found.tick_pts, track
