"""Mel spectrogram and mel chunks against the measured original (golden files) and on real speech."""
import json
import wave

import numpy as np
import pytest

from lipdub import audio
from lipdub.errors import LipdubError
from lipdub.media import load_audio

from .conftest import SPECS, write_wav


@pytest.fixture(scope="module")
def golden():
    return np.load(SPECS / "golden_mel_public.npz")


def read_wav_int16(path) -> tuple[int, np.ndarray]:
    """(rate, int16 samples (n, channels)) through the standard library, independent of PyAV."""
    with wave.open(str(path), "rb") as fh:
        assert fh.getsampwidth() == 2
        data = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2")
        return fh.getframerate(), data.reshape(-1, fh.getnchannels())


def test_golden_wav_loads_as_int16_over_32768(golden):
    """Spec 7.1: a 16-bit 16 kHz file is exactly int16/32768, no resampling."""
    wav = load_audio(SPECS / "golden_mel_public.wav")
    assert wav.dtype == np.float32
    np.testing.assert_array_equal(wav, golden["wav_int16"].astype(np.float32) / 32768)


def test_mel_matches_golden(golden):
    mel = audio.melspectrogram(golden["wav"])
    assert mel.shape == golden["mel_f64"].shape == (80, 223)
    # An independent float64 implementation lands within float rounding of the original.
    np.testing.assert_allclose(mel, golden["mel_f64"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mel.astype(np.float32), golden["mel"], rtol=0, atol=1e-5)
    # and differs from the librosa-0.7 reflect-padded variant exactly where the spec says:
    # only in the first and last two frames (the golden clip ends in digital silence, where
    # both paddings agree, so only its start tells zero padding from reflection).
    diff = np.abs(mel - golden["mel_reflectpad_f64"]).max(axis=0)
    assert diff[2:-2].max() < 1e-5
    assert diff[0] > 1e-2


def test_mel_from_file_matches_golden(golden):
    mel = audio.melspectrogram(load_audio(SPECS / "golden_mel_public.wav"))
    np.testing.assert_allclose(mel, golden["mel_f64"], rtol=0, atol=1e-5)


def test_mel_frame_count_and_range_on_real_speech(media):
    wav = load_audio(media / "a3_zh_mandarin_aishell_16k_mono.wav")
    mel = audio.melspectrogram(wav)
    assert mel.shape == (80, len(wav) // 200 + 1)
    assert mel.min() >= -4 and mel.max() <= 4
    # a3 is very quiet (peak -25.7 dBFS), yet speech must not be clipped at the floor everywhere
    assert np.percentile(mel, 90) > -2.0


def test_chunk_starts_match_golden_json(golden):
    ref = json.loads((SPECS / "golden_mel_public_chunks.json").read_text())
    starts = audio.chunk_starts(ref["mel_shape"][1], ref["fps"])
    assert starts == ref["mel_chunk_starts"]
    assert len(starts) == ref["n_chunks"]
    np.testing.assert_array_equal(starts, golden["mel_chunk_starts"])


def test_mel_chunks_match_golden(golden):
    chunks = audio.mel_chunks(audio.melspectrogram(golden["wav"]), float(golden["fps"]))
    assert chunks.shape == golden["mel_chunks"].shape == (66, 80, 16)
    np.testing.assert_allclose(chunks, golden["mel_chunks"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fps", [25.0, 30.0, 30000 / 1001, 24.0, 60.0])
def test_chunk_starts_follow_the_original_loop(fps):
    """Written from the description in specs section 7 (not from lipdub's code)."""
    n = 517
    expected, i = [], 0
    step = 80.0 / fps
    while True:
        s = int(i * step)
        if s + 16 > n:
            expected.append(n - 16)
            break
        expected.append(s)
        i += 1
    starts = audio.chunk_starts(n, fps)
    assert starts == expected
    # one chunk per video frame: about fps frames per second of audio (80 mel frames)
    assert abs(len(starts) - (n - 16) / 80 * fps) <= 3
    assert all(0 <= s <= n - 16 for s in starts)
    assert all(b >= a for a, b in zip(starts, starts[1:]))


def test_minimum_length_audio_gives_chunks_and_shorter_raises():
    assert audio.chunk_starts(16, 25.0) == [0, 0]  # the original appends the final window anyway
    with pytest.raises(LipdubError, match="too short"):
        audio.chunk_starts(15, 25.0)
    with pytest.raises(LipdubError):
        audio.chunk_starts(0, 25.0)


def test_too_short_audio_file_raises(media, tmp_path):
    wav = load_audio(media / "a3_zh_mandarin_aishell_16k_mono.wav")
    path = write_wav(tmp_path / "short.wav", wav[8000:8000 + 2000] * 10)  # 0.125 s -> 11 mel frames
    mel = audio.melspectrogram(load_audio(path))
    assert mel.shape[1] == 11
    with pytest.raises(LipdubError, match="too short"):
        audio.mel_chunks(mel, 25.0)


def test_mel_48k_file_close_to_its_16k_version(media, tmp_path):
    """Resampling sanity: a2 (48 kHz stereo) through load_audio vs an ideal band-limited
    16 kHz version made here with an FFT (and stored as a 16-bit wav)."""
    rate, pcm = read_wav_int16(media / "a2_en_48k_stereo.wav")
    assert rate == 48000 and pcm.shape[1] == 2
    mono = pcm.astype(np.float64).mean(axis=1) / 32768
    n = len(mono) // 3 * 3
    m = n // 3
    spectrum = np.fft.rfft(mono[:n])[: m // 2 + 1]
    low = np.fft.irfft(spectrum, m) / 3
    path = write_wav(tmp_path / "a2_16k.wav", low * 32767 / 32768)

    ours = audio.melspectrogram(load_audio(media / "a2_en_48k_stereo.wav"))
    ref = audio.melspectrogram(load_audio(path))
    k = min(ours.shape[1], ref.shape[1])
    assert abs(ours.shape[1] - ref.shape[1]) <= 1
    diff = np.abs(ours[:, :k] - ref[:, :k])
    # a 3 dB level error would already be 0.24 on this scale everywhere
    assert diff.mean() < 0.03
    # bands well below the resampler's low-pass edge agree closely
    assert np.percentile(diff[:60], 99) < 0.2
    # and the speech is really there (not both silent)
    assert ref.std() > 0.5


def test_stereo_16k_is_channel_mean(media):
    """a1 is 16 kHz stereo: no resampling, so the mono mix must be exactly (L + R) / 2 (librosa's to_mono)."""
    rate, pcm = read_wav_int16(media / "a1_en_radio_16k_stereo.wav")
    assert rate == 16000 and pcm.shape[1] == 2
    expected = (pcm[:, 0].astype(np.float64) + pcm[:, 1]) / 2 / 32768
    wav = load_audio(media / "a1_en_radio_16k_stereo.wav")
    assert wav.shape == (len(pcm),)
    np.testing.assert_array_equal(wav, expected.astype(np.float32))
