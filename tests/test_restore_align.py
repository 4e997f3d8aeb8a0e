"""Face alignment, paste-back masks and landmark smoothing of lipdub.restore (no network)."""
import cv2
import numpy as np
import pytest

from lipdub.restore import (
    FFHQ_TEMPLATE_512,
    align_face,
    estimate_affine,
    paste_back,
    region_mask,
    smooth_landmarks,
)

NOSE_Y = FFHQ_TEMPLATE_512[2, 1]


def _smooth_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0),
        128 + 90 * np.cos(xx / 41.0 + yy / 29.0),
        128 + 80 * np.sin((xx + yy) / 61.0),
    ], axis=-1)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _placed_face(scale, angle_deg, center):
    """Landmarks of the template rotated/scaled/moved into a frame, and the true frame->crop affine."""
    a = np.deg2rad(angle_deg)
    m = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    t = np.asarray(center, float) - m @ np.array([256.0, 256.0])
    landmarks = FFHQ_TEMPLATE_512 @ m.T + t
    to_frame = np.hstack([m, t[:, None]])
    return landmarks, cv2.invertAffineTransform(to_frame)


def _crop_coords(affine, h, w):
    """Crop-space (x, y) of every frame pixel centre."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx = affine[0, 0] * xx + affine[0, 1] * yy + affine[0, 2]
    cy = affine[1, 0] * xx + affine[1, 1] * yy + affine[1, 2]
    return cx, cy


def _frame_mask(region, affine, h, w):
    inv = cv2.invertAffineTransform(affine)
    return cv2.warpAffine(np.ascontiguousarray(region_mask(region)), inv, (w, h), flags=cv2.INTER_LINEAR)


CASES = {
    "shrink_rotated": ((480, 640), (0.45, 12.0, (330, 250))),   # face smaller than 512 in the frame
    "enlarge_rotated": ((820, 900), (1.3, -8.0, (450, 410))),   # face larger than 512
    "partly_outside": ((360, 480), (0.6, 5.0, (60, 320))),      # crop sticks out of the frame
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_affine_recovers_similarity(name):
    _, (scale, angle, center) = CASES[name]
    landmarks, true_affine = _placed_face(scale, angle, center)
    np.testing.assert_allclose(estimate_affine(landmarks), true_affine, atol=1e-9)
    np.testing.assert_allclose(estimate_affine(landmarks, method="lmeds"), true_affine, atol=1e-3)
    # with noise, the least-squares fit is the best similarity: no other similarity does better
    rng = np.random.default_rng(0)
    noisy = landmarks + rng.normal(0, 2.0, landmarks.shape)
    fit = estimate_affine(noisy)
    resid = lambda a: np.sum((noisy @ a[:, :2].T + a[:, 2] - FFHQ_TEMPLATE_512) ** 2)  # noqa: E731
    assert resid(fit) <= resid(true_affine)
    assert resid(fit) <= resid(estimate_affine(noisy, method="lmeds")) + 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_align_paste_roundtrip(name):
    (h, w), (scale, angle, center) = CASES[name]
    frame = _smooth_image(h, w)
    landmarks, _ = _placed_face(scale, angle, center)
    crop, affine = align_face(frame, landmarks)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    assert affine.shape == (2, 3)
    # the crop really is the face region: the template points land on the landmarks' pixels
    for (x, y), (fx, fy) in zip(FFHQ_TEMPLATE_512, landmarks):
        if 0 <= fx < w - 1 and 0 <= fy < h - 1:
            assert np.abs(crop[int(round(y)), int(round(x))].astype(int)
                          - frame[int(round(fy)), int(round(fx))]).max() <= 12

    out = paste_back(frame, crop, affine, region="face", weight=1.0)
    mask = _frame_mask("face", affine, h, w)
    outside, interior = mask == 0, mask >= 0.999
    assert outside.any() and interior.sum() > 1000
    assert np.array_equal(out[outside], frame[outside])
    err = np.abs(out.astype(int) - frame)[interior]
    assert err.max() <= 3 and err.mean() < 0.5

    # a different crop really lands inside the mask, and still nowhere outside it
    neg = 255 - crop
    out_neg = paste_back(frame, neg, affine, region="face", weight=1.0)
    assert np.array_equal(out_neg[outside], frame[outside])
    assert np.abs(out_neg.astype(int) - frame)[interior].mean() > 40


def test_mouth_region_leaves_upper_face_untouched():
    (h, w), (scale, angle, center) = CASES["shrink_rotated"]
    frame = _smooth_image(h, w)
    landmarks, _ = _placed_face(scale, angle, center)
    crop, affine = align_face(frame, landmarks)
    out = paste_back(frame, 255 - crop, affine, region="mouth", weight=1.0)
    changed = np.any(out != frame, axis=-1)
    cx, cy = _crop_coords(affine, h, w)
    in_crop = (cx >= 0) & (cx < 512) & (cy >= 0) & (cy < 512)
    above_nose = in_crop & (cy <= NOSE_Y)
    assert above_nose.sum() > 1000
    assert not changed[above_nose].any(), "mouth region must not touch anything above the nose line"
    assert not changed[~in_crop].any()
    # it does change the mouth area: the point between the mouth corners
    mouth = FFHQ_TEMPLATE_512[3:5].mean(axis=0) + [0.0, 10.0]
    near_mouth = (np.abs(cx - mouth[0]) < 30) & (np.abs(cy - mouth[1]) < 15)
    assert changed[near_mouth].all()
    # and stays between the extended mouth corners
    mouth_w = FFHQ_TEMPLATE_512[4, 0] - FFHQ_TEMPLATE_512[3, 0]
    sideways = in_crop & ((cx < FFHQ_TEMPLATE_512[3, 0] - mouth_w) | (cx > FFHQ_TEMPLATE_512[4, 0] + mouth_w))
    assert not changed[sideways].any()
    # the mask itself: exactly zero at and above the nose line, soft (not binary) edges
    m = region_mask("mouth")
    assert m[: int(np.floor(NOSE_Y)) + 2].max() == 0.0
    assert 0.0 < m.max() == 1.0
    assert np.sum((m > 0.05) & (m < 0.95)) > 500


def test_weight_blends_linearly():
    (h, w), (scale, angle, center) = CASES["shrink_rotated"]
    frame = _smooth_image(h, w)
    landmarks, _ = _placed_face(scale, angle, center)
    crop, affine = align_face(frame, landmarks)
    other = 255 - crop
    for region in ("face", "mouth"):
        assert np.array_equal(paste_back(frame, other, affine, region=region, weight=0.0), frame)
    full = paste_back(frame, other, affine, weight=1.0).astype(float)
    half = paste_back(frame, other, affine, weight=0.5).astype(float)
    interior = _frame_mask("face", affine, h, w) >= 0.999
    mid = (frame.astype(float) + full) / 2
    assert np.abs(half - mid)[interior].max() <= 1.0
    assert np.abs(half - frame)[interior].mean() > 20
    with pytest.raises(ValueError):
        paste_back(frame, other, affine, weight=1.5)
    with pytest.raises(ValueError):
        paste_back(frame, other, affine, region="eyes")


def test_paste_back_does_not_modify_input():
    (h, w), (scale, angle, center) = CASES["shrink_rotated"]
    frame = _smooth_image(h, w)
    before = frame.copy()
    landmarks, _ = _placed_face(scale, angle, center)
    crop, affine = align_face(frame, landmarks)
    paste_back(frame, 255 - crop, affine)
    assert np.array_equal(frame, before)


def test_smooth_landmarks_reduces_jitter():
    rng = np.random.default_rng(1)
    t = np.arange(120, dtype=float)[:, None, None]
    truth = FFHQ_TEMPLATE_512[None] * 0.4 + np.stack([1.5 * t[..., 0] + 100, 0.7 * t[..., 0] + 50], -1)
    assert truth.shape == (120, 5, 2)
    noisy = truth + rng.normal(0, 1.5, truth.shape)
    smooth = smooth_landmarks(noisy)
    assert smooth.shape == noisy.shape

    def rms(a):
        return float(np.sqrt(np.mean(a ** 2)))

    assert rms(smooth - truth) < 0.6 * rms(noisy - truth)
    # frame-to-frame shimmer: second differences (acceleration) of the track
    assert rms(np.diff(smooth, 2, axis=0)) < 0.35 * rms(np.diff(noisy, 2, axis=0))
    # constant-velocity motion passes through unchanged (no lag), ends included
    np.testing.assert_allclose(smooth_landmarks(truth), truth, atol=1e-9)
    # a still face stays still
    still = np.repeat(FFHQ_TEMPLATE_512[None], 7, axis=0)
    np.testing.assert_allclose(smooth_landmarks(still, radius=3), still, atol=1e-9)
    # degenerate lengths
    assert smooth_landmarks(noisy[:1]).shape == (1, 5, 2)
    assert smooth_landmarks(noisy[:0]).shape == (0, 5, 2)
