"""Shared fixtures: where the specs and media live, and deterministic-weight checkpoints."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPDUB_SHARED", ROOT.parent / "shared"))
SPECS = SHARED / "specs"
MEDIA = SHARED / "media"


def load_spec_module(name: str):
    """Import one of the helper scripts in shared/specs (fill_rule_a.py, fill_rule_b.py)."""
    spec = importlib.util.spec_from_file_location(name, SPECS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rule_a():
    return load_spec_module("fill_rule_a")


@pytest.fixture(scope="session")
def rule_b():
    return load_spec_module("fill_rule_b")


@pytest.fixture(scope="session")
def wav2lip_checkpoint(tmp_path_factory, rule_a) -> Path:
    """Rule-A generator weights saved in the official checkpoint format (keys prefixed `module.`)."""
    path = tmp_path_factory.mktemp("weights") / "wav2lip_rule_a.pth"
    rule_a.save_official_checkpoint("wav2lip", str(path), seed_base=1000)
    return path


@pytest.fixture(scope="session")
def rule_b_gfpgan(rule_b) -> dict:
    import json

    schema = [[k, list(s), d] for k, s, d in json.loads((SPECS / "gfpganv1_clean_state_dict.json").read_text())]
    return rule_b.fill_state_dict(schema, rule_b.GFPGAN_OVERRIDES)


@pytest.fixture(scope="session")
def gfpgan_checkpoint(tmp_path_factory, rule_b_gfpgan) -> Path:
    """Rule-B GFPGAN weights saved as the released GFPGANv1.x.pth files are: {"params_ema": state_dict}."""
    import torch

    path = tmp_path_factory.mktemp("gfpgan") / "GFPGANv1.4_rule_b.pth"
    torch.save({"params_ema": rule_b_gfpgan}, path)
    return path


@pytest.fixture(scope="session")
def media() -> Path:
    assert MEDIA.is_dir(), f"shared media not found at {MEDIA} (set LIPDUB_SHARED)"
    return MEDIA


def write_wav(path: Path, samples, rate: int = 16000) -> Path:
    """16-bit mono PCM wav through the standard library (independent of lipdub's writers)."""
    import wave

    import numpy as np

    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm.tobytes())
    return path


def short_speech(path: Path, seconds: float, offset: float = 0.0) -> Path:
    """A piece of the a1 speech recording as a 16 kHz mono wav."""
    from lipdub.media import load_audio

    wav = load_audio(MEDIA / "a1_en_radio_16k_stereo.wav")
    start = int(offset * 16000)
    return write_wav(path, wav[start : start + int(seconds * 16000)])


def short_clip(src: Path, dst: Path, n_frames: int) -> Path:
    """The first `n_frames` of a video re-encoded (H.264, same size and rate, no audio)."""
    from fractions import Fraction

    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream("libx264", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        vout.options = {"crf": "12"}
        for i, frame in enumerate(inp.decode(vin)):
            if i == n_frames:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1) / vin.average_rate
            for packet in vout.encode(frame):
                out.mux(packet)
        for packet in vout.encode():
            out.mux(packet)
    return dst
