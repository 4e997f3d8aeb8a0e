"""Latency and steadiness of `lipdub live`: from a sound arriving to the frame whose mouth shows it.

    python benchmarks/bench_live.py                       # p2 photo (474x474), 60 s, + WebRTC round trip
    python benchmarks/bench_live.py --avatars p2,v3,p1,v4 --seconds 20 --no-webrtc

Part 1, the server's own path, in this process with the server's parts: a clock feeds a `Stage`
20 ms of speech every 20 ms (a1 looped, so the mouth is drawn on every frame: the worst case),
a viewer's paced video track hands each frame to aiortc's VP8 encoder. Per frame it times:
look-ahead (the sound at the middle of the frame's mel window -> the last sample the window
needs), work (that sample -> frame blended: waiting for the stage thread, generator, blend),
pacing (frame ready -> sent on the viewer's 25 fps clock) and the VP8 encode. It prints their
percentiles, the frames per second the viewer sent over the run, and the frames lost (gaps in
the indices), held (a repeated mouth) and late (sent more than one frame after their slot).

Part 2, end to end over WebRTC on loopback (`--webrtc`, default on): `lipdub live` in a
subprocess, an aiortc client that sends the same speech as its microphone (Opus, 20 ms
packets, paced on its own clock) and receives the video. Latency = time the client decoded the
frame - time it "captured" the sound the frame's mouth shows. This includes Opus, the server's
receive jitter buffer, the server path above, VP8, the client's jitter buffer and decoding; a
browser adds its capture buffer (~10 ms) and its playout buffer and display (see the page's
"browser video buffer" and tests/test_live_browser.py).

Deterministic generator weights (speed does not depend on the weight values). The machine's
load average is printed before and after each run: on a shared machine, read it with them.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import CACHE, MEDIA, ROOT, wav2lip_checkpoint

sys.path.insert(0, str(ROOT))

AVATARS = {  # name: (file, prepare options)
    "p2": ("p2_woman_frontal_closed_mouth_474.png", {}),
    "p1": ("p1_astronaut_eileen_collins_512.png", {}),
    "v3": ("v3_woman_glasses_524x524_25fps.mp4", {"max_seconds": 4.0}),
    "v4": ("v4_man_halfbody_hevc_1080x1920_25fps.mp4", {"max_seconds": 4.0}),
    "v4half": ("v4_man_halfbody_hevc_1080x1920_25fps.mp4", {"max_seconds": 4.0, "resize_factor": 2}),
}


def percentiles(values, scale: float = 1000.0) -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    if not len(v):
        return "-"
    return "p50 {:.0f}  p90 {:.0f}  p99 {:.0f}  max {:.0f}".format(*np.percentile(v, [50, 90, 99]), v.max())


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def avatar_dir(name: str) -> Path:
    from lipdub.avatar import prepare_avatar

    file, options = AVATARS[name]
    out = CACHE / "avatars" / name
    if not (out / "avatar.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        prepare_avatar(MEDIA / file, out, progress=False, device="cpu", **options)
    return out


def speech(seconds: float, rate: int = 16000) -> np.ndarray:
    from lipdub.media import load_audio

    a1 = load_audio(MEDIA / "a1_en_radio_16k_stereo.wav", sample_rate=rate)
    return np.tile(a1, int(np.ceil(seconds * rate / len(a1))) + 1)[: int(seconds * rate) + rate]


# ------------------------------------------------------------ part 0: CPU cost of each step
def cpu_costs(performer, n: int = 30) -> dict[str, float]:
    """Median CPU milliseconds of one thread per step: what an idle machine's latency is made of
    (a shared machine stretches them by its load, not their CPU cost)."""
    import av
    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from lipdub.live.session import MelStream, MouthGate

    avatar = performer.avatar
    j = int(np.flatnonzero(avatar.valid)[0])
    wav = speech(2.0)
    rng = np.random.default_rng(0)
    mels = [(rng.random((b, 1, 80, 16), dtype=np.float32) * 8 - 4) for b in (1, 2, 4)]
    pred = performer.mouths([j], mels[0])[0]
    image = performer.draw(j, pred, 1.0)
    encoder = get_encoder(RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96))
    mel, gate = MelStream(), MouthGate()
    k = [0]

    def piece():  # 20 ms of audio through the spectrogram and the speech detector
        x = wav[k[0] * 320: (k[0] + 1) * 320]
        k[0] += 1
        mel.push(x)
        gate.push(x)

    def encode():  # what the viewer's track and aiortc do per frame (frames differ: real content)
        frame = av.VideoFrame.from_ndarray(performer.draw(j, pred, 0.5 + 0.5 * (k[0] % 2)), format="bgr24")
        frame.pts, frame.time_base = k[0] * 3600, fractions.Fraction(1, 90000)
        k[0] += 1
        encoder.encode(frame, False)

    steps = {"audio 20 ms (mel + VAD)": piece,
             **{f"generator batch {len(m)} (per frame)": (lambda m=m: performer.mouths([j] * len(m), m))
                for m in mels},
             "blend": lambda: performer.draw(j, pred, 1.0), "to VideoFrame + VP8": encode}
    out = {}
    for name, step in steps.items():
        for _ in range(3):
            step()
        times = []
        for _ in range(n):
            t = time.thread_time()
            step()
            times.append(time.thread_time() - t)
        per = int(name.split("batch ")[1][0]) if "batch" in name else 1
        out[name] = 1000 * float(np.median(times)) / per
    del image
    return out


# ----------------------------------------------------------------------- part 1: the server path

async def server_path(performer, seconds: float) -> dict:
    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from lipdub.live.server import AUDIO_CHUNK, Stage
    from lipdub.live.session import LOOKAHEAD_SAMPLES, SAMPLES_PER_FRAME

    wav = speech(seconds)
    stage = Stage(performer, "bench")
    viewer = stage.add_viewer()
    stage.start()
    encoder = get_encoder(RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96))
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []  # wall time each 20 ms piece was fed
    sent: dict[int, tuple[float, float]] = {}  # frame index -> (sent, encode seconds)
    stop = asyncio.Event()

    async def feed() -> None:
        started = time.perf_counter()
        for k in range(int(seconds / 0.02)):
            delay = started + k * 0.02 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            arrivals.append(time.perf_counter())
            stage.feed(wav[k * AUDIO_CHUNK: (k + 1) * AUDIO_CHUNK], arrivals[-1])
        stop.set()

    async def send() -> None:
        while not stop.is_set() or not viewer.video.queue.empty():
            try:
                frame = await asyncio.wait_for(viewer.video.recv(), 2.0)
            except asyncio.TimeoutError:
                continue
            index = round(frame.pts / 3600) + (viewer.video.first or 0)
            t = time.perf_counter()
            await loop.run_in_executor(None, encoder.encode, frame, False)
            sent[index] = (t, time.perf_counter() - t)

    cpu = time.process_time()
    await asyncio.gather(feed(), send())
    cpu = time.process_time() - cpu
    await stage.close()

    def arrival(sample: int) -> float:
        return arrivals[min(len(arrivals) - 1, sample // AUDIO_CHUNK)]

    ready = {r[1]: r[0] for r in stage.stats.records}
    rows = []
    for i, (t_sent, t_encode) in sorted(sent.items()):
        if i not in ready:
            continue
        centre = arrival(i * SAMPLES_PER_FRAME + 1600)
        last = arrival(i * SAMPLES_PER_FRAME + LOOKAHEAD_SAMPLES - 1)
        rows.append((last - centre, ready[i] - last, t_sent - ready[i], t_encode, t_sent + t_encode - centre))
    rows = np.array(rows)
    indices = sorted(sent)
    times = [sent[i][0] for i in indices]
    window = [t for t in times if t >= times[0] + 5.0]  # after 5 s of warm-up
    late = int((np.array(stage.stats.send_late) > 0.04).sum())  # sent over a frame after the pacer's slot
    return {
        "frames": len(indices), "lost": int(indices[-1] - indices[0] + 1 - len(indices)),
        "held": stage.session.held, "dropped": stage.stats.dropped, "late": late,
        "fps": (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else float("nan"),
        "cpu_per_frame_ms": 1000 * cpu / max(1, len(indices)),
        "lookahead": rows[:, 0], "work": rows[:, 1], "pacing": rows[:, 2], "encode": rows[:, 3],
        "total": rows[:, 4],
    }


# ------------------------------------------------------------------------ part 2: over WebRTC

async def webrtc_round_trip(port: int, seconds: float) -> dict:
    import av
    from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

    wav48 = speech(seconds, 48000)
    captured: list[float] = []  # wall time each 20 ms client frame was handed to the encoder

    class Microphone(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.k = 0
            self.start: float | None = None

        async def recv(self) -> av.AudioFrame:
            if self.start is None:
                self.start = time.perf_counter()
            delay = self.start + self.k * 0.02 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pcm = np.clip(np.round(wav48[self.k * 960: (self.k + 1) * 960] * 32767), -32768, 32767).astype(np.int16)
            if len(pcm) < 960:
                pcm = np.zeros(960, np.int16)
            frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, self.k * 960, fractions.Fraction(1, 48000)
            captured.append(time.perf_counter())
            self.k += 1
            return frame

    pc = RTCPeerConnection()
    pc.addTrack(Microphone())
    pc.addTransceiver("video", direction="recvonly")
    video = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: video.set_result(track) if track.kind == "video" else None)
    await pc.setLocalDescription(await pc.createOffer())

    def request(method: str, path: str, payload: dict | None = None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(method, path, None if payload is None else json.dumps(payload),
                     {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())

    def get(path: str) -> dict:
        return request("GET", path)

    answer = await asyncio.to_thread(request, "POST", "/api/offer",
                                     {"sdp": pc.localDescription.sdp, "type": "offer", "source": "mic"})
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    track = await video
    received: dict[int, float] = {}
    deadline = time.perf_counter() + seconds + 30
    while time.perf_counter() < deadline and (not captured or time.perf_counter() < captured[0] + seconds):
        try:
            frame = await asyncio.wait_for(track.recv(), 5.0)
        except asyncio.TimeoutError:
            break
        received[round(frame.pts / 3600)] = time.perf_counter()
    stats = await asyncio.to_thread(get, f"/api/stats?session={answer['session']}")
    await pc.close()
    # The server's stream starts with the client's first sample: frame i shows the sound at
    # i * 0.04 + 0.1 s of it, captured at captured[0] + that time.
    latency = [t - (captured[0] + i * 0.04 + 0.1) for i, t in received.items()]
    times = sorted(received.values())
    window = [t for t in times if t >= times[0] + 5.0]
    return {"frames": len(received), "latency": np.array(latency), "server": stats.get(answer["session"], {}),
            "fps": (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avatars", default="p2", help=f"comma-separated: {', '.join(AVATARS)}")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1, help="generator threads (lipdub live's default on 2 cores)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--webrtc", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the WebRTC round trip (first avatar only)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    import torch

    from lipdub.avatar import load_avatar
    from lipdub.generate import Generator, load_generator
    from lipdub.live import Performer

    torch.set_num_threads(args.threads)
    checkpoint = wav2lip_checkpoint()
    network = load_generator(str(checkpoint), "cpu", progress=False)
    report = {}
    for name in args.avatars.split(","):
        avatar = load_avatar(avatar_dir(name))
        performer = Performer(avatar, Generator(network, args.precision))
        performer.warm_up()
        print(f"\n== {name}: {avatar.width}x{avatar.height}, {avatar.n_frames} frame(s), "
              f"{performer.generator.precision}, {torch.get_num_threads()} thread(s), {args.seconds:g} s of speech")
        costs = cpu_costs(performer)
        print("   CPU ms per step (one thread): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
        print(f"   before: {load()}")
        r = asyncio.run(server_path(performer, args.seconds))
        print(f"   after:  {load()}")
        print(f"   sustained {r['fps']:.2f} frames/s sent; {r['frames']} frames, lost {r['lost']}, dropped "
              f"{r['dropped']}, late {r['late']}, mouths held {r['held']}; {r['cpu_per_frame_ms']:.1f} ms CPU/frame")
        for key in ("lookahead", "work", "pacing", "encode", "total"):
            print(f"   {key:9s} ms  {percentiles(r[key])}")
        report[name] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
        report[name]["cpu_ms"] = costs

    if args.webrtc:
        from tests.test_live import LiveProcess

        name = args.avatars.split(",")[0]
        with tempfile.TemporaryDirectory() as tmp:
            server = LiveProcess(avatar_dir(name), checkpoint, Path(tmp) / "live.log", "--threads",
                                 str(args.threads), "--precision", args.precision)
            server.start()
            try:
                print(f"\n== WebRTC round trip, {name}, {args.seconds:g} s (aiortc client on loopback)")
                print(f"   before: {load()}")
                r = asyncio.run(webrtc_round_trip(server.port, args.seconds))
                print(f"   after:  {load()}")
            finally:
                server.stop()
        print(f"   {r['frames']} frames received, {r['fps']:.2f} frames/s after warm-up")
        print(f"   sound captured -> frame decoded ms  {percentiles(r['latency'])}")
        print(f"   the server's view: {json.dumps(r['server'])}")
        report["webrtc"] = {"frames": r["frames"], "fps": r["fps"], "latency": r["latency"].tolist(),
                            "server": r["server"]}
    if args.json:
        Path(args.json).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
