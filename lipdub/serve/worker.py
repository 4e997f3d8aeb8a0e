"""Worker processes: each runs `lipdub.pipeline.sync` on one job at a time.

A worker is a separate Python process (``python -m lipdub.serve.worker``) that talks to the
server only through the SQLite store: it claims the oldest queued job, reports progress (and
learns about cancel requests) with one UPDATE per report, and records the outcome. The server
side (`WorkerPool`) starts the workers, replaces one that dies (failing only the job it held),
kills one that ignores a cancel, and on a clean shutdown stops them and gives their jobs back
to the queue.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import torch

from ..errors import LipdubError
from ..generate import GeneratorCache
from ..options import SyncOptions
from ..pipeline import sync
from .store import JobStore

log = logging.getLogger("lipdub.serve")

POLL_S = 0.3  # how often an idle worker looks for a queued job
REPORT_S = 0.25  # least time between two progress writes of a job
SCAN_SHARE = 0.2  # part of the progress bar given to the face scan when there is one


class JobCancelled(Exception):
    """Raised from the progress callback when the job's cancel was requested."""


# ------------------------------------------------------------------------------------ worker side


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux kill this process when the server dies, whatever the way it dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort; the ppid checks remain
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


class Reporter:
    """The `progress_callback(stage, done, total)` of one job: progress 0..1 into the store."""

    def __init__(self, store: JobStore, job_id: str, pid: int, parent_pid: int) -> None:
        self.store, self.job_id, self.pid, self.parent_pid = store, job_id, pid, parent_pid
        self.stage: str | None = None
        self.scanned = False
        self.last_write = 0.0
        self.progress = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        frac = min(1.0, max(0.0, done / total)) if total else 0.0
        if stage == "scan":
            self.scanned = True
            progress = SCAN_SHARE * frac
        elif stage == "render":
            progress = SCAN_SHARE + (1.0 - SCAN_SHARE) * frac if self.scanned else frac
        else:
            progress = self.progress
        self.progress = max(self.progress, min(progress, 0.999))
        now = time.monotonic()
        if stage != self.stage or now - self.last_write >= REPORT_S:
            self.stage, self.last_write = stage, now
            self.check()

    def check(self) -> None:
        if os.getppid() != self.parent_pid:
            os._exit(1)
        if self.store.report(self.job_id, self.pid, self.stage or "starting", self.progress):
            raise JobCancelled()


def _public_message(message: str, paths: dict[str, str]) -> str:
    """A pipeline message with our file paths replaced by what the user knows them as."""
    for path, name in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(path, name)
    return message


def run_job(store: JobStore, job: dict, config: dict, pid: int, parent_pid: int,
            model: GeneratorCache | None = None) -> str:
    job_id = job["id"]
    job_dir = store.job_dir(job_id)
    face, audio, output = job_dir / job["face_file"], job_dir / job["audio_file"], store.result_path(job_id)
    reporter = Reporter(store, job_id, pid, parent_pid)
    paths = {str(face): job["face_name"], str(audio): job["audio_name"], str(output): "the result",
             str(job_dir) + os.sep: "", str(store.data) + os.sep: ""}
    started = time.monotonic()
    try:
        reporter.check()
        options = SyncOptions.build(**job["options"], checkpoint=config["checkpoint"], device=config["device"],
                                    skip_sha256=config["skip_sha256"], progress=False, progress_callback=reporter)
        result = sync(face, audio, output, options=options, model=model)
    except JobCancelled:
        output.unlink(missing_ok=True)
        store.finish(job_id, pid, "cancelled")
        return "cancelled"
    except LipdubError as exc:
        output.unlink(missing_ok=True)
        message = _public_message(str(exc), paths)
        if store.report(job_id, pid, "failed", reporter.progress):  # the failure came after a cancel
            store.finish(job_id, pid, "cancelled")
            return "cancelled"
        store.finish(job_id, pid, "failed", error=message)
        return "failed"
    except Exception as exc:
        output.unlink(missing_ok=True)
        log.error("job %s: internal error\n%s", job_id, traceback.format_exc())
        message = _public_message(f"internal error ({exc.__class__.__name__}): {exc}", paths)
        store.finish(job_id, pid, "failed", error=message.splitlines()[0] if message else "internal error")
        return "failed"
    data = result.as_dict()
    data.pop("output", None)
    data["seconds"] = round(time.monotonic() - started, 3)
    if not store.finish(job_id, pid, "done", result=data):
        output.unlink(missing_ok=True)  # cancelled or taken away meanwhile
        return "cancelled"
    return "done"


def worker_main(data: str, config: dict, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lipdub-worker[%(process)d] %(message)s")
    if config.get("nice"):
        try:
            os.nice(int(config["nice"]))
        except OSError:
            pass
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = GeneratorCache()
    store = JobStore(data)
    pid = os.getpid()
    while True:
        if os.getppid() != parent_pid:
            return
        job = store.claim(pid)
        if job is None:
            time.sleep(POLL_S)
            continue
        log.info("job %s: started (attempt %d)", job["id"], job["attempts"])
        status = run_job(store, job, config, pid, parent_pid, model)
        log.info("job %s: %s", job["id"], status)
        gc.collect()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lipdub.serve.worker")
    p.add_argument("--data", required=True)
    p.add_argument("--config", required=True, help="JSON")
    p.add_argument("--parent", type=int, required=True)
    args = p.parse_args(argv)
    worker_main(args.data, json.loads(args.config), args.parent)


# ------------------------------------------------------------------------------------ server side


class WorkerPool:
    """Starts `n` workers and keeps them running; see the module docstring."""

    def __init__(self, store: JobStore, config: dict, n: int, cancel_grace_s: float = 10.0,
                 supervise_s: float = 0.5) -> None:
        self.store, self.config, self.n = store, config, n
        self.cancel_grace_s, self.supervise_s = cancel_grace_s, supervise_s
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.started_at = [0.0] * n
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _spawn(self, slot: int) -> None:
        cmd = [sys.executable, "-m", "lipdub.serve.worker", "--data", str(self.store.data),
               "--config", json.dumps(self.config), "--parent", str(os.getpid())]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.procs[slot] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
        self.started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot, self.procs[slot].pid)

    def start(self) -> None:
        with self._lock:
            for slot in range(self.n):
                self._spawn(slot)
        self._thread = threading.Thread(target=self._supervise, name="lipdub-workers", daemon=True)
        self._thread.start()

    def alive(self) -> int:
        return sum(1 for p in self.procs if p is not None and p.poll() is None)

    def _supervise(self) -> None:
        while not self._stop.wait(self.supervise_s):
            try:
                self.check()
            except Exception:  # pragma: no cover - keep supervising whatever happens
                log.exception("worker supervision failed")

    def check(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            for job_id, pid in self.store.stuck_cancels(self.cancel_grace_s):
                for proc in self.procs:
                    if proc is not None and proc.pid == pid and proc.poll() is None:
                        log.warning("job %s: worker %d ignored the cancel for %.0f s; killing it",
                                    job_id, pid, self.cancel_grace_s)
                        proc.kill()
                        proc.wait()
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                code = proc.returncode
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                failed = self.store.fail_worker(
                    proc.pid, f"the worker process {how} while running this job; the job was stopped")
                log.warning("worker %d (pid %d) %s%s", slot, proc.pid, how,
                            f"; job {', '.join(failed)} stopped" if failed else "")
                if time.monotonic() - self.started_at[slot] < 5.0:
                    time.sleep(1.0)  # do not spin when workers die at start
                self._spawn(slot)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker; jobs they were running go back to the queue."""
        self._stop.set()
        with self._lock:
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + timeout
            for proc in self.procs:
                if proc is None:
                    continue
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for job_id in self.store.running_of(proc.pid):
                    self.store.requeue(job_id, proc.pid)
                    log.info("job %s: back in the queue (server shutdown)", job_id)
        if self._thread is not None:
            self._thread.join(timeout=2.0)


if __name__ == "__main__":
    main()
