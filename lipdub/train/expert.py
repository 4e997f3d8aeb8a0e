"""`lipdub train expert`: the lip-sync expert (SyncNet_color), as the original trains it.

BCE on the cosine similarity of the audio and face embeddings against the in-sync label,
Adam at 1e-4 (`hparams.syncnet_lr`), batch 64 (`syncnet_batch_size`). Evaluation on the val
list reports the mean loss and the accuracy (in sync when the cosine similarity > 0.5) on a
fixed, balanced set of val windows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..device import autocast, pick_device, resolve_precision
from ..errors import LipdubError
from ..models.syncnet import SyncNetColor
from .common import (
    Logger, RunOptions, barrier, default_log_dir, init_distributed, load_optimizer_state, load_training_checkpoint,
    reproducible, save_checkpoint, sidecar, worker_init, write_json_atomic,
)
from .data import ExpertDataset, FixedBatches, StepBatches


@dataclass
class ExpertOptions(RunOptions):
    data_dir: Path
    output: Path
    steps: int = 10000
    batch_size: int = 64
    eval_interval: int = 1000
    eval_samples: int = 512
    checkpoint_interval: int = 1000


def sync_loss(audio_emb: torch.Tensor, face_emb: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The original's `cosine_loss`: BCE of the cosine similarity (in [0, 1]) against the label."""
    d = F.cosine_similarity(audio_emb, face_emb).clamp(0.0, 1.0)
    return F.binary_cross_entropy(d.unsqueeze(1), label)


def loader(dataset, sampler, workers: int, seed: int = 0) -> DataLoader:
    """Batches in the sampler's order whatever the workers' timing (the DataLoader hands them out
    in order; every item is seeded by its own number, see `lipdub.train.data`). The loader's own
    generator, not torch's global one, seeds the workers."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers else None, worker_init_fn=worker_init,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_expert(model: SyncNetColor, dataset: ExpertDataset, n: int, batch_size: int, device, workers: int = 0) -> dict:
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, mel, y in loader(dataset, FixedBatches(n, batch_size), workers):
        x, mel, y = x.to(device), mel.to(device), y.to(device)
        a, v = model(mel, x)
        d = F.cosine_similarity(a, v).clamp(0.0, 1.0)
        loss_sum += float(F.binary_cross_entropy(d.unsqueeze(1), y, reduction="sum"))
        correct += int(((d > 0.5).float() == y.squeeze(1)).sum())
        total += len(y)
    return {"loss": loss_sum / max(1, total), "accuracy": correct / max(1, total), "n": total}


def train_expert(opts: ExpertOptions) -> dict:
    """Train (or resume) the expert to `opts.steps`; seeded and on deterministic kernels (see
    `lipdub.train.common.reproducible`)."""
    with reproducible(opts.seed, opts.threads):
        return _train_expert(opts)


def _train_expert(opts: ExpertOptions) -> dict:
    dist_info = init_distributed(opts.device)
    device = pick_device(opts.device, dist_info.local_rank)
    precision = resolve_precision(device, opts.precision)
    if opts.steps < 0:
        raise LipdubError("--steps must be 0 or more")
    output = Path(opts.output)
    if not output.parent.is_dir():
        raise LipdubError(f"output folder does not exist: {output.parent}")
    train_set = ExpertDataset(opts.data_dir, "train", seed=opts.seed, augment=opts.augment)
    try:
        val_set = ExpertDataset(opts.data_dir, "val", seed=opts.seed + 1_000_003, balanced=True)
    except LipdubError:
        val_set = None

    torch.manual_seed(opts.seed)
    model = SyncNetColor().to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    step = epoch = 0
    if opts.resume:
        if not output.is_file():
            raise LipdubError(f"--resume: no checkpoint at {output}")
        ckpt = load_training_checkpoint(output, "syncnet_color")
        model.load_state_dict(ckpt["state_dict"], strict=True)
        load_optimizer_state(optimizer, ckpt.get("optimizer"), opts.lr)
        step, epoch = int(ckpt["global_step"]), int(ckpt["global_epoch"])
    net = model
    if dist_info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    log = Logger(opts.log_dir or default_log_dir(output), enabled=dist_info.main, quiet=opts.quiet)
    log.print(f"expert: {len(train_set.index.clips)} train clips ({train_set.index.n_windows} windows), "
              f"{len(val_set.index.clips) if val_set else 0} val clips; step {step} -> {opts.steps}; "
              f"batch {opts.batch_size} x {dist_info.world} process(es) on {device}, {precision}")
    per_step = opts.batch_size * dist_info.world
    last_eval: dict = {}
    sums, count, started = {"loss": 0.0, "accuracy": 0.0}, 0, time.perf_counter()

    def checkpoint() -> None:
        if dist_info.main:
            save_checkpoint(output, model, optimizer, step, epoch)
            write_json_atomic(sidecar(output), {"kind": "expert", "global_step": step, "seed": opts.seed,
                                                "batch_size": opts.batch_size, "lr": opts.lr,
                                                "precision": precision, "world_size": dist_info.world,
                                                "data_dir": str(opts.data_dir), "eval": last_eval})

    def run_eval() -> None:
        nonlocal last_eval
        if dist_info.main and val_set is not None:
            last_eval = evaluate_expert(model, val_set, opts.eval_samples, opts.batch_size, device, opts.workers)
            log.scalars(step, {"eval/loss": last_eval["loss"], "eval/accuracy": last_eval["accuracy"]}, echo="expert eval")

    batches = loader(train_set, StepBatches(step, opts.steps, opts.batch_size, dist_info.rank, dist_info.world),
                     opts.workers, opts.seed)
    for x, mel, y in batches:
        net.train()
        x, mel, y = x.to(device), mel.to(device), y.to(device)
        with autocast(device, precision):
            a, v = net(mel, x)
        a, v = a.float(), v.float()
        loss = sync_loss(a, v, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        epoch = step * per_step // max(1, len(train_set))
        with torch.no_grad():
            acc = ((F.cosine_similarity(a, v) > 0.5).float() == y.squeeze(1)).float().mean()
        sums["loss"] += loss.item()
        sums["accuracy"] += float(acc)
        count += 1
        if step % opts.log_interval == 0 or step == opts.steps:
            rate = count / max(1e-9, time.perf_counter() - started)
            log.scalars(step, {"train/loss": sums["loss"] / count, "train/accuracy": sums["accuracy"] / count,
                               "train/steps_per_s": rate}, echo="expert")
            sums, count, started = {"loss": 0.0, "accuracy": 0.0}, 0, time.perf_counter()
        if step % opts.eval_interval == 0 and step != opts.steps:
            run_eval()
        if step % opts.checkpoint_interval == 0 and step != opts.steps:
            checkpoint()
    run_eval()
    checkpoint()
    log.close()
    barrier(dist_info)
    return {"global_step": step, "global_epoch": epoch, "eval": last_eval, "output": str(output),
            "model": model}
