"""`sync()`: the whole lip-sync job, decode -> detect -> crop -> generate -> blend -> encode.

The face video is read twice, both times streaming: a *scan* pass decodes every frame,
runs the face detector on a stride (at reduced resolution) and notes shot cuts; then the
track is built for the whole video from a few numbers per frame; a *render* pass decodes
again, generates the mouths in batches, blends and encodes. Two passes cost one extra
decode (cheap next to the generator) and buy a lot: the target face is chosen with the whole
shot in view, smoothing is centred, "no face anywhere" is known before any output is
written, and ping-pong playback knows the clip length.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from . import audio as audio_mod
from .blend import paste_box, paste_feather
from .errors import LipdubError
from .faces.base import Face
from .faces.track import FaceTrack, build_track, fixed_track
from .media import (
    Transform, VideoSource, VideoWriter, check_readable, check_writable, load_audio, prefetch, video_start_in_audio,
)
from .models.wav2lip import Wav2Lip

DETECT_SIZE = 480  # longest side of the frames the detector sees


@dataclass
class SyncOptions:
    """Every option of `lipdub run`; the CLI and the web service build one of these."""

    checkpoint: str = "wav2lip_gan"
    detector: str = "centerface"
    detector_weights: str | None = None
    box: tuple[int, int, int, int] | None = None  # TOP BOTTOM LEFT RIGHT, as the original --box
    pads: tuple[int, int, int, int] = (0, 10, 0, 0)  # TOP BOTTOM LEFT RIGHT
    smooth: bool = True
    face_index: int | None = None
    blend: str = "feather"  # feather | box
    fps: float = 25.0  # still images only
    length: str = "pingpong"  # pingpong | loop, when the audio outlasts the video
    static: bool = False
    resize_factor: int = 1
    crop: tuple[int, int, int, int] = (0, -1, 0, -1)
    rotate: bool = False
    batch_size: int = 16
    det_batch_size: int = 0  # 0 = the detector's best for the device
    det_stride: int = 0  # 0 = about 6 detections per second
    device: str = "auto"
    skip_sha256: bool = False
    progress: bool = True
    # called as progress_callback(stage, done, total) with stage "scan" or "render"
    progress_callback: Callable[[str, int, int], None] | None = None
    restore: str | None = None  # "gfpgan": restore the face after lip-sync
    restore_checkpoint: str = "gfpgan_v1.4"
    restore_region: str = "mouth"  # mouth | face
    restore_weight: float = 1.0
    upscale: int = 1
    report: str | None = None  # path of a JSON report on the output (metrics, coverage, timings)

    def validate(self) -> None:
        if self.blend not in ("feather", "box"):
            raise LipdubError(f"unknown blend mode '{self.blend}' (feather, box)")
        if self.length not in ("pingpong", "loop"):
            raise LipdubError(f"unknown length policy '{self.length}' (pingpong, loop)")
        if self.batch_size < 1 or self.det_batch_size < 0:
            raise LipdubError("--batch-size must be at least 1 and --det-batch-size at least 0")
        if self.resize_factor < 1:
            raise LipdubError("--resize-factor must be at least 1")
        if not 1 <= self.fps <= 120:
            raise LipdubError("--fps must be between 1 and 120")
        if self.face_index is not None and self.face_index < 0:
            raise LipdubError("--face-index must be 0 or more")
        if self.restore not in (None, "gfpgan"):
            raise LipdubError(f"unknown restorer '{self.restore}' (gfpgan)")
        if self.restore_region not in ("mouth", "face"):
            raise LipdubError(f"unknown restore region '{self.restore_region}' (mouth, face)")
        if not 0.0 <= self.restore_weight <= 1.0:
            raise LipdubError("--restore-weight must be between 0 and 1")
        if self.upscale not in (1, 2, 4):
            raise LipdubError("--upscale must be 1, 2 or 4")
        if self.upscale != 1 and self.restore is None:
            raise LipdubError("--upscale needs --restore gfpgan")


@dataclass
class SyncResult:
    output: Path
    n_frames: int
    fps: float
    width: int
    height: int
    frames_with_face: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def as_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise LipdubError(f"unknown device '{name}' (auto, cpu, cuda, mps)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LipdubError("--device cuda requested but CUDA is not available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LipdubError("--device mps requested but MPS is not available")
    return torch.device(name)


def load_generator(checkpoint: str, device: torch.device, skip_sha256: bool = False, progress: bool = True) -> Wav2Lip:
    from . import weights

    path = weights.resolve(checkpoint, skip_sha256=skip_sha256, progress=progress)
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.load_state_dict(path, "wav2lip").items()}
    with torch.device("meta"):  # no second copy of the 145 MB of weights: adopt the loaded tensors
        model = Wav2Lip()
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


class Timer:
    """Wall-clock seconds per stage, summed over the job."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] += time.perf_counter() - self.t

        return _Span()


# ------------------------------------------------------------------------------------------ scan


def _downscale(frame: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    h, w = frame.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale == 1.0:
        return frame, 1.0
    return cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA), scale


def _is_cut(prev: tuple[np.ndarray, np.ndarray] | None, cur: tuple[np.ndarray, np.ndarray]) -> bool:
    """A hard cut changes both the coarse picture and the colour histogram at once."""
    if prev is None:
        return False
    thumb_diff = float(np.abs(cur[0] - prev[0]).mean()) / 255.0
    hist_diff = 0.5 * float(np.abs(cur[1] - prev[1]).sum())
    return thumb_diff > 0.08 and hist_diff > 0.1


def _signature(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gray = cv2.resize(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    hist = cv2.calcHist([small], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel()
    return gray.astype(np.float32), hist / max(1.0, hist.sum())


def _changed(a: list[Face], b: list[Face]) -> bool:
    """Whether faces appeared, vanished or moved a lot between two detections."""
    from .faces.track import iou

    if len(a) != len(b):
        return True
    for fa in a:
        if max((iou(np.asarray(fa.box), np.asarray(fb.box)) for fb in b), default=0.0) < 0.5:
            return True
    return False


@dataclass
class Scan:
    tick_pts: list[int]
    detections: dict[int, list[Face]]
    cuts: list[int]


def scan(
    source: VideoSource,
    detector,
    stride: int,
    timer: Timer,
    progress: bool,
    callback: Callable[[str, int, int], None] | None = None,
    max_frames: int | None = None,
) -> Scan:
    """Decode every frame once; detect on a stride, and on every frame around a change.

    Frames since the last detection are kept at detection resolution only (a few hundred KB
    each), so when a strided detection disagrees with the previous one (a face appeared,
    vanished or jumped) the frames in between are detected too instead of guessed.
    """
    tick_pts: list[int] = []
    detections: dict[int, list[Face]] = {}
    cuts: list[int] = []
    pending: list[tuple[int, np.ndarray, float]] = []  # undetected frames since the last detection
    last_detected: int | None = None
    prev_sig = None

    def detect(items: list[tuple[int, np.ndarray, float]]) -> None:
        with timer("detect"):
            results = detector.detect([small for _, small, _ in items])
        for (index, _, scale), faces in zip(items, results):
            detections[index] = [
                Face(tuple(float(v) / scale for v in f.box), f.score, None if f.landmarks is None else f.landmarks / scale)
                for f in faces
            ]

    def flush(index: int, small: np.ndarray, scale: float) -> None:
        nonlocal last_detected, pending
        detect([(index, small, scale)])
        if last_detected is not None and pending and _changed(detections[last_detected], detections[index]):
            detect(pending)
        pending = []
        last_detected = index

    bar = tqdm(total=source.info.n_frames_estimate, desc="scan", unit="frame", disable=not progress, leave=False)
    frames = prefetch(source.clock(), size=8)
    shot_start = 0
    last: tuple[int, np.ndarray, float] | None = None
    while True:
        with timer("decode"):
            item = next(frames, None)
        if item is None:
            break
        pts, frame = item
        index = len(tick_pts)
        tick_pts.append(pts)
        small, scale = _downscale(frame, DETECT_SIZE)
        sig = _signature(small)
        if _is_cut(prev_sig, sig):
            if last is not None and last[0] != last_detected:  # close the previous shot with a detection
                pending = [p for p in pending if p[0] != last[0]]
                flush(*last)
            cuts.append(index)
            shot_start, last_detected, pending = index, None, []
        prev_sig = sig
        if (index - shot_start) % stride == 0:
            flush(index, small, scale)
        else:
            pending.append((index, small, scale))
        last = (index, small, scale)
        bar.update(1)
        if callback is not None:
            callback("scan", index + 1, source.info.n_frames_estimate)
        if max_frames is not None and index + 1 >= max_frames:
            break
    if last is not None and last[0] != last_detected:
        pending = [p for p in pending if p[0] != last[0]]
        flush(*last)
    bar.close()
    return Scan(tick_pts, detections, cuts)


# ---------------------------------------------------------------------------------------- render


def source_order(n_out: int, n_src: int, length: str, static: bool) -> Iterator[int]:
    """Which source frame each output frame shows: straight, then ping-pong or loop past the end."""
    for i in range(n_out):
        if static or n_src == 1:
            yield 0
        elif i < n_src or length == "loop":
            yield i % n_src
        else:
            k = i % (2 * n_src - 2)
            yield k if k < n_src else 2 * n_src - 2 - k


def generator_inputs(frames: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> np.ndarray:
    """(B, 6, 96, 96) float32: masked target and reference face, as the original builds them.

    Division by 255 happens in float64 before the cast to float32, and the array is a
    channels-last view (the memory layout the original hands to torch), because the CPU
    convolutions round differently for the two layouts: with this one the predictions, and so
    the truncated uint8 mouths, are bit-identical to the original's.
    """
    faces = np.stack([cv2.resize(f[b[1] : b[3], b[0] : b[2]], (96, 96)) for f, b in zip(frames, boxes)])
    masked = faces.copy()
    masked[:, 48:] = 0
    batch = np.concatenate((masked, faces), axis=3) / 255.0
    return batch.astype(np.float32).transpose(0, 3, 1, 2)


def render(
    source: VideoSource,
    tick_pts: Sequence[int],
    track: FaceTrack,
    mel: np.ndarray,
    starts: Sequence[int],
    order: Sequence[int],
    model: Wav2Lip,
    options: SyncOptions,
    timer: Timer,
) -> Iterator[np.ndarray]:
    """Yield output frames (BGR uint8) in order, generating mouths in batches.

    Output frame i shows source frame `order[i]` with the mouth for mel window `starts[i]`.
    """
    device = next(model.parameters()).device
    n_out = len(starts)
    frames = prefetch(source.frames_at(tick_pts, order), size=max(4, options.batch_size))
    paste = paste_box if options.blend == "box" else None
    for start in range(0, n_out, options.batch_size):
        stop = min(n_out, start + options.batch_size)
        batch: list[np.ndarray] = []
        with timer("decode"):
            for _ in range(start, stop):
                batch.append(next(frames).copy())
        rows = [k for k in range(stop - start) if track.valid[order[start + k]]]
        if rows:
            boxes = [track.boxes[order[start + k]] for k in rows]
            with timer("generate"):
                faces = torch.from_numpy(generator_inputs([batch[k] for k in rows], boxes)).to(device)
                windows = [mel[:, starts[start + k] : starts[start + k] + audio_mod.MEL_STEP_SIZE] for k in rows]
                mels = torch.from_numpy(np.stack(windows)[:, None].astype(np.float32)).to(device)
                with torch.inference_mode():
                    preds = model(mels, faces).float().cpu().numpy().transpose(0, 2, 3, 1)
            with timer("blend"):
                for k, box, pred in zip(rows, boxes, preds):
                    if paste is not None:
                        paste(batch[k], box, pred)
                    else:
                        paste_feather(batch[k], box, pred, float(track.alpha[order[start + k]]))
        yield from batch


def _target_track(source: VideoSource, opts: SyncOptions, device: torch.device, timer: Timer) -> tuple[list[int], FaceTrack]:
    """Output clock ticks of the face video and the target face on each of them."""
    width, height = source.info.width, source.info.height
    if opts.box is not None:
        if source.info.is_image or opts.static:
            tick_pts = [0]
        else:
            with timer("decode"):
                tick_pts = [pts for pts, _ in source.clock()]
        return tick_pts, fixed_track(opts.box, len(tick_pts), width, height)
    from .faces.base import load_detector

    detector = load_detector(opts.detector, device, opts.detector_weights, batch_size=opts.det_batch_size or None)
    fps = float(source.info.fps)
    stride = 1 if opts.static else (opts.det_stride or max(1, round(fps / 6)))
    found = scan(source, detector, stride, timer, opts.progress, opts.progress_callback,
                 max_frames=1 if opts.static else None)
    track = build_track(
        found.detections, found.cuts, len(found.tick_pts), width, height,
        pads=tuple(opts.pads), smooth=opts.smooth, face_index=opts.face_index, max_gap=2 * stride + 2,
    )
    if not track.valid.any():
        what = f"face #{opts.face_index}" if opts.face_index is not None else "face"
        where = "the first frame of " if opts.static else ""
        raise LipdubError(f"no {what} found anywhere in {where}{source.path}")
    return found.tick_pts, track


def _landmarks_for(source: VideoSource, track: FaceTrack, n_ticks: int, opts: SyncOptions, device: torch.device,
                   timer: Timer) -> np.ndarray:
    """Five-point landmarks for a track that has none (`--box`, S3FD), from a CenterFace pass.

    Only landmarks whose centre lies inside the track's box on that frame are kept, so a
    different face in the picture is never restored in place of the driven one.
    """
    from .faces.base import load_detector

    stride = max(1, round(float(source.info.fps) / 6))
    found = scan(source, load_detector("centerface", device), stride, timer, False, max_frames=n_ticks)
    marks = build_track(found.detections, found.cuts, len(found.tick_pts), source.info.width, source.info.height,
                        pads=(0, 0, 0, 0), smooth=opts.smooth, face_index=opts.face_index,
                        max_gap=2 * stride + 2).landmarks
    out = np.full((len(track.valid), 5, 2), np.nan, dtype=np.float32)
    n = min(len(out), len(marks))
    centre = marks[:n].mean(axis=1)  # NaN where there is no face: the comparisons below are then False
    box = track.boxes[:n]
    inside = (box[:, 0] <= centre[:, 0]) & (centre[:, 0] < box[:, 2]) & (box[:, 1] <= centre[:, 1]) & (centre[:, 1] < box[:, 3])
    out[:n][inside] = marks[:n][inside]
    return out


def _restore_stage(frames: Iterator[np.ndarray], source: VideoSource, track: FaceTrack, tick_count: int,
                   order: Sequence[int], opts: SyncOptions, device: torch.device, timer: Timer) -> Iterator[np.ndarray]:
    """GFPGAN on the lip-synced frames, aligned with the track's smoothed landmarks."""
    from .enhance import RestoreStage

    landmarks_of = track.landmarks
    if landmarks_of is None or not np.isfinite(landmarks_of[track.valid]).any():
        landmarks_of = _landmarks_for(source, track, tick_count, opts, device, timer)
    with timer("load"):
        stage = RestoreStage(opts.restore_checkpoint, device=device, region=opts.restore_region,
                             weight=opts.restore_weight, upscale=opts.upscale, skip_sha256=opts.skip_sha256,
                             progress=opts.progress)
    landmarks = (landmarks_of[j] if track.valid[j] else None for j in order)
    out = stage.process(frames, landmarks, weights=(float(track.alpha[j]) for j in order))
    while True:
        with timer("restore"):
            frame = next(out, None)
        if frame is None:
            return
        yield frame


def sync(face: str | Path, audio: str | Path, output: str | Path, **options) -> SyncResult:
    """Make the person in `face` (video or image) speak `audio`; write an H.264/AAC mp4 to `output`.

    Options are the fields of SyncOptions (or `options=SyncOptions(...)`). Raises LipdubError
    for anything the user can fix; on any failure no output file is left behind.
    """
    opts = options.pop("options", None) or SyncOptions(**options)
    opts.validate()
    timer = Timer()
    started = time.perf_counter()
    face_path, audio_path = check_readable(face), check_readable(audio)
    output = check_writable(output)
    report = check_writable(opts.report) if opts.report else None

    transform = Transform(opts.resize_factor, opts.rotate, tuple(opts.crop))
    source = VideoSource(face_path, fps=opts.fps, transform=transform)
    fps = float(source.info.fps)
    # A video's own audio stays where it was against the picture, even when the streams start
    # at different times; another file's audio starts with the video.
    same_file = not source.info.is_image and os.path.samefile(face_path, audio_path)
    audio_start = video_start_in_audio(face_path) if same_file else 0.0
    with timer("audio"):
        wav = load_audio(audio_path, start=audio_start)
        if not np.any(wav):
            raise LipdubError(f"{audio_path} is silent (all samples are zero)")
        mel = audio_mod.melspectrogram(wav)
        starts = audio_mod.chunk_starts(mel.shape[1], fps)
        del wav

    device = pick_device(opts.device)
    with timer("load"):
        model = load_generator(opts.checkpoint, device, opts.skip_sha256, opts.progress)
    tick_pts, track = _target_track(source, opts, device, timer)
    if opts.static:
        tick_pts = tick_pts[:1]
    order = list(source_order(len(starts), len(tick_pts), opts.length, opts.static))

    frames = render(source, tick_pts, track, mel, starts, order, model, opts, timer)
    if opts.restore:
        frames = _restore_stage(frames, source, track, len(tick_pts), order, opts, device, timer)
    width, height = source.info.width * opts.upscale, source.info.height * opts.upscale
    bar = tqdm(total=len(order), desc="lip-sync", unit="frame", disable=not opts.progress)
    with VideoWriter(output, width, height, source.info.fps, audio_path=audio_path, audio_start=audio_start) as writer:
        for done, frame in enumerate(frames, 1):
            with timer("encode"):
                writer.write(frame)
            bar.update(1)
            if opts.progress_callback is not None:
                opts.progress_callback("render", done, len(order))
    bar.close()
    timer.seconds["total"] = time.perf_counter() - started
    shown = int(track.valid[order].sum())
    result = SyncResult(output, len(order), fps, width, height, shown, dict(timer.seconds))
    if report is not None:
        write_report(result, report, opts, device)
    return result


def write_report(result: SyncResult, path: Path, opts: SyncOptions, device: torch.device) -> None:
    """`--report`: the result, face coverage, stage timings and, when SyncNet weights are cached, LSE metrics."""
    import json
    import os

    from . import weights

    data = result.as_dict()
    data["frames_without_face"] = result.n_frames - result.frames_with_face
    data["coverage"] = result.frames_with_face / max(1, result.n_frames)
    data["frames_per_second"] = result.n_frames / max(1e-9, result.timings.get("total", 0.0))
    syncnet = weights.cache_path("syncnet_v2")
    if not syncnet.is_file():
        data["sync"] = None
        data["sync_note"] = "syncnet_v2 weights not cached (lipdub weights download syncnet_v2)"
    else:
        from .evaluate import evaluate

        data["sync"] = evaluate(result.output, checkpoint=str(syncnet), detector=opts.detector, device=str(device),
                                progress=opts.progress)
    tmp = path.with_name(f".{path.name}.partial{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
