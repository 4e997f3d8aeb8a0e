"""The Wav2Lip generator (96x96 and 256x256 faces) and its visual-quality discriminator.

Module names and registration order reproduce the original implementations exactly, so the
released `wav2lip.pth` / `wav2lip_gan.pth` (96) and the LiveTalking / Linly-Talker
`wav2lip256.pth` / `wav2lipv2.pth` (256) state dicts load strictly, key for key.
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


# Layer tables of the generator per face size. The 96 one is the original Wav2Lip
# (Rudrabha/Wav2Lip models/wav2lip.py); the 256 one is the higher-resolution generator that
# LiveTalking ships as wav2lip256.pth and Linly-Talker as wav2lipv2.pth (its
# models/wav2lip_v2.py). Both keep the audio encoder, the output block and the skip structure.
#
# Encoder: a 7x7 stem, then down stages (cin, cout, n_residual): one stride-2 3x3 conv followed
# by n residual 3x3 convs, then a valid conv of `bottom` x `bottom` (the map is that size by
# then) and a 1x1 conv down to (512, 1, 1).
# Decoder: a 1x1 conv, a stride-1 ConvTranspose of `bottom` x `bottom` from 1x1 back to the
# bottom size plus one residual conv, then up stages (cin, cout, n_residual): a stride-2 3x3
# ConvTranspose (doubling the size) followed by n residual convs.
_LAYOUTS = {
    96: {
        "bottom": 3,
        "down": ((16, 32, 2), (32, 64, 3), (64, 128, 2), (128, 256, 2), (256, 512, 1)),
        "up": ((1024, 512, 2), (768, 384, 2), (512, 256, 2), (320, 128, 2), (160, 64, 2)),
    },
    256: {
        "bottom": 4,
        "down": ((16, 32, 2), (32, 64, 3), (64, 128, 2), (128, 256, 2), (256, 512, 1), (512, 512, 1)),
        "up": ((1024, 512, 1), (1024, 512, 2), (768, 384, 2), (512, 256, 2), (320, 128, 2), (160, 64, 2)),
    },
}
FACE_SIZES = tuple(_LAYOUTS)


class Wav2Lip(nn.Module):
    """Generator: (mel window, masked+reference face) -> BGR face in (0, 1), at `face_size`.

    `face_size` 96 is the original Wav2Lip; 256 is the higher-resolution generator of LiveTalking
    (`wav2lip256.pth`) and Linly-Talker (`wav2lipv2.pth`). Inputs are `(B, 1, 80, 16)` mels and
    `(B, 6, S, S)` faces (S = face_size: channels 0-2 the target with rows S/2.. zeroed, 3-5 the
    reference), or the training form `(B, T, 1, 80, 16)` / `(B, 6, T, S, S)`, which is folded
    time-major into the batch. The output is `(B, 3, S, S)` (or `(B, 3, T, S, S)`).
    """

    def __init__(self, face_size: int = 96) -> None:
        super().__init__()
        if face_size not in _LAYOUTS:
            raise ValueError(f"unsupported Wav2Lip face size {face_size} (supported: {FACE_SIZES})")
        layout = _LAYOUTS[face_size]
        bottom = layout["bottom"]
        self.face_size = face_size
        self.face_encoder_blocks = nn.ModuleList(
            [nn.Sequential(ConvBlock(6, 16, 7, 1, 3))]
            + [nn.Sequential(ConvBlock(cin, cout, 3, 2, 1), *(_res(cout) for _ in range(n)))
               for cin, cout, n in layout["down"]]
            + [nn.Sequential(ConvBlock(512, 512, bottom, 1, 0), ConvBlock(512, 512, 1, 1, 0))]
        )
        self.audio_encoder = nn.Sequential(
            ConvBlock(1, 32, 3, 1, 1), _res(32), _res(32),
            ConvBlock(32, 64, 3, (3, 1), 1), _res(64), _res(64),
            ConvBlock(64, 128, 3, 3, 1), _res(128), _res(128),
            ConvBlock(128, 256, 3, (3, 2), 1), _res(256),
            ConvBlock(256, 512, 3, 1, 0), ConvBlock(512, 512, 1, 1, 0),
        )
        self.face_decoder_blocks = nn.ModuleList(
            [nn.Sequential(ConvBlock(512, 512, 1, 1, 0)),
             nn.Sequential(ConvTransposeBlock(1024, 512, bottom, 1, 0), _res(512))]
            + [nn.Sequential(ConvTransposeBlock(cin, cout, 3, 2, 1, 1), *(_res(cout) for _ in range(n)))
               for cin, cout, n in layout["up"]]
        )
        self.output_block = nn.Sequential(ConvBlock(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid())

    def extra_repr(self) -> str:
        return f"face_size={self.face_size}"

    def forward(self, audio: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        batch = audio.size(0)
        sequence = face.dim() > 4
        if sequence:  # time-major fold: item t*B + b, as the original does
            audio = torch.cat([audio[:, t] for t in range(audio.size(1))], dim=0)
            face = torch.cat([face[:, :, t] for t in range(face.size(2))], dim=0)
        x = self.decode(self.audio_encoder(audio), self.encode_face(face))
        if sequence:
            x = torch.stack(torch.split(x, batch, dim=0), dim=2)
        return x

    def encode_face(self, face: torch.Tensor) -> list[torch.Tensor]:
        """The face encoder's block outputs (the decoder's skips), shallowest first, for (B, 6, S, S)
        faces. Separate from `decode` so a face that does not change (a photo, `--static`) is
        encoded once and only the audio encoder and the decoder run per frame."""
        skips = []
        x = face
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)
        return skips

    def decode(self, audio_embedding: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The faces (B, 3, S, S) for audio embeddings (B, 512, 1, 1) and `encode_face` skips
        (each of batch B, or of batch 1 for one face shared by every item)."""
        skips = list(skips)
        x = audio_embedding
        for block in self.face_decoder_blocks:
            x = block(x)
            skip = skips.pop()
            x = torch.cat((x, skip.expand(x.size(0), -1, -1, -1) if skip.size(0) != x.size(0) else skip), dim=1)
        return self.output_block(x)


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
