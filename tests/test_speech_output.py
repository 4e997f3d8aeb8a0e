"""Speech-aware output end to end: the mouth rests in pauses, the video lasts as long as the
audio, on real media with deterministic (rule-A) generator weights.

Rule-A weights draw a mouth far from any real face, so a generated mouth region is far from the
input (PSNR well under 30 dB) and a resting one equals it up to codec loss (PSNR over 35 dB).
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lipdub import sync
from lipdub.errors import LipdubError
from lipdub.evaluate import evaluate
from lipdub.media import load_audio

from .conftest import MEDIA, SPECS, write_wav

V1 = MEDIA / "v1_man_frontal_vfr_700x700.mp4"
V2 = MEDIA / "v2_woman_headmotion_700x700_30fps.mp4"
V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
P2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
P3 = MEDIA / "p3_two_people_1126x661.jpg"
A1 = MEDIA / "a1_en_radio_16k_stereo.wav"
A2 = MEDIA / "a2_en_48k_stereo.wav"
A3 = MEDIA / "a3_zh_mandarin_aishell_16k_mono.wav"
V3_BOX = (150, 450, 110, 410)  # TOP BOTTOM LEFT RIGHT around the v3 face
P2_BOX = (90, 420, 80, 400)


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def durations(path: Path) -> dict[str, float]:
    with av.open(str(path)) as c:
        return {s.type: float(s.duration * s.time_base) for s in c.streams if s.duration is not None}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def pause_speech(tmp_path_factory) -> Path:
    """1.6 s of a1, 2.0 s of digital silence, 1.6 s of a2: the pause is at 1.6-3.6 s."""
    a1, a2 = load_audio(A1), load_audio(A2)
    wav = np.concatenate([a1[16000:41600], np.zeros(32000, np.float32), a2[:25600]])
    return write_wav(tmp_path_factory.mktemp("speech") / "pause.wav", wav)


def mouth(frame: np.ndarray, box) -> np.ndarray:
    top, bottom, left, right = box
    return frame[(top + bottom) // 2:bottom, left:right]


def test_the_mouth_rests_in_a_pause_of_a_video(tmp_path, pause_speech, wav2lip_checkpoint):
    out = tmp_path / "v3.mp4"
    result = sync(V3, pause_speech, out, checkpoint=str(wav2lip_checkpoint), box=V3_BOX, progress=False)
    got, src = decode(out), decode(V3)
    assert len(got) == result.n_frames == 130  # 5.2 s at 25 fps (v3 has 122 frames: ping-pong past them)
    order = list(range(122)) + [120 - k for k in range(8)]
    quality = [psnr(mouth(g, V3_BOX), mouth(src[j], V3_BOX)) for g, j in zip(got, order)]
    pause = range(int(2.1 * 25), int(3.2 * 25))  # well inside the pause, past the margins and fades
    speech = list(range(5, 35)) + list(range(int(3.9 * 25), 125))
    assert min(quality[i] for i in pause) >= 35.0, "the input's own mouth is kept in the pause"
    assert np.median([quality[i] for i in speech]) < 25.0, "the mouth is generated where there is speech"
    assert not any(result.speech[i] for i in pause) and sum(result.speech[i] for i in speech) >= 0.9 * len(speech)
    # the original behaviour, every mouth generated, is one option away
    always = sync(V3, pause_speech, tmp_path / "gen.mp4", checkpoint=str(wav2lip_checkpoint), box=V3_BOX,
                  silence="generate", progress=False)
    generated = decode(always.output)
    assert always.speech is None
    assert max(psnr(mouth(generated[i], V3_BOX), mouth(src[order[i]], V3_BOX)) for i in pause) < 30.0


def test_the_mouth_rests_in_a_pause_of_a_photo(tmp_path, pause_speech, wav2lip_checkpoint):
    out = tmp_path / "p2.mp4"
    sync(P2, pause_speech, out, checkpoint=str(wav2lip_checkpoint), box=P2_BOX, progress=False)
    got = decode(out)
    photo = decode(P2)[0]  # the photo as FFmpeg reads it (PNG: exact)
    quality = [psnr(mouth(g, P2_BOX), mouth(photo, P2_BOX)) for g in got]
    assert min(quality[int(2.1 * 25):int(3.2 * 25)]) >= 35.0
    assert np.median(quality[5:35]) < 25.0


@pytest.mark.parametrize("face, audio, fps", [(V1, A3, 30), (P3, A3, 25), (V2, A2, 30)])
def test_the_video_lasts_as_long_as_the_audio(tmp_path, face, audio, fps, wav2lip_checkpoint):
    """v1 (VFR) with a3, p3 (a photo) with a3, v2 (30 fps) with a2: within one frame of the audio."""
    out = tmp_path / "out.mp4"
    result = sync(face, audio, out, checkpoint=str(wav2lip_checkpoint), progress=False)
    seconds = len(load_audio(audio)) / 16000
    assert result.fps == fps
    assert abs(result.n_frames / fps - seconds) <= 1 / fps
    d = durations(out)
    assert abs(d["video"] - seconds) <= 1 / fps + 0.01
    assert len(decode(out)) == result.n_frames


def test_audio_that_outlasts_the_video(tmp_path, wav2lip_checkpoint):
    """8 s of a1 over v3's 4.9 s: the video plays back and forth for the whole 8 s."""
    out = tmp_path / "out.mp4"
    result = sync(V3, A1, out, checkpoint=str(wav2lip_checkpoint), box=V3_BOX, progress=False)
    assert result.n_frames == 200 == len(decode(out))  # 8.000 s at 25 fps
    assert abs(durations(out)["video"] - 8.0) <= 0.04 + 0.01


def test_auto_offset_needs_cached_syncnet_weights(tmp_path, monkeypatch, wav2lip_checkpoint):
    monkeypatch.setenv("LIPDUB_HOME", str(tmp_path / "home"))
    out = tmp_path / "out.mp4"
    with pytest.raises(LipdubError, match="needs the syncnet_v2 weights"):
        sync(P2, A3, out, checkpoint=str(wav2lip_checkpoint), box=P2_BOX, auto_offset=True, progress=False)
    assert not out.exists()


def test_auto_offset_shifts_the_audio_by_the_measured_offset(tmp_path, monkeypatch, wav2lip_checkpoint, rule_b):
    """With SyncNet weights in the cache (rule-B here), --auto-offset measures the output as
    `lipdub eval` does and moves its audio by that offset."""
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    schema = json.loads((SPECS / "syncnet_v2_state_dict.json").read_text())
    torch.save(rule_b.fill_state_dict(schema), home / "weights" / "syncnet_v2.model")
    monkeypatch.setenv("LIPDUB_HOME", str(home))
    speech = write_wav(tmp_path / "speech.wav", load_audio(A1)[:2 * 16000])
    plain = sync(V3, speech, tmp_path / "plain.mp4", checkpoint=str(wav2lip_checkpoint), box=V3_BOX,
                 silence="generate", progress=False)
    offset = evaluate(plain.output, checkpoint=str(home / "weights" / "syncnet_v2.model"), device="cpu",
                      progress=False)["offset"]
    fixed = sync(V3, speech, tmp_path / "fixed.mp4", checkpoint=str(wav2lip_checkpoint), box=V3_BOX,
                 silence="generate", auto_offset=True, progress=False)
    assert fixed.audio_shift == pytest.approx(offset / 25, abs=1 / 16000)
    # the picture is the same; the audio moved by the shift against it
    assert all(np.array_equal(a, b) for a, b in zip(decode(plain.output), decode(fixed.output)))
    a, b = load_audio(plain.output), load_audio(fixed.output)
    window = a[10000:18000]  # half a second of the plain output, found again in the fixed one
    lags = np.arange(-10000, 10001)
    score = [float(np.dot(window, b[10000 + k:18000 + k])) if 0 <= 10000 + k and 18000 + k <= len(b) else -np.inf
             for k in lags]
    assert abs(lags[int(np.argmax(score))] - fixed.audio_shift * 16000) <= 2
