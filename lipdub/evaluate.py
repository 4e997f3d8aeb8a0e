"""`lipdub eval`: LSE-D / LSE-C, the audio-video offset and face-region PSNR / SSIM of a video.

The metric is computed exactly as syncnet_python computes it (see :mod:`lipdub.metrics.lse` and
../shared/specs/README.md section 9); what this module adds is the way there, as syncnet_python's
``run_pipeline.py`` prepares its input, without its temporary JPEG files:

1. the video is put on a 25 fps clock (each 1/25 s tick shows the frame ffmpeg's ``-r 25``
   would pick: the latest frame whose time rounds to that tick or an earlier one), and the audio
   is decoded as 16 kHz mono int16 and aligned with the video's first frame by the streams'
   timestamps;
2. the face is tracked (the same detectors and tracker as ``lipdub run``, unpadded boxes; short
   detection gaps of up to 24 frames are bridged like syncnet_python's tracker does when the
   boxes on both sides overlap, IoU > 0.5);
3. per frame, the box gives a half-size ``s = max(w, h) / 2`` and a centre ``(x, y)``; the three
   series are median-filtered (13 taps, zero-padded ends, as ``scipy.signal.medfilt``) over each
   run of frames with a face, and the crop is rows ``[y - s, y + s (1 + 2 cs))`` and columns
   ``[x - s (1 + cs), x + s (1 + cs))`` with crop scale ``cs = 0.4`` (square, 2.8 s wide, from the
   top of the face box to well under the chin), taken from the frame padded with the value 110
   and truncated to integers as syncnet_python does, then resized to 224x224 (bilinear);
4. the crops stream into :func:`lipdub.metrics.lse.sync_distances`; windows that contain a frame
   without a face are left out (and counted).

With ``cropped=True`` the video is taken as already made of face crops (224x224; other sizes are
resized) and only step 1 applies.

Memory stays bounded whatever the length: frames are decoded twice (a detection scan, then the
scoring pass), never collected; what is kept per frame is a box and a few numbers.

Differences from syncnet_python, on purpose: frames are decoded directly (no JPEG round trip),
every face run is evaluated (syncnet_python drops tracks under 100 frames and faces under 100 px)
and one target face is evaluated on one shared timeline (syncnet_python scores each face track
as a separate clip, with its own zero padding of the audio features at the track's ends).
"""
from __future__ import annotations

import math
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

from . import weights
from .device import pick_device
from .errors import LipdubError
from .faces import iou, load_detector, runs, track_video
from .faces.track import shot_bounds
from .media import VideoSource, check_readable, load_audio, prefetch, shift_audio, video_start_in_audio
from .metrics.lse import medfilt, mfcc_features, sync_distances
from .metrics.quality import psnr, ssim
from .progress import Timer, bar

EVAL_FPS = 25
CROP_SCALE = 0.4  # syncnet_python run_pipeline.py --crop_scale
CROP_SIZE = 224
PAD_VALUE = 110  # value of the padding around the frame before cropping
SMOOTH_KERNEL = 13  # median filter over the per-frame box size and centre
MAX_MISSED = 24  # missing detections bridged inside a track (syncnet_python: next detection <= 25 frames on)
BRIDGE_IOU = 0.5
PSNR_CAP = 100.0  # dB reported for a frame identical to its reference (keeps the mean and JSON finite)
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // EVAL_FPS
MIN_FRAMES = 6  # one window of 5 frames needs min_length - 5 >= 1


# ----------------------------------------------------------------------------------------- clock


def source_index(tick: int, source_fps: Fraction, fps: int = EVAL_FPS) -> int:
    """Frame of a constant ``source_fps`` clock shown at tick ``tick`` of a ``fps`` clock: the latest
    source frame before the middle of the tick (the rule of ``VideoSource.clock``, for frames at
    exact multiples of 1 / ``source_fps``)."""
    ratio = Fraction(source_fps) / fps
    return math.ceil((tick + Fraction(1, 2)) * ratio) - 1


def n_resampled(n_source: int, source_fps: Fraction, fps: int = EVAL_FPS) -> int:
    """Ticks of the ``fps`` clock over ``n_source`` frames at ``source_fps`` (duration rounded)."""
    return math.floor(Fraction(n_source) * fps / Fraction(source_fps) + Fraction(1, 2))


# ------------------------------------------------------------------------------------- face crops


def bridge_gaps(boxes: np.ndarray, valid: np.ndarray, cuts: Sequence[int] = (), max_missed: int = MAX_MISSED,
                min_iou: float = BRIDGE_IOU) -> tuple[np.ndarray, np.ndarray]:
    """Fill a run of at most ``max_missed`` frames without a box, inside a shot, by linear
    interpolation when the boxes on both sides overlap by IoU > ``min_iou`` (one face, missed)."""
    boxes = np.asarray(boxes, dtype=np.float64).copy()
    valid = np.asarray(valid, dtype=bool).copy()
    bounds = shot_bounds(len(valid), cuts)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for a, b in runs(~valid[lo:hi]):
            a, b = lo + a, lo + b
            if a == lo or b == hi or b - a > max_missed or iou(boxes[a - 1], boxes[b]) <= min_iou:
                continue
            t = (np.arange(a, b) - (a - 1))[:, None] / float(b - (a - 1))
            boxes[a:b] = (1 - t) * boxes[a - 1] + t * boxes[b]
            valid[a:b] = True
    return boxes, valid


def crop_params(boxes: np.ndarray, valid: np.ndarray, cuts: Sequence[int] = ()) -> np.ndarray:
    """(n, 3) float64 ``(x, y, s)`` per frame: box centre and half-size ``max(w, h) / 2``, each
    median-filtered over every run of frames with a face (13 taps, zero-padded ends). NaN where
    there is no face."""
    boxes = np.asarray(boxes, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    params = np.full((len(valid), 3), np.nan)
    raw = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                    np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2], axis=1) if len(boxes) else \
        np.zeros((0, 3))
    for a, b in runs(valid, cuts):
        for c in range(3):
            params[a:b, c] = medfilt(raw[a:b, c], SMOOTH_KERNEL)
    return params


def crop_window(x: float, y: float, s: float, crop_scale: float = CROP_SCALE) -> tuple[int, int, int, int, int]:
    """``(bsi, r0, r1, c0, c1)``: padding and the crop's rows / columns in the padded frame."""
    bsi = int(s * (1 + 2 * crop_scale))
    my, mx = y + bsi, x + bsi
    return (bsi, int(my - s), int(my + s * (1 + 2 * crop_scale)),
            int(mx - s * (1 + crop_scale)), int(mx + s * (1 + crop_scale)))


def face_crop(frame: np.ndarray, x: float, y: float, s: float, crop_scale: float = CROP_SCALE,
              size: int = CROP_SIZE) -> Optional[np.ndarray]:
    """syncnet_python's face crop of one BGR frame (``size`` x ``size`` uint8), or None when the
    box is degenerate. Only the crop is padded, never the whole frame."""
    h, w = frame.shape[:2]
    bsi, r0, r1, c0, c1 = crop_window(x, y, s, crop_scale)
    ph, pw = h + 2 * bsi, w + 2 * bsi
    if r0 < 0 or c0 < 0 or r1 - r0 < 2 or c1 - c0 < 2:  # degenerate (a negative start would wrap around)
        return None
    r1, c1 = min(r1, ph), min(c1, pw)
    out = np.full((r1 - r0, c1 - c0, frame.shape[2]), PAD_VALUE, dtype=frame.dtype)
    sr0, sr1 = max(r0 - bsi, 0), min(r1 - bsi, h)
    sc0, sc1 = max(c0 - bsi, 0), min(c1 - bsi, w)
    if sr1 > sr0 and sc1 > sc0:
        out[sr0 + bsi - r0:sr1 + bsi - r0, sc0 + bsi - c0:sc1 + bsi - c0] = frame[sr0:sr1, sc0:sc1]
    return cv2.resize(out, (size, size))


def _face_region(params_row: np.ndarray, width: int, height: int) -> Optional[tuple[int, int, int, int]]:
    """The smoothed square face box (x1, y1, x2, y2), clipped to the frame; None if under 11x11."""
    x, y, s = params_row
    x1, y1 = max(0, int(round(x - s))), max(0, int(round(y - s)))
    x2, y2 = min(width, int(round(x + s))), min(height, int(round(y + s)))
    if x2 - x1 < 11 or y2 - y1 < 11:
        return None
    return x1, y1, x2, y2


# ---------------------------------------------------------------------------------------- helpers


def _ranges(mask: np.ndarray) -> list[list[int]]:
    return [[a, b] for a, b in runs(mask)]


def _track_on_clock(track, cuts: Sequence[int], source_fps: Fraction, limit: int):
    """A (boxes, valid) track given on the video's own frame clock, mapped to the 25 fps ticks."""
    boxes = np.asarray(track.boxes if hasattr(track, "boxes") else track[0], dtype=np.float64)[:, :4]
    valid = np.asarray(track.valid if hasattr(track, "valid") else track[1], dtype=bool)
    if len(boxes) != len(valid) or len(valid) == 0:
        raise ValueError("track boxes and valid flags must be non-empty and of the same length")
    fps = Fraction(source_fps)
    n = min(limit, len(valid) if fps == EVAL_FPS else n_resampled(len(valid), fps))
    index = np.arange(n) if fps == EVAL_FPS else np.array([source_index(k, fps) for k in range(n)], dtype=np.int64)
    index = np.minimum(index, len(valid) - 1)
    new_cuts = sorted({int(np.searchsorted(index, c)) for c in cuts})
    return boxes[index], valid[index], new_cuts


def _crop_ok(x: float, y: float, s: float) -> bool:
    _, r0, r1, c0, c1 = crop_window(x, y, s)
    return r0 >= 0 and c0 >= 0 and r1 - r0 >= 2 and c1 - c0 >= 2


class _QualityMeter:
    """Per-frame PSNR / SSIM of the face region against a reference, averaged."""

    def __init__(self):
        self.psnr: list[float] = []
        self.ssim: list[float] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.psnr.append(min(PSNR_CAP, psnr(a, b)))
        self.ssim.append(ssim(a, b))

    def result(self) -> dict:
        n = len(self.psnr)
        return {
            "psnr": float(np.mean(self.psnr)) if n else None,
            "ssim": float(np.mean(self.ssim)) if n else None,
            "n_frames": n,
        }


# ------------------------------------------------------------------------------------------- API


def evaluate(
    video: str | Path,
    *,
    cropped: bool = False,
    reference: str | Path | None = None,
    checkpoint: str = "syncnet_v2",
    detector: str = "centerface",
    detector_weights: str | None = None,
    det_stride: int = 1,
    device: str = "auto",
    skip_sha256: bool = False,
    progress: bool = True,
    batch_size: int = 20,
    vshift: int = 15,
    track=None,
    cuts: Sequence[int] = (),
    keep_dists: bool = False,
    model=None,
) -> dict:
    """LSE-D / LSE-C and the audio-video offset of ``video`` (its face and its own audio track).

    Args:
        video: a video with an audio stream (any frame rate: it is put on a 25 fps clock).
        cropped: the video is already made of 224x224 face crops (no detection).
        reference: another video (same frame size) to compare the face region with: mean per-frame
            PSNR (dB, capped at 100 for identical frames) and SSIM over the frames with a face.
            With ``cropped`` the whole frames are compared.
        checkpoint: ``syncnet_v2`` (registry name, downloaded when missing) or a ``syncnet_v2.model`` path.
        detector, detector_weights: face detector for the tracking (``centerface`` or ``s3fd``).
        det_stride: detect every N-th frame (1, as syncnet_python; frames in between are
            interpolated, and detected too around any change).
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
        batch_size: windows per SyncNet forward pass (20 as syncnet_python; results do not depend on it).
        vshift: largest offset searched, in frames (15 as published: 31 distances).
        track: optional face boxes to use instead of detecting: an object with ``boxes`` ((n, 4)
            x1, y1, x2, y2, unpadded) and ``valid`` ((n,) bool), or a ``(boxes, valid)`` pair, one per
            frame of the video's own frame clock (as ``VideoSource.clock()`` yields them);
            ``cuts`` are the first frames of its shots after the first.
        keep_dists: also return ``dists``, the (n_windows, 31) per-window distances (a list of lists).
        model: a loaded SyncNet v2 (anything with ``forward_lip`` and ``forward_aud``) to use instead
            of loading ``checkpoint``, e.g. one network for many evaluations.

    Returns a JSON-ready dict: ``offset`` (frames; > 0: the audio leads the video), ``lse_d``,
    ``lse_c``, ``mean_dists`` (the 31 mean distances in syncnet_python's order: index j is offset
    ``vshift - j``, listed in ``offsets``), ``n_frames`` (= min(frames at 25 fps, audio frames)),
    ``n_windows`` (evaluated), ``n_windows_skipped`` (a frame without a face), per-window lists
    ``window_start``, ``window_confidence`` (syncnet_python's framewise confidence: median of the
    mean distances minus the window's distance at the best offset), ``window_confidence_smoothed``
    (its 9-tap median filter) and ``window_offset`` (each window's own best offset),
    ``frames_with_face``, ``frames_without_face``, ``no_face_ranges``, ``warnings``, ``timings``,
    ``frames_per_second``; with ``reference``: ``psnr``, ``ssim``, ``quality_frames``.

    Raises LipdubError for a missing or unreadable file, a video without audio or without any
    face, one too short to score, or a checkpoint that is not SyncNet v2.
    """
    if batch_size < 1:
        raise LipdubError("--batch-size must be at least 1")
    if det_stride < 1:
        raise LipdubError("--det-stride must be at least 1")
    timer = Timer()
    started = time.perf_counter()
    path = check_readable(video)
    ref_path = check_readable(reference) if reference is not None else None

    with timer("audio"):
        source = VideoSource(path)
        if source.info.is_image:
            raise LipdubError(f"{path} is a still image: lip-sync needs a video")
        start = video_start_in_audio(path)
        try:
            samples = load_audio(path, SAMPLE_RATE, start=start, pcm16=True)
        except LipdubError as exc:
            if "has no audio stream" in str(exc):
                raise LipdubError(f"{path} has no audio stream: lip-sync cannot be measured without the speech "
                                  "track") from None
            raise
        shifted = round(start * SAMPLE_RATE)
        audio_frames = len(samples) // SAMPLES_PER_FRAME
        if audio_frames < MIN_FRAMES:
            raise LipdubError(f"{path}: the audio lasts under {MIN_FRAMES} frames ({len(samples) / SAMPLE_RATE:.2f} s "
                              "from the first video frame): too short to measure lip-sync")
        mfcc = mfcc_features(samples)
    source_fps = Fraction(source.info.fps)
    clock = VideoSource(path, fps=EVAL_FPS, max_frames=audio_frames)
    ref_clock = None
    if ref_path is not None:
        ref_clock = VideoSource(ref_path, fps=EVAL_FPS, max_frames=audio_frames)
        if (ref_clock.info.width, ref_clock.info.height) != (source.info.width, source.info.height):
            raise LipdubError(f"reference {ref_path} is {ref_clock.info.width}x{ref_clock.info.height}, "
                              f"the video is {source.info.width}x{source.info.height}: they must match")

    dev = pick_device(device)
    with timer("load"):
        if model is None:
            model = weights.load_model(checkpoint, "syncnet_v2", dev, skip_sha256, progress)

    width, height = source.info.width, source.info.height
    if cropped:
        params = None
        valid = None
    else:
        if track is not None:
            boxes, found, shot_cuts = _track_on_clock(track, cuts, source_fps, audio_frames)
        else:
            with timer("load"):
                det = load_detector(detector, dev, detector_weights)
            _, face_track = track_video(clock, det, stride=det_stride, smooth=False, timer=timer, progress=progress)
            boxes, found, shot_cuts = face_track.boxes[:, :4], face_track.valid, face_track.cuts
        boxes, valid = bridge_gaps(boxes, found, shot_cuts)
        if not valid.any():
            raise LipdubError(f"no face found anywhere in {path}")
        params = crop_params(boxes, valid, shot_cuts)
        for i in np.flatnonzero(valid):  # a degenerate crop counts as no face
            valid[i] = _crop_ok(*params[i])

    meter = _QualityMeter() if ref_clock is not None else None
    resized = [False]

    def crops() -> Iterator[Optional[np.ndarray]]:
        frames = prefetch(clock.frames(), size=8)
        refs = prefetch(ref_clock.frames(), size=8) if ref_clock is not None else None
        progress_bar = bar(clock.info.n_frames_estimate, "eval", progress, leave=False)
        try:
            for k, frame in enumerate(frames):
                ref = next(refs, None) if refs is not None else None
                if cropped:
                    if frame.shape[:2] != (CROP_SIZE, CROP_SIZE):
                        resized[0] = True
                        crop = cv2.resize(frame, (CROP_SIZE, CROP_SIZE))
                    else:
                        crop = frame
                    if ref is not None:
                        meter.add(frame, ref)
                elif k < len(valid) and valid[k]:
                    x, y, s = params[k]
                    crop = face_crop(frame, x, y, s)
                    if ref is not None:
                        region = _face_region(params[k], width, height)
                        if region is not None:
                            x1, y1, x2, y2 = region
                            meter.add(frame[y1:y2, x1:x2], ref[y1:y2, x1:x2])
                else:
                    crop = None
                progress_bar.update(1)
                yield crop
        finally:
            progress_bar.close()
            frames.close()
            if refs is not None:
                refs.close()

    with timer("score"):
        res = sync_distances(model, crops(), mfcc, batch_size=batch_size, vshift=vshift, num_samples=len(samples))
    n_frames = int(res["n_frames"])
    if n_frames < MIN_FRAMES:
        raise LipdubError(f"{path} has {n_frames} frames at 25 fps with audio: too short to measure lip-sync "
                          f"(at least {MIN_FRAMES})")
    if res["n_windows"] == 0:
        raise LipdubError(f"no 5 consecutive frames with a face in {path}: lip-sync cannot be measured")

    if cropped:
        face_mask = np.ones(n_frames, dtype=bool)
    else:
        face_mask = np.zeros(n_frames, dtype=bool)
        face_mask[:min(n_frames, len(valid))] = valid[:n_frames]
    total = time.perf_counter() - started
    timings = {k: round(v, 4) for k, v in timer.seconds.items()}
    timings["total"] = round(total, 4)
    dists = res["dists"]
    best = np.argmin(dists, axis=1) if len(dists) else np.zeros(0, np.int64)
    result = {
        "video": str(path),
        "cropped": bool(cropped),
        "offset": int(res["offset"]),
        "lse_d": float(res["lse_d"]),
        "lse_c": float(res["lse_c"]),
        "mean_dists": [float(v) for v in res["mean_dists"]],
        "offsets": [int(v) for v in res["offsets"]],
        "n_frames": n_frames,
        "n_windows": int(res["n_windows"]),
        "n_windows_skipped": int(res["n_skipped"]),
        "window_start": [int(v) for v in res["windows"]],
        "window_confidence": [float(v) for v in res["frame_conf"]],
        "window_confidence_smoothed": [float(v) for v in res["frame_conf_medfilt"]],
        "window_offset": [int(vshift - j) for j in best],
        "frames_with_face": int(face_mask.sum()),
        "frames_without_face": int((~face_mask).sum()),
        "no_face_ranges": _ranges(~face_mask),
        "fps": EVAL_FPS,
        "source_fps": float(source.info.fps),
        "audio_frames": int(audio_frames),
        "audio_shift_samples": int(shifted),
        "checkpoint": str(checkpoint),
        "detector": None if cropped or track is not None else detector,
        "device": str(dev),
        "timings": timings,
        "frames_per_second": round(n_frames / max(total, 1e-9), 2),
    }
    if keep_dists:
        result["dists"] = dists.astype(np.float64).tolist()
    if cropped:
        result["resized_to_224"] = resized[0]
    if meter is not None:
        q = meter.result()
        result.update(reference=str(ref_path), psnr=q["psnr"], ssim=q["ssim"], quality_frames=q["n_frames"])
    result["warnings"] = _warnings(result)
    return result


def fix_offset(video: str | Path, output: str | Path, **options) -> dict:
    """Measure `video` (as `evaluate` does, with the same keyword options) and write `output`, a
    remux with the audio shifted by the measured offset (no re-encode), so that it measures in
    sync. Returns the measurement with `audio_shift` (seconds the audio moved; > 0: later)."""
    result = evaluate(video, **options)
    same = Path(output).exists() and Path(output).resolve() == Path(video).resolve()
    if result["offset"] == 0 and same:
        result["audio_shift"] = 0.0
    else:
        result["audio_shift"] = shift_audio(video, output, result["offset"] / EVAL_FPS)
    result["output"] = str(output)
    return result


def _warnings(r: dict) -> list[str]:
    out = []
    if abs(r["offset"]) >= 2:
        lead = "leads" if r["offset"] > 0 else "lags"
        out.append(f"audio {lead} the video by {abs(r['offset'])} frames ({abs(r['offset']) * 40} ms): "
                   "the result looks out of sync")
    if r["lse_c"] < 3.0:
        out.append(f"low sync confidence (LSE-C {r['lse_c']:.2f} < 3): the lips barely follow the audio")
    if r["frames_without_face"] > 0.1 * r["n_frames"]:
        out.append(f"no face in {r['frames_without_face']} of {r['n_frames']} frames (left out of the metric)")
    return out


# ------------------------------------------------------------------------------------------- CLI


def summary(r: dict) -> str:
    """The human-readable report printed by `lipdub eval`."""
    off = r["offset"]
    if off == 0:
        where = "in sync"
    else:
        where = f"audio {'leads' if off > 0 else 'lags'} the video by {abs(off) * 40} ms"
    lines = [
        f"{r['video']}",
        f"  AV offset   {off:+d} frames ({where})",
        f"  LSE-D       {r['lse_d']:.3f}  (min mean distance, lower is better)",
        f"  LSE-C       {r['lse_c']:.3f}  (confidence, higher is better)",
        f"  frames      {r['n_frames']} at 25 fps, {r['n_windows']} windows scored"
        + (f", {r['n_windows_skipped']} skipped" if r["n_windows_skipped"] else ""),
    ]
    if not r["cropped"]:
        lines.append(f"  face        in {r['frames_with_face']} of {r['n_frames']} frames")
    if "psnr" in r:
        if r["psnr"] is None:
            lines.append(f"  face region no frame compared with {r['reference']}")
        else:
            lines.append(f"  face region PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f} against {r['reference']} "
                         f"({r['quality_frames']} frames)")
    lines.append(f"  speed       {r['frames_per_second']:.1f} frames/s on {r['device']}")
    lines.extend(f"warning: {w}" for w in r["warnings"])
    return "\n".join(lines)
