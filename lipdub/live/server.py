"""`lipdub live`: the web page, the WebRTC endpoint and the speech endpoint of a live avatar.

    lipdub live --avatar AVATAR_DIR --host 127.0.0.1 --port 8010

A *stage* is one `LiveSession` on its own worker thread: audio comes in, 25 fps frames and the
same audio, delayed to match them, go out to its viewers as a WebRTC video and audio track
(aiortc; both tracks in one stream, so the browser plays them in sync). Two kinds of stage:

* `POST /api/offer` with `source: "mic"` or `"file"`: the browser sends an audio track (its
  microphone, or a file the page plays into the connection) and gets its own stage back
  (`--max-sessions`).
* `source: "server"`: the browser watches the shared stage, which speaks what a program sends
  to `POST /api/speech` (a chunked body of s16le PCM, `?rate=` and `?channels=`, e.g. a TTS
  pipeline's output) and rests, looping its idle frames, whenever nothing comes.

`GET /api/stats` reports per stage the frames made, frames per second, the delay from a sound
arriving to the frame whose mouth shows it being ready, and what held it (look-ahead, work).

The generator is shared by every stage (one lock): a 2-core CPU has room for one speaking stage.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import av
import numpy as np
import torch
import uvicorn
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ..audio import SAMPLE_RATE
from ..avatar import FPS, load_avatar
from ..device import cpu_count, pick_device
from ..errors import LipdubError
from ..generate import Generator, load_generator
from .session import (
    LOOKAHEAD_SAMPLES,
    SAMPLES_PER_FRAME,
    WINDOW_CENTRE_SECONDS,
    LiveFrame,
    LiveSession,
    Performer,
)

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("lipdub.live")

VIDEO_CLOCK = 90000
AUDIO_PTIME = 0.02  # 20 ms audio frames out, as WebRTC sends them
AUDIO_CHUNK = int(SAMPLE_RATE * AUDIO_PTIME)  # 320 samples
CENTRE_SAMPLES = int(WINDOW_CENTRE_SECONDS * SAMPLE_RATE)  # 1600: the sound a frame's mouth shows
VIEWER_QUEUE = 2 * FPS  # frames a viewer may lag behind before the oldest are dropped (and counted)
MOUTHS_PER_PUSH = 2  # a stage behind by more frames draws only about this many new mouths per push
SPEECH_BUFFER = 0.5  # seconds of posted speech buffered ahead of the clock (then the upload waits)
PACER_WINDOW = 2.0  # seconds of frame lateness the playout delay follows
PACER_PERCENTILE = 80  # ... its 80th percentile: the rarer, later frames go out as soon as they are ready
UPLINK_PREFETCH = 1  # audio packets aiortc's receiver holds before decoding one (its default: 4)
CONNECT_TIMEOUT = 30.0  # seconds a peer has from the offer to a connection before its session is dropped
TAIL_SECONDS = 2.0  # the shared clock runs on this long after speech, so its last frames are made


@dataclass
class LiveConfig:
    avatar: str
    checkpoint: str = "wav2lip_gan"
    host: str = "127.0.0.1"
    port: int = 8010
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0  # torch threads; 0 = one less than the cores (the rest encodes and serves)
    blend: str = "feather"
    mask_scale: float = 1.0
    silence: bool = True
    max_sessions: int = 1
    skip_sha256: bool = False
    log_level: str = "warning"


# ------------------------------------------------------------------------------------ statistics

class Stats:
    """Per-frame timings of a stage (the last 60 s), summarised as percentiles."""

    def __init__(self) -> None:
        self.records: deque = deque(maxlen=60 * FPS)
        self.frames = 0
        self.speaking = 0
        self.dropped = 0
        self.held = 0
        self.send_late: deque = deque(maxlen=60 * FPS)
        self.started = time.perf_counter()
        self.lock = threading.Lock()

    def add(self, frame: LiveFrame, centre_arrival: float, last_arrival: float) -> None:
        with self.lock:
            self.frames += 1
            self.speaking += frame.mouth > 0
            self.records.append((frame.ready, frame.index, frame.mouth, frame.ready - centre_arrival,
                                 last_arrival - centre_arrival, frame.ready - last_arrival))

    def sent(self, late: float) -> None:
        with self.lock:
            self.send_late.append(late)

    def summary(self) -> dict:
        with self.lock:
            records = list(self.records)
            out = {"frames": self.frames, "speaking_frames": self.speaking, "dropped": self.dropped,
                   "held": self.held,
                   "seconds": round(time.perf_counter() - self.started, 3)}
        if len(records) >= 2:
            recent = [r for r in records if r[0] >= records[-1][0] - 5.0]
            span = recent[-1][0] - recent[0][0]
            out["fps"] = round((len(recent) - 1) / span, 2) if span > 0 else None
        if len(self.send_late):
            late = np.array(self.send_late) * 1000
            out["send_late_ms"] = {p: round(float(np.percentile(late, q)), 1) for p, q in (("p50", 50), ("p90", 90),
                                                                                          ("p99", 99))}
        speaking = np.array([r[3:] for r in records if r[2] > 0]) if records else np.zeros((0, 3))
        for k, name in enumerate(("latency_ms", "lookahead_ms", "work_ms")):
            if len(speaking):
                values = speaking[:, k] * 1000
                out[name] = {p: round(float(np.percentile(values, q)), 1) for p, q in (("p50", 50), ("p90", 90),
                                                                                       ("p99", 99))}
        return out


# ------------------------------------------------------------------------------------- tracks

class Pacer:
    """A viewer's playout clock on the server: frame i leaves at i / 25 + delay (its audio with
    it), never before. Frames are made in bursts (a busy CPU, a push that catches up), and a
    browser answers bursts by growing its jitter buffers, audio and video, and keeps them. Sent
    on a steady clock they need less. The delay follows how late the frames of the last
    PACER_WINDOW seconds became ready against the clock set by the first frame: it
    rises as frames come late (no frame is skipped) and falls back once the burst has left the
    window, so one hiccup does not cost latency for the rest of the session. (On a shared
    2-core machine the 80th percentile gave a third of the latency of the maximum, for a few
    frames sent up to a frame late: benchmarks/bench_live.py.)"""

    def __init__(self, stats: Stats) -> None:
        self.origin: float | None = None  # the first frame's ready time minus its index / 25
        self.recent: deque = deque()  # (ready time, lateness) over the window
        self.stats = stats

    def ready(self, index: int) -> None:
        """Frame `index` has become available now: note how late it is against the clock."""
        now = time.perf_counter()
        if self.origin is None:
            self.origin = now - index / FPS
        self.recent.append((now, now - (self.origin + index / FPS)))
        while self.recent and self.recent[0][0] < now - PACER_WINDOW:
            self.recent.popleft()

    def due(self, index: int, offset: float = 0.0) -> float:
        delay = np.percentile([late for _, late in self.recent], PACER_PERCENTILE) if self.recent else 0.0
        return self.origin + index / FPS + max(0.0, delay) + offset

    async def wait(self, index: int, offset: float = 0.0) -> None:
        if self.origin is None:
            self.ready(index)
        due = self.due(index, offset)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if offset == 0.0:
            self.stats.sent(time.perf_counter() - due)


class VideoOut(MediaStreamTrack):
    """A viewer's video: the stage's frames in order, stamped frame index x 3600 (90 kHz), paced."""

    kind = "video"

    def __init__(self, stats: Stats, pacer: Pacer) -> None:
        super().__init__()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stats, self.pacer = stats, pacer
        self.first: int | None = None

    def put(self, frame: LiveFrame) -> None:
        if self.queue.qsize() >= VIEWER_QUEUE:
            self.queue.get_nowait()
            self.stats.dropped += 1
        self.queue.put_nowait(frame)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.queue.get()
        if self.first is None:
            self.first = frame.index
        await self.pacer.wait(frame.index)
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.image), format="bgr24")
        out.pts = (frame.index - self.first) * (VIDEO_CLOCK // FPS)
        out.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return out


class AudioOut(MediaStreamTrack):
    """A viewer's audio: each frame's own 40 ms of the input, as two 20 ms frames stamped and
    paced on the frame's clock, so it plays with its picture (delayed by exactly the time the
    picture took)."""

    kind = "audio"

    def __init__(self, pacer: Pacer) -> None:
        super().__init__()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pacer = pacer
        self.first: int | None = None

    def put(self, frame: LiveFrame) -> None:
        if self.first is None:
            self.first = frame.index
        chunks = SAMPLES_PER_FRAME // AUDIO_CHUNK
        while self.queue.qsize() >= chunks * VIEWER_QUEUE:
            self.queue.get_nowait()
        pcm = np.clip(np.round(frame.audio * 32767.0), -32768, 32767).astype(np.int16)
        start = (frame.index - self.first) * SAMPLES_PER_FRAME
        for k in range(0, SAMPLES_PER_FRAME, AUDIO_CHUNK):
            self.queue.put_nowait((frame.index, k, start + k, pcm[k: k + AUDIO_CHUNK]))

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        index, k, pts, pcm = await self.queue.get()
        await self.pacer.wait(index, k / SAMPLE_RATE)
        out = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        out.sample_rate = SAMPLE_RATE
        out.pts = pts
        out.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return out


class Viewer:
    def __init__(self, stats: Stats) -> None:
        self.pacer = Pacer(stats)
        self.video = VideoOut(stats, self.pacer)
        self.audio = AudioOut(self.pacer)

    def put(self, frame: LiveFrame) -> None:
        self.pacer.ready(frame.index)
        self.video.put(frame)
        self.audio.put(frame)


# -------------------------------------------------------------------------------------- stage

class Stage:
    """One LiveSession fed with 16 kHz audio and fanned out to its viewers.

    Audio pieces queue up with their arrival time; a task hands everything queued to the
    session on the stage's own thread (a stage that fell behind catches up in one larger push,
    whose frames the session batches), then gives each frame to every viewer. A push of more
    than MOUTHS_PER_PUSH frames draws about that many new mouths and repeats them on the frames
    between (`LiveSession.hold`), so a machine too busy for every mouth costs mouth updates,
    never frames or a growing delay.
    """

    def __init__(self, performer: Performer, name: str, silence: bool = True) -> None:
        self.name = name
        self.session = LiveSession(performer, silence=silence)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"lipdub-live-{name}")
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.viewers: list[Viewer] = []
        self.stats = Stats()
        self.received = 0  # samples
        self._arrivals: deque = deque()  # (end sample, arrival time) of each piece
        self._task: asyncio.Task | None = None
        self.closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def feed(self, pcm: np.ndarray, arrival: float | None = None) -> None:
        if len(pcm) and not self.closed:
            self.inbox.put_nowait((pcm, time.perf_counter() if arrival is None else arrival))

    def add_viewer(self) -> Viewer:
        viewer = Viewer(self.stats)
        self.viewers.append(viewer)
        return viewer

    def remove_viewer(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)

    def _arrival(self, sample: int) -> float:
        for end, when in self._arrivals:
            if sample < end:
                return when
        return self._arrivals[-1][1] if self._arrivals else time.perf_counter()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                pieces = [await self.inbox.get()]
                while not self.inbox.empty():
                    pieces.append(self.inbox.get_nowait())
                for pcm, when in pieces:
                    self.received += len(pcm)
                    self._arrivals.append((self.received, when))
                pcm = np.concatenate([p for p, _ in pieces])
                backlog = (self.received - LOOKAHEAD_SAMPLES) // SAMPLES_PER_FRAME + 1 - self.session.next_frame
                self.session.hold = max(1, backlog // MOUTHS_PER_PUSH)
                frames = await loop.run_in_executor(self.executor, self.session.push, pcm)
                self.stats.held = self.session.held
                for frame in frames:
                    start = frame.index * SAMPLES_PER_FRAME
                    self.stats.add(frame, self._arrival(start + CENTRE_SAMPLES),
                                   self._arrival(start + LOOKAHEAD_SAMPLES - 1))
                    for viewer in list(self.viewers):
                        viewer.put(frame)
                if frames:
                    first_needed = (frames[-1].index + 1) * SAMPLES_PER_FRAME + CENTRE_SAMPLES
                    while len(self._arrivals) > 1 and self._arrivals[0][0] <= first_needed:
                        self._arrivals.popleft()
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug: log it, the connection ends
            log.exception("live stage %s failed", self.name)
            for viewer in self.viewers:
                viewer.video.stop()
                viewer.audio.stop()

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=False)


class Resampler:
    """Any PCM (an aiortc AudioFrame or s16 samples) -> 16 kHz mono float32, with its filter state."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def frame(self, frame: av.AudioFrame) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def s16(self, pcm: np.ndarray, rate: int, channels: int) -> np.ndarray:
        if rate == SAMPLE_RATE and channels == 1:
            return pcm.astype(np.float32) / np.float32(32768.0)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = rate
        return self.frame(frame)


def shorten_uplink_buffer(pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
    """aiortc's audio receiver decodes a packet only once four more have arrived (its jitter
    buffer's prefetch): 80 ms of delay, made for playing audio out smoothly. Here the audio only
    drives mouths, a late or lost packet becomes 20 ms of silence (`pump_track`), and every 20 ms
    held is 20 ms of latency: the buffer is told to release each packet when the next one comes.
    (aiortc has no public setting for it; where the attribute is missing its default stays.)"""
    for receiver in pc.getReceivers():
        if receiver.track is track:
            buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
            if buffer is not None and hasattr(buffer, "_prefetch"):
                buffer._prefetch = UPLINK_PREFETCH


async def pump_track(track: MediaStreamTrack, stage: Stage) -> None:
    """Feed a browser's audio track into a stage. A gap in the track's timestamps (lost
    packets) is filled with silence, so the picture's clock stays the audio's clock."""
    resampler = Resampler()
    expected = None
    try:
        while True:
            frame = await track.recv()
            if expected is not None and frame.pts is not None and frame.pts > expected + frame.sample_rate // 100:
                gap = (frame.pts - expected) * SAMPLE_RATE // frame.sample_rate
                stage.feed(np.zeros(int(gap), np.float32))
            if frame.pts is not None:
                expected = frame.pts + frame.samples
            stage.feed(resampler.frame(frame))
    except MediaStreamError:
        pass


class SharedStage:
    """The stage that speaks what `POST /api/speech` sends and rests in between: a 20 ms clock
    feeds it the posted audio, or silence when there is none."""

    def __init__(self, performer: Performer, silence: bool) -> None:
        self.stage = Stage(performer, "server", silence)
        self.buffer: deque = deque()
        self.buffered = 0
        self.speaker: str | None = None
        self.fed = 0  # samples the clock has fed the stage
        self.awake_until = 0.0  # the clock keeps feeding silence this long after speech
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.stage.start()
        self._task = asyncio.get_running_loop().create_task(self._clock())

    def add(self, pcm: np.ndarray) -> None:
        self.buffer.append(pcm)
        self.buffered += len(pcm)

    def _take(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        k = 0
        while k < n and self.buffer:
            piece = self.buffer[0]
            m = min(n - k, len(piece))
            out[k: k + m] = piece[:m]
            k += m
            if m == len(piece):
                self.buffer.popleft()
            else:
                self.buffer[0] = piece[m:]
        self.buffered -= k
        return out

    async def _clock(self) -> None:
        started = time.perf_counter()
        ticks = 0
        try:
            while True:
                due = started + ticks * AUDIO_PTIME
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:  # the loop stalled for a second: do not replay the whole second
                    started, ticks = time.perf_counter(), 0
                now = time.perf_counter()
                if self.speaker is not None or self.buffered:
                    self.awake_until = now + TAIL_SECONDS
                if self.stage.viewers or now < self.awake_until:  # idle without viewers or speech
                    self.stage.feed(self._take(AUDIO_CHUNK))
                    self.fed += AUDIO_CHUNK
                ticks += 1
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.stage.close()


# ------------------------------------------------------------------------------------------ app

class Offer(BaseModel):
    sdp: str
    type: str
    source: str = "mic"


def load_performer(config: LiveConfig) -> Performer:
    """The avatar and the generator, loaded and warmed up before the server listens."""
    avatar = load_avatar(config.avatar)
    device = pick_device(config.device)
    threads = config.threads or max(1, cpu_count() - 1)
    torch.set_num_threads(threads)
    generator = Generator(load_generator(config.checkpoint, device, config.skip_sha256, progress=True), config.precision,
                          copy_model=False)
    performer = Performer(avatar, generator, config.blend, config.mask_scale)
    performer.warm_up()
    return performer


def create_app(config: LiveConfig, performer: Performer) -> FastAPI:
    peers: dict[str, tuple[RTCPeerConnection, Stage | None, Viewer]] = {}
    stages: dict[str, Stage] = {}
    shared = SharedStage(performer, config.silence)
    avatar = performer.avatar

    async def lifespan(app: FastAPI):
        shared.start()
        yield
        for pc, _, _ in list(peers.values()):
            await pc.close()
        for stage in list(stages.values()):
            await stage.close()
        await shared.close()

    app = FastAPI(title="lipdub live", lifespan=lifespan)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        j = int(np.flatnonzero(avatar.valid)[0])
        x1, y1, x2, y2 = (int(v) for v in avatar.boxes[j])
        return {"width": avatar.width, "height": avatar.height, "frames": avatar.n_frames, "fps": FPS,
                "face_box": [x1, y1, x2, y2], "mouth_box": [x1, (y1 + y2) // 2, x2, y2],
                "precision": performer.generator.precision, "face_size": performer.generator.face_size,
                "threads": torch.get_num_threads(), "silence": config.silence,
                "lookahead_ms": 1000 * LOOKAHEAD_SAMPLES / SAMPLE_RATE,
                "mouth_lookahead_ms": 1000 * (LOOKAHEAD_SAMPLES - CENTRE_SAMPLES) / SAMPLE_RATE,
                "sessions": len(stages), "max_sessions": config.max_sessions}

    @app.get("/api/stats")
    def stats(session: Optional[str] = None) -> dict:
        out = {"server": shared.stage.stats.summary()}
        for key, stage in stages.items():
            if session is None or key == session:
                out[key] = stage.stats.summary()
        return out

    @app.post("/api/offer")
    async def offer(params: Offer) -> JSONResponse:
        if params.source not in ("mic", "file", "server"):
            raise HTTPException(400, "source must be 'mic', 'file' (an audio track the page plays) or 'server'")
        if params.type != "offer":
            raise HTTPException(400, "type must be 'offer'")
        if params.source != "server" and len(stages) >= config.max_sessions:
            raise HTTPException(503, f"busy: {len(stages)} live session(s) running (--max-sessions "
                                     f"{config.max_sessions})")
        key = secrets.token_urlsafe(8)
        pc = RTCPeerConnection()
        stage = None
        if params.source != "server":  # the peer's audio track drives a stage of its own
            stage = Stage(performer, key, config.silence)
            stages[key] = stage
            viewer = stage.add_viewer()
            stage.start()
        else:
            viewer = shared.stage.add_viewer()
        peers[key] = (pc, stage, viewer)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and stage is not None:
                shorten_uplink_buffer(pc, track)
                asyncio.ensure_future(pump_track(track, stage))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await drop(key)

        async def give_up() -> None:  # a peer that never connects (it got the answer, then vanished)
            await asyncio.sleep(CONNECT_TIMEOUT)
            if key in peers and pc.connectionState != "connected":
                await drop(key)

        asyncio.ensure_future(give_up())
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=params.sdp, type=params.type))
            pc.addTrack(viewer.video)
            pc.addTrack(viewer.audio)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises plain ValueErrors for SDP it cannot use
            await drop(key)
            raise HTTPException(400, f"cannot use this offer: {exc}") from None
        return JSONResponse({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": key})

    async def drop(key: str) -> None:
        pc, stage, viewer = peers.pop(key, (None, None, None))
        if viewer is not None:
            shared.stage.remove_viewer(viewer)
            viewer.video.stop()
            viewer.audio.stop()
        if stage is not None:
            stages.pop(key, None)
            await stage.close()
        if pc is not None:
            await pc.close()

    @app.delete("/api/sessions/{key}", status_code=204)
    async def close_session(key: str) -> None:
        if key not in peers:
            raise HTTPException(404, "no such session")
        await drop(key)

    @app.post("/api/speech")
    async def speech(request: Request, rate: int = SAMPLE_RATE, channels: int = 1) -> dict:
        """Speak a stream of s16le PCM (the request body, chunked or not) on the shared stage,
        in real time; answers when the avatar has said all of it."""
        if not 8000 <= rate <= 192000 or channels not in (1, 2):
            raise HTTPException(400, "rate must be 8000..192000 Hz and channels 1 or 2")
        if shared.speaker is not None:
            raise HTTPException(409, "another speech stream is playing")
        shared.speaker = key = secrets.token_urlsafe(6)
        resampler = Resampler()
        carry = b""
        total = 0
        frame_bytes = 2 * channels
        try:
            async for chunk in request.stream():
                data = carry + chunk
                usable = len(data) - len(data) % frame_bytes
                carry = data[usable:]
                if usable:
                    pcm = resampler.s16(np.frombuffer(data[:usable], dtype="<i2"), rate, channels)
                    total += len(pcm)
                    shared.add(pcm)
                while shared.buffered > SPEECH_BUFFER * SAMPLE_RATE:
                    await asyncio.sleep(AUDIO_PTIME)
            while shared.buffered > 0:
                await asyncio.sleep(AUDIO_PTIME)
            end = shared.fed  # the stream sample after this speech
            deadline = time.perf_counter() + TAIL_SECONDS
            while shared.stage.session.next_frame * SAMPLES_PER_FRAME < end and time.perf_counter() < deadline:
                shared.awake_until = max(shared.awake_until, time.perf_counter() + TAIL_SECONDS)
                await asyncio.sleep(AUDIO_PTIME)  # until the frames that show its last sounds are made
        finally:
            if shared.speaker == key:
                shared.speaker = None
        return {"seconds": round(total / SAMPLE_RATE, 3), "frames": int(round(total / SAMPLES_PER_FRAME))}

    return app



def run_server(config: LiveConfig) -> int:
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(message)s")
    if config.max_sessions < 1:
        raise LipdubError("--max-sessions must be at least 1")
    if not (0 < config.port < 65536):
        raise LipdubError(f"--port must be 1..65535, got {config.port}")
    performer = load_performer(config)
    app = create_app(config, performer)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           access_log=False, server_header=False, timeout_graceful_shutdown=3))
    print(f"lipdub live: {config.avatar} ({performer.avatar.width}x{performer.avatar.height}, "
          f"{performer.generator.precision}, {torch.get_num_threads()} threads) on "
          f"http://{config.host}:{config.port}", flush=True)
    server.run()
    return 0 if server.started else 1


__all__ = ["LiveConfig", "create_app", "load_performer", "run_server"]
