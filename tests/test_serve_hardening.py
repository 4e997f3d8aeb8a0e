"""`lipdub serve` hardening: finished jobs deleted after --keep-days, new jobs refused while the
disk is nearly full (--min-free-mb), and a worker that ignores a cancel killed after the grace
period (--cancel-grace).

Retention is tested twice: `Retention.sweep` on a real job table with a fake clock (days pass
in no time), and a real server with --keep-days of a few seconds, where finished jobs go away
with their files while a running one stays.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest

from lipdub.media import load_audio
from lipdub.serve.app import Retention
from lipdub.serve.store import JobStore, new_id

from .test_serve import A1, P2, P2_BOX, ServeProcess, encode_multipart, pid_alive, trim_audio, worker_pid, write_wav

DAY = 86400.0
KEEP_DAYS = 0.0001  # 8.6 s


# ------------------------------------------------------------------------------------ retention, fake clock


def _job(store: JobStore, status: str, pid: int = 4242) -> str:
    """A job in `status`, through the store's own transitions, with its folder and files."""
    job_id = new_id()
    folder = store.job_dir(job_id)
    folder.mkdir()
    (folder / "face.png").write_bytes(b"face")
    (folder / "audio.wav").write_bytes(b"audio")
    store.add(job_id, {}, "face.png", "audio.wav", "face.png", "audio.wav", 0)
    if status == "queued":
        return job_id
    if status == "cancelled":
        assert store.cancel(job_id) == "cancelled"
        return job_id
    claimed = store.claim(pid)
    assert claimed["id"] == job_id
    if status != "running":
        (folder / "result.mp4").write_bytes(b"result")
        assert store.finish(job_id, pid, status, error="x" if status == "failed" else None)
    return job_id


def test_retention_with_a_fake_clock(tmp_path):
    store = JobStore(tmp_path / "data")
    store.init()
    jobs = {status: _job(store, status) for status in ("done", "failed", "cancelled", "running", "queued")}
    finished_at = {k: store.get(v)["finished_at"] for k, v in jobs.items()}
    assert all(finished_at[s] is not None for s in ("done", "failed", "cancelled"))
    now = [max(t for t in finished_at.values() if t is not None)]
    retention = Retention(store, keep_days=7, clock=lambda: now[0])
    assert retention.interval_s == 600  # 7 days / 10, at most 10 minutes

    now[0] += 6.9 * DAY
    assert retention.sweep() == []
    assert all(store.get(j) is not None for j in jobs.values())

    now[0] += 0.2 * DAY  # 7.1 days after the last one finished
    assert sorted(retention.sweep()) == sorted(jobs[s] for s in ("done", "failed", "cancelled"))
    for status, job_id in jobs.items():
        kept = status in ("queued", "running")
        assert (store.get(job_id) is not None) == kept, status
        assert store.job_dir(job_id).is_dir() == kept, status
    assert store.counts() == {"queued": 1, "running": 1, "done": 0, "failed": 0, "cancelled": 0}

    now[0] += 365 * DAY  # queued and running jobs are never deleted, however old
    assert retention.sweep() == []
    assert store.get(jobs["queued"])["status"] == "queued" and store.get(jobs["running"])["status"] == "running"
    assert Retention(store, keep_days=KEEP_DAYS).interval_s == 1.0
    store.close()


# ------------------------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, wav2lip_checkpoint):
    server = ServeProcess(tmp_path_factory.mktemp("serve-hardening") / "data", wav2lip_checkpoint,
                          "--workers", "1", "--keep-days", str(KEEP_DAYS), "--cancel-grace", "2")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def speech(tmp_path_factory, media):
    folder = tmp_path_factory.mktemp("hardening-media")
    return {"short": trim_audio(media / A1, folder / "speech-1s.wav", 1.0),
            "long": write_wav(folder / "speech-24s.wav",
                              np.tile(np.clip(load_audio(media / A1) * 32767, -32768, 32767), 3))}


def test_worker_ignoring_a_cancel_is_killed_after_the_grace_period(hardened, speech, media):
    face = media / P2
    victim = hardened.submit_ok(face, speech["long"], box=P2_BOX)
    hardened.wait(victim, until=("running",), check=lambda j: j["progress"] > 0)
    pid = worker_pid(hardened.data, victim)
    assert pid and pid_alive(pid)
    assert "ignored the cancel" not in hardened.log()
    os.kill(pid, signal.SIGSTOP)  # the worker can no longer see the cancel: it ignores it
    try:
        resp = hardened.request("POST", f"/api/jobs/{victim}/cancel")
        assert resp.status == 200, resp
        assert resp.json()["status"] == "running" and resp.json()["cancel_requested"]
        job = hardened.wait(victim, timeout=30)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert job["status"] == "cancelled" and job["progress"] < 1, job
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid), "the stuck worker must be killed"
    assert f"worker {pid} ignored the cancel for 2 s; killing it" in hardened.log()
    assert not (hardened.data / "jobs" / victim / "result.mp4").exists()
    # a new worker took its place and runs the next job
    after = hardened.wait(hardened.submit_ok(face, speech["short"], box=P2_BOX))
    assert after["status"] == "done", (after, hardened.log())
    assert hardened.get_json("/api/info")["workers_alive"] == 1


def test_finished_jobs_are_deleted_after_keep_days(hardened, speech, media):
    face = media / P2
    done_id = hardened.submit_ok(face, speech["short"], box=P2_BOX)
    done = hardened.wait(done_id)
    assert done["status"] == "done", done
    folder = hardened.data / "jobs" / done_id
    # a long job keeps running while the done one is deleted
    running = hardened.submit_ok(face, speech["long"], box=P2_BOX)
    hardened.wait(running, until=("running",))
    deadline = time.monotonic() + 60
    while hardened.request("GET", f"/api/jobs/{done_id}").status == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hardened.request("GET", f"/api/jobs/{done_id}").status == 404
    assert hardened.request("GET", f"/api/jobs/{done_id}/result").status == 404
    assert not folder.exists()
    assert done_id not in [j["id"] for j in hardened.get_json("/api/jobs")["jobs"]]
    assert re.search(rf"deleted \d+ finished job\(s\) older than {KEEP_DAYS:g} day\(s\): [\w, -]*{done_id}",
                     hardened.log()), hardened.log()
    still = hardened.job(running)
    assert still["status"] == "running" and (hardened.data / "jobs" / running).is_dir()
    hardened.request("POST", f"/api/jobs/{running}/cancel")
    assert hardened.wait(running, timeout=30)["status"] == "cancelled"


def test_new_jobs_are_refused_while_the_disk_is_nearly_full(tmp_path, wav2lip_checkpoint, speech, media):
    data = tmp_path / "data"
    data.mkdir()
    free_mb = shutil.disk_usage(data).free / 2**20
    threshold = free_mb + 10 * 1024  # 10 GB more than there is
    server = ServeProcess(data, wav2lip_checkpoint, "--min-free-mb", f"{threshold:.0f}").start()
    try:
        resp = server.submit(media / P2, speech["short"])
        assert resp.status == 507, resp
        detail = resp.json()["detail"]
        assert detail.startswith("not enough disk space on the server for a new job: ") and \
            f"it keeps {threshold:.0f} MB free" in detail and detail.endswith("try again later"), detail
        assert resp.headers["retry-after"] == "60"
        # without a Content-Length (chunked), refused all the same
        body, ctype = encode_multipart({}, {"face": (P2, (media / P2).read_bytes(), "image/png"),
                                            "audio": ("a.wav", speech["short"].read_bytes(), "audio/wav")})
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            try:
                conn.request("POST", "/api/jobs", body=iter([body]), encode_chunked=True,
                             headers={"Content-Type": ctype})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered before the body's last chunk and closed the connection
            try:
                chunked = conn.getresponse()
            except ConnectionResetError:
                chunked = None  # its close (a reset) reached us first: refused, and nothing stored (below)
            if chunked is not None:
                assert chunked.status == 507 and \
                    f"it keeps {threshold:.0f} MB free" in json.loads(chunked.read())["detail"]
        finally:
            conn.close()
        assert server.get_json("/api/jobs")["counts"]["queued"] == 0
        assert list((data / "jobs").iterdir()) == [] and list((data / "uploads").iterdir()) == []
        assert server.request("GET", "/api/info").status == 200  # the rest of the API answers
    finally:
        server.stop()
