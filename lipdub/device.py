"""Where the networks run and at what precision: chosen once, here, for every job.

`pick_device("auto")` prefers CUDA, then Apple's MPS, then the CPU. `resolve_precision` turns
`auto` into bf16 only where the hardware computes bf16 natively (CUDA with bf16, CPUs with
AVX-512 BF16 or AMX): emulated bf16 on older CPUs is slower than fp32. `cpu_count` is the number
of cores this process may use (its affinity mask, not the machine's core count), which sizes
thread pools.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import LipdubError
from .options import PRECISIONS, check_device_name


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The torch device for `--device`; `local_rank` picks the GPU of a `torchrun` process."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    problem = check_device_name(name)
    if problem:
        raise LipdubError(problem)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LipdubError("--device cuda requested but CUDA is not available")
        if name == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if name == "mps" and not mps_available():
        raise LipdubError("--device mps requested but MPS is not available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto' -> 'bf16' where the hardware runs bf16 natively, else 'fp32'; others unchanged."""
    if precision not in PRECISIONS:
        raise LipdubError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The forward-pass context for a resolved precision: bf16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise LipdubError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})")


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
