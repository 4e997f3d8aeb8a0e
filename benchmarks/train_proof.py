"""Proof that the training stack learns: synth -> preprocess -> expert -> generator -> measure.

    .venv/bin/python benchmarks/train_proof.py [--work DIR] [--seed N] [--threads N] [--quick]

On CPU (2 cores, bf16) the default run takes about 30 minutes on a quiet machine. It uses only the
library calls behind `lipdub synth`, `lipdub preprocess` and `lipdub train expert|generator`,
and prints:

* the expert's held-out sync accuracy: val clips (audio never trained on), balanced
  in-sync / off-sync (>= 5 frames away) windows; chance is 50 %, target >= 90 %;
* the generator's mouth-opening correlation on the val clips (held-out audio): the opening
  measured in each generated face against the one in the true face (per-clip mean removed,
  pooled Pearson r), fed the clip's own audio (target >= 0.8) and fed the audio of another val
  clip (mismatched, target <= 0.3, i.e. the mouths follow the audio, not the video).

A run is a function of its seed, its thread count (`--threads`, fixed: 2 by default) and its
machine: the data set, the data order, the augmentation, the negatives and the initial weights
all come from the seed and the kernels are the deterministic ones. The result carries
fingerprints (SHA-256 prefixes) of the data set and of both trained networks, so two runs can be
compared stage by stage.

`--quick` is the reduced version for CI (tests/test_train.py::test_train_proof_quick): 12 clips,
a 300-step expert and a 4-step generator, about 2 minutes.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipdub.audio import MEL_STEP_SIZE  # noqa: E402
from lipdub.models.wav2lip import Wav2Lip  # noqa: E402
from lipdub.train.common import T, reproducible  # noqa: E402
from lipdub.train.data import ClipIndex, ExpertDataset, _load_mel, mel_start  # noqa: E402
from lipdub.train.expert import ExpertOptions, evaluate_expert, train_expert  # noqa: E402
from lipdub.train.generator import GeneratorOptions, load_expert, train_generator  # noqa: E402
from lipdub.train.preprocess import preprocess  # noqa: E402
from lipdub.train.synth import mouth_opening, synth  # noqa: E402
from lipdub.weights import load_state_dict  # noqa: E402

TARGETS = {"expert": 0.90, "matched_r": 0.80, "mismatched_r": 0.30}


def expert_accuracy(expert_path: Path, data: Path, n: int) -> dict:
    model = load_expert(expert_path, torch.device("cpu"))
    ds = ExpertDataset(data, "val", seed=12345, balanced=True)
    return evaluate_expert(model, ds, n, 64, torch.device("cpu"))


def _read(folder: Path, start: int) -> np.ndarray:
    return np.stack([cv2.imread(str(folder / f"{i}.jpg")) for i in range(start, start + T)])


@torch.no_grad()
def generator_correlation(gen_path: Path, data: Path) -> dict:
    """Mouth opening of generated vs true faces on every val window, own audio vs another clip's."""
    model = Wav2Lip()
    model.load_state_dict(load_state_dict(gen_path, "wav2lip"), strict=True)
    model.eval()
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
            "per_clip_matched_r": [round(float(np.corrcoef(p[0], p[1])[0, 1]), 3) for p in per_clip],
            "per_clip_names": [clip.path.name for clip in clips]}


def data_fingerprint(data: Path) -> str:
    """SHA-256 prefix over every file of the preprocessed set (names and bytes; no reports)."""
    h = hashlib.sha256()
    for path in sorted(p for p in data.rglob("*") if p.is_file() and p.name != "preprocess_report.json"):
        if path.name == "meta.json":  # holds the source's path and mtime; keep only what training reads
            meta = json.loads(path.read_text())
            content = json.dumps({k: meta[k] for k in ("fps", "n_frames", "runs", "n_mel")}).encode()
        else:
            content = path.read_bytes()
        h.update(path.relative_to(data).as_posix().encode() + b"\0" + content)
    return h.hexdigest()[:16]


def weights_fingerprint(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + state[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def gate_step(log_dir: Path) -> int | None:
    """The evaluation step at which the sync-loss weight became non-zero (from metrics.csv)."""
    with open(log_dir / "metrics.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)
                 if row["tag"] == "eval/syncnet_wt" and float(row["value"]) > 0]
    return min(steps) if steps else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/lipdub_train_proof", help="working folder (raw, data, checkpoints)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced CI version: 12 clips, a 300-step expert, a 4-step generator (a few minutes)")
    ap.add_argument("--clips", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--expert-steps", type=int, default=None)
    ap.add_argument("--generator-steps", type=int, default=None, help="default 1500 (4 with --quick)")
    ap.add_argument("--expert-lr", type=float, default=1e-4)
    ap.add_argument("--expert-anneal-steps", type=int, default=None,
                    help="steps added at --expert-anneal-lr after --expert-steps (default 400, 0 with --quick)")
    ap.add_argument("--expert-anneal-lr", type=float, default=2e-5)
    ap.add_argument("--generator-lr", type=float, default=1e-4)
    ap.add_argument("--generator-batch", type=int, default=2)
    ap.add_argument("--expert-batch", type=int, default=None, help="default 32 (16 with --quick)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads, fixed for the whole run (default 2; results depend on it)")
    ap.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                    help="auto: bf16 on CPUs with AVX-512 BF16 / AMX, else fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with reproducible(args.seed, args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    clips = args.clips or (12 if args.quick else 50)
    e_steps = args.expert_steps if args.expert_steps is not None else (300 if args.quick else 1500)
    e_batch = args.expert_batch or (16 if args.quick else 32)
    g_steps = args.generator_steps if args.generator_steps is not None else (4 if args.quick else 1500)
    e_anneal = args.expert_anneal_steps if args.expert_anneal_steps is not None else (0 if args.quick else 400)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times = {}
    started = t0 = time.perf_counter()
    summary = synth(work / "raw", clips=clips, seconds=args.seconds if not args.quick else 3.0, size=160,
                    val_fraction=0.2, seed=args.seed, progress=False)
    times["synth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preprocess(work / "raw", work / "data", workers=2, progress=False)
    times["preprocess"] = time.perf_counter() - t0
    print(f"data set: {clips} clips, {summary['faces']} faces (left out: {summary['faces_left_out'] or 'none'}), "
          f"fingerprint {data_fingerprint(work / 'data')}", flush=True)

    t0 = time.perf_counter()
    expert = work / "expert.pth"
    stretches = [(e_steps, args.expert_lr)] + ([(e_steps + e_anneal, args.expert_anneal_lr)] if e_anneal else [])
    for steps, lr in stretches:
        # the second stretch resumes the first at a lower rate (`lipdub train expert --resume --lr`)
        train_expert(ExpertOptions(work / "data", expert, steps=steps, batch_size=e_batch, lr=lr,
                                   resume=expert.is_file(), eval_interval=100, eval_samples=256,
                                   checkpoint_interval=100, log_interval=25, workers=args.workers, device="cpu",
                                   seed=args.seed, threads=args.threads, precision=args.precision))
    times["expert"] = time.perf_counter() - t0
    acc = expert_accuracy(expert, work / "data", 256 if args.quick else 1024)
    print(f"expert held-out: accuracy {acc['accuracy']:.3f} on {acc['n']} val windows, loss {acc['loss']:.4f}", flush=True)

    t0 = time.perf_counter()
    gen = work / "wav2lip.pth"
    train_generator(GeneratorOptions(work / "data", gen, expert, steps=g_steps, batch_size=args.generator_batch,
                                     lr=args.generator_lr, resume=gen.is_file(), eval_interval=150,
                                     eval_samples=16, checkpoint_interval=50, sample_interval=150,
                                     log_interval=10, workers=args.workers, device="cpu", seed=args.seed,
                                     threads=args.threads, precision=args.precision))
    times["generator"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    corr = generator_correlation(gen, work / "data")
    times["measure"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - started
    per_clip = corr["per_clip_matched_r"]
    result = {
        "expert_val_accuracy": round(acc["accuracy"], 4), "expert_val_loss": round(acc["loss"], 4),
        "expert_val_windows": acc["n"],
        "generator_matched_r": round(corr["matched_r"], 4), "generator_mismatched_r": round(corr["mismatched_r"], 4),
        "generator_val_frames": corr["frames"], "generator_per_clip_matched_r": per_clip,
        "generator_per_clip_min_max": [min(per_clip), max(per_clip)], "val_clips": corr["per_clip_names"],
        "sync_gate_step": gate_step(work / "wav2lip_logs"),
        "steps": {"expert": e_steps, "expert_anneal": e_anneal, "generator": g_steps}, "clips": clips,
        "faces": summary["faces"], "faces_left_out": summary["faces_left_out"],
        "batch": {"expert": e_batch, "generator": args.generator_batch},
        "lr": {"expert": args.expert_lr, "expert_anneal": args.expert_anneal_lr, "generator": args.generator_lr},
        "precision": args.precision, "seed": args.seed, "torch_threads": args.threads,
        "fingerprints": {"data": data_fingerprint(work / "data"), "expert": weights_fingerprint(expert),
                         "generator": weights_fingerprint(gen)},
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))
    if args.quick:
        return 0
    ok = (acc["accuracy"] >= TARGETS["expert"] and corr["matched_r"] >= TARGETS["matched_r"]
          and corr["mismatched_r"] <= TARGETS["mismatched_r"])
    print("targets (expert >= 0.90, matched r >= 0.80, mismatched r <= 0.30):", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
