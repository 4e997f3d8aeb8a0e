"""The fuzz corpus and every crash the fuzzers found, replayed through the harness functions,
and the end-to-end contract of `lipdub run` on damaged media.

Each file of fuzz/corpus/<target>/ and fuzz/crashes/<target>/ goes through the same function
the fuzzer runs (fuzz/targets.py): it must end in a result that keeps the function's promises
or in a one-line LipdubError. `lipdub run` on truncated, bit-flipped and header-only media ends
with exit 0 and a valid mp4, or exit 2 with one line on stderr and nothing written.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from fuzz import targets
from fuzz.targets import MEDIA_SUFFIXES, ContractViolation
from lipdub.cli import main
from lipdub.errors import LipdubError

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
TARGETS = ("media", "sniff", "weights", "manifest")

# Crashes of lipdub/batch.py's parser, kept until its owner fixes them: name -> what fails.
OPEN_BATCH_CRASHES: dict[str, str] = {}


def _inputs(kind: str) -> list:
    params = []
    for target in TARGETS:
        folder = FUZZ / kind / target
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith(".") or path.suffix == ".md":
                continue
            marks = []
            if target == "manifest" and path.name in OPEN_BATCH_CRASHES:
                marks.append(pytest.mark.xfail(strict=True, reason=OPEN_BATCH_CRASHES[path.name]))
            params.append(pytest.param(target, path, id=f"{target}/{path.name}", marks=marks))
    return params


@pytest.mark.parametrize("target,path", _inputs("corpus"))
def test_corpus_input_keeps_the_contract(target, path):
    targets.TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target,path", _inputs("crashes"))
def test_crash_input_keeps_the_contract(target, path):
    targets.TARGETS[target](path.read_bytes())


def test_every_target_has_seeds_and_the_corpus_stays_small():
    for target in TARGETS:
        files = list((FUZZ / "corpus" / target).iterdir())
        assert any(p.name.startswith("seed-") for p in files), target
        assert all(p.stat().st_size <= 200_000 for p in files), target
    total = sum(p.stat().st_size for p in (FUZZ / "corpus").rglob("*") if p.is_file())
    assert total < 5_000_000


def test_every_kept_crash_is_described():
    notes = (FUZZ / "crashes" / "README.md").read_text()
    for target in TARGETS:
        folder = FUZZ / "crashes" / target
        for path in folder.iterdir() if folder.is_dir() else []:
            assert path.name in notes, f"{target}/{path.name} is not described in fuzz/crashes/README.md"


# ------------------------------------------------------------------------------------ the harness itself


def test_the_harness_reports_what_breaks_the_contract(monkeypatch):
    """A target raises for a refusal of several lines and for an exception of another type."""
    import lipdub.serve.sniff as sniffing

    def two_lines(head):
        raise LipdubError("first\nsecond")

    monkeypatch.setattr(sniffing, "sniff", two_lines)
    with pytest.raises(LipdubError):  # not a ValueError: the upload check does not catch it
        targets.sniff(b"\x00" + b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ContractViolation, match="several lines"):
        targets._one_line(LipdubError("first\nsecond"))

    import lipdub.media as media

    monkeypatch.setattr(media, "load_audio", lambda *a, **k: np.array([np.nan], np.float32))
    seed = (FUZZ / "corpus" / "media" / "seed-a3-16k-mono.wav").read_bytes()
    with pytest.raises(ContractViolation, match="not finite"):
        targets.media(seed)


@pytest.mark.skipif(sys.platform != "linux", reason="atheris ships Linux wheels only (the test extra installs it there)")
def test_the_runner_fuzzes_a_target_with_atheris(tmp_path):
    """fuzz/run.py's worker: instrumented imports, libFuzzer's flags, a corpus folder (sniff: no torch)."""
    import atheris  # noqa: F401  (installed by the test extra on Linux: a missing one is a failure)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in (FUZZ / "corpus" / "sniff").glob("seed-*"):
        (corpus / path.name).write_bytes(path.read_bytes())
    done = subprocess.run([sys.executable, str(FUZZ / "run.py"), "--worker", "sniff", "-runs=3000", "-timeout=20",
                           "-rss_limit_mb=2048", str(corpus)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "LIPDUB_FUZZ_SCRATCH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Done 3000 runs" in done.stderr and "INITED cov:" in done.stderr


# ------------------------------------------------------------------------------------ regressions, by name


def test_a_float_wav_with_nan_is_refused_in_one_line(tmp_path):
    path = tmp_path / "nan.wav"
    path.write_bytes((FUZZ / "crashes" / "media" / "crash-nan-float-wav").read_bytes()[1:])
    from lipdub.media import load_audio

    with pytest.raises(LipdubError, match=r"not numbers \(NaN or infinite\)"):
        load_audio(path)


def test_loud_float_audio_is_encoded(tmp_path):
    """Noise at 1e6 x full scale (the AAC encoder spun for minutes on it) is clipped and written."""
    from lipdub.media import MAX_SAMPLE, VideoWriter, load_audio

    audio = tmp_path / "loud.wav"
    audio.write_bytes((FUZZ / "crashes" / "media" / "hang-loud-float-wav").read_bytes()[1:])
    samples = load_audio(audio)
    assert np.abs(samples).max() == MAX_SAMPLE
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 32, 32, 25, audio_path=audio) as writer:
        for _ in range(6):
            writer.write(np.zeros((32, 32, 3), np.uint8))
    with av.open(str(out)) as container:
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert decoded.size > 0 and np.isfinite(decoded).all()


def test_a_timestamp_jump_is_taken_out_of_the_clock(tmp_path):
    from lipdub.media import VideoSource

    path = tmp_path / "jump.mkv"
    path.write_bytes((FUZZ / "crashes" / "media" / "hang-timestamp-jump-mkv").read_bytes()[1:])
    with av.open(str(path)) as container:
        pts = [f.pts for f in container.decode(video=0)]
    assert pts[-1] - pts[-2] > 1000 * 25  # 4.6 days apart in the file
    ticks = [p for p, _ in VideoSource(path).clock()]
    assert ticks == pts  # each frame once, the next one a tick after the jump


def test_a_picture_size_change_mid_stream_is_scaled_back(tmp_path):
    """Fuzz: a second frame of 195x36 in a 64x36 stream reached the writer (ValueError in np.pad)."""
    from lipdub.media import VideoSource

    path = tmp_path / "resized.mkv"
    path.write_bytes((FUZZ / "crashes" / "media" / "crash-a2d217f164cabe264c298855dd5069d39b94f295").read_bytes()[1:])
    with av.open(str(path)) as container:
        sizes = [(f.width, f.height) for f in container.decode(video=0)]
    assert len(set(sizes)) > 1
    source = VideoSource(path)
    assert {frame.shape for frame in source.frames()} == {(source.info.height, source.info.width, 3)}


def test_a_damaged_stream_offset_counts_as_none(tmp_path):
    from lipdub.media import video_start_in_audio

    path = tmp_path / "offset.mkv"
    path.write_bytes((FUZZ / "crashes" / "media" / "oom-stream-start-offset-mkv").read_bytes()[1:])
    with av.open(str(path)) as container:
        claimed = float(container.streams.audio[0].start_time * container.streams.audio[0].time_base)
    assert claimed > 1e4
    assert video_start_in_audio(path) == 0.0
    v5 = ROOT.parent / "shared" / "media" / "v5_multiface_cuts_640x360_29.97fps.mp4"
    if v5.is_file():
        assert 0.8 < video_start_in_audio(v5) < 0.9  # a real offset is kept


@pytest.mark.parametrize("name,message", [
    ("crash-s3fd-int64-tensors", "holds int64 values in conv1_1.weight"),
    ("crash-s3fd-complex-tensors", "holds complex64 values in conv1_1.weight"),
    ("crash-s3fd-sparse-tensors", "holds sparse_coo values in conv1_1.weight"),
])
def test_weights_of_the_right_shape_but_not_floats_are_refused(tmp_path, name, message):
    from lipdub import weights

    path = tmp_path / "s3fd.pth"
    path.write_bytes((FUZZ / "crashes" / "weights" / name).read_bytes())
    for call in (lambda: weights.load_model(path, "s3fd", progress=False), lambda: weights.verify(path)):
        with pytest.raises(LipdubError, match=message):
            call()


def test_broadcast_weights_load_into_memory_of_their_own(tmp_path):
    """A stride-0 tensor (one value for a whole layer) crashed BatchNorm fusion in lipdub run."""
    import torch

    from lipdub import weights
    from lipdub.models.wav2lip import fuse_batchnorm

    path = FUZZ / "corpus" / "weights" / "seed-wav2lip-official.pth"
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert 0 in raw["module.face_encoder_blocks.0.0.conv_block.0.weight"].stride()
    model = weights.load_model(path, "wav2lip", progress=False)
    fuse_batchnorm(model)  # edits the conv weights in place


def test_audio_without_a_decoder_is_one_line_for_the_writer_too(tmp_path):
    from lipdub.media import VideoWriter, load_audio

    audio = tmp_path / "unknown.wav"
    audio.write_bytes((FUZZ / "crashes" / "media" / "crash-wav-unknown-codec").read_bytes()[1:])
    for call in (lambda: load_audio(audio), lambda: VideoWriter(tmp_path / "out.mp4", 32, 32, 25,
                                                                audio_path=audio).__enter__()):
        with pytest.raises(LipdubError, match="unknown.wav: no decoder for its codec"):
            call()
    assert list(tmp_path.iterdir()) == [audio]


def test_an_upload_name_with_control_characters_stays_on_one_line():
    from lipdub.serve import sniff

    with pytest.raises(ValueError) as refused:
        sniff.check("audio", b"\x89PNG\r\n\x1a\n" + bytes(30), "a\nb\rc\x00d.png")
    assert str(refused.value) == "audio: 'a?b?c?d.png' is a PNG image, not an audio or video file"


# ------------------------------------------------------------------------------------ lipdub run, end to end


def _mutations(data: bytes, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    flipped = bytearray(data)
    for _ in range(12):
        at = rng.randrange(len(flipped))
        flipped[at] ^= 1 << rng.randrange(8)
    cut = bytearray(data)
    start = rng.randrange(len(cut) // 4, len(cut) // 2)
    cut[start:start + 64] = bytes(64)
    return {"half": data[: len(data) // 2], "header-only": data[:64], "bit-flips": bytes(flipped),
            "zeroed-block": bytes(cut), "tail-cut": data[:-17]}


CASES = [(role, source, kind) for role, source in (("face", "seed-v3-h264-aac.mp4"), ("face", "seed-p1.png"),
                                                   ("audio", "seed-a3-16k-mono.wav"))
         for kind in ("half", "header-only", "bit-flips", "zeroed-block", "tail-cut")]
CASES += [("face", "seed-p3.bmp", "half"), ("face", "seed-v4-hevc.mp4", "bit-flips"),
          ("audio", "seed-a2-48k.m4a", "zeroed-block"), ("audio", "seed-a2-48k-stereo-f32.wav", "bit-flips")]


@pytest.mark.parametrize("role,source,kind", CASES, ids=[f"{r}-{s[5:]}-{k}" for r, s, k in CASES])
def test_lipdub_run_on_damaged_media_ends_in_one_of_two_ways(tmp_path, capfd, role, source, kind):
    seeds = FUZZ / "corpus" / "media"
    face_seed, audio_seed = seeds / "seed-v3-h264-aac.mp4", seeds / "seed-a3-16k-mono.wav"
    data = (seeds / source).read_bytes()
    suffix = MEDIA_SUFFIXES[data[0]]
    damaged = _mutations(data[1:], seed=len(kind) * 31 + len(source))[kind]
    face, audio = tmp_path / f"face{suffix}", tmp_path / "audio.wav"
    if role == "face":
        face.write_bytes(damaged)
        audio.write_bytes(audio_seed.read_bytes()[1:])
    else:
        face = tmp_path / "face.mp4"
        face.write_bytes(face_seed.read_bytes()[1:])
        audio.write_bytes(damaged)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "dubbed.mp4"
    checkpoint = FUZZ / "corpus" / "weights" / "seed-wav2lip-official.pth"
    code = main(["run", "--face", str(face), "--audio", str(audio), "-o", str(output), "--box", "2", "14", "2", "14",
                 "--checkpoint", str(checkpoint), "--quiet"])
    err = capfd.readouterr().err  # what reached file descriptor 2, the C libraries' messages too
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("lipdub: error: "), err
        assert list(out_dir.iterdir()) == []
        return
    assert code == 0, err
    assert [p.name for p in out_dir.iterdir()] == ["dubbed.mp4"]
    with av.open(str(output)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert frames and all(f.shape[2] == 3 for f in frames)
