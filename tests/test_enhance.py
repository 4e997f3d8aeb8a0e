"""Streaming face restoration (lipdub.enhance): the RestoreStage logic with a stand-in network,
then end to end on real media with rule-B GFPGAN weights saved in the released format.

GFPGAN takes seconds per face on a CPU, so the real network sees only a handful of faces here
(one shared stage; everything else uses a cheap stand-in or weight 0, which skips the network).
"""
from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pytest
import torch

from lipdub.cli import main
from lipdub.enhance import restore_video
from lipdub.errors import LipdubError
from lipdub.media import VideoSource, VideoWriter
from lipdub.restore import RestoreStage



V3 = "v3_woman_glasses_524x524_25fps.mp4"
P1 = "p1_astronaut_eileen_collins_512.png"
P2 = "p2_woman_frontal_closed_mouth_474.png"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
class Invert:
    """A stand-in restorer: returns the colour-inverted crops and records each call's size."""

    def __init__(self, size: int = 128, batch_size: int = 4, fail_after: int | None = None):
        self.size, self.batch_size, self.calls, self.fail_after = size, batch_size, [], fail_after

    def restore_crops(self, crops):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("network failed")
        self.calls.append(len(crops))
        return [255 - c for c in crops]


# GFPGAN's five-point FFHQ template for 512x512 crops (eyes, nose tip, mouth corners), as facexlib
# publishes it; written out here rather than taken from lipdub.restore.
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]])


def face_landmarks(scale=0.2, offset=(40.0, 20.0)):
    return (TEMPLATE * scale + np.asarray(offset)).astype(np.float32)


def crop_coords(landmarks, shape, upscale=1):
    """(x, y) in 512-template crop coordinates of every pixel of a frame of `shape`, through the
    similarity that OpenCV fits from the (upscaled) landmarks to the template."""
    points = (np.asarray(landmarks, np.float64) + 0.5) * upscale - 0.5
    affine, _ = cv2.estimateAffinePartial2D(points, TEMPLATE, method=cv2.LMEDS)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    return affine[0, 0] * xs + affine[0, 1] * ys + affine[0, 2], affine[1, 0] * xs + affine[1, 1] * ys + affine[1, 2]


def zones(landmarks, region, shape, upscale=1):
    """(must stay, must change) boolean masks of a frame, from what each region is documented to
    cover, in template coordinates: "face" the aligned crop (whole inside its central 70 %);
    "mouth" below the nose line, within the mouth corners widened by 60 % of the mouth width
    (whole between the corners, 30 % of the nose-mouth distance around the mouth line)."""
    x, y = crop_coords(landmarks, shape, upscale)
    margin = 4.0  # template pixels: resampling at the edges
    (ml, my), (mr, _), nose_y = TEMPLATE[3], TEMPLATE[4], TEMPLATE[2, 1]
    if region == "face":
        outer = (x > -margin) & (x < 512 + margin) & (y > -margin) & (y < 512 + margin)
        inner = (x > 0.15 * 512) & (x < 0.85 * 512) & (y > 0.15 * 512) & (y < 0.85 * 512)
    else:
        width = mr - ml
        outer = (x > ml - 0.6 * width - margin) & (x < mr + 0.6 * width + margin) & (y > nose_y - margin)
        span = 0.3 * (my - nose_y)
        inner = (x > ml) & (x < mr) & (y > my - span) & (y < my + span)
    return ~outer, inner


def absdiff(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def decode(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    return frames


def has_audio(path):
    with av.open(str(path)) as c:
        return bool(c.streams.audio)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------
# RestoreStage with a stand-in network (exact checks, fast)
# ------------------------------------------------------------------------------------------
def test_region_face_changes_only_inside_mask_and_passes_other_frames(rng):
    frames = [rng.integers(0, 256, (160, 200, 3), dtype=np.uint8) for _ in range(4)]
    lm = face_landmarks()
    nan = np.full((5, 2), np.nan, np.float32)
    net = Invert()
    stage = RestoreStage.from_restorer(net, region="face")
    out = list(stage.process(frames, [lm, None, nan, lm]))
    assert len(out) == 4
    assert out[1] is frames[1] and out[2] is frames[2]  # no face: passed through untouched
    outside, inside = zones(lm, "face", frames[0].shape)
    for k in (0, 3):
        diff = absdiff(out[k], frames[k]).max(axis=2)
        assert out[k].shape == frames[k].shape and out[k].dtype == np.uint8
        assert np.all(diff[outside] == 0)  # outside the region: bit-identical
        assert inside.sum() > 2000
        assert np.mean(diff[inside] > 0) > 0.95  # inside: restored (here: inverted)
    assert sum(net.calls) == 2 and stage.stats["faces"] == 2 and stage.stats["frames_restored"] == 2
    assert all(f.flags.writeable for f in frames) and not np.shares_memory(out[0], frames[0])


def test_region_mouth_keeps_everything_above_the_nose(rng):
    frame = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    lm = face_landmarks()
    stage = RestoreStage.from_restorer(Invert(size=256), region="mouth")
    (out,) = stage.process([frame], [lm])
    diff = absdiff(out, frame).max(axis=2)
    nose_y = int(np.floor(lm[2, 1]))
    assert np.all(diff[: nose_y + 1] == 0)
    outside, inside = zones(lm, "mouth", frame.shape)
    assert np.all(diff[outside] == 0)  # upper face, cheeks beside the region: unchanged
    assert np.mean(diff[inside] > 0) > 0.95


def test_weight_blends_and_zero_is_identity(rng):
    frame = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    lm = face_landmarks()
    net = Invert()
    zero = RestoreStage.from_restorer(net, region="face", weight=0.0)
    (out0,) = zero.process([frame], [lm])
    assert np.array_equal(out0, frame) and net.calls == []  # weight 0: the network never runs
    (full,) = RestoreStage.from_restorer(Invert(), region="face", weight=1.0).process([frame], [lm])
    (half,) = RestoreStage.from_restorer(Invert(), region="face", weight=0.5).process([frame], [lm])
    _, inside = zones(lm, "face", frame.shape)
    expect = (frame.astype(np.float32) + full.astype(np.float32)) / 2
    assert np.abs(half.astype(np.float32) - expect)[inside].max() <= 1.0
    assert absdiff(half, frame)[inside].mean() > 20 and absdiff(half, full)[inside].mean() > 20
    # per-frame factors (e.g. a track's fade alpha) multiply into the weight
    (faded,) = RestoreStage.from_restorer(Invert(), region="face").process([frame], [lm], weights=[0.5])
    assert np.array_equal(faded, half)


@pytest.mark.parametrize("upscale", [2, 4])
def test_upscale_resizes_every_frame_and_moves_the_face_with_it(rng, upscale):
    frame = rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)
    lm = face_landmarks(0.12, (25.0, 10.0))
    stage = RestoreStage.from_restorer(Invert(), region="face", upscale=upscale)
    out_face, out_none = stage.process([frame, frame], [lm, None])
    big = cv2.resize(frame, (120 * upscale, 96 * upscale), interpolation=cv2.INTER_CUBIC)
    assert out_face.shape == out_none.shape == (96 * upscale, 120 * upscale, 3)
    assert np.array_equal(out_none, big)
    outside, inside = zones(lm, "face", big.shape, upscale)
    diff = absdiff(out_face, big).max(axis=2)
    assert np.all(diff[outside] == 0)
    assert np.mean(diff[inside] > 0) > 0.95
    # the changed area is the unscaled one, scaled: the landmarks were scaled with the frame
    (small,) = RestoreStage.from_restorer(Invert(), region="face").process([frame], [lm])
    changed_small = (absdiff(small, frame).max(axis=2) > 0).astype(np.uint8)
    grown = cv2.resize(changed_small, (120 * upscale, 96 * upscale), interpolation=cv2.INTER_NEAREST) > 0
    changed = diff > 0
    assert (grown & changed).sum() / (grown | changed).sum() > 0.85


def test_faces_are_batched_across_frames_in_order_with_bounded_lookahead(rng):
    n = 11
    frames = [np.full((120, 160, 3), 10 * k, np.uint8) for k in range(n)]
    lm = face_landmarks(0.15, (30.0, 10.0))
    marks = [None if k in (1, 5, 6) else lm for k in range(n)]  # 8 faces
    net = Invert(batch_size=3)
    stage = RestoreStage.from_restorer(net, region="face")
    pulled = []

    def source():
        for k, f in enumerate(frames):
            pulled.append(k)
            yield f

    outputs = stage.process(source(), marks)
    first = next(outputs)
    assert len(pulled) <= stage.max_pending  # lazy: it does not read the whole stream first
    out = [first] + list(outputs)
    assert len(out) == n
    assert net.calls == [3, 3, 2]  # faces from consecutive frames share network calls
    for k in range(n):  # order kept: the corner pixel still carries the frame's own value
        assert out[k][0, 0, 0] == 10 * k
        assert (out[k] != frames[k]).any() == (marks[k] is not None)


def test_several_faces_per_frame(rng):
    frame = rng.integers(0, 256, (160, 320, 3), dtype=np.uint8)
    a, b = face_landmarks(0.2, (20.0, 20.0)), face_landmarks(0.2, (180.0, 20.0))
    net = Invert()
    (out,) = RestoreStage.from_restorer(net, region="face").process([frame], [np.stack([a, b])])
    assert net.calls == [2]
    diff = absdiff(out, frame).max(axis=2)
    for lm in (a, b):
        assert np.mean(diff[zones(lm, "face", frame.shape)[1]] > 0) > 0.95


def test_process_input_errors(rng):
    stage = RestoreStage.from_restorer(Invert())
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="landmarks ended"):
        list(stage.process([frame, frame], [None]))
    with pytest.raises(ValueError, match="uint8"):
        list(stage.process([frame.astype(np.float32)], [None]))
    with pytest.raises(ValueError, match="landmarks for frame 0"):
        list(stage.process([frame], [np.zeros((4, 2))]))


@pytest.mark.parametrize("kwargs, message", [
    ({"region": "eyes"}, "region"), ({"weight": 1.5}, "weight"), ({"weight": -0.1}, "weight"),
    ({"weight": float("nan")}, "weight"), ({"upscale": 3}, "upscale"),
])
def test_stage_option_errors(kwargs, message):
    with pytest.raises(LipdubError, match=message):
        RestoreStage.from_restorer(Invert(), **kwargs)


# ------------------------------------------------------------------------------------------
# Real GFPGAN network with rule-B weights in the released checkpoint format
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_stage(gfpgan_checkpoint):
    # fp32: these tests compare loaded weights and pixels with the rule-B values; the default
    # precision is bf16 on CPUs with AVX-512 BF16 (bf16 restore has its own tests).
    return RestoreStage(str(gfpgan_checkpoint), device="cpu", region="face", progress=False, precision="fp32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory, media):
    """3 frames of v3 (a face) then 2 flat grey frames (no face), with v3's audio."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    source = VideoSource(media / V3)
    frames = [f for _, f in zip(range(3), (f for _, f in source.clock()))]
    frames += [np.full_like(frames[0], 128)] * 2
    with VideoWriter(path, 524, 524, source.info.fps, audio_path=media / V3, crf=12) as writer:
        for f in frames:
            writer.write(f)
    return path


def test_checkpoint_params_fallback_and_bare(tmp_path, rule_b_gfpgan, face_stage):
    key = "conv_body_first.weight"
    assert torch.equal(face_stage.restorer.net.state_dict()[key], rule_b_gfpgan[key])
    path = tmp_path / "params_only.pth"
    torch.save({"params": rule_b_gfpgan}, path)
    stage = RestoreStage(path, device="cpu", progress=False, precision="fp32")
    assert torch.equal(stage.restorer.net.state_dict()[key], rule_b_gfpgan[key])
    assert stage.region == "mouth" and stage.checkpoint == path


def test_image_face_region(tmp_path, media, face_stage):
    out = tmp_path / "p1.png"
    result = restore_video(media / P1, out, stage=face_stage, progress=False)
    assert result.is_image and result.faces_restored == 1 and result.frames_restored == 1
    src, dst = cv2.imread(str(media / P1)), cv2.imread(str(out))
    assert dst.shape == src.shape
    diff = absdiff(dst, src).max(axis=2)
    outside, inside = zones(result.landmarks[0], "face", src.shape)
    assert np.all(diff[outside] == 0)  # PNG is lossless: bit-identical outside the region
    assert absdiff(dst, src)[inside].mean() > 20  # rule-B weights change the face a lot
    face = result.landmarks[0]
    assert 150 < face[:, 0].mean() < 300 and 50 < face[:, 1].mean() < 200  # Eileen Collins' face


def test_image_mouth_region_upscaled(tmp_path, media, face_stage):
    stage = RestoreStage.from_restorer(face_stage.restorer, region="mouth", upscale=2)
    out = tmp_path / "p2.png"
    result = restore_video(media / P2, out, stage=stage, progress=False)
    src, dst = cv2.imread(str(media / P2)), cv2.imread(str(out))
    assert (result.width, result.height) == (948, 948) and dst.shape == (948, 948, 3)
    big = cv2.resize(src, (948, 948), interpolation=cv2.INTER_CUBIC)
    diff = absdiff(dst, big).max(axis=2)
    outside, inside = zones(result.landmarks[0], "mouth", big.shape, upscale=2)
    assert np.all(diff[outside] == 0)
    # every changed pixel lies below the nose line of the aligned face (the face may be tilted)
    _, crop_y = crop_coords(result.landmarks[0], big.shape, upscale=2)
    assert (diff > 0).sum() > 1000 and crop_y[diff > 0].min() > TEMPLATE[2, 1] - 4
    assert absdiff(dst, big)[inside].mean() > 20


def test_weight_zero_image_to_jpeg_is_identity(tmp_path, media, face_stage):
    stage = RestoreStage.from_restorer(face_stage.restorer, region="face", weight=0.0)
    out = tmp_path / "p2.jpg"
    result = restore_video(media / P2, out, stage=stage, progress=False)
    assert result.faces_restored == 0 and result.frames_with_face == 1
    src, dst = cv2.imread(str(media / P2)), cv2.imread(str(out))
    assert dst.shape == src.shape
    assert absdiff(dst, src).mean() < 2.0  # JPEG loss only


def test_video_restore_end_to_end(tmp_path, clip, face_stage):
    out = tmp_path / "restored.mp4"
    result = restore_video(clip, out, stage=face_stage, progress=False)
    assert result.n_frames == 5 and result.frames_with_face == 3 and result.faces_restored == 3
    assert result.has_audio and has_audio(out)
    assert np.isfinite(result.landmarks[:3]).all() and np.isnan(result.landmarks[3:]).all()
    src, dst = decode(clip), decode(out)
    assert len(dst) == len(src) == 5 and dst[0].shape == src[0].shape == (524, 524, 3)
    inside_change = []
    for k in range(3):
        outside, inside = zones(result.landmarks[k], "face", src[k].shape)
        diff = absdiff(dst[k], src[k])
        outside = cv2.erode(outside.astype(np.uint8), np.ones((25, 25), np.uint8)) > 0  # 12 px from the region
        assert outside.mean() > 0.2
        assert diff[outside].mean() < 3 and np.percentile(diff[outside], 99.9) <= 16  # codec loss only (~2 here)
        inside_change.append(diff[inside].mean())
    # the restoration fades out over the frames before the no-face gap (weights 0.75, 0.5, 0.25)
    assert inside_change[0] > 20 and inside_change[2] > 5
    assert inside_change[0] > inside_change[1] > inside_change[2]
    for k in (3, 4):  # no face: unchanged up to codec loss (the bgr24<->yuv420p round trip
        assert absdiff(dst[k], src[k]).max() <= 6  # alone moves flat grey 128 by up to 5 levels)
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 25


def test_cli_video_weight_zero_upscaled(tmp_path, clip, gfpgan_checkpoint, capsys):
    out = tmp_path / "up.mp4"
    rc = main(["restore", str(clip), "-o", str(out), "--checkpoint", str(gfpgan_checkpoint), "--weight", "0",
               "--upscale", "2", "--device", "cpu", "--quiet", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_frames"] == 5 and summary["faces_restored"] == 0 and summary["frames_with_face"] == 3
    src, dst = decode(clip), decode(out)
    assert len(dst) == 5 and dst[0].shape == (1048, 1048, 3) and has_audio(out)
    for s, d in zip(src, dst):
        big = cv2.resize(s, (1048, 1048), interpolation=cv2.INTER_CUBIC)
        assert absdiff(d, big).mean() < 3  # codec round trip only (~2 levels)


def _cli_error(args, capsys):
    rc = main(["restore", *map(str, args), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("lipdub: error:") and "\n" not in err
    return err


def test_cli_errors_leave_no_output(tmp_path, media, clip, gfpgan_checkpoint, capsys):
    out = tmp_path / "out.mp4"
    assert "not found" in _cli_error([tmp_path / "missing.mp4", "-o", out], capsys)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(gfpgan_checkpoint.read_bytes()[: 1 << 20])
    assert "corrupt" in _cli_error([clip, "-o", out, "--checkpoint", corrupt], capsys)
    other = tmp_path / "other.pth"
    torch.save({"params_ema": {"weight": torch.zeros(3)}}, other)
    assert "not a GFPGAN" in _cli_error([clip, "-o", out, "--checkpoint", other], capsys)
    assert "not found" in _cli_error([clip, "-o", out, "--checkpoint", tmp_path / "nope.pth"], capsys)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    assert "not a recognised media file" in _cli_error([text, "-o", out, "--checkpoint", gfpgan_checkpoint], capsys)
    assert ".mp4" in _cli_error([clip, "-o", tmp_path / "out.png"], capsys)
    assert "image" in _cli_error([media / P2, "-o", out], capsys)
    assert "weight" in _cli_error([clip, "-o", out, "--weight", "1.5"], capsys)
    assert "folder" in _cli_error([clip, "-o", tmp_path / "no" / "out.mp4"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pth", "notes.mp4", "other.pth"]


def test_failure_midway_leaves_nothing(tmp_path, clip):
    stage = RestoreStage.from_restorer(Invert(size=128, batch_size=1, fail_after=1), region="face")
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="network failed"):
        restore_video(clip, out, stage=stage, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_video_first_second_of_v3_upscaled(tmp_path, media, face_stage):
    stage = RestoreStage.from_restorer(face_stage.restorer, region="face", upscale=2)
    out = tmp_path / "v3.mp4"
    result = restore_video(media / V3, out, stage=stage, max_frames=25, progress=False)
    assert result.n_frames == 25 and result.faces_restored == 25 and not result.has_audio
    dst = decode(out)
    assert len(dst) == 25 and dst[0].shape == (1048, 1048, 3)
    src = [f for _, f in zip(range(25), (f for _, f in VideoSource(media / V3).clock()))]
    for k in (0, 12, 24):
        big = cv2.resize(src[k], (1048, 1048), interpolation=cv2.INTER_CUBIC)
        outside, inside = zones(result.landmarks[k], "face", big.shape, upscale=2)
        diff = absdiff(dst[k], big)
        assert diff[cv2.erode(outside.astype(np.uint8), np.ones((33, 33), np.uint8)) > 0].mean() < 3
        assert diff[inside].mean() > 20
