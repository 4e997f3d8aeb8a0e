"""The fuzz targets: one function for each part of lipdub that reads untrusted bytes.

Each target takes the fuzzer's bytes, feeds them to lipdub the way a job or the service would,
and checks the contract: the code ends either with a result that is what its docstring
promises, or with a `LipdubError` whose message is one line. Anything else (another exception
type, a wrong result) raises out of the target, and the fuzzer records the input as a crash;
crash signals, hangs and runaway allocations are caught by libFuzzer's own limits
(`-timeout`, `-rss_limit_mb`, see fuzz/run.py).

This module does not import atheris: tests/test_fuzz.py replays the corpus and every kept
crash through these very functions.

    media     VideoSource (probe, first frame, the output clock) and load_audio; the first byte
              picks the file's suffix (stills are recognised by suffix), the rest is the file
    sniff     lipdub.serve.sniff: sniff(head) and check(role, head, name) as the upload handler calls them
    weights   lipdub.weights: load_checkpoint, load_state_dict for four kinds, load_model where the
              structure passed, verify (which also tries ONNX)
    manifest  lipdub.batch.parse_manifest: .jsonl or .csv, as bytes or text
"""
from __future__ import annotations

import atexit
import io
import itertools
import json
import math
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from lipdub.errors import LipdubError

# The modules under test are imported by each target on first use, so a target only pays for
# its own (run.py imports them inside atheris' instrumentation block first).

MEDIA_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".wav", ".mp3", ".m4a", ".flac",
                  ".ogg", ".png", ".jpg", ".webp", ".bmp", ".tiff", ".gif", ".webm")
MAX_TICKS = 24  # output-clock ticks whose frames are checked, per media input
MAX_SHOWN = 64  # input frames the clock is followed through (for how long each is held)
TICK_BUDGET = 50_000  # ticks followed at most
WEIGHT_KINDS = ("wav2lip", "s3fd", "syncnet_v2", "gfpgan")


class ContractViolation(AssertionError):
    """The code under test returned something its contract does not allow."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ContractViolation(what)


def _one_line(exc: BaseException) -> None:
    """A refusal must be one non-empty line (the CLI prints it after 'lipdub: error: ')."""
    message = str(exc)
    _expect(bool(message.strip()), f"{type(exc).__name__} with an empty message")
    _expect("\n" not in message and "\r" not in message, f"{type(exc).__name__} message of several lines: {message!r}")


_SCRATCH: list[Path] = []


def scratch(name: str) -> Path:
    """A path in this process's scratch folder (one folder, reused by every input): under
    $LIPDUB_FUZZ_SCRATCH when set (fuzz/run.py removes it even after a crash), else a
    temporary folder removed at exit."""
    if not _SCRATCH:
        parent = os.environ.get("LIPDUB_FUZZ_SCRATCH")
        folder = Path(tempfile.mkdtemp(prefix="lipdub-fuzz-", dir=parent or None))
        atexit.register(shutil.rmtree, folder, True)
        _SCRATCH.append(folder)
    return _SCRATCH[0] / name


def _refusal_or_result(call, *args):
    """call(*args), with a LipdubError checked (one line) and turned into None."""
    try:
        return call(*args)
    except LipdubError as exc:
        _one_line(exc)
        return None


# ------------------------------------------------------------------------------------ media


def media_file(data: bytes) -> Path | None:
    """The media input as a file: the suffix from the first byte, the content the rest."""
    if len(data) < 2:
        return None
    path = scratch("input" + MEDIA_SUFFIXES[data[0] % len(MEDIA_SUFFIXES)])
    path.write_bytes(data[1:])
    return path


def _check_video(path: Path) -> None:
    from lipdub.media import MAX_HOLD_S, MAX_SIDE, VideoSource

    source = VideoSource(path)
    info = source.info
    _expect(0 < info.width <= MAX_SIDE and 0 < info.height <= MAX_SIDE, f"frame size {info.width}x{info.height}")
    _expect(isinstance(info.fps, Fraction) and 0 < info.fps <= 1000, f"clock rate {info.fps}")
    _expect(info.n_frames_estimate >= 1, f"frame estimate {info.n_frames_estimate}")
    # no frame is shown for longer than MAX_HOLD_S: the clock's length follows the frames, not
    # whatever the timestamps claim (a tick costs `lipdub run` a scan step, `restore` an encode)
    longest = MAX_HOLD_S * info.fps + 2
    clock = source.clock()
    shown, run, last = 0, 0, None
    try:
        for tick, (pts, frame) in enumerate(itertools.islice(clock, TICK_BUDGET)):
            if tick < MAX_TICKS:
                # every consumer (tracking, blending, the writer) takes the size from `info`
                _expect(isinstance(frame, np.ndarray) and frame.dtype == np.uint8
                        and frame.shape == (info.height, info.width, 3),
                        f"frame {getattr(frame, 'shape', None)} {getattr(frame, 'dtype', None)} "
                        f"from a source of {info.width}x{info.height}")
                _expect(isinstance(pts, int), f"pts {pts!r}")
            run, shown = (run + 1, shown) if pts == last else (1, shown + 1)
            last = pts
            _expect(run <= longest, f"one frame (pts {pts}) held for more than {run} ticks at {info.fps} fps")
            if shown > MAX_SHOWN:
                break
    finally:
        clock.close()


def _encode_audio(path: Path) -> None:
    """The audio as every output file gets it: decoded again and encoded to AAC (AudioTrack)."""
    import av

    from lipdub.media import AudioTrack

    with av.open(io.BytesIO(), "w", format="mp4") as container:
        track = AudioTrack(container, path)
        try:
            track.mux_until(float("inf"))
        finally:
            track.close()


def _check_audio(path: Path) -> None:
    from lipdub.media import MAX_HOLD_S, MAX_SAMPLE, has_audio, load_audio, video_start_in_audio

    _expect(isinstance(has_audio(path), bool), "has_audio did not answer a bool")
    samples = _refusal_or_result(load_audio, path)
    if samples is not None:
        _expect(isinstance(samples, np.ndarray) and samples.dtype == np.float32 and samples.ndim == 1
                and samples.size > 0, f"audio {samples.dtype} {samples.shape}")
        _expect(bool(np.isfinite(samples).all()), "audio samples that are not finite numbers")
        _expect(float(np.abs(samples).max()) <= MAX_SAMPLE, f"audio samples up to {np.abs(samples).max()}")
        _refusal_or_result(_encode_audio, path)
    # `lipdub run` with a video's own audio: the audio starts where the picture does (padded
    # with silence or cut by this much, so the offset must be a start, not damaged timing)
    start = _refusal_or_result(video_start_in_audio, path)
    if start:
        _expect(math.isfinite(start) and abs(start) <= MAX_HOLD_S, f"video start {start} s into the audio")
        shifted = _refusal_or_result(load_audio, path, 16000, start)
        if shifted is not None:
            _expect(shifted.ndim == 1 and shifted.dtype == np.float32, f"shifted audio {shifted.dtype} {shifted.shape}")


def media(data: bytes) -> None:
    path = media_file(data)
    if path is None:
        return
    _refusal_or_result(_check_video, path)
    _refusal_or_result(_check_audio, path)


# ------------------------------------------------------------------------------------ sniff


def sniff(data: bytes) -> None:
    """First byte: the role (face/audio, low bit) and the name's length (the other bits); then
    the name (UTF-8, errors replaced), then the file's head as the upload handler reads it."""
    from lipdub.serve import sniff as sniffing

    if not data:
        return
    role = ("face", "audio")[data[0] & 1]
    cut = 1 + (data[0] >> 1) % 64
    name = data[1:cut].decode("utf-8", "replace")
    head = data[cut:][: sniffing.HEAD_BYTES]
    kind = sniffing.sniff(head)
    _expect(kind is None or isinstance(kind, sniffing.Kind), f"sniff gave {kind!r}")
    if kind is not None:
        _expect(kind.image or kind.video or kind.audio, f"{kind} is for no role")
        _expect(kind.ext.startswith(".") and kind.ext.lower() == kind.ext and "/" not in kind.ext, f"ext {kind.ext!r}")
    fits = kind is not None and (kind.image or kind.video if role == "face" else kind.audio)
    try:
        got = sniffing.check(role, head, name)
    except ValueError as exc:  # the service answers it with a 4xx and this message
        _one_line(exc)
        _expect(not head or not fits, f"{role} upload of {kind} refused: {exc}")
        return
    _expect(bool(head) and got is kind and fits, f"{role} upload accepted as {got}, sniffed as {kind}")


# ------------------------------------------------------------------------------------ weights


def weights(data: bytes) -> None:
    import torch

    from lipdub.weights import (GENERATOR_FACE_SIZE, KINDS, MODEL_CLASSES, expected_schema, load_checkpoint,
                                load_model, load_state_dict, verify)

    if not data:
        return
    path = scratch("model.pth")
    path.write_bytes(data)
    _refusal_or_result(load_checkpoint, path)
    for kind in WEIGHT_KINDS:
        state = _refusal_or_result(load_state_dict, path, kind)
        if state is None:
            continue
        schemas = [expected_schema(k) for k in (("wav2lip", "wav2lip256") if kind == "wav2lip" else (kind,))]
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        _expect(any(shapes == dict(s) for s in schemas), f"load_state_dict({kind}) gave keys/shapes off the layout")
        _expect(all(isinstance(v, torch.Tensor) for v in state.values()), "a state entry that is not a tensor")
        del state  # one model in memory at a time (a GFPGAN is 350 MB)
        model = _refusal_or_result(load_model, path, kind, "cpu", False, False)
        if model is not None:
            _expect(isinstance(model, torch.nn.Module) and not model.training, f"load_model({kind}) gave {model!r}")
            for name, tensor in model.state_dict().items():  # what the forward pass takes
                _expect(tensor.layout == torch.strided and (tensor.dtype == torch.float32
                                                            or name.endswith("num_batches_tracked")),
                        f"load_model({kind}): {name} is {tensor.dtype} {tensor.layout}")
            with torch.no_grad():  # the models edit their weights in place (BatchNorm fusion)
                for tensor in model.state_dict().values():
                    tensor.mul_(1)
            del model
    info = _refusal_or_result(verify, path)
    if info is not None:
        _expect(info["kind"] in KINDS and info["face_size"] == GENERATOR_FACE_SIZE.get(info["kind"])
                and info["size"] == len(data), f"verify gave {info}")
        if info["kind"] in MODEL_CLASSES:  # a file verify passes also loads
            load_state_dict(path, info["kind"])


# ------------------------------------------------------------------------------------ manifest


def manifest(data: bytes) -> None:
    """First byte: format (bit 0: jsonl/csv) and whether the rest goes in as text (bit 1,
    decoded with surrogateescape, as a caller holding a str would pass it)."""
    from lipdub.batch import ManifestLine, parse_manifest
    from lipdub.options import SyncOptions

    if not data:
        return
    fmt = ("jsonl", "csv")[data[0] & 1]
    body: bytes | str = data[1:]
    if data[0] & 2:
        body = data[1:].decode("utf-8", "surrogateescape")
    lines = _refusal_or_result(parse_manifest, body, fmt)
    if lines is None:
        return
    _expect(isinstance(lines, list) and bool(lines), f"parse_manifest gave {lines!r}")
    numbers = [entry.line for entry in lines]
    _expect(numbers == sorted(set(numbers)) and numbers[0] >= 1, f"line numbers {numbers}")
    for entry in lines:
        _expect(isinstance(entry, ManifestLine), f"a line of type {type(entry).__name__}")
        if entry.error is not None:
            _expect(entry.error.startswith(f"line {entry.line}"), f"error {entry.error!r} of line {entry.line}")
            _expect("\n" not in entry.error and "\r" not in entry.error, f"error of several lines: {entry.error!r}")
            continue
        _expect(isinstance(entry.face, str) and entry.face and isinstance(entry.audio, str) and entry.audio,
                f"line {entry.line}: face {entry.face!r}, audio {entry.audio!r}")
        _expect(entry.output is None or isinstance(entry.output, str), f"output {entry.output!r}")
        # the options are checked and JSON-ready: they go to the journal and to the workers
        json.dumps(entry.options)
        SyncOptions.build(**json.loads(json.dumps(entry.options)))


TARGETS = {"media": media, "sniff": sniff, "weights": weights, "manifest": manifest}

__all__ = ["TARGETS", "MEDIA_SUFFIXES", "ContractViolation", "media_file", "scratch",
           "media", "sniff", "weights", "manifest"]
