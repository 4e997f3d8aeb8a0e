"""From sparse detections to one box per frame: interpolation, smoothing, pads, cuts, gaps, fades,
target choice and landmarks. Synthetic detections; every expectation is computed here from the
documented behaviour, not taken from the implementation."""
import numpy as np
import pytest

from lipdub.errors import LipdubError
from lipdub.faces.base import Face
from lipdub.faces.track import build_track, fixed_track

W, H = 640, 360
NO_PADS = (0, 0, 0, 0)


def face(box, score=0.9, landmarks=None):
    return Face(tuple(box), score, landmarks)


def five_points(box):
    """Plausible landmarks inside a box: eyes, nose, mouth corners."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    rel = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])
    return np.stack([x1 + rel[:, 0] * w, y1 + rel[:, 1] * h], axis=1)


def assert_boxes_close(track, frames, expected):
    """Integer boxes are the float boxes rounded: within half a pixel."""
    got = track.boxes[frames].astype(np.float64)
    assert np.abs(got - np.asarray(expected, dtype=np.float64)).max() <= 0.5 + 1e-9, (got, expected)


# -------------------------------------------------------------------------------- interpolation


def test_linear_interpolation_between_strided_detections():
    keys = {0: (100.0, 50.0, 180.0, 150.0), 6: (130.0, 56.0, 214.0, 160.0), 12: (118.0, 44.0, 196.0, 146.0)}
    detections = {f: [face(b)] for f, b in keys.items()}
    track = build_track(detections, [], 13, W, H, pads=NO_PADS, smooth=False)
    assert track.valid.all() and track.boxes.shape == (13, 4) and track.boxes.dtype.kind == "i"
    frames = np.arange(13)
    kf = sorted(keys)
    expected = np.stack([np.interp(frames, kf, [keys[f][c] for f in kf]) for c in range(4)], axis=1)
    assert_boxes_close(track, frames, expected)
    # detection frames are kept as detected
    for f, b in keys.items():
        assert_boxes_close(track, [f], [b])


def test_detections_further_apart_than_max_gap_are_not_bridged():
    detections = {0: [face((100, 50, 180, 150))], 20: [face((110, 50, 190, 150))]}
    track = build_track(detections, [], 21, W, H, pads=NO_PADS, smooth=False, max_gap=12, fade=0)
    assert track.valid[[0, 20]].all() and not track.valid[1:20].any()
    track = build_track(detections, [], 21, W, H, pads=NO_PADS, smooth=False, max_gap=20, fade=0)
    assert track.valid.all()
    assert_boxes_close(track, [10], [(105, 50, 185, 150)])


# ------------------------------------------------------------------------------------ smoothing


def test_smoothing_is_centred_and_has_no_lag():
    """A face moving at constant speed is left where it is (a centred average of a straight line
    is the line, at the run's ends too); a one-frame outlier is spread evenly before and after."""
    n = 30
    moving = {f: [face((100 + 4 * f, 60 + 1.5 * f, 180 + 4 * f, 160 + 1.5 * f))] for f in range(n)}
    track = build_track(moving, [], n, W, H, pads=NO_PADS, smooth=True, smooth_window=5)
    assert track.valid.all()
    truth = np.array([[100 + 4 * f, 60 + 1.5 * f, 180 + 4 * f, 160 + 1.5 * f] for f in range(n)])
    assert_boxes_close(track, np.arange(n), truth)

    spike = {f: [face((200 + (20 if f == 15 else 0), 100, 300, 220))] for f in range(n)}
    track = build_track(spike, [], n, W, H, pads=NO_PADS, smooth=True, smooth_window=5)
    x1 = track.boxes[:, 0]
    assert (x1[13:18] == 204).all()  # 20 / 5 on the two frames before, the spike frame and two after
    assert (x1[:13] == 200).all() and (x1[18:] == 200).all()


def test_smoothing_averages_jitter_over_the_window():
    rng = np.random.default_rng(4)
    n = 25
    raw = np.array([[150, 80, 250, 200]], dtype=np.float64) + rng.normal(0, 3, (n, 4))
    detections = {f: [face(raw[f])] for f in range(n)}
    smooth = build_track(detections, [], n, W, H, pads=NO_PADS, smooth=True, smooth_window=5)
    rough = build_track(detections, [], n, W, H, pads=NO_PADS, smooth=False)
    assert_boxes_close(rough, np.arange(n), raw)
    mid = np.arange(2, n - 2)
    expected = np.stack([raw[i - 2 : i + 3].mean(axis=0) for i in mid])
    assert_boxes_close(smooth, mid, expected)
    # the smoothed track is calmer
    assert np.abs(np.diff(smooth.boxes, axis=0)).mean() < 0.6 * np.abs(np.diff(raw, axis=0)).mean()


def test_pads_then_clamped_to_the_frame():
    top, bottom, left, right = 5, 10, 3, 7
    pads = (top, bottom, left, right)
    inner, corner_tl, corner_br = (200, 100, 300, 220), (1, 2, 81, 102), (600, 300, 636, 355)
    for box, want in [
        (inner, (200 - left, 100 - top, 300 + right, 220 + bottom)),
        (corner_tl, (0, 0, 81 + right, 102 + bottom)),
        (corner_br, (600 - left, 300 - top, W, H)),
    ]:
        detections = {f: [face(box)] for f in (0, 4)}
        track = build_track(detections, [], 5, W, H, pads=pads, smooth=True)
        assert track.valid.all()
        assert (track.boxes == np.array(want)).all(), (box, track.boxes[0], want)


# ------------------------------------------------------------------------------ cuts and gaps


def test_cut_is_never_bridged_by_interpolation_or_smoothing():
    a, b = (100, 80, 200, 200), (400, 60, 520, 200)  # a different person after the cut
    detections = {f: [face(a)] for f in (0, 3, 6, 9)}
    detections.update({f: [face(b)] for f in (10, 13, 16, 19)})
    track = build_track(detections, [10], 20, W, H, pads=NO_PADS, smooth=True, smooth_window=5)
    assert track.valid.all()
    assert (track.boxes[:10] == np.array(a)).all()
    assert (track.boxes[10:] == np.array(b)).all()
    assert (track.alpha == 1).all()  # a cut is not a gap: no fade
    # without the cut, frames 9..10 are one run and the boxes blend across it
    blended = build_track(detections, [], 20, W, H, pads=NO_PADS, smooth=True, smooth_window=5)
    assert not (blended.boxes[9] == np.array(a)).all()


def test_face_picked_per_shot():
    """The largest face of each shot is its target, even if the other shot's face is larger."""
    small, big = (100, 100, 160, 170), (300, 80, 420, 230)
    detections = {f: [face(small), face(big)] for f in (0, 2, 4)}
    detections.update({f: [face((40, 40, 90, 100))] for f in (5, 7, 9)})
    track = build_track(detections, [5], 10, W, H, pads=NO_PADS, smooth=False)
    assert track.valid.all()
    assert (track.boxes[:5] == np.array(big)).all()
    assert (track.boxes[5:] == np.array((40, 40, 90, 100))).all()


def test_gap_makes_frames_invalid_with_fade_ramps():
    box = (200, 100, 300, 230)
    detections = {f: ([] if 24 <= f <= 28 else [face(box)]) for f in range(0, 61, 2)}
    fade = 3
    track = build_track(detections, [], 61, W, H, pads=NO_PADS, smooth=True, fade=fade)
    gap = np.arange(23, 30)  # after the last face at 22, before the next at 30
    expected_valid = np.ones(61, bool)
    expected_valid[gap] = False
    np.testing.assert_array_equal(track.valid, expected_valid)
    assert (track.alpha[gap] == 0).all()
    # linear ramps of `fade` frames on both sides of the gap, full strength elsewhere and at the clip ends
    np.testing.assert_allclose(track.alpha[20:23], [0.75, 0.5, 0.25], atol=1e-6)
    np.testing.assert_allclose(track.alpha[30:33], [0.25, 0.5, 0.75], atol=1e-6)
    assert (track.alpha[:20] == 1).all() and (track.alpha[33:] == 1).all()
    assert track.alpha.dtype == np.float32
    assert track.coverage == pytest.approx(54 / 61)
    # without fading the blend switches hard
    hard = build_track(detections, [], 61, W, H, pads=NO_PADS, fade=0)
    np.testing.assert_array_equal(hard.alpha, expected_valid.astype(np.float32))


def test_no_faces_at_all():
    detections = {f: [] for f in range(0, 30, 3)}
    track = build_track(detections, [], 30, W, H)
    assert not track.valid.any() and (track.alpha == 0).all() and track.coverage == 0.0


def test_tiny_boxes_are_not_faces():
    detections = {f: [face((100, 100, 105, 106))] for f in (0, 2, 4)}
    track = build_track(detections, [], 5, W, H, pads=NO_PADS)
    assert not track.valid.any()


# -------------------------------------------------------------------------------- target choice


def test_face_index_counts_from_the_left():
    left, middle, right = (50, 100, 130, 200), (260, 90, 380, 230), (500, 110, 570, 190)
    # listed in score order, not in x order
    detections = {f: [face(middle, 0.99), face(right, 0.95), face(left, 0.9)] for f in (0, 3, 6)}
    for index, want in [(0, left), (1, middle), (2, right)]:
        track = build_track(detections, [], 7, W, H, pads=NO_PADS, face_index=index)
        assert track.valid.all()
        assert (track.boxes == np.array(want)).all(), index
    none = build_track(detections, [], 7, W, H, pads=NO_PADS, face_index=3)
    assert not none.valid.any()


def test_default_target_prefers_large_then_central():
    big, small = (60, 60, 260, 300), (400, 150, 460, 220)
    detections = {f: [face(small, 0.99), face(big, 0.8)] for f in (0, 3, 6)}
    track = build_track(detections, [], 7, W, H, pads=NO_PADS)
    assert (track.boxes == np.array(big)).all()

    # two equal faces: the one nearer the centre (320, 180) wins, whatever the score
    central, edge = (280, 130, 360, 230), (10, 20, 90, 120)
    detections = {f: [face(edge, 0.99), face(central, 0.6)] for f in (0, 3, 6)}
    track = build_track(detections, [], 7, W, H, pads=NO_PADS)
    assert (track.boxes == np.array(central)).all()


def test_default_target_follows_one_moving_person():
    """Two people; the target moves 6 px per frame and is tracked, not swapped for the other."""
    detections = {}
    for f in range(0, 31, 3):
        target = (200 + 6 * f, 80, 320 + 6 * f, 240)
        other = (20, 200, 80, 270)
        detections[f] = [face(other, 0.99), face(target, 0.7)]
    track = build_track(detections, [], 31, W, H, pads=NO_PADS, smooth=False)
    assert track.valid.all()
    expected = np.array([(200 + 6 * f, 80, 320 + 6 * f, 240) for f in range(31)])
    assert_boxes_close(track, np.arange(31), expected)


# ------------------------------------------------------------------------------------ landmarks


def test_landmarks_interpolated_unpadded_and_nan_where_no_face():
    boxes = {0: (100.0, 50.0, 180.0, 150.0), 8: (116.0, 58.0, 196.0, 158.0)}
    detections = {f: [face(b, landmarks=five_points(b))] for f, b in boxes.items()}
    detections[16] = []  # the face is gone
    track = build_track(detections, [], 20, W, H, pads=(0, 10, 4, 4), smooth=False, fade=0)
    assert track.landmarks.shape == (20, 5, 2) and track.landmarks.dtype == np.float32
    for f in range(9):
        t = f / 8
        want = (1 - t) * five_points(boxes[0]) + t * five_points(boxes[8])
        np.testing.assert_allclose(track.landmarks[f], want, atol=1e-3)
    assert np.isnan(track.landmarks[9:]).all() and not track.valid[9:].any()
    # the pads moved the box but not the landmarks
    assert track.boxes[0, 0] == 96 and track.boxes[0, 3] == 160


def test_landmarks_smoothed_like_the_boxes():
    n = 15
    boxes = [(100 + 3 * f, 50.0, 180 + 3 * f, 150.0) for f in range(n)]
    detections = {f: [face(boxes[f], landmarks=five_points(boxes[f]))] for f in range(n)}
    track = build_track(detections, [], n, W, H, pads=NO_PADS, smooth=True)
    for f in range(n):  # uniform motion: smoothing leaves it in place
        np.testing.assert_allclose(track.landmarks[f], five_points(boxes[f]), atol=1e-3)


def test_landmarks_missing_in_some_detections_stay_local():
    """A detection without landmarks must not wipe out the landmarks of the rest of the run."""
    n = 20
    box = (200.0, 100.0, 300.0, 230.0)
    detections = {f: [face(box, landmarks=five_points(box))] for f in range(n)}
    detections[5] = [face(box)]  # this one came without landmarks
    track = build_track(detections, [], n, W, H, pads=NO_PADS, smooth=True)
    assert track.valid.all()
    assert np.isnan(track.landmarks[5]).all()
    known = [f for f in range(n) if f != 5]
    np.testing.assert_allclose(track.landmarks[known], np.broadcast_to(five_points(box), (len(known), 5, 2)), atol=1e-3)


def test_detector_without_landmarks():
    detections = {f: [face((100, 50, 180, 150))] for f in (0, 4, 8)}
    track = build_track(detections, [], 9, W, H)
    assert track.valid.all() and np.isnan(track.landmarks).all()


# ---------------------------------------------------------------------------------- fixed_track


def test_fixed_track_uses_the_box_as_given():
    top, bottom, left, right = 10, 110, 20, 140
    track = fixed_track((top, bottom, left, right), 7, 200, 160)
    assert track.boxes.shape == (7, 4)
    assert (track.boxes == np.array([left, top, right, bottom])).all()  # x1, y1, x2, y2
    assert track.valid.all() and (track.alpha == 1).all()
    # the whole frame is allowed
    assert (fixed_track((0, 160, 0, 200), 1, 200, 160).boxes == [[0, 0, 200, 160]]).all()


@pytest.mark.parametrize(
    "box",
    [(10, 170, 20, 140), (10, 110, 20, 210), (-1, 110, 20, 140), (10, 110, -5, 140), (110, 110, 20, 140), (10, 110, 140, 20)],
)
def test_fixed_track_rejects_boxes_outside_the_frame(box):
    with pytest.raises(LipdubError, match="outside"):
        fixed_track(box, 5, 200, 160)
