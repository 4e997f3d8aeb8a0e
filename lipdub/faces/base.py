"""What every face detector returns, the detector interface, and the shared box helpers.

The leaf of the `faces` package: the detectors import it, it imports none of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detected face in frame pixels.

    box: (x1, y1, x2, y2) in frame pixels (float), clipped to the frame.
    score: detector confidence in [0, 1].
    landmarks: (5, 2) float32 (x, y) for left eye, right eye, nose, left and right mouth corner
    (left/right as seen in the image), or None when the detector has no landmarks.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "score", float(self.score))
        if self.landmarks is not None:
            object.__setattr__(self, "landmarks", np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2))

    # Arrays do not compare or hash like plain values, so define both explicitly.
    def __eq__(self, other):
        if not isinstance(other, Face):
            return NotImplemented
        if self.box != other.box or self.score != other.score:
            return False
        if self.landmarks is None or other.landmarks is None:
            return self.landmarks is None and other.landmarks is None
        return bool(np.array_equal(self.landmarks, other.landmarks))

    def __hash__(self):
        return hash((self.box, self.score))

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@runtime_checkable
class Detector(Protocol):
    """A face detector: frames (BGR uint8 HxWx3, any size) -> per frame, faces by descending score."""

    name: str

    def detect(self, frames: list[np.ndarray]) -> list[list[Face]]: ...


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, area_offset: float = 0.0) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices by descending score.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds `iou_threshold`.
    `area_offset=1` uses the inclusive-pixel convention (w = x2 - x1 + 1) of S3FD's original code.
    Each step compares the best remaining box with all others at once (memory O(N)).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.asarray(boxes, dtype=np.float64)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + area_offset) * (y2 - y1 + area_offset)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + area_offset)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + area_offset)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when the union is empty)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def resize_scale(height: int, width: int, max_side: int | None) -> float:
    """Downscale factor that brings the longest side to `max_side` (never upscales; None: 1)."""
    if not max_side:
        return 1.0
    return min(1.0, float(max_side) / max(height, width))


def check_frames(frames) -> list[np.ndarray]:
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = [frames]
    out = []
    for f in frames:
        f = np.asarray(f)
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(f"frames must be HxWx3 uint8 BGR arrays, got {f.dtype} {f.shape}")
        out.append(f)
    return out
