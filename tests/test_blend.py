"""Pasting the generated face back: the original hard paste bit for bit, and the feathered paste's
promises (only the lower face changes, alpha, colour continuity), on a real portrait."""
import cv2
import numpy as np
import pytest

from lipdub.blend import lower_face_mask, paste_box, paste_feather, to_uint8_truncated

# p2's face as CenterFace finds it (153, 56, 307, 260), padded 10 px at the bottom as the default pads do
P2_BOX = np.array([153, 56, 307, 270])


@pytest.fixture(scope="module")
def portrait(media):
    image = cv2.imread(str(media / "p2_woman_frontal_closed_mouth_474.png"), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (474, 474, 3)
    return image


def crop96(frame, box):
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (96, 96)).astype(np.float32) / 255.0


def original_paste(frame, box, pred):
    """Wav2Lip inference.py, written out: p = pred * 255 (float32), p.astype(np.uint8), cv2.resize to
    (x2 - x1, y2 - y1), assigned into f[y1:y2, x1:x2]."""
    x1, y1, x2, y2 = (int(v) for v in box)
    p = pred * 255.0
    p = cv2.resize(p.astype(np.uint8), (x2 - x1, y2 - y1))
    out = frame.copy()
    out[y1:y2, x1:x2] = p
    return out


# ------------------------------------------------------------------------------------ paste_box


@pytest.mark.parametrize("box", [P2_BOX, np.array([150, 60, 247, 191]), np.array([0, 0, 96, 96]), np.array([401, 350, 474, 474])])
def test_paste_box_equals_original(portrait, box):
    rng = np.random.default_rng(int(box.sum()))
    # a real face with generator-like noise, in (0, 1) like the sigmoid output
    pred = np.clip(crop96(portrait, P2_BOX) + rng.normal(0, 0.05, (96, 96, 3)), 0.001, 0.999).astype(np.float32)
    frame = portrait.copy()
    paste_box(frame, box, pred)
    np.testing.assert_array_equal(frame, original_paste(portrait, box, pred))
    x1, y1, x2, y2 = box
    outside = np.ones(frame.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(frame[outside], portrait[outside])


def test_paste_box_truncates_instead_of_rounding(portrait):
    # 0.9999 * 255 = 254.97: the original's cast gives 254, rounding would give 255
    pred = np.full((96, 96, 3), 0.9999, np.float32)
    pred[:, :, 1] = 100.7 / 255  # 100.7 -> 100
    frame = portrait.copy()
    paste_box(frame, P2_BOX, pred)
    x1, y1, x2, y2 = P2_BOX
    assert (frame[y1:y2, x1:x2, 0] == 254).all() and (frame[y1:y2, x1:x2, 2] == 254).all()
    assert (frame[y1:y2, x1:x2, 1] == 100).all()
    assert (to_uint8_truncated(np.array([0.0, 0.5, 0.99999, 1.0], np.float32)) == [0, 127, 254, 255]).all()


# --------------------------------------------------------------------------------- paste_feather


def generated_face(portrait, cast=(0.0, 0.0, 0.0), mouth_shift=0.0):
    """A stand-in for the generator: the real face, with a colour cast and a changed mouth region."""
    pred = crop96(portrait, P2_BOX)
    pred = pred + np.array(cast, np.float32) / 255.0
    pred[62:82, 30:66] += mouth_shift / 255.0  # the mouth of a 96x96 Wav2Lip crop
    return np.clip(pred, 0, 1).astype(np.float32)


def test_feather_touches_only_the_lower_face_inside_the_box(portrait):
    frame = portrait.copy()
    pred = generated_face(portrait, mouth_shift=-80)
    paste_feather(frame, P2_BOX, pred)
    changed = np.any(frame != portrait, axis=2)
    x1, y1, x2, y2 = P2_BOX
    w, h = x2 - x1, y2 - y1
    inside = np.zeros_like(changed)
    inside[y1:y2, x1:x2] = True
    assert changed.any()
    assert not changed[~inside].any()  # every pixel outside the box is exactly equal
    box_changed = changed[y1:y2, x1:x2]
    assert not box_changed[: h // 3].any()  # the eyes and above are never touched
    # the box border stays and the lower corners hardly move (an ellipse fading out before the edges)
    assert not box_changed[:, 0].any() and not box_changed[:, -1].any() and not box_changed[-1].any()
    delta = np.abs(frame[y1:y2, x1:x2].astype(int) - portrait[y1:y2, x1:x2])
    ch, cw = h // 8, w // 8
    assert delta[-ch:, :cw].max() <= 3 and delta[-ch:, -cw:].max() <= 3
    # and what changed lies where the lower-face mask is non-zero
    mask = lower_face_mask(w, h)
    assert mask.shape == (h, w)
    assert not box_changed[mask == 0].any()
    # the mouth really took the generated (darker) mouth
    my, mx = y1 + int(0.72 * h), x1 + w // 2
    before = portrait[my - 5 : my + 5, mx - 10 : mx + 10].astype(float).mean()
    after = frame[my - 5 : my + 5, mx - 10 : mx + 10].astype(float).mean()
    assert after < before - 30


def test_feather_alpha(portrait):
    pred = generated_face(portrait, mouth_shift=-80)
    frame = portrait.copy()
    paste_feather(frame, P2_BOX, pred, alpha=0.0)
    np.testing.assert_array_equal(frame, portrait)

    full, half = portrait.copy(), portrait.copy()
    paste_feather(full, P2_BOX, pred, alpha=1.0)
    paste_feather(half, P2_BOX, pred, alpha=0.5)
    d_full = full.astype(float) - portrait
    d_half = half.astype(float) - portrait
    strong = np.abs(d_full) > 20
    assert strong.sum() > 500
    # half strength moves each strongly changed value half as far (up to rounding)
    np.testing.assert_allclose(d_half[strong], d_full[strong] / 2, atol=1.01)
    assert np.array_equal(np.any(half != portrait, axis=2) & ~np.any(full != portrait, axis=2), np.zeros(portrait.shape[:2], bool))


def test_feather_identity_prediction_changes_little(portrait):
    """Pasting the face's own (96x96-resampled) picture back only blurs it a little."""
    frame = portrait.copy()
    paste_feather(frame, P2_BOX, generated_face(portrait))
    x1, y1, x2, y2 = P2_BOX
    diff = np.abs(frame[y1:y2, x1:x2].astype(float) - portrait[y1:y2, x1:x2])
    assert diff.mean() < 2.5


# p2's skin is bright in red (99th percentile 255): casts that would clip are avoided
@pytest.mark.parametrize("cast", [(40, 0, 0), (0, -35, -25), (-30, -30, -30), (-20, 10, -40)])
def test_feather_colour_shift_keeps_skin_tone(portrait, cast):
    """A generator output with a colour cast: near the seam the result keeps the frame's skin
    colour (a plain alpha blend would carry the cast into it)."""
    x1, y1, x2, y2 = P2_BOX
    w, h = x2 - x1, y2 - y1
    mask = lower_face_mask(w, h)
    ring = (mask > 0.02) & (mask < 0.5)
    pred = generated_face(portrait, cast=cast, mouth_shift=-60)

    frame = portrait.copy()
    paste_feather(frame, P2_BOX, pred)
    original_ring = portrait[y1:y2, x1:x2][ring].astype(float).mean(axis=0)
    result_ring = frame[y1:y2, x1:x2][ring].astype(float).mean(axis=0)
    np.testing.assert_allclose(result_ring, original_ring, atol=2.0)

    # an unshifted blend with the same mask, for contrast: it does carry the cast
    generated = cv2.resize(pred * 255.0, (w, h))
    naive = portrait[y1:y2, x1:x2] + mask[:, :, None] * (generated - portrait[y1:y2, x1:x2])
    naive_ring = naive[ring].mean(axis=0)
    assert np.abs(naive_ring - original_ring).max() > 4
    # inside, away from the mouth, the cast is gone too
    cheek = frame[y1 + int(0.55 * h) : y1 + int(0.62 * h), x1 + int(0.3 * w) : x1 + int(0.7 * w)]
    cheek0 = portrait[y1 + int(0.55 * h) : y1 + int(0.62 * h), x1 + int(0.3 * w) : x1 + int(0.7 * w)]
    assert np.abs(cheek.astype(float).mean(axis=(0, 1)) - cheek0.mean(axis=(0, 1))).max() < 4


def test_lower_face_mask_shape_and_range():
    for w, h in [(154, 214), (96, 96), (31, 47)]:
        m = lower_face_mask(w, h)
        assert m.shape == (h, w) and m.dtype == np.float32
        assert m.min() >= 0 and m.max() <= 1
        assert m[: h // 3].max() == 0 and m[-1].max() < 0.05 and m[:, 0].max() < 0.05 and m[:, -1].max() < 0.05
        assert m[int(0.72 * h), w // 2] > 0.9  # full strength at the mouth
        # left-right symmetric about the box centre (up to the ellipse rasterisation)
        np.testing.assert_allclose(m, m[:, ::-1], atol=0.06)
        cols = (m.sum(axis=0) * np.arange(w)).sum() / m.sum()
        assert abs(cols - (w - 1) / 2) <= 0.25
