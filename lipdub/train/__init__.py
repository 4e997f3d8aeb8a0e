"""Training: `lipdub synth`, `lipdub preprocess`, `lipdub train expert|generator`.

Multi-GPU (or multi-process CPU) training uses DistributedDataParallel when launched with
torchrun, e.g. ``torchrun --nproc_per_node 4 -m lipdub train generator DATA -o g.pth --expert e.pth``;
each process takes its own batches (``--batch-size`` is per process), rank 0 evaluates, logs and
writes the checkpoints. ``--device`` picks cpu / cuda / cuda:N / mps (auto: CUDA when present;
under torchrun each process uses the GPU of its LOCAL_RANK); the backend is NCCL on CUDA, gloo
otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..device import PRECISIONS
from ..errors import LipdubError
from . import expert, generator, preprocess, synth


def _synth(args: argparse.Namespace) -> int:
    summary = synth.synth(Path(args.out_dir), clips=args.clips, seconds=args.seconds, size=args.size, fps=args.fps,
                    val_fraction=args.val_fraction, seed=args.seed,
                    media=Path(args.media) if args.media else None, progress=not args.quiet)
    print(f"wrote {summary['clips']} clips ({summary['val']} val) of {summary['seconds']:g} s to {args.out_dir}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    report = preprocess.preprocess(Path(args.raw_dir), Path(args.data_dir), workers=args.workers, detector=args.detector,
                        val_fraction=args.val_fraction, crop_size=args.crop_size, progress=not args.quiet)
    if not report["done"]:
        reasons = sorted({r.split(" (")[0] for r in report["skipped"].values()})
        raise LipdubError(f"no usable clip in {args.raw_dir}: all {report['videos']} skipped "
                          f"({', '.join(reasons)}); see {Path(args.data_dir) / 'preprocess_report.json'}")
    return 0


def _common_train(p: argparse.ArgumentParser, steps: int, batch: int, interval: int) -> None:
    p.add_argument("data_dir", help="preprocessed data set (lipdub preprocess)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (official Wav2Lip format)")
    p.add_argument("--steps", type=int, default=steps, help=f"train until this global step (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"windows per step and process (default {batch})")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4, as the original)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --output")
    p.add_argument("--eval-interval", type=int, default=interval, help="steps between evaluations on the val list")
    p.add_argument("--eval-samples", type=int, default=None, help="val windows per evaluation")
    p.add_argument("--checkpoint-interval", type=int, default=interval, help="steps between checkpoints")
    p.add_argument("--log-interval", type=int, default=50, help="steps between console / log lines")
    p.add_argument("--log-dir", default=None, help="TensorBoard / CSV logs and samples (default <output>_logs)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads, fixed for the run (0 = torch default, one per core)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the data order, the augmentation and the negatives "
                        "(a run is repeatable for a given seed, thread count and machine)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="bf16: forward passes under bfloat16 autocast, about 2x faster on CPUs with "
                        "AVX-512 BF16/AMX and on recent GPUs (weights and losses stay fp32); "
                        "auto: bf16 where the hardware has it natively (default fp32)")
    p.add_argument("--no-augment", action="store_true", help="no flips / colour jitter on training windows")
    p.add_argument("--quiet", action="store_true", help="no console lines")


def _run_options(args: argparse.Namespace) -> dict:
    """The flags of `_common_train` that map onto `RunOptions`, shared by both trainers."""
    return dict(lr=args.lr, resume=args.resume, log_interval=args.log_interval, workers=args.workers,
                device=args.device, seed=args.seed, augment=not args.no_augment,
                log_dir=Path(args.log_dir) if args.log_dir else None, quiet=args.quiet, threads=args.threads,
                precision=args.precision)


def _train_expert(args: argparse.Namespace) -> int:
    result = expert.train_expert(expert.ExpertOptions(
        Path(args.data_dir), Path(args.output), steps=args.steps, batch_size=args.batch_size,
        eval_interval=args.eval_interval, eval_samples=args.eval_samples or 512,
        checkpoint_interval=args.checkpoint_interval, **_run_options(args)))
    if not args.quiet:
        ev = result["eval"]
        extra = f", val loss {ev['loss']:.4f}, val accuracy {ev['accuracy']:.3f}" if ev else ""
        print(f"wrote {result['output']} at step {result['global_step']}{extra}")
    return 0


def _train_generator(args: argparse.Namespace) -> int:
    result = generator.train_generator(generator.GeneratorOptions(
        Path(args.data_dir), Path(args.output), Path(args.expert), steps=args.steps, batch_size=args.batch_size,
        disc_lr=args.disc_lr, gan=args.gan, eval_interval=args.eval_interval, eval_samples=args.eval_samples or 64,
        checkpoint_interval=args.checkpoint_interval, sample_interval=args.sample_interval or args.eval_interval,
        sync_from_step=args.sync_from_step, **_run_options(args)))
    if not args.quiet:
        ev = result["eval"]
        extra = f", val L1 {ev['l1']:.4f}, val sync loss {ev['sync']:.4f}" if ev else ""
        print(f"wrote {result['output']} at step {result['global_step']}{extra}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic talking-face data set (raw videos)")
    p.add_argument("out_dir")
    p.add_argument("--clips", type=int, default=40, help="number of clips (default 40)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each clip (default 4)")
    p.add_argument("--size", type=int, default=160, help="frame width and height in pixels (default 160)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of clips written under val/ (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--media", default=None, help="folder with the source faces and speech (default shared/media)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_synth)

    p = sub.add_parser("preprocess", help="videos -> face crops + 16 kHz audio for training")
    p.add_argument("raw_dir", help="folder searched (recursively) for videos")
    p.add_argument("data_dir", help="where the clip folders, filelists and report go")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = one per CPU core)")
    p.add_argument("--detector", default="centerface", choices=["centerface", "s3fd"])
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of clips in the val list when not under a val/ folder (default 0.1)")
    p.add_argument("--crop-size", type=int, default=96, help="side of the saved face crops (default 96)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_preprocess)

    p = sub.add_parser("train", help="train the lip-sync expert or the generator")
    tsub = p.add_subparsers(dest="train_command", required=True)
    e = tsub.add_parser("expert", help="the lip-sync expert (SyncNet_color)")
    _common_train(e, steps=10000, batch=64, interval=1000)
    e.set_defaults(handler=_train_expert)
    g = tsub.add_parser("generator", help="the Wav2Lip generator (L1 + expert sync loss, --gan for the GAN)")
    _common_train(g, steps=100000, batch=16, interval=3000)
    g.add_argument("--expert", required=True, help="trained expert checkpoint (syncnet_color)")
    g.add_argument("--gan", action="store_true", help="with the visual-quality discriminator (hq_wav2lip_train)")
    g.add_argument("--disc-lr", type=float, default=1e-4, help="discriminator learning rate (default 1e-4)")
    g.add_argument("--sync-from-step", type=int, default=None, metavar="N",
                   help="switch the expert sync loss on at step N even if the eval sync loss is still >= 0.75 "
                        "(default: the original schedule only)")
    g.add_argument("--sample-interval", type=int, default=None, help="steps between sample sheets (default: eval interval)")
    g.set_defaults(handler=_train_generator)


__all__ = ["add_cli"]
