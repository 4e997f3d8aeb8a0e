"""`lipdub serve`: a web page and an HTTP API over a durable job queue.

    lipdub serve --host 127.0.0.1 --port 8000 --data ./lipdub-data --checkpoint wav2lip_gan

This module only registers the command; FastAPI, uvicorn and the pipeline are imported when
the command runs (`lipdub.serve.app`), so other commands and `import lipdub` stay fast.
"""
from __future__ import annotations

import argparse
import os

from ..errors import LipdubError


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the web app and HTTP API (job queue, progress, playback)",
        description="Serve a web page and an HTTP API (OpenAPI at /docs) that queue lip-sync jobs. Jobs live in "
                    "SQLite under --data and survive restarts; worker processes run them, or Ray tasks on a "
                    "cluster with --ray.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--data", default="./lipdub-data", help="folder for the job database, uploads and results "
                                                           "(default ./lipdub-data)")
    p.add_argument("--checkpoint", default="wav2lip_gan",
                   help="registry name (wav2lip, wav2lip_gan) or a .pth path; clients cannot choose another")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, i.e. jobs run at once (default 1); with --ray, jobs in flight on the "
                        "cluster (default: twice what it runs at once)")
    p.add_argument("--ray", default=None, metavar="ADDRESS|auto",
                   help="run the jobs as Ray tasks on this cluster instead of local processes (needs the "
                        "`cluster` extra); the job table, limits and page stay on this server")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per worker (default: cores / workers)")
    p.add_argument("--max-upload-mb", type=float, default=200.0,
                   help="largest upload, face and audio together, in MB (default 200)")
    p.add_argument("--max-queued", type=int, default=20,
                   help="jobs that may wait in the queue; more get HTTP 429 (default 20, 0 = no limit)")
    p.add_argument("--max-attempts", type=int, default=2,
                   help="runs of a job interrupted by a server crash before it is failed (default 2)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every /api/ call (default: $LIPDUB_TOKEN, "
                        "else no token); the page plays and downloads results through short-lived signed links")
    p.add_argument("--keep-days", type=float, default=7.0,
                   help="delete finished jobs (their uploads, result and row) this many days after they "
                        "finished (default 7, 0 = keep them)")
    p.add_argument("--min-free-mb", type=float, default=1024.0,
                   help="refuse new jobs (HTTP 507) while the data folder's disk has less free space than this, "
                        "in MB (default 1024, 0 = no check)")
    p.add_argument("--cancel-grace", type=float, default=10.0, metavar="SECONDS",
                   help="time a worker gets to stop a cancelled job before it is killed (default 10)")
    p.add_argument("--skip-sha256", action="store_true", help="accept downloaded weights whose hash differs")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:  # deferred: FastAPI and uvicorn are the optional `serve` extra
        from .app import ServeConfig, run_server
    except ImportError as exc:
        raise LipdubError(f"lipdub serve needs FastAPI and uvicorn ({exc.name} is missing): "
                          f"pip install 'lipdub[serve]'") from None
    token = args.token if args.token is not None else os.environ.get("LIPDUB_TOKEN") or None
    config = ServeConfig(
        data=args.data, checkpoint=args.checkpoint, host=args.host, port=args.port, workers=args.workers, ray=args.ray,
        device=args.device, threads=args.threads, max_upload_mb=args.max_upload_mb, max_queued=args.max_queued,
        max_attempts=args.max_attempts, token=token, skip_sha256=args.skip_sha256, keep_days=args.keep_days,
        min_free_mb=args.min_free_mb, cancel_grace_s=args.cancel_grace, access_log=args.access_log,
        log_level=args.log_level)
    return run_server(config)
