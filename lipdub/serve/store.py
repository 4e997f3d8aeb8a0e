"""The durable job queue: one SQLite database under the data folder.

Layout of ``--data``::

    lipdub.sqlite3          jobs and their state (WAL mode)
    serve.lock              held (flock) by the one server using this folder
    jobs/<id>/              face.<ext>, audio.<ext>, result.mp4 of each job
    uploads/                uploads being written; moved into jobs/ once complete

A job is *accepted* when its row is committed, which happens only after its files are
complete under ``jobs/<id>/``; so a crash at any moment loses no accepted job, and leftovers
of unaccepted ones (a folder with no row) are removed at the next start. A finished job is
removed the other way round, row first, then folder (`purge_finished`, for ``--keep-days``).

Every process (the API and each worker) opens its own connections; state changes are single
UPDATE statements guarded by the state they expect, so races resolve in the database.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT 'queued',
    error TEXT,
    options TEXT NOT NULL,
    face_name TEXT NOT NULL,
    audio_name TEXT NOT NULL,
    face_file TEXT NOT NULL,
    audio_file TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker INTEGER,
    cancel_requested REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


def new_id() -> str:
    """22 URL-safe characters from 16 random bytes (128 bits): unguessable."""
    return secrets.token_urlsafe(16)


def valid_id(job_id: str) -> bool:
    return bool(ID_RE.match(job_id))


class QueueFull(Exception):
    pass


class JobStore:
    def __init__(self, data: str | os.PathLike) -> None:
        self.data = Path(data).resolve()
        self.db_path = self.data / "lipdub.sqlite3"
        self.jobs_dir = self.data / "jobs"
        self.uploads_dir = self.data / "uploads"
        self._local = threading.local()

    # ------------------------------------------------------------------ connection

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _write(self):
        """A write transaction taken at once (BEGIN IMMEDIATE), committed or rolled back."""
        store = self

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                self.conn = store._conn()
                self.conn.execute("BEGIN IMMEDIATE")
                return self.conn

            def __exit__(self, exc_type, exc, tb) -> None:
                self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def init(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(exist_ok=True)
        self.uploads_dir.mkdir(exist_ok=True)
        self._conn().executescript(SCHEMA)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------ paths

    def job_dir(self, job_id: str) -> Path:
        if not valid_id(job_id):  # never build a path from anything but our own ids
            raise ValueError(f"invalid job id {job_id!r}")
        return self.jobs_dir / job_id

    def result_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result.mp4"

    # ------------------------------------------------------------------ startup

    def recover(self, max_attempts: int) -> dict[str, int]:
        """After a start: jobs left 'running' by a previous server are re-queued, or failed once
        they have had `max_attempts` tries; folders of jobs never accepted are removed."""
        now = time.time()
        with self._write() as conn:
            cancelled = conn.execute(
                "UPDATE jobs SET status='cancelled', stage='cancelled', finished=?, updated=?, worker=NULL "
                "WHERE status='running' AND cancel_requested IS NOT NULL", (now, now)).rowcount
            failed = conn.execute(
                "UPDATE jobs SET status='failed', stage='failed', finished=?, updated=?, worker=NULL, error="
                "'the server stopped while this job was running (' || attempts || "
                "CASE attempts WHEN 1 THEN ' attempt)' ELSE ' attempts)' END "
                "WHERE status='running' AND attempts >= ?", (now, now, max_attempts)).rowcount
            requeued = conn.execute(
                "UPDATE jobs SET status='queued', stage='queued', progress=0, updated=?, worker=NULL "
                "WHERE status='running'", (now,)).rowcount
            known = {row[0] for row in conn.execute("SELECT id FROM jobs")}
        removed = 0
        for path in self.jobs_dir.iterdir():
            if path.name not in known:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        for path in self.uploads_dir.iterdir():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return {"requeued": requeued, "failed": failed, "cancelled": cancelled, "removed": removed}

    # ------------------------------------------------------------------ API side

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = {s: 0 for s in STATUSES}
        out.update({r[0]: r[1] for r in rows})
        return out

    def queued_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]

    def add(self, job_id: str, options: dict, face_name: str, audio_name: str, face_file: str, audio_file: str,
            max_queued: int) -> None:
        now = time.time()
        with self._write() as conn:
            queued = conn.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
            if max_queued and queued >= max_queued:
                raise QueueFull(queued)
            conn.execute(
                "INSERT INTO jobs (id, status, options, face_name, audio_name, face_file, audio_file, created, "
                "updated) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, json.dumps(options), face_name, audio_name, face_file, audio_file, now, now))

    def get(self, job_id: str) -> dict | None:
        if not valid_id(job_id):
            return None
        conn = self._conn()
        row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        job = _as_job(row)
        if job["status"] == "queued":
            job["queue_position"] = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq < ?", (row["seq"],)).fetchone()[0]
        job.pop("_seq")
        return job

    def list(self, limit: int = 100, status: str | None = None) -> list[dict]:
        conn = self._conn()
        if status:
            rows = conn.execute("SELECT * FROM jobs WHERE status=? ORDER BY seq DESC LIMIT ?", (status, limit))
        else:
            rows = conn.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        jobs = [_as_job(r) for r in rows.fetchall()]
        queued = [j for j in jobs if j["status"] == "queued"]
        if queued:
            ahead = conn.execute("SELECT seq FROM jobs WHERE status='queued' ORDER BY seq").fetchall()
            position = {seq: i for i, (seq,) in enumerate(ahead)}
            for job in queued:
                job["queue_position"] = position.get(job.pop("_seq"), 0)
        for job in jobs:
            job.pop("_seq", None)
        return jobs

    def cancel(self, job_id: str) -> str | None:
        """Cancel: a queued job at once; a running one is asked to stop. The status after, or None."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                conn.execute("UPDATE jobs SET status='cancelled', stage='cancelled', finished=?, updated=? WHERE id=?",
                             (now, now, job_id))
                return "cancelled"
            if row["status"] == "running":
                conn.execute("UPDATE jobs SET cancel_requested=COALESCE(cancel_requested, ?), stage='cancelling', "
                             "updated=? WHERE id=?", (now, now, job_id))
            return row["status"]

    def delete(self, job_id: str) -> str | None:
        """Remove a job that is not running, with its files. Its status before, or None."""
        with self._write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "running":
                return "running"
            conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return row["status"]

    def purge_finished(self, before: float) -> list[str]:
        """Remove the jobs that finished (done, failed or cancelled) before the time `before`,
        rows first, then their folders. Queued and running jobs are never touched. The ids removed."""
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "DELETE FROM jobs WHERE status IN ('done', 'failed', 'cancelled') "
                "AND COALESCE(finished, updated) < ? RETURNING id", (before,)).fetchall()]
        for job_id in ids:
            if valid_id(job_id):
                shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return ids

    # ------------------------------------------------------------------ worker side

    def claim(self, worker_pid: int) -> dict | None:
        """Take the oldest queued job for this worker, or None."""
        if self._conn().execute("SELECT 1 FROM jobs WHERE status='queued' LIMIT 1").fetchone() is None:
            return None  # the common idle case, without taking the write lock
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status='running', stage='starting', progress=0, error=NULL, worker=?, "
                "attempts=attempts+1, started=?, updated=? WHERE id=?", (worker_pid, now, now, row["id"]))
        job = _as_job(row)
        job.pop("_seq")
        job["attempts"] += 1
        return job

    def report(self, job_id: str, worker_pid: int, stage: str, progress: float) -> bool:
        """Record progress; True when the job should stop (cancel requested, or no longer ours)."""
        row = self._conn().execute(
            "UPDATE jobs SET stage=CASE WHEN cancel_requested IS NULL THEN ? ELSE 'cancelling' END, "
            "progress=MAX(progress, ?), updated=? WHERE id=? AND status='running' AND worker=? "
            "RETURNING cancel_requested", (stage, progress, time.time(), job_id, worker_pid)).fetchone()
        return row is None or row[0] is not None

    def finish(self, job_id: str, worker_pid: int, status: str, error: str | None = None,
               result: dict | None = None) -> bool:
        now = time.time()
        cur = self._conn().execute(
            "UPDATE jobs SET status=?, stage=?, error=?, result=?, "
            "progress=CASE WHEN ?='done' THEN 1 ELSE progress END, "
            "finished=?, updated=?, worker=NULL WHERE id=? AND status='running' AND worker=?",
            (status, status, error, json.dumps(result) if result is not None else None, status, now, now, job_id,
             worker_pid))
        return cur.rowcount == 1

    def requeue(self, job_id: str, worker_pid: int) -> None:
        """Give a job back to the queue (its worker was stopped by a clean shutdown); the try is not counted."""
        self._conn().execute(
            "UPDATE jobs SET status='queued', stage='queued', progress=0, worker=NULL, updated=?, "
            "attempts=MAX(0, attempts-1) WHERE id=? AND status='running' AND worker=?",
            (time.time(), job_id, worker_pid))

    def cancels_of(self, worker_pid: int) -> set[str]:
        """Running jobs of this worker whose cancel was asked (one read for many jobs)."""
        rows = self._conn().execute("SELECT id FROM jobs WHERE status='running' AND worker=? "
                                    "AND cancel_requested IS NOT NULL", (worker_pid,))
        return {r[0] for r in rows.fetchall()}

    def running_of(self, worker_pid: int) -> list[str]:
        rows = self._conn().execute("SELECT id FROM jobs WHERE status='running' AND worker=?", (worker_pid,))
        return [r[0] for r in rows.fetchall()]

    def fail_worker(self, worker_pid: int, message: str) -> list[str]:
        """Fail the jobs of a worker that died (cancelled instead where a cancel was asked)."""
        now = time.time()
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE status='running' AND worker=?", (worker_pid,)).fetchall()]
            conn.execute("UPDATE jobs SET status='cancelled', stage='cancelled', finished=?, updated=?, worker=NULL "
                         "WHERE status='running' AND worker=? AND cancel_requested IS NOT NULL",
                         (now, now, worker_pid))
            conn.execute("UPDATE jobs SET status='failed', stage='failed', error=?, finished=?, updated=?, worker=NULL "
                         "WHERE status='running' AND worker=?", (message, now, now, worker_pid))
        return ids

    def stuck_cancels(self, grace_s: float) -> list[tuple[str, int]]:
        """Running jobs whose cancel was asked more than `grace_s` ago: (id, worker pid)."""
        rows = self._conn().execute(
            "SELECT id, worker FROM jobs WHERE status='running' AND cancel_requested IS NOT NULL "
            "AND cancel_requested < ?", (time.time() - grace_s,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def iter_ids(self) -> Iterator[str]:
        for row in self._conn().execute("SELECT id FROM jobs"):
            yield row[0]


def _as_job(row: sqlite3.Row) -> dict[str, Any]:
    status = row["status"]
    return {
        "id": row["id"],
        "status": status,
        "progress": 1.0 if status == "done" else round(float(row["progress"]), 4),
        "stage": row["stage"],
        "error": row["error"],
        "face_name": row["face_name"],
        "audio_name": row["audio_name"],
        "options": json.loads(row["options"]),
        "created_at": row["created"],
        "started_at": row["started"],
        "finished_at": row["finished"],
        "updated_at": row["updated"],
        "attempts": row["attempts"],
        "cancel_requested": row["cancel_requested"] is not None,
        "result": json.loads(row["result"]) if row["result"] else None,
        "face_file": row["face_file"],
        "audio_file": row["audio_file"],
        "_seq": row["seq"],
    }
