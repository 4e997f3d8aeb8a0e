"""Full-reference image quality: PSNR and SSIM (numpy / OpenCV only).

SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
population (not sample) statistics, averaged over the positions where the window lies fully
inside the image (the "valid" region, as the reference MATLAB code and scikit-image do).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

SSIM_WIN = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _data_range(a: np.ndarray, b: np.ndarray, data_range: Optional[float]) -> float:
    if data_range is not None:
        return float(data_range)
    if a.dtype != b.dtype:
        raise ValueError(f"images have different dtypes ({a.dtype}, {b.dtype}); pass data_range")
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return float(info.max) - float(min(info.min, 0)) if info.min < 0 else float(info.max)
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) > 1):
        raise ValueError("float images outside [0, 1]: pass data_range explicitly")
    return 1.0


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b, mask=None, data_range: Optional[float] = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(L^2 / MSE)``; ``inf`` for identical images.

    ``mask`` (optional, boolean) selects the pixels to compare: shape ``(H, W)`` (applied to every
    channel) or the images' own shape. ``L`` is ``data_range``, by default 255 for uint8 and 1.0
    for float images in [0, 1].
    """
    a, b = _check_pair(a, b)
    peak = _data_range(a, b, data_range)
    diff = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape == a.shape[:2] and a.ndim == 3:
            m = np.broadcast_to(m[:, :, None], a.shape)
        elif m.shape != a.shape:
            raise ValueError(f"mask shape {m.shape} fits neither {a.shape[:2]} nor {a.shape}")
        if not m.any():
            raise ValueError("mask selects no pixel")
        diff = diff[m]
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(peak * peak / mse))


def _ssim_2d(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2

    def blur(img):
        return cv2.GaussianBlur(img, (SSIM_WIN, SSIM_WIN), SSIM_SIGMA, sigmaY=SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    r = SSIM_WIN // 2
    ssim_map = (num / den)[r:-r, r:-r]  # windows fully inside the image
    return float(ssim_map.mean())


def ssim(a, b, data_range: Optional[float] = None) -> float:
    """Structural similarity in [-1, 1] (1.0 for identical images).

    ``(H, W)`` images give the grayscale SSIM; ``(H, W, C)`` images give the mean of the
    per-channel SSIMs. Both sides must be at least 11x11.
    """
    a, b = _check_pair(a, b)
    peak = _data_range(a, b, data_range)
    if a.ndim not in (2, 3) or min(a.shape[:2]) < SSIM_WIN:
        raise ValueError(f"expected (H, W) or (H, W, C) images of at least {SSIM_WIN}x{SSIM_WIN}, got {a.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        return _ssim_2d(x, y, peak)
    return float(np.mean([_ssim_2d(np.ascontiguousarray(x[..., c]), np.ascontiguousarray(y[..., c]), peak)
                          for c in range(x.shape[2])]))
