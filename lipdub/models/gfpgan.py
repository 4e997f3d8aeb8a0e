"""GFPGAN v1 "clean" face restorer (the network behind GFPGANv1.3.pth / GFPGANv1.4.pth).

A U-Net encoder turns a 512x512 face into a per-layer style code and multi-scale spatial
conditions; a StyleGAN2 decoder renders the face from the style code while its features are
modulated (SFT: ``feature * scale + shift`` on half of the channels) by those conditions.

Written from the published architecture facts only, in plain PyTorch (no compiled ops).
Module names and registration order reproduce the original so the released checkpoints'
``params_ema`` state dict loads with ``strict=True``, key for key and in the same order.

Unlike the original, ``forward`` defaults to ``randomize_noise=False``: the registered
``stylegan_decoder.noises.noise{i}`` buffers are used, so a face restored twice comes out
identical (fresh noise per call makes video flicker).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

_SLOPE = 0.2


def _channels(multiplier: float, channel_multiplier: int) -> dict[int, int]:
    """Channel count per spatial resolution (decoder: multiplier=narrow, U-Net: narrow/2)."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {res: int(c * multiplier) for res, c in base.items()}


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# StyleGAN2 decoder pieces
# --------------------------------------------------------------------------------------------
class PixelNormStyle(nn.Module):
    """Normalise each style vector to unit root-mean-square (first entry of the style MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """Convolution whose weight is scaled per input channel by a style vector (no bias).

    The per-sample weights are applied as one grouped convolution (groups = batch size).
    ``upsample`` doubles the input with bilinear interpolation before the convolution.
    """

    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, eps: float = 1e-8):
        super().__init__()
        self.cin, self.cout, self.kernel = cin, cout, kernel
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel) / math.sqrt(cin * kernel * kernel))
        self.modulation = nn.Linear(style_dim, cin)
        nn.init.kaiming_normal_(self.modulation.weight, a=0, mode="fan_in", nonlinearity="linear")
        nn.init.ones_(self.modulation.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        s = self.modulation(style).view(b, 1, self.cin, 1, 1)
        w = self.weight * s  # (b, cout, cin, k, k)
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4)) + self.eps).view(b, self.cout, 1, 1, 1)
        w = w.reshape(b * self.cout, self.cin, self.kernel, self.kernel)
        if self.upsample:
            x = _resize(x, 2)
        h, wd = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * self.cin, h, wd), w, padding=self.kernel // 2, groups=b)
        return out.view(b, self.cout, *out.shape[2:])


class StyleConv(nn.Module):
    """Modulated 3x3 conv -> (* sqrt 2) -> + weight * noise -> + bias -> LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style_dim, demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2.0)
        if noise is None:
            b, _, h, w = out.shape
            noise = torch.randn(b, 1, h, w, dtype=out.dtype, device=out.device)
        out = out + self.weight * noise + self.bias
        return F.leaky_relu(out, _SLOPE)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to 3 channels (no demodulation) + bias, added to the upsampled skip."""

    def __init__(self, cin: int, style_dim: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_resize(skip, 2) if self.upsample else skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 generator (clean variant) whose odd style convs are followed by SFT modulation.

    ``style_mlp`` is kept for state-dict compatibility; with latent input (the GFPGAN setting)
    it is not used in ``forward``.
    """

    def __init__(self, out_size: int = 512, style_dim: int = 512, num_mlp: int = 8, channel_multiplier: int = 2,
                 narrow: float = 1, sft_half: bool = True):
        super().__init__()
        self.sft_half = sft_half
        mlp: list[nn.Module] = [PixelNormStyle()]
        for _ in range(num_mlp):
            lin = nn.Linear(style_dim, style_dim)
            nn.init.kaiming_normal_(lin.weight, a=_SLOPE, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(lin.bias)
            mlp += [lin, nn.LeakyReLU(_SLOPE)]
        self.style_mlp = nn.Sequential(*mlp)

        ch = _channels(narrow, channel_multiplier)
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2

        self.constant_input = ConstantInput(ch[4], 4)
        self.style_conv1 = StyleConv(ch[4], ch[4], style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        cin = ch[4]
        for lvl in range(3, self.log_size + 1):
            cout = ch[2**lvl]
            self.style_convs.append(StyleConv(cin, cout, style_dim, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim, upsample=True))
            cin = cout

    def stored_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor], randomize_noise: bool = False) -> torch.Tensor:
        """latent: (B, num_latent, style_dim); conditions: [scale_0, shift_0, scale_1, shift_1, ...]."""
        noise = [None] * self.num_layers if randomize_noise else self.stored_noise()
        out = self.constant_input(latent.shape[0])
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            i = 2 * k + 1
            out = self.style_convs[2 * k](out, latent[:, i], noise[i])
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if self.sft_half:
                    keep, mod = torch.split(out, out.shape[1] // 2, dim=1)
                    out = torch.cat([keep, mod * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = self.style_convs[2 * k + 1](out, latent[:, i + 1], noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip


# --------------------------------------------------------------------------------------------
# U-Net encoder/decoder and the full network
# --------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """conv3x3 -> lrelu -> bilinear resample -> conv3x3 -> lrelu, plus a resampled 1x1 skip."""

    def __init__(self, cin: int, cout: int, mode: str = "down"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), _SLOPE)
        out = F.leaky_relu(self.conv2(_resize(out, self.factor)), _SLOPE)
        return out + self.skip(_resize(x, self.factor))


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1 clean: (B, 3, S, S) RGB in [-1, 1] -> restored (B, 3, S, S) RGB in about [-1, 1].

    The defaults are the GFPGANv1.3 / v1.4 configuration (S = 512). ``toRGB`` (the U-Net's
    intermediate RGB heads, used only for training losses) is kept for strict loading.
    """

    def __init__(self, out_size: int = 512, num_style_feat: int = 512, channel_multiplier: int = 2,
                 num_mlp: int = 8, input_is_latent: bool = True, different_w: bool = True, narrow: float = 1,
                 sft_half: bool = True):
        super().__init__()
        self.out_size = out_size
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        ch = _channels(narrow * 0.5, channel_multiplier)
        self.log_size = int(math.log2(out_size))
        first = 2**self.log_size

        self.conv_body_first = nn.Conv2d(3, ch[first], 1)
        self.conv_body_down = nn.ModuleList()
        cin = ch[first]
        for lvl in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(cin, ch[2 ** (lvl - 1)], "down"))
            cin = ch[2 ** (lvl - 1)]
        self.final_conv = nn.Conv2d(cin, ch[4], 3, 1, 1)

        self.conv_body_up = nn.ModuleList()
        cin = ch[4]
        for lvl in range(3, self.log_size + 1):
            self.conv_body_up.append(ResBlock(cin, ch[2**lvl], "up"))
            cin = ch[2**lvl]
        self.toRGB = nn.ModuleList(nn.Conv2d(ch[2**lvl], 3, 1) for lvl in range(3, self.log_size + 1))

        n_w = (self.log_size * 2 - 2) if different_w else 1
        self.final_linear = nn.Linear(ch[4] * 4 * 4, n_w * num_style_feat)

        self.stylegan_decoder = StyleGAN2DecoderSFT(out_size, num_style_feat, num_mlp, channel_multiplier, narrow,
                                                    sft_half)

        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for lvl in range(3, self.log_size + 1):
            c = ch[2**lvl]
            c_sft = c if sft_half else 2 * c
            for branch in (self.condition_scale, self.condition_shift):
                branch.append(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(_SLOPE),
                                            nn.Conv2d(c, c_sft, 3, 1, 1)))

    def forward(self, x: torch.Tensor, randomize_noise: bool = False) -> torch.Tensor:
        """Restore faces. ``randomize_noise=False`` (default) uses the stored noise: deterministic."""
        feat = F.leaky_relu(self.conv_body_first(x), _SLOPE)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = F.leaky_relu(self.final_conv(feat), _SLOPE)

        style = self.final_linear(feat.flatten(1))
        if self.different_w:
            style = style.view(style.shape[0], -1, self.num_style_feat)
        if not self.input_is_latent:  # (not the released configuration) as the original applies it
            style = self.stylegan_decoder.style_mlp(style)
        if style.ndim == 2:  # one w shared by all layers
            style = style.unsqueeze(1).expand(-1, self.stylegan_decoder.num_latent, -1)

        conditions = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[-1 - i])
            conditions.append(self.condition_scale[i](feat))
            conditions.append(self.condition_shift[i](feat))
        return self.stylegan_decoder(style, conditions, randomize_noise=randomize_noise)


def load_gfpgan_state_dict(obj) -> dict:
    """The bare state dict from a loaded GFPGAN checkpoint: ``params_ema``, else ``params``, else itself."""
    if isinstance(obj, dict):
        for key in ("params_ema", "params"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj
