"""Worker processes: each runs `lipdub.pipeline.sync` on one job at a time.

A worker is a separate Python process (``python -m lipdub.serve.worker``) that talks to the
server only through the SQLite store: it claims the oldest queued job, reports progress (and
learns about cancel requests) with one UPDATE per report, and records the outcome. The server
side (`WorkerPool`) starts the workers, replaces one that dies (failing only the job it held),
kills one that ignores a cancel, and on a clean shutdown stops them and gives their jobs back
to the queue.

With ``lipdub serve --ray ADDRESS`` a `RayPool` takes the pool's place: the same table, claims
and outcomes, but each job runs as a Ray task on the cluster (see `RayPool`).
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

from ..batch import RayRunner
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


def job_progress(stage: str, done: int, total: int, scanned: bool) -> float | None:
    """A job's progress 0..1 from the pipeline's (stage, done, total): the face scan, when there
    is one, fills the first SCAN_SHARE of the bar; None for a stage that does not move it."""
    frac = min(1.0, max(0.0, done / total)) if total else 0.0
    if stage == "scan":
        return SCAN_SHARE * frac
    if stage == "render":
        return SCAN_SHARE + (1.0 - SCAN_SHARE) * frac if scanned else frac
    return None


class Reporter:
    """The `progress_callback(stage, done, total)` of one job: progress 0..1 into the store."""

    def __init__(self, store: JobStore, job_id: str, pid: int, parent_pid: int) -> None:
        self.store, self.job_id, self.pid, self.parent_pid = store, job_id, pid, parent_pid
        self.stage: str | None = None
        self.scanned = False
        self.last_write = 0.0
        self.progress = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.scanned = self.scanned or stage == "scan"
        progress = job_progress(stage, done, total, self.scanned)
        self.progress = max(self.progress, min(self.progress if progress is None else progress, 0.999))
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

    def slots(self) -> int:
        return self.n

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


# ------------------------------------------------------------------------------------ Ray


class RayPool:
    """`lipdub serve --ray ADDRESS`: jobs run as Ray tasks on a cluster instead of local processes.

    The API, its SQLite table, limits and page are unchanged. A dispatcher thread in the server
    claims queued jobs (as the worker ``os.getpid()``), runs each as a Ray task through
    `lipdub.batch.RayRunner` (a GPU per job where the cluster has them, else a CPU; uploads
    shipped through Ray's object store when a node does not see the data folder, and the result
    back the same way), copies the tasks' progress into the table, and forwards cancels (Ray's
    cancel, then its forced cancel after the grace time). Ray re-runs a task whose node or
    worker is lost (`RAY_MAX_RETRIES`); after that the job fails with the cluster's reason. Every
    claimed job ends done, failed or cancelled: none is left running.
    """

    def __init__(self, store: JobStore, config: dict, address: str, n: int = 0, cancel_grace_s: float = 10.0,
                 supervise_s: float = 0.3, lost_cluster_s: float = 60.0) -> None:
        self.store, self.config, self.address, self.n = store, config, address, n
        self.cancel_grace_s, self.supervise_s, self.lost_cluster_s = cancel_grace_s, supervise_s, lost_cluster_s
        self.pid = os.getpid()
        self.runner: RayRunner | None = None
        self.jobs: dict[str, dict] = {}  # running job id -> {"job", "scanned", "progress", "stopping", "paths"}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None

    def connect(self) -> None:
        """Join the cluster (a LipdubError when it cannot be reached), before the server listens."""
        if self.runner is None:
            sigterm = signal.getsignal(signal.SIGTERM)
            self.runner = RayRunner(self.address, workers=self.n, token_dir=self.store.data, log_to_driver=True)
            signal.signal(signal.SIGTERM, sigterm)  # ray.init's handler exits at once; uvicorn shuts down cleanly
            log.info("jobs run on %s", self.runner.describe())

    def start(self) -> None:
        self.connect()
        self._thread = threading.Thread(target=self._dispatch, name="lipdub-ray", daemon=True)
        self._thread.start()

    def alive(self) -> int:
        return self.runner.nodes_alive() if self.runner is not None else 0

    def slots(self) -> int:
        return self.runner.slots() if self.runner is not None else self.n

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
                self._failing_since = None
            except Exception as exc:  # keep dispatching; a cluster gone for long fails the jobs it held
                log.exception("ray dispatch failed")
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                if now - self._failing_since > self.lost_cluster_s:
                    self._fail_all(f"the Ray cluster could not be reached ({exc.__class__.__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})")
                self._stop.wait(1.0)

    def step(self) -> None:
        runner = self.runner
        while runner.in_flight() < runner.slots() and not self._stop.is_set():
            job = self.store.claim(self.pid)
            if job is None:
                break
            self._submit(job)
        if self.jobs:
            self._progress(runner.progress())
        for outcome in runner.poll(timeout=self.supervise_s):
            self._finish(outcome)

    def _submit(self, job: dict) -> None:
        job_id = job["id"]
        job_dir = self.store.job_dir(job_id)
        face, audio, output = job_dir / job["face_file"], job_dir / job["audio_file"], self.store.result_path(job_id)
        options = dict(job["options"], checkpoint=self.config["checkpoint"], device=self.config["device"],
                       skip_sha256=self.config["skip_sha256"])
        paths = {str(face): job["face_name"], str(audio): job["audio_name"], str(output): "the result",
                 str(job_dir) + os.sep: "", str(self.store.data) + os.sep: ""}
        self.jobs[job_id] = {"job": job, "scanned": False, "progress": 0.0, "stopping": None, "paths": paths,
                             "started": time.monotonic()}
        log.info("job %s: sent to the cluster (attempt %d)", job_id, job["attempts"])
        try:
            self.runner.submit({"key": job_id, "line": 0, "face": str(face), "audio": str(audio),
                                "output": str(output), "options": options})
        except Exception as exc:
            self.jobs.pop(job_id, None)
            self.store.finish(job_id, self.pid, "failed", error=f"could not send the job to the Ray cluster "
                                                                f"({exc.__class__.__name__})")
            raise

    def _progress(self, snapshot: dict[str, dict]) -> None:
        """Progress into the table (a write only when it moved) and cancels out to the tasks."""
        now = time.monotonic()
        cancels = self.store.cancels_of(self.pid)
        for job_id, held in list(self.jobs.items()):
            state = snapshot.get(job_id) or {}
            stage = state.get("stage") or "starting"
            held["scanned"] = held["scanned"] or bool(state.get("scanned"))
            progress = job_progress(stage, int(state.get("done") or 0), int(state.get("total") or 0), held["scanned"])
            if progress is not None:
                held["progress"] = max(held["progress"], min(progress, 0.999))
            stop = job_id in cancels
            if held.get("written") != (stage, held["progress"]) or stop:
                held["written"] = (stage, held["progress"])
                stop = self.store.report(job_id, self.pid, stage, held["progress"]) or stop
            if stop and held["stopping"] is None:
                held["stopping"] = now
                log.info("job %s: cancelling", job_id)
                self.runner.stop(job_id)
            elif held["stopping"] is not None and now - held["stopping"] > self.cancel_grace_s:
                log.warning("job %s: the task ignored the cancel for %.0f s; forcing it", job_id, self.cancel_grace_s)
                held["stopping"] = now
                self.runner.stop(job_id, force=True)

    def _finish(self, outcome: dict) -> None:
        job_id = outcome["key"]
        held = self.jobs.pop(job_id, None)
        if held is None:
            return
        output = self.store.result_path(job_id)
        status = outcome.get("status")
        cancelled = held["stopping"] is not None
        if status == "done" and not cancelled:
            data = {k: outcome[k] for k in ("n_frames", "fps", "width", "height", "frames_with_face", "timings",
                                            "seconds") if k in outcome}
            data["seconds"] = round(time.monotonic() - held["started"], 3)
            if not output.is_file():
                self.store.finish(job_id, self.pid, "failed", error="the result is missing after the job finished")
            elif not self.store.finish(job_id, self.pid, "done", result=data):
                output.unlink(missing_ok=True)  # cancelled or taken away meanwhile
            log.info("job %s: done on %s", job_id, ", ".join(n[:8] for n in outcome.get("nodes") or []) or "?")
            return
        output.unlink(missing_ok=True)
        if status == "cancelled" or cancelled:
            self.store.finish(job_id, self.pid, "cancelled")
            log.info("job %s: cancelled", job_id)
            return
        message = _public_message(outcome.get("error") or "failed", held["paths"])
        self.store.finish(job_id, self.pid, "failed", error=message.splitlines()[0] if message else "failed")
        log.info("job %s: failed: %s", job_id, message)

    def _fail_all(self, message: str) -> None:
        for job_id in list(self.jobs):
            self.jobs.pop(job_id, None)
            self.store.result_path(job_id).unlink(missing_ok=True)
            self.store.finish(job_id, self.pid, "failed", error=message)
        if self.runner is not None:
            self.runner.running.clear()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop dispatching; jobs still on the cluster are cancelled and go back to the queue."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        if self.runner is not None:
            self.runner.close(cancel=True)
        for job_id in list(self.jobs) + self.store.running_of(self.pid):
            self.store.result_path(job_id).unlink(missing_ok=True)
            self.store.requeue(job_id, self.pid)
            log.info("job %s: back in the queue (server shutdown)", job_id)
        self.jobs.clear()


if __name__ == "__main__":
    main()
