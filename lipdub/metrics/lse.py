"""LSE-D / LSE-C lip-sync metrics (Prajwal et al. 2020), computed as syncnet_python does.

Recipe (facts measured on joonson/syncnet_python, reimplemented here):

* audio: 16 kHz mono PCM s16; MFCC with ``python_speech_features.mfcc(samples, 16000)`` on the
  raw int16 values (default arguments: 13 coefficients, 25 ms windows, 10 ms step, so 4 MFCC
  frames per video frame at 25 fps), transposed to ``(13, n)``;
* video: 224x224 BGR face crops at 25 fps, fed as raw 0..255 floats;
* ``min_length = min(n_frames, floor(n_samples / 640))``; for every start frame
  ``v in [0, min_length - 5)`` the lip feature of frames ``[v, v + 5)`` and the audio feature of
  MFCC frames ``[4v, 4v + 20)``;
* audio features padded with ``vshift`` zero vectors at both ends; for window ``v`` and curve index
  ``j in [0, 2 * vshift]`` the distance is ``pairwise_distance(lip[v], audio[v + j - vshift])``
  (p = 2, eps = 1e-6; a zero vector outside the audio range);
* ``mean_dists[j]`` = mean over windows; **LSE-D** = ``min(mean_dists)``,
  **LSE-C** = ``median(mean_dists) - min(mean_dists)``, AV offset = ``vshift - argmin``.
  With this convention, audio that lags the video by ``k`` frames gives offset ``-k``.

Unlike syncnet_python, frames are consumed from an iterator and features are computed in
streaming batches: memory holds at most ``batch_size + 5`` frames and ``O(batch_size + vshift)``
features, whatever the video length (plus 31 floats per window for the per-window results).
Windows containing a frame marked invalid (no face found) are skipped; audio features are still
computed for every window position so that offsets keep their meaning.
"""
from __future__ import annotations

import warnings
from collections import deque
from itertools import islice
from typing import Iterable, Optional, Sequence

import numpy as np
import python_speech_features
import scipy.signal
import torch
from torch.nn import functional as F

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
MFCC_PER_FRAME = 4
WINDOW_FRAMES = 5
MFCC_WINDOW = 20
CROP_SIZE = 224
PAIRWISE_EPS = 1e-6


def mfcc_features(samples_int16_16k: np.ndarray) -> np.ndarray:
    """MFCCs of 16 kHz mono audio as syncnet_python computes them: ``(13, n)`` float64.

    ``samples_int16_16k`` are the raw int16 sample values (not scaled to [-1, 1]: the first
    coefficient is the log frame energy, so the scale matters). Float input is taken as is.
    """
    samples = np.asarray(samples_int16_16k)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples of shape (n,), got {samples.shape}")
    feats = python_speech_features.mfcc(samples, SAMPLE_RATE)  # (n, 13)
    return np.ascontiguousarray(np.asarray(feats, dtype=np.float64).T)


def medfilt(x: np.ndarray, kernel_size: int = 9) -> np.ndarray:
    """``scipy.signal.medfilt`` (zero padding at both ends), also for series shorter than the
    kernel, where scipy warns that it pads (which is what syncnet_python relies on)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return scipy.signal.medfilt(x, kernel_size)


def _audio_frames_from_mfcc(n_mfcc: int) -> int:
    """Lower bound of floor(n_samples / 640) for audio that gives ``n_mfcc`` MFCC frames (used when
    the sample count is unknown). ``n_mfcc = 1 + ceil((n_samples - 400) / 160)`` leaves a 160-sample
    ambiguity, so this is syncnet_python's value or one less."""
    if n_mfcc <= 1:
        return 0
    return (400 + 160 * (n_mfcc - 2) + 1) // SAMPLES_PER_FRAME


class _AudioFeatures:
    """Audio features for window positions ``[lo, hi)``, computed in batches, old ones dropped."""

    def __init__(self, model, mfcc: torch.Tensor, batch_size: int, device):
        self.model, self.mfcc, self.batch_size, self.device = model, mfcc, batch_size, device
        self.lo = self.hi = 0
        self.feats: Optional[torch.Tensor] = None  # (hi - lo, D)

    def compute(self, upto: int) -> None:
        """Compute features up to window position ``upto`` (exclusive)."""
        while self.hi < upto:
            n = min(self.batch_size, upto - self.hi)
            batch = torch.stack(
                [self.mfcc[:, MFCC_PER_FRAME * a: MFCC_PER_FRAME * a + MFCC_WINDOW] for a in range(self.hi, self.hi + n)]
            ).unsqueeze(1)  # (n, 1, 13, 20)
            out = self.model.forward_aud(batch.to(self.device)).float().cpu()
            self.feats = out if self.feats is None else torch.cat([self.feats, out])
            self.hi += n

    def drop_before(self, index: int) -> None:
        index = min(index, self.hi)
        if self.feats is not None and index - self.lo >= self.batch_size:
            self.feats = self.feats[index - self.lo:].clone()
            self.lo = index

    def gather(self, windows: torch.Tensor, vshift: int, limit: int) -> torch.Tensor:
        """``(n, 2*vshift+1, D)`` audio features at positions ``w + j - vshift``; zero vectors
        outside ``[0, limit)`` (limit = number of window positions, i.e. the audio padding)."""
        pos = windows[:, None] + torch.arange(-vshift, vshift + 1)[None, :]
        inside = (pos >= 0) & (pos < limit)
        if bool((inside & ((pos < self.lo) | (pos >= self.hi))).any()):
            raise RuntimeError("internal error: audio feature requested outside the computed range")
        dim = self.feats.shape[1]
        table = torch.cat([torch.zeros(1, dim), self.feats])
        rows = torch.where(inside, pos - self.lo + 1, torch.zeros_like(pos))
        return table[rows]


def _as_crop(frame) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.shape != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"expected a {CROP_SIZE}x{CROP_SIZE} BGR crop (H, W, 3), got shape {arr.shape}")
    return arr


@torch.inference_mode()
def sync_distances(
    model,
    frames: Iterable,
    mfcc: np.ndarray,
    batch_size: int = 20,
    vshift: int = 15,
    valid: Optional[Sequence[bool]] = None,
    num_samples: Optional[int] = None,
) -> dict:
    """LSE-D / LSE-C and the per-offset distance curve of a face-crop clip against its audio.

    Args:
        model: a :class:`lipdub.models.syncnet.SyncNetV2` (anything with ``forward_lip`` /
            ``forward_aud``); it is put in eval mode.
        frames: iterable of 224x224x3 BGR uint8 face crops at 25 fps, consumed lazily. ``None``
            entries mark frames without a face.
        mfcc: ``(13, n)`` MFCC matrix from :func:`mfcc_features`.
        batch_size: windows per forward pass (syncnet_python: 20).
        vshift: largest offset searched, in frames (2 * vshift + 1 curve points).
        valid: optional per-frame flags; windows containing a frame flagged false (or a ``None``
            frame) are skipped.
        num_samples: number of audio samples the MFCCs came from; gives syncnet_python's exact
            ``floor(n_samples / 640)`` limit. When omitted it is inferred from the MFCC count
            (conservatively: it can then use one window fewer than syncnet_python would).

    Returns a dict:
        ``lse_d``, ``lse_c`` (float), ``offset`` (int; None when no window was evaluated),
        ``mean_dists`` (2*vshift+1,) float32 in syncnet_python's order (index j <-> offset vshift - j),
        ``offsets`` (2*vshift+1,) the offset of each index, ``dists`` (n_windows, 2*vshift+1) per-window
        distances, ``windows`` (n_windows,) start frame of each evaluated window,
        ``frame_conf`` = median(mean_dists) - dists[:, argmin] (syncnet_python's framewise
        confidence) and ``frame_conf_medfilt`` (the same after its 9-tap median filter),
        ``window_conf`` = median - min over offsets of each window's own distances,
        ``n_windows`` (evaluated), ``n_skipped`` (windows skipped for invalid frames),
        ``n_positions`` (= min_length - 5, all window positions), ``n_frames`` (= min_length).
    """
    if batch_size < 1 or vshift < 0:
        raise ValueError("batch_size must be >= 1 and vshift >= 0")
    mfcc = np.asarray(mfcc)
    if mfcc.ndim != 2:
        raise ValueError(f"mfcc must be (13, n), got {mfcc.shape}")
    audio_frames = num_samples // SAMPLES_PER_FRAME if num_samples is not None else _audio_frames_from_mfcc(mfcc.shape[1])

    model.eval()
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    cct = torch.from_numpy(mfcc.astype(np.float64)).float()
    audio = _AudioFeatures(model, cct, batch_size, device)

    buf: deque = deque()  # (frame index, crop or None) from the oldest frame still needed
    pending: list[int] = []  # valid windows waiting for their lip forward pass
    ready: deque = deque()  # (window, lip feature) waiting for their audio features
    out_rows: list[torch.Tensor] = []
    out_windows: list[int] = []
    n_skipped = 0

    def run_lip() -> None:
        if not pending:
            return
        first = buf[0][0]
        clips = [np.stack([buf[w - first + k][1] for k in range(WINDOW_FRAMES)]) for w in pending]
        x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float()  # (n, 3, 5, 224, 224)
        feats = model.forward_lip(x.to(device)).float().cpu()
        ready.extend(zip(pending, feats))
        pending.clear()

    def finalize(limit: int, upto: Optional[int]) -> None:
        """Distances for ready windows whose audio neighbourhood is complete."""
        take = []
        while ready and (upto is None or ready[0][0] + vshift < upto):
            take.append(ready.popleft())
        if not take:
            return
        wins = torch.tensor([w for w, _ in take])
        lip = torch.stack([f for _, f in take])
        aud = audio.gather(wins, vshift, limit)
        out_rows.append(F.pairwise_distance(lip[:, None, :].expand_as(aud), aud, p=2, eps=PAIRWISE_EPS))
        out_windows.extend(wins.tolist())

    n_read = 0
    for t, frame in enumerate(islice(iter(frames), audio_frames)):
        n_read = t + 1
        ok = frame is not None
        if valid is not None:
            if t >= len(valid):
                raise ValueError(f"valid has {len(valid)} flags but frame {t} was read")
            ok = ok and bool(valid[t])
        buf.append((t, _as_crop(frame) if ok else None))
        if t < WINDOW_FRAMES:
            continue
        w = t - WINDOW_FRAMES  # frame t exists, so window w is below min_length - 5
        if all(buf[w - buf[0][0] + k][1] is not None for k in range(WINDOW_FRAMES)):
            pending.append(w)
        else:
            n_skipped += 1
        if len(pending) >= batch_size:
            run_lip()
        keep_from = pending[0] if pending else w + 1
        while buf and buf[0][0] < keep_from:
            buf.popleft()
        known = w + 1  # window positions known to exist
        if known - audio.hi >= batch_size:
            audio.compute(audio.hi + batch_size)
            finalize(known, audio.hi)
            oldest = min([w2 for w2, _ in ready] + pending + [known])
            audio.drop_before(oldest - vshift)

    n_frames = n_read  # = min(number of frames, floor(samples / 640)) thanks to islice
    n_positions = max(n_frames - WINDOW_FRAMES, 0)
    run_lip()
    audio.compute(n_positions)
    finalize(n_positions, None)
    buf.clear()

    offsets = vshift - np.arange(2 * vshift + 1)
    if out_rows:
        dists_t = torch.cat(out_rows)
        mdist = torch.mean(dists_t, 0)
        dists = dists_t.numpy()
        mean_dists = mdist.numpy()
        minidx = int(np.argmin(mean_dists))
        minval = float(mean_dists[minidx])
        med = float(torch.median(mdist))
        frame_conf = med - dists[:, minidx].astype(np.float64)
        result = dict(
            lse_d=minval,
            lse_c=med - minval,
            offset=int(vshift - minidx),
            frame_conf=frame_conf,
            frame_conf_medfilt=medfilt(frame_conf, 9),
            window_conf=np.median(dists, axis=1) - dists.min(axis=1),
        )
    else:
        dists = np.zeros((0, 2 * vshift + 1), np.float32)
        mean_dists = np.full(2 * vshift + 1, np.nan, np.float32)
        result = dict(lse_d=float("nan"), lse_c=float("nan"), offset=None, frame_conf=np.zeros(0),
                      frame_conf_medfilt=np.zeros(0), window_conf=np.zeros(0, np.float32))
    result.update(
        mean_dists=mean_dists,
        offsets=offsets,
        dists=dists,
        windows=np.asarray(out_windows, dtype=np.int64),
        n_windows=len(out_windows),
        n_skipped=n_skipped,
        n_positions=n_positions,
        n_frames=n_frames,
    )
    return result


def compute_lse(model, frames: Iterable, samples_int16_16k: np.ndarray, **kwargs) -> dict:
    """:func:`sync_distances` straight from 16 kHz mono int16 samples (computes the MFCCs)."""
    samples = np.asarray(samples_int16_16k)
    return sync_distances(model, frames, mfcc_features(samples), num_samples=len(samples), **kwargs)
