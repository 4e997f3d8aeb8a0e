"""The picture size of an upload, read from its header in a child process, before a job is accepted.

    python -m lipdub.serve.probe FILE    # prints {"width": W, "height": H} or {"error": "..."}

The API process stores an upload, then runs this module on it: `lipdub.media.probe_size` reads
the size from the header (a PNG's IHDR chunk, else the container's stream header through PyAV)
and `lipdub.media.check_frame_size` applies the limit of every other lipdub command (8192
pixels on a side), so a 30000x30000 image is refused at upload, unread. The child runs with a
memory cap and a time limit: whatever FFmpeg's demuxer does with hostile bytes (a crash, a
hang, a large allocation while it guesses the stream parameters) happens outside the server.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from ..errors import LipdubError
from ..media import MAX_SIDE, check_frame_size, probe_size

MEMORY_CAP = 2 << 30  # bytes of address space the child may use (PyAV and OpenCV need about 0.6 GB)
TIMEOUT_S = 30.0


class Refusal(Exception):
    """Why an upload's picture is refused: `status` 413 (too many pixels) or 415 (unreadable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_upload(path: Path, role: str, name: str, timeout_s: float = TIMEOUT_S) -> tuple[int, int]:
    """(width, height) of the stored upload `path`, or `Refusal` with a one-line message that
    starts with `role` and names the file by the client's `name`, never by its path here."""
    shown = f"'{name}'"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-m", "lipdub.serve.probe", str(path)], capture_output=True,
                             timeout=timeout_s, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Refusal(415, f"{role}: reading the header of {shown} took longer than {timeout_s:g} s") from None
    try:
        answer = json.loads(out.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        how = f"signal {-out.returncode}" if out.returncode < 0 else f"exit code {out.returncode}"
        raise Refusal(415, f"{role}: the header of {shown} could not be read (the media reader stopped with "
                           f"{how})") from None
    if "error" in answer:
        message = str(answer["error"]).replace(str(path), shown).splitlines()[0]
        raise Refusal(415, f"{role}: {message}")
    width, height = int(answer["width"]), int(answer["height"])
    try:
        check_frame_size(width, height, shown)
    except LipdubError as exc:
        raise Refusal(413 if max(width, height) > MAX_SIDE else 415, f"{role}: {exc}") from None
    return width, height


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lipdub.serve.probe FILE", file=sys.stderr)
        return 2
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    except (ValueError, OSError):  # a lower hard limit is already set: keep it
        pass
    try:
        width, height = probe_size(args[0])
        answer: dict = {"width": width, "height": height}
    except LipdubError as exc:
        answer = {"error": str(exc)}
    except MemoryError:
        answer = {"error": f"{args[0]}: reading its header needed more memory than allowed"}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
