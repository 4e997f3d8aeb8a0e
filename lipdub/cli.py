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


# ----------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from .serve import add_cli as add_serve
    from .train import add_cli as add_train

    parser = argparse.ArgumentParser(prog="lipdub", description="Streaming Wav2Lip lip-sync.")
    parser.add_argument("--version", action="version", version=f"lipdub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_batch, _add_restore, _add_eval, _add_weights, add_serve, add_train):
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
