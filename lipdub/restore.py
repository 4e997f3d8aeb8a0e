"""GFPGAN face restoration for lip-synced frames: align, restore, paste back.

Pure array functions plus the :class:`Restorer` wrapper; no video I/O.

Conventions
-----------
* Frames and crops are BGR ``uint8`` arrays (H, W, 3), as OpenCV and the rest of lipdub use.
* Landmarks are ``(5, 2)`` float arrays of (x, y) pixel coordinates in the order
  left eye, right eye, nose tip, left mouth corner, right mouth corner (image left/right,
  the order RetinaFace / facexlib report them).
* An *affine* is the ``(2, 3)`` float matrix mapping frame coordinates to crop coordinates
  (``cv2.warpAffine(frame, affine, (size, size))`` produces the crop).

Pipeline per frame: :func:`align_face` -> :meth:`Restorer.restore_crops` -> :func:`paste_back`,
or all at once with :meth:`Restorer.restore_frame`. For video, smooth the per-frame landmark
track first with :func:`smooth_landmarks` so the aligned crop (and the restored face) does not
shimmer from detector jitter.
"""
from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch

from . import weights
from .device import pick_device, resolve_precision
from .errors import LipdubError
from .models.gfpgan import GFPGANv1Clean, load_gfpgan_state_dict

__all__ = [
    "FFHQ_TEMPLATE_512",
    "CROP_SIZE",
    "BORDER_VALUE",
    "estimate_affine",
    "align_face",
    "region_mask",
    "paste_back",
    "smooth_landmarks",
    "Restorer",
    "RestoreStage",
    "REGIONS",
    "UPSCALES",
]

CROP_SIZE = 512

#: FFHQ 5-point template for a 512x512 aligned face (facexlib's template for GFPGAN):
#: left eye, right eye, nose tip, left mouth corner, right mouth corner, as (x, y) pixels.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
FFHQ_TEMPLATE_512.setflags(write=False)

#: Fill for crop pixels that fall outside the frame (facexlib's grey).
BORDER_VALUE = (135, 133, 132)

_REGIONS = ("face", "mouth")


# ------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------
def _check_landmarks(landmarks) -> np.ndarray:
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN or inf")
    return pts


def estimate_affine(landmarks, template=FFHQ_TEMPLATE_512, size: int = CROP_SIZE,
                    method: str = "lstsq") -> np.ndarray:
    """Similarity transform (rotation, uniform scale, translation) from frame to crop.

    ``template`` is given for a 512x512 crop and is scaled by ``size / 512``.

    ``method="lstsq"`` (default): the exact least-squares similarity over all five points
    (Umeyama's closed form without reflection; in 2-D it is ``q = z * p + t`` with complex
    ``z = sum(conj(p_c) q_c) / sum(|p_c|^2)`` on centred points). It is what skimage's
    ``SimilarityTransform.estimate`` computes, which facexlib's LMEDS call is meant to
    reproduce, and, unlike LMEDS, it is a smooth function of the landmarks: a small change
    of the landmarks moves the crop a little instead of switching between inlier subsets,
    which matters for video.

    ``method="lmeds"``: ``cv2.estimateAffinePartial2D(..., method=cv2.LMEDS)``, exactly as
    facexlib / GFPGANer do (for bit-for-bit comparisons with the original pipeline).
    """
    src = _check_landmarks(landmarks)
    dst = np.asarray(template, dtype=np.float64).reshape(-1, 2) * (size / 512.0)
    if dst.shape != src.shape:
        raise ValueError(f"template shape {dst.shape} does not match landmarks {src.shape}")
    if method == "lmeds":
        m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
        if m is None:
            raise ValueError("cv2.estimateAffinePartial2D found no transform for these landmarks")
        return m.astype(np.float64)
    if method != "lstsq":
        raise ValueError(f"unknown method {method!r} (use 'lstsq' or 'lmeds')")
    ps = src[:, 0] + 1j * src[:, 1]
    qs = dst[:, 0] + 1j * dst[:, 1]
    pc, qc = ps - ps.mean(), qs - qs.mean()
    denom = float(np.sum(np.abs(pc) ** 2))
    if denom <= 1e-12:
        raise ValueError("degenerate landmarks (all points coincide)")
    z = np.sum(np.conj(pc) * qc) / denom
    t = qs.mean() - z * ps.mean()
    return np.array([[z.real, -z.imag, t.real], [z.imag, z.real, t.imag]], dtype=np.float64)


_BORDERS = {"reflect": cv2.BORDER_REFLECT101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}


def align_face(frame: np.ndarray, landmarks, size: int = CROP_SIZE, template=FFHQ_TEMPLATE_512,
               method: str = "lstsq", border: str = "reflect") -> tuple[np.ndarray, np.ndarray]:
    """Warp the face to the FFHQ template: ``(crop (size, size, 3) uint8, affine (2, 3))``.

    Bilinear warp. Crop pixels that fall outside the frame are filled by ``border``:
    ``"reflect"`` (default; mirrored like FFHQ's own padding, and the frame's edge pixels
    then survive the round trip), ``"replicate"``, or ``"constant"`` (facexlib's grey
    :data:`BORDER_VALUE`, as GFPGANer does; it bleeds grey into the frame's outermost pixels).
    """
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {tuple(_BORDERS)}, got {border!r}")
    affine = estimate_affine(landmarks, template, size, method)
    crop = cv2.warpAffine(frame, affine, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=_BORDERS[border], borderValue=BORDER_VALUE)
    return crop, affine


# ------------------------------------------------------------------------------------------
# Masks and paste-back
# ------------------------------------------------------------------------------------------
def _soft(hard: np.ndarray, radius: int) -> np.ndarray:
    """Gaussian-blur a 0/1 mask with a kernel of exactly ``radius`` pixels' reach."""
    k = 2 * radius + 1
    return cv2.GaussianBlur(hard, (k, k), sigmaX=radius / 2.0, sigmaY=radius / 2.0,
                            borderType=cv2.BORDER_CONSTANT)


@lru_cache(maxsize=8)
def _region_mask_cached(region: str, size: int) -> np.ndarray:
    hard = np.zeros((size, size), np.float32)
    if region == "face":
        # Like facexlib's square mask: an edge of size/20 eroded off, then blurred by as much.
        radius = max(1, size // 20)
        inset = radius + 2  # +2 keeps the blur's reach (and the bilinear warp's) inside the crop
        hard[inset:size - inset, inset:size - inset] = 1.0
    elif region == "mouth":
        t = FFHQ_TEMPLATE_512 * (size / 512.0)
        radius = max(1, size // 32)
        nose_y = t[2, 1]
        mouth_y = 0.5 * (t[3, 1] + t[4, 1])
        left, right = t[3, 0], t[4, 0]
        ext = 0.4 * (right - left)  # mouth corners extended outwards (cheeks/jaw move when speaking)
        x0, x1 = left - ext, right + ext
        bottom = mouth_y + 1.6 * (mouth_y - nose_y)  # down to about the chin
        # The hard region starts radius+2 rows below the nose line, so after blurring (reach
        # `radius`) and warping (bilinear, reach 1) nothing at or above the nose line changes.
        top = int(np.floor(nose_y)) + radius + 2
        lo, hi = radius + 2, size - radius - 2  # stay inside the crop
        xa, xb = max(lo, int(round(x0))), min(hi, int(round(x1)))
        ymid = int(round(mouth_y))
        hard[top:min(hi, ymid), xa:xb] = 1.0
        # rounded jaw below the mouth: lower half of an ellipse
        cx = 0.5 * (x0 + x1)
        ax, ay = 0.5 * (x1 - x0), max(1.0, bottom - mouth_y)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        ell = (((xx - cx) / ax) ** 2 + ((yy - mouth_y) / ay) ** 2) <= 1.0
        ell &= (yy >= max(top, ymid)) & (yy < hi) & (xx >= lo) & (xx < hi)
        hard[ell] = 1.0
    else:
        raise ValueError(f"region must be one of {_REGIONS}, got {region!r}")
    soft = _soft(hard, radius)
    soft.setflags(write=False)
    return soft


def region_mask(region: str = "face", size: int = CROP_SIZE) -> np.ndarray:
    """The soft blend mask in crop coordinates, float32 (size, size) in [0, 1] (read-only).

    ``"face"``: the whole crop minus a soft border (so the crop's edges never show).
    ``"mouth"``: the lower face only: from just below the nose line down to about the chin,
    between the mouth corners extended by 40 % of the mouth width on each side; soft edges
    lie entirely inside that region, so nothing at or above the nose line is touched.
    """
    return _region_mask_cached(region, int(size))


def _inverse_and_roi(affine: np.ndarray, size: int, h: int, w: int):
    """Inverse affine (crop -> frame) and the frame box (x0, y0, x1, y1) the crop can reach."""
    inv = cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))
    corners = np.array([[-1, -1], [size, -1], [-1, size], [size, size]], np.float64)
    pts = corners @ inv[:, :2].T + inv[:, 2]
    x0 = max(0, int(np.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - 1)
    x1 = min(w, int(np.ceil(pts[:, 0].max())) + 2)
    y1 = min(h, int(np.ceil(pts[:, 1].max())) + 2)
    return inv, (x0, y0, x1, y1)


def paste_back(frame: np.ndarray, restored_crop: np.ndarray, affine: np.ndarray, region: str = "face",
               weight: float = 1.0) -> np.ndarray:
    """Blend a (restored) crop back into a copy of ``frame`` through the inverse of ``affine``.

    Inside the soft mask of ``region`` (see :func:`region_mask`) the result is
    ``alpha * restored + (1 - alpha) * frame`` with ``alpha = mask * weight``, rounded;
    ``weight`` 0 leaves the frame unchanged, 1 uses the restored face fully where the mask is 1.
    Every pixel where the mask is 0 is bit-identical to ``frame``. When the crop is shrunk on
    the way back it is first area-resampled to the target scale (no aliasing).
    """
    if region not in _REGIONS:
        raise ValueError(f"region must be one of {_REGIONS}, got {region!r}")
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    size = restored_crop.shape[0]
    if restored_crop.shape[:2] != (size, size) or restored_crop.shape[2:] != frame.shape[2:]:
        raise ValueError(f"restored crop shape {restored_crop.shape} does not fit frame {frame.shape}")
    out = frame.copy()
    if weight == 0.0:
        return out
    h, w = frame.shape[:2]
    inv, (x0, y0, x1, y1) = _inverse_and_roi(affine, size, h, w)
    if x1 <= x0 or y1 <= y0:
        return out  # the crop lies entirely outside the frame
    roi_w, roi_h = x1 - x0, y1 - y0
    inv_roi = inv.copy()
    inv_roi[:, 2] -= (x0, y0)

    mask = cv2.warpAffine(np.ascontiguousarray(region_mask(region, size)), inv_roi, (roi_w, roi_h),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    img, img_inv = restored_crop, inv_roi
    scale = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))  # crop pixel -> frame pixels
    if scale < 0.9:  # shrinking: area-resample first so the bilinear warp does not alias
        small = max(8, int(round(size * scale)))
        f = small / size
        img = cv2.resize(restored_crop, (small, small), interpolation=cv2.INTER_AREA)
        # crop coords c relate to resized coords r by c = (r + 0.5) / f - 0.5
        img_inv = inv_roi.copy()
        img_inv[:, :2] = inv_roi[:, :2] / f
        img_inv[:, 2] = inv_roi[:, 2] + inv_roi[:, :2] @ np.full(2, 0.5 / f - 0.5)
    warped = cv2.warpAffine(img, img_inv, (roi_w, roi_h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)

    inside = mask > 0
    if not inside.any():
        return out
    alpha = (mask[inside] * weight)[:, None] if out.ndim == 3 else mask[inside] * weight
    roi = out[y0:y1, x0:x1]
    src = roi[inside].astype(np.float32)
    blended = src + alpha * (warped[inside].astype(np.float32) - src)
    roi[inside] = np.clip(np.rint(blended), 0, 255).astype(out.dtype)
    return out


# ------------------------------------------------------------------------------------------
# Temporal smoothing
# ------------------------------------------------------------------------------------------
def smooth_landmarks(seq, radius: int = 2) -> np.ndarray:
    """Centred moving average of a landmark track ``(T, 5, 2)`` (any ``(T, ...)`` works).

    Frame t is the mean of frames ``[t - r, t + r]`` with ``r = min(radius, t, T - 1 - t)``:
    the window shrinks symmetrically at the ends, so the result has no lag, constant-velocity
    motion passes through unchanged, and the first and last frames are kept as they are.
    Needs ``radius`` frames of look-ahead in a streaming pipeline. Frames must be finite
    (split the track where the face is lost).
    """
    arr = np.asarray(seq, dtype=np.float64)
    if arr.ndim < 1 or radius < 0:
        raise ValueError("seq must be (T, ...) and radius >= 0")
    if not np.all(np.isfinite(arr)):
        raise ValueError("landmark track contains NaN or inf")
    n = arr.shape[0]
    if n == 0 or radius == 0:
        return arr.copy()
    csum = np.concatenate([np.zeros((1,) + arr.shape[1:]), np.cumsum(arr, axis=0)], axis=0)
    t = np.arange(n)
    r = np.minimum(radius, np.minimum(t, n - 1 - t))
    lo, hi = t - r, t + r + 1
    shape = (n,) + (1,) * (arr.ndim - 1)
    return (csum[hi] - csum[lo]) / (2 * r + 1).reshape(shape)


# ------------------------------------------------------------------------------------------
# The restorer
# ------------------------------------------------------------------------------------------
class Restorer:
    """GFPGAN v1.3 / v1.4 on aligned 512x512 BGR crops, deterministic (stored noise).

    ``state_dict``: the network's state dict, or the released checkpoint dict itself
    (``{"params_ema": ...}`` / ``{"params": ...}``); it is loaded strictly. ``precision``:
    ``fp32``, ``bf16`` or ``auto`` (bf16 where the hardware runs it natively). bf16 keeps the
    whole network in bfloat16 and feeds it channels-last images: autocast alone gained 8 % on a
    CPU with AVX-512 BF16 (its casts cost as much as the faster convolutions save), the bf16
    network with channels-last input takes 0.58x the fp32 time per face.
    """

    def __init__(self, state_dict: dict, device="cpu", batch_size: int = 4, precision: str = "fp32"):
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.precision = resolve_precision(self.device, precision)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with torch.device("meta"):  # no time spent on a random init that is overwritten anyway
            net = GFPGANv1Clean()
        net.load_state_dict(load_gfpgan_state_dict(state_dict), strict=True, assign=True)
        self.net = net.to(self.dtype).eval().requires_grad_(False).to(self.device)
        self.size = self.net.out_size

    def restore_crops(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Restore aligned BGR uint8 crops (size x size x 3); returns BGR uint8 crops."""
        if len(crops) == 0:
            return []
        for c in crops:
            if c.shape != (self.size, self.size, 3) or c.dtype != np.uint8:
                raise ValueError(f"crops must be uint8 ({self.size}, {self.size}, 3), got {c.dtype} {c.shape}")
        results: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                batch = np.stack(crops[i:i + self.batch_size])[..., ::-1]  # BGR -> RGB
                x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)
                if self.precision == "bf16":
                    x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
                y = self.net(x).float().clamp_(-1.0, 1.0).add_(1.0).div_(2.0).mul_(255.0).round_()
                out = y.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()[..., ::-1]  # RGB -> BGR
                results.extend(np.ascontiguousarray(o) for o in out)
        return results

    def restore_frame(self, frame: np.ndarray, landmarks_list, region: str = "face",
                      weight: float = 1.0) -> np.ndarray:
        """Align every face, restore them in one batch, paste each back; returns a new frame."""
        if len(landmarks_list) == 0 or float(weight) == 0.0:
            return frame.copy()
        aligned = [align_face(frame, lm, self.size) for lm in landmarks_list]
        restored = self.restore_crops([c for c, _ in aligned])
        out = frame
        for (_, affine), face in zip(aligned, restored):
            out = paste_back(out, face, affine, region=region, weight=weight)
        return out


# ------------------------------------------------------------------------------------------
# The streaming stage
# ------------------------------------------------------------------------------------------
REGIONS = ("face", "mouth")
UPSCALES = (1, 2, 4)
DEFAULT_CHECKPOINT = "gfpgan_v1.4"
UPSCALE_INTERPOLATION = cv2.INTER_CUBIC


def check_options(region: str, weight: float, upscale: int, batch_size: int | None) -> None:
    if region not in REGIONS:
        raise LipdubError(f"unknown restore region '{region}' ({', '.join(REGIONS)})")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise LipdubError(f"restore weight must be a number in [0, 1], got {weight!r}") from None
    if not 0.0 <= weight <= 1.0:  # also rejects NaN
        raise LipdubError(f"restore weight must be in [0, 1], got {weight:g}")
    if upscale not in UPSCALES:
        raise LipdubError(f"upscale must be one of {', '.join(map(str, UPSCALES))}, got {upscale}")
    if batch_size is not None and int(batch_size) < 1:
        raise LipdubError("batch size must be at least 1")


def _face_list(item, frame_index: int) -> list[np.ndarray]:
    """The finite (5, 2) landmark sets of one frame: None, (5, 2) or (k, 5, 2)."""
    if item is None:
        return []
    arr = np.asarray(item, dtype=np.float64)
    if arr.shape == (5, 2):
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (5, 2):
        raise ValueError(f"landmarks for frame {frame_index} must be None, (5, 2) or (k, 5, 2), got {arr.shape}")
    return [lm for lm in arr if np.all(np.isfinite(lm))]


def _scale_affine(affine: np.ndarray, scale: int) -> np.ndarray:
    """The frame->crop affine for a frame resized by ``scale`` (pixel centres kept, as cv2.resize)."""
    if scale == 1:
        return affine
    # original x = (x_up + 0.5) / s - 0.5
    out = np.empty_like(affine)
    out[:, :2] = affine[:, :2] / scale
    out[:, 2] = affine[:, 2] + affine[:, :2] @ np.full(2, 0.5 / scale - 0.5)
    return out


class RestoreStage:
    """GFPGAN restoration of a frame stream; see :meth:`process`.

    ``checkpoint``: registry name (``gfpgan_v1.3``, ``gfpgan_v1.4``; downloaded into the cache
    when missing) or a path to a released ``GFPGANv1.x.pth`` (``params_ema``, falling back to
    ``params``, or a bare state dict). ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ... or a
    ``torch.device``. ``region``: ``"mouth"`` (lower face only; the default after lip-sync) or
    ``"face"``. ``weight`` in [0, 1] blends restored and input (0 = input unchanged, the network
    is then never run). ``upscale`` (1, 2, 4) resizes every output frame (bicubic), the restored
    face is pasted at the new size. ``batch_size``: faces per network call; None picks 1 on a
    CPU (measured: larger batches are slower per face there) and 4 on a GPU.

    Raises LipdubError for bad options or an unusable checkpoint.
    """

    def __init__(self, checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT, device="auto", region: str = "mouth",
                 weight: float = 1.0, upscale: int = 1, batch_size: int | None = None, skip_sha256: bool = False,
                 progress: bool = True, precision: str = "auto"):
        check_options(region, weight, upscale, batch_size)
        dev = pick_device(device)
        if batch_size is None:
            batch_size = 1 if dev.type == "cpu" else 4
        path = weights.resolve(checkpoint, skip_sha256=skip_sha256, progress=progress)
        state = weights.load_state_dict(path, "gfpgan")  # params_ema, else params, else bare; checked
        self._setup(Restorer(state, device=dev, batch_size=int(batch_size), precision=precision), region, weight,
                    upscale)
        self.checkpoint = Path(path)

    @classmethod
    def from_restorer(cls, restorer, region: str = "mouth", weight: float = 1.0, upscale: int = 1) -> "RestoreStage":
        """A stage around a ready :class:`lipdub.restore.Restorer` (or anything with ``size``,
        ``batch_size`` and ``restore_crops(list of crops) -> list of crops``)."""
        check_options(region, weight, upscale, getattr(restorer, "batch_size", 1))
        stage = cls.__new__(cls)
        stage._setup(restorer, region, weight, upscale)
        stage.checkpoint = None
        return stage

    def _setup(self, restorer, region: str, weight: float, upscale: int) -> None:
        self.restorer = restorer
        self.region = region
        self.weight = float(weight)
        self.upscale = int(upscale)
        self.batch_size = max(1, int(getattr(restorer, "batch_size", 1)))
        #: frames held at most while faces are gathered for a batch (bounds memory)
        self.max_pending = 2 * self.batch_size + 8
        #: running totals over every process() call: counts and seconds per step
        self.stats: dict[str, float] = {"frames": 0, "frames_restored": 0, "faces": 0,
                                        "align_s": 0.0, "network_s": 0.0, "paste_s": 0.0, "resize_s": 0.0}

    @property
    def device(self):
        return getattr(self.restorer, "device", None)

    def process(self, frames: Iterable[np.ndarray], landmarks: Iterable[np.ndarray | None],
                weights: Iterable[float] | None = None) -> Iterator[np.ndarray]:
        """Restore a stream of BGR uint8 frames; yields one output frame per input frame, in order.

        ``landmarks`` yields, per frame, ``None`` or five (x, y) points ``(5, 2)`` in frame pixels
        (left eye, right eye, nose, left and right mouth corner, as seen in the image), or
        ``(k, 5, 2)`` for several faces; a face whose points are not all finite (the face
        track's NaN rows) is skipped. It must yield at least as many items as ``frames``.
        ``weights`` (optional) yields a per-frame factor in [0, 1] multiplied into the stage's
        weight (e.g. a face track's fade-in/out alpha).

        Frames with a face are aligned to the FFHQ template, restored in batches of faces that
        span consecutive frames, and pasted back only inside the region mask; all other pixels
        and frames are passed through (resized when ``upscale`` > 1). Output frames are
        ``(H * upscale, W * upscale, 3)`` uint8. Input frames are never modified; a pass-through
        frame may be yielded as the very input array when ``upscale`` is 1. Lazy and bounded:
        at most :attr:`max_pending` frames are held at once (by reference: do not modify a frame
        after handing it over until its output has been yielded).
        """
        lm_iter = iter(landmarks)
        w_iter = iter(weights) if weights is not None else None
        pending: list[tuple[np.ndarray, list[np.ndarray], float]] = []
        n_faces = 0
        for index, frame in enumerate(frames):
            if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3
                    and frame.shape[2] == 3):
                raise ValueError(f"frame {index} must be an HxWx3 uint8 BGR array")
            try:
                item = next(lm_iter)
            except StopIteration:
                raise ValueError(f"landmarks ended before the frames (at frame {index})") from None
            w = self.weight
            if w_iter is not None:
                try:
                    w *= min(1.0, max(0.0, float(next(w_iter))))
                except StopIteration:
                    raise ValueError(f"weights ended before the frames (at frame {index})") from None
            faces = _face_list(item, index) if w > 0.0 else []
            if not faces and not pending:
                yield self._finish(frame, [], [], 0.0)  # nothing to wait for
                continue
            pending.append((frame, faces, w))
            n_faces += len(faces)
            if n_faces >= self.batch_size or len(pending) >= self.max_pending:
                yield from self._flush(pending)
                pending, n_faces = [], 0
        if pending:
            yield from self._flush(pending)

    def _flush(self, pending: list[tuple[np.ndarray, list[np.ndarray], float]]) -> Iterator[np.ndarray]:
        size = self.restorer.size
        t = time.perf_counter()
        crops: list[np.ndarray] = []
        placed: list[list[tuple[int, np.ndarray]]] = []  # per frame: (crop index, affine)
        for frame, faces, _ in pending:
            mine = []
            for lm in faces:
                try:
                    crop, affine = align_face(frame, lm, size)
                except ValueError:  # degenerate landmarks (all points coincide)
                    continue
                mine.append((len(crops), affine))
                crops.append(crop)
            placed.append(mine)
        t2 = time.perf_counter()
        self.stats["align_s"] += t2 - t
        restored = self.restorer.restore_crops(crops) if crops else []
        self.stats["network_s"] += time.perf_counter() - t2
        self.stats["faces"] += len(crops)
        for (frame, _, w), mine in zip(pending, placed):
            yield self._finish(frame, [restored[i] for i, _ in mine], [a for _, a in mine], w)

    def _finish(self, frame: np.ndarray, faces: list[np.ndarray], affines: list[np.ndarray], w: float) -> np.ndarray:
        """Upscale one frame and paste its restored faces."""
        self.stats["frames"] += 1
        out = frame
        if self.upscale > 1:
            t = time.perf_counter()
            h, wd = frame.shape[:2]
            out = cv2.resize(frame, (wd * self.upscale, h * self.upscale), interpolation=UPSCALE_INTERPOLATION)
            self.stats["resize_s"] += time.perf_counter() - t
        if faces:
            t = time.perf_counter()
            for face, affine in zip(faces, affines):
                out = paste_back(out, face, _scale_affine(affine, self.upscale), region=self.region, weight=w)
            self.stats["paste_s"] += time.perf_counter() - t
            self.stats["frames_restored"] += 1
        return out
