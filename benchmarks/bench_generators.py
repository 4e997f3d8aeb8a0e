"""Speed of the Wav2Lip generators alone: the 96x96 network against the 256x256 one, same run.

    python benchmarks/bench_generators.py                  # batch 16, 5 rounds, this machine's threads
    python benchmarks/bench_generators.py --batch-256 8 --rounds 7 --threads 2

Both networks are loaded through `lipdub.weights.load_model` from rule-A checkpoints in the
official format (the kind "wav2lip" for both: the checkpoint decides the face size) and run on
random faces (lower half masked) and mel windows, under `torch.inference_mode`, at:

* fp32: the network as loaded;
* bf16: `torch.autocast("cpu", dtype=torch.bfloat16)` around the same network;
* bf16 fused: autocast after folding BatchNorm into the convolutions, channels-last (what
  `lipdub.generate.Generator` runs at bf16).

Configurations are interleaved round by round (so load from other processes hits all of them
alike) and the median batch time is reported as frames/s and as a ratio to the 96 fp32 speed.
The CPU time this process spent per frame (all its threads) is printed too: on a machine shared
with other jobs it is steadier than the wall clock, which counts the time the threads waited.
bf16 only pays on CPUs with native bf16 (AVX-512 BF16 or AMX); elsewhere it is emulated and slow.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from bench_common import wav2lip256_checkpoint, wav2lip_checkpoint
from lipdub import weights
from lipdub.device import cpu_has_bf16
from lipdub.models.wav2lip import fuse_batchnorm




def inputs(size: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    faces = rng.random((batch, 6, size, size), dtype=np.float32)
    faces[:, :3, size // 2:] = 0
    mels = rng.uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
    return torch.from_numpy(mels), torch.from_numpy(faces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="frames per batch for the 96 model")
    parser.add_argument("--batch-256", type=int, default=16, help="frames per batch for the 256 model")
    parser.add_argument("--rounds", type=int, default=5, help="timed batches per configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {}
    for path in (wav2lip_checkpoint(), wav2lip256_checkpoint()):
        model = weights.load_model(path, "wav2lip", "cpu", progress=False)
        models[model.face_size] = model
    batches = {96: args.batch, 256: args.batch_256}
    configs = []  # (label, face size, network, bf16?)
    for size, model in models.items():
        fused = fuse_batchnorm(copy.deepcopy(model)).to(memory_format=torch.channels_last)
        configs += [(f"{size} fp32", size, model, False), (f"{size} bf16", size, model, True),
                    (f"{size} bf16 fused", size, fused, True)]
    data = {size: inputs(size, batches[size]) for size in models}

    def run(size: int, net: torch.nn.Module, bf16: bool) -> tuple[float, float]:
        mel, face = data[size]
        if net is not models[size]:
            face = face.contiguous(memory_format=torch.channels_last)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(mel, face)
        return time.perf_counter() - start, time.process_time() - cpu

    for _, size, net, bf16 in configs:  # warm-up: first-call allocations and kernel selection
        run(size, net, bf16)
    times: dict[str, list[float]] = {label: [] for label, *_ in configs}
    cpu: dict[str, list[float]] = {label: [] for label, *_ in configs}
    for _ in range(args.rounds):
        for label, size, net, bf16 in configs:
            wall, used = run(size, net, bf16)
            times[label].append(wall)
            cpu[label].append(used)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()}, "
          f"batch {args.batch} (96) / {args.batch_256} (256), median of {args.rounds} batches")
    fps = {label: batches[size] / statistics.median(times[label]) for label, size, *_ in configs}
    base = fps["96 fp32"]
    cpu_ms = {label: 1000 * statistics.median(cpu[label]) / batches[size] for label, size, *_ in configs}
    print(f"{'generator':<16} {'frames/s':>9} {'ms/frame':>9} {'vs 96 fp32':>11} {'CPU ms/frame':>13} {'vs 96 fp32':>11}")
    for label, *_ in configs:
        print(f"{label:<16} {fps[label]:>9.1f} {1000 / fps[label]:>9.1f} {fps[label] / base:>10.3f}x "
              f"{cpu_ms[label]:>13.1f} {cpu_ms['96 fp32'] / cpu_ms[label]:>10.3f}x")


if __name__ == "__main__":
    main()
