"""Putting the generated face back into the frame.

`paste_box` is the original inference's hard paste, kept bit-exact for conformance.
`paste_feather` replaces only the mouth and jaw through a soft mask and shifts the generated
colours to the surrounding skin, so neither the box edge nor a colour step shows. The mask
follows the face's five landmarks (`mouth_mask`): it is rotated with the line through the mouth
corners and reaches from just below the nose tip to the chin, so the nose, the cheeks and the
nasolabial folds keep their sharp original pixels instead of the generator's blur. Without
landmarks (`--box`, S3FD) it is a fixed ellipse in box coordinates (`lower_face_mask`).
Both pastes touch only the pixels inside the face box.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np


def to_uint8_truncated(pred: np.ndarray) -> np.ndarray:
    """(96, 96, 3) float in [0, 1] -> uint8 with the original's truncating cast (not rounding)."""
    return (pred * 255.0).astype(np.uint8)


def paste_box(frame: np.ndarray, box: np.ndarray, pred: np.ndarray, alpha: float = 1.0) -> None:
    """Original behaviour: resize the truncated uint8 prediction bilinearly to the box and overwrite.

    With `alpha` < 1 (the fade next to a no-face gap or a pause in the speech) the pasted box is
    mixed with the frame, alpha * pasted + (1 - alpha) * frame, rounded; alpha 1 is the
    original's paste exactly, alpha 0 leaves the frame as it is.
    """
    if alpha <= 0:
        return
    x1, y1, x2, y2 = (int(v) for v in box)
    pasted = cv2.resize(to_uint8_truncated(pred), (x2 - x1, y2 - y1))
    if alpha < 1:
        roi = frame[y1:y2, x1:x2].astype(np.float32)
        pasted = np.clip(roi + float(alpha) * (pasted.astype(np.float32) - roi) + 0.5, 0, 255).astype(np.uint8)
    frame[y1:y2, x1:x2] = pasted


@lru_cache(maxsize=64)
def lower_face_mask(width: int, height: int, scale: float = 1.0) -> np.ndarray:
    """Soft mask (h, w) float32 in [0, 1]: the mouth/jaw area of a face box, zero at the box edges.

    The mask for faces without landmarks. The ellipse spans the lower half of the box (nose tip
    to chin in a detector box padded at the bottom); the Gaussian edge is a fixed fraction of the
    box so the look is scale-free. `scale` (`--mask-scale`) multiplies the half-axes and the edge
    about the same centre; the top third of the box (the eyes) stays out whatever the scale.
    """
    mask = np.zeros((height, width), dtype=np.float32)
    # Centred on the box's middle column, (width - 1) / 2, in 1/16 pixel fixed point: a whole-pixel
    # centre (round(width / 2)) sat half a pixel to the right for even widths and a full pixel
    # for odd ones, so the mask was lopsided on small boxes.
    frac = 4
    center = (int(round((width - 1) * 0.5 * (1 << frac))), int(round(height * 0.72)) << frac)
    axes = (max(1, int(round(width * 0.34 * scale))) << frac, max(1, int(round(height * 0.24 * scale))) << frac)
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1.0, thickness=-1, lineType=cv2.LINE_8, shift=frac)
    sigma = max(1.0, 0.06 * width * scale)
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma)
    mask *= box_ramps(width, height)
    mask[: height // 3] = 0.0
    return mask


@lru_cache(maxsize=64)
def box_ramps(width: int, height: int) -> np.ndarray:
    """(h, w) factor that takes any mask down to zero at the box's sides and bottom.

    Only the box is pasted, so a mask still non-zero at the box edge would show the edge as a
    seam; the ramps are a fixed fraction of the box (6 % of the width at the sides, 4 % of the
    height at the bottom). The top needs none: both masks stay clear of the upper face.
    """
    ramp_x = np.clip(np.minimum(np.arange(width), width - 1 - np.arange(width)) / (0.06 * width + 1), 0, 1)
    ramp_y = np.clip((height - 1 - np.arange(height)) / (0.04 * height + 1), 0, 1)
    return ramp_y[:, None] * ramp_x[None, :]  # float64, as the ellipse mask has always been multiplied


@lru_cache(maxsize=64)
def _ellipse_window(width: int, height: int, scale: float) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`lower_face_mask` cut to the rows and columns where it is non-zero, and that window
    (y0, y1, x0, x1): the blend then works on the mouth area only instead of the whole box."""
    mask = lower_face_mask(width, height, scale)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return mask[:0, :0], (0, 0, 0, 0)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return mask[y0:y1, x0:x1], (y0, y1, x0, x1)


# The landmark mask's shape (see `mouth_geometry` and `_mouth_window` for why each value).
MOUTH_HALF_WIDTH = 0.8  # zero beyond this many mouth widths from the centre, along the corners' line
SIDE_FEATHER = 0.25  # mouth widths over which the sides fade: full strength to 0.55 (the corners plus margin)
NOSE_GAP = 0.92  # top edge: this fraction of the way from the mouth line up to the nose tip ...
TOP_DOME = 0.25  # ... dropping by this fraction of itself toward the sides, as the nose base does
TOP_FEATHER = 0.2  # the top fades over this fraction of the mouth-to-nose distance
JAW_FULL = 0.28  # full strength down to this fraction of the eyes-to-mouth distance below the mouth line
CHIN_DEPTH = 0.58  # zero at this fraction of the eyes-to-mouth distance: on the chin
CHIN_TAPER = 0.8  # between the two the width shrinks by this fraction, as the jaw narrows to the chin


def mouth_geometry(points: np.ndarray, width: int, height: int,
                   scale: float = 1.0) -> tuple[float, float, float, float, float, float, float] | None:
    """The landmark mask's frame: (cx, cy, ux, uy, mouth_width, nose, eyes), or None.

    `points` are the five landmarks (left eye, right eye, nose tip, left and right mouth corner)
    in box coordinates. The centre (cx, cy) is the midpoint of the mouth corners and (ux, uy) the
    unit vector from the left corner to the right one, so the mask turns with the head's roll;
    "down" is (-uy, ux). The three lengths, measured from the face rather than from the box
    (which is padded, and jitters where the landmarks are smoothed), size the mask: the mouth
    width its width, the height of the nose tip above the mouth line its top, and the height of
    the eyes above the mouth line its depth (no CenterFace point marks the chin; the eyes are the
    steadiest vertical scale it gives, and a head turn that narrows the mouth leaves it alone).
    All three are multiplied by `scale` (`--mask-scale`).

    None when the points cannot describe a mouth (not finite, a mouth narrower than 12 % of the
    box as in a profile, a nose tip not above the mouth or eyes not above the nose, a mouth
    centre outside the box): the caller falls back to the box ellipse. Nothing is rounded, so a
    smoothly moving face gives a smoothly moving mask.
    """
    p = np.asarray(points, dtype=np.float64).reshape(5, 2)
    if not np.isfinite(p).all():
        return None
    left, right = p[3], p[4]
    centre = (left + right) / 2
    mouth_width = float(np.hypot(*(right - left)))
    if mouth_width < 0.12 * width:
        return None
    ux, uy = (right - left) / mouth_width
    down = np.array([-uy, ux])
    nose = float((centre - p[2]) @ down)  # how far the nose tip is above the mouth line
    eyes = float((centre - (p[0] + p[1]) / 2) @ down)
    if nose <= 0.02 * width or eyes <= nose or not (0 <= centre[0] < width and 0 <= centre[1] < height):
        return None
    return (float(centre[0]), float(centre[1]), float(ux), float(uy), mouth_width * scale, nose * scale,
            eyes * scale)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, 3t^2 - 2t^3 between: a fade with no kink at either end (in place)."""
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (3.0 - 2.0 * t)


def _mouth_window(geometry: tuple[float, ...], width: int,
                  height: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The landmark mask inside its bounding window of the box: (mask, (y0, y1, x0, x1)).

    In the mouth's own frame (x along the corners from the centre, y down from the mouth line)
    the mask is the product of three fades:

    - sides: full to 0.55 mouth widths (the corners and a margin for a wider, smiling or open
      generated mouth), zero at 0.8;
    - top: zero at 0.92 of the way up to the nose tip under the nose (so the upper lip and the
      skin above it, which stretch in speech, are replaced, but not the nose tip), lower toward
      the sides like the nose base, so a rolled head does not lift the mask's corners above the
      nose; full 0.2 of that distance lower;
    - bottom: full to 0.28 of the eyes-to-mouth distance (the lower lip of an open mouth), zero
      at 0.58 (on the chin; adult chins end near 0.7), the width narrowing by 80 % on the way
      like the jaw.

    The chin half is deeper than the upper half (the jaw moves, the nose does not) but
    narrower and softer, so the mask's centroid stays close to the mouth centre. The mask is
    a continuous function of the landmarks (no rasterised outline, no pixel snapping), so the
    smoothed landmarks give a mask that does not shimmer. It is multiplied by the box-edge
    ramps, and only the window is computed, which keeps the per-frame cost small.
    """
    cx, cy, ux, uy, mouth_width, nose, eyes = geometry
    half = MOUTH_HALF_WIDTH * mouth_width
    side = SIDE_FEATHER * mouth_width
    top, top_fade = NOSE_GAP * nose, TOP_FEATHER * nose
    full, chin = JAW_FULL * eyes, CHIN_DEPTH * eyes
    corners_x = [cx + x * ux - y * uy for x in (-half, half) for y in (-top, chin)]
    corners_y = [cy + x * uy + y * ux for x in (-half, half) for y in (-top, chin)]
    x0, x1 = max(0, int(np.floor(min(corners_x)))), min(width, int(np.ceil(max(corners_x))) + 1)
    y0, y1 = max(0, int(np.floor(min(corners_y)))), min(height, int(np.ceil(max(corners_y))) + 1)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
    f32 = np.float32
    dx = np.arange(x0, x1, dtype=f32) - f32(cx)
    dy = np.arange(y0, y1, dtype=f32)[:, None] - f32(cy)
    along = np.abs(dx * f32(ux) + dy * f32(uy))
    across = dy * f32(ux) - dx * f32(uy)
    depth = np.clip((across - f32(full)) * f32(1.0 / (chin - full)), 0.0, 1.0)  # 0 above the lower lip, 1 at the chin
    mask = _smoothstep((f32(half) * (1.0 - f32(CHIN_TAPER) * depth) - along) * f32(1.0 / side))
    edge = np.minimum(along * f32(1.0 / half), 1.0)
    mask *= _smoothstep((across + f32(top) * (1.0 - f32(TOP_DOME) * edge * edge)) * f32(1.0 / top_fade))
    mask *= 1.0 - _smoothstep(depth)
    mask *= box_ramps(width, height)[y0:y1, x0:x1]
    return mask.astype(np.float32, copy=False), (y0, y1, x0, x1)


def mouth_mask(width: int, height: int, landmarks: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """The feather blend's mask for a (width x height) box: (h, w) float32 in [0, 1].

    `landmarks` are the five points in box coordinates (frame coordinates minus the box's
    top-left corner). Where they describe a mouth (`mouth_geometry`), the mask follows them
    (`_mouth_window`); elsewhere it is the box ellipse, `lower_face_mask`. `scale` grows or
    shrinks either.
    """
    geometry = None if landmarks is None else mouth_geometry(landmarks, width, height, scale)
    if geometry is None:
        return lower_face_mask(width, height, float(scale)).copy()
    window, (y0, y1, x0, x1) = _mouth_window(geometry, width, height)
    mask = np.zeros((height, width), np.float32)
    mask[y0:y1, x0:x1] = window
    return mask


def paste_feather(frame: np.ndarray, box: np.ndarray, pred: np.ndarray, alpha: float = 1.0,
                  landmarks: np.ndarray | None = None, mask_scale: float = 1.0) -> None:
    """Blend the generated lower face into `frame` in place (only inside `box`).

    `landmarks`: the face's five points in frame coordinates, or None; `mask_scale` grows or
    shrinks the mask (see `mouth_mask`). The generated colours are shifted by the difference of
    the mean colours on the mask's outer edge (0.02 < mask < 0.5), the ring where the two
    pictures meet, so the skin tone is continuous across the seam. Only the mask's window is
    computed and written; every other pixel keeps its value exactly.
    """
    if alpha <= 0:
        return
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    geometry = None
    if landmarks is not None:
        geometry = mouth_geometry(np.asarray(landmarks, np.float64).reshape(5, 2) - (x1, y1), w, h, mask_scale)
    if geometry is None:
        mask, (wy0, wy1, wx0, wx1) = _ellipse_window(w, h, float(mask_scale))
    else:
        mask, (wy0, wy1, wx0, wx1) = _mouth_window(geometry, w, h)
    if mask.size == 0:
        return
    roi = frame[y1 + wy0 : y1 + wy1, x1 + wx0 : x1 + wx1]
    original = roi.astype(np.float32)
    generated = cv2.resize(pred.astype(np.float32) * 255.0, (w, h), interpolation=cv2.INTER_LINEAR)[wy0:wy1, wx0:wx1]
    ring = (mask > 0.02) & (mask < 0.5)
    if ring.sum() >= 16:  # keep skin tone continuous across the seam
        generated += (original[ring].mean(axis=0) - generated[ring].mean(axis=0))[None, None, :]
    weight = (mask * float(alpha))[:, :, None]
    blended = original + weight * (generated - original)
    roi[...] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
