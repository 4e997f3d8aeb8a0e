"""The FastAPI application of `lipdub serve`: the HTTP API, the web page, and server start-up.

Requests never carry a file path or a checkpoint: uploads are stored under names the server
makes (``jobs/<random id>/face.<sniffed ext>``), results are served only from there, and the
model is the one given to ``lipdub serve --checkpoint``. A client's file name is kept only as
text to show.

Before a job is accepted: the bearer token (only from the ``Authorization`` header), the upload
size, free disk space, the queue, the content (sniffed), and the face's picture size from its
header (`probe`). Finished jobs are deleted after ``--keep-days`` (`Retention`). Results open
with the token or with a short-lived signed link (`links`).
"""
from __future__ import annotations

import fcntl
import hmac
import inspect
import logging
import os
import re
import shutil
import threading
import time
import unicodedata
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import parse_qs

import uvicorn

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__, weights
from ..device import pick_device
from ..errors import LipdubError
from ..media import make_folder
from ..options import SyncOptions, options_from_text, spec_of, web_fields
from . import sniff
from .links import DEFAULT_TTL_S, MAX_TTL_S, LinkSigner
from .probe import Refusal, check_upload
from .store import FINISHED, JobStore, QueueFull, new_id, valid_id
from .worker import RayPool, WorkerPool

log = logging.getLogger("lipdub.serve")
STATIC = Path(__file__).resolve().parent / "static"
MIB = 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # form fields and multipart framing on top of the two files
DAY_S = 86400.0
RESULT_PATH = re.compile(r"^/api/jobs/([A-Za-z0-9_-]{22})/result$")  # the one path a signed link opens


@dataclass
class ServeConfig:
    data: Path
    checkpoint: str = "wav2lip_gan"  # what the user gave (registry name or path)
    checkpoint_path: str | None = None  # resolved file, set at start-up
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None  # local worker processes (default 1), or jobs in flight on Ray (default: automatic)
    ray: str | None = None  # run the jobs as Ray tasks on this cluster (an address, or "auto")
    device: str = "auto"
    threads: int = 0  # torch threads per worker (0 = CPU cores / workers)
    max_upload_mb: float = 200.0
    max_queued: int = 20
    max_attempts: int = 2
    token: str | None = None
    skip_sha256: bool = False
    keep_days: float = 7.0  # finished jobs (rows and files) are deleted this long after they finished; 0 = never
    min_free_mb: float = 1024.0  # new jobs are refused (507) while the data folder's disk has less free space
    cancel_grace_s: float = 10.0
    nice: int = 5
    access_log: bool = False
    log_level: str = "info"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_mb * MIB)


# ------------------------------------------------------------------------------------ models


class JobResult(BaseModel):
    n_frames: int
    fps: float
    width: int
    height: int
    frames_with_face: int
    timings: dict[str, float] = {}
    seconds: Optional[float] = None
    face_size: int = Field(96, description="the generator's face size: 96 or 256 (wav2lip256)")
    precision: Optional[str] = Field(None, description="the arithmetic the networks ran at: fp32 or bf16")


class Job(BaseModel):
    id: str = Field(description="random, unguessable job id")
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float = Field(ge=0.0, le=1.0, description="0..1")
    stage: str = Field(description="queued, starting, scan (face detection), render (lip-sync), cancelling, "
                                   "done, failed or cancelled")
    error: Optional[str] = Field(None, description="why the job failed, in the words of `lipdub run`")
    face_name: str
    audio_name: str
    options: dict[str, Any]
    created_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    updated_at: float
    attempts: int
    cancel_requested: bool = False
    queue_position: Optional[int] = Field(None, description="jobs ahead of this one (queued jobs only)")
    result: Optional[JobResult] = None
    result_url: Optional[str] = None


class JobList(BaseModel):
    jobs: list[Job]
    counts: dict[str, int]


class Info(BaseModel):
    version: str
    checkpoint: str
    workers: int
    workers_alive: int
    max_upload_mb: float
    max_queued: int
    keep_days: float = Field(description="finished jobs are deleted this many days after they finished (0: never)")
    restore_available: bool
    progress_available: bool
    counts: dict[str, int]


class ErrorBody(BaseModel):
    detail: str


class Link(BaseModel):
    url: str = Field(description="GET or HEAD opens the result without a token until `expires_at`")
    download_url: str = Field(description="the same, sent as an attachment")
    expires_at: int = Field(description="Unix time (s) after which the link is refused")


ERRORS = {401: {"model": ErrorBody, "description": "missing or wrong bearer token"}}


# ------------------------------------------------------------------------------------ helpers


def display_name(name: str | None, fallback: str) -> str:
    """The client's file name, for display only: last path part, printable, at most 100 chars."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return base[:100] or fallback


RESTORE_ONLY = ("restore_region", "restore_weight", "upscale")  # ignored unless restore is on, as the page sends them


def job_options(form: dict[str, str]) -> dict[str, Any]:
    """The run options of an upload form (text values), checked with the one options schema.

    Returns the web fields' values as JSON-ready data (the job row keeps them); raises
    LipdubError with the CLI's message for a bad value and for a field that is not an option.
    """
    given = {k: v for k, v in form.items() if k not in ("face", "audio")}
    values = options_from_text(given, web_fields())
    if values.get("restore") is None:
        for name in RESTORE_ONLY:
            values.pop(name, None)
    options = SyncOptions.build(**values)
    names = [f.name for f in web_fields() if options.restore is not None or f.name not in RESTORE_ONLY]
    return {name: list(v) if isinstance(v, tuple) else v for name in names for v in [getattr(options, name)]}


def _form_signature(handler) -> inspect.Signature:
    """The upload endpoint's parameters for OpenAPI: the two files and every web option, as text."""
    params = [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
              inspect.Parameter("face", inspect.Parameter.KEYWORD_ONLY, annotation=UploadFile,
                                default=File(..., description="video or still image (png, jpg, webp, bmp) with the face")),
              inspect.Parameter("audio", inspect.Parameter.KEYWORD_ONLY, annotation=UploadFile,
                                default=File(..., description="audio, or a video whose first audio stream drives the lips"))]
    for f in web_fields():
        spec = spec_of(f)
        default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        extra = f"; one of {', '.join(map(str, spec.choices))}" if spec.choices else ""
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=Form(None, description=f"{spec.help} (default {default}{extra})")))
    return inspect.Signature(params, return_annotation=JSONResponse)


def public_job(job: dict) -> dict:
    job = {k: v for k, v in job.items() if k not in ("face_file", "audio_file")}
    job["result_url"] = f"/api/jobs/{job['id']}/result" if job["status"] == "done" else None
    return job


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def disk_refusal(config: ServeConfig, data: Path, incoming: int = 0) -> str | None:
    """Why a new job cannot be stored (the data folder's disk would drop below --min-free-mb), or None."""
    if config.min_free_mb <= 0:
        return None
    try:
        free = shutil.disk_usage(data).free
    except OSError:
        return None
    if free - incoming >= config.min_free_bytes:
        return None
    return (f"not enough disk space on the server for a new job: {free / MIB:.0f} MB free, and it keeps "
            f"{config.min_free_mb:g} MB free for the jobs it runs; try again later")


class Retention:
    """Deletes finished jobs (rows and files) `keep_days` after they finished, on a timer thread:
    a sweep at start, then one every tenth of the keeping time (at least 1 s, at most 10 minutes)."""

    def __init__(self, store: JobStore, keep_days: float, clock=time.time) -> None:
        self.store, self.keep_s, self.clock = store, keep_days * DAY_S, clock
        self.interval_s = min(600.0, max(1.0, self.keep_s / 10))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        removed = self.store.purge_finished(self.clock() - self.keep_s)
        if removed:
            log.info("deleted %d finished job(s) older than %g day(s): %s", len(removed), self.keep_s / DAY_S,
                     ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""))
        return removed

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # pragma: no cover - a failed sweep is retried at the next tick
                log.exception("deleting old jobs failed")
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lipdub-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


# ------------------------------------------------------------------------------------ guard


class _TooLarge(Exception):
    pass


CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# /docs: FastAPI's page starts Swagger UI with an inline script and Swagger UI sets inline styles;
# everything else still comes from this server only (the assets ship in fastapi-offline).
DOCS_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'self'")


class Guard:
    """ASGI middleware, before anything reads a request body: bearer token on /api/* (from the
    Authorization header only; a result also opens with a signed link), the upload size limit
    (Content-Length first, then counted as the body arrives), the disk space and queue limits
    (507 and 429 before an upload is read), and security headers on every response."""

    def __init__(self, app, config: ServeConfig, store: JobStore, signer: LinkSigner) -> None:
        self.app, self.config, self.store, self.signer = app, config, store, signer

    def _authorized(self, scope) -> bool:
        token = self.config.token
        if not token:
            return True
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
                    return True
        if scope["method"] in ("GET", "HEAD"):  # <video src> and download links cannot send headers
            match = RESULT_PATH.match(scope["path"])
            if match and self.signer.allows(match.group(1), scope.get("query_string", b"")):
                return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                 (b"x-frame-options", b"DENY")]
        docs = path in ("/docs", "/docs/oauth2-redirect")
        extra.append((b"content-security-policy", (DOCS_CSP if docs else CSP).encode()))

        async def send_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        if path == "/api" or path.startswith("/api/"):
            if not self._authorized(scope):
                in_url = "token" in parse_qs(scope.get("query_string", b"").decode("latin-1"))
                return await _json_error(
                    401, "a valid bearer token is required (Authorization: Bearer TOKEN)"
                         + ("; a token in the URL is not accepted" if in_url else ""),
                    {"WWW-Authenticate": "Bearer"})(scope, receive, send_headers)
            if scope["method"] == "POST" and path.rstrip("/") == "/api/jobs":
                return await self._upload(scope, receive, send_headers)
        return await self.app(scope, receive, send_headers)

    async def _upload(self, scope, receive, send):
        limit = self.config.max_upload_bytes + MULTIPART_SLACK
        too_large = f"upload too large: the limit is {self.config.max_upload_mb:g} MB (face and audio together)"
        declared = 0
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit():
                declared = int(value)
                if declared > limit:
                    return await _json_error(413, too_large, {"Connection": "close"})(scope, receive, send)
        full = await run_in_threadpool(disk_refusal, self.config, self.store.data, declared)
        if full:
            return await _json_error(507, full, {"Retry-After": "60", "Connection": "close"})(scope, receive, send)
        queued = await run_in_threadpool(self.store.queued_count)
        if self.config.max_queued and queued >= self.config.max_queued:
            return await _json_error(429, f"the queue is full ({queued} jobs waiting); try again later",
                                     {"Retry-After": "10", "Connection": "close"})(scope, receive, send)
        received = 0
        exceeded = False
        started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:  # whatever the app made of the interrupted body, the answer is 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _json_error(413, too_large, {"Connection": "close"})(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _json_error(413, too_large, {"Connection": "close"})(scope, receive, send)


# ------------------------------------------------------------------------------------ app


FORM_FIELDS = {"face", "audio"} | {f.name for f in web_fields()}


def create_app(config: ServeConfig, store: JobStore, pool: WorkerPool | RayPool | None = None,
               signer: LinkSigner | None = None) -> FastAPI:
    signer = signer or LinkSigner()
    retention = Retention(store, config.keep_days) if config.keep_days > 0 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if pool is not None:
            pool.start()
        if retention is not None:
            retention.start()
        slots = pool.slots() if pool is not None else 0
        log.info("lipdub serve: http://%s:%d (data %s, checkpoint %s, %d %s%s)", config.host, config.port,
                 store.data, config.checkpoint, slots, "jobs at once on Ray" if config.ray else "worker",
                 "" if slots == 1 or config.ray else "s")
        try:
            yield
        finally:
            if retention is not None:
                retention.stop()
            if pool is not None:
                await run_in_threadpool(pool.stop)

    # FastAPIOffline: /docs (Swagger UI) with its scripts and styles served from the fastapi-offline
    # package, so the page works without internet access. No /redoc: ReDoc loads its logo from a CDN.
    app = FastAPIOffline(
        redoc_url=None,
        title="lipdub",
        version=__version__,
        description=(
            "Wav2Lip lip-sync as a service. Upload a face (video or still image) and an audio track to "
            "`POST /api/jobs`, follow `GET /api/jobs/{id}` until `status` is `done`, then fetch "
            "`GET /api/jobs/{id}/result` (an H.264/AAC mp4; HTTP range requests are supported). "
            "When the server was started with `--token`, every `/api/` call needs `Authorization: Bearer TOKEN`; "
            "a token in the URL is not accepted. For `<video>` elements and download links, "
            "`POST /api/jobs/{id}/link` gives a short-lived signed URL of the result that needs no token. "
            "Finished jobs are deleted after the server's `--keep-days`."),
        lifespan=lifespan,
        static_url="/static-docs",
        swagger_ui_parameters={"validatorUrl": None},
    )
    bearer = HTTPBearer(auto_error=False, description="the server's --token / LIPDUB_TOKEN, when set")

    def auth(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        """Documents the bearer scheme in OpenAPI; the check itself happens in `Guard`, before bodies are read."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
        return _json_error(422, "; ".join(parts) or "invalid request")

    # ---------------------------------------------------------------- pages

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"ok": True, "token_required": bool(config.token)}

    # ---------------------------------------------------------------- API

    def _get(job_id: str) -> dict:
        job = store.get(job_id) if valid_id(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job '{job_id[:40]}'")
        return job

    @app.get("/api/info", response_model=Info, responses=ERRORS, dependencies=[Depends(auth)], tags=["server"])
    def info() -> dict:
        """What this server offers: limits, worker count, whether restoration is available."""
        workers = pool.slots() if pool is not None else (config.workers or 1)
        return {"version": __version__, "checkpoint": Path(config.checkpoint).name, "workers": workers,
                "workers_alive": pool.alive() if pool is not None else 0, "max_upload_mb": config.max_upload_mb,
                "max_queued": config.max_queued, "keep_days": config.keep_days, "restore_available": True,
                "progress_available": True, "counts": store.counts()}

    async def create_job(request: Request, face: UploadFile, audio: UploadFile, **_: Optional[str]) -> JSONResponse:
        """Upload a face and an audio file and queue a lip-sync job (multipart/form-data).

        Every other field is a run option with the name, values and checks of `lipdub run`
        (`pads` and `box` as four integers). Returns the job (202) with its `id`; follow it with
        `GET /api/jobs/{id}`."""
        form = await request.form()
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            hint = " (the model is fixed by the server's --checkpoint)" if "checkpoint" in unknown else ""
            raise HTTPException(422, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}")
        try:
            options = job_options({k: v for k, v in form.items() if isinstance(v, str)})
        except LipdubError as exc:
            raise HTTPException(422, str(exc)) from None
        return await run_in_threadpool(_accept, face, audio, options)

    create_job.__signature__ = _form_signature(create_job)
    app.post(
        "/api/jobs", status_code=202, response_model=Job, dependencies=[Depends(auth)], tags=["jobs"],
        responses={**ERRORS, 413: {"model": ErrorBody, "description": "upload larger than --max-upload-mb"},
                   415: {"model": ErrorBody, "description": "a file is not media lipdub can read"},
                   422: {"model": ErrorBody, "description": "invalid option"},
                   429: {"model": ErrorBody, "description": "the queue is full (--max-queued); retry later"},
                   507: {"model": ErrorBody, "description": "the server's disk is nearly full (--min-free-mb); "
                                                            "retry later"}},
    )(create_job)

    def _refuse_if_full(incoming: int) -> None:
        full = disk_refusal(config, store.data, incoming)
        if full:
            raise HTTPException(507, full, headers={"Retry-After": "60"})

    def _accept(face: UploadFile, audio: UploadFile, options: dict) -> JSONResponse:
        uploads = []
        for role, upload in (("face", face), ("audio", audio)):
            name = display_name(upload.filename, role)
            upload.file.seek(0)
            head = upload.file.read(sniff.HEAD_BYTES)
            upload.file.seek(0)
            try:
                kind = sniff.check(role, head, name)
            except ValueError as exc:
                raise HTTPException(415, str(exc)) from None
            uploads.append((role, upload, name, kind))
        _refuse_if_full(sum(upload.size or 0 for _, upload, _, _ in uploads))
        queued = store.queued_count()
        if config.max_queued and queued >= config.max_queued:
            raise HTTPException(429, f"the queue is full ({queued} jobs waiting); try again later",
                                headers={"Retry-After": "10"})
        job_id = new_id()
        staging = store.uploads_dir / job_id
        staging.mkdir()
        try:
            files = {}
            for role, upload, name, kind in uploads:
                target = staging / f"{role}{kind.ext}"
                with open(target, "xb") as out:
                    shutil.copyfileobj(upload.file, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                files[role] = (name, target.name)
                if role == "face":  # the picture size from its header, in a child process: nothing decoded
                    try:
                        check_upload(target, role, name)
                    except Refusal as exc:
                        raise HTTPException(exc.status, exc.message) from None
            final = store.job_dir(job_id)
            os.rename(staging, final)
            _fsync_dir(store.jobs_dir)
            try:
                store.add(job_id, options, files["face"][0], files["audio"][0], files["face"][1], files["audio"][1],
                          config.max_queued)
            except QueueFull as exc:
                shutil.rmtree(final, ignore_errors=True)
                raise HTTPException(429, f"the queue is full ({exc.args[0]} jobs waiting); try again later",
                                    headers={"Retry-After": "10"}) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        job = public_job(store.get(job_id))
        log.info("job %s: queued (%s + %s)", job_id, job["face_name"], job["audio_name"])
        return JSONResponse(job, status_code=202,
                            headers={"Location": f"/api/jobs/{job_id}"})

    @app.get("/api/jobs", response_model=JobList, responses=ERRORS, dependencies=[Depends(auth)], tags=["jobs"])
    def list_jobs(
        status: Optional[Literal["queued", "running", "done", "failed", "cancelled"]] = Query(None),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict:
        """The newest jobs first, with the number of jobs in each status."""
        return {"jobs": [public_job(j) for j in store.list(limit=limit, status=status)], "counts": store.counts()}

    @app.get("/api/jobs/{job_id}", response_model=Job, dependencies=[Depends(auth)], tags=["jobs"],
             responses={**ERRORS, 404: {"model": ErrorBody}})
    def get_job(job_id: str) -> dict:
        """A job's status, progress (0..1), stage and error."""
        return public_job(_get(job_id))

    @app.get("/api/jobs/{job_id}/result", dependencies=[Depends(auth)], tags=["jobs"],
             response_class=FileResponse,
             responses={**ERRORS, 200: {"content": {"video/mp4": {}}, "description": "the mp4"},
                        206: {"description": "part of the mp4 (Range request)"},
                        404: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "not done yet"}})
    def get_result(job_id: str, download: bool = Query(False, description="send as an attachment"),
                   expires: Optional[str] = Query(None, description="signed link: valid until (from POST .../link)"),
                   sig: Optional[str] = Query(None, description="signed link: signature (from POST .../link)"),
                   ) -> Response:
        """The result video of a done job; supports HTTP range requests (seeking)."""
        job = _get(job_id)
        if job["status"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['status']}: no result"
                                     + (f" ({job['error']})" if job["error"] else ""))
        path = store.result_path(job_id).resolve()
        if not path.is_relative_to(store.jobs_dir) or not path.is_file():
            raise HTTPException(404, f"the result of job {job_id} is missing")
        stem = Path(job["face_name"]).stem[:60] or "result"
        filename = f"{stem}-lipdub.mp4"
        return FileResponse(path, media_type="video/mp4", filename=filename if download else None,
                            content_disposition_type="attachment" if download else "inline",
                            headers={"Cache-Control": "private, max-age=3600"})

    app.head("/api/jobs/{job_id}/result", dependencies=[Depends(auth)], include_in_schema=False)(get_result)

    @app.post("/api/jobs/{job_id}/link", response_model=Link, dependencies=[Depends(auth)], tags=["jobs"],
              responses={**ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "not done"}})
    def result_link(job_id: str, seconds: int = Query(DEFAULT_TTL_S, ge=1, le=MAX_TTL_S,
                                                      description="how long the link works")) -> JSONResponse:
        """A short-lived signed URL of a done job's result, for `<video src>` and download links: it
        opens this one result with GET or HEAD, without a token, until `expires_at`."""
        job = _get(job_id)
        if job["status"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['status']}: no result")
        url, expires = signer.link(job_id, seconds)
        return JSONResponse({"url": url, "download_url": f"{url}&download=1", "expires_at": expires},
                            headers={"Cache-Control": "no-store"})

    @app.post("/api/jobs/{job_id}/cancel", response_model=Job, dependencies=[Depends(auth)], tags=["jobs"],
              responses={**ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "finished"}})
    def cancel_job(job_id: str) -> dict:
        """Cancel a job: a queued one at once, a running one within a few seconds (status stays `running`
        with `cancel_requested` until the worker stops)."""
        _get(job_id)
        status = store.cancel(job_id)
        if status is None:
            raise HTTPException(404, f"no job '{job_id}'")
        if status in FINISHED and status != "cancelled":
            raise HTTPException(409, f"job {job_id} is already {status}")
        return public_job(_get(job_id))

    @app.delete("/api/jobs/{job_id}", status_code=204, dependencies=[Depends(auth)], tags=["jobs"],
                responses={**ERRORS, 404: {"model": ErrorBody},
                           409: {"model": ErrorBody, "description": "running: cancel it first"}})
    def delete_job(job_id: str) -> Response:
        """Delete a job that is not running, with its uploads and result."""
        _get(job_id)
        status = store.delete(job_id)
        if status is None:
            raise HTTPException(404, f"no job '{job_id}'")
        if status == "running":
            raise HTTPException(409, f"job {job_id} is running: cancel it first")
        return Response(status_code=204)

    app.add_middleware(Guard, config=config, store=store, signer=signer)
    return app


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ start-up


def lock_data_dir(data: Path):
    """Hold an exclusive lock on the data folder for the life of the process."""
    handle = open(data / "serve.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LipdubError(f"another `lipdub serve` is already using {data}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def prepare(config: ServeConfig) -> tuple[JobStore, Any]:
    """Everything that can fail with a clear message before the server listens."""
    if config.workers is not None and config.workers < (0 if config.ray else 1):
        raise LipdubError("--workers must be at least 1" + (" (or 0: automatic, with --ray)" if config.ray else ""))
    if config.max_upload_mb <= 0:
        raise LipdubError("--max-upload-mb must be more than 0")
    if config.max_queued < 0 or config.max_attempts < 1:
        raise LipdubError("--max-queued must be 0 or more and --max-attempts at least 1")
    if not config.keep_days >= 0 or not config.min_free_mb >= 0:  # also refuses NaN
        raise LipdubError("--keep-days and --min-free-mb must be 0 or more")
    if not config.cancel_grace_s > 0:
        raise LipdubError("--cancel-grace must be more than 0")
    config.data = make_folder(config.data, "data folder").resolve()
    store = JobStore(config.data)
    lock = lock_data_dir(config.data)
    store.init()
    pick_device(config.device)
    path = weights.resolve(config.checkpoint, skip_sha256=config.skip_sha256)
    weights.load_state_dict(path, "wav2lip")  # a wrong file fails now, not in every job
    config.checkpoint_path = str(Path(path).resolve())
    stats = store.recover(config.max_attempts)
    if stats["requeued"] or stats["failed"] or stats["cancelled"]:
        log.info("recovered after restart: %d job(s) back in the queue, %d failed, %d cancelled",
                 stats["requeued"], stats["failed"], stats["cancelled"])
    return store, lock


def worker_config(config: ServeConfig) -> dict:
    threads = config.threads or max(1, (os.cpu_count() or 1) // (config.workers or 1))
    return {"checkpoint": config.checkpoint_path, "device": config.device, "skip_sha256": config.skip_sha256,
            "threads": threads, "nice": config.nice}


def run_server(config: ServeConfig) -> int:
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(message)s")
    store, lock = prepare(config)
    if config.ray:
        pool = RayPool(store, worker_config(config), config.ray, config.workers or 0,
                       cancel_grace_s=config.cancel_grace_s)
        try:
            pool.connect()  # a cluster that cannot be reached is one line and exit code 2, before listening
        except BaseException:
            lock.close()
            raise
    else:
        pool = WorkerPool(store, worker_config(config), config.workers or 1, cancel_grace_s=config.cancel_grace_s)
    app = create_app(config, store, pool)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, access_log=config.access_log,
        timeout_graceful_shutdown=5, proxy_headers=False, server_header=False))
    try:
        server.run()
    finally:
        lock.close()
    return 0 if server.started else 1
