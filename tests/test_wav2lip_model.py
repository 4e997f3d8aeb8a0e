"""Generator and discriminator conformance with the goldens measured on the original code."""
import json

import numpy as np
import pytest
import torch

from lipdub.models.wav2lip import Wav2Lip, Wav2LipDiscQual, fuse_batchnorm

from .conftest import SPECS


@pytest.fixture(scope="module")
def golden():
    return np.load(SPECS / "golden_wav2lip_public.npz")


def _schema(name):
    return [(k, list(s), d) for k, s, d in json.loads((SPECS / f"{name}_state_dict.json").read_text())]


@pytest.mark.parametrize("name,cls", [("wav2lip", Wav2Lip), ("wav2lip_disc_qual", Wav2LipDiscQual)])
def test_state_dict_layout_matches_original(name, cls):
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in cls().state_dict().items()]
    assert ours == _schema(name)


def _loaded(cls, name, rule_a):
    model = cls().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rule_a.rule_a(name).items()})
    return model


def test_generator_matches_golden(golden, rule_a):
    model = _loaded(Wav2Lip, "wav2lip", rule_a)
    with torch.no_grad():
        out = model(torch.from_numpy(golden["w2l_mel"]), torch.from_numpy(golden["w2l_face"])).numpy()
        real = model(torch.from_numpy(golden["w2l_realmel"]), torch.from_numpy(golden["w2l_face"])).numpy()
        seq = model(torch.from_numpy(golden["w2l_seq_mel"]), torch.from_numpy(golden["w2l_seq_face"])).numpy()
        emb = model.audio_encoder(torch.from_numpy(golden["w2l_mel"])).numpy()
    assert np.abs(out - golden["w2l_out"]).max() < 1e-5
    assert np.abs(real - golden["w2l_realmel_out"]).max() < 1e-5
    assert np.abs(seq - golden["w2l_seq_out"]).max() < 1e-5
    ref = golden["w2l_act_audio_embedding"]
    assert np.abs(emb - ref).max() < 1e-4 * np.abs(ref).max()


def test_encoder_activations_match_golden(golden, rule_a):
    model = _loaded(Wav2Lip, "wav2lip", rule_a)
    x = torch.from_numpy(golden["w2l_face"][:1])
    with torch.no_grad():
        for j, block in enumerate(model.face_encoder_blocks):
            x = block(x)
            ref = golden[f"w2l_act_enc{j}_item0"]
            assert np.abs(x[0].numpy() - ref.reshape(x[0].shape)).max() < 1e-4 * np.abs(ref).max(), j


def test_fused_batchnorm_gives_same_output(golden, rule_a):
    model = fuse_batchnorm(_loaded(Wav2Lip, "wav2lip", rule_a))
    with torch.no_grad():
        out = model(torch.from_numpy(golden["w2l_mel"]), torch.from_numpy(golden["w2l_face"])).numpy()
    assert np.abs(out - golden["w2l_out"]).max() < 1e-5


def test_disc_qual_matches_golden(golden, rule_a):
    model = _loaded(Wav2LipDiscQual, "wav2lip_disc_qual", rule_a)
    with torch.no_grad():
        out = model(torch.from_numpy(golden["disc_face"])).numpy()
    assert np.abs(out - golden["disc_out"]).max() < 1e-5
