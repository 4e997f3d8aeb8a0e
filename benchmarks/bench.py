"""Speed and memory of `lipdub run` on the shared media, with deterministic (rule-A) weights.

    python benchmarks/bench.py                 # v3 with --box and v4 with the default detector
    python benchmarks/bench.py --memory        # peak RSS of 6 s vs 60 s jobs (face video and audio
                                               # both that long) on v3 --box and v4
    python benchmarks/bench.py --case v3-box --seconds 20

Each case runs in its own process so peak RSS (ru_maxrss) belongs to that job alone. Stage
frames/s are output frames divided by the seconds spent in that stage (decode counts both
passes over the face video; detect runs on a stride of frames at <= 480 px).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

from bench_common import CACHE, MEDIA, wav2lip_checkpoint

CASES = {
    "v3-box": dict(face="v3_woman_glasses_524x524_25fps.mp4", box=(150, 450, 110, 410)),
    "v3": dict(face="v3_woman_glasses_524x524_25fps.mp4"),
    "v4": dict(face="v4_man_halfbody_hevc_1080x1920_25fps.mp4"),
    "v4-box": dict(face="v4_man_halfbody_hevc_1080x1920_25fps.mp4", box=(560, 1000, 300, 760)),
}
STAGES = ("decode", "detect", "generate", "blend", "restore", "encode")


def speech(seconds: float) -> Path:
    """`seconds` of the a1 recording (repeated as needed) as a 16 kHz mono wav."""
    path = CACHE / f"speech_{seconds:g}s.wav"
    if not path.exists():
        from lipdub.media import load_audio

        wav = load_audio(MEDIA / "a1_en_radio_16k_stereo.wav")
        n = int(seconds * 16000)
        wav = np.tile(wav, n // len(wav) + 1)[:n]
        CACHE.mkdir(parents=True, exist_ok=True)
        with wave.open(str(path), "wb") as fh:
            fh.setnchannels(1), fh.setsampwidth(2), fh.setframerate(16000)
            fh.writeframes(np.clip(wav * 32767, -32768, 32767).astype("<i2").tobytes())
    return path


def long_face(name: str, seconds: float) -> Path:
    """The face video played back and forth to `seconds`, so the face input is as long as the job."""
    path = CACHE / f"face_{Path(name).stem}_{seconds:g}s.mp4"
    if not path.exists():
        from lipdub.media import VideoSource, VideoWriter
        from lipdub.pipeline import source_order

        source = VideoSource(MEDIA / name)
        ticks = [pts for pts, _ in source.clock()]
        order = source_order(int(seconds * float(source.info.fps)), len(ticks), "pingpong", False)
        with VideoWriter(path, source.info.width, source.info.height, source.info.fps) as writer:
            for frame in source.frames_at(ticks, order):
                writer.write(frame)
    return path


def run_one(case: str, seconds: float, device: str, batch_size: int, long_video: bool = False) -> dict:
    from lipdub import sync

    spec = CASES[case]
    face = long_face(spec["face"], seconds) if long_video else MEDIA / spec["face"]
    out = CACHE / f"out_{case}_{seconds:g}.mp4"
    start = time.perf_counter()
    result = sync(face, speech(seconds), out, checkpoint=str(wav2lip_checkpoint()), box=spec.get("box"),
                  device=device, batch_size=batch_size, progress=False)
    wall = time.perf_counter() - start
    n = result.n_frames
    t = result.timings
    return {
        "case": case + (" (long video)" if long_video else ""),
        "seconds_of_audio": seconds,
        "frames": n,
        "size": f"{result.width}x{result.height}",
        "stage_fps": {s: round(n / t[s], 1) for s in STAGES if t.get(s)},
        "stage_seconds": {s: round(v, 2) for s, v in t.items()},
        "end_to_end_fps": round(n / wall, 2),
        "end_to_end_fps_without_model_load": round(n / (wall - t.get("load", 0.0)), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def in_subprocess(case: str, seconds: float, device: str, batch_size: int, long_video: bool = False) -> dict:
    if long_video:
        long_face(CASES[case]["face"], seconds)  # made here, so its cost stays out of the measured job
    cmd = [sys.executable, __file__, "--one", case, "--seconds", str(seconds), "--device", device,
           "--batch-size", str(batch_size)] + (["--long-video"] if long_video else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(r: dict) -> None:
    stages = "  ".join(f"{k} {v}" for k, v in r["stage_fps"].items())
    print(f"{r['case']:>7} {r['size']:>9} {r['frames']:5d} frames  end-to-end {r['end_to_end_fps']:6.2f} fps "
          f"(without model load {r['end_to_end_fps_without_model_load']:.2f})  peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"{'':>7} stage frames/s: {stages}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: v3-box and v4")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (the video ping-pongs)")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of 6 s vs 60 s jobs, face video as long as the audio")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--long-video", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seconds, args.device, args.batch_size, args.long_video)))
        return
    wav2lip_checkpoint()
    print(f"cpu: {os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}")
    results = []
    if args.memory:
        for case in args.case or ["v3-box", "v4"]:
            short, long = (in_subprocess(case, s, args.device, args.batch_size, long_video=True) for s in (6.0, 60.0))
            for r in (short, long):
                show(r)
                results.append(r)
            growth = long["peak_rss_mb"] / short["peak_rss_mb"] - 1
            print(f"{case}: peak RSS 6 s job {short['peak_rss_mb']:.0f} MB, 60 s job {long['peak_rss_mb']:.0f} MB "
                  f"({growth:+.1%})")
    else:
        for case in args.case or ["v3-box", "v4"]:
            r = in_subprocess(case, args.seconds, args.device, args.batch_size)
            show(r)
            results.append(r)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
