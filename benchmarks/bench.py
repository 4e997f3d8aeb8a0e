"""Speed and memory of `lipdub run` on the shared media, with deterministic (rule-A) weights.

    python benchmarks/bench.py                 # v3 with --box and v4 with the default detector
    python benchmarks/bench.py --memory        # peak RSS of 6 s vs 60 s jobs (face video and audio
                                               # both that long) on v3 --box and v4
    python benchmarks/bench.py --case v3-box --seconds 20 --precision fp32 --repeat 3
    python benchmarks/bench.py --model 256         # the 256x256 generator (G stays the 96 model's)

Absolute speed drifts by +-40% on shared machines, so every case also measures G, the fp32
generator's own frames/s (batch 16, median of 5 batches), in the same process moments before
the job, and reports end-to-end frames/s as a ratio of it. Each case runs in its own process so
peak RSS (ru_maxrss) belongs to that job alone; with --repeat the medians are printed. Stage
frames/s are output frames divided by the seconds spent in that stage's own thread (the stages
overlap, so they add up to more than the wall time; decode counts both passes over the face
video; detect runs on a stride of frames at <= 480 px).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

from bench_common import CACHE, MEDIA, wav2lip256_checkpoint, wav2lip_checkpoint

CASES = {
    "v3-box": dict(face="v3_woman_glasses_524x524_25fps.mp4", box=(150, 450, 110, 410)),
    "v3": dict(face="v3_woman_glasses_524x524_25fps.mp4"),
    "v4": dict(face="v4_man_halfbody_hevc_1080x1920_25fps.mp4"),
    "v4-box": dict(face="v4_man_halfbody_hevc_1080x1920_25fps.mp4", box=(560, 1000, 300, 760)),
}
STAGES = ("decode", "detect", "crop", "generate", "blend", "restore", "encode")


def generator_fps(batch: int = 16, repeats: int = 5) -> float:
    """G: frames/s of the fp32 generator alone on this machine now (median of `repeats` batches)."""
    import torch

    from lipdub.generate import load_generator

    model = load_generator(str(wav2lip_checkpoint()), "cpu", progress=False)
    faces, mels = torch.rand(batch, 6, 96, 96), torch.rand(batch, 1, 80, 16) * 8 - 4
    times = []
    with torch.inference_mode():
        model(mels, faces)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(mels, faces)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


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


def run_one(case: str, seconds: float, device: str, batch_size: int, precision: str, long_video: bool = False,
            measure_g: bool = True, model: str = "96") -> dict:
    from lipdub import sync

    g = generator_fps() if measure_g else None
    spec = CASES[case]
    face = long_face(spec["face"], seconds) if long_video else MEDIA / spec["face"]
    out = CACHE / f"out_{case}_{seconds:g}.mp4"
    start = time.perf_counter()
    checkpoint = wav2lip256_checkpoint() if model == "256" else wav2lip_checkpoint()
    result = sync(face, speech(seconds), out, checkpoint=str(checkpoint), box=spec.get("box"),
                  device=device, batch_size=batch_size, precision=precision, progress=False)
    wall = time.perf_counter() - start
    n = result.n_frames
    t = result.timings
    return {
        "case": case + (" (long video)" if long_video else "") + (" 256" if model == "256" else ""),
        "precision": precision,
        "seconds_of_audio": seconds,
        "frames": n,
        "size": f"{result.width}x{result.height}",
        "G": round(g, 2) if g else None,
        "stage_fps": {s: round(n / t[s], 1) for s in STAGES if t.get(s)},
        "stage_seconds": {s: round(v, 2) for s, v in t.items()},
        "end_to_end_fps": round(n / wall, 2),
        "ratio_to_G": round(n / wall / g, 3) if g else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def in_subprocess(case: str, seconds: float, device: str, batch_size: int, precision: str,
                  long_video: bool = False, model: str = "96") -> dict:
    if long_video:
        long_face(CASES[case]["face"], seconds)  # made here, so its cost stays out of the measured job
    cmd = [sys.executable, __file__, "--one", case, "--seconds", str(seconds), "--device", device,
           "--batch-size", str(batch_size), "--precision", precision, "--model", model] + (
               ["--long-video"] if long_video else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median ratio to G, plus the spread of the ratios."""
    ranked = sorted(runs, key=lambda r: r["ratio_to_G"] or r["end_to_end_fps"])
    r = dict(ranked[len(ranked) // 2])
    r["ratios"] = [x["ratio_to_G"] for x in runs]
    return r


def show(r: dict) -> None:
    stages = "  ".join(f"{k} {v}" for k, v in r["stage_fps"].items())
    ratio = f"= {r['ratio_to_G']:.2f} G (G {r['G']:.1f} fps)" if r.get("G") else ""
    spread = f", ratios {r['ratios']}" if len(r.get("ratios", [])) > 1 else ""
    print(f"{r['case']:>11} {r['precision']:>4} {r['size']:>9} {r['frames']:5d} frames  end-to-end "
          f"{r['end_to_end_fps']:6.2f} fps {ratio}  peak RSS {r['peak_rss_mb']:.0f} MB{spread}")
    print(f"{'':>12} stage frames/s: {stages}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: v3-box and v4")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (the video ping-pongs)")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of 6 s vs 60 s jobs, face video as long as the audio")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", action="append", choices=["auto", "fp32", "bf16"],
                        help="default: auto (the default precision) and fp32")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; medians are printed")
    parser.add_argument("--model", choices=["96", "256"], default="96", help="which generator runs (default 96)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--long-video", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seconds, args.device, args.batch_size, args.precision[0],
                                 args.long_video, measure_g=not args.long_video, model=args.model)))
        return
    precisions = args.precision or ["auto", "fp32"]
    wav2lip_checkpoint()
    print(f"cpu: {os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}")
    results = []
    if args.memory:
        for case in args.case or ["v3-box", "v4"]:
            short, long = (in_subprocess(case, s, args.device, args.batch_size, precisions[0], long_video=True,
                                         model=args.model)
                           for s in (6.0, 60.0))
            for r in (short, long):
                show(r)
                results.append(r)
            growth = long["peak_rss_mb"] / short["peak_rss_mb"] - 1
            print(f"{case}: peak RSS 6 s job {short['peak_rss_mb']:.0f} MB, 60 s job {long['peak_rss_mb']:.0f} MB "
                  f"({growth:+.1%})")
    else:
        for case in args.case or ["v3-box", "v4"]:
            for precision in precisions:
                r = median_run([in_subprocess(case, args.seconds, args.device, args.batch_size, precision,
                                              model=args.model)
                                for _ in range(args.repeat)])
                show(r)
                results.append(r)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
