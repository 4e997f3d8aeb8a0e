"""S3FD face detector (the one original Wav2Lip uses), with batched, vectorised decoding.

Pre-processing follows Wav2Lip: BGR frames are flipped to RGB and (104, 117, 123) is subtracted
in that channel order. Frames are downscaled so their longest side is at most `max_side` (the
original runs at full resolution, which is slow on a CPU and unnecessary for lip-sync-sized
faces); boxes are scaled back to frame pixels. Decoding covers every anchor of every head at
once; greedy NMS (IoU 0.3, inclusive-pixel areas as in the original) then a 0.5 score cut.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import LipdubError
from ..device import resolve_precision
from ..models.s3fd import S3FD, STRIDES
from ..weights import check_state_dict, load_state_dict, resolve, strip_module_prefix
from .base import Face, check_frames, nms, resize_scale

MEAN_RGB = (104.0, 117.0, 123.0)
VARIANCES = (0.1, 0.2)
MIN_SIDE = 32  # smallest input the network accepts; smaller images are padded (bottom/right)


def decode(maps: Sequence[torch.Tensor], variances: tuple[float, float] = VARIANCES) -> tuple[torch.Tensor, torch.Tensor]:
    """All anchors of the 12 S3FD maps -> (boxes (B, N, 4) x1y1x2y2, face scores (B, N)), network-input pixels.

    Head i has stride s = 4 * 2**i; the anchor at cell (row r, col c) is centred at
    (s*c + s/2, s*r + s/2) with side 4*s. Scores are the softmax face probability. Anchors are
    ordered head by head, then row-major within a head.
    """
    boxes, scores = [], []
    for i in range(len(maps) // 2):
        cls, reg = maps[2 * i].float(), maps[2 * i + 1].float()
        b, _, h, w = cls.shape
        stride = float(STRIDES[i]) if i < len(STRIDES) else float(2 ** (i + 2))
        side = 4.0 * stride
        ys = torch.arange(h, device=cls.device, dtype=torch.float32) * stride + stride / 2
        xs = torch.arange(w, device=cls.device, dtype=torch.float32) * stride + stride / 2
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        prob = torch.softmax(cls, dim=1)[:, 1]  # (B, h, w)
        dx, dy, dw, dh = reg.unbind(dim=1)  # each (B, h, w)
        bcx = cx + dx * variances[0] * side
        bcy = cy + dy * variances[0] * side
        bw = side * torch.exp(dw * variances[1])
        bh = side * torch.exp(dh * variances[1])
        box = torch.stack([bcx - bw / 2, bcy - bh / 2, bcx + bw / 2, bcy + bh / 2], dim=-1)
        boxes.append(box.reshape(b, h * w, 4))
        scores.append(prob.reshape(b, h * w))
    return torch.cat(boxes, dim=1), torch.cat(scores, dim=1)


def load_s3fd_weights(weights: str | Path | dict) -> dict[str, torch.Tensor]:
    """A checked S3FD state dict from a path (bare or wrapped, `module.`-prefixed or not) or a ready dict."""
    if isinstance(weights, dict):
        state = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in weights.items()}
        return check_state_dict(strip_module_prefix(state), "s3fd", "the S3FD weights")
    path = Path(weights)
    if not path.is_file():
        raise LipdubError(f"S3FD weights not found: {path}")
    return load_state_dict(path, "s3fd")


class S3FDDetector:
    """S3FD on torch. `detect(frames)` -> per frame a list of Face (landmarks None), best first."""

    name = "s3fd"

    def __init__(
        self,
        weights: str | Path | dict | None = None,
        device: str | torch.device = "cpu",
        max_side: int | None = 480,
        threshold: float = 0.5,
        nms_iou: float = 0.3,
        batch_size: int | None = None,
        precision: str = "fp32",
    ):
        if weights is None:
            weights = resolve("s3fd")
        self.device = torch.device(device)
        # bf16 (see lipdub.device): the VGG trunk in bfloat16 on channels-last images; the maps
        # are decoded in float32.
        self.precision = resolve_precision(self.device, precision)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        net = S3FD()
        net.load_state_dict(load_s3fd_weights(weights))  # checked against the schema: loads strictly
        self.net = net.to(self.device, self.dtype).eval()
        self.max_side = max_side
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        # on a CPU batching brings nothing (measured); on a GPU it does
        self.batch_size = max(1, int(batch_size or (8 if self.device.type != "cpu" else 1)))
        self._mean = torch.tensor(MEAN_RGB, device=self.device).view(1, 3, 1, 1)

    def _prepare(self, frame: np.ndarray) -> tuple[np.ndarray, float, float]:
        h, w = frame.shape[:2]
        s = resize_scale(h, w, self.max_side)
        if s < 1.0:
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            frame = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
        else:
            nh, nw = h, w
        return frame, nw / w, nh / h

    @torch.inference_mode()
    def _run(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.stack(images)).to(self.device)  # (B, H, W, 3) BGR uint8
        x = x.flip(-1).permute(0, 3, 1, 2).float() - self._mean  # RGB minus mean
        h, w = x.shape[2:]
        if h < MIN_SIDE or w < MIN_SIDE:  # too small for the trunk's five poolings: pad with the mean
            x = torch.nn.functional.pad(x, (0, max(0, MIN_SIDE - w), 0, max(0, MIN_SIDE - h)))
        if self.precision == "bf16":
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        boxes, scores = decode(self.net(x))
        return boxes.cpu().numpy(), scores.cpu().numpy()

    def _finish(self, boxes: np.ndarray, scores: np.ndarray, sx: float, sy: float, h: int, w: int) -> list[Face]:
        sel = scores > self.threshold
        boxes, scores = boxes[sel], scores[sel]
        keep = nms(boxes, scores, self.nms_iou, area_offset=1.0)
        faces = []
        for k in keep:
            x1, y1, x2, y2 = boxes[k] / np.array([sx, sy, sx, sy])
            box = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
            if box[2] > box[0] and box[3] > box[1]:
                faces.append(Face(box, float(scores[k]), None))
        return faces

    def detect(self, frames: list[np.ndarray]) -> list[list[Face]]:
        frames = check_frames(frames)
        prepared = [self._prepare(f) for f in frames]
        results: list[list[Face]] = [[] for _ in frames]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (img, _, _) in enumerate(prepared):
            groups.setdefault(img.shape[:2], []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                boxes, scores = self._run([prepared[i][0] for i in chunk])
                for j, i in enumerate(chunk):
                    h, w = frames[i].shape[:2]
                    _, sx, sy = prepared[i]
                    results[i] = self._finish(boxes[j], scores[j], sx, sy, h, w)
        return results
