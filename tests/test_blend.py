"""Pasting the generated face back: the original hard paste bit for bit, and the feathered paste's
promises (only the lower face changes, alpha, colour continuity), on a real portrait."""
import cv2
import numpy as np
import pytest

from lipdub.blend import lower_face_mask, mouth_mask, paste_box, paste_feather, to_uint8_truncated

# p2's face as CenterFace finds it (153, 56, 307, 260), padded 10 px at the bottom as the default pads do
P2_BOX = np.array([153, 56, 307, 270])
# p2's five points as CenterFace gives them (frame coordinates, rounded to 0.1 px; checked by eye
# on the picture): eyes, nose tip, mouth corners. Geometry inputs only.
P2_LANDMARKS = np.array([[191.4, 148.8], [265.6, 144.2], [228.2, 189.0], [199.4, 216.3], [261.7, 212.2]])


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
@pytest.mark.parametrize("marks", [None, "p2"])
@pytest.mark.parametrize("cast", [(40, 0, 0), (0, -35, -25), (-30, -30, -30), (-20, 10, -40)])
def test_feather_colour_shift_keeps_skin_tone(portrait, cast, marks):
    """A generator output with a colour cast: near the seam the result keeps the frame's skin
    colour (a plain alpha blend would carry the cast into it), on the box ellipse's edge and on
    the landmark mask's."""
    x1, y1, x2, y2 = P2_BOX
    w, h = x2 - x1, y2 - y1
    landmarks = None if marks is None else P2_LANDMARKS
    mask = mouth_mask(w, h, None if marks is None else P2_LANDMARKS - (x1, y1))
    ring = (mask > 0.02) & (mask < 0.5)
    pred = generated_face(portrait, cast=cast, mouth_shift=-60)

    frame = portrait.copy()
    paste_feather(frame, P2_BOX, pred, landmarks=landmarks)
    original_ring = portrait[y1:y2, x1:x2][ring].astype(float).mean(axis=0)
    result_ring = frame[y1:y2, x1:x2][ring].astype(float).mean(axis=0)
    np.testing.assert_allclose(result_ring, original_ring, atol=2.0)

    # an unshifted blend with the same mask, for contrast: it does carry the cast
    generated = cv2.resize(pred * 255.0, (w, h))
    naive = portrait[y1:y2, x1:x2] + mask[:, :, None] * (generated - portrait[y1:y2, x1:x2])
    naive_ring = naive[ring].mean(axis=0)
    assert np.abs(naive_ring - original_ring).max() > 4
    # inside, away from the mouth (rows 62..82 of the 96 crop), the cast is gone too: on the cheeks
    # for the ellipse, beside, above and below the lips for the landmark mask
    if marks is None:
        inside = np.zeros_like(mask, bool)
        inside[int(0.55 * h) : int(0.62 * h), int(0.3 * w) : int(0.7 * w)] = True
    else:
        inside = mask > 0.5
        inside[int(62 / 96 * h) - 2 : int(82 / 96 * h) + 3, int(30 / 96 * w) - 2 : int(66 / 96 * w) + 3] = False
        assert inside.sum() > 300
    got = frame[y1:y2, x1:x2][inside].astype(float).mean(axis=0)
    assert np.abs(got - portrait[y1:y2, x1:x2][inside].mean(axis=0)).max() < 4


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


def test_lower_face_mask_scale():
    """--mask-scale on the ellipse: the same centre, the area grows and shrinks with the scale
    squared (within the blur and the box ramps), the eyes' third stays out."""
    w, h = 154, 214
    base = lower_face_mask(w, h)
    np.testing.assert_array_equal(lower_face_mask(w, h, 1.0), base)
    areas = {s: (lower_face_mask(w, h, s) > 0.5).sum() for s in (0.5, 0.8, 1.0, 1.3)}
    for s in (0.5, 0.8, 1.3):
        assert 0.75 * s * s < areas[s] / areas[1.0] < 1.25 * s * s, areas
    big = lower_face_mask(w, h, 2.0)
    assert big[: h // 3].max() == 0 and big[-1].max() < 0.05 and big[:, 0].max() < 0.05


# ------------------------------------------------------------------------- the landmark mask
# Expectations from the five points alone: the mouth corners' midpoint and line, the nose tip's
# and the eyes' height above that line. A large box keeps the box-edge ramps out of the way.

BIG = 400


def face_points(angle=0.0, centre=(200.0, 230.0), mouth=62.0, nose=26.0, eyes=68.0, scale=1.0):
    """Five points of an upright face (p2's proportions: mouth width 62, nose tip 26 and eyes
    68 px above the mouth line), rotated by `angle` degrees about the mouth centre."""
    up = np.array([[-37.0, -eyes], [37.0, -eyes], [0.0, -nose], [-mouth / 2, 0.0], [mouth / 2, 0.0]]) * scale
    a = np.radians(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return up @ rot.T + np.asarray(centre)


def mouth_coords(points, shape):
    """Every pixel's (along, across) in the mouth's frame: along the corners' line from their
    midpoint, and perpendicular to it, positive toward the chin."""
    left, right = points[3], points[4]
    c = (left + right) / 2
    u = (right - left) / np.linalg.norm(right - left)
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    return (xs - c[0]) * u[0] + (ys - c[1]) * u[1], -(xs - c[0]) * u[1] + (ys - c[1]) * u[0]


def centroid(mask):
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    return np.array([(mask * xs).sum(), (mask * ys).sum()]) / mask.sum()


@pytest.mark.parametrize("angle", [0.0, 9.0, -14.0, 25.0])
def test_mouth_mask_from_below_the_nose_to_the_chin(angle):
    points = face_points(angle)
    mask = mouth_mask(BIG, BIG, points)
    assert mask.shape == (BIG, BIG) and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1
    along, across = mouth_coords(points, mask.shape)
    mouth = 62.0
    nose, eyes = -26.0, -68.0
    # the lips between the corners (0.15 mouth widths above their line to 0.3 below) in full
    lips = (np.abs(along) <= mouth / 2) & (across >= -0.15 * mouth) & (across <= 0.3 * mouth)
    assert mask[lips].min() == 1.0
    # nothing above the nose tip, nothing beyond a mouth width from the centre, nothing below
    # three quarters of the eyes' height under the mouth (the chin)
    assert mask[across < nose].max() == 0 and mask[np.abs(along) > mouth].max() == 0
    assert mask[across > -0.75 * eyes].max() == 0
    # but it does reach toward the nose and the chin, and past the corners
    assert mask[(np.abs(along) < 3) & (np.abs(across - 0.7 * nose) < 1)].min() > 0.9
    assert mask[(np.abs(along) < 3) & (np.abs(across + 0.45 * eyes) < 1)].min() > 0.2
    assert mask[(np.abs(np.abs(along) - 0.6 * mouth) < 1) & (np.abs(across) < 3)].min() > 0.5
    # centred on the mouth: within 3 % of a p2-sized box (154 px) of the corners' midpoint
    assert np.linalg.norm(centroid(mask) - (points[3] + points[4]) / 2) <= 0.03 * 154
    # far smaller than the box ellipse of p2's box
    assert (mask > 0.5).sum() < 0.7 * (lower_face_mask(154, 214) > 0.5).sum()


def test_mouth_mask_turns_with_the_head():
    """The mask of rolled landmarks is the upright mask rolled the same way about the mouth."""
    upright = mouth_mask(BIG, BIG, face_points(0.0))
    for angle in (12.0, -20.0):
        rolled = mouth_mask(BIG, BIG, face_points(angle))
        turn = cv2.getRotationMatrix2D((200.0, 230.0), -angle, 1.0)  # cv2: positive = counter-clockwise on screen
        expected = cv2.warpAffine(upright, turn, (BIG, BIG), flags=cv2.INTER_LINEAR)
        assert np.abs(rolled - expected).max() < 0.08  # bilinear resampling of a feathered mask
        assert np.abs(rolled - expected).mean() < 0.002
        assert np.abs(rolled - upright).max() > 0.5  # and it did turn


def test_mouth_mask_moves_smoothly_with_the_landmarks():
    """No whole-pixel snapping: a sub-pixel move of the face moves the mask's centroid by the same
    amount and changes no value by much, so smoothed landmarks give a mask that does not shimmer."""
    base = face_points(7.0)
    start = centroid(mouth_mask(BIG, BIG, base))
    previous = mouth_mask(BIG, BIG, base)
    for step in range(1, 6):
        shift = np.array([0.13, -0.07]) * step
        mask = mouth_mask(BIG, BIG, base + shift)
        np.testing.assert_allclose(centroid(mask) - start, shift, atol=0.01)
        assert np.abs(mask - previous).max() < 0.05
        previous = mask
    # a whole-pixel move is the same mask moved by that many pixels
    moved = mouth_mask(BIG, BIG, base + (3, 2))
    np.testing.assert_allclose(moved[2:, 3:], mouth_mask(BIG, BIG, base)[:-2, :-3], atol=1e-5)


def test_mouth_mask_scale():
    """--mask-scale grows or shrinks the landmark mask about the mouth centre: its area follows the
    scale squared and its centroid stays."""
    points = face_points(-6.0)
    base = mouth_mask(BIG, BIG, points)
    for scale in (0.5, 0.7, 1.5, 2.0):
        mask = mouth_mask(BIG, BIG, points, scale)
        ratio = (mask > 0.5).sum() / (base > 0.5).sum()
        assert 0.85 * scale * scale < ratio < 1.15 * scale * scale, (scale, ratio)
        assert np.linalg.norm(centroid(mask) - (points[3] + points[4]) / 2) <= 0.03 * 154 * scale


@pytest.mark.parametrize("bad", ["nan", "no mouth", "nose below the mouth", "eyes below the nose", "outside"])
def test_landmarks_that_describe_no_mouth_give_the_ellipse(portrait, bad):
    points = P2_LANDMARKS.copy()
    if bad == "nan":
        points[2, 0] = np.nan
    elif bad == "no mouth":
        points[3] = points[4] - (3, 0)
    elif bad == "nose below the mouth":
        points[2, 1] = 240
    elif bad == "eyes below the nose":
        points[:2, 1] = 200
    else:
        points += (400, 0)
    pred = generated_face(portrait, mouth_shift=-80)
    with_points, without = portrait.copy(), portrait.copy()
    paste_feather(with_points, P2_BOX, pred, landmarks=points)
    paste_feather(without, P2_BOX, pred)
    np.testing.assert_array_equal(with_points, without)
    x1, y1 = P2_BOX[:2]
    np.testing.assert_array_equal(mouth_mask(154, 214, points - (x1, y1)), lower_face_mask(154, 214))


def test_feather_with_landmarks_on_p2(portrait):
    """On the real portrait: only pixels under the landmark mask change, none above the nose tip,
    the lips take the generated mouth in full, and far fewer pixels change than with the ellipse."""
    x1, y1, x2, y2 = P2_BOX
    pred = generated_face(portrait, mouth_shift=-80)
    frame = portrait.copy()
    paste_feather(frame, P2_BOX, pred, landmarks=P2_LANDMARKS)
    changed = np.any(frame != portrait, axis=2)
    mask = mouth_mask(x2 - x1, y2 - y1, P2_LANDMARKS - (x1, y1))
    inside = np.zeros_like(changed)
    inside[y1:y2, x1:x2] = mask > 0
    assert changed.any() and not changed[~inside].any()
    along, across = mouth_coords(P2_LANDMARKS, portrait.shape)
    nose_row, nose_col = int(P2_LANDMARKS[2, 1]), int(P2_LANDMARKS[2, 0])
    assert not changed[across < across[nose_row, nose_col]].any()  # above the nose tip, along the mouth line
    assert not changed[:nose_row].any()  # and in the image rows
    # the darker generated mouth, in full, between the corners
    mouth = 62.4
    lips = (np.abs(along) <= mouth / 2) & (across >= -0.1 * mouth) & (across <= 0.25 * mouth)
    generated = cv2.resize(pred * 255.0, (x2 - x1, y2 - y1))
    full = np.zeros(portrait.shape, np.float64)
    full[y1:y2, x1:x2] = generated
    offset = np.median(frame[lips].astype(float) - full[lips], axis=0)
    assert np.abs(frame[lips] - full[lips] - offset).max() <= 1.0
    # a generator that changes everything it draws (noise): the area that moves by more than 8
    # levels is far smaller than the ellipse's
    noisy = np.random.default_rng(5).random((96, 96, 3), dtype=np.float32)
    area = {}
    for name, marks in [("landmarks", P2_LANDMARKS), ("ellipse", None)]:
        out = portrait.copy()
        paste_feather(out, P2_BOX, noisy, landmarks=marks)
        area[name] = int(np.any(np.abs(out.astype(int) - portrait) > 8, axis=2).sum())
    assert area["landmarks"] < 0.6 * area["ellipse"], area
