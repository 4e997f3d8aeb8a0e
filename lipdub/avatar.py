"""`lipdub avatar prepare`: a face (a short video loop or a photo) made ready for live lip-sync.

A live session has no time to detect faces. This job does it once: it decodes the face on a
25 fps clock (the live output rate), tracks the face exactly as `lipdub run` does
(`faces.track_video`, same detector, pads and smoothing), and writes a directory:

    avatar.json       the manifest: format name and version, size, frame count, options used
    frames/NNNNNN.png every frame of the loop, lossless (what the live video shows)
    track.npz         per frame: face box, valid, blend alpha, five landmarks (the blend geometry)
    faces.npy         per frame: the face crop resized to the generator's size (its face input)

`Avatar.load` reads it back and refuses, with one line, a directory that is not an avatar (no or
a foreign manifest), one written by a newer format, or one with missing or inconsistent files.

The idle loop plays the frames forward and back (ping-pong) by default, so the picture never
jumps at the loop's seam; a photo is one frame.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .device import pick_device
from .errors import LipdubError
from .faces import default_stride, fixed_track, load_detector, track_video
from .generate import generator_inputs
from .media import Transform, VideoSource, check_readable, is_image
from .options import FACE_DETECTORS, LENGTHS
from .progress import bar

FORMAT = "lipdub-avatar"
VERSION = 1
MANIFEST = "avatar.json"
FPS = 25  # the live output rate: one frame per 40 ms, 3.2 mel columns
FACE_SIZES = (96, 256)


@dataclass
class Avatar:
    """A prepared avatar in memory. `frames` are read-only BGR uint8 images; per frame `boxes`
    (x1, y1, x2, y2), `valid` (a face to draw on), `alpha` (blend strength, < 1 next to a
    no-face gap), `landmarks` (5 x 2, NaN where unknown) and `faces` (the generator's face
    crop, `face_size` square, uint8 BGR; zeros where there is no face)."""

    path: Path | None
    frames: np.ndarray  # (n, h, w, 3) uint8
    boxes: np.ndarray  # (n, 4) int64
    valid: np.ndarray  # (n,) bool
    alpha: np.ndarray  # (n,) float32
    landmarks: np.ndarray  # (n, 5, 2) float32
    faces: np.ndarray  # (n, s, s, 3) uint8
    loop: str = "pingpong"
    fps: int = FPS
    info: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def face_size(self) -> int:
        return int(self.faces.shape[1])

    @property
    def period(self) -> int:
        """Output frames before the idle loop repeats."""
        n = self.n_frames
        return 1 if n == 1 else (n if self.loop == "loop" else 2 * n - 2)

    def source_frame(self, i: int) -> int:
        """The avatar frame that output frame `i` shows (loop or ping-pong, as `lipdub run` orders them)."""
        n = self.n_frames
        if n == 1:
            return 0
        k = i % self.period
        return k if k < n else 2 * n - 2 - k

    def generator_inputs(self, rows: Sequence[int], size: int | None = None) -> np.ndarray:
        """(len(rows), 6, S, S) float32: the generator's face input for these frames, built by
        `generate.generator_inputs` (the same arithmetic as `lipdub run`). At the stored size the
        stored crops are used (a crop of the whole crop is the crop itself); another size (a
        256 generator on a 96 avatar) is cut from the frames again."""
        size = size or self.face_size
        rows = list(rows)
        if size == self.face_size:
            whole = np.array([0, 0, size, size])
            return generator_inputs([self.faces[j] for j in rows], [whole] * len(rows), size)
        return generator_inputs([self.frames[j] for j in rows], [self.boxes[j] for j in rows], size)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Avatar":
        return load_avatar(path)


def _not_avatar(path: Path, why: str) -> LipdubError:
    return LipdubError(f"{path} is not a lipdub avatar ({why}); make one with: lipdub avatar prepare FACE -o {path}")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an avatar directory, checked (format name and version)."""
    path = Path(path)
    if not path.exists():
        raise LipdubError(f"avatar not found: {path}")
    if not path.is_dir():
        raise _not_avatar(path, "not a directory")
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise _not_avatar(path, f"no {MANIFEST}")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_avatar(path, f"{MANIFEST} is unreadable: {exc.__class__.__name__}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _not_avatar(path, f"{MANIFEST} is not a {FORMAT} manifest")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise _not_avatar(path, f"{MANIFEST} has no valid format version")
    if version > VERSION:
        raise LipdubError(f"{path} is an avatar of format version {version}, made by a newer lipdub; this one reads "
                          f"version {VERSION} (update lipdub or prepare the avatar again)")
    return data


def load_avatar(path: str | os.PathLike) -> Avatar:
    """Read an avatar directory written by `prepare_avatar`."""
    path = Path(path)
    info = read_manifest(path)

    def broken(why: str) -> LipdubError:
        return LipdubError(f"avatar {path} is incomplete or damaged ({why}); prepare it again")

    try:
        n, width, height, size = (int(info[k]) for k in ("n_frames", "width", "height", "face_size"))
        loop = str(info.get("loop", "pingpong"))
    except (KeyError, TypeError, ValueError):
        raise broken(f"{MANIFEST} lacks n_frames, width, height or face_size") from None
    if n < 1 or size not in FACE_SIZES or loop not in LENGTHS:
        raise broken(f"{MANIFEST} has n_frames={n}, face_size={size}, loop={loop!r}")
    try:
        with np.load(path / "track.npz") as track:
            boxes, valid, alpha, landmarks = (track[k] for k in ("boxes", "valid", "alpha", "landmarks"))
        faces = np.load(path / "faces.npy")
    except (OSError, KeyError, ValueError) as exc:
        raise broken(f"{exc.__class__.__name__}: {exc}") from None
    if (boxes.shape != (n, 4) or valid.shape != (n,) or alpha.shape != (n,) or landmarks.shape != (n, 5, 2)
            or faces.shape != (n, size, size, 3) or faces.dtype != np.uint8):
        raise broken("track.npz or faces.npy does not match the manifest")
    frames = np.empty((n, height, width, 3), np.uint8)
    for j in range(n):
        image = cv2.imread(str(path / "frames" / f"{j:06d}.png"), cv2.IMREAD_COLOR)
        if image is None or image.shape != (height, width, 3):
            raise broken(f"frames/{j:06d}.png is missing or not {width}x{height}")
        frames[j] = image
    frames.flags.writeable = False
    return Avatar(path, frames, boxes.astype(np.int64), valid.astype(bool), alpha.astype(np.float32),
                  landmarks.astype(np.float32), faces, loop=loop, fps=int(info.get("fps", FPS)), info=info)


def face_crops(frames: np.ndarray, boxes: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: each valid frame's face box resized as `generate.generator_inputs` resizes it."""
    out = np.zeros((len(frames), size, size, 3), np.uint8)
    for j in np.flatnonzero(valid):
        x1, y1, x2, y2 = (int(v) for v in boxes[j])
        out[j] = cv2.resize(frames[j][y1:y2, x1:x2], (size, size))
    return out


def _check_output(output: Path) -> None:
    """The output may be new, an empty directory, or an avatar to replace; nothing else is overwritten."""
    if output.is_file() or output.is_symlink():
        raise LipdubError(f"output exists and is not a directory: {output}")
    if output.is_dir() and any(output.iterdir()):
        try:
            read_manifest(output)
        except LipdubError:
            raise LipdubError(f"output directory {output} is not empty and not an avatar; choose a new or empty "
                              "directory") from None
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise LipdubError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise LipdubError(f"output folder is not writable: {parent}")


@dataclass
class PrepareResult:
    output: Path
    n_frames: int
    width: int
    height: int
    frames_with_face: int
    seconds: float

    def as_dict(self) -> dict:
        return {"output": str(self.output), "n_frames": self.n_frames, "width": self.width, "height": self.height,
                "frames_with_face": self.frames_with_face, "seconds": round(self.seconds, 3)}


def prepare_avatar(face: str | os.PathLike, output: str | os.PathLike, *, detector: str = "centerface",
                   detector_weights: str | None = None, box: tuple[int, int, int, int] | None = None,
                   pads: tuple[int, int, int, int] = (0, 10, 0, 0), smooth: bool = True,
                   face_index: int | None = None, max_seconds: float = 10.0, resize_factor: int = 1,
                   loop: str = "pingpong", face_size: int = 96, device: str = "auto",
                   progress: bool = True) -> PrepareResult:
    """Detect and track the face of `face` (video or photo) once and write an avatar directory.

    A video is re-timed to 25 fps and cut at `max_seconds`; `resize_factor` shrinks it first (a
    smaller avatar is cheaper to blend and encode live). `detector`, `pads`, `smooth`,
    `face_index` and `box` mean what they mean for `lipdub run`, and the track is the one
    `lipdub run` would compute for the same frames. Raises LipdubError for bad input: an
    unreadable file, no face, or an output that exists and is not an avatar. The directory
    appears complete or not at all.
    """
    started = time.perf_counter()
    face_path = check_readable(face)
    output = Path(output)
    _check_output(output)
    if detector not in FACE_DETECTORS:
        raise LipdubError(f"unknown face detector {detector!r} (choose one of: {', '.join(FACE_DETECTORS)})")
    if loop not in LENGTHS:
        raise LipdubError(f"unknown loop {loop!r} (choose one of: {', '.join(LENGTHS)})")
    if face_size not in FACE_SIZES:
        raise LipdubError(f"--face-size must be one of {FACE_SIZES}, got {face_size}")
    if not (isinstance(resize_factor, int) and 1 <= resize_factor <= 16):
        raise LipdubError(f"--resize-factor must be an integer from 1 to 16, got {resize_factor}")
    if not (math.isfinite(max_seconds) and max_seconds > 0):
        raise LipdubError(f"--max-seconds must be positive, got {max_seconds}")
    if len(tuple(pads)) != 4 or any(int(p) < 0 for p in pads):
        raise LipdubError(f"--pads needs four numbers >= 0 (TOP BOTTOM LEFT RIGHT), got {pads}")

    photo = is_image(face_path)
    max_frames = 1 if photo else max(1, int(round(max_seconds * FPS)))
    source = VideoSource(face_path, fps=FPS, transform=Transform(resize_factor), max_frames=max_frames)
    width, height = source.info.width, source.info.height
    if box is not None:
        tick_pts = [0] if photo else [pts for pts, _ in source.clock()]
        track = fixed_track(tuple(box), len(tick_pts), width, height)
    else:
        net = load_detector(detector, pick_device(device), detector_weights)
        stride = 1 if photo else default_stride(FPS)
        tick_pts, track = track_video(source, net, stride=stride, pads=tuple(int(p) for p in pads), smooth=smooth,
                                      face_index=face_index, progress=progress)
    if not track.valid.any():
        what = f"face #{face_index}" if face_index is not None else "face"
        raise LipdubError(f"no {what} found anywhere in {face_path}")
    frames = np.stack(list(source.frames_at(tick_pts, range(len(tick_pts)))))
    landmarks = (track.landmarks if track.landmarks is not None
                 else np.full((len(frames), 5, 2), np.nan, np.float32)).astype(np.float32)
    faces = face_crops(frames, track.boxes, track.valid, face_size)

    manifest = {
        "format": FORMAT, "version": VERSION, "fps": FPS, "n_frames": len(frames), "width": width, "height": height,
        "face_size": face_size, "loop": "loop" if photo else loop, "photo": photo, "source": face_path.name,
        "detector": None if box is not None else detector, "box": None if box is None else list(box),
        "pads": [int(p) for p in pads], "smooth": smooth, "face_index": face_index, "resize_factor": resize_factor,
        "frames_with_face": int(track.valid.sum()),
    }
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial", dir=output.parent if str(output.parent) else "."))
    try:
        (temp / "frames").mkdir()
        progress_bar = bar(len(frames), "avatar frames", progress)
        for j, frame in enumerate(frames):
            if not cv2.imwrite(str(temp / "frames" / f"{j:06d}.png"), frame, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
                raise LipdubError(f"cannot write frames to {output.parent}")
            progress_bar.update(1)
        progress_bar.close()
        np.savez(temp / "track.npz", boxes=track.boxes.astype(np.int64), valid=track.valid, alpha=track.alpha,
                 landmarks=landmarks)
        np.save(temp / "faces.npy", faces)
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")  # last: marks it complete
        os.chmod(temp, 0o755)
        _replace_dir(temp, output)
    except OSError as exc:
        raise LipdubError(f"cannot write avatar {output}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return PrepareResult(output, len(frames), width, height, int(track.valid.sum()), time.perf_counter() - started)


def _replace_dir(temp: Path, output: Path) -> None:
    """Move the finished directory into place; an old avatar there is moved aside first, then removed."""
    old = None
    if output.exists():
        if not any(output.iterdir()):
            output.rmdir()
        else:
            old = output.with_name(f".{output.name}.old{os.getpid()}")
            os.replace(output, old)
    try:
        os.replace(temp, output)
    except OSError:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
