"""Write the seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

    .venv/bin/python fuzz/seeds.py [--shared ../shared]

Media seeds are tiny re-encodes and cut pieces of ../shared/media (never a whole file), one
per container, codec and oddity the pipeline meets (VFR, rotation metadata, HEVC, stills,
audio formats and rates); checkpoint seeds are small files with the real key names and
shapes, their values from the deterministic-weight rules of ../shared/specs, each tensor
stored as one value broadcast to its shape (stride 0), so a whole model fits in a few tens of
KB; manifest seeds are valid and near-valid .jsonl and .csv job lists. Each media seed starts
with the byte that makes fuzz.targets.media give it its suffix.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import zlib
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fuzz.targets import MEDIA_SUFFIXES  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
MAX_SEED = 200_000


def _write(target: str, name: str, data: bytes) -> None:
    if len(data) > MAX_SEED:
        raise SystemExit(f"seed {target}/{name} is {len(data)} bytes (more than {MAX_SEED})")
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{name}").write_bytes(data)


def media_seed(name: str, suffix: str, data: bytes) -> None:
    _write("media", name, bytes([MEDIA_SUFFIXES.index(suffix)]) + data)


# ------------------------------------------------------------------------------------ media


def _frames(path: Path, n: int, size: tuple[int, int]) -> list[tuple[int | None, np.ndarray]]:
    """The first n frames of a video, resized to size (w, h), with their pts."""
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append((frame.pts, cv2.resize(frame.to_ndarray(format="bgr24"), size, interpolation=cv2.INTER_AREA)))
            if len(out) == n:
                break
    return out


def _audio(path: Path, seconds: float) -> tuple[np.ndarray, int]:
    """The first seconds of a file's audio as (channels, samples) float32, and its rate."""
    parts, rate = [], 0
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            rate = frame.sample_rate
            parts.append(frame.to_ndarray().astype(np.float32).reshape(len(frame.layout.channels), -1))
            if sum(p.shape[1] for p in parts) >= seconds * rate:
                break
    samples = np.concatenate(parts, axis=1)
    if samples.dtype != np.float32 or np.abs(samples).max() > 1.5:  # s16 input
        samples = samples / 32768.0
    return np.ascontiguousarray(samples[:, : int(seconds * rate)]).astype(np.float32), rate


def _encode_video(frames, codec: str, fmt: str, rate: Fraction = Fraction(25), pts_from=None,
                  audio: tuple[np.ndarray, int, str] | None = None, rotation: int = 0,
                  options: dict | None = None, pix_fmt: str = "yuv420p") -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        h, w = frames[0][1].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if options:
            stream.options = options
        if pts_from is not None:
            stream.codec_context.time_base = pts_from
        if rotation:
            stream.set_display_rotation(rotation)
        astream = None
        if audio is not None:
            samples, arate, acodec = audio
            astream = container.add_stream(acodec, rate=arate, layout="mono" if samples.shape[0] == 1 else "stereo")
        for i, (pts, image) in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = pts if pts_from is not None else i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            _encode_audio_into(container, astream, samples, arate)
    return buffer.getvalue()


def _encode_audio_into(container, stream, samples: np.ndarray, rate: int) -> None:
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    fmt = stream.codec_context.codec.audio_formats[0].name
    resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.pts = 0
    for out in resampler.resample(frame) + resampler.resample(None):
        for packet in stream.encode(out):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def _encode_audio(samples: np.ndarray, rate: int, codec: str, fmt: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono" if samples.shape[0] == 1 else "stereo")
        _encode_audio_into(container, stream, samples, rate)
    return buffer.getvalue()


def _image(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def media_seeds(media: Path) -> None:
    v1, v3 = media / "v1_man_frontal_vfr_700x700.mp4", media / "v3_woman_glasses_524x524_25fps.mp4"
    v4, v5 = media / "v4_man_halfbody_hevc_1080x1920_25fps.mp4", media / "v5_multiface_cuts_640x360_29.97fps.mp4"
    a1, a2 = media / "a1_en_radio_16k_stereo.wav", media / "a2_en_48k_stereo.wav"
    a3 = media / "a3_zh_mandarin_aishell_16k_mono.wav"
    speech16, rate16 = _audio(a3, 0.3)
    stereo48, rate48 = _audio(a2, 0.12)
    short48 = stereo48[:, :1440]
    stereo16, _ = _audio(a1, 0.2)

    v3_frames = _frames(v3, 6, (48, 48))
    media_seed("v3-h264-aac.mp4", ".mp4", _encode_video(v3_frames, "libx264", "mp4",
                                                      audio=(speech16, rate16, "aac")))
    media_seed("v3-h264.mkv", ".mkv", _encode_video(v3_frames, "libx264", "matroska",
                                                   audio=(speech16, rate16, "libopus"),
                                                   options={"bframes": "2"}))
    media_seed("v3-rotated90.mov", ".mov", _encode_video(_frames(v3, 3, (48, 32)), "libx264", "mov", rotation=90))
    # v1 is variable frame rate: its own timestamps kept (time base 1/15360 as in the file)
    with av.open(str(v1)) as container:
        time_base = container.streams.video[0].time_base
    media_seed("v1-vfr.mp4", ".mp4", _encode_video(_frames(v1, 10, (40, 40)), "libx264", "mp4", pts_from=time_base))
    media_seed("v4-hevc.mp4", ".mp4", _encode_video(_frames(v4, 3, (32, 56)), "libx265", "mp4",
                                                   options={"x265-params": "log-level=none"}))
    v5_frames = _frames(v5, 4, (64, 36))
    media_seed("v5-mpeg4.avi", ".avi", _encode_video(v5_frames, "mpeg4", "avi", rate=Fraction(30000, 1001),
                                                    audio=(stereo48, rate48, "libmp3lame")))
    media_seed("v5-vp9.webm", ".webm", _encode_video(v5_frames, "libvpx-vp9", "webm",
                                                    options={"deadline": "realtime", "cpu-used": "8"}))
    media_seed("v5-mjpeg.mkv", ".mkv", _encode_video(v5_frames[:2], "mjpeg", "matroska", pix_fmt="yuvj420p"))
    media_seed("v3-gif.gif", ".gif", _encode_video(_frames(v3, 3, (24, 24)), "gif", "gif", pix_fmt="rgb8"))
    media_seed("a3-16k-mono.wav", ".wav", _encode_audio(speech16, rate16, "pcm_s16le", "wav"))
    media_seed("a2-48k-stereo-f32.wav", ".wav", _encode_audio(short48, rate48, "pcm_f32le", "wav"))
    media_seed("a1-16k-stereo.mp3", ".mp3", _encode_audio(stereo16, rate16, "libmp3lame", "mp3"))
    media_seed("a2-48k.m4a", ".m4a", _encode_audio(stereo48, rate48, "aac", "mp4"))
    media_seed("a3-16k.flac", ".flac", _encode_audio(speech16, rate16, "flac", "flac"))
    media_seed("a2-48k-opus.ogg", ".ogg", _encode_audio(stereo48, rate48, "libopus", "ogg"))
    # a piece of a real file: the header and first samples of a1, as found on disk
    media_seed("a1-head.wav", ".wav", a1.read_bytes()[:6000])

    p1 = cv2.imread(str(media / "p1_astronaut_eileen_collins_512.png"))
    p3 = cv2.imread(str(media / "p3_two_people_1126x661.jpg"))
    small1 = cv2.resize(p1, (32, 32), interpolation=cv2.INTER_AREA)
    small3 = cv2.resize(p3, (56, 33), interpolation=cv2.INTER_AREA)
    media_seed("p1.png", ".png", _image(small1, ".png"))
    media_seed("p3.jpg", ".jpg", _image(small3, ".jpg"))
    media_seed("p1.webp", ".webp", _image(small1, ".webp"))
    media_seed("p3.bmp", ".bmp", _image(small3[:16, :16], ".bmp"))
    media_seed("p1.tiff", ".tiff", _image(small1[:16, :16], ".tiff"))
    media_seed("png-claims-30000.png", ".png", _png_claiming(30000, 30000))
    media_seed("png-claims-30000-as-mp4", ".mp4", _png_claiming(30000, 30000))


# ------------------------------------------------------------------------------------ weights


def _spec_module(shared: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, shared / "specs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _broadcast(values: dict) -> dict:
    """Each tensor as its first value broadcast to its shape: the real layout in a few bytes."""
    import torch

    out = {}
    for key, value in values.items():
        t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        first = t.reshape(-1)[:1].clone().reshape([1] * t.dim()) if t.numel() else t.clone()
        out[key] = first.expand(t.shape) if t.numel() else first
    return out


def _save(obj, **kwargs) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def weights_seeds(shared: Path) -> None:
    import torch

    rule_a, rule_b = _spec_module(shared, "fill_rule_a"), _spec_module(shared, "fill_rule_b")
    specs = shared / "specs"

    def rule_b_state(name: str, overrides=()) -> dict:
        schema = json.loads((specs / f"{name}_state_dict.json").read_text())
        return rule_b.fill_state_dict([[k, list(s), d] for k, s, d in schema], overrides)

    wav2lip = _broadcast(rule_a.rule_a("wav2lip"))
    _write("weights", "wav2lip-official.pth", _save({"state_dict": {"module." + k: v for k, v in wav2lip.items()},
                                                     "optimizer": None, "global_step": 0, "global_epoch": 0}))
    _write("weights", "wav2lip256-bare.pth", _save(_broadcast(rule_a.rule_a("wav2lip256"))))
    _write("weights", "s3fd-bare.pth", _save(_broadcast(rule_a.rule_a("s3fd"))))
    _write("weights", "syncnet-color.pth", _save({"state_dict": _broadcast(rule_a.rule_a("syncnet_color"))}))
    _write("weights", "disc-qual.pth", _save({"state_dict": _broadcast(rule_a.rule_a("wav2lip_disc_qual"))}))
    _write("weights", "syncnet-v2.model", _save(_broadcast(rule_b_state("syncnet_v2"))))
    _write("weights", "gfpgan-params-ema.pth",
           _save({"params_ema": _broadcast(rule_b_state("gfpganv1_clean", rule_b.GFPGAN_OVERRIDES)), "params": {}}))
    # a few real tensors (full values) under the real names: a partial generator
    few = {k: torch.from_numpy(v) for k, v in list(rule_a.rule_a("wav2lip").items())[:6]}
    _write("weights", "wav2lip-first-tensors.pth", _save({"state_dict": few}))
    _write("weights", "s3fd-legacy-format.pth", _save(_broadcast(rule_a.rule_a("s3fd")),
                                                      _use_new_zipfile_serialization=False))
    official = (CORPUS / "weights" / "seed-wav2lip-official.pth").read_bytes()
    _write("weights", "wav2lip-truncated.pth", official[: len(official) * 3 // 5])
    _write("weights", "bare-dict-of-numbers.pth", _save({"a": 1, "b": [1.5, None], "c": "text"}))
    _write("weights", "list-of-tensors.pth", _save([torch.zeros(2), torch.ones(3, dtype=torch.int64)]))
    _write("weights", "foreign-global.pth", _save({"state_dict": dict(list(few.items())[1:3]),
                                                              "args": argparse.Namespace(lr=1e-4)}))
    _write("weights", "plain-pickle.pkl", pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=2))
    _write("weights", "git-lfs-pointer.pth", b"version https://git-lfs.github.com/spec/v1\n"
                                             b"oid sha256:ca9ab7b7b812c0e80a6e70a5977c545a1e8a365a6c49d5e533023c034d7ac3d8\n"
                                             b"size 435801865\n")
    _write("weights", "html-error-page.pth", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    _write("weights", "tiny-image.onnx", _onnx_model())


def _onnx_model() -> bytes:
    """A tiny ONNX image model: (N, 3, H, W) in, the same out (one Identity node)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input.1"], ["out"])], "tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


# ------------------------------------------------------------------------------------ sniff


def sniff_seeds() -> None:
    """Heads of the media seeds, each as a face and an audio upload with a plain name."""
    for path in sorted((CORPUS / "media").glob("seed-*")):
        data = path.read_bytes()
        name = path.name[len("seed-"):].encode()[:60]
        for role in (0, 1):
            _write("sniff", f"{path.name[5:]}-{'face' if role == 0 else 'audio'}",
                   bytes([role | (len(name) << 1)]) + name + data[1:513])
    _write("sniff", "ts-packets", bytes([1 | (6 << 1)]) + b"ts.mp4" + (b"\x47" + bytes(187)) * 2)
    _write("sniff", "mp3-frame", bytes([1 | (6 << 1)]) + b"a.mp3 " + b"\xff\xfb\x90\x64" + bytes(60))
    _write("sniff", "adts-frame", bytes([1 | (6 << 1)]) + b"a.aac " + b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(40))
    _write("sniff", "aiff", bytes([1 | (6 << 1)]) + b"a.aiff" + b"FORM\x00\x00\x10\x00AIFFCOMM" + bytes(30))
    _write("sniff", "riff-unknown", bytes([0 | (6 << 1)]) + b"a.riff" + b"RIFF\x00\x00\x10\x00ABCD" + bytes(30))


# ------------------------------------------------------------------------------------ manifest


def manifest_seeds() -> None:
    jsonl = "\n".join(json.dumps(row) for row in [
        {"face": "talk.mp4", "audio": "speech.wav"},
        {"face": "p.png", "audio": "a.m4a", "output": "out/p.mp4", "pads": [0, 10, 0, 0], "blend": "box",
         "fps": 25.5, "smooth": False, "face_index": None, "box": "10 100 20 120", "batch_size": 8},
        {"face": "s3://bucket/v.mp4", "audio": "https://example.invalid/a.wav", "restore": "gfpgan",
         "upscale": 2, "restore_weight": 0.5, "checkpoint": "wav2lip", "detector": "s3fd"},
        {"face": "v.mp4", "audio": "a.wav", "loop": True, "static": True},
        {"face": "v.mp4", "audio": "a.wav", "crop": [0, -1, 0, -1], "resize_factor": 2, "rotate": True},
    ]) + "\n"
    csv = ("face,audio,output,pads,blend,smooth,face_index,fps,box\n"
           'v.mp4,a.wav,o.mp4,"0 10 0 0",box,no,1,29.97,\n'
           "p.png,a.wav,,,,,,,\n"
           '"with, comma.mp4",a.wav,,0 0 0 0,feather,yes,,,"1 2 3 4"\n')
    _write("manifest", "jobs.jsonl", b"\x00" + jsonl.encode())
    _write("manifest", "jobs.csv", b"\x01" + csv.encode())
    _write("manifest", "jobs-text.jsonl", b"\x02" + jsonl.encode())
    _write("manifest", "jobs-bom.csv", b"\x03" + b"\xef\xbb\xbf" + csv.replace("\n", "\r\n").encode())
    _write("manifest", "bad-lines.jsonl", b"\x00" + b'{"face": 1, "audio": "a"}\n[1, 2]\n{"face": "a", "face": "b"}\n'
                                                  b'{"face": "v", "audio": "a", "pads": "x"}\nnot json\n'
                                                  b'{"face": "v", "audio": "a", "upscale": 2}\n')
    _write("manifest", "bad-header.csv", b"\x01" + b"face,audio,colour\nv.mp4,a.wav,red\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("LIPDUB_SHARED", ROOT.parent / "shared")))
    args = parser.parse_args()
    media_seeds(args.shared / "media")
    weights_seeds(args.shared)
    sniff_seeds()
    manifest_seeds()
    for target in sorted(p.name for p in CORPUS.iterdir()):
        seeds = list((CORPUS / target).glob("seed-*"))
        print(f"{target}: {len(seeds)} seeds, {sum(p.stat().st_size for p in seeds)} bytes")


if __name__ == "__main__":
    main()
