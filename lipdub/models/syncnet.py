"""Lip-sync expert networks.

* :class:`SyncNetColor` -- Wav2Lip's colour lip-sync expert (``SyncNet_color``): scores whether a
  0.2 s mel window matches the lower halves of five consecutive 96x96 face crops. Used as the
  sync loss when training the generator.
* :class:`SyncNetV2` -- the SyncNet of "Out of time" (Chung & Zisserman, 2016) as released with
  ``syncnet_v2.model``; the network behind the LSE-D / LSE-C evaluation metrics
  (see :mod:`lipdub.metrics.lse`).

Submodule names and positions reproduce the original state-dict keys exactly, so released
checkpoints load strictly (``syncnet_color_state_dict.json`` / ``syncnet_v2_state_dict.json``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .wav2lip import ConvBlock


def _block(cin: int, cout: int, kernel: int, stride=1, padding: int = 1) -> ConvBlock:
    return ConvBlock(cin, cout, kernel, stride, padding)


def _res(c: int) -> ConvBlock:
    return ConvBlock(c, c, 3, 1, 1, residual=True)


class SyncNetColor(nn.Module):
    """Wav2Lip's expert lip-sync discriminator.

    ``forward(audio, face)`` takes a mel window ``(B, 1, 80, 16)`` and ``(B, 15, 48, 96)`` faces
    (lower halves of 5 BGR frames in [0, 1], stacked frame-major on channels) and returns
    ``(audio_embedding, face_embedding)``, each ``(B, 512)``, L2-normalised per row.
    Their dot product (cosine similarity, in [0, 1]) is the "in sync" probability.
    """

    def __init__(self):
        super().__init__()
        # face: 48x96 -> 48x96 -> 46x47 -> 23x24 -> 12x12 -> 6x6 -> 3x3 -> 1x1
        self.face_encoder = nn.Sequential(
            _block(15, 32, 7, 1, 3),
            _block(32, 64, 5, (1, 2), 1), _res(64), _res(64),
            _block(64, 128, 3, 2, 1), _res(128), _res(128), _res(128),
            _block(128, 256, 3, 2, 1), _res(256), _res(256),
            _block(256, 512, 3, 2, 1), _res(512), _res(512),
            _block(512, 512, 3, 2, 1),
            _block(512, 512, 3, 1, 0),
            _block(512, 512, 1, 1, 0),
        )
        # audio: 80x16 -> 27x16 -> 9x6 -> 3x3 -> 1x1
        self.audio_encoder = nn.Sequential(
            _block(1, 32, 3, 1, 1), _res(32), _res(32),
            _block(32, 64, 3, (3, 1), 1), _res(64), _res(64),
            _block(64, 128, 3, 3, 1), _res(128), _res(128),
            _block(128, 256, 3, (3, 2), 1), _res(256), _res(256),
            _block(256, 512, 3, 1, 0),
            _block(512, 512, 1, 1, 0),
        )

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 80, 16)`` mel windows -> ``(B, 512)`` normalised embeddings."""
        return F.normalize(self.audio_encoder(audio).flatten(1), p=2, dim=1)

    def embed_face(self, face: torch.Tensor) -> torch.Tensor:
        """``(B, 15, 48, 96)`` lower-half face stacks -> ``(B, 512)`` normalised embeddings."""
        return F.normalize(self.face_encoder(face).flatten(1), p=2, dim=1)

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_audio(audio), self.embed_face(face)

    @staticmethod
    def face_input(frames: torch.Tensor) -> torch.Tensor:
        """Turn 5 full 96x96 faces ``(B, 3, 5, 96, 96)`` in [0, 1] into the ``(B, 15, 48, 96)`` input:
        lower halves, concatenated on channels frame-major (channel = 3 * t + c)."""
        b, c, t, h, w = frames.shape
        lower = frames[:, :, :, h // 2:, :]
        return lower.permute(0, 2, 1, 3, 4).reshape(b, t * c, h - h // 2, w)

    @staticmethod
    def cosine(audio_emb: torch.Tensor, face_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity per item, as Wav2Lip's sync loss computes it."""
        return F.cosine_similarity(audio_emb, face_emb)


class SyncNetV2(nn.Module):
    """SyncNet v2 (syncnet_python's ``S(num_layers_in_fc_layers=1024)``).

    * ``forward_lip(x)``: ``(B, 3, 5, 224, 224)`` BGR frames with raw 0..255 float values
      (no normalisation) -> ``(B, 1024)``.
    * ``forward_aud(x)``: ``(B, 1, 13, 20)`` MFCC windows (13 coefficients x 20 frames of 10 ms)
      -> ``(B, 1024)``.

    Features are not normalised; the LSE metrics use plain Euclidean distances between them.
    """

    def __init__(self, num_layers_in_fc_layers: int = 1024):
        super().__init__()
        n_fc = num_layers_in_fc_layers
        # indices matter: they are the state-dict keys (ReLU / pooling layers hold no tensors)
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(1, 1),
            nn.Conv2d(64, 192, 3, 1, 1), nn.BatchNorm2d(192), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, (1, 2)),
            nn.Conv2d(192, 384, 3, 1, 1), nn.BatchNorm2d(384), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 512, (5, 4), 1, 0), nn.BatchNorm2d(512), nn.ReLU(),
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, n_fc),
        )
        self.netfclip = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, n_fc),
        )
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2), 0), nn.BatchNorm3d(96), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(256, 256, (1, 3, 3), 1, (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, (1, 3, 3), 1, (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.Conv3d(256, 256, (1, 3, 3), 1, (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(256, 512, (1, 6, 6), 1, 0), nn.BatchNorm3d(512), nn.ReLU(inplace=True),
        )

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))

    def forward_lipfeat(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional lip features before the FC head, ``(B, 512)``."""
        return self.netcnnlip(x).flatten(1)

    def forward(self, lip: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_lip(lip), self.forward_aud(mfcc)
