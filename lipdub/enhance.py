"""Streaming face restoration (GFPGAN v1.3 / v1.4) and the ``lipdub restore`` command.

Two entry points:

* :class:`RestoreStage` restores a *stream* of frames given their five-point landmarks. It is
  what ``lipdub run --restore gfpgan`` calls on the lip-synced frames (with the face track's
  landmarks) and what :func:`restore_video` calls on a decoded video. Faces from consecutive
  frames are batched for the network; only a bounded window of frames is held.
* :func:`restore_video` restores a video or a still image file on its own: a *scan* pass
  detects faces on every frame and builds a smoothed landmark track (as ``run`` does), then a
  second decode pass restores and encodes, streaming (no intermediate image files).

Outputs:

* video input -> ``.mp4`` output (H.264; the input's first audio stream, when it has one, is
  re-encoded to AAC alongside). Other containers/suffixes are refused.
* image input (jpg/png/webp/bmp/tif) -> image output in the format named by the output suffix
  (``.png``, ``.jpg``/``.jpeg``, ``.webp``, ``.bmp``, ``.tif``/``.tiff``); writing a still
  image into a video file is refused (use ``lipdub run`` to animate a still). An alpha channel
  in the input is not kept.

Every output is written to a hidden temporary file next to the target and renamed into place
only when complete, so a failure never leaves a half-written file.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from .errors import LipdubError

__all__ = ["RestoreStage", "RestoreResult", "restore_video", "add_cli", "REGIONS", "UPSCALES"]

REGIONS = ("face", "mouth")
UPSCALES = (1, 2, 4)
DEFAULT_CHECKPOINT = "gfpgan_v1.4"
VIDEO_SUFFIXES = {".mp4"}
IMAGE_WRITE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
UPSCALE_INTERPOLATION = cv2.INTER_CUBIC


def _check_options(region: str, weight: float, upscale: int, batch_size: int | None) -> None:
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


# ------------------------------------------------------------------------------------------
# The streaming stage
# ------------------------------------------------------------------------------------------
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
                 progress: bool = True):
        _check_options(region, weight, upscale, batch_size)
        from . import weights
        from .restore import Restorer

        dev = _device(device)
        if batch_size is None:
            batch_size = 1 if dev.type == "cpu" else 4
        path = weights.resolve(checkpoint, skip_sha256=skip_sha256, progress=progress)
        state = weights.load_state_dict(path, "gfpgan")  # params_ema, else params, else bare; checked
        self._setup(Restorer(state, device=dev, batch_size=int(batch_size)), region, weight, upscale)
        self.checkpoint = Path(path)

    @classmethod
    def from_restorer(cls, restorer, region: str = "mouth", weight: float = 1.0, upscale: int = 1) -> "RestoreStage":
        """A stage around a ready :class:`lipdub.restore.Restorer` (or anything with ``size``,
        ``batch_size`` and ``restore_crops(list of crops) -> list of crops``)."""
        _check_options(region, weight, upscale, getattr(restorer, "batch_size", 1))
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
        from .restore import align_face

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
        from .restore import paste_back

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


def _device(device):
    import torch

    if isinstance(device, torch.device):
        return device
    from .pipeline import pick_device

    return pick_device(str(device))


# ------------------------------------------------------------------------------------------
# Whole files
# ------------------------------------------------------------------------------------------
@dataclass
class RestoreResult:
    output: Path
    n_frames: int
    fps: float  # 0 for an image
    width: int  # output size (input size x upscale)
    height: int
    frames_with_face: int  # frames whose landmarks were known
    frames_restored: int
    faces_restored: int
    is_image: bool
    has_audio: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    landmarks: np.ndarray | None = field(default=None, repr=False)  # (n, 5, 2) used, NaN = no face

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("landmarks")
        d["output"] = str(self.output)
        return d


class _Head:
    """The first ``n`` ticks of a VideoSource (same interface as far as ``scan`` needs)."""

    def __init__(self, source, n: int):
        self._source, self._n = source, n
        self.info = replace(source.info, n_frames_estimate=min(n, source.info.n_frames_estimate))

    def clock(self):
        return itertools.islice(self._source.clock(), self._n)


def _has_audio(path: Path) -> bool:
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, UnicodeDecodeError, ValueError):
        return False


def _write_image(path: Path, image: np.ndarray) -> None:
    """Encode by suffix and write atomically (temp file + rename)."""
    suffix = path.suffix.lower()
    params: list[int] = []
    if suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, 95]
    elif suffix == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 95]
    ok, data = cv2.imencode(suffix, image, params)
    if not ok:
        raise LipdubError(f"cannot encode {path.name} as {suffix}")
    temp = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    try:
        with open(temp, "wb") as fh:
            fh.write(data.tobytes())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise LipdubError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def restore_video(input: str | os.PathLike, output: str | os.PathLike, *, checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
                  region: str = "face", weight: float = 1.0, upscale: int = 1, detector: str = "centerface",
                  detector_weights: str | None = None, device="auto", batch_size: int | None = None, det_stride: int = 1,
                  max_frames: int | None = None, skip_sha256: bool = False, progress: bool = True,
                  stage: RestoreStage | None = None) -> RestoreResult:
    """Restore the faces of a video or image file; see the module docstring for the outputs.

    Faces are detected on every ``det_stride``-th frame (1: every frame; cheap next to the
    restorer), linked into the main face's track (the largest, most central one, as ``run``
    chooses it), interpolated and smoothed over time; the track's landmarks drive the
    alignment. Frames without that face pass through (resized when ``upscale`` > 1); next to
    such a gap the restoration fades in and out over a few frames (the track's alpha) instead
    of popping.
    ``max_frames`` restores only the first N frames (a preview; the output then has no audio).
    ``stage``: a ready :class:`RestoreStage` to reuse a loaded network; its checkpoint, region,
    weight, upscale and batch size then apply and those arguments are ignored.

    Raises LipdubError for anything the user can fix; on any failure no output is left behind.
    """
    from .faces.base import load_detector
    from .faces.track import build_track
    from .media import VideoSource, VideoWriter, check_readable, check_writable, is_image, prefetch, video_start_in_audio
    from .pipeline import Timer, scan

    started = time.perf_counter()
    timer = Timer()
    if stage is None:
        _check_options(region, weight, upscale, batch_size)
    if det_stride < 1:
        raise LipdubError("detection stride must be at least 1")
    if max_frames is not None and max_frames < 1:
        raise LipdubError("max frames must be at least 1")
    in_path = check_readable(input)
    out_path = check_writable(output)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise LipdubError(f"output {out_path} would overwrite the input")
    suffix = out_path.suffix.lower()
    image_in = is_image(in_path)
    if image_in and suffix not in IMAGE_WRITE_SUFFIXES:
        raise LipdubError(f"the input is an image, so the output must be one too "
                          f"({', '.join(sorted(IMAGE_WRITE_SUFFIXES))}), got '{out_path.name}'")
    if not image_in and suffix not in VIDEO_SUFFIXES:
        raise LipdubError(f"the input is a video, so the output must be an .mp4 file, got '{out_path.name}'")

    source = VideoSource(in_path)  # LipdubError for unreadable media
    with timer("load"):
        if stage is None:
            stage = RestoreStage(checkpoint, device, region, weight, upscale, batch_size, skip_sha256, progress)
        det = load_detector(detector, stage.device or "cpu", detector_weights)

    scanned = source if max_frames is None else _Head(source, max_frames)
    found = scan(scanned, det, det_stride, timer, progress)
    n = len(found.tick_pts)
    width, height = source.info.width, source.info.height
    track = build_track(found.detections, found.cuts, n, width, height, pads=(0, 0, 0, 0), smooth=True,
                        max_gap=2 * det_stride + 2)
    landmarks = track.landmarks if track.landmarks is not None else np.full((n, 5, 2), np.nan, np.float32)
    landmarks = landmarks.copy()
    landmarks[~track.valid] = np.nan
    known = np.all(np.isfinite(landmarks.reshape(n, -1)), axis=1)
    if track.valid.any() and not known.any():
        raise LipdubError(f"the '{detector}' detector gives no facial landmarks, which restoration needs; "
                          f"use --detector centerface")

    out_w, out_h = width * stage.upscale, height * stage.upscale
    stats_before = dict(stage.stats)
    has_audio = False
    if image_in:
        frame = next(iter(source.clock()))[1]
        result = next(stage.process([frame], [landmarks[0]]))
        with timer("encode"):
            _write_image(out_path, result)
    else:
        has_audio = max_frames is None and _has_audio(in_path)
        frames = prefetch((f for _, f in itertools.islice(source.clock(), n)), size=max(4, stage.batch_size))
        bar = _bar(n, "restore", progress)
        written = 0
        try:
            with VideoWriter(out_path, out_w, out_h, source.info.fps, audio_path=in_path if has_audio else None,
                             audio_start=video_start_in_audio(in_path)) as writer:
                for frame in stage.process(frames, landmarks, weights=track.alpha):
                    with timer("encode"):
                        writer.write(frame)
                    written += 1
                    bar.update(1)
                if written != n:
                    raise LipdubError(f"{in_path}: {written} frames on the second read, {n} on the first")
        finally:
            bar.close()
    delta = {k: stage.stats[k] - stats_before[k] for k in stage.stats}
    timings = dict(timer.seconds)
    for key in ("align_s", "network_s", "paste_s", "resize_s"):
        timings[key[:-2]] = delta[key]
    timings["total"] = time.perf_counter() - started
    return RestoreResult(out_path, n, 0.0 if image_in else float(source.info.fps), out_w, out_h,
                         int(known.sum()), int(delta["frames_restored"]), int(delta["faces"]), image_in, has_audio,
                         timings, landmarks)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def add_cli(sub: argparse._SubParsersAction) -> None:
    from .faces.base import DETECTORS

    p = sub.add_parser("restore", help="restore the faces of a video or image with GFPGAN",
                       description="Restore the main face of a video (-> .mp4, audio kept) or an image "
                                   "(-> image of the output's suffix) with GFPGAN v1.3/v1.4.")
    p.add_argument("input", help="video or image (jpg/png/webp/bmp/tif)")
    p.add_argument("-o", "--output", required=True, help="output .mp4 for a video; .png/.jpg/... for an image")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="registry name (gfpgan_v1.3, gfpgan_v1.4) or a GFPGANv1.x.pth path (default gfpgan_v1.4)")
    p.add_argument("--region", choices=REGIONS, default="face",
                   help="face: the whole aligned face (default); mouth: the lower face only")
    p.add_argument("--weight", type=float, default=1.0, help="0..1 blend of restored and input (default 1)")
    p.add_argument("--upscale", type=int, choices=UPSCALES, default=1, help="resize the output by 1, 2 or 4")
    p.add_argument("--detector", choices=DETECTORS, default="centerface", help="face detector (needs landmarks)")
    p.add_argument("--detector-weights", default=None, help="weights file for the detector (default: registry)")
    p.add_argument("--det-stride", type=int, default=1, help="detect every N-th frame (default 1: every frame)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--batch-size", type=int, default=None, help="faces per network batch (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--max-frames", type=int, default=None, help="only the first N frames (a preview, no audio)")
    p.add_argument("--skip-sha256", action="store_true", help="accept downloaded weights whose hash differs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.set_defaults(handler=_cli_restore)


def _cli_restore(args: argparse.Namespace) -> int:
    result = restore_video(
        args.input, args.output, checkpoint=args.checkpoint, region=args.region, weight=args.weight,
        upscale=args.upscale, detector=args.detector, detector_weights=args.detector_weights, device=args.device,
        batch_size=args.batch_size, det_stride=args.det_stride, max_frames=args.max_frames,
        skip_sha256=args.skip_sha256, progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    if result.is_image:
        print(f"wrote {result.output}: {result.width}x{result.height}, "
              f"{result.faces_restored} face{'s' if result.faces_restored != 1 else ''} restored")
    else:
        fps = result.n_frames / max(1e-9, result.timings.get("total", 0.0))
        print(f"wrote {result.output}: {result.n_frames} frames at {result.fps:g} fps, {result.width}x{result.height}, "
              f"face restored in {result.frames_restored} frames ({fps:.2f} frames/s overall)")
    if result.frames_with_face == 0:
        print("lipdub: note: no face found; the frames were copied unchanged", file=sys.stderr)
    return 0
