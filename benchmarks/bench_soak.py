"""Soak test of `lipdub serve` on loopback: 4 clients submit small jobs and poll for 10 minutes,
and the worker process is killed (SIGKILL) once, halfway, while it runs a job.

    python benchmarks/bench_soak.py               # 10 minutes
    python benchmarks/bench_soak.py --minutes 2

A real server (uvicorn in a subprocess, one worker, --token, deterministic generator weights)
on 127.0.0.1. Each client, in a loop until the time is up: uploads a face photo (p2) and 1 s
of speech, polls `GET /api/jobs/{id}` every 0.25 s until the job finishes, fetches the result
through a signed link (`POST /api/jobs/{id}/link`, then a GET without the token), checks it is
an mp4, and deletes the job. The job that the killed worker held fails with the worker's
reason, by design: it is counted apart and its client submits it again. Anything else that
goes wrong is an error: a refused or failed request, a failed job, a result that is not an
mp4. After the deadline the clients finish the job they hold (at most 3 minutes).

It prints jobs done, errors (must be 0), p50/p95/p99 of the status calls, the worker restart,
and the server process's RSS at start, after a warm-up (the first minute, or a tenth of a
shorter run) and at the end; the growth from after the warm-up to the end must stay under 10 %.
Exit code 1 when errors > 0 or the growth is 10 % or more.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import MEDIA, ROOT, wav2lip_checkpoint

sys.path.insert(0, str(ROOT))
from tests.test_serve import A1, P2, P2_BOX, ServeProcess, encode_multipart, trim_audio  # noqa: E402

CLIENTS = 4
POLL_S = 0.25
DRAIN_S = 180.0
KILLED = "the worker process was killed by signal 9"
TOKEN = "soak-" + os.urandom(8).hex()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def running_worker(data: Path) -> tuple[str, int] | None:
    """(job id, worker pid) of a running job, from the job table."""
    with sqlite3.connect(data / "lipdub.sqlite3", timeout=10) as conn:
        row = conn.execute("SELECT id, worker FROM jobs WHERE status='running' AND worker IS NOT NULL "
                           "AND progress > 0 LIMIT 1").fetchone()
    return (row[0], row[1]) if row else None


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status_s: list[float] = []
        self.submit_s: list[float] = []
        self.job_s: list[float] = []
        self.done = 0
        self.interrupted = 0
        self.errors: list[str] = []

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


class Client(threading.Thread):
    def __init__(self, k: int, server: ServeProcess, body: bytes, ctype: str, deadline: float, stats: Stats,
                 kill_at: list) -> None:
        super().__init__(name=f"client-{k}", daemon=True)
        self.server, self.body, self.ctype, self.deadline, self.stats = server, body, ctype, deadline, stats
        self.kill_at = kill_at
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             auth: bool = True) -> tuple[int, bytes, dict]:
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = f"Bearer {TOKEN}"
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: one reconnect
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.conn.close()
                self.conn = None
                if attempt or body is not None:  # never resend an upload: it could make a second job
                    raise exc
        raise AssertionError("unreachable")

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                self.one_job()
            except Exception as exc:  # noqa: BLE001 - every failure counts as an error
                self.stats.error(f"{self.name}: {exc!r}")
                time.sleep(1.0)
        if self.conn is not None:
            self.conn.close()

    def one_job(self) -> None:
        t0 = time.perf_counter()
        status, data, _ = self.call("POST", "/api/jobs", self.body, {"Content-Type": self.ctype})
        submitted = time.perf_counter()
        if status != 202:
            self.stats.error(f"{self.name}: submit: HTTP {status} {data[:200]!r}")
            time.sleep(1.0)
            return
        with self.stats.lock:
            self.stats.submit_s.append(submitted - t0)
        job_id = json.loads(data)["id"]
        drain_until = self.deadline + DRAIN_S
        while True:
            time.sleep(POLL_S)
            t1 = time.perf_counter()
            status, data, _ = self.call("GET", f"/api/jobs/{job_id}")
            elapsed = time.perf_counter() - t1
            if status != 200:
                self.stats.error(f"{self.name}: status of {job_id}: HTTP {status} {data[:200]!r}")
                return
            with self.stats.lock:
                self.stats.status_s.append(elapsed)
            job = json.loads(data)
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if time.monotonic() > drain_until:
                self.stats.error(f"{self.name}: job {job_id} still {job['status']} after the drain time")
                return
        if job["status"] == "done":
            status, data, _ = self.call("POST", f"/api/jobs/{job_id}/link")
            if status != 200:
                self.stats.error(f"{self.name}: link of {job_id}: HTTP {status} {data[:200]!r}")
                return
            status, video, _ = self.call("GET", json.loads(data)["url"], auth=False)
            if status != 200 or video[4:8] != b"ftyp" or len(video) < 1000:
                self.stats.error(f"{self.name}: result of {job_id}: HTTP {status}, {len(video)} bytes")
                return
            with self.stats.lock:
                self.stats.done += 1
                self.stats.job_s.append(time.perf_counter() - t0)
        elif job["status"] == "failed" and (job["error"] or "").startswith(KILLED) and self.kill_at:
            with self.stats.lock:
                self.stats.interrupted += 1  # the job of the killed worker: submitted again by the loop
        else:
            self.stats.error(f"{self.name}: job {job_id} {job['status']}: {job['error']}")
        status, data, _ = self.call("DELETE", f"/api/jobs/{job_id}")
        if status != 204:
            self.stats.error(f"{self.name}: delete {job_id}: HTTP {status} {data[:200]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the clients submit jobs (default 10)")
    args = parser.parse_args()
    seconds = args.minutes * 60
    warmup_s = min(60.0, seconds / 10)
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="lipdub-soak-") as tmp:
        speech = trim_audio(MEDIA / A1, Path(tmp) / "speech-1s.wav", 1.0)
        body, ctype = encode_multipart({"box": P2_BOX}, {"face": (P2, (MEDIA / P2).read_bytes(), "image/png"),
                                                         "audio": (speech.name, speech.read_bytes(), "audio/wav")})
        server = ServeProcess(Path(tmp) / "data", wav2lip_checkpoint(), "--workers", "1", token=TOKEN)
        server.start()
        pid = server.proc.pid
        rss = {"start": rss_mb(pid)}
        rss_samples: list[float] = []
        stats = Stats()
        kill_at: list[float] = []
        started = time.monotonic()
        deadline = started + seconds
        clients = [Client(k, server, body, ctype, deadline, stats, kill_at) for k in range(CLIENTS)]
        killed: dict = {}
        try:
            for client in clients:
                client.start()
            next_sample = started
            while any(c.is_alive() for c in clients):
                now = time.monotonic()
                if now >= next_sample:
                    rss_samples.append(rss_mb(pid))
                    next_sample = now + 5.0
                if "warmup" not in rss and now - started >= warmup_s:
                    rss["warmup"] = rss_mb(pid)
                if not killed and now - started >= seconds / 2:
                    held = running_worker(server.data)
                    if held:
                        kill_at.append(now - started)
                        os.kill(held[1], signal.SIGKILL)
                        killed = {"pid": held[1], "job": held[0], "at": now - started}
                if killed and "new_pid" not in killed:
                    held = running_worker(server.data)
                    if held and held[1] != killed["pid"]:
                        killed["new_pid"], killed["running_after"] = held[1], time.monotonic() - started - killed["at"]
                time.sleep(0.2)
            wall = time.monotonic() - started
            time.sleep(2.0)  # let the server settle after the last request
            rss["end"] = rss_mb(pid)
            info = server.get_json("/api/info")
            counts = info["counts"]
        finally:
            server.stop()
        log_tail = server.log()
    load_end = os.getloadavg()

    lat = sorted(stats.status_s)
    sub = sorted(stats.submit_s)
    base = rss.get("warmup", rss["start"])
    growth = rss["end"] / base - 1
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"lipdub serve soak: {CLIENTS} clients for {args.minutes:g} min ({wall:.0f} s with the drain), "
          f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at the end ({os.cpu_count()} CPUs)")
    print(f"  jobs done: {stats.done} (median {percentile(sorted(stats.job_s), 0.5):.1f} s from upload to result); "
          f"interrupted by the worker kill and submitted again: {stats.interrupted}; errors: {len(stats.errors)}")
    for line in stats.errors[:10]:
        print(f"    {line}")
    print(f"  status calls: {len(lat)}, p50 {ms(percentile(lat, 0.5))}, p95 {ms(percentile(lat, 0.95))}, "
          f"p99 {ms(percentile(lat, 0.99))}, max {ms(lat[-1]) if lat else 'n/a'}")
    print(f"  uploads: {len(sub)}, p50 {ms(percentile(sub, 0.5))}, p95 {ms(percentile(sub, 0.95))} "
          f"(each one's face size is read in a child process)")
    if killed:
        again = (f"a new worker (pid {killed['new_pid']}) was running jobs {killed['running_after']:.1f} s later"
                 if "new_pid" in killed else "NO new worker ran a job afterwards")
        print(f"  worker pid {killed['pid']} killed (SIGKILL) at {killed['at']:.0f} s while running job "
              f"{killed['job']}; {again}")
    else:
        print("  the worker was NOT killed (no job was running at half time)")
    print(f"  server RSS: {rss['start']:.0f} MB at start, {base:.0f} MB after the {warmup_s:.0f} s warm-up, "
          f"{rss['end']:.0f} MB at the end ({growth:+.1%}); max {max(rss_samples):.0f} MB")
    print(f"  jobs left in the table: {counts}")
    ok = not stats.errors and growth < 0.10 and bool(killed) and "new_pid" in killed
    if not ok:
        print("FAIL\n" + log_tail[-3000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
