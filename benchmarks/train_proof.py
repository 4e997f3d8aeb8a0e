"""Proof that the training stack learns: synth -> preprocess -> expert -> generator -> measure.

    .venv/bin/python benchmarks/train_proof.py [--work DIR] [--quick]

On CPU (2 cores, bf16) the default run takes about 28 minutes. It uses only the library calls
behind `lipdub synth`, `lipdub preprocess` and `lipdub train expert|generator`, and prints:

* the expert's held-out sync accuracy: val clips (audio never trained on), balanced
  in-sync / off-sync (>= 5 frames away) windows; chance is 50 %, target >= 90 %;
* the generator's mouth-opening correlation on the val clips (held-out audio): the opening
  measured in each generated face against the one in the true face (per-clip mean removed,
  pooled Pearson r), fed the clip's own audio (target >= 0.8) and fed the audio of another val
  clip (mismatched, target <= 0.3, i.e. the mouths follow the audio, not the video).

`--quick` is the reduced version for CI (tests/test_train.py::test_train_proof_quick): 12 clips,
a 300-step expert and a 4-step generator, about 2 minutes; the test expects the expert's
held-out accuracy >= 0.60 (chance 0.5; 3 standard deviations of chance on 256 windows).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipdub.audio import MEL_STEP_SIZE  # noqa: E402
from lipdub.train.common import T  # noqa: E402
from lipdub.train.data import ClipIndex, _load_mel, mel_start  # noqa: E402
from lipdub.train.synth import mouth_opening  # noqa: E402


def expert_accuracy(expert_path: Path, data: Path, n: int) -> dict:
    from lipdub.train.data import ExpertDataset
    from lipdub.train.expert import evaluate_expert
    from lipdub.train.generator import load_expert

    model = load_expert(expert_path, torch.device("cpu"))
    ds = ExpertDataset(data, "val", seed=12345, balanced=True)
    return evaluate_expert(model, ds, n, 64, torch.device("cpu"))


def _read(folder: Path, start: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.imread(str(folder / f"{i}.jpg")) for i in range(start, start + T)])


@torch.no_grad()
def generator_correlation(gen_path: Path, data: Path) -> dict:
    """Mouth opening of generated vs true faces on every val window, own audio vs another clip's."""
    from lipdub.pipeline import load_generator

    model = load_generator(str(gen_path), torch.device("cpu"))
    index = ClipIndex(data, "val")
    clips = index.clips
    per_clip = []
    for c, clip in enumerate(clips):
        other = clips[(c + 1) % len(clips)]
        mel_own, mel_other = _load_mel(clip.path), _load_mel(other.path)
        starts = [s for a, b in clip.starts for s in range(a, b, T)]
        valid = [s for a, b in clip.starts for s in range(a, b)]
        gt_open, own_open, mis_open = [], [], []
        for s in starts:
            r = max(valid, key=lambda v: abs(v - s))  # reference window: the farthest one
            window, ref = _read(clip.path, s) / 255.0, _read(clip.path, r) / 255.0
            masked = window.copy()
            masked[:, 48:] = 0
            faces = torch.from_numpy(np.concatenate([masked, ref], axis=3).transpose(0, 3, 1, 2).astype(np.float32))
            outs = []
            for mel, fps in ((mel_own, clip.fps), (mel_other, other.fps)):
                wins = []
                for t in range(T):
                    m0 = mel_start(s + t, fps)
                    if m0 + MEL_STEP_SIZE > mel.shape[1]:
                        m0 = mel.shape[1] - MEL_STEP_SIZE
                    wins.append(np.asarray(mel[:, m0 : m0 + MEL_STEP_SIZE], np.float32))
                mels = torch.from_numpy(np.stack(wins)[:, None])
                pred = model(mels, faces).numpy().transpose(0, 2, 3, 1)
                outs.append([mouth_opening((p * 255).round().astype(np.uint8)) for p in pred])
            gt_open += [mouth_opening(f) for f in _read(clip.path, s)]
            own_open += outs[0]
            mis_open += outs[1]
        per_clip.append((np.array(gt_open), np.array(own_open), np.array(mis_open)))

    def pooled(k: int) -> float:
        a = np.concatenate([p[0] - p[0].mean() for p in per_clip])
        b = np.concatenate([p[k] - p[k].mean() for p in per_clip])
        return float(np.corrcoef(a, b)[0, 1])

    return {"matched_r": pooled(1), "mismatched_r": pooled(2), "frames": int(sum(len(p[0]) for p in per_clip)),
            "clips": len(per_clip),
            "per_clip_matched_r": [round(float(np.corrcoef(p[0], p[1])[0, 1]), 3) for p in per_clip]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/lipdub_train_proof", help="working folder (raw, data, checkpoints)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced CI version: 12 clips, a 300-step expert, a 4-step generator (a few minutes)")
    ap.add_argument("--clips", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--expert-steps", type=int, default=None)
    ap.add_argument("--generator-steps", type=int, default=None)
    ap.add_argument("--expert-lr", type=float, default=1e-4)
    ap.add_argument("--expert-anneal-steps", type=int, default=None,
                    help="steps added at --expert-anneal-lr after --expert-steps (default 400, 0 with --quick)")
    ap.add_argument("--expert-anneal-lr", type=float, default=2e-5)
    ap.add_argument("--generator-lr", type=float, default=1e-4)
    ap.add_argument("--generator-batch", type=int, default=2)
    ap.add_argument("--expert-batch", type=int, default=None, help="default 32 (16 with --quick)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                    help="auto: bf16 on CPUs with AVX-512 BF16 / AMX, else fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from lipdub.train.expert import ExpertOptions, train_expert
    from lipdub.train.generator import GeneratorOptions, train_generator
    from lipdub.train.preprocess import preprocess
    from lipdub.train.synth import synth

    clips = args.clips or (12 if args.quick else 50)
    e_steps = args.expert_steps if args.expert_steps is not None else (300 if args.quick else 1500)
    e_batch = args.expert_batch or (16 if args.quick else 32)
    g_steps = args.generator_steps if args.generator_steps is not None else (4 if args.quick else 1200)
    e_anneal = args.expert_anneal_steps if args.expert_anneal_steps is not None else (0 if args.quick else 400)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times = {}
    t0 = time.perf_counter()
    synth(work / "raw", clips=clips, seconds=args.seconds if not args.quick else 3.0, size=160,
          val_fraction=0.2, seed=args.seed, progress=False)
    times["synth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preprocess(work / "raw", work / "data", workers=2, progress=False)
    times["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    expert = work / "expert.pth"
    stretches = [(e_steps, args.expert_lr)] + ([(e_steps + e_anneal, args.expert_anneal_lr)] if e_anneal else [])
    for steps, lr in stretches:
        # the second stretch resumes the first at a lower rate (`lipdub train expert --resume --lr`)
        train_expert(ExpertOptions(work / "data", expert, steps=steps, batch_size=e_batch, lr=lr,
                                   resume=expert.is_file(), eval_interval=100, eval_samples=256,
                                   checkpoint_interval=100, log_interval=25, workers=args.workers, device="cpu",
                                   seed=args.seed, precision=args.precision))
    times["expert"] = time.perf_counter() - t0
    acc = expert_accuracy(expert, work / "data", 256 if args.quick else 1024)
    print(f"expert held-out: accuracy {acc['accuracy']:.3f} on {acc['n']} val windows, loss {acc['loss']:.4f}", flush=True)

    t0 = time.perf_counter()
    gen = work / "wav2lip.pth"
    train_generator(GeneratorOptions(work / "data", gen, expert, steps=g_steps, batch_size=args.generator_batch,
                                     lr=args.generator_lr, resume=gen.is_file(), eval_interval=150,
                                     eval_samples=16, checkpoint_interval=50, sample_interval=150,
                                     log_interval=10, workers=args.workers, device="cpu", seed=args.seed,
                                     precision=args.precision))
    times["generator"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    corr = generator_correlation(gen, work / "data")
    times["measure"] = time.perf_counter() - t0
    result = {
        "expert_val_accuracy": round(acc["accuracy"], 4), "expert_val_loss": round(acc["loss"], 4),
        "expert_val_windows": acc["n"],
        "generator_matched_r": round(corr["matched_r"], 4), "generator_mismatched_r": round(corr["mismatched_r"], 4),
        "generator_val_frames": corr["frames"], "generator_per_clip_matched_r": corr["per_clip_matched_r"],
        "steps": {"expert": e_steps, "expert_anneal": e_anneal, "generator": g_steps}, "clips": clips,
        "batch": {"expert": e_batch, "generator": args.generator_batch},
        "lr": {"expert": args.expert_lr, "expert_anneal": args.expert_anneal_lr, "generator": args.generator_lr},
        "precision": args.precision,
        "seconds": {k: round(v, 1) for k, v in times.items()}, "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.quick:
        return 0
    ok = acc["accuracy"] >= 0.9 and corr["matched_r"] >= 0.8 and corr["mismatched_r"] <= 0.3
    print("targets (expert >= 0.90, matched r >= 0.80, mismatched r <= 0.30):", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
