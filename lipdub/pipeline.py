"""`sync()`: the whole lip-sync job, decode -> detect -> crop -> generate -> blend -> encode.

The face video is read twice, both times streaming: a *scan* pass (`lipdub.faces.track_video`)
decodes every frame, detects faces on a stride at reduced resolution, notes shot cuts and links
the target face into a track; a *render* pass decodes again, generates the mouths in batches,
blends and encodes. Two passes cost one extra decode (cheap next to the generator) and buy a
lot: the target face is chosen with the whole shot in view, smoothing is centred, "no face
anywhere" is known before any output is written, and ping-pong playback knows the clip length.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import audio as audio_mod
from . import weights
from .blend import paste_box, paste_feather
from .device import pick_device
from .errors import LipdubError
from .evaluate import evaluate, fix_offset
from .faces import FaceTrack, default_stride, fixed_track, load_detector, track_video
from .generate import Generator, ModelSource, generator_inputs, load_generator, mel_windows
from .media import (
    Transform, VideoSource, VideoWriter, check_readable, check_writable, is_image, load_audio, prefetch, timed,
    video_start_in_audio, write_atomic,
)
from .options import SyncOptions
from .progress import Timer, bar
from .restore import RestoreStage
from .speech import silence_weights


@dataclass
class SyncResult:
    output: Path
    n_frames: int
    fps: float
    width: int
    height: int
    frames_with_face: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    speech: list[bool] | None = field(default=None, repr=False)  # per frame, with silence gating
    audio_shift: float = 0.0  # seconds the audio was moved by --auto-offset (> 0: later)
    face_size: int = 96  # the generator's face size: 96 (wav2lip, wav2lip_gan) or 256 (wav2lip256)
    precision: str = "fp32"  # the arithmetic the networks ran at

    def as_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        d.pop("speech")
        return d


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


# Frames queued between two lanes. With one batch in each lane and one waiting before the
# generator, a 1080x1920 job holds about 4 batches + 2 x 8 frames (~0.5 GB at batch 16).
LANE_FRAMES = 8


@dataclass
class Batch:
    """Up to `batch_size` consecutive output frames on their way through the render lanes."""

    frames: list[np.ndarray]
    rows: list[int]  # indices into `frames` that show the target face
    boxes: list[np.ndarray]
    alphas: list[float]
    landmarks: list[np.ndarray | None] = field(default_factory=list)  # five points per row, None if unknown
    faces: np.ndarray | None = None  # generator inputs of the rows
    mels: np.ndarray | None = None
    preds: np.ndarray | None = None


def render(
    source: VideoSource,
    tick_pts: Sequence[int],
    track: FaceTrack,
    mel: np.ndarray,
    starts: Sequence[int],
    order: Sequence[int],
    generator: Generator,
    blend: str = "feather",
    batch_size: int = 16,
    timer: Timer | None = None,
    mouth: np.ndarray | None = None,
    cache_face: bool = True,
    mask_scale: float = 1.0,
) -> Iterator[np.ndarray]:
    """Yield output frames (BGR uint8) in order; output frame i shows source frame `order[i]`
    with the mouth for mel window `starts[i]`, mixed in with weight `mouth[i]` times the track's
    fade (`mouth` from silence gating; None: 1 everywhere). A frame whose weight is 0 keeps its
    own mouth and costs no generator time. When every output frame shows the same source frame
    (a photo, `--static`) its face is cropped and encoded once (`cache_face`): only the audio
    encoder and the decoder run per frame, with the same result. The feather blend's mask follows
    the track's landmarks where it has them (`lipdub.blend.paste_feather`), grown or shrunk by
    `mask_scale`.

    Four lanes, each on its own thread with a small queue to the next, so no stage waits while
    work is there for it: decode, crop (generator inputs of a batch), generate, blend. The
    consumer (the encoder) is a fifth. Only the frames that get a mouth are copied before it is
    pasted (the decoder may hand out one array for repeated ticks).
    """
    timer = timer or Timer()
    frames = prefetch(timed(source.frames_at(tick_pts, order), timer, "decode"), size=LANE_FRAMES)
    one_face = cache_face and len(tick_pts) == 1
    skips: list = []  # the encoded face, when there is one face for every frame
    def batches() -> Iterator[Batch]:
        for start in range(0, len(starts), batch_size):
            stop = min(len(starts), start + batch_size)
            batch = Batch([], [], [], [])
            for k in range(stop - start):
                frame, j = next(frames), order[start + k]
                alpha = float(track.alpha[j]) * (1.0 if mouth is None else float(mouth[start + k]))
                if track.valid[j] and alpha > 0:
                    frame = frame.copy()
                    batch.rows.append(k)
                    batch.boxes.append(track.boxes[j])
                    batch.alphas.append(alpha)
                    marks = None if track.landmarks is None else track.landmarks[j]
                    batch.landmarks.append(marks if marks is not None and np.isfinite(marks).all() else None)
                batch.frames.append(frame)
            if batch.rows:
                with timer("crop"):
                    rows = batch.rows[:1] if one_face else batch.rows
                    batch.faces = generator_inputs([batch.frames[k] for k in rows], batch.boxes, generator.face_size)
                    batch.mels = mel_windows(mel, [starts[start + k] for k in batch.rows])
            yield batch

    def generated(items: Iterator[Batch]) -> Iterator[Batch]:
        for batch in items:
            if batch.rows:
                with timer("generate"):
                    if one_face and not skips:
                        skips.extend(generator.encode(batch.faces))
                    batch.preds = generator(batch.faces, batch.mels, skips or None)
            yield batch

    def blended(items: Iterator[Batch]) -> Iterator[np.ndarray]:
        for batch in items:
            if batch.rows:
                with timer("blend"):
                    for k, box, pred, alpha, marks in zip(batch.rows, batch.boxes, batch.preds, batch.alphas,
                                                          batch.landmarks):
                        if blend == "box":
                            paste_box(batch.frames[k], box, pred, alpha)
                        else:
                            paste_feather(batch.frames[k], box, pred, alpha, marks, mask_scale)
            yield from batch.frames

    # hand-offs between the batch lanes: each batch holds up to batch_size whole frames
    lanes = prefetch(blended(prefetch(generated(prefetch(batches(), size=0)), size=0)), size=LANE_FRAMES)
    try:
        yield from lanes
    finally:
        lanes.close()  # stops every lane, each closing the one before it


def target_track(source: VideoSource, opts: SyncOptions, device: torch.device, timer: Timer) -> tuple[list[int], FaceTrack]:
    """Output clock ticks of the face video and the target face on each of them."""
    width, height = source.info.width, source.info.height
    if opts.box is not None:
        if source.info.is_image or opts.static:
            tick_pts = [0]
        else:
            with timer("decode"):
                tick_pts = [pts for pts, _ in source.clock()]
        return tick_pts, fixed_track(opts.box, len(tick_pts), width, height)
    detector = load_detector(opts.detector, device, opts.detector_weights, batch_size=opts.det_batch_size or None,
                             precision=opts.precision)
    stride = 1 if opts.static else (opts.det_stride or default_stride(source.info.fps))
    tick_pts, track = track_video(source, detector, stride=stride, pads=tuple(opts.pads), smooth=opts.smooth,
                                  face_index=opts.face_index, timer=timer, progress=opts.progress,
                                  callback=opts.progress_callback)
    if not track.valid.any():
        what = f"face #{opts.face_index}" if opts.face_index is not None else "face"
        where = "the first frame of " if opts.static else ""
        raise LipdubError(f"no {what} found anywhere in {where}{source.path}")
    return tick_pts, track


def landmarks_inside(source: VideoSource, track: FaceTrack, opts: SyncOptions, device: torch.device,
                     timer: Timer) -> np.ndarray:
    """Five-point landmarks for a track that has none (`--box`, S3FD), from a CenterFace pass.

    Only landmarks whose centre lies inside the track's box on that frame are kept, so a
    different face in the picture is never restored in place of the driven one.
    """
    head = VideoSource(source.path, fps=source.info.fps, transform=source.transform, max_frames=len(track.valid))
    _, marked = track_video(head, load_detector("centerface", device), stride=default_stride(source.info.fps),
                            smooth=opts.smooth, face_index=opts.face_index, timer=timer)
    marks = marked.landmarks
    out = np.full((len(track.valid), 5, 2), np.nan, dtype=np.float32)
    n = min(len(out), len(marks))
    centre = marks[:n].mean(axis=1)  # NaN where there is no face: the comparisons below are then False
    box = track.boxes[:n]
    inside = (box[:, 0] <= centre[:, 0]) & (centre[:, 0] < box[:, 2]) & (box[:, 1] <= centre[:, 1]) & (centre[:, 1] < box[:, 3])
    out[:n][inside] = marks[:n][inside]
    return out


def restored(frames: Iterator[np.ndarray], source: VideoSource, track: FaceTrack, order: Sequence[int],
             mouth: np.ndarray | None, opts: SyncOptions, device: torch.device, timer: Timer) -> Iterator[np.ndarray]:
    """GFPGAN on the lip-synced frames, aligned with the track's smoothed landmarks; a mouth that
    rests in a pause is the input's own, so restoration rests with it (region mouth)."""
    landmarks_of = track.landmarks
    if landmarks_of is None or not np.isfinite(landmarks_of[track.valid]).any():
        landmarks_of = landmarks_inside(source, track, opts, device, timer)
    with timer("load"):
        stage = RestoreStage(opts.restore_checkpoint, device=device, region=opts.restore_region,
                             weight=opts.restore_weight, upscale=opts.upscale, skip_sha256=opts.skip_sha256,
                             progress=opts.progress, precision=opts.precision)
    landmarks = (landmarks_of[j] if track.valid[j] else None for j in order)
    rest = mouth if mouth is not None and opts.restore_region == "mouth" else np.ones(len(order), np.float32)
    out = stage.process(frames, landmarks, weights=(float(track.alpha[j]) * float(w) for j, w in zip(order, rest)))
    while True:
        with timer("restore"):
            frame = next(out, None)
        if frame is None:
            return
        yield frame


def _generator(model: ModelSource, opts: SyncOptions, device: torch.device) -> Generator:
    """The generator a job runs: a given network, one from a given loader, or the checkpoint's.
    Only a network loaded here is handed over to be adapted in place for the precision."""
    if model is None:
        return Generator(load_generator(opts.checkpoint, device, opts.skip_sha256, opts.progress), opts.precision,
                         copy_model=False)
    if not isinstance(model, torch.nn.Module):
        model = model(opts.checkpoint, device)
    return Generator(model, opts.precision)


def sync(face: str | Path, audio: str | Path, output: str | Path, *, options: SyncOptions | None = None,
         model: ModelSource = None, **kwargs) -> SyncResult:
    """Make the person in `face` (video or image) speak `audio`; write an H.264/AAC mp4 to `output`.

    Options are the fields of `lipdub.options.SyncOptions`, as keywords or as `options=`.
    `model` is a loaded Wav2Lip generator to use instead of loading `checkpoint`, or a loader
    called as `model(checkpoint, device)` (a worker that keeps its network between jobs).
    Raises LipdubError for anything the user can fix; on any failure no output file is left behind.
    """
    if options is None:
        opts = SyncOptions.build(**kwargs)
    else:
        opts = (dataclasses.replace(options, **kwargs) if kwargs else options).validate()
    timer = Timer()
    started = time.perf_counter()
    face_path, audio_path = check_readable(face), check_readable(audio)
    output = check_writable(output)
    report = check_writable(opts.report) if opts.report else None

    transform = Transform(opts.resize_factor, opts.rotate, tuple(opts.crop))
    source = VideoSource(face_path, fps=opts.fps if is_image(face_path) else None, transform=transform)
    fps = float(source.info.fps)
    # A video's own audio stays where it was against the picture, even when the streams start
    # at different times; another file's audio starts with the video.
    same_file = not source.info.is_image and os.path.samefile(face_path, audio_path)
    audio_start = video_start_in_audio(face_path) if same_file else 0.0
    with timer("audio"):
        wav = load_audio(audio_path, start=audio_start)
        if not np.any(wav):
            raise LipdubError(f"{audio_path} is silent (all samples are zero)")
        mel, starts = audio_mod.cover_audio(wav, audio_mod.melspectrogram(wav), fps)
    mouth = speech = None
    if opts.silence == "keep":
        with timer("speech"):
            mouth, speech = silence_weights(wav, fps, len(starts))
    del wav

    device = pick_device(opts.device)
    with timer("load"):
        generator = _generator(model, opts, device)
    tick_pts, track = target_track(source, opts, device, timer)
    if opts.static:
        tick_pts = tick_pts[:1]
    order = list(source_order(len(starts), len(tick_pts), opts.length, opts.static))

    frames = render(source, tick_pts, track, mel, starts, order, generator, opts.blend, opts.batch_size, timer,
                    mouth, mask_scale=opts.mask_scale)
    if opts.restore:
        frames = prefetch(restored(frames, source, track, order, mouth, opts, device, timer), size=LANE_FRAMES)
    width, height = source.info.width * opts.upscale, source.info.height * opts.upscale
    progress = bar(len(order), "lip-sync", opts.progress)
    try:
        with VideoWriter(output, width, height, source.info.fps, audio_path=audio_path,
                         audio_start=audio_start, crf=opts.crf, preset=opts.preset) as writer:
            for done, frame in enumerate(frames, 1):
                with timer("encode"):
                    writer.write(frame)
                progress.update(1)
                if opts.progress_callback is not None:
                    opts.progress_callback("render", done, len(order))
    finally:
        progress.close()
    shown = int(track.valid[order].sum())
    result = SyncResult(output, len(order), fps, width, height, shown, dict(timer.seconds),
                        None if speech is None else speech.tolist(), face_size=generator.face_size,
                        precision=generator.precision)
    if opts.auto_offset:
        syncnet = weights.cache_path("syncnet_v2")
        if not syncnet.is_file():
            output.unlink(missing_ok=True)
            raise LipdubError("--auto-offset needs the syncnet_v2 weights: lipdub weights download syncnet_v2")
        with timer("offset"):
            result.audio_shift = fix_offset(output, output, checkpoint=str(syncnet), detector=opts.detector,
                                            device=str(device), progress=opts.progress)["audio_shift"]
    result.timings = dict(timer.seconds, total=time.perf_counter() - started)
    if report is not None:
        write_report(result, report, opts, device)
    return result


def write_report(result: SyncResult, path: Path, opts: SyncOptions, device: torch.device) -> None:
    """`--report`: the result, face coverage, stage timings and, when SyncNet weights are cached, LSE metrics."""
    data = result.as_dict()
    data["frames_without_face"] = result.n_frames - result.frames_with_face
    data["coverage"] = result.frames_with_face / max(1, result.n_frames)
    data["frames_per_second"] = result.n_frames / max(1e-9, result.timings.get("total", 0.0))
    data["silence"] = opts.silence
    if result.speech is not None:  # the per-frame decision of silence gating: 1 speech, 0 resting
        data["speech_frames"] = int(sum(result.speech))
        data["speech"] = [int(s) for s in result.speech]
    syncnet = weights.cache_path("syncnet_v2")
    if not syncnet.is_file():
        data["sync"] = None
        data["sync_note"] = "syncnet_v2 weights not cached (lipdub weights download syncnet_v2)"
    else:
        data["sync"] = evaluate(result.output, checkpoint=str(syncnet), detector=opts.detector, device=str(device),
                                progress=opts.progress)
    write_atomic(path, json.dumps(data, indent=2, default=float))
