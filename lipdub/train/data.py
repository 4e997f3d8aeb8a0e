"""Training windows from a preprocessed data set.

**Alignment.** Frame i of a clip at `fps` is paired with the 16-frame mel window that starts at
``int(i * 80 / fps)``, the formula `lipdub run` (and the original inference) uses for the frame
it generates (`lipdub.audio.chunk_starts`). The original training scripts give the generator
the window that starts one video frame *earlier* (`crop_audio_window(spec, i - 1)` through its
1-based `i - 2`), so a model trained by them is fed, at inference, audio one frame (40 ms at
25 fps) later than it learnt from. Here training and inference agree: the generator's five
per-frame windows start at frames s..s+4, and the expert's window for the five frames s..s+4
starts at frame s (as in the original expert training, which is the same formula).

**Negatives.** The expert's off-sync pairs and the generator's reference (identity) window are
taken at least T = 5 frames away from the window they go with, so they never overlap it (the
original draws any other frame, which may share 4 of the 5 frames: an "off-sync" example that is
nearly in sync, and a reference that shows the very mouth the generator must draw).

**Determinism.** Item k is a pure function of (seed, k): which clip, which frames, the label
and the augmentation all come from `numpy.random.default_rng([seed, k])`. The sampler numbers
the items of step n on rank r as ``(n * world + r) * batch + j``, so a resumed run sees exactly
the batches an uninterrupted run would, whatever the number of DataLoader workers.

**Memory** holds only per-clip metadata (frame runs, counts); frames are decoded and the mel
windows sliced from memory-mapped ``mel.npy`` files on demand, in DataLoader workers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..audio import MEL_FPS, MEL_STEP_SIZE, melspectrogram
from ..errors import LipdubError
from ..media import load_audio
from .common import IMG_SIZE, T


def mel_start(frame: int, fps: float) -> int:
    """Start of the mel window for video frame `frame`, exactly as `lipdub.audio.chunk_starts`."""
    return int(frame * (MEL_FPS / fps))


@dataclass
class Clip:
    path: Path
    fps: float
    starts: list[tuple[int, int]]  # [a, b): window starts s with frames s..s+T-1 present and mels in range
    count: int
    n_mel: int


def _valid_starts(meta: dict) -> list[tuple[int, int]]:
    fps, n_mel = float(meta["fps"]), int(meta["n_mel"])
    # last frame whose mel window fits
    last = int(meta["n_frames"]) - 1
    while last >= 0 and mel_start(last, fps) + MEL_STEP_SIZE > n_mel:
        last -= 1
    out = []
    for a, b in meta["runs"]:
        b = min(b, last + 1)
        if b - a >= T:
            out.append((int(a), int(b - T + 1)))
    return out


def read_filelist(data_dir: Path, split: str) -> list[str]:
    path = Path(data_dir) / "filelists" / f"{split}.txt"
    if not path.is_file():
        raise LipdubError(f"data set is empty: {path} not found (run `lipdub preprocess RAW_DIR {data_dir}` first)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class ClipIndex:
    """The clips of one split with their usable window starts."""

    def __init__(self, data_dir: Path, split: str):
        self.data_dir = Path(data_dir)
        names = read_filelist(self.data_dir, split)
        if not names:
            raise LipdubError(f"data set is empty: no clips in {self.data_dir / 'filelists' / (split + '.txt')}")
        clips = []
        no_audio = []
        for name in names:
            folder = self.data_dir / name
            meta_path = folder / "meta.json"
            if not meta_path.is_file():
                meta = _meta_from_folder(folder)
                if meta is None:
                    continue
            else:
                meta = json.loads(meta_path.read_text())
            if not (folder / "mel.npy").is_file() and not (folder / "audio.wav").is_file():
                no_audio.append(name)
                continue
            starts = _valid_starts(meta)
            count = sum(b - a for a, b in starts)
            if count == 0 or starts[-1][1] - 1 - starts[0][0] < T:  # needs two windows >= T apart
                continue
            clips.append(Clip(folder, float(meta["fps"]), starts, count, int(meta["n_mel"])))
        if no_audio and not clips:
            raise LipdubError(f"data set has no audio: {len(no_audio)} clip(s) without audio.wav "
                              f"(e.g. {no_audio[0]}); preprocess videos that have a sound track")
        if not clips:
            raise LipdubError(f"data set is empty: none of the {len(names)} {split} clips in {self.data_dir} "
                              f"has {T} consecutive face frames with audio")
        self.clips = clips
        self.cumulative = np.cumsum([c.count for c in clips])
        self.n_no_audio = len(no_audio)

    @property
    def n_windows(self) -> int:
        return int(self.cumulative[-1])

    def locate(self, index: int) -> tuple[Clip, int]:
        c = int(np.searchsorted(self.cumulative, index, side="right"))
        clip = self.clips[c]
        offset = index - (int(self.cumulative[c - 1]) if c else 0)
        for a, b in clip.starts:
            if offset < b - a:
                return clip, a + offset
            offset -= b - a
        raise IndexError(index)


def _meta_from_folder(folder: Path) -> dict | None:
    """Metadata for a clip folder made by the original preprocess.py (no meta.json): 25 fps."""
    if not folder.is_dir():
        return None
    ids = sorted(int(p.stem) for p in folder.glob("*.jpg") if p.stem.isdigit())
    if not ids:
        return None
    wav = folder / "audio.wav"
    if not wav.is_file():
        return {"fps": 25.0, "n_frames": ids[-1] + 1, "runs": [], "n_mel": 0}
    mel = _load_mel(folder)
    runs, start = [], ids[0]
    for prev, cur in zip(ids, ids[1:] + [None]):
        if cur != prev + 1:
            runs.append([start, prev + 1])
            start = cur
    return {"fps": 25.0, "n_frames": ids[-1] + 1, "runs": runs, "n_mel": int(mel.shape[1])}


def _load_mel(folder: Path) -> np.ndarray:
    path = folder / "mel.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    return melspectrogram(load_audio(folder / "audio.wav")).astype(np.float32)


class WindowDataset(Dataset):
    """Base: deterministic item k -> window(s) of one clip. `augment` only for training."""

    def __init__(self, data_dir: Path, split: str, seed: int = 0, augment: bool = False):
        self.index = ClipIndex(data_dir, split)
        self.seed = seed
        self.augment = augment
        self.split = split

    def __len__(self) -> int:
        return self.index.n_windows

    def _far_start(self, rng: np.random.Generator, clip: Clip, s: int) -> int | None:
        for _ in range(32):
            a, b = clip.starts[rng.integers(len(clip.starts))]
            other = int(rng.integers(a, b))
            if abs(other - s) >= T:
                return other
        candidates = [x for a, b in clip.starts for x in (a, b - 1) if abs(x - s) >= T]
        return candidates[0] if candidates else None

    def _read(self, clip: Clip, start: int) -> np.ndarray | None:
        frames = []
        for i in range(start, start + T):
            img = cv2.imread(str(clip.path / f"{i}.jpg"))
            if img is None:
                return None
            if img.shape[:2] != (IMG_SIZE, IMG_SIZE):
                img = cv2.resize(img, (IMG_SIZE, IMG_SIZE), interpolation=cv2.INTER_AREA)
            frames.append(img)
        return np.stack(frames)  # (T, H, W, 3) uint8 BGR

    def _aug(self, rng: np.random.Generator, *windows: np.ndarray) -> list[np.ndarray]:
        """Same flip and colour jitter for every window of one item; float32 (T, H, W, 3) in [0, 1]."""
        out = [w.astype(np.float32) / 255.0 for w in windows]
        if not self.augment:
            return out
        flip = rng.random() < 0.5
        gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        bias = np.float32(rng.uniform(-0.06, 0.06))
        res = []
        for w in out:
            if flip:
                w = w[:, :, ::-1]
            res.append(np.clip(w * gain + bias, 0.0, 1.0).astype(np.float32))
        return res

    def _mel(self, clip: Clip, frame: int) -> np.ndarray:
        mel = _load_mel(clip.path)
        s = mel_start(frame, clip.fps)
        window = np.array(mel[:, s : s + MEL_STEP_SIZE], dtype=np.float32)  # a copy: the file is memory-mapped
        if window.shape[1] != MEL_STEP_SIZE:
            raise IndexError
        return window

    def sample(self, k: int):
        raise NotImplementedError

    def __getitem__(self, k: int):
        rng = np.random.default_rng([self.seed, int(k)])
        for _ in range(20):
            window = int(rng.integers(self.index.n_windows))
            clip, s = self.index.locate(window)
            item = self.sample_at(rng, k, clip, s)
            if item is not None:
                return item
        raise LipdubError(f"could not read a training window after 20 tries (last clip: {clip.path})")


class ExpertDataset(WindowDataset):
    """(faces (15, 48, 96), mel (1, 80, 16), label (1,)): lower halves of 5 frames and a mel window,
    label 1 when the mel belongs to those frames, 0 when the frames are >= 5 frames away."""

    def __init__(self, data_dir, split, seed=0, augment=False, balanced=False):
        super().__init__(data_dir, split, seed, augment)
        self.balanced = balanced  # eval: label = k % 2

    def sample_at(self, rng, k, clip, s):
        positive = (k % 2 == 0) if self.balanced else bool(rng.random() < 0.5)
        face_start = s if positive else self._far_start(rng, clip, s)
        if face_start is None:
            return None
        window = self._read(clip, face_start)
        if window is None:
            return None
        (faces,) = self._aug(rng, window)
        lower = faces[:, IMG_SIZE // 2 :]  # (T, 48, 96, 3)
        x = np.ascontiguousarray(lower.transpose(0, 3, 1, 2).reshape(T * 3, IMG_SIZE // 2, IMG_SIZE))
        mel = self._mel(clip, s)[None]
        return torch.from_numpy(x), torch.from_numpy(mel), torch.tensor([1.0 if positive else 0.0])


class GeneratorDataset(WindowDataset):
    """(x (6, 5, 96, 96): masked truth + reference window, indiv_mels (5, 1, 80, 16),
    mel (1, 80, 16): the expert's window, gt (3, 5, 96, 96)); BGR in [0, 1] as the original."""

    def sample_at(self, rng, k, clip, s):
        r = self._far_start(rng, clip, s)
        if r is None:
            return None
        window, ref = self._read(clip, s), self._read(clip, r)
        if window is None or ref is None:
            return None
        window, ref = self._aug(rng, window, ref)
        gt = np.ascontiguousarray(window.transpose(3, 0, 1, 2))  # (3, T, H, W)
        masked = gt.copy()
        masked[:, :, IMG_SIZE // 2 :] = 0.0
        x = np.concatenate([masked, np.ascontiguousarray(ref.transpose(3, 0, 1, 2))], axis=0)
        indiv = np.stack([self._mel(clip, s + t) for t in range(T)])[:, None]
        mel = self._mel(clip, s)[None]
        return torch.from_numpy(x), torch.from_numpy(indiv), torch.from_numpy(mel), torch.from_numpy(gt)


class StepBatches(Sampler):
    """Batches of item numbers for steps [start_step, stop_step) on this rank (see module docstring)."""

    def __init__(self, start_step: int, stop_step: int, batch_size: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.rank, self.world = start_step, stop_step, batch_size, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))


class FixedBatches(Sampler):
    """The evaluation set: items [0, n) in batches (same every time)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch = n, batch_size

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(0, self.n, self.batch):
            yield list(range(first, min(self.n, first + self.batch)))
