"""Wav2Lip's mel spectrogram and its per-video-frame chunks.

The recipe reproduces the original `audio.py` (librosa-based) in plain numpy, so results do not
drift with librosa releases and no numba/librosa install is needed. Conformance with the
measured original is tested against shared/specs/golden_mel_public.npz.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import LipdubError

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB, REF_LEVEL_DB, MAX_ABS = -100.0, 20.0, 4.0
MEL_STEP_SIZE = 16  # mel frames per generator window (0.2 s)
MEL_FPS = SAMPLE_RATE / HOP  # 80 mel frames per second


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """The 80-band area-normalised (Slaney) filterbank, float32 as librosa returns it."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return weights.astype(np.float32)


def _stft_magnitude(y: np.ndarray) -> np.ndarray:
    """Centred STFT magnitude with zero padding (librosa >= 0.10), periodic Hann window."""
    padded = np.pad(y, N_FFT // 2, mode="constant")
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP, padded.strides[0]), writeable=False
    )
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    return np.abs(np.fft.rfft(frames * window, axis=1)).T  # (1 + n_fft/2, n_frames)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Mel spectrogram (80, n_frames) in [-4, 4] of 16 kHz mono float audio, as Wav2Lip computes it."""
    x = np.asarray(wav, dtype=np.float64)
    emphasised = np.empty_like(x)
    if len(x):
        emphasised[0] = x[0]
        emphasised[1:] = x[1:] - PREEMPHASIS * x[:-1]
    mel = mel_basis() @ _stft_magnitude(emphasised)
    db = 20 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    return np.clip(2 * MAX_ABS * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS, -MAX_ABS, MAX_ABS)


def chunk_starts(n_mel_frames: int, fps: float) -> list[int]:
    """Start index of the 16-frame mel window for each output video frame.

    Reproduces inference.py: start = int(i * (80/fps)); once a window would run past the end,
    one last window ending exactly at the end is added. So the number of output frames is
    decided by the audio, and the last window may overlap the previous one.
    """
    if n_mel_frames < MEL_STEP_SIZE:
        raise LipdubError(
            f"audio is too short: {n_mel_frames / MEL_FPS:.2f} s, at least {MEL_STEP_SIZE / MEL_FPS:.2f} s is needed"
        )
    step = MEL_FPS / fps
    starts: list[int] = []
    i = 0
    while True:
        start = int(i * step)
        if start + MEL_STEP_SIZE > n_mel_frames:
            starts.append(n_mel_frames - MEL_STEP_SIZE)
            return starts
        starts.append(start)
        i += 1


def mel_chunks(mel: np.ndarray, fps: float) -> np.ndarray:
    """All (n_frames, 80, 16) windows; a view-free copy is cheap (80 x 16 floats per frame)."""
    return np.stack([mel[:, s : s + MEL_STEP_SIZE] for s in chunk_starts(mel.shape[1], fps)])


def cover_audio(wav: np.ndarray, mel: np.ndarray, fps: float) -> tuple[np.ndarray, list[int]]:
    """(mel, starts) that give the video as many frames as the audio lasts (to within a frame).

    `chunk_starts` gives, as the original, one frame per complete 0.2 s window, so the video
    ends up to 0.2 s before the audio and the end of a sentence goes missing from the picture.
    Here the frames the original makes keep their windows exactly (the mel is not recomputed,
    the original's last, end-aligned window stays), and frames up to round(duration * fps) are
    added with windows on the mel of the audio followed by silence (the mel frames past the end
    are taken from a spectrogram of `wav` padded with zeros, so the last sound decays naturally).
    """
    starts = chunk_starts(mel.shape[1], fps)
    target = round(len(wav) / SAMPLE_RATE * fps)
    if target <= len(starts):
        return mel, starts
    step = MEL_FPS / fps
    extra = [int(i * step) for i in range(len(starts), target)]
    needed = extra[-1] + MEL_STEP_SIZE
    pad = (needed - mel.shape[1] + 2) * HOP
    tail = melspectrogram(np.concatenate([np.asarray(wav), np.zeros(pad, dtype=np.asarray(wav).dtype)]))
    return np.concatenate([mel, tail[:, mel.shape[1]:needed]], axis=1), starts + extra
