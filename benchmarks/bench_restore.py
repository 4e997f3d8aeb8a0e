"""Speed of `lipdub restore` (GFPGAN face restoration) on the shared media, rule-B weights.

    python benchmarks/bench_restore.py                    # v3 and v4, first 10 frames each, CPU
    python benchmarks/bench_restore.py --frames 50 --device cuda --batch-size 8
    python benchmarks/bench_restore.py --clips --rounds 7  # only the fp32 / default comparison

First it compares the precisions: the network's seconds per face in fp32 and at the default
precision (`auto`: bf16 where the hardware runs it natively), measured round by round in
turn, so load from other processes hits both alike; medians and their ratio are printed.

Reports, per clip, frames/s of the whole restore job (scan + restore + encode; the network
load is excluded, it happens once per job) with the seconds per step, and the network's time
per face (512x512 crop) at batch 1 and at a larger batch (the job's batch, at least 4).
Rule-B weights (deterministic, in the released checkpoint layout) cost exactly what the
released GFPGANv1.4.pth weights cost: same network, same shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import MEDIA, cached, spec_module, spec_schema  # noqa: E402

CLIPS = {
    "v3": "v3_woman_glasses_524x524_25fps.mp4",
    "v4": "v4_man_halfbody_hevc_1080x1920_25fps.mp4",
}


def gfpgan_checkpoint() -> Path:
    """Rule-B GFPGANv1Clean weights saved as the released files are ({"params_ema": ...}), made once."""
    def write(tmp: str) -> None:
        import torch

        fill = spec_module("fill_rule_b")
        torch.save({"params_ema": fill.fill_state_dict(spec_schema("gfpganv1_clean"), fill.GFPGAN_OVERRIDES)}, tmp)

    return cached("gfpgan_rule_b.pth", write)


def network_time(stage, batch_size: int, repeats: int = 2) -> dict[str, float]:
    """Seconds per face of restore_crops (after one warm-up call), at batch 1 and `batch_size`."""
    rng = np.random.default_rng(0)
    size = stage.restorer.size
    crops = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch_size)]
    restorer = stage.restorer
    restorer.restore_crops(crops[:1])  # warm-up (allocator, kernels)
    out = {}
    for b in sorted({1, batch_size}):
        saved, restorer.batch_size = restorer.batch_size, b
        try:
            t = time.perf_counter()
            for _ in range(repeats):
                restorer.restore_crops(crops[:b])
            out[f"batch{b}_s_per_face"] = (time.perf_counter() - t) / (repeats * b)
        finally:
            restorer.batch_size = saved
    return out


def compare_precisions(checkpoint: str, device: str, rounds: int = 5, faces: int = 2) -> dict:
    """Median network seconds per face of fp32 and of the default precision, in alternating rounds."""
    from lipdub.enhance import RestoreStage

    stages = {p: RestoreStage(checkpoint, device=device, precision=p, batch_size=1, progress=False)
              for p in ("fp32", "auto")}
    times: dict[str, list[float]] = {p: [] for p in stages}
    for _ in range(rounds):
        for p, stage in stages.items():
            times[p].append(network_time(stage, 1, repeats=faces)["batch1_s_per_face"])
    median = {p: float(np.median(v)) for p, v in times.items()}
    return {"fp32_s_per_face": median["fp32"], "default_s_per_face": median["auto"],
            "default_precision": stages["auto"].restorer.precision, "ratio": median["auto"] / median["fp32"],
            "rounds": rounds}


def bench_restore(frames: int = 10, clips=("v3", "v4"), device: str = "cpu", batch_size: int | None = None,
                  region: str = "face", upscale: int = 1, checkpoint: str | None = None,
                  verbose: bool = True) -> dict:
    """Run `restore_video` on the first `frames` frames of each clip; returns (and prints) the numbers."""
    import torch

    from lipdub.enhance import RestoreStage, restore_video

    ckpt = checkpoint or str(gfpgan_checkpoint())
    t = time.perf_counter()
    stage = RestoreStage(ckpt, device=device, region=region, upscale=upscale, batch_size=batch_size, progress=False)
    load_s = time.perf_counter() - t
    report: dict = {"device": str(stage.device), "torch_threads": torch.get_num_threads(), "batch_size": stage.batch_size,
                    "frames": frames, "region": region, "upscale": upscale, "load_s": load_s}
    report["network"] = network_time(stage, max(4, stage.batch_size))
    if verbose:
        net = report["network"]
        print(f"device {report['device']} ({report['torch_threads']} threads), checkpoint load {load_s:.1f} s")
        print("network per face: " + ", ".join(f"{k.split('_')[0]} {v:.2f} s" for k, v in net.items()))
    with tempfile.TemporaryDirectory() as tmp:
        for name in clips:
            source = MEDIA / CLIPS[name]
            result = restore_video(source, Path(tmp) / f"{name}.mp4", stage=stage, max_frames=frames,
                                   device=device, progress=False)
            timings = result.timings
            busy = timings["total"] - timings.get("load", 0.0)
            row = {"frames": result.n_frames, "faces": result.faces_restored, "size": [result.width, result.height],
                   "frames_per_s": result.n_frames / busy, "seconds": busy,
                   "network_s_per_face": timings["network"] / max(1, result.faces_restored),
                   "steps": {k: round(v, 3) for k, v in timings.items()}}
            report[name] = row
            if verbose:
                steps = ", ".join(f"{k} {timings.get(k, 0.0):.2f}" for k in
                                  ("decode", "detect", "align", "network", "paste", "resize", "encode"))
                print(f"{name}: {row['frames']} frames {result.width}x{result.height}, {row['faces']} faces, "
                      f"{row['frames_per_s']:.3f} frames/s ({busy:.1f} s; network {row['network_s_per_face']:.2f} "
                      f"s/face; seconds: {steps})")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10, help="first N frames of each clip (default 10)")
    p.add_argument("--clips", nargs="*", choices=sorted(CLIPS), default=["v3", "v4"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="faces per network call (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--region", choices=["face", "mouth"], default="face")
    p.add_argument("--upscale", type=int, choices=[1, 2, 4], default=1)
    p.add_argument("--checkpoint", default=None, help="a real GFPGANv1.x.pth instead of rule-B weights")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the fp32 / default comparison (0: skip it)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    ckpt = args.checkpoint or str(gfpgan_checkpoint())
    if args.rounds:
        cmp = compare_precisions(ckpt, args.device, args.rounds)
        if not args.json:
            print(f"network seconds per face (batch 1, median of {cmp['rounds']} rounds): fp32 "
                  f"{cmp['fp32_s_per_face']:.2f}, default ({cmp['default_precision']}) "
                  f"{cmp['default_s_per_face']:.2f} = {cmp['ratio']:.2f}x fp32")
    if not args.clips:
        if args.json and args.rounds:
            print(json.dumps(cmp, indent=2))
        return 0
    report = bench_restore(args.frames, args.clips, args.device, args.batch_size, args.region, args.upscale,
                           args.checkpoint, verbose=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
