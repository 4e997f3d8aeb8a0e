"""GFPGANv1Clean conformance with the golden measured on the original code (rule-B weights).

The full network has 86M parameters and takes seconds per 512x512 face on a CPU, so the
full-size model is built few times and shared by the tests of this module.
"""
import json

import cv2
import numpy as np
import pytest
import torch

from lipdub.models.gfpgan import GFPGANv1Clean
from lipdub.restore import FFHQ_TEMPLATE_512, Restorer, region_mask

from .conftest import SPECS, load_spec_module


def _schema():
    return [[k, list(s), d] for k, s, d in json.loads((SPECS / "gfpganv1_clean_state_dict.json").read_text())]


@pytest.fixture(scope="module")
def rule_b_state():
    rb = load_spec_module("fill_rule_b")
    return rb.fill_state_dict(_schema(), rb.GFPGAN_OVERRIDES)


@pytest.fixture(scope="module")
def golden():
    return np.load(SPECS / "golden_gfpganv1_clean_public.npz")


def test_state_dict_layout_matches_original():
    model = GFPGANv1Clean()
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert ours == _schema()
    assert len(ours) == 285
    assert sum(p.numel() for p in model.parameters()) == 86_444_252


def test_matches_golden_and_is_deterministic(rule_b_state, golden):
    model = GFPGANv1Clean().eval()
    model.load_state_dict(rule_b_state, strict=True)
    x = torch.from_numpy(golden["x"])
    with torch.inference_mode():
        out1 = model(x)
        out2 = model(x)
    ref = golden["out"]
    assert out1.shape == (1, 3, 512, 512)
    # Rule-B weights give large outputs (|out| up to ~8e3), so the float32 tolerance is
    # relative to the output scale. (Measured here: max abs error 0.0, bit-identical.)
    scale = float(np.abs(ref).max())
    err = np.abs(out1.numpy() - ref)
    assert err.max() <= 1e-5 * scale, f"max abs error {err.max()} (scale {scale})"
    assert err.mean() <= 1e-6 * scale
    assert torch.equal(out1, out2), "default forward must be deterministic"


def test_small_config_noise_and_batch():
    """A small configuration of the same code: stored noise is deterministic, fresh noise is
    not, and a batch gives the same faces as one-by-one calls (grouped modulated conv)."""
    torch.manual_seed(0)
    model = GFPGANv1Clean(out_size=64, num_style_feat=64, channel_multiplier=1, num_mlp=2, narrow=0.25).eval()
    with torch.no_grad():
        for p in model.stylegan_decoder.parameters():
            if p.shape == (1,):  # noise strengths are zero at init; make the noise matter
                p.fill_(0.5)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
        again = model(x)
        noisy1 = model(x, randomize_noise=True)
        noisy2 = model(x, randomize_noise=True)
    assert batch.shape == (3, 3, 64, 64)
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-4 * float(batch.abs().max()))
    assert not torch.allclose(noisy1, noisy2)
    assert not torch.allclose(noisy1, batch)


def test_restorer_pre_and_post_processing(rule_b_state, golden):
    # Scale every decoder to-RGB layer so the image (a sum of to-RGB outputs) lands mostly
    # inside [-1, 1]: the uint8 conversion is then tested on unclipped values.
    c = 0.8 / float(np.abs(golden["out"]).max())
    sd = {k: (v * c if ".to_rgb" in k and "modulation" not in k else v) for k, v in rule_b_state.items()}
    restorer = Restorer({"params_ema": sd})  # the released checkpoints' wrapping

    rng = np.random.default_rng(3)
    crop0 = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    crop0[:, :, 0] //= 3  # channels differ in statistics, so a BGR/RGB mix-up shows
    crop1 = np.ascontiguousarray(crop0[::-1])
    outs = restorer.restore_crops([crop0, crop1])
    assert len(outs) == 2 and all(o.shape == (512, 512, 3) and o.dtype == np.uint8 for o in outs)

    # independent reference for crop0: numpy pre-processing, the bare network, numpy post-processing
    rgb = crop0[:, :, ::-1].astype(np.float32) / 255.0
    x = torch.from_numpy(((rgb - 0.5) / 0.5).transpose(2, 0, 1)[None].copy())
    with torch.inference_mode():
        y = restorer.net(x)[0].numpy().transpose(1, 2, 0)
    assert 0.05 < np.mean(np.abs(y) < 1.0)  # a good share of the pixels is not clipped
    expected = np.rint((np.clip(y, -1, 1) + 1) / 2 * 255).astype(np.uint8)[:, :, ::-1]
    diff = np.abs(outs[0].astype(int) - expected)
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert not np.array_equal(outs[0], outs[1])
    assert restorer.restore_crops([]) == []

    # whole-frame path: one face, mouth region; nothing outside the warped mouth mask changes
    yy, xx = np.mgrid[0:360, 0:480].astype(np.float32)
    frame = np.stack([128 + 90 * np.sin(xx / 23.0), 128 + 80 * np.cos(yy / 31.0), 120 + 0 * xx], -1).astype(np.uint8)
    landmarks = FFHQ_TEMPLATE_512 * 0.5 + [110.0, 40.0]
    out = restorer.restore_frame(frame, [landmarks], region="mouth", weight=1.0)
    assert out.shape == frame.shape and out.dtype == np.uint8
    inv = np.array([[0.5, 0.0, 110.0], [0.0, 0.5, 40.0]])  # crop -> frame for these landmarks
    mask = cv2.warpAffine(np.ascontiguousarray(region_mask("mouth")), inv, (480, 360))
    changed = np.any(out != frame, axis=-1)
    assert changed.any()
    assert not changed[mask == 0].any()
