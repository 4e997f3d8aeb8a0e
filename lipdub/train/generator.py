"""`lipdub train generator`: Wav2Lip with L1 + expert sync loss (+ visual-quality GAN).

As the original (`wav2lip_train.py`, and `hq_wav2lip_train.py` with `--gan`):

* loss = sync_wt * sync + disc_wt * perceptual + (1 - sync_wt - disc_wt) * L1;
* sync_wt starts at 0 and becomes 0.01 (0.03 with `--gan`) for good once the mean sync loss of
  the generated val frames, measured at an evaluation, drops below 0.75;
* `--sync-from-step N` (not in the original; off by default) switches the sync loss on at
  global step N whatever the evaluation says. On real footage the original's gate opens late
  (users report about 280k steps, primepake/wav2lip_288x288#34; Rudrabha/Wav2Lip#61 asks for
  exactly this switch); with it a fine-tuning run can use the expert from its first step;
* disc_wt = 0.07 with `--gan` (else 0); the discriminator learns BCE real-vs-generated on the
  ground-truth and generated faces after each generator step;
* Adam at 1e-4 (betas 0.5, 0.999 with `--gan`, the PyTorch default without, as the originals).

Unlike the original, the expert is loaded strictly, frozen and kept in eval mode (its
BatchNorm uses its running statistics; it is never switched to training mode).

Outputs: the generator checkpoint (`-o`), the discriminator's next to it (`<stem>_disc.pth`,
with `--gan`), both in the official format; `<checkpoint>.train.json` with the sync weight the
schedule reached (needed to resume); logs and sample sheets (reference | masked input |
generated | ground truth, one row per frame) under the log folder.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from ..device import autocast, pick_device, resolve_precision
from ..errors import LipdubError
from ..models.syncnet import SyncNetColor
from ..models.wav2lip import Wav2Lip, Wav2LipDiscQual
from ..weights import generator_variant, load_state_dict
from .common import (
    Logger, RunOptions, barrier, broadcast_float, default_log_dir, init_distributed, load_optimizer_state,
    load_training_checkpoint, reproducible, save_checkpoint, sidecar, write_json_atomic,
)
from .data import FixedBatches, GeneratorDataset, StepBatches
from .expert import loader

SYNC_THRESHOLD = 0.75
DISC_WT = 0.07


@dataclass
class GeneratorOptions(RunOptions):
    data_dir: Path
    output: Path
    expert: Path
    steps: int = 100000
    batch_size: int = 16
    disc_lr: float = 1e-4
    gan: bool = False
    eval_interval: int = 3000
    eval_samples: int = 64
    checkpoint_interval: int = 3000
    sample_interval: int = 3000
    sync_from_step: int | None = None


def disc_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_disc" + output.suffix)


def load_expert(path: Path, device) -> SyncNetColor:
    if not Path(path).is_file():
        raise LipdubError(f"expert checkpoint not found: {path}")
    expert = SyncNetColor()
    expert.load_state_dict(load_state_dict(path, "syncnet_color"), strict=True)
    expert.to(device).eval()
    for p in expert.parameters():
        p.requires_grad_(False)
    return expert


def expert_sync_loss(expert: SyncNetColor, mel: torch.Tensor, g: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Sync loss of generated windows g (B, 3, T, 96, 96) against their mel window: BCE(cos, 1)."""
    assert not expert.training, "the expert must judge in eval mode"
    with autocast(g.device, precision):
        a, v = expert(mel, SyncNetColor.face_input(g))
    d = F.cosine_similarity(a.float(), v.float()).clamp(0.0, 1.0)
    return F.binary_cross_entropy(d.unsqueeze(1), torch.ones_like(d).unsqueeze(1))


def _disc_split(pred: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disc output for cat([real, fake]) of `batch` each, folded time-major: (T * 2B, 1) -> real, fake."""
    p = pred.view(-1, 2 * batch)
    return p[:, :batch].reshape(-1, 1), p[:, batch:].reshape(-1, 1)


def sample_sheet(x: torch.Tensor, g: torch.Tensor, gt: torch.Tensor, limit: int = 4) -> np.ndarray:
    """BGR uint8 sheet: per item and frame a row of reference | masked input | generated | ground truth."""
    def img(t):
        return (t.detach().float().cpu().clamp(0, 1).numpy().transpose(0, 2, 3, 4, 1) * 255).round().astype(np.uint8)

    x_, g_, gt_ = img(x), img(g), img(gt)  # (B, T, H, W, C)
    refs, inputs = x_[..., 3:], x_[..., :3]
    rows = []
    for b in range(min(limit, len(g_))):
        for t in range(g_.shape[1]):
            rows.append(np.concatenate([refs[b, t], inputs[b, t], g_[b, t], gt_[b, t]], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


@torch.no_grad()
def evaluate_generator(model, expert, disc, dataset, n: int, batch_size: int, device, workers: int = 0):
    model.eval()
    if disc is not None:
        disc.eval()
    sums = {"l1": 0.0, "sync": 0.0, "disc_real": 0.0, "disc_fake": 0.0, "perceptual": 0.0}
    batches = 0
    first = None
    for x, indiv, mel, gt in loader(dataset, FixedBatches(n, batch_size), workers):
        x, indiv, mel, gt = x.to(device), indiv.to(device), mel.to(device), gt.to(device)
        g = model(indiv, x)
        sums["l1"] += float(F.l1_loss(g, gt))
        sums["sync"] += float(expert_sync_loss(expert, mel, g))
        if disc is not None:
            real, fake = disc(gt), disc(g)
            sums["disc_real"] += float(F.binary_cross_entropy(real, torch.ones_like(real)))
            sums["disc_fake"] += float(F.binary_cross_entropy(fake, torch.zeros_like(fake)))
            sums["perceptual"] += float(F.binary_cross_entropy(fake, torch.ones_like(fake)))
        batches += 1
        if first is None:
            first = (x, g, gt)
    out = {k: v / max(1, batches) for k, v in sums.items() if disc is not None or not k.startswith(("disc", "perc"))}
    return out, first


def train_generator(opts: GeneratorOptions) -> dict:
    """Train (or resume) the generator to `opts.steps`; seeded and on deterministic kernels (see
    `lipdub.train.common.reproducible`)."""
    with reproducible(opts.seed, opts.threads):
        return _train_generator(opts)


def _train_generator(opts: GeneratorOptions) -> dict:
    dist_info = init_distributed(opts.device)
    device = pick_device(opts.device, dist_info.local_rank)
    precision = resolve_precision(device, opts.precision)
    if opts.steps < 0:
        raise LipdubError("--steps must be 0 or more")
    output = Path(opts.output)
    if not output.parent.is_dir():
        raise LipdubError(f"output folder does not exist: {output.parent}")
    expert = load_expert(opts.expert, device)
    train_set = GeneratorDataset(opts.data_dir, "train", seed=opts.seed, augment=opts.augment)
    try:
        val_set = GeneratorDataset(opts.data_dir, "val", seed=opts.seed + 1_000_003)
    except LipdubError:
        val_set = None

    torch.manual_seed(opts.seed)
    model = Wav2Lip().to(device)
    betas = (0.5, 0.999) if opts.gan else (0.9, 0.999)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opts.lr, betas=betas)
    disc = disc_optimizer = None
    if opts.gan:
        disc = Wav2LipDiscQual().to(device)
        disc_optimizer = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=opts.disc_lr,
                                          betas=(0.5, 0.999))
    step = epoch = 0
    sync_wt = 0.0
    if opts.resume:
        if not output.is_file():
            raise LipdubError(f"--resume: no checkpoint at {output}")
        ckpt = load_training_checkpoint(output, "wav2lip")
        if generator_variant(ckpt["state_dict"], str(output)) != "wav2lip":
            raise LipdubError(f"--resume: {output} is a 256x256 generator; training covers the 96x96 Wav2Lip only")
        model.load_state_dict(ckpt["state_dict"], strict=True)
        load_optimizer_state(optimizer, ckpt.get("optimizer"), opts.lr)
        step, epoch = int(ckpt["global_step"]), int(ckpt["global_epoch"])
        if sidecar(output).is_file():
            sync_wt = float(json.loads(sidecar(output).read_text()).get("syncnet_wt", 0.0))
        if opts.gan:
            if not disc_path(output).is_file():
                raise LipdubError(f"--resume --gan: no discriminator checkpoint at {disc_path(output)}")
            dck = load_training_checkpoint(disc_path(output), "wav2lip_disc_qual")
            disc.load_state_dict(dck["state_dict"], strict=True)
            load_optimizer_state(disc_optimizer, dck.get("optimizer"), opts.disc_lr)
    net, dnet = model, disc
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if disc is not None:
            dnet = torch.nn.parallel.DistributedDataParallel(disc, device_ids=ids)
    disc_wt = DISC_WT if opts.gan else 0.0
    on_weight = 0.03 if opts.gan else 0.01  # the sync weight once switched on

    log_dir = Path(opts.log_dir or default_log_dir(output))
    log = Logger(log_dir, enabled=dist_info.main, quiet=opts.quiet)
    log.print(f"generator: {len(train_set.index.clips)} train clips ({train_set.index.n_windows} windows), "
              f"{len(val_set.index.clips) if val_set else 0} val clips; step {step} -> {opts.steps}; "
              f"batch {opts.batch_size} x {dist_info.world} process(es) on {device}, {precision}; gan {opts.gan}; "
              f"sync weight {sync_wt}")
    if val_set is None:
        log.print("generator: no val clips: no evaluation, and the sync loss stays off (its schedule needs them)")
    per_step = opts.batch_size * dist_info.world
    last_eval: dict = {}
    sums: dict[str, float] = {}
    count, started = 0, time.perf_counter()

    def checkpoint() -> None:
        if not dist_info.main:
            return
        save_checkpoint(output, model, optimizer, step, epoch)
        if disc is not None:
            save_checkpoint(disc_path(output), disc, disc_optimizer, step, epoch)
        write_json_atomic(sidecar(output), {"kind": "generator", "global_step": step, "syncnet_wt": sync_wt,
                                            "disc_wt": disc_wt, "gan": opts.gan, "seed": opts.seed,
                                            "batch_size": opts.batch_size, "lr": opts.lr,
                                            "precision": precision, "sync_from_step": opts.sync_from_step,
                                            "world_size": dist_info.world, "expert": str(opts.expert),
                                            "data_dir": str(opts.data_dir), "eval": last_eval})

    def run_eval(sheet: bool) -> None:
        nonlocal last_eval, sync_wt
        # The schedule moves only at evaluation steps of the interval, so a run stopped anywhere
        # and resumed takes exactly the decisions an uninterrupted run takes.
        scheduled = step % opts.eval_interval == 0
        if dist_info.main and val_set is not None:
            last_eval, first = evaluate_generator(model, expert, disc, val_set, opts.eval_samples,
                                                  opts.batch_size, device, opts.workers)
            if scheduled and last_eval["sync"] < SYNC_THRESHOLD and sync_wt == 0.0:
                sync_wt = on_weight
                log.print(f"generator: eval sync loss {last_eval['sync']:.3f} < {SYNC_THRESHOLD}: "
                          f"sync loss weight now {sync_wt}")
            log.scalars(step, {f"eval/{k}": v for k, v in last_eval.items()} | {"eval/syncnet_wt": sync_wt},
                        echo="generator eval")
            if sheet and first is not None:
                (log_dir / "samples").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(log_dir / "samples" / f"step{step:09d}.png"), sample_sheet(*first))
        sync_wt = broadcast_float(sync_wt, dist_info, device)

    batches = loader(train_set, StepBatches(step, opts.steps, opts.batch_size, dist_info.rank, dist_info.world),
                     opts.workers, opts.seed)
    for x, indiv, mel, gt in batches:
        if opts.sync_from_step is not None and step >= opts.sync_from_step and sync_wt == 0.0:
            sync_wt = on_weight
            log.print(f"generator: step {step} >= --sync-from-step {opts.sync_from_step}: "
                      f"sync loss weight now {sync_wt}")
        net.train()
        x, indiv, mel, gt = x.to(device), indiv.to(device), mel.to(device), gt.to(device)
        with autocast(device, precision):
            g = net(indiv, x)
        g = g.float()
        l1 = F.l1_loss(g, gt)
        loss = (1.0 - sync_wt - disc_wt) * l1
        metrics = {"l1": l1.item()}
        if sync_wt > 0:
            s_loss = expert_sync_loss(expert, mel, g, precision)
            loss = loss + sync_wt * s_loss
            metrics["sync"] = s_loss.item()
        if disc is not None:
            disc.train()
            with autocast(device, precision):
                fake_pred = disc(g).float()  # unwrapped: its gradients are discarded below, not all-reduced
            perceptual = F.binary_cross_entropy(fake_pred, torch.ones_like(fake_pred))
            loss = loss + disc_wt * perceptual
            metrics["perceptual"] = perceptual.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if disc is not None:
            disc_optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                pred = dnet(torch.cat([gt, g.detach()], dim=0)).float()
            real, fake = _disc_split(pred, gt.size(0))
            d_real = F.binary_cross_entropy(real, torch.ones_like(real))
            d_fake = F.binary_cross_entropy(fake, torch.zeros_like(fake))
            (d_real + d_fake).backward()
            disc_optimizer.step()
            metrics.update(disc_real=d_real.item(), disc_fake=d_fake.item())
        step += 1
        epoch = step * per_step // max(1, len(train_set))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if step % opts.log_interval == 0 or step == opts.steps:
            rate = count / max(1e-9, time.perf_counter() - started)
            log.scalars(step, {f"train/{k}": v / count for k, v in sums.items()} | {"train/steps_per_s": rate},
                        echo="generator")
            sums, count, started = {}, 0, time.perf_counter()
        if step % opts.eval_interval == 0 and step != opts.steps:
            run_eval(sheet=step % opts.sample_interval == 0)
        elif step % opts.sample_interval == 0 and dist_info.main:
            (log_dir / "samples").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(log_dir / "samples" / f"step{step:09d}.png"), sample_sheet(x, g, gt))
        if step % opts.checkpoint_interval == 0 and step != opts.steps:
            checkpoint()
    run_eval(sheet=True)
    checkpoint()
    log.close()
    barrier(dist_info)
    return {"global_step": step, "global_epoch": epoch, "eval": last_eval, "syncnet_wt": sync_wt,
            "output": str(output),
            "model": model}
