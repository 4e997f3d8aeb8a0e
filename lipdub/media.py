"""Reading and writing media through PyAV (no ffmpeg binary needed).

Video is read on an *output clock*: tick i is at t0 + i/fps and shows the input frame whose
timestamp is the latest one not after the tick (within half a tick). A constant-rate input maps
one to one; a variable-rate input (dropped or repeated frames) is resampled by its timestamps,
so the output never drifts from its audio. Everything streams: frames are decoded on a worker
thread with a small queue and never collected into a list.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import av
import cv2
import numpy as np

from .errors import LipdubError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
AAC_RATES = {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000}

# Silence PyAV/FFmpeg's own logging; errors reach the user through LipdubError instead.
# `None` installs PyAV's no-op callback. Any numeric level installs a callback that takes the
# GIL for every AV_LOG_ERROR message whatever the level, and a decoder thread logging while
# the main thread holds the GIL closing that decoder (a generator abandoned mid-stream, as on
# every seek in `frames_at`) deadlocks the process (PyAV issues #751, #1133).
av.logging.set_level(None)


def check_readable(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise LipdubError(f"file not found: {path}")
    if not path.is_file():
        raise LipdubError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise LipdubError(f"file is not readable: {path}")
    if path.stat().st_size == 0:
        raise LipdubError(f"file is empty: {path}")
    return path


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise LipdubError(f"cannot read {path}: not a recognised media file ({exc.__class__.__name__})") from None


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _decodable(stream, path: str | os.PathLike, what: str):
    """`stream`, when FFmpeg has a decoder for its codec (PyAV gives a stream without one no
    codec context, and its size, rate and channels are then missing)."""
    if stream.codec_context is None:
        raise LipdubError(f"cannot decode the {what} of {path}: no decoder for its codec (unsupported or corrupt)")
    return stream


def has_audio(path: str | os.PathLike) -> bool:
    """Whether a media file has an audio stream (False for anything unreadable)."""
    try:
        with _open(Path(path)) as container:
            return bool(container.streams.audio)
    except LipdubError:
        return False


# ----------------------------------------------------------------------------------------- audio


def video_start_in_audio(path: str | os.PathLike) -> float:
    """Seconds from the first audio sample to the first video frame of one file (0 without both).

    Containers often start the streams at different times (v5: audio 0.85 s before the
    picture). When a file's own audio drives the output, cutting (or padding) the audio by this
    amount keeps the picture where it was against the sound. An offset of more than MAX_HOLD_S
    is damaged timing, not a start (a header claiming 1e5 s had the caller pad 6 GB of
    silence), and counts as 0.
    """
    with _open(check_readable(path)) as container:
        if not container.streams.video or not container.streams.audio:
            return 0.0
        starts = []
        for stream in (container.streams.video[0], container.streams.audio[0]):
            if stream.start_time is None or stream.time_base is None:
                return 0.0
            starts.append(float(stream.start_time * stream.time_base))
    offset = starts[0] - starts[1]
    return offset if abs(offset) <= MAX_HOLD_S else 0.0


def _shift(samples: np.ndarray, count: int) -> np.ndarray:
    """Drop `count` leading samples (count > 0) or prepend -count zeros (count < 0), on the last axis."""
    if count > 0:
        return samples[..., count:]
    if count < 0:
        pad = [(0, 0)] * (samples.ndim - 1) + [(-count, 0)]
        return np.pad(samples, pad)
    return samples


# Float audio (float PCM, or what a damaged AAC/MP3/Opus stream decodes to) can hold any value.
# Full scale is 1.0; samples are clipped at 48 dB above it, which changes neither what a player
# plays (it clips at 1.0) nor the mel (saturated far below), and keeps FFmpeg's AAC encoder
# working: it refuses NaN and spins for minutes on samples around 1e5.
MAX_SAMPLE = 256.0


def _tamed(planes: np.ndarray) -> np.ndarray | None:
    """`planes` with NaN as silence and samples clipped to +-MAX_SAMPLE; None when already so."""
    if np.isfinite(planes).all() and (planes.size == 0 or np.abs(planes).max() <= MAX_SAMPLE):
        return None
    return np.clip(np.nan_to_num(planes, nan=0.0), -MAX_SAMPLE, MAX_SAMPLE).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, start: float = 0.0,
               pcm16: bool = False) -> np.ndarray:
    """The first audio stream as mono samples at `sample_rate`.

    `start` (seconds, may be negative) is where in the stream the result begins: the first
    `start` seconds are dropped, or -`start` seconds of silence are prepended.

    By default the result is float32 with the channels averaged (as librosa's `to_mono` in the
    original), not FFmpeg's downmix, which sums stereo at 1/sqrt(2) each and so comes out 3 dB
    louder than the mean. `pcm16=True` gives instead exactly what `ffmpeg -ac 1 -ar RATE -acodec
    pcm_s16le` writes (FFmpeg's downmix, int16), the input syncnet_python's metric is defined on.

    Audio is small next to video (a minute at 16 kHz is 4 MB), so it is decoded whole.
    """
    path = check_readable(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise LipdubError(f"{path} has no audio stream")
        stream = _decodable(container.streams.audio[0], path, "audio")
        if pcm16:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        else:  # planar float, input channel layout kept: only the rate is converted
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        parts: list[np.ndarray] = []

        def mono(out: av.AudioFrame) -> np.ndarray:
            planes = out.to_ndarray()  # (channels, samples); packed s16 mono is (1, samples)
            return planes.reshape(-1) if pcm16 or planes.shape[0] == 1 else planes.mean(axis=0, dtype=np.float32)

        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(mono(out))
            for out in resampler.resample(None):
                parts.append(mono(out))
        except av.FFmpegError as exc:
            raise LipdubError(f"cannot decode the audio of {path}: {exc}") from None
    if not parts or not sum(len(p) for p in parts):
        raise LipdubError(f"{path} has an audio stream with no samples")
    samples = np.concatenate(parts).astype(np.int16 if pcm16 else np.float32, copy=False)
    if not pcm16:
        if not np.isfinite(samples).all():
            raise LipdubError(f"{path} has audio samples that are not numbers (NaN or infinite): damaged audio data")
        np.clip(samples, -MAX_SAMPLE, MAX_SAMPLE, out=samples)
    return _shift(samples, round(start * sample_rate))


# ----------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class Transform:
    """The original inference's frame edits, applied right after decoding, in its order."""

    resize_factor: int = 1
    rotate: bool = False
    crop: tuple[int, int, int, int] = (0, -1, 0, -1)  # top, bottom, left, right; -1 = to the edge

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.resize_factor > 1:
            h, w = frame.shape[:2]
            frame = cv2.resize(frame, (w // self.resize_factor, h // self.resize_factor))
        if self.rotate:
            frame = cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
        top, bottom, left, right = self.crop
        if (top, bottom, left, right) != (0, -1, 0, -1):
            h, w = frame.shape[:2]
            frame = frame[top : h if bottom == -1 else bottom, left : w if right == -1 else right]
        return np.ascontiguousarray(frame)


@dataclass
class VideoInfo:
    width: int  # after rotation and transform
    height: int
    fps: Fraction
    is_image: bool
    n_frames_estimate: int
    rotation: int = 0


def _apply_rotation(image: np.ndarray, rotation: int) -> np.ndarray:
    """Honour the display matrix: `rotation` degrees counter-clockwise, as players show it."""
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, k)) if k else image


def _output_fps(stream: av.video.stream.VideoStream) -> Fraction:
    """The clock rate: the nominal rate (r_frame_rate) unless it is absurd, else the average."""
    for rate in (stream.guessed_rate, stream.average_rate, stream.base_rate):
        if rate and 1 <= float(rate) <= 120:
            return Fraction(rate).limit_denominator(1001)
    return Fraction(25)


MAX_SIDE = 8192  # pixels on a side of any frame lipdub decodes; larger files are refused unread


def check_frame_size(width: int, height: int, path: str | os.PathLike) -> None:
    """Refuse a frame size before anything is decoded into memory (a 30000x30000 PNG header
    would otherwise make the decoder allocate 2.7 GB)."""
    if width > MAX_SIDE or height > MAX_SIDE:
        raise LipdubError(f"{path} is {width}x{height} pixels; frames of up to {MAX_SIDE} pixels on a side "
                          "are supported")
    if width <= 0 or height <= 0:
        raise LipdubError(f"{path} has no picture size in its header (not a readable image or video)")


def probe_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the first video stream as its header states it, without decoding.

    FFmpeg leaves the size at 0 for an image header it refuses (e.g. a PNG of 30000x30000), so a
    PNG's size is read from its IHDR chunk, to name the size in the message."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    with _open(path) as container:
        if not container.streams.video:
            raise LipdubError(f"{path} has no picture")
        context = _decodable(container.streams.video[0], path, "picture").codec_context
        return int(context.width or 0), int(context.height or 0)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 on /dev/null for the block: OpenCV, libpng, libjpeg and libtiff print
    their own complaints about a damaged image there (a cut-off PNG: "libpng error: ..."), next
    to the one line lipdub reports. Only around a decode call, which takes milliseconds."""
    try:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stderr to keep quiet
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A still image as BGR uint8, its size checked from the header before it is decoded."""
    path = check_readable(path)
    check_frame_size(*probe_size(path), path)
    with _quiet_stderr():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:  # formats OpenCV lacks: let FFmpeg try
        with _open(path) as container:
            if not container.streams.video:
                raise LipdubError(f"cannot read image {path}")
            try:
                image = next(container.decode(video=0)).to_ndarray(format="bgr24")
            except (av.FFmpegError, StopIteration):
                raise LipdubError(f"cannot decode image {path}") from None
    return image


# Timestamps that jump by more than this between two frames (either way) are a discontinuity
# (a damaged or concatenated stream), not a frame to hold: the clock goes on one tick after the
# frame before, as FFmpeg treats jumps in streams that may be discontinuous. A 1.4 KB file with a
# 4.6-day jump would otherwise give 10 million ticks (hours of work for `lipdub run` or
# `restore`); the audio, read as continuous samples, has no gap there either. The same bound
# applies to the offset between a file's video and audio starts (`video_start_in_audio`).
MAX_HOLD_S = 60


class VideoSource:
    """A face input (video or still image) read as BGR uint8 frames on an output clock.

    `fps`: the clock's rate. For a video, None keeps its own rate (`_output_fps`) and another
    rate re-times it by the timestamps (what `lipdub eval` does to reach 25 fps); for a still
    image it is the rate of the frames made from it (default 25). `max_frames`: the clock
    stops after that many ticks (a preview, or as much video as the audio needs).
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction | None = None,
                 transform: Transform = Transform(), max_frames: int | None = None):
        self.path = check_readable(path)
        self.transform = transform
        self.max_frames = max_frames
        self._image: np.ndarray | None = None
        if is_image(self.path):
            self._image = transform(read_image(self.path))
            h, w = self._image.shape[:2]
            self.info = VideoInfo(w, h, Fraction(fps or 25).limit_denominator(1001), True, 1)
            return
        with _open(self.path) as container:
            if not container.streams.video:
                raise LipdubError(f"{self.path} has no video stream")
            stream = _decodable(container.streams.video[0], self.path, "video")
            check_frame_size(int(stream.codec_context.width or 0), int(stream.codec_context.height or 0), self.path)
            try:
                first = next(container.decode(stream))
            except (av.FFmpegError, StopIteration):
                raise LipdubError(f"cannot decode the video of {self.path} (unsupported or corrupt codec data)") from None
            check_frame_size(first.width, first.height, self.path)  # the header may have said otherwise
            picture = _apply_rotation(first.to_ndarray(format="bgr24"), first.rotation)
            self._picture_size = picture.shape[:2]  # every frame decoded later is brought to it
            frame = transform(picture)
            rate = Fraction(fps).limit_denominator(1001) if fps else _output_fps(stream)
            duration = float(container.duration / 1e6) if container.duration else 0.0
            # Ticks on the output clock: the stream's own duration times the clock rate. The
            # stored frame count is only right for constant-rate input (v1: 135 frames, 183 ticks).
            if stream.duration and stream.time_base:
                estimate = int(round(float(stream.duration * stream.time_base) * float(rate)))
            elif fps is None and stream.frames:
                estimate = stream.frames
            else:
                estimate = int(round(duration * float(rate)))
            estimate = max(1, min(estimate, max_frames) if max_frames else estimate)
            self.info = VideoInfo(frame.shape[1], frame.shape[0], rate, False, estimate, first.rotation)

    def _picture(self, frame: av.VideoFrame) -> np.ndarray:
        """A decoded frame as BGR at the first frame's size. A stream whose picture size changes
        (a new sequence header mid-stream, as in recordings of adaptive streams) is scaled back
        to it, as FFmpeg does: every consumer takes the size from `info`."""
        check_frame_size(frame.width, frame.height, self.path)
        image = _apply_rotation(frame.to_ndarray(format="bgr24"), frame.rotation)
        height, width = self._picture_size
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return image

    # Raw decode: (pts, time in seconds as an exact fraction, frame) in presentation order.
    def _raw(self, seek_pts: int | None = None) -> Iterator[tuple[int, Fraction, np.ndarray]]:
        with _open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if seek_pts is not None:
                container.seek(seek_pts, stream=stream, backward=True)
            time_base = Fraction(stream.time_base or Fraction(1, 90000))
            counter = 0
            try:
                for frame in container.decode(stream):
                    pts = frame.pts if frame.pts is not None else counter
                    time = pts * time_base if frame.pts is not None else counter / self.info.fps
                    counter += 1
                    yield pts, time, self._picture(frame)
            except av.FFmpegError as exc:
                raise LipdubError(f"error while decoding {self.path}: {exc}") from None

    def clock(self) -> Iterator[tuple[int, np.ndarray]]:
        """Frames on the output clock, with the pts of the input frame each tick shows.

        Tick i (time t0 + i/fps, t0 the first frame's time) shows the latest frame whose time is
        before the middle of the tick, t0 + (i + 1/2)/fps; the clock runs while the tick time is
        before the last frame's time plus half a tick. Times are exact fractions, so the rule is
        the same on every machine; a constant-rate input at its own rate maps one to one. A jump
        of the timestamps by more than MAX_HOLD_S is taken out (the next frame one tick later).
        """
        limit = self.max_frames
        if self._image is not None:
            yield 0, self._image
            return
        tick = 1 / Fraction(self.info.fps)
        t0: Fraction | None = None
        i = 0
        prev: tuple[int, np.ndarray] | None = None
        last_time = Fraction(0)
        offset = Fraction(0)  # the timestamp jumps taken out so far (see MAX_HOLD_S)
        for pts, time, frame in self._raw():
            time -= offset
            if t0 is None:
                t0 = time
            elif abs(time - last_time) > MAX_HOLD_S:  # a discontinuity: go on one tick later
                offset += time - last_time - tick
                time = last_time + tick
            while prev is not None and time >= t0 + (i + Fraction(1, 2)) * tick:
                yield prev
                i += 1
                if limit is not None and i >= limit:
                    return
            prev = (pts, self.transform(frame))
            last_time = time
        if prev is None:
            raise LipdubError(f"{self.path} has no decodable video frames")
        while t0 + i * tick < last_time + tick / 2 or i == 0:
            yield prev
            i += 1
            if limit is not None and i >= limit:
                return

    def frames(self) -> Iterator[np.ndarray]:
        """The frames of `clock()` without their pts."""
        return (frame for _, frame in self.clock())

    def frames_at(self, tick_pts: Sequence[int], order: Iterable[int], block: int = 16) -> Iterator[np.ndarray]:
        """Frames for an arbitrary sequence of tick indices (forward, repeated or backward).

        Forward runs continue the sequential decoder; a jump (ping-pong turning back, a loop
        restart) seeks and decodes one bounded block into a small cache, so memory stays at
        `block` frames whatever the order.
        """
        if self._image is not None:
            for _ in order:
                yield self._image
            return
        cache: dict[int, np.ndarray] = {}
        decoder: Iterator[tuple[int, float, np.ndarray]] | None = None
        next_tick = 0  # tick the sequential decoder delivers next
        pending: tuple[int, float, np.ndarray] | None = None
        last_requested = -1
        n = len(tick_pts)

        def fill(start: int, stop: int) -> None:
            """Decode ticks [start, stop) into the cache and leave the decoder after them."""
            nonlocal decoder, next_tick, pending
            if decoder is None or start != next_tick:
                decoder = self._raw(seek_pts=None if start == 0 else tick_pts[start])
                pending = None
            cache.clear()
            for j in range(start, stop):
                want = tick_pts[j]
                if j > 0 and tick_pts[j - 1] == want and (j - 1) in cache:
                    cache[j] = cache[j - 1]
                    continue
                while True:
                    if pending is None:
                        pending = next(decoder, None)
                        if pending is None:
                            raise LipdubError(f"{self.path}: frame at pts {want} vanished on re-reading")
                    if pending[0] >= want:
                        break
                    pending = None
                cache[j] = self.transform(pending[2])
            next_tick = stop

        for j in order:
            if j not in cache:
                if j < last_requested:  # moving backwards: take the block that ends at j
                    fill(max(0, j - block + 1), j + 1)
                else:
                    fill(j, min(n, j + block))
            last_requested = j
            yield cache[j]


def shift_audio(path: str | os.PathLike, output: str | os.PathLike, seconds: float) -> float:
    """Write `output` (its container from the suffix, e.g. .mp4; may be `path` itself): the
    video packets of `path` copied (no re-encode) and its audio `seconds` later against the
    picture (earlier when negative), re-encoded to AAC with silence added or audio dropped at the
    start, so the shift is exact to a sample whatever the codec's frame size and priming.
    Returns the shift applied."""
    path = check_readable(path)
    with atomic_output(check_writable(output)) as temp:
        try:
            target = av.open(str(temp), "w")
        except (av.FFmpegError, ValueError) as exc:
            raise LipdubError(f"cannot write {output}: {exc}") from None
        with _open(path) as source, target:
            if not source.streams.video or not source.streams.audio:
                raise LipdubError(f"{path} needs a video and an audio stream to move one against the other")
            video_in = source.streams.video[0]
            video_out = target.add_stream_from_template(video_in)
            zero = video_in.start_time or 0  # the picture starts at time 0 in the output
            start = video_start_in_audio(path)  # where in the audio the picture starts now
            audio = AudioTrack(target, path, start - seconds)
            try:
                for packet in source.demux(video_in):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.dts -= zero
                    packet.pts = None if packet.pts is None else packet.pts - zero
                    audio.mux_until(float(packet.dts * packet.time_base))
                    packet.stream = video_out
                    target.mux(packet)
                audio.mux_until(float("inf"))
            except av.FFmpegError as exc:
                raise LipdubError(f"cannot remux {path}: {exc}") from None
            finally:
                audio.close()
    return start - audio.skip / audio.stream.rate


def prefetch(iterable: Iterable, size: int = 4) -> Iterator:
    """Run an iterator on a worker thread with a bounded queue, so its work overlaps the consumer's.

    Chained, these are the lanes of a job (decode, crop, generate, blend each in its own thread,
    `size` items between two lanes at most). An exception in the worker is raised in the
    consumer; when the consumer stops early (or fails) the worker stops at its next item and the
    upstream iterator is closed in the worker's own thread, so nothing is left running.

    ``size=0`` is a hand-off: the worker prepares the next item while the consumer works on the
    current one, then waits until the consumer takes it. Two items are alive at that boundary
    instead of ``size + 2``, which is what large items (batches of 1080p frames) need.
    """
    handoff = size == 0
    q: queue.Queue = queue.Queue(maxsize=max(1, size))
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        else:
            return False
        if handoff:  # wait until the consumer has taken it
            with q.all_tasks_done:
                while q.unfinished_tasks and not stop.is_set():
                    q.all_tasks_done.wait(0.1)
        return not stop.is_set()

    def work() -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # surfaced in the consumer
            put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True, name="lipdub-lane")
    thread.start()
    try:
        while True:
            item = q.get()
            q.task_done()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def timed(iterable: Iterable, timer, stage: str) -> Iterator:
    """The items of `iterable`, the time spent producing each one added to `timer` under `stage`."""
    iterator = iter(iterable)
    try:
        while True:
            with timer(stage):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


_END = object()


# ---------------------------------------------------------------------------------------- writer


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path next to `path` to write to; renamed onto `path` when the block
    ends normally and deleted when it raises, so no reader ever sees a half-written file.

    The temporary name keeps the suffix (writers that pick a format from it still work) and
    carries the process id (two processes writing the same output do not collide).
    """
    path = Path(path)
    temp = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    try:
        yield temp
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    try:
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise LipdubError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through `atomic_output`."""
    with atomic_output(path) as temp:
        try:
            if isinstance(data, str):
                temp.write_text(data, encoding="utf-8")
            else:
                temp.write_bytes(data)
        except OSError as exc:
            raise LipdubError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_writable(path: str | os.PathLike) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LipdubError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise LipdubError(f"output folder is not writable: {parent}")
    if path.is_dir():
        raise LipdubError(f"output path is a folder: {path}")
    return path


def make_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` as a writable folder, created with its parents if missing; a one-line LipdubError
    naming it as `what` otherwise (a job folder, the service's data folder)."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LipdubError(f"cannot create the {what} {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise LipdubError(f"the {what} {folder} is not writable")
    return folder


class AudioTrack:
    """The AAC audio of an output file: the first audio stream of `path` from `start` seconds on
    (negative: that much silence first), re-encoded and muxed into `container` as the picture
    advances (`mux_until`), so it streams. Its timestamps count from the first sample: the audio
    starts at output time 0."""

    def __init__(self, container: av.container.OutputContainer, path: str | os.PathLike, start: float = 0.0):
        self.path = Path(path)
        self.source = _open(self.path)
        try:
            if not self.source.streams.audio:
                raise LipdubError(f"{self.path} has no audio stream")
            in_stream = _decodable(self.source.streams.audio[0], self.path, "audio")
            rate = in_stream.rate if in_stream.rate in AAC_RATES else 48000
            layout = "mono" if in_stream.channels == 1 else "stereo"
            self.stream = container.add_stream("aac", rate=rate, layout=layout)
            self.container = container
            self.skip = round(start * rate)  # > 0: samples to drop; < 0: silence to add
            self._packets = self._encoded(in_stream, rate, layout)
            self._next = next(self._packets, None)
        except BaseException:
            self.source.close()
            raise

    def _encoded(self, in_stream, rate: int, layout: str) -> Iterator[tuple[float, av.Packet]]:
        """(time, packet) in order."""
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        samples = 0
        skip = self.skip

        def encode(frames):
            nonlocal samples, skip
            for out in frames:
                planes = out.to_ndarray()
                edited = _tamed(planes)
                if skip:
                    edited = _shift(planes if edited is None else edited, skip)
                    skip = max(0, skip - out.samples)
                    if edited.shape[-1] == 0:
                        continue
                if edited is not None:
                    out = av.AudioFrame.from_ndarray(np.ascontiguousarray(edited), format="fltp", layout=layout)
                    out.sample_rate = rate
                out.pts, out.time_base = samples, Fraction(1, rate)
                samples += out.samples
                yield from self.stream.encode(out)

        def packets():
            try:
                for frame in self.source.decode(in_stream):
                    frame.pts = None
                    yield from encode(resampler.resample(frame))
            except av.FFmpegError as exc:
                raise LipdubError(f"cannot decode the audio of {self.path}: {exc}") from None
            yield from encode(resampler.resample(None))
            yield from self.stream.encode(None)

        for packet in packets():
            time = float(packet.pts * packet.time_base) if packet.pts is not None else float("inf")
            yield time, packet

    def mux_until(self, time: float) -> None:
        """Mux every audio packet that starts at or before `time` seconds."""
        while self._next is not None and self._next[0] <= time:
            self.container.mux(self._next[1])
            self._next = next(self._packets, None)

    def close(self) -> None:
        self.source.close()


@dataclass
class VideoWriter:
    """An H.264 + AAC mp4 written to a hidden temp file and renamed into place only when complete.

    Audio is re-decoded from `audio_path` and muxed as the video advances, so it streams too.
    Both streams start at time zero. Odd frame sizes are padded by one replicated row/column
    because 4:2:0 H.264 needs even dimensions.
    """

    path: Path
    width: int
    height: int
    fps: Fraction
    audio_path: Path | None = None
    audio_start: float = 0.0  # seconds into the audio that output time 0 shows (see load_audio)
    crf: int = 18
    preset: str = "superfast"  # see options.X264_PRESETS
    _container: av.container.OutputContainer | None = field(default=None, init=False)
    n_frames: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.path = check_writable(self.path)
        # The encoder's time base must be exact: a float rate (25.0, 29.97) becomes a fraction.
        self.fps = Fraction(self.fps).limit_denominator(1001)

    def __enter__(self) -> "VideoWriter":
        self._audio: AudioTrack | None = None
        self._output = atomic_output(self.path)
        self.temp = self._output.__enter__()
        try:
            self._container = av.open(str(self.temp), "w", format="mp4")
        except (av.FFmpegError, OSError) as exc:
            self._output.__exit__(LipdubError, None, None)
            raise LipdubError(f"cannot write {self.path}: {exc}") from None
        try:
            self._video = self._container.add_stream("libx264", rate=self.fps)
            self._video.width = self.width + self.width % 2
            self._video.height = self.height + self.height % 2
            self._video.pix_fmt = "yuv420p"
            # Frames are converted to BT.601 limited-range 4:2:0 by OpenCV (see `write`); say so
            # in the stream, or players assume BT.709 for HD sizes and shift the colours.
            self._video.options = {"crf": str(self.crf), "preset": self.preset,
                                   "x264-params": "colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m:range=tv"}
            self._video.codec_context.time_base = Fraction(1, 1) / self.fps
            if self.audio_path is not None:
                self._audio = AudioTrack(self._container, self.audio_path, self.audio_start)
        except BaseException:
            # __exit__ is not called when __enter__ fails: release everything and leave no file.
            self._discard()
            raise
        return self

    def _discard(self) -> None:
        for closable in (self._container, self._audio):
            if closable is not None:
                try:
                    closable.close()
                except Exception:
                    pass
        self._output.__exit__(LipdubError, None, None)  # deletes the temporary file

    def write(self, frame: np.ndarray) -> None:
        if frame.shape[0] != self._video.height or frame.shape[1] != self._video.width:
            frame = np.pad(frame, ((0, self._video.height - frame.shape[0]), (0, self._video.width - frame.shape[1]), (0, 0)), mode="edge")
        # OpenCV's conversion rounds; FFmpeg's default bgr24 -> yuv420p path truncates and
        # darkens every frame by a few levels (grey 128 came back as (123, 126, 124)).
        yuv = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_BGR2YUV_I420)
        video_frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        video_frame.pts = self.n_frames
        for packet in self._video.encode(video_frame):
            self._container.mux(packet)
        self.n_frames += 1
        if self._audio is not None:
            self._audio.mux_until(self.n_frames / float(self.fps))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for packet in self._video.encode():
                    self._container.mux(packet)
                if self._audio is not None:
                    self._audio.mux_until(float("inf"))
            self._container.close()
            if self._audio is not None:
                self._audio.close()
        except BaseException:
            self._discard()
            raise
        self._output.__exit__(exc_type, exc, tb)  # renamed into place, or deleted after an error
