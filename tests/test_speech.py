"""Silence gating (lipdub.speech) on real speech: the shared recordings a1, a2, a3, joined with
gaps of known length.

Every expectation comes from how the test signal was built. Gaps are placed at known times,
and where a recording itself must count as speech, that is judged by its own level: a 10 ms
block is clearly speech when it is louder than both the recording's 95th percentile - 20 dB and
its 5th percentile + 15 dB. That measure is computed here and is independent of the detector.
Margins allowed around a gap: the detector may hold speech up to 0.3 s past the sound, and
LEAD/LAG plus fade_frames are the documented widening.
"""
from __future__ import annotations

import sys
from fractions import Fraction

import numpy as np
import pytest

from lipdub import speech
from lipdub.media import load_audio

SR = 16000
FPS = 25


@pytest.fixture(scope="module")
def a1(media):
    return load_audio(media / "a1_en_radio_16k_stereo.wav")


@pytest.fixture(scope="module")
def a2(media):
    return load_audio(media / "a2_en_48k_stereo.wav")


@pytest.fixture(scope="module")
def a3(media):
    return load_audio(media / "a3_zh_mandarin_aishell_16k_mono.wav")


def loud_blocks(wav: np.ndarray) -> np.ndarray:
    """Per 10 ms block: clearly speech by the recording's own level (see the module docstring)."""
    n = len(wav) // 160
    db = 10 * np.log10(np.mean(wav[: n * 160].astype(np.float64).reshape(n, 160) ** 2, axis=1) + 1e-12)
    return db > max(np.percentile(db, 95) - 20, np.percentile(db, 5) + 15)


def loud_frames(wav: np.ndarray, fps: int = FPS) -> np.ndarray:
    """Per video frame: True when every 10 ms block of the frame is clearly speech."""
    blocks = loud_blocks(wav)
    per = SR // fps // 160
    n = len(blocks) // per
    return blocks[: n * per].reshape(n, per).all(axis=1)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), np.float32)


def frames_within(start: float, end: float, fps: float = FPS) -> np.ndarray:
    """Indices of the frames whose whole interval [i/fps, (i+1)/fps) lies inside [start, end)."""
    first = int(np.ceil(start * fps - 1e-9))
    last = int(np.floor(end * fps + 1e-9))  # exclusive
    return np.arange(first, last)


def assert_fades(weights: np.ndarray, start: int, end: int, fade_frames: int) -> None:
    """weights[start:end] falls, bottoms out, and rises again, with at most fade_frames values
    strictly between 0 and 1 on each side."""
    part = weights[start:end]
    low = int(np.argmin(part))
    assert np.all(np.diff(part[: low + 1]) <= 0), part
    assert np.all(np.diff(part[low:]) >= 0), part
    between = (part > 0) & (part < 1)
    assert between[: low + 1].sum() <= fade_frames and between[low:].sum() <= fade_frames, part


def test_two_second_silence_between_speech_rests_the_mouth(a1, a2):
    """a1, 2 s of digital silence, a2: the gap rests (weight 0), clearly spoken frames get the whole
    generated mouth, and the fades between them are monotone."""
    wav = np.concatenate([a1, silence(2.0), a2])
    gap_start, gap_end = len(a1) / SR, len(a1) / SR + 2.0  # 8.0 s .. 10.0 s
    n_frames = int(len(wav) / SR * FPS)
    weights, is_speech = speech.silence_weights(wav, FPS, n_frames)

    assert weights.shape == is_speech.shape == (n_frames,)
    assert weights.dtype == np.float32 and is_speech.dtype == bool
    assert weights.min() >= 0 and weights.max() <= 1

    # inside the gap, leaving the detector 0.3 s of hangover plus the lag and fade frames after
    # a1, and the lead and fade frames before a2
    after = 0.3 + speech.LAG + 3 / FPS + 1 / FPS
    before = speech.LEAD + 3 / FPS + 1 / FPS
    inside = frames_within(gap_start + after, gap_end - before)
    assert len(inside) >= 30
    assert np.all(weights[inside] == 0) and not is_speech[inside].any()

    # frames that are clearly speech by their own level get the whole generated mouth
    loud = np.concatenate([loud_frames(a1), np.zeros(int(2.0 * FPS), bool), loud_frames(a2)])[:n_frames]
    assert loud.sum() > 150
    assert np.all(weights[: len(loud)][loud] == 1) and is_speech[: len(loud)][loud].all()

    # the whole stretch between the last speech frame of a1 and the first of a2 fades out and in
    middle = int((gap_start + gap_end) / 2 * FPS)
    last_a1 = int(np.flatnonzero(is_speech[:middle])[-1])
    first_a2 = middle + int(np.flatnonzero(is_speech[middle:])[0])
    assert_fades(weights, last_a1, first_a2 + 1, fade_frames=3)
    # the fade is inside the resting stretch: (3, 2, 1) / 4 after speech, (1, 2, 3) / 4 before
    assert weights[last_a1 + 1: last_a1 + 4].tolist() == [0.75, 0.5, 0.25]
    assert weights[first_a2 - 3: first_a2].tolist() == [0.25, 0.5, 0.75]


def test_fade_frames_zero_switches_hard(a1, a2):
    wav = np.concatenate([a1, silence(2.0), a2])
    weights, is_speech = speech.silence_weights(wav, FPS, int(len(wav) / SR * FPS), fade_frames=0)
    assert set(np.unique(weights).tolist()) == {0.0, 1.0}
    assert np.array_equal(weights == 1, is_speech)


def test_mouth_starts_before_the_sound(a1):
    """After 1 s of silence the first speech frame comes before the frame where a1's first clearly
    loud block sounds, and no more than the lead plus one detector window and one frame early."""
    wav = np.concatenate([silence(1.0), a1])
    onset = 1.0 + np.flatnonzero(loud_blocks(a1))[0] * 0.01
    weights, is_speech = speech.silence_weights(wav, FPS, int(len(wav) / SR * FPS))
    first = int(np.flatnonzero(is_speech)[0])
    onset_frame = int(onset * FPS)
    assert first < onset_frame
    assert first / FPS >= onset - speech.LEAD - speech.WINDOW_SECONDS - 1 / FPS - 1e-9
    # the generated mouth fades in over the frames before that
    assert weights[first - 3: first].tolist() == [0.25, 0.5, 0.75]
    assert np.all(weights[: first - 3] == 0)


@pytest.mark.parametrize("gain_db", [0, -20])
def test_quiet_mandarin_is_speech(a3, gain_db):
    """a3 peaks at -25.7 dBFS, and at -45.7 dBFS once 20 dB quieter. Its clearly spoken frames are
    still speech with the whole generated mouth."""
    wav = a3 * np.float32(10 ** (gain_db / 20))
    n_frames = int(len(wav) / SR * FPS)
    weights, is_speech = speech.silence_weights(wav, FPS, n_frames)
    loud = loud_frames(a3)[:n_frames]
    assert loud.sum() >= 30
    assert is_speech[: len(loud)][loud].all() and np.all(weights[: len(loud)][loud] == 1)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    spectrum[0] = 0
    x = np.fft.irfft(spectrum, n)
    return (x / np.sqrt(np.mean(x ** 2))).astype(np.float32)


@pytest.mark.parametrize("kind,level_db", [("white", -30), ("white", -10), ("pink", -20), ("pink", -60)])
def test_noise_alone_is_mostly_silence(kind, level_db):
    rng = np.random.default_rng(14)
    n = 5 * SR
    noise = rng.standard_normal(n).astype(np.float32) if kind == "white" else pink_noise(n, rng)
    wav = noise * np.float32(10 ** (level_db / 20))
    weights, is_speech = speech.silence_weights(wav, FPS, 5 * FPS)
    assert is_speech.mean() <= 0.05
    assert np.mean(weights == 0) >= 0.9


def test_digital_silence_and_empty_audio_rest():
    weights, is_speech = speech.silence_weights(silence(3.0), FPS, 3 * FPS)
    assert not is_speech.any() and np.all(weights == 0)
    weights, is_speech = speech.silence_weights(np.zeros(0, np.float32), FPS, 10)
    assert not is_speech.any() and np.all(weights == 0)
    times, probs = speech.speech_probability(np.zeros(0, np.float32))
    assert len(times) == len(probs) == 0


def cut(wav: np.ndarray, start: float, end: float) -> np.ndarray:
    """wav[start:end] (seconds), checked to begin and end inside clearly spoken audio."""
    blocks = loud_blocks(wav)
    a, b = round(start * 100), round(end * 100)
    assert blocks[a: a + 5].all() and blocks[b - 5: b].all(), "the cut must lie inside loud speech"
    return wav[int(start * SR): int(end * SR)]


@pytest.mark.parametrize("pause,min_silence,rests", [(0.2, 0.3, False), (1.0, 1.5, False), (1.0, 0.3, True)])
def test_pauses_shorter_than_min_silence_stay_speech(a1, pause, min_silence, rests):
    """Two pieces of a1 that each start and end in loud speech, with `pause` s of digital silence
    between: a pause shorter than min_silence stays speech (weight 1 throughout), a longer one rests
    in its middle."""
    first, second = cut(a1, 0.3, 2.03), cut(a1, 3.05, 4.25)
    wav = np.concatenate([first, silence(pause), second])
    t0 = len(first) / SR
    weights, is_speech = speech.silence_weights(wav, FPS, int(len(wav) / SR * FPS), min_silence=min_silence)
    inside = frames_within(t0, t0 + pause)
    assert len(inside) >= 4
    if rests:
        middle = frames_within(t0 + 0.3 + speech.LAG + 4 / FPS, t0 + pause - speech.LEAD - 4 / FPS)
        assert len(middle) >= 1 and np.all(weights[middle] == 0)
    else:
        assert is_speech[inside].all() and np.all(weights[inside] == 1)


def test_frames_past_the_end_of_the_audio_are_silence(a1):
    """a1 is loud up to its last sample (8.0 s = 200 frames at 25 fps). Frames 200.. are silence,
    fading out over the first three."""
    assert loud_blocks(a1)[-4:].all()
    n_audio = int(len(a1) / SR * FPS)
    weights, is_speech = speech.silence_weights(a1, FPS, n_audio + 60)
    assert is_speech[n_audio - 1] and weights[n_audio - 1] == 1
    assert not is_speech[n_audio:].any()
    assert weights[n_audio: n_audio + 3].tolist() == [0.75, 0.5, 0.25]
    assert np.all(weights[n_audio + 3:] == 0)


def test_other_frame_rates_cover_the_same_times(a1, a2):
    """At 29.97 fps (a Fraction, as the video reader gives it) the gap rests at the same times."""
    fps = Fraction(30000, 1001)
    wav = np.concatenate([a1, silence(2.0), a2])
    n_frames = int(len(wav) / SR * float(fps))
    weights = speech.silence_weights(wav, fps, n_frames)[0]
    inside = frames_within(8.0 + 0.3 + speech.LAG + 4 / float(fps), 10.0 - speech.LEAD - 4 / float(fps), float(fps))
    assert len(inside) >= 35 and np.all(weights[inside] == 0)
    loud = np.concatenate([loud_blocks(a1), np.zeros(200, bool), loud_blocks(a2)])
    centres = ((np.arange(n_frames) + 0.5) / float(fps) * 100).astype(int)
    clearly = loud[np.minimum(centres, len(loud) - 1)]
    assert np.mean(weights[clearly] == 1) >= 0.98


def test_probabilities_are_deterministic_and_on_the_window_grid(a3):
    times, probs = speech.speech_probability(a3)
    again = speech.speech_probability(a3.copy())[1]
    n = -(-len(a3) // speech.WINDOW)
    assert times.shape == probs.shape == (n,) and probs.dtype == np.float32
    assert np.array_equal(probs, again)
    assert np.allclose(times, np.arange(n) * 0.032)
    assert probs.min() >= 0 and probs.max() <= 1
    # reusing the probabilities gives exactly the weights computed from scratch
    n_frames = int(len(a3) / SR * FPS)
    assert np.array_equal(speech.silence_weights(a3, FPS, n_frames, probs=probs)[0],
                          speech.silence_weights(a3, FPS, n_frames)[0])


def test_the_detector_package_is_not_imported():
    """`import silero_vad` imports torch and sets torch.set_num_threads(1) for the whole process;
    the stage only reads the model file from the package."""
    speech.speech_probability(silence(0.5))
    assert "silero_vad" not in sys.modules
    assert speech.model_path().is_file()


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        speech.speech_probability(np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError):
        speech.speech_probability(np.zeros(800, np.float32), sample_rate=8000)
    with pytest.raises(ValueError):
        speech.silence_weights(silence(1.0), 0, 10)
