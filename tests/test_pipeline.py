"""End-to-end behaviour of `lipdub.sync` on real media with deterministic (rule-A) weights.

The conformance test re-implements the original Wav2Lip inference loop here, step by step
(frame loop, mel windows, input batch, truncating paste), independently of lipdub's pipeline,
and compares frames before encoding (exact) and after encoding (codec loss only).
"""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from lipdub import audio as audio_mod
from lipdub.errors import LipdubError
from lipdub.faces import fixed_track, load_detector, track_video
from lipdub.generate import Generator
from lipdub.media import VideoSource, load_audio
from lipdub.models.wav2lip import Wav2Lip
from lipdub.pipeline import render, source_order, sync

from .conftest import MEDIA, short_clip, short_speech

V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
V5 = MEDIA / "v5_multiface_cuts_640x360_29.97fps.mp4"
BOX = (150, 450, 110, 410)  # TOP BOTTOM LEFT RIGHT around the v3 face


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def stream_durations(path: Path) -> dict[str, float]:
    with av.open(str(path)) as c:
        out = {}
        for s in c.streams:
            if s.duration is not None:
                out[s.type] = float(s.duration * s.time_base)
        return out


@pytest.fixture(scope="module")
def model(rule_a) -> Wav2Lip:
    net = Wav2Lip()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in rule_a.rule_a("wav2lip").items()})
    return net.eval()


@pytest.fixture(scope="module")
def generator(model) -> Generator:
    return Generator(model, precision="fp32")


def original_inference(frames: list[np.ndarray], wav: np.ndarray, fps: float, box, model, batch_size: int,
                       size: int = 96):
    """The original inference.py loop with --box and default options (no pads, no smoothing).
    With size 256 it is the 256 model's loop as LiveTalking runs it: the same steps at 256x256."""
    mel = audio_mod.melspectrogram(wav)
    chunks, mult, i = [], 80.0 / fps, 0
    while True:
        start = int(i * mult)
        if start + 16 > mel.shape[1]:
            chunks.append(mel[:, mel.shape[1] - 16 :])
            break
        chunks.append(mel[:, start : start + 16])
        i += 1
    y1, y2, x1, x2 = box
    out = []
    for b in range(0, len(chunks), batch_size):
        idx = range(b, min(len(chunks), b + batch_size))
        fr = [frames[i % len(frames)].copy() for i in idx]
        faces = np.asarray([cv2.resize(f[y1:y2, x1:x2], (size, size)) for f in fr])
        masked = faces.copy()
        masked[:, size // 2 :] = 0
        img = np.concatenate((masked, faces), axis=3) / 255.0
        mels = np.asarray([chunks[i] for i in idx])[..., None]
        img_t = torch.FloatTensor(np.transpose(img, (0, 3, 1, 2)))
        mel_t = torch.FloatTensor(np.transpose(mels, (0, 3, 1, 2)))
        with torch.no_grad():
            pred = model(mel_t, img_t).numpy().transpose(0, 2, 3, 1) * 255.0
        for p, f in zip(pred, fr):
            f[y1:y2, x1:x2] = cv2.resize(p.astype(np.uint8), (x2 - x1, y2 - y1))
            out.append(f)
    return out


def test_box_mode_equals_original_inference(tmp_path, media, model, generator, wav2lip_checkpoint):
    clip = short_clip(V3, tmp_path / "clip.mp4", 12)
    speech = short_speech(tmp_path / "speech.wav", 1.0)  # 22 output frames: loops the 12-frame clip
    frames = decode(clip)
    wav = load_audio(speech)
    expected = original_inference(frames, wav, 25.0, BOX, model, batch_size=8)

    # Before encoding: lipdub's render stage gives the original's frames exactly.
    source = VideoSource(clip)
    ticks = [pts for pts, _ in source.clock()]
    mel = audio_mod.melspectrogram(wav)
    starts = audio_mod.chunk_starts(mel.shape[1], 25.0)
    order = list(source_order(len(starts), len(ticks), "loop", False))
    track = fixed_track(BOX, len(ticks), 524, 524)
    rendered = list(render(source, ticks, track, mel, starts, order, generator, blend="box", batch_size=8))
    assert len(rendered) == len(expected) == 22
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(rendered, expected))
    assert worst == 0, f"render differs from the original loop by up to {worst}"

    # After encoding: the written mp4 differs only by codec loss. Every frame the original makes
    # is there; three more cover the last 0.2 s of the audio (1.0 s at 25 fps = 25 frames).
    out = tmp_path / "out.mp4"
    result = sync(clip, speech, out, checkpoint=str(wav2lip_checkpoint), box=BOX, blend="box", length="loop",
                  precision="fp32", silence="generate", batch_size=8, progress=False)
    written = decode(out)
    assert result.n_frames == len(written) == 25
    y1, y2, x1, x2 = BOX
    for got, want, orig in zip(written, expected, (frames[i % len(frames)] for i in range(22))):
        assert psnr(got, want) > 33.0
        # The generated (random-weight) mouth is far from the input face, so a pipeline that
        # skipped or misplaced the paste would fail by a wide margin.
        assert psnr(got[y1:y2, x1:x2], want[y1:y2, x1:x2]) > 30.0
        assert psnr(orig[y1:y2, x1:x2], want[y1:y2, x1:x2]) < 20.0


def test_feather_changes_only_the_tracked_lower_face(tmp_path, media, generator):
    clip = short_clip(V3, tmp_path / "clip.mp4", 10)
    wav = load_audio(short_speech(tmp_path / "speech.wav", 0.5))
    source = VideoSource(clip)
    ticks, track = track_video(source, load_detector("centerface"), stride=2, pads=(0, 10, 0, 0))
    assert track.valid.all()
    mel = audio_mod.melspectrogram(wav)
    starts = audio_mod.chunk_starts(mel.shape[1], 25.0)
    order = list(source_order(len(starts), len(ticks), "pingpong", False))
    frames = decode(clip)
    out = list(render(source, ticks, track, mel, starts, order, generator))
    assert len(out) == len(starts) == 10 == len(order)
    for i, (got, j) in enumerate(zip(out, order)):
        x1, y1, x2, y2 = track.boxes[j]
        changed = np.any(got != frames[j], axis=2)
        assert changed.any()
        ys, xs = np.nonzero(changed)
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
        assert ys.min() > y1 + 0.3 * (y2 - y1), "feather blend reached into the upper face"
        # No visible box: along the box's left and right edge nothing changes.
        assert not changed[y1:y2, x1].any() and not changed[y1:y2, x2 - 1].any()


def test_no_face_frames_pass_through_and_cuts_restart(tmp_path, media, generator, wav2lip_checkpoint):
    """v5 has several shots, some without a usable face: those frames must come out untouched."""
    source = VideoSource(V5)
    ticks, track = track_video(source, load_detector("centerface"), stride=5, pads=(0, 10, 0, 0))
    assert track.cuts, "v5 has shot cuts"
    assert track.valid.any() and not track.valid.all()
    mel = audio_mod.melspectrogram(load_audio(MEDIA / "a3_zh_mandarin_aishell_16k_mono.wav"))
    starts = audio_mod.chunk_starts(mel.shape[1], float(source.info.fps))[:90]  # the gap is at 43-81
    order = list(range(len(starts)))
    ref = {}
    for i, (_, frame) in enumerate(source.clock()):
        if i >= len(order):
            break
        ref[i] = frame
    out = list(render(source, ticks, track, mel, starts, order, generator))
    assert len(out) == len(order) == 90
    seen_gap = seen_face = 0
    for i, frame in enumerate(out):
        if not track.valid[i]:
            assert np.array_equal(frame, ref[i]), f"no-face frame {i} was modified"
            seen_gap += 1
        elif track.alpha[i] == 1.0:
            assert not np.array_equal(frame, ref[i])
            seen_face += 1
    assert seen_gap >= 20 and seen_face >= 20  # v5's pianist shot (ticks 43-81) has no usable face


def test_length_policies_follow_source_order(tmp_path, media, generator):
    """Ping-pong and loop show the source frames in the expected order outside the face box."""
    clip = short_clip(V3, tmp_path / "clip.mp4", 5)
    frames = decode(clip)
    wav = load_audio(short_speech(tmp_path / "speech.wav", 0.72))  # 15 frames from 5
    mel = audio_mod.melspectrogram(wav)
    starts = audio_mod.chunk_starts(mel.shape[1], 25.0)
    source = VideoSource(clip)
    ticks = [pts for pts, _ in source.clock()]
    track = fixed_track(BOX, len(ticks), 524, 524)
    expected_orders = {
        "pingpong": [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2],
        "loop": [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
    }
    for length, expected in expected_orders.items():
        order = list(source_order(len(starts), len(ticks), length, False))
        assert order == expected[: len(starts)]
        out = list(render(source, ticks, track, mel, starts, order, generator, blend="box", batch_size=4))
        for got, j in zip(out, order):
            outside = got.copy()
            outside[BOX[0] : BOX[1], BOX[2] : BOX[3]] = 0
            want = frames[j].copy()
            want[BOX[0] : BOX[1], BOX[2] : BOX[3]] = 0
            assert np.array_equal(outside, want)
    assert list(source_order(7, 5, "pingpong", static=True)) == [0] * 7


def test_vfr_video_output_length_follows_audio(tmp_path, media, wav2lip_checkpoint):
    speech = short_speech(tmp_path / "speech.wav", 2.0)
    out = tmp_path / "v1.mp4"
    result = sync(MEDIA / "v1_man_frontal_vfr_700x700.mp4", speech, out, checkpoint=str(wav2lip_checkpoint),
                  box=(150, 550, 150, 550), progress=False)
    assert (result.width, result.height) == (700, 700)
    assert result.fps == 30  # v1's nominal rate; its frames arrive at irregular times
    assert result.n_frames == len(decode(out)) == 60  # 2.0 s at 30 fps: the picture lasts as long as the audio
    durations = stream_durations(out)
    assert abs(durations["audio"] - 2.0) < 0.05
    assert abs(durations["audio"] - durations["video"]) <= 1 / 30 + 0.01


def test_still_image_with_fps(tmp_path, media, wav2lip_checkpoint):
    speech = short_speech(tmp_path / "speech.wav", 1.0)
    out = tmp_path / "p2.mp4"
    result = sync(MEDIA / "p2_woman_frontal_closed_mouth_474.png", speech, out,
                  checkpoint=str(wav2lip_checkpoint), fps=30, progress=False)
    frames = decode(out)
    assert result.fps == 30 and len(frames) == result.n_frames == 30  # 1.0 s of audio at 30 fps
    assert frames[0].shape == (474, 474, 3)
    assert result.frames_with_face == result.n_frames
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 30
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.audio[0].codec_context.name == "aac"


def test_no_face_anywhere_is_an_error_and_writes_nothing(tmp_path, wav2lip_checkpoint):
    speech = short_speech(tmp_path / "speech.wav", 0.5)
    blank = tmp_path / "wall.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(blank), cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (9, 9), 3))
    out = tmp_path / "out.mp4"
    with pytest.raises(LipdubError, match="no face"):
        sync(blank, speech, out, checkpoint=str(wav2lip_checkpoint), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav", "wall.png"]


@pytest.mark.slow
def test_full_v3_default_options(tmp_path, media, wav2lip_checkpoint):
    out = tmp_path / "v3.mp4"
    result = sync(V3, MEDIA / "a1_en_radio_16k_stereo.wav", out, checkpoint=str(wav2lip_checkpoint), progress=False)
    frames = decode(out)
    assert len(frames) == result.n_frames == result.frames_with_face
    durations = stream_durations(out)
    assert abs(durations["audio"] - durations["video"]) <= 1 / 25 + 0.01


def test_restore_after_lip_sync_touches_only_the_mouth_region(tmp_path, media, wav2lip_checkpoint, gfpgan_checkpoint):
    """`run --restore gfpgan --upscale 2`: double size, and restoration changes only the lower face."""
    speech = short_speech(tmp_path / "speech.wav", 0.25)  # 2 frames at 10 fps: GFPGAN costs seconds per face
    p2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
    common = dict(checkpoint=str(wav2lip_checkpoint), fps=10, progress=False, device="cpu", silence="generate")
    plain = sync(p2, speech, tmp_path / "plain.mp4", **common)
    restored = sync(p2, speech, tmp_path / "restored.mp4", restore="gfpgan", restore_checkpoint=str(gfpgan_checkpoint),
                    upscale=2, **common)
    assert (restored.width, restored.height) == (948, 948) and restored.n_frames == plain.n_frames == 2
    assert restored.timings["restore"] > 0
    for a, b in zip(decode(tmp_path / "plain.mp4"), decode(tmp_path / "restored.mp4")):
        up = cv2.resize(a, (948, 948), interpolation=cv2.INTER_CUBIC)
        changed = np.abs(up.astype(int) - b).max(axis=2) > 24  # well above codec loss
        # Codec and resampling differ at a few hair-edge pixels; restoration changes whole rows.
        rows = np.flatnonzero(changed.mean(axis=1) > 0.05)
        assert len(rows) > 50, "restoration changed nothing"
        eyes = 0.33 * 948  # p2's eyes are at about 0.3 of the height, the nose tip at 0.4
        assert rows.min() > eyes, "mouth-region restoration reached the eyes"
        assert changed[: int(eyes)].mean() < 0.002


def test_restore_with_a_fixed_box_finds_landmarks_inside_it(tmp_path, media, wav2lip_checkpoint, gfpgan_checkpoint):
    """`--box` tracks carry no landmarks: a CenterFace pass supplies them, only inside the box."""
    speech = short_speech(tmp_path / "speech.wav", 0.25)
    p2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
    common = dict(checkpoint=str(wav2lip_checkpoint), fps=10, progress=False, device="cpu", blend="box",
                  silence="generate")
    face_box = (150, 350, 150, 330)  # TOP BOTTOM LEFT RIGHT around p2's face
    plain = decode_one(sync(p2, speech, tmp_path / "a.mp4", box=face_box, **common).output)
    restored = decode_one(sync(p2, speech, tmp_path / "b.mp4", box=face_box, restore="gfpgan",
                               restore_checkpoint=str(gfpgan_checkpoint), **common).output)
    assert np.abs(plain.astype(int) - restored).max(axis=2).__gt__(24).mean() > 0.01
    elsewhere = (0, 60, 0, 474)  # a box on the hair, no face inside: nothing to restore
    plain = decode_one(sync(p2, speech, tmp_path / "c.mp4", box=elsewhere, **common).output)
    restored = decode_one(sync(p2, speech, tmp_path / "d.mp4", box=elsewhere, restore="gfpgan",
                               restore_checkpoint=str(gfpgan_checkpoint), **common).output)
    assert np.abs(plain.astype(int) - restored).max() <= 2


def decode_one(path: Path) -> np.ndarray:
    return decode(path)[1]


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1), ("bf16", 0)])
def test_a_still_face_is_encoded_once_with_the_same_result(media, model, precision, tolerance, monkeypatch, tmp_path):
    """A photo: every frame has the same face input, so the face encoder runs once and only the
    audio encoder and decoder run per frame. The frames equal those of encoding every frame
    (fp32 may round one level differently: oneDNN's deep layers differ in the last bits between
    batch sizes, which the uncached path itself also does)."""
    photo = VideoSource(MEDIA / "p2_woman_frontal_closed_mouth_474.png")
    wav = load_audio(short_speech(tmp_path / "speech.wav", 1.0))
    mel = audio_mod.melspectrogram(wav)
    starts = audio_mod.chunk_starts(mel.shape[1], 25.0)
    track = fixed_track((90, 420, 80, 400), 1, 474, 474)
    generator = Generator(model, precision)
    calls = []
    encode = generator.model.encode_face
    monkeypatch.setattr(generator.model, "encode_face", lambda face: calls.append(len(face)) or encode(face))
    cached = list(render(photo, [0], track, mel, starts, [0] * len(starts), generator, batch_size=8))
    assert calls == [1]
    calls.clear()
    plain = list(render(photo, [0], track, mel, starts, [0] * len(starts), generator, batch_size=8, cache_face=False))
    assert calls == [8, 8, 6]  # 22 frames in batches of 8
    assert len(cached) == len(plain) == 22
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(cached, plain)) <= tolerance
    assert any(not np.array_equal(frame, photo.frames().__next__()) for frame in cached)


def test_the_gpu_transfer_path_runs_on_a_cpu(model, monkeypatch):
    """On CUDA the generator copies its inputs through page-locked memory with non-blocking
    copies. The same code runs here with pinning stubbed out (a CPU-only torch cannot pin), and
    gives the results of the plain path."""
    rng = np.random.default_rng(0)
    faces = rng.random((4, 6, 96, 96), dtype=np.float32)
    faces[:, :3, 48:] = 0
    mels = (rng.random((4, 1, 80, 16), dtype=np.float32) * 8 - 4)
    plain = Generator(model, "fp32")(faces, mels)
    pinned = Generator(model, "fp32")
    pinned.pin = True
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(self.shape) or self)
    assert np.array_equal(pinned(faces, mels), plain)
    assert calls == [(4, 1, 80, 16), (4, 6, 96, 96)]
