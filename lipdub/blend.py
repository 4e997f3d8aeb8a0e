"""Putting the generated 96x96 face back into the frame.

`paste_box` is the original inference's hard paste, kept bit-exact for conformance.
`paste_feather` replaces only the lower face through a soft elliptical mask and shifts the
generated colours to the surrounding skin, so neither the box edge nor a colour step shows.
Both touch only the pixels inside the face box.
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
def lower_face_mask(width: int, height: int) -> np.ndarray:
    """Soft mask (h, w) float32 in [0, 1]: the mouth/jaw area of a face box, zero at the box edges.

    The ellipse spans the lower half of the box (nose tip to chin in a detector box padded at
    the bottom); the Gaussian edge is a fixed fraction of the box so the look is scale-free.
    """
    mask = np.zeros((height, width), dtype=np.float32)
    # Centred on the box's middle column, (width - 1) / 2, in 1/16 pixel fixed point: a whole-pixel
    # centre (round(width / 2)) sat half a pixel to the right for even widths and a full pixel
    # for odd ones, so the mask was lopsided on small boxes.
    frac = 4
    center = (int(round((width - 1) * 0.5 * (1 << frac))), int(round(height * 0.72)) << frac)
    axes = (max(1, int(round(width * 0.34))) << frac, max(1, int(round(height * 0.24))) << frac)
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1.0, thickness=-1, lineType=cv2.LINE_8, shift=frac)
    sigma = max(1.0, 0.06 * width)
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma)
    ramp_x = np.clip(np.minimum(np.arange(width), width - 1 - np.arange(width)) / (0.06 * width + 1), 0, 1)
    ramp_y = np.clip((height - 1 - np.arange(height)) / (0.04 * height + 1), 0, 1)
    mask *= ramp_y[:, None] * ramp_x[None, :]
    mask[: height // 3] = 0.0
    return mask


def paste_feather(frame: np.ndarray, box: np.ndarray, pred: np.ndarray, alpha: float = 1.0,
                  landmarks: np.ndarray | None = None, mask_scale: float = 1.0) -> None:
    """Blend the generated lower face into `frame` in place (only inside `box`)."""
    if alpha <= 0:
        return
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    roi = frame[y1:y2, x1:x2]
    original = roi.astype(np.float32)
    generated = cv2.resize(pred.astype(np.float32) * 255.0, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = lower_face_mask(w, h)
    ring = (mask > 0.02) & (mask < 0.5)
    if ring.sum() >= 16:  # keep skin tone continuous across the seam
        generated += (original[ring].mean(axis=0) - generated[ring].mean(axis=0))[None, None, :]
    weight = (mask * float(alpha))[:, :, None]
    blended = original + weight * (generated - original)
    roi[...] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
