"""From sparse per-frame detections to one face box per output frame (or none).

Detection runs on a stride of frames (plus every frame where the picture changes in ways a
stride would miss); this module links those detections into tracks within each shot, picks the
target face, interpolates between detections, pads and smooths the boxes, and marks the frames
without a face, with a short fade at the edges of each gap. Everything here is pure numpy on
small arrays (a few numbers per frame), independent of the video's resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import LipdubError
from .base import Face, iou


@dataclass
class FaceTrack:
    """Per output frame: integer box (x1, y1, x2, y2) and blend strength alpha in [0, 1].

    `boxes[i]` is meaningless where `valid[i]` is False (no face: the frame passes through).
    `landmarks[i]` (five (x, y) points, interpolated and smoothed like the boxes, unpadded) is
    NaN where the detector gave none; face restoration aligns with them.
    """

    boxes: np.ndarray  # (n, 4) int
    valid: np.ndarray  # (n,) bool
    alpha: np.ndarray  # (n,) float32
    landmarks: np.ndarray | None = None  # (n, 5, 2) float32
    cuts: list[int] = field(default_factory=list)  # first frame of every shot after the first

    @property
    def coverage(self) -> float:
        return float(self.valid.mean()) if len(self.valid) else 0.0


def _state(face: Face) -> np.ndarray:
    """What a track carries per detection: box (4) then landmarks (10, NaN when unknown)."""
    points = np.full(10, np.nan) if face.landmarks is None else np.asarray(face.landmarks, np.float64).ravel()
    return np.concatenate([np.asarray(face.box, dtype=np.float64), points])


def link_tracks(detections: dict[int, list[Face]], frames: list[int], min_iou: float = 0.3) -> list[dict[int, np.ndarray]]:
    """Greedy IoU linking of detections (in frame order) into tracks: [{frame: state}] (see `_state`)."""
    tracks: list[dict[int, np.ndarray]] = []
    last: list[np.ndarray] = []
    for f in frames:
        taken: set[int] = set()
        for face in sorted(detections.get(f, []), key=lambda d: -d.score):
            box = _state(face)
            scores = [(iou(box, last[t]), t) for t in range(len(tracks)) if t not in taken and f not in tracks[t]]
            best = max(scores, default=(0.0, -1))
            if best[0] >= min_iou:
                t = best[1]
            else:
                tracks.append({})
                last.append(box)
                t = len(tracks) - 1
            tracks[t][f] = box
            last[t] = box
            taken.add(t)
    return tracks


def _track_weight(track: dict[int, np.ndarray], width: int, height: int) -> float:
    """Prefer large, central, persistent faces: sum over detections of area x centrality."""
    total = 0.0
    for box in track.values():
        area = (box[2] - box[0]) * (box[3] - box[1]) / float(width * height)
        cx, cy = (box[0] + box[2]) / 2 / width - 0.5, (box[1] + box[3]) / 2 / height - 0.5
        total += area * max(0.05, 1.0 - 1.5 * np.hypot(cx, cy))
    return total


def choose_target(
    detections: dict[int, list[Face]], frames: list[int], width: int, height: int, face_index: int | None
) -> dict[int, np.ndarray]:
    """The target face's box at each detection frame of one shot.

    With `face_index` N the N-th face from the left is taken at each detection frame (a stable
    rule a user can predict); otherwise the largest / most central track of the shot.
    """
    if face_index is not None:
        out = {}
        for f in frames:
            faces = sorted(detections.get(f, []), key=lambda d: d.box[0] + d.box[2])
            if face_index < len(faces):
                out[f] = _state(faces[face_index])
        return out
    tracks = link_tracks(detections, frames)
    if not tracks:
        return {}
    return max(tracks, key=lambda t: _track_weight(t, width, height))


def _smooth(boxes: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; near the run's ends the window shrinks symmetrically.

    A window cut off on one side only would pull the first and last boxes of a run towards
    the middle of the run (a moving face's box would lag behind it). Values that are NaN
    (landmarks a detector did not give) stay NaN and do not spread to their neighbours.
    """
    n = len(boxes)
    idx = np.arange(n)
    half = np.minimum(window // 2, np.minimum(idx, n - 1 - idx))
    lo, hi = idx - half, idx + half + 1
    known = np.isfinite(boxes)
    zero = np.zeros((1, boxes.shape[1]))
    sums = np.concatenate([zero, np.cumsum(np.where(known, boxes, 0.0), axis=0)])
    counts = np.concatenate([zero, np.cumsum(known, axis=0)])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sums[hi] - sums[lo]) / (counts[hi] - counts[lo])
    out[~known] = np.nan
    return out


def runs(mask: np.ndarray, bounds: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D mask, as ints; runs are split at `bounds`
    (sorted frame indices, e.g. shot starts) when given."""
    mask = np.asarray(mask, dtype=bool)
    edges = [0] + [int(b) for b in (bounds or []) if 0 < b < len(mask)] + [len(mask)]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        steps = np.diff(np.concatenate([[0], mask[lo:hi].astype(np.int8), [0]]))
        out.extend((lo + int(a), lo + int(b)) for a, b in zip(np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)))
    return out


def shot_bounds(n_frames: int, cuts: list[int]) -> list[int]:
    """[0, cut, ..., n_frames]: the shot edges of a track of `n_frames` frames."""
    return [0] + sorted({int(c) for c in cuts if 0 < c < n_frames}) + [n_frames]


def build_track(
    detections: dict[int, list[Face]],
    cuts: list[int],
    n_frames: int,
    width: int,
    height: int,
    pads: tuple[int, int, int, int] = (0, 10, 0, 0),
    smooth: bool = True,
    smooth_window: int = 5,
    face_index: int | None = None,
    max_gap: int = 12,
    fade: int = 3,
) -> FaceTrack:
    """Turn detections (frame -> faces, only on detected frames) into a per-frame FaceTrack.

    `cuts` are the first frames of each shot after the first; tracks never cross a cut.
    Between two detections of the target at most `max_gap` frames apart the box is linearly
    interpolated; a detection frame without the target ends the run (the face is gone).
    """
    boxes = np.zeros((n_frames, 14), dtype=np.float64)  # box then landmarks, as `_state`
    valid = np.zeros(n_frames, dtype=bool)
    bounds = shot_bounds(n_frames, cuts)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        frames = sorted(f for f in detections if start <= f < stop)
        target = choose_target(detections, frames, width, height, face_index)
        for f0, f1 in zip(frames[:-1], frames[1:]):
            if f0 in target and f1 in target and f1 - f0 <= max_gap:
                t = (np.arange(f0, f1 + 1) - f0)[:, None] / float(f1 - f0)
                boxes[f0 : f1 + 1] = (1 - t) * target[f0] + t * target[f1]
                valid[f0 : f1 + 1] = True
        for f in target:
            boxes[f], valid[f] = target[f], True
    top, bottom, left, right = pads
    boxes[:, 0] = np.maximum(0, boxes[:, 0] - left)
    boxes[:, 1] = np.maximum(0, boxes[:, 1] - top)
    boxes[:, 2] = np.minimum(width, boxes[:, 2] + right)
    boxes[:, 3] = np.minimum(height, boxes[:, 3] + bottom)
    if smooth:
        for start, stop in zip(bounds[:-1], bounds[1:]):
            for a, b in runs(valid[start:stop]):
                boxes[start + a : start + b] = _smooth(boxes[start + a : start + b], smooth_window)
    int_boxes = np.round(boxes[:, :4]).astype(np.int64)
    valid &= (int_boxes[:, 2] - int_boxes[:, 0] >= 8) & (int_boxes[:, 3] - int_boxes[:, 1] >= 8)
    landmarks = boxes[:, 4:].reshape(n_frames, 5, 2).astype(np.float32)
    landmarks[~valid] = np.nan
    return FaceTrack(int_boxes, valid, fade_alpha(valid, fade), landmarks, bounds[1:-1])


def fade_alpha(valid: np.ndarray, fade: int) -> np.ndarray:
    """1 inside face runs, ramping down over `fade` frames next to a no-face gap (not at the ends)."""
    alpha = valid.astype(np.float32)
    if fade <= 0 or valid.all() or not valid.any():
        return alpha
    idx = np.arange(len(valid))
    gaps = np.flatnonzero(~valid)
    pos = np.searchsorted(gaps, idx)
    before = np.where(pos > 0, idx - gaps[np.maximum(pos - 1, 0)], np.iinfo(np.int64).max)
    after = np.where(pos < len(gaps), gaps[np.minimum(pos, len(gaps) - 1)] - idx, np.iinfo(np.int64).max)
    distance = np.minimum(before, after)
    return np.where(valid, np.minimum(1.0, distance / float(fade + 1)), 0.0).astype(np.float32)


def fixed_track(box: tuple[int, int, int, int], n_frames: int, width: int, height: int) -> FaceTrack:
    """`--box TOP BOTTOM LEFT RIGHT`: the same box on every frame, no padding or smoothing (as the original)."""
    top, bottom, left, right = box
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise_box_error(box, width, height)
    boxes = np.tile(np.array([left, top, right, bottom], dtype=np.int64), (n_frames, 1))
    return FaceTrack(boxes, np.ones(n_frames, dtype=bool), np.ones(n_frames, dtype=np.float32))


def raise_box_error(box, width: int, height: int) -> None:
    raise LipdubError(f"--box {' '.join(map(str, box))} is outside the {width}x{height} frame (TOP BOTTOM LEFT RIGHT)")
