"""Throughput of `lipdub batch`: jobs per minute with local worker processes and on Ray.

    python benchmarks/bench_batch.py                      # 8 jobs, 3 runs of each setup
    python benchmarks/bench_batch.py --jobs 16 --repeats 5

Setups, each timed end to end as a user runs it (`python -m lipdub batch ...`: start-up, worker
processes or Ray tasks, model loads, every job; the Ray cluster is started once per setup,
before the runs, and its start-up is printed apart):

    local           the default: one worker process per two cores (`--workers` not given)
    local-2         `--workers 2`
    ray-1-node      `--ray`: one `ray start --head --num-cpus 2` node
    ray-2-nodes     `--ray`: two nodes of `--num-cpus 1` on loopback addresses (as tests/test_cluster.py)

Every job is `--box` lip-sync of a 2-second piece of the a1 speech onto p2 (image) or the first
10 frames of v3 (video), with deterministic generator weights (bench_common). All setups share
the same cores, so the Ray rows measure Ray's overhead and scheduling on one machine, not a
cluster's scale-out; the median of the runs is printed, with the spread, because other work on
the machine moves single runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import MEDIA, ROOT, wav2lip_checkpoint

sys.path.insert(0, str(ROOT))
from tests.conftest import short_clip, short_speech  # noqa: E402
from tests.test_cluster import Cluster  # noqa: E402

P2_BOX = [90, 420, 80, 400]
V3_BOX = [100, 400, 120, 420]


def manifest(folder: Path, n_jobs: int, checkpoint: Path) -> Path:
    v3 = short_clip(MEDIA / "v3_woman_glasses_524x524_25fps.mp4", folder / "v3-10frames.mp4", 10)
    rows = []
    for k in range(n_jobs):
        speech = short_speech(folder / f"speech-{k}.wav", 2.0, offset=0.5 * k)
        face = {"face": str(MEDIA / "p2_woman_frontal_closed_mouth_474.png"), "box": P2_BOX} if k % 2 == 0 \
            else {"face": str(v3), "box": V3_BOX}
        rows.append({**face, "audio": str(speech), "checkpoint": str(checkpoint), "output": f"job-{k}.mp4"})
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_once(jobs: Path, out: Path, args: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lipdub", "batch", str(jobs), "--out-dir", str(out), "--json",
                           "--quiet", *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"lipdub batch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    assert report["done"] == report["total"], report
    return wall, report


def measure(name: str, jobs: Path, n_jobs: int, folder: Path, repeats: int, args: list[str]) -> dict:
    rates, frames = [], 0
    for r in range(repeats):
        wall, report = run_once(jobs, folder / f"{name}-{r}", args)
        rates.append(60.0 * n_jobs / wall)
        frames = report["frames"]
        print(f"  {name} run {r + 1}: {wall:.1f} s, {60.0 * n_jobs / wall:.1f} jobs/min ({report['runner']})",
              flush=True)
    return {"setup": name, "median": statistics.median(rates), "low": min(rates), "high": max(rates),
            "frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="setups to run (local, local-2, ray-1-node, ray-2-nodes)")
    args = parser.parse_args()
    wanted = set(args.only or ["local", "local-2", "ray-1-node", "ray-2-nodes"])
    rows, startups = [], {}
    with tempfile.TemporaryDirectory(prefix="lipdub-bench-batch-") as tmp:
        folder = Path(tmp)
        jobs = manifest(folder, args.jobs, wav2lip_checkpoint())
        print(f"{args.jobs} jobs of 2.0 s speech (50 frames each), {os.cpu_count()} cores; "
              f"{args.repeats} runs per setup", flush=True)
        for name, extra in (("local", []), ("local-2", ["--workers", "2"])):
            if name in wanted:
                rows.append(measure(name, jobs, args.jobs, folder, args.repeats, extra))
        for name, nodes in (("ray-1-node", [2]), ("ray-2-nodes", [1, 1])):
            if name not in wanted:
                continue
            cluster = Cluster()
            try:
                started = time.perf_counter()
                for k, cpus in enumerate(nodes):
                    cluster.start_node(f"node{k}", f"127.0.0.{2 + k}", cpus=cpus)
                startups[name] = time.perf_counter() - started
                print(f"  {name}: cluster up in {startups[name]:.1f} s", flush=True)
                rows.append(measure(name, jobs, args.jobs, folder, args.repeats, ["--ray", cluster.address]))
            finally:
                cluster.stop()
    base = next((r["median"] for r in rows if r["setup"] == "local"), None)
    print(f"\n{'setup':<13} {'jobs/min (median)':>18} {'range':>14} {'vs local':>9} {'cluster start':>14}")
    for row in rows:
        ratio = f"{row['median'] / base:.2f}x" if base else "-"
        start = f"{startups[row['setup']]:.1f} s" if row["setup"] in startups else "-"
        spread = f"{row['low']:>6.1f}-{row['high']:<7.1f}"
        print(f"{row['setup']:<13} {row['median']:>18.1f} {spread} {ratio:>9} {start:>14}")


if __name__ == "__main__":
    main()
