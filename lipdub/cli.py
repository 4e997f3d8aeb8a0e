"""`lipdub` command line: a thin argparse layer over the library calls.

The flags of `lipdub run` are generated from `lipdub.options.SyncOptions`, the one declaration
of the run options. Any LipdubError becomes one line on stderr and exit code 2; other
exceptions are bugs and keep their traceback. The job modules are imported by the command
that needs them, so `lipdub --help` does not load torch.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import LipdubError
from .media import check_writable
from .options import FACE_DETECTORS, PRECISIONS, add_arguments, options_from_args


# ------------------------------------------------------------------------------------------ run

def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="lip-sync a face video or image to an audio track")
    p.add_argument("--face", required=True, help="video or still image (jpg/png/webp/bmp) with the face")
    p.add_argument("--audio", required=True, help="audio or video file whose first audio stream drives the lips")
    p.add_argument("-o", "--output", required=True, help="output .mp4 (H.264 + AAC)")
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from .pipeline import sync

    result = sync(args.face, args.audio, args.output, options=options_from_args(args))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        fps = result.n_frames / max(1e-9, result.timings.get("total", 0.0))
        print(f"wrote {result.output}: {result.n_frames} frames at {result.fps:g} fps, {result.width}x{result.height}, "
              f"face in {result.frames_with_face} frames ({fps:.1f} frames/s overall)")
    return 0


# ---------------------------------------------------------------------------------------- batch

def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="run many lip-sync jobs from a .jsonl or .csv manifest",
                       description="Run every job of a manifest (.jsonl or .csv; fields face, audio, optional "
                                   "output, and any run option by its name) with local worker processes, or as "
                                   "Ray tasks on a cluster with --ray. Finished outputs are skipped on a re-run; "
                                   "DIR/batch-report.json tells each job's outcome. Exit code 0 when every job "
                                   "succeeded, 1 when some failed, 2 for a bad manifest.")
    p.add_argument("jobs", metavar="JOBS", help="manifest: .jsonl (one JSON object per line) or .csv (a header row)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="where relative outputs and the report go")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="jobs at once: local worker processes, or Ray tasks in flight (0 = one per 2 CPU cores)")
    p.add_argument("--ray", default=None, metavar="ADDRESS|auto",
                   help="run the jobs as Ray tasks on this cluster (needs the `cluster` extra)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_batch)


def _batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    report = run_batch(args.jobs, args.out_dir, workers=args.workers, ray_address=args.ray,
                       progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['done']} done, {report['skipped']} already complete, {report['failed']} failed "
              f"of {report['total']} jobs; report in {report['report']}")
    return 1 if report["failed"] else 0


# -------------------------------------------------------------------------------------- restore

def _add_restore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore the faces of a video or image with GFPGAN",
                       description="Restore the main face of a video (-> .mp4, audio kept) or an image "
                                   "(-> image of the output's suffix) with GFPGAN v1.3/v1.4.")
    p.add_argument("input", help="video or image (jpg/png/webp/bmp/tif)")
    p.add_argument("-o", "--output", required=True, help="output .mp4 for a video; .png/.jpg/... for an image")
    p.add_argument("--checkpoint", default="gfpgan_v1.4",
                   help="registry name (gfpgan_v1.3, gfpgan_v1.4) or a GFPGANv1.x.pth path (default gfpgan_v1.4)")
    p.add_argument("--region", choices=("face", "mouth"), default="face",
                   help="face: the whole aligned face (default); mouth: the lower face only")
    p.add_argument("--weight", type=float, default=1.0, help="0..1 blend of restored and input (default 1)")
    p.add_argument("--upscale", type=int, choices=(1, 2, 4), default=1, help="resize the output by 1, 2 or 4")
    p.add_argument("--detector", choices=FACE_DETECTORS, default="centerface", help="face detector (needs landmarks)")
    p.add_argument("--detector-weights", default=None, help="weights file for the detector (default: registry)")
    p.add_argument("--det-stride", type=int, default=1, help="detect every N-th frame (default 1: every frame)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--batch-size", type=int, default=None, help="faces per network batch (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network arithmetic: auto (bf16 where the hardware runs it natively), fp32, bf16")
    p.add_argument("--max-frames", type=int, default=None, help="only the first N frames (a preview, no audio)")
    p.add_argument("--skip-sha256", action="store_true", help="accept downloaded weights whose hash differs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.set_defaults(handler=_restore)


def _restore(args: argparse.Namespace) -> int:
    from .enhance import restore_video

    result = restore_video(
        args.input, args.output, checkpoint=args.checkpoint, region=args.region, weight=args.weight,
        upscale=args.upscale, detector=args.detector, detector_weights=args.detector_weights, device=args.device,
        batch_size=args.batch_size, det_stride=args.det_stride, max_frames=args.max_frames,
        skip_sha256=args.skip_sha256, progress=not args.quiet, precision=args.precision,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    if result.is_image:
        print(f"wrote {result.output}: {result.width}x{result.height}, "
              f"{result.faces_restored} face{'s' if result.faces_restored != 1 else ''} restored")
    else:
        fps = result.n_frames / max(1e-9, result.timings.get("total", 0.0))
        print(f"wrote {result.output}: {result.n_frames} frames at {result.fps:g} fps, {result.width}x{result.height}, "
              f"face restored in {result.frames_restored} frames ({fps:.2f} frames/s overall)")
    if result.frames_with_face == 0:
        print("lipdub: note: no face found; the frames were copied unchanged", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- eval

def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure lip-sync (LSE-D / LSE-C, A/V offset) of a video",
                       description="LSE-D / LSE-C and the audio-video offset as syncnet_python computes them.")
    p.add_argument("video", help="video with its audio track")
    p.add_argument("--cropped", action="store_true", help="the video is already 224x224 face crops at 25 fps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="also report PSNR / SSIM of the face region against this video (same frame size)")
    p.add_argument("--checkpoint", default="syncnet_v2", metavar="PATH|NAME",
                   help="SyncNet v2 weights: registry name (syncnet_v2) or a syncnet_v2.model path")
    p.add_argument("--detector", default="centerface", choices=FACE_DETECTORS, help="face detector")
    p.add_argument("--detector-weights", default=None, help="weights file for the detector (default: registry)")
    p.add_argument("--det-stride", type=int, default=1,
                   help="detect every N-th frame (default 1, as syncnet_python; higher is faster)")
    p.add_argument("--batch-size", type=int, default=20, help="windows per SyncNet batch (default 20)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--skip-sha256", action="store_true", help="accept downloaded weights whose hash differs")
    p.add_argument("--fix-offset", action="store_true",
                   help="also write -o OUTPUT: the video with its audio shifted by the measured offset (a remux)")
    p.add_argument("-o", "--output", default=None, help="the fixed copy (with --fix-offset)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, fix_offset, summary

    if args.fix_offset != (args.output is not None):
        raise LipdubError("--fix-offset and -o OUTPUT go together")
    if args.output is not None:
        check_writable(args.output)
    options = dict(cropped=args.cropped, reference=args.reference, checkpoint=args.checkpoint,
                   detector=args.detector, detector_weights=args.detector_weights, det_stride=args.det_stride,
                   device=args.device, skip_sha256=args.skip_sha256, progress=not (args.quiet or args.json),
                   batch_size=args.batch_size)
    if args.fix_offset:
        result = fix_offset(args.video, args.output, **options)
    else:
        result = evaluate(args.video, **options)
    if args.json:
        json.dump(result, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(summary(result))
        if args.fix_offset:
            print(f"wrote {result['output']}: audio moved {result['audio_shift'] * 1000:+.0f} ms")
    return 0


# -------------------------------------------------------------------------------------- weights

def _add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="list, download and verify model weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    wsub.add_parser("list", help="registry entries and what is cached")
    d = wsub.add_parser("download", help="download a registry entry into the cache")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="download again even if cached")
    d.add_argument("--skip-sha256", action="store_true", help="accept a file whose hash differs (structure is still checked)")
    v = wsub.add_parser("verify", help="check a weights file's structure and hash")
    v.add_argument("path")
    pp = wsub.add_parser("path", help="print the cache path of a registry entry")
    pp.add_argument("name")
    p.set_defaults(handler=_weights)


def _weights(args: argparse.Namespace) -> int:
    from . import weights

    if args.weights_command == "list":
        return weights.cmd_list()
    if args.weights_command == "download":
        return weights.cmd_download(args.name, args.force, args.skip_sha256)
    if args.weights_command == "verify":
        return weights.cmd_verify(args.path)
    return weights.cmd_path(args.name)


# ------------------------------------------------------------------------------- avatar, live

def _add_avatar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("avatar", help="prepare a face (video loop or photo) for lipdub live")
    asub = p.add_subparsers(dest="avatar_command", required=True)
    q = asub.add_parser("prepare", help="detect and track the face once; write an avatar directory",
                        description="Decode FACE at 25 fps (a video is cut at --max-seconds), track the face as "
                                    "`lipdub run` does, and write AVATAR_DIR: frames, boxes, landmarks and the "
                                    "generator's face crops, so that `lipdub live` detects nothing.")
    q.add_argument("face", metavar="FACE", help="a short video loop or a photo of the face")
    q.add_argument("-o", "--output", required=True, metavar="AVATAR_DIR", help="directory to write (new, empty, "
                                                                                "or an avatar to replace)")
    q.add_argument("--detector", choices=FACE_DETECTORS, default="centerface", help="face detector")
    q.add_argument("--detector-weights", default=None, help="weights file for the detector (default: registry)")
    q.add_argument("--box", type=int, nargs=4, default=None, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="a fixed face box for every frame, no detection")
    q.add_argument("--pads", type=int, nargs=4, default=(0, 10, 0, 0), metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="padding added to detected boxes (default 0 10 0 0)")
    q.add_argument("--no-smooth", dest="smooth", action="store_false", help="do not smooth boxes over time")
    q.add_argument("--face-index", type=int, default=None, metavar="N", help="the N-th face from the left")
    q.add_argument("--max-seconds", type=float, default=10.0, help="longest loop kept from a video (default 10)")
    q.add_argument("--resize-factor", type=int, default=1, metavar="N", help="downscale the face by N first")
    q.add_argument("--loop", choices=("pingpong", "loop"), default="pingpong",
                   help="idle loop of a video: forward and back (default, no seam) or restart")
    q.add_argument("--face-size", type=int, choices=(96, 256), default=96,
                   help="the generator's face size the crops are stored at (96: wav2lip, wav2lip_gan)")
    q.add_argument("--device", default="auto", help="where the detector runs: auto, cpu, cuda, mps")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_avatar)


def _avatar(args: argparse.Namespace) -> int:
    from .avatar import prepare_avatar

    result = prepare_avatar(args.face, args.output, detector=args.detector, detector_weights=args.detector_weights,
                            box=tuple(args.box) if args.box else None, pads=tuple(args.pads), smooth=args.smooth,
                            face_index=args.face_index, max_seconds=args.max_seconds,
                            resize_factor=args.resize_factor, loop=args.loop, face_size=args.face_size,
                            device=args.device, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(f"wrote {result.output}: {result.n_frames} frame{'s' if result.n_frames != 1 else ''}, "
              f"{result.width}x{result.height}, face in {result.frames_with_face}")
    return 0


def _add_live(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("live", help="a real-time talking avatar: web page, WebRTC and a speech endpoint",
                       description="Serve a web page and a WebRTC endpoint: the browser sends its microphone or "
                                   "an audio file and gets the avatar's 25 fps video back with the same audio, in "
                                   "sync. POST /api/speech takes a stream of s16le PCM (a TTS pipeline) for the "
                                   "shared stage. Needs the `live` extra (aiortc, FastAPI, uvicorn).")
    p.add_argument("--avatar", required=True, metavar="AVATAR_DIR", help="made by `lipdub avatar prepare`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8010, help="port to listen on (default 8010)")
    p.add_argument("--checkpoint", default="wav2lip_gan", metavar="NAME|PATH",
                   help="generator: registry name (wav2lip, wav2lip_gan) or a .pth path")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network arithmetic (default auto: bf16 where the hardware runs it natively)")
    p.add_argument("--threads", type=int, default=0, help="generator threads (default: cores - 1)")
    p.add_argument("--blend", choices=("feather", "box"), default="feather", help="how the mouth is pasted")
    p.add_argument("--mask-scale", type=float, default=1.0, help="grow or shrink the feather mask (0.5..2)")
    p.add_argument("--silence", choices=("keep", "generate"), default="keep",
                   help="keep: the avatar rests in pauses (default); generate: a mouth on every frame")
    p.add_argument("--max-sessions", type=int, default=1, help="browser sessions at once (default 1)")
    p.add_argument("--skip-sha256", action="store_true", help="accept downloaded weights whose hash differs")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=_live)


def _live(args: argparse.Namespace) -> int:
    try:  # deferred: aiortc, FastAPI and uvicorn are the optional `live` extra
        from .live.server import LiveConfig, run_server
    except ImportError as exc:
        raise LipdubError(f"lipdub live needs aiortc, FastAPI and uvicorn ({exc.name} is missing): "
                          f"pip install 'lipdub[live]'") from None
    if not 0.5 <= args.mask_scale <= 2.0:
        raise LipdubError(f"--mask-scale must be 0.5..2, got {args.mask_scale:g}")
    return run_server(LiveConfig(
        avatar=args.avatar, checkpoint=args.checkpoint, host=args.host, port=args.port, device=args.device,
        precision=args.precision, threads=args.threads, blend=args.blend, mask_scale=args.mask_scale,
        silence=args.silence == "keep", max_sessions=args.max_sessions, skip_sha256=args.skip_sha256,
        log_level=args.log_level))


# ----------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from .serve import add_cli as add_serve
    from .train import add_cli as add_train

    parser = argparse.ArgumentParser(prog="lipdub", description="Streaming Wav2Lip lip-sync.")
    parser.add_argument("--version", action="version", version=f"lipdub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_batch, _add_restore, _add_eval, _add_weights, add_serve, add_train, _add_avatar,
                _add_live):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LipdubError as exc:
        print(f"lipdub: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipdub: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
