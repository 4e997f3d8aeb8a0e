"""Speed of `lipdub eval` (LSE-D / LSE-C with SyncNet v2) on the shared media, rule-B weights.

    python benchmarks/bench_eval.py                 # v3 and v4 (whole clips, with their own audio), CPU
    python benchmarks/bench_eval.py --clips v1 --det-stride 4

Prints frames/s of the whole evaluation (decode, resample to 25 fps, detect, crop, score) and
the seconds per step. Rule-B weights cost exactly what the released syncnet_v2.model costs.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from bench_common import MEDIA, cached, spec_module, spec_schema

CLIPS = {
    "v1": "v1_man_frontal_vfr_700x700.mp4",
    "v3": "v3_woman_glasses_524x524_25fps.mp4",
    "v4": "v4_man_halfbody_hevc_1080x1920_25fps.mp4",
    "v5": "v5_multiface_cuts_640x360_29.97fps.mp4",
}


def syncnet_checkpoint() -> Path:
    """Rule-B SyncNet v2 weights saved as the released syncnet_v2.model is (a bare state dict), made once."""
    def write(tmp: str) -> None:
        import torch

        torch.save(spec_module("fill_rule_b").fill_state_dict(spec_schema("syncnet_v2")), tmp)

    return cached("syncnet_v2_rule_b.model", write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", choices=sorted(CLIPS), default=["v3", "v4"])
    parser.add_argument("--det-stride", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from lipdub.evaluate import evaluate

    checkpoint = str(syncnet_checkpoint())
    for name in args.clips:
        start = time.perf_counter()
        result = evaluate(MEDIA / CLIPS[name], checkpoint=checkpoint, det_stride=args.det_stride, device=args.device,
                          progress=False)
        wall = time.perf_counter() - start
        steps = ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items())
        print(f"{name}: {result['n_frames']} frames at 25 fps, {result['n_windows']} windows, "
              f"{result['n_frames'] / wall:.1f} frames/s ({wall:.1f} s; seconds: {steps}); "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
