"""The Wav2Lip generator and its visual-quality discriminator.

Module names and registration order reproduce the original implementation exactly, so the
released `wav2lip.pth` / `wav2lip_gan.pth` state dicts load strictly, key for key.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Module):
    """Conv -> BatchNorm -> (+ input) -> ReLU; the `conv_block.{0,1}` key layout of the original."""

    def __init__(self, cin: int, cout: int, kernel: int, stride, padding: int, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return F.relu(out)


class ConvTransposeBlock(nn.Module):
    """ConvTranspose -> BatchNorm -> ReLU (the decoder's upsampling step)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, output_padding: int = 0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_block(x))


class PlainConvBlock(nn.Module):
    """Conv -> LeakyReLU(0.01) without normalisation (the discriminator's block)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride, padding: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv_block(x), 0.01)


def _res(c: int, k: int = 3) -> ConvBlock:
    return ConvBlock(c, c, k, 1, k // 2, residual=True)


class Wav2Lip(nn.Module):
    """Generator: (mel window, masked+reference face) -> 96x96 BGR face in (0, 1).

    Inputs are `(B, 1, 80, 16)` mels and `(B, 6, 96, 96)` faces, or the training form
    `(B, T, 1, 80, 16)` / `(B, 6, T, 96, 96)` which is folded time-major into the batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList([
            nn.Sequential(ConvBlock(6, 16, 7, 1, 3)),
            nn.Sequential(ConvBlock(16, 32, 3, 2, 1), _res(32), _res(32)),
            nn.Sequential(ConvBlock(32, 64, 3, 2, 1), _res(64), _res(64), _res(64)),
            nn.Sequential(ConvBlock(64, 128, 3, 2, 1), _res(128), _res(128)),
            nn.Sequential(ConvBlock(128, 256, 3, 2, 1), _res(256), _res(256)),
            nn.Sequential(ConvBlock(256, 512, 3, 2, 1), _res(512)),
            nn.Sequential(ConvBlock(512, 512, 3, 1, 0), ConvBlock(512, 512, 1, 1, 0)),
        ])
        self.audio_encoder = nn.Sequential(
            ConvBlock(1, 32, 3, 1, 1), _res(32), _res(32),
            ConvBlock(32, 64, 3, (3, 1), 1), _res(64), _res(64),
            ConvBlock(64, 128, 3, 3, 1), _res(128), _res(128),
            ConvBlock(128, 256, 3, (3, 2), 1), _res(256),
            ConvBlock(256, 512, 3, 1, 0), ConvBlock(512, 512, 1, 1, 0),
        )
        self.face_decoder_blocks = nn.ModuleList([
            nn.Sequential(ConvBlock(512, 512, 1, 1, 0)),
            nn.Sequential(ConvTransposeBlock(1024, 512, 3, 1, 0), _res(512)),
            nn.Sequential(ConvTransposeBlock(1024, 512, 3, 2, 1, 1), _res(512), _res(512)),
            nn.Sequential(ConvTransposeBlock(768, 384, 3, 2, 1, 1), _res(384), _res(384)),
            nn.Sequential(ConvTransposeBlock(512, 256, 3, 2, 1, 1), _res(256), _res(256)),
            nn.Sequential(ConvTransposeBlock(320, 128, 3, 2, 1, 1), _res(128), _res(128)),
            nn.Sequential(ConvTransposeBlock(160, 64, 3, 2, 1, 1), _res(64), _res(64)),
        ])
        self.output_block = nn.Sequential(ConvBlock(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        batch = audio.size(0)
        sequence = face.dim() > 4
        if sequence:  # time-major fold: item t*B + b, as the original does
            audio = torch.cat([audio[:, t] for t in range(audio.size(1))], dim=0)
            face = torch.cat([face[:, :, t] for t in range(face.size(2))], dim=0)
        skips = []
        x = face
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)
        x = self.audio_encoder(audio)
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), skips.pop()), dim=1)
        x = self.output_block(x)
        if sequence:
            x = torch.stack(torch.split(x, batch, dim=0), dim=2)
        return x


class Wav2LipDiscQual(nn.Module):
    """Visual-quality discriminator of Wav2Lip-GAN; judges only the lower half of each face."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList([
            nn.Sequential(PlainConvBlock(3, 32, 7, 1, 3)),
            nn.Sequential(PlainConvBlock(32, 64, 5, (1, 2), 2), PlainConvBlock(64, 64, 5, 1, 2)),
            nn.Sequential(PlainConvBlock(64, 128, 5, 2, 2), PlainConvBlock(128, 128, 5, 1, 2)),
            nn.Sequential(PlainConvBlock(128, 256, 5, 2, 2), PlainConvBlock(256, 256, 5, 1, 2)),
            nn.Sequential(PlainConvBlock(256, 512, 3, 2, 1), PlainConvBlock(512, 512, 3, 1, 1)),
            nn.Sequential(PlainConvBlock(512, 512, 3, 2, 1), PlainConvBlock(512, 512, 3, 1, 1)),
            nn.Sequential(PlainConvBlock(512, 512, 3, 1, 0), PlainConvBlock(512, 512, 1, 1, 0)),
        ])
        self.binary_pred = nn.Sequential(nn.Conv2d(512, 1, 1, 1, 0), nn.Sigmoid())

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        faces = torch.cat([faces[:, :, t] for t in range(faces.size(2))], dim=0)
        x = faces[:, :, faces.size(2) // 2:]
        for block in self.face_encoder_blocks:
            x = block(x)
        return self.binary_pred(x).view(len(x), -1)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into its convolution for faster inference.

    Only for inference copies: the fused model has no BN keys, so it no longer matches the
    released state-dict layout.
    """
    for module in model.modules():
        block = getattr(module, "conv_block", None)
        if isinstance(block, nn.Sequential) and len(block) == 2 and isinstance(block[1], nn.BatchNorm2d):
            conv, bn = block[0], block[1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            with torch.no_grad():
                if isinstance(conv, nn.ConvTranspose2d):
                    conv.weight.mul_(scale.view(1, -1, 1, 1))
                else:
                    conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
            module.conv_block = nn.Sequential(conv)
    return model
