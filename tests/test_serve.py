"""`lipdub serve`: the HTTP API against a real server (uvicorn on 127.0.0.1 in a subprocess).

Covers the job life cycle (upload, progress, result with range requests and signed links,
list, cancel, delete), the safety rules (bearer token only in the header, upload limit, content
sniffing, picture size from the header, client file names, unknown fields, queue limit),
failures with the CLI's messages, a worker crash, restarts of the server in the middle of a job,
and a short burst of status requests while a job runs. Retention, the disk-space guard and the
cancel grace period: tests/test_serve_hardening.py.

`ServeProcess` and the media helpers are shared with tests/test_serve_browser.py.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

import fastapi  # noqa: F401  (the `serve` extra: a missing one fails the suite, it is not skipped)
import python_multipart  # noqa: F401
import uvicorn  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
P2 = "p2_woman_frontal_closed_mouth_474.png"
A1 = "a1_en_radio_16k_stereo.wav"
TOKEN = "test-token-" + uuid.uuid4().hex
P2_BOX = "90 420 80 400"  # TOP BOTTOM LEFT RIGHT around the face of p2: skips detection


# ------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_multipart(fields: dict | None = None, files: dict | None = None) -> tuple[bytes, str]:
    boundary = "lipdub" + uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class ServeProcess:
    """`python -m lipdub serve` on a free loopback port, with its log in the data folder."""

    def __init__(self, data: Path, checkpoint: Path, *args: str, token: str | None = None) -> None:
        self.data, self.checkpoint, self.args, self.token = Path(data), checkpoint, list(args), token
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.data.parent / f"{self.data.name}-serve-{self.starts}.log"

    def start(self, *extra: str, timeout: float = 90.0) -> "ServeProcess":
        self.data.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.port = free_port()
        cmd = [sys.executable, "-m", "lipdub", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data", str(self.data), "--checkpoint", str(self.checkpoint), *self.args, *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", LIPDUB_HOME=str(self.data.parent / "lipdub-home"))
        env.pop("LIPDUB_TOKEN", None)
        if self.token:
            cmd += ["--token", self.token]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lipdub serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/healthz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"lipdub serve did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code, self.proc = self.proc.returncode, None
        return code

    # -------------------------------------------------------------- HTTP

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: str | None | bool = True, timeout: float = 30.0) -> Response:
        headers = dict(headers or {})
        if token is True:
            token = self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get_json(self, path: str, **kw):
        resp = self.request("GET", path, **kw)
        assert resp.status == 200, resp
        return resp.json()

    def submit(self, face: Path | tuple[str, bytes], audio: Path | tuple[str, bytes], **fields) -> Response:
        def part(item, ctype):
            if isinstance(item, tuple):
                return (item[0], item[1], ctype)
            return (Path(item).name, Path(item).read_bytes(), ctype)

        body, ctype = encode_multipart({k: str(v) for k, v in fields.items()},
                                       {"face": part(face, "application/octet-stream"),
                                        "audio": part(audio, "application/octet-stream")})
        return self.request("POST", "/api/jobs", body=body, headers={"Content-Type": ctype})

    def submit_ok(self, face, audio, **fields) -> str:
        resp = self.submit(face, audio, **fields)
        assert resp.status == 202, resp
        return resp.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.get_json(f"/api/jobs/{job_id}")

    def wait(self, job_id: str, until=("done", "failed", "cancelled"), timeout: float = 120.0,
             check=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in until and (check is None or check(job)):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job} after {timeout} s\n{self.log()}")
            time.sleep(0.1)


def write_wav(path: Path, samples, rate: int = 16000) -> Path:
    import av
    import numpy as np

    samples = np.asarray(samples, dtype=np.int16).reshape(1, -1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def trim_audio(src: Path, dst: Path, seconds: float) -> Path:
    """The first `seconds` of `src` as a mono 16 kHz WAV."""
    import numpy as np

    from lipdub.media import load_audio

    wav = load_audio(src)[: int(seconds * 16000)]
    return write_wav(dst, np.clip(wav * 32767, -32768, 32767))


def worker_pid(data: Path, job_id: str) -> int | None:
    with sqlite3.connect(data / "lipdub.sqlite3", timeout=10) as conn:
        row = conn.execute("SELECT worker FROM jobs WHERE id=?", (job_id,)).fetchone()
    return row[0] if row else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clips(tmp_path_factory, media) -> dict[str, Path]:
    import cv2
    import numpy as np

    from lipdub.media import load_audio

    folder = tmp_path_factory.mktemp("serve-media")
    out = {
        "face": media / P2,
        "a1": media / A1,
        "a1x3": write_wav(folder / "speech-24s.wav", np.tile(np.clip(load_audio(media / A1) * 32767, -32768, 32767),
                                                             3)),
        "a1s": trim_audio(media / A1, folder / "speech-1s.wav", 1.0),
        "a2s": trim_audio(media / A1, folder / "speech-2s.wav", 2.0),
        "silent": write_wav(folder / "silent.wav", np.zeros(16000)),
        "blank": folder / "blank.png",
    }
    cv2.imwrite(str(out["blank"]), np.full((240, 320, 3), 128, np.uint8))
    return out


@pytest.fixture(scope="module")
def api(tmp_path_factory, wav2lip_checkpoint):
    server = ServeProcess(tmp_path_factory.mktemp("serve-api") / "data", wav2lip_checkpoint,
                          "--workers", "1", "--max-queued", "2", "--max-upload-mb", "2", token=TOKEN)
    server.start()
    yield server
    code = server.stop()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in server.log(), server.log()


# ------------------------------------------------------------------------------------ API


def test_openapi_and_docs(api):
    spec = api.get_json("/openapi.json", token=None)
    paths = spec["paths"]
    assert {"post", "get"} <= set(paths["/api/jobs"])
    assert "get" in paths["/api/jobs/{job_id}"] and "delete" in paths["/api/jobs/{job_id}"]
    assert "post" in paths["/api/jobs/{job_id}/cancel"] and "post" in paths["/api/jobs/{job_id}/link"]
    assert "get" in paths["/api/jobs/{job_id}/result"]
    form = spec["components"]["schemas"][paths["/api/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
                                          ["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert {"face", "audio", "blend", "restore", "pads", "face_index"} <= set(form["properties"])
    assert "checkpoint" not in form["properties"]
    assert any("HTTPBearer" in s for s in spec["components"]["securitySchemes"])
    docs = api.request("GET", "/docs", token=None)
    assert docs.status == 200 and b"swagger" in docs.body.lower()
    # every script and style sheet of the page comes from this server (offline); the browser test
    # (tests/test_serve_browser.py) checks that the page renders the operations
    assets = re.findall(rb'(?:src|href)="([^"]+)"', docs.body)
    assert assets and all(a.startswith(b"/") and not a.startswith(b"//") for a in assets), assets
    for asset in assets:
        resp = api.request("GET", asset.decode(), token=None)
        assert resp.status == 200 and len(resp.body) > 100, (asset, resp)
    csp = docs.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "default-src 'self'" in csp and "http" not in csp


def test_bearer_token_required(api):
    assert api.request("GET", "/healthz", token=None).status == 200
    page = api.request("GET", "/", token=None)
    assert page.status == 200 and b"<video" in page.body
    for method, path in [("GET", "/api/jobs"), ("GET", "/api/info"), ("GET", "/api/jobs/" + "a" * 22),
                         ("POST", "/api/jobs/" + "a" * 22 + "/cancel"), ("DELETE", "/api/jobs/" + "a" * 22)]:
        resp = api.request(method, path, token=None)
        assert resp.status == 401, (method, path, resp)
        assert resp.headers["www-authenticate"] == "Bearer"
        assert api.request(method, path, token="wrong").status == 401
    body, ctype = encode_multipart(files={"face": ("x.png", b"x" * 100, "image/png")})
    assert api.request("POST", "/api/jobs", body=body, headers={"Content-Type": ctype}, token=None).status == 401
    # a token in the URL is refused (it would end up in logs and history), on every method
    for method, path in [("GET", "/api/info"), ("GET", "/api/jobs/" + "a" * 22 + "/result"),
                         ("HEAD", "/api/jobs/" + "a" * 22 + "/result")]:
        resp = api.request(method, f"{path}?token={TOKEN}", token=None)
        assert resp.status == 401, (method, path, resp)
        if method == "GET":
            assert "a token in the URL is not accepted" in resp.json()["detail"]
    info = api.get_json("/api/info")
    assert info["workers"] == 1 and info["max_upload_mb"] == 2 and info["max_queued"] == 2
    assert info["keep_days"] == 7


def test_job_lifecycle_with_progress_and_range_requests(api, clips, tmp_path):
    import av

    resp = api.submit(clips["face"], clips["a2s"], box=P2_BOX, blend="box")
    assert resp.status == 202, resp
    job = resp.json()
    job_id = job["id"]
    assert resp.headers["location"] == f"/api/jobs/{job_id}"
    assert len(job_id) == 22 and job_id.replace("-", "").replace("_", "").isalnum()
    assert job["status"] in ("queued", "running") and job["face_name"] == P2 and job["audio_name"] == "speech-2s.wav"
    assert job["options"]["box"] == [90, 420, 80, 400] and job["options"]["blend"] == "box"

    seen = []
    deadline = time.monotonic() + 120
    while True:
        job = api.job(job_id)
        seen.append((job["status"], job["progress"], job["stage"]))
        if job["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert job["status"] == "done", (job, api.log())
    partial = [(s, p, st) for s, p, st in seen if s == "running" and 0 < p < 1]
    assert partial and all(st == "render" for _, _, st in partial), seen
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress), "progress never goes back"
    assert job["progress"] == 1.0 and job["stage"] == "done" and job["error"] is None
    n_frames = job["result"]["n_frames"]
    assert 45 <= n_frames <= 51 and (job["result"]["width"], job["result"]["height"]) == (474, 474)
    assert job["result_url"] == f"/api/jobs/{job_id}/result"

    full = api.request("GET", job["result_url"])
    assert full.status == 200 and full.headers["content-type"] == "video/mp4"
    assert full.headers["accept-ranges"] == "bytes" and full.body[4:8] == b"ftyp"
    size = len(full.body)
    part = api.request("GET", job["result_url"], headers={"Range": "bytes=100-199"})
    assert part.status == 206 and part.body == full.body[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    tail = api.request("GET", job["result_url"], headers={"Range": "bytes=-64"})
    assert tail.status == 206 and tail.body == full.body[-64:]
    assert api.request("GET", job["result_url"], headers={"Range": f"bytes={size + 10}-"}).status == 416
    download = api.request("GET", job["result_url"] + "?download=1")
    assert download.headers["content-disposition"].startswith("attachment")
    assert download.headers["content-disposition"].endswith('-lipdub.mp4"')
    check_signed_links(api, job_id, full.body)

    video = tmp_path / "result.mp4"
    video.write_bytes(full.body)
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert len(container.streams.audio) == 1
        assert sum(1 for _ in container.decode(video=0)) == n_frames

    listing = api.get_json("/api/jobs")
    assert job_id in [j["id"] for j in listing["jobs"]] and listing["counts"]["done"] >= 1
    assert job_id in [j["id"] for j in api.get_json("/api/jobs?status=done")["jobs"]]
    assert "face_file" not in listing["jobs"][0]

    assert api.request("DELETE", f"/api/jobs/{job_id}").status == 204
    assert api.request("GET", f"/api/jobs/{job_id}").status == 404
    assert api.request("GET", job["result_url"]).status == 404
    assert not (api.data / "jobs" / job_id).exists()
    assert api.request("DELETE", f"/api/jobs/{job_id}").status == 404


def check_signed_links(api: ServeProcess, job_id: str, result: bytes) -> None:
    """A signed link opens this job's result without a token (GET, HEAD, ranges) and nothing else."""
    assert api.request("POST", f"/api/jobs/{job_id}/link", token=None).status == 401
    link = api.request("POST", f"/api/jobs/{job_id}/link")
    assert link.status == 200 and link.headers["cache-control"] == "no-store", link
    link = link.json()
    url = link["url"]
    assert url.startswith(f"/api/jobs/{job_id}/result?") and TOKEN not in url and "token" not in url
    assert 850 < link["expires_at"] - time.time() <= 900  # 15 minutes by default
    assert api.request("GET", url, token=None).body == result
    head = api.request("HEAD", url, token=None)
    assert head.status == 200 and int(head.headers["content-length"]) == len(result) and head.body == b""
    part = api.request("GET", url, headers={"Range": "bytes=10-19"}, token=None)
    assert part.status == 206 and part.body == result[10:20]
    download = api.request("GET", link["download_url"], token=None)
    assert download.status == 200 and download.headers["content-disposition"].startswith("attachment")

    query = url.split("?", 1)[1]
    params = dict(p.split("=", 1) for p in query.split("&"))
    sig, expires = params["sig"], int(params["expires"])
    forged = [
        f"/api/jobs/{job_id}/result?expires={expires + 1}&sig={sig}",  # a longer life
        f"/api/jobs/{job_id}/result?expires={expires}&sig={sig[:-2] + ('AA' if sig[-2:] != 'AA' else 'BB')}",
        f"/api/jobs/{job_id}/result?expires={expires}",
        f"/api/jobs/{'b' * 22}/result?{query}",  # another job
        f"/api/jobs/{job_id}?{query}",  # another endpoint of the same job
        f"/api/jobs?{query}",
    ]
    for path in forged:
        assert api.request("GET", path, token=None).status == 401, path
    assert api.request("DELETE", f"/api/jobs/{job_id}?{query}", token=None).status == 401

    short = api.request("POST", f"/api/jobs/{job_id}/link?seconds=1").json()
    while time.time() <= short["expires_at"] + 0.1:
        time.sleep(0.2)
    assert api.request("GET", short["url"], token=None).status == 401
    assert api.request("POST", f"/api/jobs/{job_id}/link?seconds=7200").status == 422  # at most an hour


def test_unknown_and_malformed_ids(api):
    for job_id in ["a" * 22, "..%2F..%2Fetc%2Fpasswd", "x" * 200, "%00"]:
        for suffix in ("", "/result"):
            assert api.request("GET", f"/api/jobs/{job_id}{suffix}").status == 404


def test_non_media_uploads_are_refused(api, clips):
    before = api.get_json("/api/jobs")["counts"]
    resp = api.submit(("notes.txt", b"hello, this is not a video at all\n" * 20), clips["a1s"])
    assert resp.status == 415 and resp.json()["detail"] == \
        "face: 'notes.txt' is not a video or an image lipdub can read (unrecognised content)"
    resp = api.submit(clips["face"], ("voice.png", clips["face"].read_bytes()))
    assert resp.status == 415
    assert resp.json()["detail"] == "audio: 'voice.png' is a PNG image, not an audio or video file"
    resp = api.submit(clips["a1s"], clips["a1s"])
    assert resp.status == 415 and "a WAV audio file, not a video or an image" in resp.json()["detail"]
    resp = api.submit(("../../etc/face.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50), ("", b""))
    assert resp.status in (415, 422), resp
    assert api.get_json("/api/jobs")["counts"] == before


def test_upload_size_limit(api, clips):
    big = ("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(int(2.5 * 1024 * 1024)))
    body, ctype = encode_multipart({}, {"face": (*big, "image/png"), "audio": ("a.wav", clips["a1s"].read_bytes(),
                                                                                 "audio/wav")})
    # Content-Length says it all: refused before reading. Only the headers are sent, so the
    # server's early answer does not race a client still pushing the body (a broken pipe).
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/jobs")
        for key, value in (("Content-Type", ctype), ("Content-Length", str(len(body))),
                           ("Authorization", f"Bearer {TOKEN}")):
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        detail = json.loads(resp.read())["detail"]
        assert resp.status == 413 and "2 MB" in detail, (resp.status, detail)
    finally:
        conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:  # no Content-Length: counted as it arrives
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        conn.request("POST", "/api/jobs", body=chunks, encode_chunked=True,
                     headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close while the client still sends: also a refusal
    finally:
        conn.close()
    assert api.get_json("/api/jobs?status=queued")["jobs"] == []


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (RGB, 8 bits) with a tiny, truncated image stream:
    a decompression bomb that a decoder would allocate width*height*3 bytes for."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def h264_clip(path: Path, width: int, height: int, frames: int = 2) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_picture_size_is_checked_at_upload(api, clips, tmp_path):
    """Frames over 8192 px on a side are refused at upload from the header (as `lipdub run` refuses
    them), and so is a face file without a picture; no job, no file is left behind."""
    import av
    import numpy as np

    before = api.get_json("/api/jobs")["counts"]
    jobs_before = sorted(p.name for p in (api.data / "jobs").iterdir())
    bomb = png_header_only(30000, 30000)
    assert len(bomb) < 200
    resp = api.submit(("bomb.png", bomb), clips["a1s"])
    assert resp.status == 413, resp
    assert resp.json()["detail"] == \
        "face: 'bomb.png' is 30000x30000 pixels; frames of up to 8192 pixels on a side are supported"
    for width, height in ((8208, 16), (16, 8208)):  # a video stream's size, from the container
        clip = h264_clip(tmp_path / f"tall-{width}x{height}.mp4", width, height)
        resp = api.submit(clip, clips["a1s"])
        assert resp.status == 413, resp
        assert resp.json()["detail"] == (f"face: '{clip.name}' is {width}x{height} pixels; frames of up to 8192 "
                                         "pixels on a side are supported")
    audio_only = tmp_path / "voice.m4a"  # an MP4 container, sniffed as possible video, with audio only
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    resp = api.submit(audio_only, clips["a1s"])
    assert resp.status == 415 and resp.json()["detail"] == "face: 'voice.m4a' has no picture", resp
    assert api.get_json("/api/jobs")["counts"] == before
    assert sorted(p.name for p in (api.data / "jobs").iterdir()) == jobs_before
    assert list((api.data / "uploads").iterdir()) == []


def test_client_file_names_are_only_text(api, clips):
    """An upload named ../../etc/passwd is stored under the server's own name; the client's name
    is kept only as text (its last part), in the API and in the download's file name."""
    passwd = Path("/etc/passwd")
    passwd_before = (passwd.stat().st_mtime_ns, passwd.read_bytes()) if passwd.exists() else None
    resp = api.submit(("../../etc/passwd", clips["face"].read_bytes()),
                      ("..\\..\\<img src=x onerror=alert(1)>.wav", clips["a1s"].read_bytes()), box=P2_BOX)
    assert resp.status == 202, resp
    job = resp.json()
    assert job["face_name"] == "passwd" and job["audio_name"] == "<img src=x onerror=alert(1)>.wav"
    done = api.wait(job["id"])
    assert done["status"] == "done", done
    assert sorted(p.name for p in (api.data / "jobs" / job["id"]).iterdir()) == ["audio.wav", "face.png",
                                                                                 "result.mp4"]
    assert not list(api.data.rglob("passwd")) and not list(api.data.parent.rglob("*onerror*"))
    if passwd_before is not None:
        assert (passwd.stat().st_mtime_ns, passwd.read_bytes()) == passwd_before
    listed = [j for j in api.get_json("/api/jobs")["jobs"] if j["id"] == job["id"]]
    assert [(j["face_name"], j["audio_name"]) for j in listed] == [("passwd", "<img src=x onerror=alert(1)>.wav")]
    download = api.request("GET", f"/api/jobs/{job['id']}/result?download=1")
    assert download.headers["content-disposition"] == 'attachment; filename="passwd-lipdub.mp4"'
    assert api.request("DELETE", f"/api/jobs/{job['id']}").status == 204


def test_invalid_options(api, clips):
    cases = {
        "blend": ("bogus", "blend"),
        "pads": ("1 2", "pads must be 4 integers"),
        "face_index": ("-1", "--face-index must be 0 or more"),
        "fps": ("1000", "--fps must be between 1 and 120"),
        "restore": ("codeformer", "restore"),
        "checkpoint": ("/etc/passwd", "unknown field checkpoint (the model is fixed by the server's --checkpoint)"),
    }
    for field, (value, message) in cases.items():
        resp = api.submit(clips["face"], clips["a1s"], **{field: value})
        assert resp.status == 422, (field, resp)
        assert message in resp.json()["detail"], (field, resp)
    missing_body, ctype = encode_multipart({}, {"face": (P2, clips["face"].read_bytes(), "image/png")})
    resp = api.request("POST", "/api/jobs", body=missing_body, headers={"Content-Type": ctype})
    assert resp.status == 422 and "audio" in resp.json()["detail"]


def test_bad_inputs_fail_with_the_cli_message(api, clips, wav2lip_checkpoint, tmp_path):
    silent = api.submit_ok(clips["face"], clips["silent"])
    blank = api.submit_ok(clips["blank"], clips["a1s"])
    silent_job, blank_job = api.wait(silent), api.wait(blank)

    def cli_error(face: Path, audio: Path) -> str:
        out = subprocess.run([sys.executable, "-m", "lipdub", "run", "--face", str(face), "--audio", str(audio),
                              "-o", str(tmp_path / "out.mp4"), "--checkpoint", str(wav2lip_checkpoint), "--quiet"],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2, out
        return out.stderr.strip().removeprefix("lipdub: error: ")

    assert silent_job["status"] == "failed" and blank_job["status"] == "failed"
    assert silent_job["error"] == cli_error(clips["face"], clips["silent"]).replace(str(clips["silent"]), "silent.wav")
    assert silent_job["error"] == "silent.wav is silent (all samples are zero)"
    assert blank_job["error"] == cli_error(clips["blank"], clips["a1s"]).replace(str(clips["blank"]), "blank.png")
    assert blank_job["error"] == "no face found anywhere in blank.png"
    assert api.request("GET", f"/api/jobs/{blank}/result").status == 409
    for job_id in (silent, blank):
        assert api.request("DELETE", f"/api/jobs/{job_id}").status == 204


def test_cancel_and_queue_limit(api, clips):
    long_id = api.submit_ok(clips["face"], clips["a1"], box=P2_BOX)  # ~200 frames
    api.wait(long_id, until=("running",), check=lambda j: j["progress"] > 0)
    queued = [api.submit_ok(clips["face"], clips["a1s"], box=P2_BOX) for _ in range(2)]
    assert [api.job(j)["queue_position"] for j in queued] == [0, 1]
    full = api.submit(clips["face"], clips["a1s"], box=P2_BOX)
    assert full.status == 429 and full.headers["retry-after"] == "10" and "queue is full" in full.json()["detail"]

    resp = api.request("POST", f"/api/jobs/{queued[0]}/cancel")
    assert resp.status == 200 and resp.json()["status"] == "cancelled"
    resp = api.request("POST", f"/api/jobs/{queued[0]}/link")  # no result: no link
    assert resp.status == 409 and resp.json()["detail"] == f"job {queued[0]} is cancelled: no result"
    assert api.request("DELETE", f"/api/jobs/{long_id}").status == 409  # running: cancel first
    resp = api.request("POST", f"/api/jobs/{long_id}/cancel")
    assert resp.status == 200 and resp.json()["cancel_requested"]
    cancelled = api.wait(long_id, timeout=15)
    assert cancelled["status"] == "cancelled" and cancelled["progress"] < 1
    assert api.request("GET", f"/api/jobs/{long_id}/result").status == 409
    assert not (api.data / "jobs" / long_id / "result.mp4").exists()

    last = api.wait(queued[1])
    assert last["status"] == "done", last
    assert api.request("POST", f"/api/jobs/{queued[1]}/cancel").status == 409
    for job_id in (long_id, *queued):
        assert api.request("DELETE", f"/api/jobs/{job_id}").status == 204


def test_worker_crash_fails_only_its_job(api, clips):
    victim = api.submit_ok(clips["face"], clips["a1"], box=P2_BOX)
    api.wait(victim, until=("running",), check=lambda j: j["progress"] > 0)
    pid = worker_pid(api.data, victim)
    os.kill(pid, signal.SIGKILL)
    job = api.wait(victim, timeout=20)
    assert job["status"] == "failed"
    assert job["error"] == "the worker process was killed by signal 9 while running this job; the job was stopped"
    after = api.wait(api.submit_ok(clips["face"], clips["a1s"], box=P2_BOX))
    assert after["status"] == "done", after
    assert api.get_json("/api/info")["workers_alive"] == 1


def status_load(server: ServeProcess, face: Path, audio: Path, seconds: float, rate: int = 50,
                n_threads: int = 5) -> dict:
    """`rate` status requests per second on loopback for `seconds` while the worker runs jobs
    (one after another, so it stays busy). Returns the latencies (s, sorted), errors, and the share
    of answers that saw the job running. Shared with benchmarks/bench_serve.py."""
    job_ids = [server.submit_ok(face, audio)]
    server.wait(job_ids[0], until=("running",))
    latencies: list[float] = []
    statuses: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2
    auth = {"Authorization": f"Bearer {server.token}"} if server.token else {}

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        i = 0
        while True:
            due = start + (i * n_threads + k) / rate
            if due - start >= seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/api/jobs/{job_ids[-1]}", headers=auth)
                resp = conn.getresponse()
                body = resp.read()
                elapsed = time.perf_counter() - t0
                with lock:
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}: {body[:200]!r}")
                    else:
                        latencies.append(elapsed)
                        statuses.append(json.loads(body)["status"])
            except Exception as exc:  # noqa: BLE001 - every failure counts as an error
                with lock:
                    errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # keep the worker busy for the whole run
        if server.job(job_ids[-1])["status"] != "running" and time.monotonic() - start < seconds - 2:
            job_ids.append(server.submit_ok(face, audio))
        time.sleep(0.5)
    for t in threads:
        t.join()
    for job_id in job_ids:
        server.request("POST", f"/api/jobs/{job_id}/cancel")
        server.wait(job_id, timeout=15)
    return {"latencies": sorted(latencies), "errors": errors, "expected": int(rate * seconds),
            "running": statuses.count("running") / max(1, len(statuses)), "wall": time.monotonic() - start}


def test_status_requests_while_a_job_runs(api, clips):
    """A short burst of 50 status requests per second while the worker runs a job: every one is
    answered, none fails. (Latency percentiles: benchmarks/bench_serve.py.)"""
    load = status_load(api, clips["face"], clips["a1x3"], seconds=3)
    assert not load["errors"], load["errors"][:5]
    assert len(load["latencies"]) == load["expected"] == 150
    assert load["running"] > 0.8, "a job should run during the burst"


# ------------------------------------------------------------------------------------ restarts


def test_restart_during_a_job_loses_nothing(tmp_path, wav2lip_checkpoint, clips):
    server = ServeProcess(tmp_path / "data", wav2lip_checkpoint, "--workers", "1")
    server.start()
    try:
        first = server.submit_ok(clips["face"], clips["a2s"])
        second = server.submit_ok(clips["face"], clips["a1s"], box=P2_BOX)
        server.wait(first, until=("running",), check=lambda j: j["stage"] == "render")
        pid = worker_pid(server.data, first)
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash of the whole server
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), "the worker must not outlive the server"

        server.start()
        done = server.wait(first)
        assert done["status"] == "done" and done["attempts"] == 2, (done, server.log())
        assert server.wait(second)["status"] == "done"

        # a job interrupted again on its last allowed attempt is failed with the reason
        third = server.submit_ok(clips["face"], clips["a2s"], box=P2_BOX)
        server.wait(third, until=("running",))
        server.stop(signal.SIGKILL)
        server.start("--max-attempts", "1")
        failed = server.wait(third, timeout=10)
        assert failed["status"] == "failed"
        assert failed["error"] == "the server stopped while this job was running (1 attempt)"

        # a clean stop (SIGTERM) gives the running job back to the queue without counting the try
        fourth = server.submit_ok(clips["face"], clips["a2s"], box=P2_BOX)
        server.wait(fourth, until=("running",))
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
        assert "back in the queue (server shutdown)" in server.log(), server.log()
        server.start("--max-attempts", "1")
        done = server.wait(fourth)
        assert done["status"] == "done" and done["attempts"] == 1, done
    finally:
        server.stop()


def test_second_server_on_the_same_data_is_refused(tmp_path, wav2lip_checkpoint):
    server = ServeProcess(tmp_path / "data", wav2lip_checkpoint).start()
    try:
        out = subprocess.run([sys.executable, "-m", "lipdub", "serve", "--port", str(free_port()), "--data",
                              str(tmp_path / "data"), "--checkpoint", str(wav2lip_checkpoint)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 2
        assert out.stderr.strip() == f"lipdub: error: another `lipdub serve` is already using {tmp_path / 'data'}"
    finally:
        server.stop()


def test_bad_checkpoint_fails_at_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lipdub", "serve", "--port", str(free_port()), "--data",
                          str(tmp_path / "data"), "--checkpoint", str(tmp_path / "missing.pth")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("lipdub: error: checkpoint file not found"), out.stderr


def test_serve_is_not_imported_by_other_commands():
    code = ("import sys, lipdub.cli; lipdub.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'lipdub.serve.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out
