"""Face detectors: S3FD conformance with the goldens, decoding math, and CenterFace on real media."""
import json
import math

import av
import cv2
import numpy as np
import pytest
import torch

from lipdub.errors import LipdubError
from lipdub.faces import s3fd as s3fd_det
from lipdub.faces import Detector, Face, load_detector, nms
from lipdub.models.s3fd import S3FD

from .conftest import MEDIA, SPECS

# ------------------------------------------------------------------------------------ S3FD


@pytest.fixture(scope="module")
def s3fd_sd(rule_a):
    return {k: torch.from_numpy(v) for k, v in rule_a.rule_a("s3fd").items()}


def test_s3fd_state_dict_layout_matches_original():
    schema = json.loads((SPECS / "s3fd_state_dict.json").read_text())
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in S3FD().state_dict().items()]
    assert ours == schema
    assert sum(p.numel() for p in S3FD().parameters()) == 22_459_110


def test_s3fd_matches_golden(s3fd_sd):
    golden = np.load(SPECS / "golden_wav2lip_public.npz")
    model = S3FD().eval()
    model.load_state_dict(s3fd_sd, strict=True)
    with torch.no_grad():
        outs = model(torch.from_numpy(golden["s3fd_in"]))
    keys = sorted(k for k in golden.files if k.startswith("s3fd_out"))
    assert len(keys) == len(outs) == 12
    for key, out in zip(keys, outs):
        ref = golden[key]
        assert out.shape == ref.shape, key
        err = np.abs(out.numpy() - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (key, err)


def _reference_decode(maps, variances=(0.1, 0.2)):
    """Cell-by-cell decode written from the S3FD description: softmax face probability, anchor
    of side 4*stride centred on the cell, centre offsets scaled by variance[0]*side, sizes by
    side*exp(variance[1]*d)."""
    batch = maps[0].shape[0]
    boxes = [[] for _ in range(batch)]
    scores = [[] for _ in range(batch)]
    for level in range(6):
        cls, reg = maps[2 * level].double().numpy(), maps[2 * level + 1].double().numpy()
        stride = 2 ** (level + 2)
        side = 4 * stride
        for b in range(batch):
            for r in range(cls.shape[2]):
                for c in range(cls.shape[3]):
                    bg, fg = cls[b, 0, r, c], cls[b, 1, r, c]
                    p = math.exp(fg) / (math.exp(fg) + math.exp(bg))
                    ax, ay = c * stride + stride / 2, r * stride + stride / 2
                    dx, dy, dw, dh = reg[b, :, r, c]
                    cx = ax + dx * variances[0] * side
                    cy = ay + dy * variances[0] * side
                    w = side * math.exp(dw * variances[1])
                    h = side * math.exp(dh * variances[1])
                    boxes[b].append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                    scores[b].append(p)
    return np.array(boxes), np.array(scores)


def test_s3fd_vectorised_decode_equals_loop_reference():
    gen = torch.Generator().manual_seed(3)
    # map sizes of a 96x160 input: 24x40, 12x20, 6x10, 7x9 (fc6 pads by 3), 4x5, 2x3
    sizes = [(24, 40), (12, 20), (6, 10), (7, 9), (4, 5), (2, 3)]
    maps = []
    for h, w in sizes:
        maps.append(torch.randn(2, 2, h, w, generator=gen) * 3)
        maps.append(torch.randn(2, 4, h, w, generator=gen))
    boxes, scores = s3fd_det.decode(maps)
    ref_boxes, ref_scores = _reference_decode(maps)
    assert boxes.shape == ref_boxes.shape and scores.shape == ref_scores.shape
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-6)


def _reference_nms(boxes, scores, thresh, offset):
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
            inter = iw * ih
            union = (a[2] - a[0] + offset) * (a[3] - a[1] + offset) + (b[2] - b[0] + offset) * (b[3] - b[1] + offset) - inter
            if inter / union > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_nms_equals_loop_reference(offset):
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 200, (150, 2))
    wh = rng.uniform(10, 80, (150, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.permutation(150) / 150.0  # distinct scores
    assert nms(boxes, scores, 0.3, area_offset=offset).tolist() == _reference_nms(boxes, scores, 0.3, offset)
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.3).tolist() == []


def test_s3fd_detector_runs_and_loads_files(s3fd_sd, tmp_path):
    # bare state dict (released s3fd.pth format) and a wrapped, `module.`-prefixed one
    bare = tmp_path / "s3fd.pth"
    torch.save(s3fd_sd, bare)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in s3fd_sd.items()}}, wrapped)
    det = load_detector("s3fd", weights=bare, max_side=96, batch_size=2)
    assert isinstance(det, Detector) and det.name == "s3fd"
    assert det.net.conv1_1.weight.device.type == "cpu"
    load_detector("s3fd", weights=wrapped)
    frames = [np.full((120, 90, 3), 128, np.uint8), np.random.default_rng(0).integers(0, 255, (40, 200, 3), dtype=np.uint8)]  # 19x96 after resize: padded
    out = det.detect(frames)
    assert len(out) == 2
    for frame, faces in zip(frames, out):
        h, w = frame.shape[:2]
        assert faces, "rule-A S3FD weights fire on both frames (tens of boxes above 0.5)"
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
        for f in faces:
            assert f.landmarks is None and f.score > 0.5
            x1, y1, x2, y2 = f.box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_s3fd_detector_boxes_scaled_to_frame(s3fd_sd, monkeypatch):
    """A synthetic network output with one confident anchor decodes to the right frame-pixel box."""
    det = s3fd_det.S3FDDetector(weights=s3fd_sd, max_side=100)

    def fake_net(x):
        b, _, h, w = x.shape
        maps = []
        for level in range(6):
            s = 2 ** (level + 2)
            cls = torch.zeros(b, 2, max(1, h // s), max(1, w // s))
            cls[:, 0] = 5.0  # background everywhere
            maps += [cls, torch.zeros(b, 4, *cls.shape[2:])]
        maps[2][:, :, 3, 5] = torch.tensor([-5.0, 5.0])  # stride-8 head, row 3, col 5 -> anchor 32x32 at (44, 28)
        return maps

    monkeypatch.setattr(det, "net", fake_net)
    frame = np.zeros((100, 200, 3), np.uint8)  # scaled by 0.5 to 100x50
    (faces,) = det.detect([frame])
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, (56.0, 24.0, 120.0, 88.0), atol=1e-4)


def test_load_detector_errors(tmp_path):
    with pytest.raises(LipdubError):
        load_detector("retinaface")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LipdubError):
        load_detector("s3fd", weights=junk)
    with pytest.raises(LipdubError):
        load_detector("s3fd", weights=tmp_path / "missing.pth")
    with pytest.raises(LipdubError):
        load_detector("centerface", weights=junk)
    with pytest.raises(LipdubError):
        load_detector("centerface", weights=tmp_path / "missing.onnx")


# ------------------------------------------------------------------------------- CenterFace


@pytest.fixture(scope="module")
def centerface():
    return load_detector("centerface")


def _video_frames(name, pick):
    """Decoded BGR frames of a media video whose index / time satisfies pick(index, seconds)."""
    out = []
    with av.open(str(MEDIA / name)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if pick(i, float(frame.time)):
                out.append(frame.to_ndarray(format="bgr24"))
    return out


def _sane(faces, h, w):
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for f in faces:
        x1, y1, x2, y2 = f.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert 0.5 < f.score <= 1.0
        assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32


def _check_landmarks(face, slack=0.05):
    x1, y1, x2, y2 = face.box
    sx, sy = slack * (x2 - x1), slack * (y2 - y1)
    lm = face.landmarks
    assert np.all((lm[:, 0] >= x1 - sx) & (lm[:, 0] <= x2 + sx) & (lm[:, 1] >= y1 - sy) & (lm[:, 1] <= y2 + sy))
    left_eye, right_eye, nose, left_mouth, right_mouth = lm
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


def test_centerface_v3_one_face_every_frame(centerface):
    frames = _video_frames("v3_woman_glasses_524x524_25fps.mp4", lambda i, t: i % 10 == 0)
    assert len(frames) == 13
    results = centerface.detect(frames)
    for frame, faces in zip(frames, results):
        h, w = frame.shape[:2]
        _sane(faces, h, w)
        assert len(faces) == 1
        face = faces[0]
        cx, cy = face.center
        assert 0.3 * w < cx < 0.7 * w and 0.3 * h < cy < 0.75 * h
        assert 0.35 * w < face.width < 0.8 * w and 0.4 * h < face.height < 0.9 * h
        _check_landmarks(face)
    # a batched run (dynamic batch dimension) gives the same answer as frame by frame
    batched = load_detector("centerface", batch_size=4)
    assert batched.dynamic_batch and batched.batch_size == 4
    for a, b in zip(batched.detect(frames[:5]), results[:5]):
        assert len(a) == len(b) == 1
        np.testing.assert_allclose(a[0].box, b[0].box, atol=1e-2)
        np.testing.assert_allclose(a[0].landmarks, b[0].landmarks, atol=1e-2)


def test_centerface_photos(centerface, media):
    p3 = cv2.imread(str(media / "p3_two_people_1126x661.jpg"))
    faces = centerface.detect([p3])[0]
    _sane(faces, *p3.shape[:2])
    assert len(faces) == 2
    centres = sorted(f.center[0] for f in faces)
    assert centres[0] < p3.shape[1] / 2 < centres[1]
    for f in faces:
        _check_landmarks(f)

    p2 = cv2.imread(str(media / "p2_woman_frontal_closed_mouth_474.png"))
    faces = centerface.detect(p2)[0]  # a single array is accepted too
    _sane(faces, *p2.shape[:2])
    assert len(faces) >= 1
    cx, cy = faces[0].center
    assert 0.3 * 474 < cx < 0.7 * 474 and 0.2 * 474 < cy < 0.6 * 474
    _check_landmarks(faces[0])


def test_centerface_v5_shots(centerface):
    targets = [1.0, 5.0, 9.0]

    def pick(i, t):  # the first frame at or after each target time
        if targets and t >= targets[0]:
            targets.pop(0)
            return True
        return False

    frames = _video_frames("v5_multiface_cuts_640x360_29.97fps.mp4", pick)
    assert len(frames) == 3  # wide shot, performer medium shot, audience
    results = centerface.detect(frames)
    for frame, faces in zip(frames, results):
        _sane(faces, *frame.shape[:2])
    assert len(results[1]) >= 1
    assert len(results[2]) >= 2


def test_centerface_blank_frames(centerface):
    frames = [np.full((360, 640, 3), 128, np.uint8), np.zeros((100, 50, 3), np.uint8)]
    assert centerface.detect(frames) == [[], []]
    assert centerface.detect([]) == []


def test_face_value_semantics():
    a = Face((1, 2, 3, 4), 0.9, np.zeros((5, 2)))
    b = Face((1.0, 2.0, 3.0, 4.0), 0.9, np.zeros(10))
    assert a == b and hash(a) == hash(b) and a.landmarks.dtype == np.float32
    assert a != Face((1, 2, 3, 4), 0.9, None)
    with pytest.raises(AttributeError):
        a.score = 1.0
