"""The live session (PCM in pieces -> frames) and the `lipdub live` server's HTTP and WebRTC API.

The reference for the session's frames is the offline job itself: `lipdub.sync` on the same
audio, with the frames it hands to its encoder captured (the mp4 codec is lossy, so frames are
compared before it). Silence gating is checked against audio built here with known silences.
`LiveProcess` is shared with tests/test_live_browser.py.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import aiortc  # noqa: F401  (the `live` extra: missing, the suite fails rather than skips)
import lipdub.pipeline as pipeline
from lipdub import audio as audio_mod
from lipdub.avatar import load_avatar, prepare_avatar
from lipdub.errors import LipdubError
from lipdub.generate import Generator, load_generator
from lipdub.live import LiveSession, MelStream, Performer
from lipdub.media import load_audio

from .conftest import MEDIA, write_wav

ROOT = Path(__file__).resolve().parents[1]
P2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
A1 = MEDIA / "a1_en_radio_16k_stereo.wav"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The networks on one thread here: on a shared 2-core machine two OpenMP threads that wait
    for each other are many times slower than one (the live server also gives its generator
    one thread of two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def a1() -> np.ndarray:
    return load_audio(A1)


@pytest.fixture(scope="module")
def photo_avatar(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("live") / "p2"
    prepare_avatar(P2, out, progress=False, device="cpu")  # CenterFace, pads 0 10 0 0: what `run` tracks
    return out


@pytest.fixture(scope="module")
def video_avatar(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("live") / "v3"
    prepare_avatar(V3, out, max_seconds=0.8, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def network(wav2lip_checkpoint):
    return load_generator(str(wav2lip_checkpoint), "cpu", progress=False)


@pytest.fixture(scope="module")
def performer(photo_avatar, network) -> Performer:
    return Performer(load_avatar(photo_avatar), Generator(network, "auto"))


def stream(session: LiveSession, wav: np.ndarray, piece: int) -> list:
    frames = []
    for k in range(0, len(wav), piece):
        frames += session.push(wav[k: k + piece])
    return frames + session.flush()


# ---------------------------------------------------------------------------------- spectrogram

@pytest.mark.parametrize("piece", [1, 160, 333, 1600, 7777])
def test_the_streamed_spectrogram_is_the_offline_one(a1, piece):
    """Column for column, whatever the pieces. The float64 values may differ in the last bit
    (BLAS and FFT batch differently); the generator gets float32, which is identical."""
    wav = a1[: 3 * 16000 + 123]
    ref = audio_mod.melspectrogram(wav)
    mel = MelStream()
    parts = [mel.push(wav[k: k + piece]) for k in range(0, len(wav), piece)]
    parts.append(mel.finish())
    got = np.concatenate(parts, axis=1)
    assert got.shape == ref.shape == (80, 1 + len(wav) // 200)
    assert np.array_equal(got.astype(np.float32), ref.astype(np.float32))
    assert np.abs(got - ref).max() < 1e-12


def test_columns_come_as_soon_as_their_audio_is_there(a1):
    """Column c needs samples up to 200 c + 400: the look-ahead the latency budget counts."""
    mel = MelStream()
    assert mel.push(a1[:599]).shape[1] == 1  # column 0 needs 400 samples, column 1 needs 600
    assert mel.push(a1[599:600]).shape[1] == 1
    assert mel.push(a1[600:3799]).shape[1] == 15  # columns 2..16: 16 needs 3600, 17 needs 3800
    assert mel.columns == 17


# --------------------------------------------------------------------- the offline frames, live

@pytest.fixture(scope="module")
def offline_frames(tmp_path_factory, a1, wav2lip_checkpoint):
    """What `lipdub run --silence generate` hands its encoder for p2 and 2.03 s of a1 (an odd
    length: the last window is end-aligned and one frame lies on the zero-padded tail)."""
    folder = tmp_path_factory.mktemp("offline")
    speech = write_wav(folder / "speech.wav", a1[: int(16000 * 2.03)])
    captured = []

    class Capture(pipeline.VideoWriter):
        def write(self, frame):
            captured.append(frame.copy())
            super().write(frame)

    original = pipeline.VideoWriter
    pipeline.VideoWriter = Capture
    try:
        result = pipeline.sync(P2, speech, folder / "offline.mp4", checkpoint=str(wav2lip_checkpoint),
                               silence="generate", progress=False, device="cpu")
    finally:
        pipeline.VideoWriter = original
    assert result.n_frames == len(captured) == 51
    return load_audio(speech), captured, result.precision


@pytest.mark.parametrize("piece_ms", [10, 20, 37, 100])
def test_pieces_of_10_to_100_ms_give_the_frames_of_the_offline_run(offline_frames, performer, piece_ms):
    """Same mel window for each frame, same generator, same blend: the same frames, bit for bit
    at bf16. (At fp32 oneDNN rounds the deepest layers differently for different batch sizes,
    and a live session batches the frames one piece completes: one level of 255 at most.)"""
    wav, expected, precision = offline_frames
    assert performer.generator.precision == precision
    session = LiveSession(performer, silence=False)
    frames = stream(session, wav, 16 * piece_ms)
    assert [f.index for f in frames] == list(range(len(expected)))
    tolerance = 0 if precision == "bf16" else 1
    diffs = [int(np.abs(f.image.astype(int) - e).max()) for f, e in zip(frames, expected)]
    assert max(diffs) <= tolerance, diffs
    # the comparison can tell frames apart: a frame against its neighbour differs
    assert sum(not np.array_equal(a.image, b) for a, b in zip(frames[1:], expected)) >= 45
    # each frame carries its own 40 ms of the input, so audio and picture stay together
    played = np.concatenate([f.audio for f in frames])
    assert np.array_equal(played[: len(wav)], wav) and not played[len(wav):].any()
    assert all(f.mouth == 1.0 for f in frames)


def test_the_cast_once_bf16_network_draws_the_generators_mouths(video_avatar, network):
    """The performer casts a bf16 network's weights once instead of per call under autocast;
    its mouths must be the Generator's, bit for bit, on every face of a video avatar."""
    avatar = load_avatar(video_avatar)
    generator = Generator(network, "bf16")
    performer = Performer(avatar, generator)
    rng = np.random.default_rng(7)
    rows = [0, 5, 19, 5]
    mels = (rng.random((len(rows), 1, 80, 16), dtype=np.float32) * 8 - 4)
    skips = generator.encode(avatar.generator_inputs(rows))
    expected = generator(None, mels, skips)
    assert np.array_equal(performer.mouths(rows, mels), expected)
    assert not np.array_equal(expected[0], expected[1])


def test_the_box_blend_pastes_the_mouth_as_the_original_does(photo_avatar, network):
    avatar = load_avatar(photo_avatar)
    performer = Performer(avatar, Generator(network, "auto"), blend="box")
    mel = np.random.default_rng(3).random((1, 1, 80, 16), dtype=np.float32) * 8 - 4
    pred = performer.mouths([0], mel)[0]
    x1, y1, x2, y2 = avatar.boxes[0]
    expected = avatar.frames[0].copy()
    expected[y1:y2, x1:x2] = cv2.resize((pred * 255.0).astype(np.uint8), (int(x2 - x1), int(y2 - y1)))
    assert np.array_equal(performer.draw(0, pred, 1.0), expected)
    assert np.array_equal(performer.draw(0, pred, 0.0), avatar.frames[0])  # weight 0: the frame as it is
    with pytest.raises(LipdubError, match="unknown blend"):
        Performer(avatar, performer.generator, blend="soft")


# ----------------------------------------------------------------------------- silence gating

def test_the_avatar_rests_in_silence_and_speaks_in_speech(performer, a1):
    """a1 (radio speech) with 1.6 s of digital silence inserted at 2.5 s, in 20 ms pieces."""
    gap = (2.5, 4.1)
    wav = np.concatenate([a1[: int(gap[0] * 16000)], np.zeros(int(1.6 * 16000), np.float32),
                          a1[int(gap[0] * 16000): int(4.5 * 16000)]])
    session = LiveSession(performer)
    frames = stream(session, wav, 320)
    photo = performer.avatar.frames[0]
    # In the pause: after the detector lets go (<= 0.15 s past the sound), the hang-over (0.3 s)
    # and the fade (3 frames); before the margin (0.08 s) and the half-weight frame before speech.
    resting = [f for f in frames if gap[0] + 0.15 + 0.3 + 0.12 <= f.index / 25 <= gap[1] - 0.2]
    assert len(resting) >= 20
    assert all(f.mouth == 0 and np.array_equal(f.image, photo) for f in resting)  # its own frame, nothing drawn
    speech = [f for f in frames if f.index / 25 < gap[0] - 0.1 or gap[1] + 0.1 <= f.index / 25 < 4.4]
    drawn = [f for f in speech if f.mouth == 1.0]
    assert len(drawn) >= 0.8 * len(speech)
    assert all(not np.array_equal(f.image, photo) for f in drawn)
    # the mouth fades out after speech and in before it, never jumping from 1 to 0
    weights = np.array([f.mouth for f in frames])
    assert np.abs(np.diff(weights)).max() <= 0.5


def test_a_video_avatar_loops_its_idle_frames_back_and_forth(video_avatar, network):
    avatar = load_avatar(video_avatar)
    session = LiveSession(Performer(avatar, Generator(network, "auto")))
    frames = stream(session, np.zeros(4 * 16000, np.float32), 640)
    assert len(frames) == 100
    n = avatar.n_frames
    order = (list(range(n)) + list(range(n - 2, 0, -1))) * 4
    assert [f.source for f in frames] == order[:100]
    assert all(f.mouth == 0 and np.array_equal(f.image, avatar.frames[f.source]) for f in frames)


def test_a_busy_session_repeats_mouths_instead_of_falling_behind(performer, a1):
    """`hold` 2 (what the server sets when a push brings many frames): every other frame repeats
    the mouth of the frame before it, the frames themselves all come."""
    session = LiveSession(performer, silence=False)
    session.hold = 2
    frames = session.push(a1[:16000]) + session.push(a1[16000:32000])  # 1 s pieces: ~25 frames at once
    assert [f.index for f in frames] == list(range(len(frames))) and len(frames) >= 45
    assert session.held == len(frames) // 2
    for i in range(1, len(frames) - 1, 2):
        assert np.array_equal(frames[i].image, frames[i - 1].image)
        assert not np.array_equal(frames[i + 1].image, frames[i].image)


# ------------------------------------------------------------------------------------- input

def test_pcm_as_int16_bytes_or_float_gives_the_same_frames(performer, a1):
    wav = a1[8000:8000 + 16000]
    pcm = np.clip(np.round(wav * 32768), -32768, 32767).astype(np.int16)
    as_float = [f.image for f in stream(LiveSession(performer), pcm.astype(np.float32) / 32768, 640)]
    as_int = [f.image for f in stream(LiveSession(performer), pcm, 640)]
    session = LiveSession(performer)
    as_bytes = [f.image for k in range(0, len(pcm), 333) for f in session.push(pcm[k: k + 333].tobytes())]
    as_bytes += [f.image for f in session.flush()]
    assert len(as_float) == len(as_int) == len(as_bytes) == 25
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(as_float, as_int, as_bytes))


def test_bad_pcm_and_a_push_after_the_end_are_errors(performer):
    session = LiveSession(performer)
    with pytest.raises(LipdubError, match="even number of bytes"):
        session.push(b"\x00\x01\x02")
    with pytest.raises(LipdubError, match="mono"):
        session.push(np.zeros((320, 2), np.float32))
    with pytest.raises(LipdubError, match="int16 or float"):
        session.push(np.zeros(320, np.int32))
    assert session.push(np.zeros(0, np.float32)) == []
    assert session.flush() == [] and session.flush() == []  # nothing pushed: no frame
    with pytest.raises(LipdubError, match="flush was called"):
        session.push(np.zeros(320, np.float32))


def test_a_session_opens_from_an_avatar_directory(photo_avatar, wav2lip_checkpoint, a1):
    session = LiveSession.open(photo_avatar, checkpoint=str(wav2lip_checkpoint), device="cpu", silence=False)
    frames = session.push(a1[:16000])
    assert [f.index for f in frames] == list(range(20))  # 1 s: the frames whose windows it completes
    assert frames[0].image.shape == (474, 474, 3) and all(f.mouth == 1.0 for f in frames)
    with pytest.raises(LipdubError, match="not a lipdub avatar"):
        LiveSession.open(photo_avatar.parent, checkpoint=str(wav2lip_checkpoint))


def test_a_short_stream_ends_with_as_many_frames_as_it_lasts(performer, a1):
    frames = stream(LiveSession(performer, silence=False), a1[:1000], 160)  # 62.5 ms: under one window
    assert [f.index for f in frames] == [0, 1]


def test_an_endless_stream_keeps_its_memory_flat(performer):
    session = LiveSession(performer)
    silence = np.zeros(320, np.float32)
    sizes = []
    for k in range(90 * 50):  # 90 s in 20 ms pieces
        session.push(silence)
        if k % 1500 == 1499:
            sizes.append((len(session._audio), session._columns.shape[1], len(session.gate._decisions)))
    assert session.next_frame >= 90 * 25 - 6
    # audio kept: under 2 s; spectrogram columns: under 300 (3.75 s); detector windows: under 1100 (35 s)
    assert all(a <= 2 * 16000 and b <= 300 and c <= 1100 for a, b, c in sizes), sizes


# ------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveProcess:
    """`python -m lipdub live` on a free loopback port, its log in a file."""

    def __init__(self, avatar: Path, checkpoint: Path, log: Path, *args: str) -> None:
        self.avatar, self.checkpoint, self.log_path, self.args = avatar, checkpoint, log, list(args)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "LiveProcess":
        self.port = free_port()
        cmd = [sys.executable, "-m", "lipdub", "live", "--avatar", str(self.avatar), "--checkpoint",
               str(self.checkpoint), "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lipdub live exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/api/info", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"lipdub live did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                timeout: float = 60.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(
                body, (bytes, str, type(None))))
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, payload=None) -> tuple[int, dict]:
        status, body = self.request(method, path, None if payload is None else json.dumps(payload).encode(),
                                    {"Content-Type": "application/json"})
        return status, json.loads(body)


@pytest.fixture(scope="module")
def server(photo_avatar, wav2lip_checkpoint, tmp_path_factory):
    proc = LiveProcess(photo_avatar, wav2lip_checkpoint, tmp_path_factory.mktemp("live-server") / "live.log")
    proc.start()
    yield proc
    proc.stop()


def test_the_page_and_the_info(server):
    status, page = server.request("GET", "/")
    assert status == 200 and b"lipdub live" in page and b"/static/app.js" in page
    assert server.request("GET", "/static/app.js")[0] == 200
    status, info = server.json("GET", "/api/info")
    assert status == 200
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (474, 474, 1, 25)
    assert info["lookahead_ms"] == 212.5 and info["mouth_lookahead_ms"] == 112.5


def test_speech_posted_in_chunks_is_spoken_in_real_time(server, a1):
    """A TTS-style client: 1.5 s of a1 at 48 kHz stereo (resampled by the server), sent as a
    chunked body faster than real time; the answer comes when the avatar has said it."""
    from lipdub.media import load_audio as load

    stereo48 = load(A1, sample_rate=48000)[: int(1.5 * 48000)]
    pcm = np.clip(np.round(np.repeat(stereo48[:, None], 2, axis=1) * 32767), -32768, 32767).astype("<i2").tobytes()
    before = server.json("GET", "/api/stats")[1]["server"]
    started = time.monotonic()
    status, body = server.request("POST", "/api/speech?rate=48000&channels=2",
                                  body=(pcm[k: k + 4801] for k in range(0, len(pcm), 4801)))
    took = time.monotonic() - started
    assert status == 200, body
    result = json.loads(body)
    assert abs(result["seconds"] - 1.5) < 0.02
    assert took >= 1.0  # paced by the avatar's clock, not by the upload
    after = server.json("GET", "/api/stats")[1]["server"]
    assert after["frames"] - before["frames"] >= 30
    assert after["speaking_frames"] - before["speaking_frames"] >= 15


def test_bad_requests_get_4xx(server):
    assert server.json("POST", "/api/offer", {"sdp": "x", "type": "offer", "source": "radio"})[0] == 400
    assert server.json("POST", "/api/offer", {"sdp": "x", "type": "answer"})[0] == 400
    assert server.json("POST", "/api/offer", {"sdp": "not sdp", "type": "offer", "source": "server"})[0] == 400
    assert server.request("POST", "/api/speech?rate=100", body=b"\x00\x00")[0] == 400
    assert server.request("DELETE", "/api/sessions/nope")[0] == 404


def test_a_webrtc_client_watches_the_server_speech(server, a1):
    """An aiortc peer (no browser) asks for the shared stage and receives the avatar's frames and
    audio at its size while speech is posted; a second microphone session beyond
    --max-sessions 1 is refused with 503 while the first one holds its place."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pcm = np.clip(np.round(a1[:16000] * 32767), -32768, 32767).astype("<i2").tobytes()

    async def offer(pc: RTCPeerConnection, source: str) -> tuple[int, dict]:
        await pc.setLocalDescription(await pc.createOffer())
        return await asyncio.to_thread(server.json, "POST", "/api/offer",
                                       {"sdp": pc.localDescription.sdp, "type": "offer", "source": source})

    async def main():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        tracks = {}
        pc.on("track", lambda track: tracks.__setitem__(track.kind, track))
        status, answer = await offer(pc, "server")
        assert status == 200, answer
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        speaking = asyncio.ensure_future(asyncio.to_thread(server.request, "POST", "/api/speech", pcm))
        frames = [await asyncio.wait_for(tracks["video"].recv(), 60) for _ in range(20)]
        sound = await asyncio.wait_for(tracks["audio"].recv(), 60)
        await speaking

        mic1, mic2 = RTCPeerConnection(), RTCPeerConnection()
        for mic in (mic1, mic2):
            mic.addTransceiver("audio", direction="sendrecv")
            mic.addTransceiver("video", direction="recvonly")
        first, second = await offer(mic1, "mic"), await offer(mic2, "mic")
        for p in (pc, mic1, mic2):
            await p.close()
        return frames, sound, first, second

    frames, sound, first, second = asyncio.run(main())
    assert all((f.width, f.height) == (474, 474) for f in frames)
    steps = np.diff([f.pts for f in frames])
    assert (steps > 0).all() and (steps % 3600 == 0).all()  # 90 kHz clock, 25 fps frame indices
    assert sound.sample_rate == 48000  # Opus
    assert first[0] == 200 and second[0] == 503 and "busy" in second[1]["detail"]
    assert server.json("GET", "/api/info")[1]["sessions"] == 1
    assert server.request("DELETE", f"/api/sessions/{first[1]['session']}")[0] == 204  # what the page's Stop does
    assert server.json("GET", "/api/info")[1]["sessions"] == 0
