"""`lipdub batch --ray` and `lipdub serve --ray` on a real Ray cluster of several nodes on this
machine, loopback addresses only.

One cluster serves the whole module: a head node (127.0.0.2) and a second node (127.0.0.3),
each started with `ray start` and 1 CPU, so two jobs run at once, one per node. Tests that need
more add their own node and take it down again: one is killed with SIGKILL mid-batch, one runs
in its own mount namespace where the test's files are hidden (a node without the shared
filesystem). The node addresses are 127.0.0.x other than 127.0.0.1 because Ray replaces
127.0.0.1 by the machine's outside address.

Outputs are decoded with PyAV (tests/test_batch.py's `check_video`); which node ran a job is
read from the report and compared with the node ids of the raylet processes each node started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ray  # noqa: F401  (the `cluster` extra: a missing one fails the suite, it is not skipped)

from lipdub.batch import JOURNAL_NAME, REPORT_NAME

from .conftest import MEDIA, short_clip, short_speech
from .test_batch import P2, P2_BOX, V3, V3_BOX, check_video, lipdub, write_jsonl
from .test_serve import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Every process of a session (a node started with start_new_session and all it spawned)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                out.append(int(entry.name))
    return out


def raylet_node_id(sid: int) -> str | None:
    for pid in session_pids(sid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/raylet"):
            for arg in args:
                if arg.startswith(b"--node_id="):
                    return arg.split(b"=", 1)[1].decode()
    return None


class Node:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log
        self.node_id: str | None = None

    def kill(self) -> None:
        """SIGKILL every process of the node, as a machine that disappears."""
        for _ in range(3):  # a process may still be spawning children while its siblings die
            for pid in session_pids(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.proc.wait(30)


class Cluster:
    """Ray nodes on loopback addresses, each `ray start --block` in its own session."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="lipdub-ray-", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.2:{self.port}"
        self.nodes: list[Node] = []
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", AUTOSCALER_METRIC_PORT=str(free_port()),
                        DASHBOARD_METRIC_PORT=str(free_port()), PYTHONUNBUFFERED="1",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def start_node(self, name: str, ip: str, *extra: str, cpus: int = 1, wrap: list[str] | None = None,
                   timeout: float = 180.0) -> Node:
        head = not self.nodes
        args = [RAY, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}"]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                     f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
        else:
            args += [f"--address={self.address}"]
        log = self.temp / f"{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen((wrap or []) + args + list(extra), stdout=fh, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=self.temp, start_new_session=True)
        node = Node(name, proc, log)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while node.node_id is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text(errors='replace')[-4000:]}")
            if b"Ray runtime started" in log.read_bytes():
                node.node_id = raylet_node_id(proc.pid)
            time.sleep(0.2)
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.kill()
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster()
    try:
        nodes.start_node("head", "127.0.0.2")
        nodes.start_node("second", "127.0.0.3")
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def media_jobs(tmp_path_factory, media) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cluster-media")
    return {
        "s10": short_speech(folder / "speech-1.0s.wav", 1.0),
        "s12": short_speech(folder / "speech-1.2s.wav", 1.2, offset=2.0),
        "s16": short_speech(folder / "speech-1.6s.wav", 1.6, offset=5.0),
        "v3": short_clip(V3, folder / "v3-10frames.mp4", 10),
    }


SIZES = {"p2": (474, 474), "v3": (524, 524)}
SECONDS = {"s10": 1.0, "s12": 1.2, "s16": 1.6}


def six_jobs(media_jobs: dict[str, Path], checkpoint: Path) -> list[tuple[dict, str, str]]:
    """(manifest row, face name, audio name): both faces with each of the three speech clips."""
    rows = []
    for audio in ("s10", "s12", "s16"):
        rows.append(({"face": str(P2), "audio": str(media_jobs[audio]), "box": P2_BOX,
                      "checkpoint": str(checkpoint)}, "p2", audio))
        rows.append(({"face": str(media_jobs["v3"]), "audio": str(media_jobs[audio]), "box": V3_BOX,
                      "checkpoint": str(checkpoint), "output": f"v3/{audio}.mp4", "blend": "box"}, "v3", audio))
    return rows


def check_outputs(report: dict, expected: list[tuple[dict, str, str]]) -> None:
    done = [job for job in report["jobs"] if job["status"] in ("done", "skipped")]
    assert len(done) == len(expected)
    for job, (_, face, audio) in zip(done, expected):
        assert check_video(Path(job["output"]), SECONDS[audio], 25.0, SIZES[face]) == job["n_frames"]


# ------------------------------------------------------------------------------------ batch


def test_batch_on_two_nodes_with_a_bad_line_then_a_rerun(cluster, media_jobs, wav2lip_checkpoint, tmp_path):
    """Six jobs and one bad line through `lipdub batch --ray`: the bad line is reported (exit
    code 2, one line naming it) while the six run on both nodes with correct outputs; the fixed
    manifest's re-run skips the six and runs only the seventh."""
    jobs = six_jobs(media_jobs, wav2lip_checkpoint)
    bad = {"face": str(P2), "audio": str(media_jobs["s10"]), "box": P2_BOX, "blend": "sharp",
           "checkpoint": str(wav2lip_checkpoint)}
    rows = [row for row, _, _ in jobs]
    manifest = write_jsonl(tmp_path / "jobs.jsonl", rows[:3] + [bad] + rows[3:])
    out = tmp_path / "out"
    run = lipdub("batch", str(manifest), "--out-dir", str(out), "--ray", cluster.address)
    assert run.returncode == 2, run.stderr[-3000:]
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith(f"lipdub: error: {manifest} line 4, field 'blend': unknown blend 'sharp'"), run.stderr
    assert "the other 6 jobs: 6 done, 0 already complete, 0 failed" in message
    report = json.loads((out / REPORT_NAME).read_text())
    assert [j["status"] for j in report["jobs"]] == ["done"] * 3 + ["invalid"] + ["done"] * 3
    assert report["runner"].startswith(f"Ray cluster {cluster.address}: 2 nodes")
    check_outputs(report, jobs)
    ran_on = {j["node"] for j in report["jobs"] if j["status"] == "done"}
    assert ran_on == {node.node_id for node in cluster.nodes}, (ran_on, [n.node_id for n in cluster.nodes])
    assert all(j["attempts"] == 1 for j in report["jobs"] if j["status"] == "done")

    mtimes = {j["output"]: Path(j["output"]).stat().st_mtime_ns for j in report["jobs"] if j["status"] == "done"}
    fixed = dict(bad, blend="box", output="fixed.mp4")
    write_jsonl(manifest, rows[:3] + [fixed] + rows[3:])
    rerun = lipdub("batch", str(manifest), "--out-dir", str(out), "--ray", cluster.address, "--json", "--quiet")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads(rerun.stdout)
    assert [j["status"] for j in again["jobs"]] == ["skipped"] * 3 + ["done"] + ["skipped"] * 3
    assert {j["output"]: Path(j["output"]).stat().st_mtime_ns for j in again["jobs"] if j["status"] == "skipped"} \
        == mtimes
    check_video(out / "fixed.mp4", 1.0, 25.0, (474, 474))


# ------------------------------------------------------------------------------------ serve


def test_serve_on_ray_runs_cancels_and_reports_progress(cluster, media_jobs, wav2lip_checkpoint, tmp_path):
    """`lipdub serve --ray`: one job through the API to a correct result, with progress on the
    way; a long one cancelled while it runs."""
    import numpy as np

    from lipdub.media import load_audio

    from .test_serve import write_wav

    long_audio = write_wav(tmp_path / "long.wav",
                           np.tile(np.clip(load_audio(MEDIA / "a1_en_radio_16k_stereo.wav") * 32767, -32768, 32767), 3))
    server = ServeProcess(tmp_path / "data", wav2lip_checkpoint, "--ray", cluster.address)
    server.start(timeout=120)
    try:
        info = server.get_json("/api/info")
        assert info["workers_alive"] == 2 and info["workers"] == 4  # two nodes of one CPU: 2 x 2 in flight
        job_id = server.submit_ok(P2, media_jobs["s16"], box=" ".join(map(str, P2_BOX)))
        job = server.wait(job_id, timeout=180)
        assert job["status"] == "done" and job["error"] is None, (job, server.log())
        result = server.request("GET", f"/api/jobs/{job_id}/result")
        assert result.status == 200
        (tmp_path / "result.mp4").write_bytes(result.body)
        assert check_video(tmp_path / "result.mp4", 1.6, 25.0, (474, 474)) == job["result"]["n_frames"]

        long_id = server.submit_ok(P2, long_audio, box=" ".join(map(str, P2_BOX)))
        running = server.wait(long_id, until=("running",), check=lambda j: 0 < j["progress"] < 1, timeout=180)
        assert running["stage"] == "render"
        server.request("POST", f"/api/jobs/{long_id}/cancel")
        cancelled = server.wait(long_id, timeout=60)
        assert cancelled["status"] == "cancelled", (cancelled, server.log())
        assert not (server.data / "jobs" / long_id / "result.mp4").exists()
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM), server.log()


# ------------------------------------------------------------------------------------ nodes


def test_a_node_without_our_files_gets_them_through_the_object_store(cluster, media_jobs, wav2lip_checkpoint,
                                                                      tmp_path):
    """A third node runs in a mount namespace where the test's folder (inputs, checkpoint link,
    --out-dir) is an empty tmpfs, as on a machine without the shared filesystem. Its jobs ask
    for the files, the driver ships them, and their outputs come back the same way."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode(errors='replace').strip()}")
    for name in ("s10", "s12", "v3"):
        shutil.copy(media_jobs[name], hidden / media_jobs[name].name)
    os.symlink(wav2lip_checkpoint, hidden / "generator.pth")
    node = cluster.start_node("isolated", "127.0.0.4", wrap=[
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs lipdub-hidden "{hidden}" && exec "$0" "$@"'])
    try:
        rows = []
        for k in range(6):  # six jobs on three nodes of one CPU each: every node gets some
            audio = ("s10", "s12")[k % 2]
            if k < 3:  # the face from the shared media (seen by every node), the speech hidden
                row, face = {"face": str(P2), "audio": media_jobs[audio].name, "box": P2_BOX}, "p2"
            else:
                row, face = {"face": media_jobs["v3"].name, "audio": media_jobs[audio].name, "box": V3_BOX}, "v3"
            rows.append((dict(row, output=f"{face}-{k}.mp4", checkpoint="generator.pth"), face, audio))
        manifest = write_jsonl(hidden / "jobs.jsonl", [row for row, _, _ in rows])
        run = lipdub("batch", str(manifest), "--out-dir", str(hidden / "out"), "--ray", cluster.address, "--json",
                     "--quiet")
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout)
        check_outputs(report, rows)
        ran_on = [j["node"] for j in report["jobs"]]
        assert node.node_id in ran_on, (node.node_id, ran_on)
        assert not list((hidden / "out").rglob("*partial*"))
    finally:
        node.kill()


def test_node_lost_mid_batch_every_job_finishes_once(cluster, media_jobs, wav2lip_checkpoint, tmp_path):
    """A third node is killed with SIGKILL while it writes an output; Ray re-runs its job on the
    other nodes and every job finishes exactly once with a correct output."""
    node = cluster.start_node("doomed", "127.0.0.5")
    jobs = [(dict(row, output=f"{face}-{audio}-{k}.mp4"), face, audio)
            for k, (row, face, audio) in enumerate(six_jobs(media_jobs, wav2lip_checkpoint))]
    for row, _, _ in jobs:
        row["audio"] = str(media_jobs["s16"])  # longer jobs: more time inside a job to kill it in
    jobs = [(row, face, "s16") for row, face, _ in jobs]
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [row for row, _, _ in jobs])
    out = tmp_path / "out"
    log = open(tmp_path / "batch.log", "w+")
    batch = subprocess.Popen([sys.executable, "-m", "lipdub", "batch", str(manifest), "--out-dir", str(out),
                              "--ray", cluster.address, "--json", "--quiet"], stdout=subprocess.PIPE, stderr=log,
                             text=True, cwd=ROOT)
    try:
        victim_pid, deadline = None, time.monotonic() + 300
        while victim_pid is None:  # an output being written by a worker of the doomed node
            assert batch.poll() is None and time.monotonic() < deadline, "the doomed node never wrote an output"
            ours = set(session_pids(node.proc.pid))
            for partial in out.glob(".*.partial*.mp4") if out.is_dir() else []:
                pid = int(partial.name.rsplit(".partial", 1)[1].split(".")[0])
                if pid in ours:
                    victim_pid = pid
            time.sleep(0.05)
        finished_before = len((out / JOURNAL_NAME).read_text().splitlines()) if (out / JOURNAL_NAME).exists() else 0
        node.kill()
        stdout, _ = batch.communicate(timeout=480)
    finally:
        if batch.poll() is None:
            batch.kill()
    log.seek(0)
    assert batch.returncode == 0, log.read()[-3000:]
    assert finished_before < len(jobs)
    report = json.loads(stdout)
    assert [j["status"] for j in report["jobs"]] == ["done"] * len(jobs)
    check_outputs(report, jobs)
    journal = [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines()]
    assert sorted(e["line"] for e in journal) == list(range(1, len(jobs) + 1))  # each job recorded once
    retried = [j for j in report["jobs"] if j["attempts"] > 1]
    assert retried and all(j["nodes"][0] == node.node_id and j["node"] != node.node_id for j in retried), \
        report["jobs"]
    assert not list(out.rglob("*partial*"))


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(tmp_path):
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [{"face": str(P2), "audio": "a.wav"}])
    for address, message in [(f"127.0.0.2:{free_port()}", "cannot connect to the Ray cluster at 127.0.0.2:"),
                             ("head-node", "--ray needs HOST:PORT of the cluster's head node, or auto")]:
        run = lipdub("batch", str(manifest), "--out-dir", str(tmp_path / "out"), "--ray", address)
        assert run.returncode == 2
        assert run.stderr.strip().splitlines() == [run.stderr.strip()] and message in run.stderr, run.stderr
        assert not (tmp_path / "out").exists()
