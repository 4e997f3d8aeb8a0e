"""S3FD, the single-shot scale-invariant face detector that Wav2Lip uses to find faces.

A VGG16 trunk with six detection heads (strides 4, 8, 16, 32, 64, 128). Attribute names and
registration order follow the original network, so the released bare state dict (`s3fd.pth`)
loads strictly, key for key. The module returns the raw head outputs; decoding them into boxes
is `lipdub.faces.s3fd.decode`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (name, in, out, kernel, stride, padding) of the trunk convolutions, in registration order.
_TRUNK = (
    ("conv1_1", 3, 64, 3, 1, 1),
    ("conv1_2", 64, 64, 3, 1, 1),
    ("conv2_1", 64, 128, 3, 1, 1),
    ("conv2_2", 128, 128, 3, 1, 1),
    ("conv3_1", 128, 256, 3, 1, 1),
    ("conv3_2", 256, 256, 3, 1, 1),
    ("conv3_3", 256, 256, 3, 1, 1),
    ("conv4_1", 256, 512, 3, 1, 1),
    ("conv4_2", 512, 512, 3, 1, 1),
    ("conv4_3", 512, 512, 3, 1, 1),
    ("conv5_1", 512, 512, 3, 1, 1),
    ("conv5_2", 512, 512, 3, 1, 1),
    ("conv5_3", 512, 512, 3, 1, 1),
    # fc6 is a plain 3x3 conv with padding 3 (no dilation): it grows the map by 4 pixels each way.
    ("fc6", 512, 1024, 3, 1, 3),
    ("fc7", 1024, 1024, 1, 1, 0),
    ("conv6_1", 1024, 256, 1, 1, 0),
    ("conv6_2", 256, 512, 3, 2, 1),
    ("conv7_1", 512, 128, 1, 1, 0),
    ("conv7_2", 128, 256, 3, 2, 1),
)

# (source feature, channels, classifier outputs) of the six heads, finest first.
_HEADS = (
    ("conv3_3_norm", 256, 4),  # 3 background logits + 1 face logit (max-out)
    ("conv4_3_norm", 512, 2),
    ("conv5_3_norm", 512, 2),
    ("fc7", 1024, 2),
    ("conv6_2", 512, 2),
    ("conv7_2", 256, 2),
)

STRIDES = (4, 8, 16, 32, 64, 128)


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels, then a learned per-channel scale."""

    def __init__(self, channels: int, scale: float, eps: float = 1e-10):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """Input: (B, 3, H, W) float32, RGB minus (104, 117, 123). Output: 12 maps [cls1, reg1, ..., cls6, reg6].

    Every cls map has 2 channels (background, face) of logits: the finest head's three background
    logits are reduced by an element-wise max. Every reg map has 4 channels (dx, dy, dw, dh).
    """

    def __init__(self):
        super().__init__()
        for name, cin, cout, k, s, p in _TRUNK:
            self.add_module(name, nn.Conv2d(cin, cout, k, s, p))
        self.conv3_3_norm = L2Norm(256, 10.0)
        self.conv4_3_norm = L2Norm(512, 8.0)
        self.conv5_3_norm = L2Norm(512, 5.0)
        for src, ch, ncls in _HEADS:
            self.add_module(f"{src}_mbox_conf", nn.Conv2d(ch, ncls, 3, 1, 1))
            self.add_module(f"{src}_mbox_loc", nn.Conv2d(ch, 4, 3, 1, 1))

    def _relu_convs(self, x: torch.Tensor, *names: str) -> torch.Tensor:
        for name in names:
            x = F.relu(getattr(self, name)(x))
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self._relu_convs(x, "conv1_1", "conv1_2")
        h = self._relu_convs(F.max_pool2d(h, 2, 2), "conv2_1", "conv2_2")
        f3 = self._relu_convs(F.max_pool2d(h, 2, 2), "conv3_1", "conv3_2", "conv3_3")
        f4 = self._relu_convs(F.max_pool2d(f3, 2, 2), "conv4_1", "conv4_2", "conv4_3")
        f5 = self._relu_convs(F.max_pool2d(f4, 2, 2), "conv5_1", "conv5_2", "conv5_3")
        f7 = self._relu_convs(F.max_pool2d(f5, 2, 2), "fc6", "fc7")
        f62 = self._relu_convs(f7, "conv6_1", "conv6_2")
        f72 = self._relu_convs(f62, "conv7_1", "conv7_2")

        feats = {
            "conv3_3_norm": self.conv3_3_norm(f3),
            "conv4_3_norm": self.conv4_3_norm(f4),
            "conv5_3_norm": self.conv5_3_norm(f5),
            "fc7": f7,
            "conv6_2": f62,
            "conv7_2": f72,
        }
        out: list[torch.Tensor] = []
        for src, _, _ in _HEADS:
            feat = feats[src]
            out.append(getattr(self, f"{src}_mbox_conf")(feat))
            out.append(getattr(self, f"{src}_mbox_loc")(feat))
        cls1 = out[0]
        background = torch.maximum(torch.maximum(cls1[:, 0:1], cls1[:, 1:2]), cls1[:, 2:3])
        out[0] = torch.cat([background, cls1[:, 3:4]], dim=1)
        return out
