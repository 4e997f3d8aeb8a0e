"""The live session: 16 kHz PCM in, in pieces of any size; the avatar's 25 fps frames out.

    session = LiveSession.open("avatar_dir")   # or LiveSession(Performer(load_avatar(...), generator))
    for piece in pcm_pieces:          # e.g. 20 ms from a microphone
        for frame in session.push(piece):
            show(frame.image); play(frame.audio)
    for frame in session.flush():     # the end of the stream
        ...

Frame i is the picture for [i/25, (i+1)/25) of the stream, and `frame.audio` is that interval of
the input: played together they are in sync exactly as `lipdub run` puts audio and picture
together. Its mouth is drawn from the mel window that `lipdub run` gives frame i, columns
[int(i * 3.2), int(i * 3.2) + 16) of Wav2Lip's spectrogram, which reach 0.2 s past the frame's
start, and the centred STFT needs 25 ms more: frame i is ready when 212.5 ms of audio past its
start has arrived. The mouth shows the sound in the middle of its window, 100 ms after the
frame's start, so the look-ahead a live mouth pays is 112.5 ms (plus the time to draw it).

What equals the offline job, and why: the spectrogram columns are computed as they become
computable (`MelStream`), with the arithmetic of `audio.melspectrogram`, and `flush` applies the
end-of-audio rules of `audio.cover_audio` (the end-aligned last window, frames on the zero
padded tail). So for one audio the session draws every frame from the same mel window as `lipdub
run --silence generate`, whatever the piece sizes. Silence gating cannot be the offline one: it
normalises the level over the whole file and bridges pauses by looking ahead up to 0.3 s.
`MouthGate` is its causal counterpart: the Silero detector on the stream (`speech.SpeechStream`),
the same margins, a hang-over instead of bridging, and a fade-in of one frame.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import audio as audio_mod
from ..audio import HOP, MEL_FPS, MEL_STEP_SIZE, N_FFT, SAMPLE_RATE, mel_basis
from ..avatar import FPS, Avatar, load_avatar
from ..blend import paste_box, paste_feather
from ..device import pick_device
from ..errors import LipdubError
from ..generate import Generator, load_generator
from ..speech import LAG, LEAD, WINDOW_SECONDS, SpeechStream, speech_windows

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MEL_PER_FRAME = MEL_FPS / FPS  # 3.2, the offline step
# Audio past a frame's start its mel window needs: 16 columns, the last one centred 15 hops later,
# and that column's STFT frame reaching N_FFT / 2 past its centre.
LOOKAHEAD_SAMPLES = (MEL_STEP_SIZE - 1) * HOP + N_FFT // 2  # 3400 samples = 212.5 ms
WINDOW_CENTRE_SECONDS = MEL_STEP_SIZE / MEL_FPS / 2  # 0.1 s: the sound a frame's mouth shows


def _window_start(i: int) -> int:
    return int(i * (MEL_FPS / FPS))  # the offline expression (audio.chunk_starts), so the same rounding


def as_float_pcm(pcm) -> np.ndarray:
    """16 kHz mono samples as float32 in [-1, 1]: int16 arrays and s16le bytes are scaled by 1/32768."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        if len(pcm) % 2:
            raise LipdubError("PCM bytes must be whole 16-bit samples (an even number of bytes)")
        pcm = np.frombuffer(pcm, dtype="<i2")
    x = np.asarray(pcm)
    if x.ndim != 1:
        raise LipdubError(f"PCM must be mono (one dimension), got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / np.float32(32768.0)
    if x.dtype.kind != "f":
        raise LipdubError(f"PCM must be int16 or float samples, got {x.dtype}")
    return x.astype(np.float32, copy=False)


class MelStream:
    """Wav2Lip's mel spectrogram of a stream, column by column as the audio arrives.

    Column c of `audio.melspectrogram` (centred STFT, zero padding) depends only on the
    pre-emphasised samples [200 c - 400, 200 c + 400), so it is final once they are here. The
    columns come out with the same operations on the same numbers as the offline function.
    `finish` adds the right-hand zero padding and returns the last columns.
    """

    def __init__(self) -> None:
        self._buffer = np.zeros(N_FFT // 2, np.float64)  # pre-emphasised samples, after the left zero pad
        self._base = -(N_FFT // 2)  # stream index of _buffer[0]
        self._last = None  # the previous raw sample (pre-emphasis)
        self.n_samples = 0
        self.columns = 0  # columns computed so far
        self._window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
        self._finished = False

    def push(self, wav: np.ndarray) -> np.ndarray:
        """(80, k) float64: the columns `wav` completed."""
        if self._finished:
            raise LipdubError("the stream has ended (flush was called)")
        x = np.asarray(wav, dtype=np.float64)
        if not len(x):
            return np.zeros((mel_basis().shape[0], 0))
        previous = np.concatenate([[x[0] if self._last is None else self._last], x[:-1]])
        emphasised = x - audio_mod.PREEMPHASIS * previous
        if self._last is None:
            emphasised[0] = x[0]  # the first sample is kept as it is
        self._last = x[-1]
        self._buffer = np.concatenate([self._buffer, emphasised])
        self.n_samples += len(x)
        return self._columns(self.n_samples)

    def finish(self) -> np.ndarray:
        """The remaining columns, up to 1 + n_samples // 200, with the zero padding at the end."""
        if self._finished:
            return np.zeros((mel_basis().shape[0], 0))
        self._finished = True
        self._buffer = np.concatenate([self._buffer, np.zeros(N_FFT // 2)])
        return self._columns(self.n_samples + N_FFT // 2, limit=1 + self.n_samples // HOP)

    def _columns(self, available: int, limit: int | None = None) -> np.ndarray:
        stop = (available - N_FFT // 2) // HOP + 1  # columns whose samples all arrived
        if limit is not None:
            stop = min(stop, limit)
        if stop <= self.columns:
            return np.zeros((mel_basis().shape[0], 0))
        first = self.columns * HOP - N_FFT // 2 - self._base
        n = stop - self.columns
        frames = np.lib.stride_tricks.as_strided(self._buffer[first:], shape=(n, N_FFT),
                                                 strides=(self._buffer.strides[0] * HOP, self._buffer.strides[0]),
                                                 writeable=False)
        magnitude = np.abs(np.fft.rfft(frames * self._window, axis=1)).T
        mel = mel_basis() @ magnitude
        db = 20 * np.log10(np.maximum(1e-5, mel)) - audio_mod.REF_LEVEL_DB
        out = np.clip(2 * audio_mod.MAX_ABS * ((db - audio_mod.MIN_LEVEL_DB) / -audio_mod.MIN_LEVEL_DB)
                      - audio_mod.MAX_ABS, -audio_mod.MAX_ABS, audio_mod.MAX_ABS)
        self.columns = stop
        keep = self.columns * HOP - N_FFT // 2 - self._base  # the next column's first sample
        self._buffer = self._buffer[keep:]
        self._base += keep
        return out


class MouthGate:
    """Causal silence gating: how much of the generated mouth each frame uses (0 rests the avatar).

    Frame j is speech when its on-screen interval, widened by `lead` before and `lag` after
    (speech.LEAD, speech.LAG, as offline), overlaps a speech window of the detector (hysteresis
    as `speech.speech_windows`). Its weight is 1 on speech frames and for `hang` seconds after
    the last one (a pause that short keeps the mouth drawn, as offline bridging does, but
    decided without looking ahead), then .75 .5 .25 and 0; the frame before speech gets 0.5
    (the next frame's decision is known when this frame's mel window is: the detector runs on
    the same audio).
    """

    def __init__(self, hang: float = 0.3, fade_frames: int = 3, lead: float = LEAD, lag: float = LAG) -> None:
        self.detector = SpeechStream()
        self.hang_frames = int(round(hang * FPS))
        self.ramp = (np.arange(fade_frames, 0, -1) / (fade_frames + 1)).astype(np.float32)
        self.lead, self.lag = lead, lag
        self._decisions = np.zeros(0, bool)  # detector windows from window _base on
        self._base = 0
        self._on = False
        self._last_speech = -10**9  # the last speech frame so far
        self.end: float | None = None  # seconds, once the stream has ended

    def push(self, wav: np.ndarray) -> None:
        self._add(self.detector.push(wav))

    def finish(self, duration: float) -> None:
        self._add(self.detector.finish())
        self.end = duration

    def _add(self, probs: np.ndarray) -> None:
        if len(probs):
            # speech_windows from the state the last window left (a leading 1 or 0 sets it)
            decided = speech_windows(np.concatenate([[1.0 if self._on else 0.0], probs]))[1:]
            self._on = bool(decided[-1])
            self._decisions = np.concatenate([self._decisions, decided])

    @property
    def covered(self) -> float:
        """Seconds of the stream the detector has decided."""
        return (self._base + len(self._decisions)) * WINDOW_SECONDS

    def known(self, j: int) -> bool:
        """Whether frame j's speech decision is final (the detector covers its widened interval)."""
        return self.end is not None or self.covered >= (j + 1) / FPS + self.lead

    def is_speech(self, j: int) -> bool:
        if self.end is not None and j / FPS >= self.end - 1e-9:
            return False  # frames starting at or past the end of the audio
        a = max(0, int(math.floor((j / FPS - self.lag) / WINDOW_SECONDS)) - self._base)
        b = int(math.ceil(((j + 1) / FPS + self.lead) / WINDOW_SECONDS)) - self._base
        return bool(self._decisions[a:max(a, b)].any())

    def weight(self, i: int) -> float:
        """Frame i's mouth weight; call once per frame, in order (it remembers the last speech frame)."""
        if self.is_speech(i):
            self._last_speech = i
            w = 1.0
        else:
            since = i - self._last_speech
            k = since - self.hang_frames - 1
            w = 1.0 if k < 0 else float(self.ramp[k]) if k < len(self.ramp) else 0.0
            if w < 0.5 and self.known(i + 1) and self.is_speech(i + 1):
                w = 0.5
        drop = int(math.floor((i / FPS - self.lag) / WINDOW_SECONDS)) - 1 - self._base
        if drop > 1024:  # forget windows no later frame looks at
            self._decisions = self._decisions[drop:]
            self._base += drop
        return w


@dataclass
class LiveFrame:
    """One output frame: frame `index` of the stream, shown during [index/25, (index+1)/25)."""

    index: int
    image: np.ndarray  # BGR uint8 (height, width, 3); read-only when it is the avatar's own frame
    audio: np.ndarray  # the 640 input samples of the frame's interval, float32 16 kHz (zeros past the end)
    mouth: float  # generated-mouth weight used (0: the avatar's own frame, resting)
    source: int  # the avatar frame shown
    ready: float = 0.0  # time.perf_counter() when the frame was finished


class Performer:
    """An avatar with a generator ready to draw its mouths: every frame's face is encoded once
    (the face encoder's outputs, `Generator.encode`), so a live frame runs only the audio encoder
    and the decoder. Shared by the sessions of a server (one lock serialises the network)."""

    def __init__(self, avatar: Avatar, generator: Generator, blend: str = "feather", mask_scale: float = 1.0,
                 encode_batch: int = 16) -> None:
        if blend not in ("feather", "box"):
            raise LipdubError(f"unknown blend {blend!r} (feather, box)")
        self.avatar, self.generator, self.blend, self.mask_scale = avatar, generator, blend, mask_scale
        self.lock = threading.Lock()
        rows = np.flatnonzero(avatar.valid)
        self.row_of = {int(j): k for k, j in enumerate(rows)}  # avatar frame -> row of the encodings
        parts: list[list[torch.Tensor]] = []
        for start in range(0, len(rows), encode_batch):
            batch = rows[start: start + encode_batch]
            parts.append(generator.encode(avatar.generator_inputs(batch, generator.face_size)))
        self.skips = [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))] if parts else []
        # Under bf16 autocast every convolution casts its fp32 weights to bf16 again on every call:
        # 20 % of a batch-1 frame on a CPU. A copy of the (fused, channels-last) network with its
        # weights cast once computes the same bf16 convolutions, so the same mouths, bit for bit
        # (tests/test_live.py checks it against `Generator`), for less.
        self._net = None
        if generator.precision == "bf16" and generator.device.type == "cpu":
            self._net = copy.deepcopy(generator.model).to(torch.bfloat16)
            self.skips = [s.to(torch.bfloat16) for s in self.skips]

    def warm_up(self, batches: Sequence[int] = (1, 2, 3)) -> None:
        """Run the network once per batch size, so the first live frames pay no one-time setup."""
        mel = np.zeros((1, 80, MEL_STEP_SIZE), np.float32)
        first = next(iter(self.row_of), None)
        if first is None:
            return
        for b in batches:
            self.mouths([first] * b, np.repeat(mel[None], b, axis=0))

    def mouths(self, frames: Sequence[int], mels: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) predictions for avatar frames `frames` (all with a face) and mel windows (B, 1, 80, 16)."""
        rows = [self.row_of[int(j)] for j in frames]
        if len(self.row_of) == 1:
            skips = self.skips  # one face: batch 1, expanded by the decoder (as `lipdub run` does for a photo)
        else:
            index = torch.as_tensor(rows, device=self.skips[0].device)
            skips = [s.index_select(0, index) for s in self.skips]
        with self.lock:
            if self._net is None:
                return self.generator(None, mels, skips)
            with torch.inference_mode():
                mel = torch.from_numpy(np.ascontiguousarray(mels)).to(torch.bfloat16)
                preds = self._net.decode(self._net.audio_encoder(mel), skips)
            return preds.float().numpy().transpose(0, 2, 3, 1)

    def draw(self, j: int, pred: np.ndarray | None, weight: float) -> np.ndarray:
        """Avatar frame j with the mouth `pred` blended in at `weight` (the frame itself when none)."""
        frame = self.avatar.frames[j]
        if pred is None or weight <= 0:
            return frame
        image = frame.copy()
        if self.blend == "box":
            paste_box(image, self.avatar.boxes[j], pred, weight)
        else:
            marks = self.avatar.landmarks[j]
            paste_feather(image, self.avatar.boxes[j], pred, weight,
                          marks if np.isfinite(marks).all() else None, self.mask_scale)
        return image


@dataclass
class _Pending:
    index: int
    start: int  # mel column of the window
    source: int
    weight: float
    mel: np.ndarray | None = None


class LiveSession:
    """One stream of audio in, frames out (see the module docstring). Not thread-safe: one
    caller pushes; several sessions may share a `Performer`.

    `silence`: gate the mouth by speech (`MouthGate`); False draws a mouth on every frame (as
    `lipdub run --silence generate`). `max_batch`: frames per generator call when several are
    ready at once (a large piece, or catching up).
    """

    def __init__(self, performer: Performer, silence: bool = True, max_batch: int = 4) -> None:
        self.hold = 1  # draw a new mouth every `hold` frames, repeating the last one between (overload)
        self._last_pred: np.ndarray | None = None
        self.held = 0  # frames that repeated a mouth
        self.performer = performer
        self.avatar = performer.avatar
        self.silence = silence
        self.max_batch = max(1, int(max_batch))
        self.mel = MelStream()
        self.gate = MouthGate() if silence else None
        self._columns = np.zeros((80, 0))  # mel columns kept, from column _col_base on
        self._col_base = 0
        self._audio = np.zeros(0, np.float32)  # input samples kept, from sample _audio_base on
        self._audio_base = 0
        self._tail = np.zeros(0, np.float32)  # the last input samples (for the end-of-stream rules)
        self.next_frame = 0
        self.n_samples = 0
        self.ended = False

    @classmethod
    def open(cls, avatar: str | Avatar, checkpoint: str = "wav2lip_gan", device: str = "auto",
             precision: str = "auto", blend: str = "feather", mask_scale: float = 1.0, **options) -> "LiveSession":
        """A session on an avatar directory (or a loaded `Avatar`) with a generator loaded from
        `checkpoint` (a registry name or a .pth): the one-call form of
        `LiveSession(Performer(load_avatar(path), Generator(load_generator(checkpoint), precision)))`.
        Several sessions on one avatar should share one `Performer` instead (`session.performer`)."""
        if not isinstance(avatar, Avatar):
            avatar = load_avatar(avatar)
        generator = Generator(load_generator(checkpoint, pick_device(device), progress=False), precision,
                              copy_model=False)
        return cls(Performer(avatar, generator, blend, mask_scale), **options)

    # -------------------------------------------------------------------------------- input
    def push(self, pcm) -> list[LiveFrame]:
        """Add audio (16 kHz mono: float in [-1, 1], int16, or s16le bytes); return the frames it completed."""
        if self.ended:
            raise LipdubError("the stream has ended (flush was called); start a new LiveSession")
        x = as_float_pcm(pcm)
        if not len(x):
            return []
        self._add_audio(x)
        self._add_columns(self.mel.push(x))
        if self.gate is not None:
            self.gate.push(x)
        ready = []
        while True:
            i = self.next_frame + len(ready)
            start = _window_start(i)
            if start + MEL_STEP_SIZE > self.mel.columns:
                break
            ready.append((i, start))
        return self._render(ready)

    def flush(self) -> list[LiveFrame]:
        """End the stream: the remaining frames, as `lipdub run` ends its video (`audio.cover_audio`:
        the last complete window aligned to the audio's end, then frames on the zero-padded tail
        until the video is as long as the audio). A stream shorter than one window (0.2 s) gets
        frames on the zero-padded tail only."""
        if self.ended:
            return []
        self.ended = True
        total = self.n_samples
        self._add_columns(self.mel.finish())
        if self.gate is not None:
            self.gate.finish(total / SAMPLE_RATE)
        n_mel = 1 + total // HOP
        target = round(total / SAMPLE_RATE * FPS)
        if n_mel >= MEL_STEP_SIZE:
            # the offline frame count and windows (chunk_starts is cheap: a list of ints)
            offline = audio_mod.chunk_starts(n_mel, FPS)
        else:
            offline = []
        starts = list(offline) + [_window_start(i) for i in range(len(offline), target)]
        if len(starts) > len(offline):
            self._add_tail_columns(starts[-1] + MEL_STEP_SIZE, n_mel)
        return self._render([(i, starts[i]) for i in range(self.next_frame, len(starts))])

    # ----------------------------------------------------------------------------- internals
    def _add_audio(self, x: np.ndarray) -> None:
        self._audio = np.concatenate([self._audio, x])
        self._tail = np.concatenate([self._tail, x])[-8 * N_FFT:]
        self.n_samples += len(x)

    def _add_columns(self, columns: np.ndarray) -> None:
        if columns.shape[1]:
            self._columns = np.concatenate([self._columns, columns], axis=1)

    def _add_tail_columns(self, needed: int, n_mel: int) -> None:
        """Columns n_mel..needed as `audio.cover_audio` makes them: a spectrogram of the audio with
        zeros appended (their pre-emphasis reaches back to the last samples), computed here on a
        suffix of the audio that starts far enough back (4 hops before the first column needed,
        whose window begins 2 hops before it) and on a hop boundary, so each column is the same."""
        total = self.n_samples
        s = max(0, (total // HOP - 4) * HOP)
        suffix = self._tail[len(self._tail) - (total - s):] if total - s <= len(self._tail) else None
        if suffix is None:  # cannot happen: the tail keeps 8 FFT windows
            raise AssertionError("tail too short")
        pad = (needed - n_mel + 2) * HOP
        tail = audio_mod.melspectrogram(np.concatenate([suffix, np.zeros(pad, np.float32)]))
        have = self._col_base + self._columns.shape[1]
        assert have == n_mel, (have, n_mel)
        self._add_columns(tail[:, n_mel - s // HOP: needed - s // HOP])

    def _frame_audio(self, i: int) -> np.ndarray:
        a = i * SAMPLES_PER_FRAME - self._audio_base
        piece = self._audio[max(0, a): a + SAMPLES_PER_FRAME]
        if len(piece) < SAMPLES_PER_FRAME:
            piece = np.concatenate([piece, np.zeros(SAMPLES_PER_FRAME - len(piece), np.float32)])
        return piece

    def _render(self, ready: list[tuple[int, int]]) -> list[LiveFrame]:
        out: list[LiveFrame] = []
        avatar = self.avatar
        pending: list[_Pending] = []
        for i, start in ready:
            j = avatar.source_frame(i)
            weight = float(avatar.alpha[j]) if avatar.valid[j] else 0.0
            if self.gate is not None and weight > 0:
                weight *= self.gate.weight(i)
            elif self.gate is not None:
                self.gate.weight(i)  # keeps the gate's memory of the last speech frame in order
            item = _Pending(i, start, j, weight)
            if weight > 0:
                a = start - self._col_base
                item.mel = self._columns[:, a: a + MEL_STEP_SIZE].astype(np.float32)
            pending.append(item)
        preds: dict[int, np.ndarray] = {}
        held = set()
        if self.hold > 1:  # under overload some frames repeat the mouth before them instead of drawing one
            have_mouth = self._last_pred is not None
            for p in pending:
                if p.mel is None:
                    continue
                if have_mouth and p.index % self.hold:
                    held.add(p.index)
                    p.mel = None
                have_mouth = True
        todo = [p for p in pending if p.mel is not None]
        for k in range(0, len(todo), self.max_batch):
            batch = todo[k: k + self.max_batch]
            mels = np.stack([p.mel for p in batch])[:, None]
            for p, pred in zip(batch, self.performer.mouths([p.source for p in batch], mels)):
                preds[p.index] = pred
        for p in pending:
            if p.index in held:
                preds[p.index] = self._last_pred
                self.held += 1
            self._last_pred = preds.get(p.index, self._last_pred)
        for p in pending:
            image = self.performer.draw(p.source, preds.get(p.index), p.weight)
            out.append(LiveFrame(p.index, image, self._frame_audio(p.index), p.weight if p.index in preds else 0.0,
                                 p.source, time.perf_counter()))
        if out:
            self.next_frame = out[-1].index + 1
            self._forget()
        return out

    def _forget(self) -> None:
        """Drop audio and mel columns no later frame needs (memory stays flat on an endless stream)."""
        col = _window_start(self.next_frame) - MEL_STEP_SIZE  # the end-aligned last window starts earlier
        if col - self._col_base > 256:
            self._columns = self._columns[:, col - self._col_base:]
            self._col_base = col
        a = self.next_frame * SAMPLES_PER_FRAME
        if a - self._audio_base > SAMPLE_RATE:  # trimmed once a second: each push copies what is kept
            self._audio = self._audio[a - self._audio_base:]
            self._audio_base = a
