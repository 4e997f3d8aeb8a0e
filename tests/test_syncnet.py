"""SyncNet_color (Wav2Lip's expert) and SyncNet v2 (LSE metrics) against the measured goldens."""
import json

import numpy as np
import pytest
import torch

from lipdub.models.syncnet import SyncNetColor, SyncNetV2
from lipdub.weights import load_model

from .conftest import SPECS, load_spec_module


def _schema(name):
    return [(k, list(s), d) for k, s, d in json.loads((SPECS / f"{name}_state_dict.json").read_text())]


def _layout(model):
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


@pytest.fixture(scope="module")
def golden_w2l():
    return np.load(SPECS / "golden_wav2lip_public.npz")


@pytest.fixture(scope="module")
def golden_v2():
    return np.load(SPECS / "golden_syncnet_v2_public.npz")


@pytest.fixture(scope="module")
def color_model(rule_a):
    model = SyncNetColor().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rule_a.rule_a("syncnet_color").items()})
    return model


@pytest.fixture(scope="module")
def v2_model():
    model = SyncNetV2().eval()
    schema = json.loads((SPECS / "syncnet_v2_state_dict.json").read_text())
    model.load_state_dict(load_spec_module("fill_rule_b").fill_state_dict(schema))
    return model


def test_syncnet_color_layout_matches_original():
    assert _layout(SyncNetColor()) == _schema("syncnet_color")
    n_params = sum(p.numel() for p in SyncNetColor().parameters())
    assert n_params == 16_435_072


def test_syncnet_v2_layout_matches_original():
    assert _layout(SyncNetV2()) == _schema("syncnet_v2")


def _max_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def test_syncnet_color_matches_golden(color_model, golden_w2l):
    g = golden_w2l
    with torch.no_grad():
        mel, face = torch.from_numpy(g["sync_mel"]), torch.from_numpy(g["sync_face"])
        a, f = color_model(mel, face)
        a_raw = color_model.audio_encoder(mel).flatten(1)
        f_raw = color_model.face_encoder(face).flatten(1)
        cos = SyncNetColor.cosine(a, f)
    errs = {
        "audio_emb": _max_err(a, g["sync_audio_emb"]),
        "face_emb": _max_err(f, g["sync_face_emb"]),
        "cos": _max_err(cos, g["sync_cos"]),
    }
    print("SyncNetColor max abs errors:", errs)
    assert a.shape == f.shape == (4, 512)
    assert max(errs.values()) < 1e-5
    for ours, key in ((a_raw, "sync_audio_raw"), (f_raw, "sync_face_raw")):
        assert _max_err(ours, g[key]) <= 1e-4 * np.abs(g[key]).max()
    assert (a >= 0).all() and (f >= 0).all()
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, atol=1e-6)


def test_syncnet_color_on_generator_output(color_model, golden_w2l):
    g = golden_w2l
    face_in = SyncNetColor.face_input(torch.from_numpy(g["w2l_seq_out"]))
    np.testing.assert_array_equal(face_in.numpy(), g["sync_on_gen_face_input"])
    with torch.no_grad():
        a, f = color_model(torch.from_numpy(g["w2l_seq_mel"][:, 2]), face_in)
    err_a = _max_err(a, g["sync_on_gen_audio_emb"])
    err_f = _max_err(f, g["sync_on_gen_face_emb"])
    print(f"SyncNetColor on generator output: audio {err_a:.3g}, face {err_f:.3g}")
    assert err_a < 1e-5 and err_f < 1e-5


def test_syncnet_v2_matches_golden(v2_model, golden_v2):
    g = golden_v2
    with torch.no_grad():
        lip = v2_model.forward_lip(torch.from_numpy(g["lip"]))
        aud = v2_model.forward_aud(torch.from_numpy(g["mfcc"]))
    assert lip.shape == aud.shape == (2, 1024)
    err_lip, err_aud = _max_err(lip, g["lip_feature"]), _max_err(aud, g["audio_feature"])
    scale_lip, scale_aud = np.abs(g["lip_feature"]).max(), np.abs(g["audio_feature"]).max()
    print(f"SyncNetV2 max abs errors: lip {err_lip:.3g} (max |value| {scale_lip:.4g}), "
          f"audio {err_aud:.3g} (max |value| {scale_aud:.4g})")
    assert err_lip <= 1e-5 * scale_lip
    assert err_aud <= 1e-5 * scale_aud


def test_checkpoint_loaders(tmp_path, rule_a, golden_w2l, v2_model):
    ckpt = tmp_path / "syncnet_color.pth"
    rule_a.save_official_checkpoint("syncnet_color", str(ckpt))  # {"state_dict": {"module." + key: ...}}
    model = load_model(ckpt, "syncnet_color")
    assert not model.training
    with torch.no_grad():
        a, f = model(torch.from_numpy(golden_w2l["sync_mel"]), torch.from_numpy(golden_w2l["sync_face"]))
    assert _max_err(a, golden_w2l["sync_audio_emb"]) < 1e-5

    bare = tmp_path / "syncnet_v2.model"
    torch.save(v2_model.state_dict(), bare)  # the released file is a bare state dict
    loaded = load_model(bare, "syncnet_v2")
    assert not loaded.training
    for (k1, t1), (k2, t2) in zip(loaded.state_dict().items(), v2_model.state_dict().items()):
        assert k1 == k2 and torch.equal(t1, t2)
