"""The 256x256 Wav2Lip generator (LiveTalking wav2lip256.pth / Linly-Talker wav2lipv2.pth): its
layout and goldens (specs section 10, measured on the original code), the loader telling it from
the 96x96 generator by its keys, and one-line refusals of the community variants we do not run.

Expected values come from the specs (schema JSON, goldens, facts of section 10) or are written
out here; the state dicts of the refused variants are small fakes carrying their distinguishing keys.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lipdub import weights
from lipdub.errors import LipdubError
from lipdub.models.wav2lip import Wav2Lip, fuse_batchnorm

from .conftest import SPECS

SUPPORTED = "which is not supported; use a 96x96 (wav2lip, wav2lip_gan) or the 256x256 (wav2lip256) Wav2Lip generator"


def _schema(name: str) -> list:
    return [(k, tuple(s), d) for k, s, d in json.loads((SPECS / f"{name}_state_dict.json").read_text())]


@pytest.fixture(scope="module")
def golden():
    return np.load(SPECS / "golden_wav2lip256_public.npz")


@pytest.fixture(scope="module")
def checkpoint_256(tmp_path_factory, rule_a):
    """Rule-A weights of the 256 generator in the official checkpoint format (`module.` keys)."""
    path = tmp_path_factory.mktemp("w256") / "wav2lipv2_rule_a.pth"
    rule_a.save_official_checkpoint("wav2lip256", str(path), seed_base=1000)
    return path


@pytest.fixture(scope="module")
def model_256(checkpoint_256):
    """Loaded the way the pipeline loads any generator: kind "wav2lip", the checkpoint decides."""
    return weights.load_model(checkpoint_256, "wav2lip", "cpu", progress=False)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------------------------
# The network

def test_state_dict_layout_matches_the_original():
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in Wav2Lip(face_size=256).state_dict().items()]
    assert ours == _schema("wav2lip256")
    model = Wav2Lip(face_size=256)
    assert len(model.state_dict()) == 380
    assert sum(p.numel() for p in model.parameters()) == 53_605_683
    transposed = {name for name, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)}
    assert transposed == {f"face_decoder_blocks.{i}.0.conv_block.0" for i in range(1, 8)}


def test_face_sizes():
    assert Wav2Lip().face_size == 96 and Wav2Lip(face_size=256).face_size == 256
    with pytest.raises(ValueError, match="face size 128"):
        Wav2Lip(face_size=128)


def test_generator_matches_golden(model_256, golden):
    assert isinstance(model_256, Wav2Lip) and model_256.face_size == 256 and not model_256.training
    mel, face = torch.from_numpy(golden["w256_mel"]), torch.from_numpy(golden["w256_face"])
    with torch.no_grad():
        out = model_256(mel, face).numpy()
        emb = model_256.audio_encoder(mel).numpy()
    assert out.shape == (2, 3, 256, 256)
    assert np.abs(out - golden["w256_out"]).max() < 1e-5
    assert np.abs(out - golden["w256_out_f64"]).max() < 1e-5
    assert _rel(emb, golden["w256_act_audio_embedding"]) < 1e-4


def test_block_activations_match_golden(model_256, golden):
    """Every encoder/decoder block and the pre-sigmoid logits of item 0, relative to their max."""
    def ref(name):
        return (golden[name + "_crop32"], True) if name + "_crop32" in golden.files else (golden[name], False)

    with torch.no_grad():
        x = torch.from_numpy(golden["w256_face"][:1])
        skips = []
        for j, block in enumerate(model_256.face_encoder_blocks):
            x = block(x)
            skips.append(x)
            expected, crop = ref(f"w256_act_enc{j}_item0")
            got = x[0, :, :32, :32] if crop else x[0]
            assert _rel(got.numpy(), expected) < 1e-4, f"encoder block {j}"
        assert j == 7 and x.shape[-2:] == (1, 1)
        y = model_256.audio_encoder(torch.from_numpy(golden["w256_mel"][:1]))
        for j, block in enumerate(model_256.face_decoder_blocks):
            z = block(y)
            expected, crop = ref(f"w256_act_dec{j}_item0")
            got = z[0, :, :32, :32] if crop else z[0]
            assert _rel(got.numpy(), expected) < 1e-4, f"decoder block {j}"
            y = torch.cat((z, skips.pop()), dim=1)
        prelogit = model_256.output_block[1](model_256.output_block[0](y))
    assert _rel(prelogit.numpy(), golden["w256_prelogit"][:1]) < 1e-4


def test_sequence_form_folds_time_like_the_96_model(model_256, golden):
    """(B, T, 1, 80, 16) / (B, 6, T, 256, 256): the two golden items as two time steps of one clip."""
    mel = torch.from_numpy(golden["w256_mel"]).unsqueeze(0)                      # (1, 2, 1, 80, 16)
    face = torch.from_numpy(golden["w256_face"]).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 6, 2, 256, 256)
    with torch.no_grad():
        out = model_256(mel, face).numpy()
    assert out.shape == (1, 3, 2, 256, 256)
    assert np.abs(out[0].transpose(1, 0, 2, 3) - golden["w256_out"]).max() < 1e-5


def test_fused_batchnorm_gives_same_output(checkpoint_256, golden):
    model = fuse_batchnorm(weights.load_model(checkpoint_256, "wav2lip256", progress=False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        out = model(torch.from_numpy(golden["w256_mel"]), torch.from_numpy(golden["w256_face"])).numpy()
    assert np.abs(out - golden["w256_out"]).max() < 1e-5


# --------------------------------------------------------------------------------------------
# The checkpoint decides: variant detection from keys

def _shapes(name: str) -> dict:
    return {k: s for k, s, _ in _schema(name)}


def test_variant_from_the_spec_schemas():
    assert weights.generator_variant(_shapes("wav2lip256")) == "wav2lip256"
    assert weights.generator_variant(_shapes("wav2lip")) == "wav2lip"
    assert weights.GENERATOR_FACE_SIZE == {"wav2lip": 96, "wav2lip256": 256}


def test_variant_from_the_fingerprint_keys_alone():
    enc7 = "face_encoder_blocks.7.0.conv_block.0.weight"
    dec1 = "face_decoder_blocks.1.0.conv_block.0.weight"
    assert weights.generator_variant({enc7: (512, 512, 4, 4), dec1: (1024, 512, 4, 4)}) == "wav2lip256"
    assert weights.generator_variant({dec1: torch.zeros(1024, 512, 3, 3)}) == "wav2lip"
    for shapes in ({dec1: (1024, 512, 4, 4)},                                  # 4x4 decoder without encoder block 7
                   {enc7: (512, 512, 4, 4), dec1: (1024, 512, 3, 3)},          # mixed
                   {enc7: (512, 512, 3, 3), dec1: (1024, 512, 4, 4)},          # 3x3 encoder block 7
                   {"conv1.weight": (64, 3, 3, 3)}):                          # something else
        with pytest.raises(LipdubError, match="is not a Wav2Lip generator checkpoint"):
            weights.generator_variant(shapes)


def test_both_directions_through_the_loader(tmp_path, checkpoint_256, wav2lip_checkpoint):
    # kind "wav2lip" takes either; the model is built at the checkpoint's face size
    small = weights.load_model(wav2lip_checkpoint, "wav2lip", progress=False)
    assert small.face_size == 96 and len(small.face_encoder_blocks) == 7
    sd = weights.load_state_dict(checkpoint_256, "wav2lip")  # `module.` stripped, checked, in order
    assert list(sd) == [k for k, _, _ in _schema("wav2lip256")]
    assert weights.generator_variant(sd) == "wav2lip256"
    Wav2Lip(face_size=256).load_state_dict(sd)  # strict
    # the explicit variant kind refuses the other one, naming what the file is
    with pytest.raises(LipdubError, match=r"^wav2lip_rule_a.pth looks like a 96x96 Wav2Lip generator "
                                          r"checkpoint, not a Wav2Lip 256x256 generator$"):
        weights.load_state_dict(wav2lip_checkpoint, "wav2lip256")
    with pytest.raises(LipdubError, match=r"^wav2lipv2_rule_a.pth looks like a 256x256 Wav2Lip generator "
                                          r"checkpoint, not a SyncNet expert$"):
        weights.load_state_dict(checkpoint_256, "syncnet_color")
    # a 256 file with one wrong shape: the fingerprint picks the 256 layout, the full check finds the key
    bad = dict(sd)
    bad["output_block.1.weight"] = torch.zeros(3, 16, 1, 1)
    torch.save({"state_dict": bad}, tmp_path / "bad256.pth")
    with pytest.raises(LipdubError, match=r"^bad256.pth is not a Wav2Lip generator checkpoint: shape mismatch "
                                          r"for key output_block.1.weight: file \(3, 16, 1, 1\) vs expected "
                                          r"\(3, 32, 1, 1\)$"):
        weights.load_model(tmp_path / "bad256.pth", "wav2lip", progress=False)


def test_broken_fingerprint_is_reported_against_the_closer_layout(tmp_path, checkpoint_256):
    sd = weights.load_state_dict(checkpoint_256, "wav2lip")
    del sd["face_encoder_blocks.7.0.conv_block.0.weight"]
    torch.save({"state_dict": sd}, tmp_path / "cut256.pth")
    with pytest.raises(LipdubError, match=r"^cut256.pth is not a Wav2Lip generator checkpoint: missing 1 key "
                                          r"\(e.g. face_encoder_blocks.7.0.conv_block.0.weight\)$"):
        weights.load_state_dict(tmp_path / "cut256.pth", "wav2lip")


def test_tanh_output_is_invisible_in_the_state_dict():
    """Why a Tanh-output model with exactly the 96 or 256 layout cannot be refused from its keys:
    the output activation holds no tensors, so its state dict is the Sigmoid model's, key for key."""
    for size, name in ((96, "wav2lip"), (256, "wav2lip256")):
        with torch.device("meta"):
            model = Wav2Lip(face_size=size)
        model.output_block[2] = nn.Tanh()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == _shapes(name)
        assert weights.generator_variant(shapes) == name


# --------------------------------------------------------------------------------------------
# Refusals of other community variants: one line, saying what the file looks like

def _fake(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    base = {"face_encoder_blocks.0.0.conv_block.0.weight": (16, 6, 7, 7),
            "audio_encoder.0.conv_block.0.weight": (32, 1, 3, 3),
            "face_decoder_blocks.0.0.conv_block.0.weight": (512, 512, 1, 1),
            "output_block.1.weight": (3, 32, 1, 1)}
    return {k: torch.zeros(s) for k, s in {**base, **keys}.items()}


def _encoder_blocks(n: int) -> dict[str, tuple[int, ...]]:
    return {f"face_encoder_blocks.{i}.0.conv_block.0.weight": (8, 8, 3, 3) for i in range(1, n)}


REFUSALS = {
    "sam_384": ({"sam.sa.conv1.weight": (1, 2, 7, 7), "audio_refine.0.conv_block.0.weight": (1024, 1024, 1, 1),
                 **_encoder_blocks(9)},
                'looks like the "384" SAM Wav2Lip model (sam.* and audio_refine.* keys; Tanh output)'),
    "sam_only": ({"sam.sa.conv1.weight": (1, 2, 7, 7), **_encoder_blocks(8)},
                 'looks like the "384" SAM Wav2Lip model (sam.* keys; Tanh output)'),
    "refine_only": ({"audio_refine.1.conv_block.0.weight": (1024, 1024, 1, 1), **_encoder_blocks(9)},
                    'looks like the "384" SAM Wav2Lip model (audio_refine.* keys; Tanh output)'),
    "w288": ({**_encoder_blocks(9), "face_encoder_blocks.1.0.act.weight": (1,)},
             "looks like a 288x288 Wav2Lip generator (face_encoder_blocks.8.* keys: 9 face-encoder blocks)"),
    "w512": ({**_encoder_blocks(10), "output_block.2.weight": (3, 16, 1, 1)},
             "looks like a Wav2Lip generator with 10 face-encoder blocks (face_encoder_blocks.9.* keys"),
    "tanh_wide_audio": ({**_encoder_blocks(7), "audio_encoder.16.conv_block.0.weight": (1024, 1024, 1, 1)},
                        "looks like a Wav2Lip generator with a 1024-channel audio embedding "
                        "(audio_encoder.16.conv_block.0.weight; the Tanh-output"),
    "tanh_output_layers": ({**_encoder_blocks(7), "output_block.2.weight": (3, 16, 1, 1)},
                           "looks like a Wav2Lip generator with a three-layer output block (output_block.2.* keys"),
    "prelu": ({**_encoder_blocks(7), "face_encoder_blocks.1.0.act.weight": (1,)},
              "looks like a Wav2Lip generator with PReLU activations (1 *.act.weight keys)"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_unsupported_variants_are_refused_in_one_line(tmp_path, name, capsys):
    keys, expected = REFUSALS[name]
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in _fake(keys).items()}}, path)
    calls = [lambda: weights.load_state_dict(path, "wav2lip"), lambda: weights.load_state_dict(path, "wav2lip256"),
             lambda: weights.load_model(path, "wav2lip", progress=False), lambda: weights.verify(path),
             lambda: weights.cmd_verify(str(path)),
             lambda: weights.generator_variant(weights.strip_module_prefix(torch.load(path)["state_dict"]), path.name)]
    for call in calls:
        with pytest.raises(LipdubError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{name}.pth {expected}"), message
        assert message.endswith(SUPPORTED) and "\n" not in message, message
    assert capsys.readouterr().out == ""


def test_discriminator_layouts_are_not_called_generators(tmp_path):
    """A 288 quality discriminator also has face_encoder_blocks.8 but no audio encoder or decoder."""
    disc = {f"face_encoder_blocks.{i}.0.conv_block.0.weight": torch.zeros(8, 8, 3, 3) for i in range(9)}
    disc["binary_pred.0.weight"] = torch.zeros(1, 512, 1, 1)
    torch.save({"state_dict": disc}, tmp_path / "disc288.pth")
    with pytest.raises(LipdubError) as info:
        weights.load_state_dict(tmp_path / "disc288.pth", "wav2lip")
    assert str(info.value).startswith("disc288.pth is not a Wav2Lip generator checkpoint: missing")
    assert "288x288" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Registry and verify

def test_registry_entry():
    spec = weights.REGISTRY["wav2lip256"]
    assert spec.kind == "wav2lip256" and spec.file == "wav2lip256.pth"
    assert spec.urls == (
        "https://www.modelscope.cn/models/Kedreamix/Linly-Talker/resolve/master/checkpoints/wav2lipv2.pth",
        "https://huggingface.co/Kedreamix/Linly-Talker/resolve/main/checkpoints/wav2lipv2.pth",
    )
    assert spec.size is None and spec.sha256 is None  # nothing is published


def test_weights_list_says_structure_is_the_only_guard(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIPDUB_HOME", str(tmp_path))
    row = {r["name"]: r for r in weights.list_weights()}["wav2lip256"]
    assert row["size"] is None and row["sha256_known"] is False and "structural check" in row["note"]
    assert weights.cmd_list() == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("wav2lip256 "))
    assert "sha256 unknown" in lines[i] and lines[i].endswith("wav2lip256.pth")
    assert lines[i + 1].strip().startswith("note: no size or SHA-256 is published for this file: only the structural check")


def test_verify_names_the_variant(checkpoint_256, wav2lip_checkpoint, capsys):
    for kind in (None, "wav2lip", "wav2lip256"):
        info = weights.verify(checkpoint_256, kind=kind)
        assert (info["kind"], info["face_size"], info["registry_name"]) == ("wav2lip256", 256, None)
    info = weights.verify(wav2lip_checkpoint, kind="wav2lip")
    assert (info["kind"], info["face_size"]) == ("wav2lip", 96)
    assert weights.cmd_verify(str(checkpoint_256)) == 0
    out = capsys.readouterr().out
    assert "kind:     wav2lip256 (Wav2Lip 256x256 generator)\n" in out
    assert "variant:  256x256 faces (LiveTalking wav2lip256.pth / Linly-Talker wav2lipv2.pth)\n" in out
    assert weights.cmd_verify(str(wav2lip_checkpoint)) == 0
    out = capsys.readouterr().out
    assert "kind:     wav2lip (Wav2Lip generator)\n" in out and "variant:  96x96 faces (the original Wav2Lip" in out


# --------------------------------------------------------------------------------------------
# In the pipeline: the checkpoint's face size decides the crop and the paste

V3 = "v3_woman_glasses_524x524_25fps.mp4"
V4 = "v4_man_halfbody_hevc_1080x1920_25fps.mp4"
V3_BOX = (150, 450, 110, 410)  # TOP BOTTOM LEFT RIGHT


def test_box_mode_at_256_equals_the_original_loop(tmp_path, media, model_256):
    import av

    from lipdub import audio as audio_mod
    from lipdub.faces import fixed_track
    from lipdub.generate import Generator
    from lipdub.media import VideoSource, load_audio
    from lipdub.pipeline import render, source_order

    from .conftest import short_clip, short_speech
    from .test_pipeline import original_inference

    clip = short_clip(media / V3, tmp_path / "clip.mp4", 4)
    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    wav = load_audio(short_speech(tmp_path / "speech.wav", 0.32))  # 5 mel chunks
    mel = audio_mod.melspectrogram(wav)
    expected = original_inference(frames, wav, 25.0, V3_BOX, model_256, batch_size=4, size=256)
    source = VideoSource(clip)
    ticks = [pts for pts, _ in source.clock()]
    starts = audio_mod.chunk_starts(mel.shape[1], 25.0)
    order = list(source_order(len(starts), len(ticks), "loop", False))
    got = list(render(source, ticks, fixed_track(V3_BOX, len(ticks), 524, 524), mel, starts, order,
                      Generator(model_256, "fp32"), blend="box", batch_size=4))
    assert len(got) == len(expected) == 5
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(got, expected)) == 0
    y1, y2, x1, x2 = V3_BOX
    assert all(not np.array_equal(g[y1:y2, x1:x2], f[y1:y2, x1:x2]) for g, f in zip(got, frames))


def test_default_run_on_v4_with_a_256_checkpoint(tmp_path, media, checkpoint_256):
    """The default detector and feather blend with a 256 generator: the frame count follows the
    audio and the changed pixels stay in the lower half of the tracked face."""
    import av

    from lipdub import sync
    from lipdub.media import VideoSource

    from .conftest import short_speech

    out = tmp_path / "v4.mp4"
    result = sync(media / V4, short_speech(tmp_path / "speech.wav", 0.4), out, checkpoint=str(checkpoint_256),
                  silence="generate", progress=False)
    assert result.face_size == 256 and result.n_frames == 10
    with av.open(str(out)) as c:
        got = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    src = list(VideoSource(media / V4, max_frames=10).frames())
    assert len(got) == 10
    for a, b in zip(got, src):
        changed = np.abs(a.astype(int) - b).max(axis=2) > 24  # well above codec loss
        assert changed.sum() > 500, "the 256 mouth was pasted"
        # v4's face sits about 300-700 px down the 1920 px portrait frame, 350-750 px across: the
        # lower half of its box, padded, lies within rows 400-900 and columns 250-850 (a few
        # pixels elsewhere may pass the threshold by codec loss alone)
        face = np.zeros_like(changed)
        face[400:900, 250:850] = True
        assert changed[face].sum() >= 0.99 * changed.sum()
