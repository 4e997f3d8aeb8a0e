"""Latency of `lipdub serve` status calls under load, on loopback, while a worker runs jobs.

    python benchmarks/bench_serve.py                  # 20 s at 50 status requests per second
    python benchmarks/bench_serve.py --seconds 60 --rate 100

Starts a real server (uvicorn in a subprocess, one worker, deterministic generator weights),
keeps its worker busy with lip-sync jobs, and prints the p50 / p95 / p99 latency of
`GET /api/jobs/{id}` and the error count. The test suite runs a 3-second burst of the same load
(tests/test_serve.py::test_status_requests_while_a_job_runs) and asserts only that nothing fails.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_common import MEDIA, ROOT, wav2lip_checkpoint

sys.path.insert(0, str(ROOT))
from tests.test_serve import A1, P2, ServeProcess, status_load, write_wav  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=50, help="status requests per second")
    args = parser.parse_args()
    import numpy as np

    from lipdub.media import load_audio

    with tempfile.TemporaryDirectory() as tmp:
        speech = write_wav(Path(tmp) / "speech.wav",
                           np.tile(np.clip(load_audio(MEDIA / A1) * 32767, -32768, 32767), 3))
        server = ServeProcess(Path(tmp) / "data", wav2lip_checkpoint(), "--workers", "1", token="bench")
        server.start()
        try:
            load = status_load(server, MEDIA / P2, speech, args.seconds, args.rate)
        finally:
            server.stop()
    lat = load["latencies"]

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    print(f"lipdub serve: {len(lat)} of {load['expected']} status requests answered in {load['wall']:.1f} s, "
          f"errors {len(load['errors'])}; p50 {pct(0.5):.1f} ms, p95 {pct(0.95):.1f} ms, p99 {pct(0.99):.1f} ms, "
          f"max {pct(1.0):.1f} ms; a job was running for {load['running']:.0%} of them")


if __name__ == "__main__":
    main()
