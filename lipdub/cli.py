"""`lipdub` command line: a thin argparse layer over the library calls.

Any LipdubError becomes one line on stderr and exit code 2; other exceptions are bugs and
keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from .errors import LipdubError


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="lip-sync a face video or image to an audio track")
    p.add_argument("--face", required=True, help="video or still image (jpg/png/webp/bmp) with the face")
    p.add_argument("--audio", required=True, help="audio or video file whose first audio stream drives the lips")
    p.add_argument("-o", "--output", required=True, help="output .mp4 (H.264 + AAC)")
    p.add_argument("--checkpoint", default="wav2lip_gan", help="registry name (wav2lip, wav2lip_gan) or a .pth path")
    p.add_argument("--detector", default="centerface", choices=["centerface", "s3fd"], help="face detector")
    p.add_argument("--detector-weights", default=None, help="weights file for the detector (default: registry)")
    p.add_argument("--box", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"), default=None,
                   help="fixed face box for every frame; skips detection (as the original --box)")
    p.add_argument("--pads", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"), default=[0, 10, 0, 0],
                   help="padding added to detected boxes (default 0 10 0 0)")
    p.add_argument("--no-smooth", action="store_true", help="do not smooth face boxes over time")
    p.add_argument("--face-index", type=int, default=None, help="drive the N-th face from the left (0-based)")
    p.add_argument("--blend", choices=["feather", "box"], default="feather",
                   help="feather: soft lower-face blend (default); box: the original hard paste")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate for a still image (default 25)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--loop", action="store_true", help="loop the video when the audio is longer (default: ping-pong)")
    length.add_argument("--static", action="store_true", help="use only the first frame")
    p.add_argument("--resize-factor", type=int, default=1, help="downscale the input by this factor first")
    p.add_argument("--crop", type=int, nargs=4, metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"), default=[0, -1, 0, -1],
                   help="crop the input first (-1 = to the edge)")
    p.add_argument("--rotate", action="store_true", help="rotate the input 90 degrees clockwise first")
    p.add_argument("--batch-size", type=int, default=16, help="frames per generator batch")
    p.add_argument("--det-batch-size", type=int, default=0, help="frames per detector batch (0 = best for the device)")
    p.add_argument("--det-stride", type=int, default=0, help="detect every N-th frame (0 = about 6 per second)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--skip-sha256", action="store_true", help="accept downloaded weights whose hash differs")
    p.add_argument("--restore", choices=["gfpgan"], default=None, help="restore the face with GFPGAN after lip-sync")
    p.add_argument("--restore-checkpoint", default="gfpgan_v1.4", help="gfpgan_v1.3, gfpgan_v1.4 or a .pth path")
    p.add_argument("--restore-region", choices=["mouth", "face"], default="mouth",
                   help="what restoration may change (default mouth)")
    p.add_argument("--restore-weight", type=float, default=1.0, help="0..1 blend of restored and lip-synced face")
    p.add_argument("--upscale", type=int, choices=[1, 2, 4], default=1, help="output size factor (with --restore)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="write a JSON report: coverage, timings, and LSE-D/LSE-C when syncnet_v2 weights are cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")


def _run(args: argparse.Namespace) -> int:
    from .pipeline import SyncOptions, sync

    options = SyncOptions(
        checkpoint=args.checkpoint, detector=args.detector, detector_weights=args.detector_weights,
        box=tuple(args.box) if args.box else None, pads=tuple(args.pads), smooth=not args.no_smooth,
        face_index=args.face_index, blend=args.blend, fps=args.fps, length="loop" if args.loop else "pingpong",
        static=args.static, resize_factor=args.resize_factor, crop=tuple(args.crop), rotate=args.rotate,
        batch_size=args.batch_size, det_batch_size=args.det_batch_size, det_stride=args.det_stride,
        device=args.device, skip_sha256=args.skip_sha256, progress=not args.quiet,
        restore=args.restore, restore_checkpoint=args.restore_checkpoint, restore_region=args.restore_region,
        restore_weight=args.restore_weight, upscale=args.upscale, report=args.report,
    )
    result = sync(args.face, args.audio, args.output, options=options)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        fps = result.n_frames / max(1e-9, result.timings.get("total", 0.0))
        print(f"wrote {result.output}: {result.n_frames} frames at {result.fps:g} fps, {result.width}x{result.height}, "
              f"face in {result.frames_with_face} frames ({fps:.1f} frames/s overall)")
    return 0


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


def _weights(args: argparse.Namespace) -> int:
    from . import weights

    if args.weights_command == "list":
        return weights.cmd_list()
    if args.weights_command == "download":
        return weights.cmd_download(args.name, args.force, args.skip_sha256)
    if args.weights_command == "verify":
        return weights.cmd_verify(args.path)
    return weights.cmd_path(args.name)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lipdub", description="Streaming Wav2Lip lip-sync.")
    parser.add_argument("--version", action="version", version=f"lipdub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_weights(sub)
    for name in EXTENSIONS:
        module = importlib.import_module(name)
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


COMMANDS = {"run": _run, "weights": _weights}
# Modules that add their own subcommand: `add_cli(sub)` registers a parser whose defaults carry
# `handler=function(args) -> exit code`.
EXTENSIONS = [name for name in ("lipdub.enhance", "lipdub.evaluate", "lipdub.serve", "lipdub.train")
              if importlib.util.find_spec(name) is not None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except LipdubError as exc:
        print(f"lipdub: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lipdub: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
