"""The Wav2Lip generator as a stage: face crops and mel windows in, 96x96 mouths out.

`generator_inputs` builds the network's face input exactly as the original inference does;
`Generator` holds a loaded network with its device and precision and runs batches of it.
Every job that draws mouths (run, batch, live) goes through here.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence, Union

import cv2
import numpy as np
import torch

from . import weights
from .audio import MEL_STEP_SIZE
from .device import autocast, pick_device, resolve_precision
from .models.wav2lip import Wav2Lip, fuse_batchnorm


# What `sync(model=...)` accepts: a loaded network, or a loader called with the checkpoint and device.
ModelSource = Union[Wav2Lip, Callable[[str, torch.device], Wav2Lip], None]


def load_generator(checkpoint: str, device: torch.device | str = "cpu", skip_sha256: bool = False,
                   progress: bool = True) -> Wav2Lip:
    """A Wav2Lip generator from a registry name or an official-format `.pth`, in eval mode."""
    return weights.load_model(checkpoint, "wav2lip", pick_device(device), skip_sha256, progress)


def generator_inputs(frames: Sequence[np.ndarray], boxes: Sequence[np.ndarray], size: int = 96) -> np.ndarray:
    """(B, 6, size, size) float32: masked target and reference face, as the original builds them
    (the lower half of the target zeroed); `size` is the generator's face size (96 or 256).

    Division by 255 happens in float64 before the cast to float32, and the array is a
    channels-last view (the memory layout the original hands to torch), because the CPU
    convolutions round differently for the two layouts: with this one the predictions, and so
    the truncated uint8 mouths, are bit-identical to the original's.
    """
    faces = np.stack([cv2.resize(f[b[1] : b[3], b[0] : b[2]], (size, size)) for f, b in zip(frames, boxes)])
    masked = faces.copy()
    masked[:, size // 2 :] = 0
    batch = np.concatenate((masked, faces), axis=3) / 255.0
    return batch.astype(np.float32).transpose(0, 3, 1, 2)


def mel_windows(mel: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """(B, 1, 80, 16) float32: the mel window starting at each of `starts`."""
    return np.stack([mel[:, s : s + MEL_STEP_SIZE] for s in starts])[:, None].astype(np.float32)


class Generator:
    """A loaded generator on its device, run at one precision (see `lipdub.device`).

    fp32 runs the network exactly as loaded (the bit-exact reproduction of the original). bf16
    runs a copy with every BatchNorm folded into its convolution, in channels-last memory order,
    under bf16 autocast: on CPUs with AVX-512 BF16 that is 2.5-2.8x the fp32 speed (the fold
    and the layout add about 0.3x to autocast alone), and the predictions move by under 0.01 on
    the [0, 1] scale. `copy=False` lets the fold happen in place when the caller hands the
    network over (it is then no longer the checkpoint's exact layout).
    """

    def __init__(self, model: Wav2Lip, precision: str = "fp32", copy_model: bool = True):
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(self.device, precision)
        if self.precision == "bf16":
            model = fuse_batchnorm(copy.deepcopy(model) if copy_model else model)
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.face_size = model.face_size
        self.pin = self.device.type == "cuda"  # page-locked host buffers make the copies asynchronous

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=self.pin)

    def encode(self, faces: np.ndarray) -> list[torch.Tensor]:
        """The face encoder's outputs for `generator_inputs` (see `Wav2Lip.encode_face`), to pass
        as `skips` for every frame that shows the same face."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model.encode_face(self._to_device(faces))

    def __call__(self, faces: np.ndarray | None, mels: np.ndarray, skips: list[torch.Tensor] | None = None) -> np.ndarray:
        """(B, S, S, 3) float32 predictions in [0, 1] (BGR) for `generator_inputs` and `mel_windows`;
        with `skips` (from `encode`) the face encoder does not run and `faces` is not needed."""
        mel_t = self._to_device(mels)
        with torch.inference_mode(), autocast(self.device, self.precision):
            if skips is None:
                preds = self.model(mel_t, self._to_device(faces))
            else:
                preds = self.model.decode(self.model.audio_encoder(mel_t), skips)
        return preds.float().cpu().numpy().transpose(0, 2, 3, 1)


class GeneratorCache:
    """A process's generator, loaded by its first job and kept for the next ones (a service or
    batch worker); `sync(model=cache)` calls it with the job's checkpoint and device, and only a
    different checkpoint or device loads again."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._model: Wav2Lip | None = None

    def __call__(self, checkpoint: str, device: torch.device) -> Wav2Lip:
        key = (str(checkpoint), str(device))
        if self._key != key:
            self._model = None  # let the old one go before the new one loads
            self._model = load_generator(checkpoint, device, progress=False)
            self._key = key
        return self._model
