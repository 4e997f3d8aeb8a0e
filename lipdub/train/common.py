"""Shared training plumbing: checkpoints, logs, distributed helpers, reproducibility.

Checkpoints use the official Wav2Lip layout, a dict with exactly ``state_dict``, ``optimizer``,
``global_step`` and ``global_epoch`` (tensors, ints and None only, so ``torch.load(...,
weights_only=True)`` and the original inference both read them). State that the official
format has no room for (the sync-loss weight the schedule has reached, the run's settings) goes
to a JSON side file next to the checkpoint, ``<checkpoint>.train.json``. Both are written
through `lipdub.media.atomic_output`, so a reader never sees half a file.

Logs: TensorBoard event files (``events.out.tfevents.*``, written by `tensorboardX`), the same
scalars in ``metrics.csv``, and one line per log interval on the console.

Reproducibility (`reproducible`): a run is a function of its seed, its thread count and its
machine. The data order, the augmentation and the negatives come from per-item generators
(`lipdub.train.data`); the initial weights from ``torch.manual_seed``; the kernels are
restricted to deterministic ones and the CPU thread count is fixed for the run.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed
from tensorboardX import SummaryWriter

from ..errors import LipdubError
from ..media import atomic_output, write_atomic
from ..weights import load_checkpoint, load_state_dict

T = 5  # frames per window (the original's syncnet_T)
IMG_SIZE = 96


# -------------------------------------------------------------------------------------- options


@dataclass(kw_only=True)
class RunOptions:
    """The settings `train expert` and `train generator` share (keyword-only, so each trainer's
    own fields, data set and output first, stay positional)."""

    lr: float = 1e-4
    resume: bool = False
    log_interval: int = 50
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    augment: bool = True
    log_dir: Path | None = None
    quiet: bool = False
    threads: int = 0
    precision: str = "fp32"


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    global_step: int, global_epoch: int) -> None:
    """Write an official-format checkpoint atomically."""
    state = {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "global_step": int(global_step),
        "global_epoch": int(global_epoch),
    }
    with atomic_output(path) as temp:
        torch.save(state, temp)


def load_training_checkpoint(path: Path, kind: str) -> dict:
    """A checkpoint to resume from: the whole dict, its state dict checked against `kind`."""
    path = Path(path)
    state = load_state_dict(path, kind)  # structure check, `module.` stripped
    raw = load_checkpoint(path)
    if not isinstance(raw, dict) or "global_step" not in raw:
        raise LipdubError(f"{path.name} is not a training checkpoint (no global_step); cannot resume from it")
    raw["state_dict"] = state
    return raw


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict | None, lr: float) -> None:
    """Restore Adam's moments from a checkpoint but train on at the `--lr` of this run.

    The saved param_groups carry the learning rate of the run that wrote them; keeping it would
    silently ignore `--lr` on `--resume` (so no lowering the rate for a last stretch).
    A resume at the same `--lr` stays bit for bit.
    """
    if state is not None:
        optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["lr"] = lr


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=float))


def sidecar(path: Path) -> Path:
    return Path(str(path) + ".train.json")


# ----------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """Where this process stands in a `torchrun` job (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not torch.distributed.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_float(value: float, dist_info: Dist, device: torch.device) -> float:
    if not dist_info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, 0)
    return float(t.item())


def barrier(dist_info: Dist) -> None:
    if dist_info.enabled:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------- reproducibility


@contextlib.contextmanager
def reproducible(seed: int, threads: int = 0) -> Iterator[None]:
    """Run the block seeded, on deterministic kernels and at a fixed CPU thread count.

    Seeds Python's, NumPy's and torch's global generators (the data itself is drawn from
    per-item generators, see `lipdub.train.data`), switches `torch.use_deterministic_algorithms`
    on (``warn_only``: an op without a deterministic kernel, which the CPU kernels used here do
    not have, warns instead of failing), turns off cuDNN's benchmark autotuner and, with
    `threads` > 0, fixes torch's intra-op thread count. The previous settings come back when the
    block ends, so calling a trainer does not change the caller's process.
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.get_num_threads())
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
        torch.set_num_threads(before[3])


def worker_init(worker_id: int) -> None:
    """DataLoader worker start: one torch thread (the workers only decode and slice; the items are
    seeded per item, so nothing here depends on which worker takes which batch)."""
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- logs


class Logger:
    """Scalars to TensorBoard event files (tensorboardX), a CSV file and (with `echo`) the console."""

    def __init__(self, log_dir: Path | None, enabled: bool = True, quiet: bool = False):
        self.enabled = enabled and log_dir is not None
        self.quiet = quiet or not enabled
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._events = None
        self._csv = None
        if self.enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._events = SummaryWriter(logdir=str(self.log_dir), filename_suffix=f".{os.getpid()}.lipdub")
            new = not (self.log_dir / "metrics.csv").exists()
            self._csv = open(self.log_dir / "metrics.csv", "a", newline="")
            self._csv_writer = csv.writer(self._csv)
            if new:
                self._csv_writer.writerow(["wall_time", "step", "tag", "value"])

    def scalars(self, step: int, values: dict[str, float], echo: str | None = None) -> None:
        values = {k: float(v) for k, v in values.items()}
        if self.enabled:
            now = time.time()
            for k, v in values.items():
                self._events.add_scalar(k, v, global_step=step, walltime=now)
                self._csv_writer.writerow([f"{now:.3f}", step, k, f"{v:.6g}"])
            self._events.flush()
            self._csv.flush()
        if echo is not None and not self.quiet:
            text = "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in values.items())
            print(f"[{echo} step {step}] {text}", flush=True)

    def print(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        if self._csv is not None:
            self._csv.close()


def default_log_dir(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_logs")
