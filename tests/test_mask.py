"""The feather blend's mouth mask end to end, on v2 (head tilts and turns) with deterministic
(rule-A) weights, whose random-looking mouth changes every pixel it reaches.

What is checked is the rendered picture: which pixels differ from the input frame and by how much.
The face track's landmarks are used only as geometry (where the mouth corners, the nose tip and
the eyes are), through this file's own vector arithmetic, never as the thing checked; "today's
mask" is the same render with a track that has no landmarks, which falls back to the box ellipse
(`--box` and S3FD tracks), and the generator's own pixels come from the box paste.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lipdub import audio as audio_mod
from lipdub.blend import mouth_mask
from lipdub.faces import load_detector, track_video
from lipdub.faces.video import default_stride
from lipdub.generate import Generator
from lipdub.media import VideoSource, load_audio
from lipdub.models.wav2lip import Wav2Lip
from lipdub.pipeline import render, sync

from .conftest import MEDIA, short_speech

V2 = MEDIA / "v2_woman_headmotion_700x700_30fps.mp4"
FRAMES = list(range(0, 199, 10))  # 20 frames over the whole clip: rolls of about +9 and -5 degrees among them
LEVELS = 8  # "changed": some channel moved by more than this many levels


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def changed(out: np.ndarray, frame: np.ndarray) -> np.ndarray:
    return np.abs(out.astype(np.int16) - frame).max(axis=2) > LEVELS


@dataclasses.dataclass
class Face:
    """A frame's face in the mouth's own frame, from its five points: `along` (pixels along the line
    from the left to the right mouth corner, from their midpoint) and `across` (perpendicular,
    positive toward the chin) for every pixel of the frame."""

    centre: np.ndarray
    mouth_width: float
    angle: float  # roll of the corners' line, degrees
    nose: float  # `across` of the nose tip (negative: above the mouth)
    eyes: float  # `across` of the eyes' midpoint (negative)
    along: np.ndarray
    across: np.ndarray

    @classmethod
    def of(cls, points: np.ndarray, shape: tuple[int, ...]) -> Face:
        p = np.asarray(points, np.float64)
        left, right = p[3], p[4]
        centre = (left + right) / 2
        u = (right - left) / np.linalg.norm(right - left)
        v = np.array([-u[1], u[0]])
        ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
        dx, dy = xs - centre[0], ys - centre[1]
        return cls(centre, float(np.linalg.norm(right - left)), float(np.degrees(np.arctan2(u[1], u[0]))),
                   float((p[2] - centre) @ v), float(((p[0] + p[1]) / 2 - centre) @ v),
                   dx * u[0] + dy * u[1], dx * v[0] + dy * v[1])

    def above_nose(self) -> np.ndarray:
        """Toward the eyes from the line through the nose tip parallel to the mouth corners'."""
        return self.across < self.nose

    def mouth_region(self) -> np.ndarray:
        """Where the issue allows the mask to reach: from the nose tip to the chin (three quarters
        of the eyes-to-mouth height below the mouth; adult chins end near 0.7), as wide as the
        mouth corners plus half a mouth width on either side."""
        return (np.abs(self.along) <= self.mouth_width) & (self.across >= self.nose) & (self.across <= -0.75 * self.eyes)

    def lips(self) -> np.ndarray:
        """Between the mouth corners, from 0.15 mouth widths above their line (the upper lip) to
        0.3 below (the lower lip of an open mouth)."""
        return (np.abs(self.along) <= self.mouth_width / 2) & (self.across >= -0.15 * self.mouth_width) & (
            self.across <= 0.3 * self.mouth_width)


@pytest.fixture(scope="module")
def generator(rule_a) -> Generator:
    net = Wav2Lip()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in rule_a.rule_a("wav2lip").items()})
    return Generator(net.eval(), precision="fp32")


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """v2 tracked with the default options, a1 speech for the mel windows, and the input frames."""
    source = VideoSource(V2)
    ticks, track = track_video(source, load_detector("centerface"), stride=default_stride(source.info.fps),
                               pads=(0, 10, 0, 0))
    assert track.valid.all() and np.isfinite(track.landmarks).all()
    wav = load_audio(short_speech(tmp_path_factory.mktemp("speech") / "a1.wav", 7.0))
    mel = audio_mod.melspectrogram(wav)
    starts = audio_mod.chunk_starts(mel.shape[1], source.info.fps)
    frames = decode(V2)
    assert len(frames) == len(ticks) == 199 <= len(starts)  # a mel window for every frame
    return source, ticks, track, mel, starts, frames


def render_frames(v2, generator, order, blend="feather", mask_scale=1.0, landmarks=True) -> list[np.ndarray]:
    source, ticks, track, mel, starts, _ = v2
    if not landmarks:
        track = dataclasses.replace(track, landmarks=None)
    return list(render(source, ticks, track, mel, starts[: len(order)], order, generator, blend=blend,
                       batch_size=10, mask_scale=mask_scale))


@pytest.fixture(scope="module")
def renders(v2, generator):
    """FRAMES rendered with the new mask, with today's ellipse, and with the box paste."""
    return {kind: render_frames(v2, generator, FRAMES, **kw) for kind, kw in
            [("new", {}), ("today", {"landmarks": False}), ("box", {"blend": "box"})]}


def test_the_frames_include_tilted_heads(v2):
    angles = [Face.of(v2[2].landmarks[j], (2, 2)).angle for j in FRAMES]
    assert max(angles) > 7 and min(angles) < -4, angles


def test_changes_stay_in_the_mouth(v2, renders):
    """Above the nose tip and outside the mouth region nothing changes (PSNR >= 40 dB); today's
    ellipse does change those pixels, so the check can tell."""
    track, frames = v2[2], v2[5]
    for kind, bound in [("new", 40.0), ("today", None)]:
        above, outside = [], []
        for out, j in zip(renders[kind], FRAMES):
            face = Face.of(track.landmarks[j], frames[j].shape)
            above.append(psnr(out[face.above_nose()], frames[j][face.above_nose()]))
            region = ~face.mouth_region()
            outside.append(psnr(out[region], frames[j][region]))
        print(f"{kind}: PSNR above the nose tip min {min(above):.1f} dB, outside the mouth region min {min(outside):.1f} dB")
        if bound is not None:
            assert min(above) >= bound and min(outside) >= bound
        else:
            assert min(outside) < 40.0
    # in image rows too (the nose tip's row, whatever the roll)
    for out, j in zip(renders["new"], FRAMES):
        rows = slice(0, int(np.floor(track.landmarks[j][2, 1])))
        assert psnr(out[rows], frames[j][rows]) >= 40.0


def test_the_mask_is_centred_on_the_mouth(v2, renders):
    """The centroid of what changed lies within 3 % of the box width of the mouth corners' midpoint
    on every frame, tilted or not."""
    track, frames = v2[2], v2[5]
    worst = 0.0
    for out, j in zip(renders["new"], FRAMES):
        ys, xs = np.nonzero(changed(out, frames[j]))
        centre = Face.of(track.landmarks[j], (2, 2)).centre
        width = track.boxes[j][2] - track.boxes[j][0]
        error = float(np.hypot(xs.mean() - centre[0], ys.mean() - centre[1])) / width
        worst = max(worst, error)
        assert error <= 0.03, (j, error)
    print(f"centroid error max {worst:.4f} box widths")


def test_smaller_than_today_with_the_same_mouth_coverage(v2, renders):
    """At least 30 % fewer pixels change by more than 8 levels than with today's ellipse, while the
    lips between the corners are replaced in full: there the output is the generator's picture
    (the box paste) up to one colour offset per channel and frame."""
    track, frames = v2[2], v2[5]
    area = {kind: sum(int(changed(out, frames[j]).sum()) for out, j in zip(renders[kind], FRAMES))
            for kind in ("new", "today")}
    reduction = 1 - area["new"] / area["today"]
    print(f"changed area: new {area['new']} px, today {area['today']} px, {100 * reduction:.0f} % smaller")
    assert reduction >= 0.30
    coverage = {"new": [], "today": []}
    for k, j in enumerate(FRAMES):
        lips = Face.of(track.landmarks[j], frames[j].shape).lips()
        generated = renders["box"][k][lips].astype(np.float64)
        for kind in coverage:
            got = renders[kind][k][lips].astype(np.float64)
            offset = np.median(got - generated, axis=0)
            coverage[kind].append(float((np.abs(got - generated - offset) <= 3).all(axis=1).mean()))
        assert np.abs(renders["new"][k][lips].astype(int) - frames[j][lips]).max(axis=1).mean() > LEVELS
    print(f"lips replaced in full: new min {min(coverage['new']):.4f}, today min {min(coverage['today']):.4f}")
    assert min(coverage["new"]) >= 0.99


def test_mask_scale_grows_and_shrinks_the_changed_area(v2, generator, renders):
    frames = v2[5]
    few = FRAMES[:4]

    def area(outs):
        return sum(int(changed(out, frames[j]).sum()) for out, j in zip(outs, few))

    new = {1.0: area(renders["new"][:4])}
    for scale in (0.6, 1.5):
        new[scale] = area(render_frames(v2, generator, few, mask_scale=scale))
    assert new[0.6] < 0.6 * new[1.0] and new[1.5] > 1.5 * new[1.0], new
    # without landmarks: the box ellipse, grown and shrunk by the same option
    today = {1.0: area(renders["today"][:4])}
    for scale in (0.6, 1.5):
        today[scale] = area(render_frames(v2, generator, few, mask_scale=scale, landmarks=False))
    assert today[0.6] < 0.6 * today[1.0] and today[1.5] > 1.5 * today[1.0], today
    print(f"changed area by mask scale: landmarks {new}, ellipse {today}")


def test_without_landmarks_the_box_ellipse(v2, renders):
    """Today's mask: an ellipse in box coordinates (centre at 0.72 of the box height on its middle
    column, half-axes 0.34 of the width and 0.24 of the height, edge blurred by 6 % of the width):
    what changes lies within it grown by that edge, and reaches the upper lip and beyond the
    corners whatever the landmarks say."""
    track, frames = v2[2], v2[5]
    for out, j in zip(renders["today"], FRAMES):
        x1, y1, x2, y2 = track.boxes[j]
        w, h = x2 - x1, y2 - y1
        ys, xs = np.nonzero(changed(out, frames[j]))
        grown = (((xs - x1 - (w - 1) / 2) / (0.34 * w + 0.18 * w)) ** 2
                 + ((ys - y1 - 0.72 * h) / (0.24 * h + 0.18 * w)) ** 2)
        assert (grown <= 1).all()
        # its centre follows the box, not the mouth
        assert abs(xs.mean() - (x1 + (w - 1) / 2)) < 0.03 * w


def test_the_mask_itself_is_centred_on_every_frame(v2):
    """The soft mask (`mouth_mask`, weighted by its values) for the track's landmarks and box on
    all 199 frames: its centroid within 3 % of the box width of the mouth corners' midpoint."""
    track = v2[2]
    worst = 0.0
    for j in range(len(track.valid)):
        x1, y1, x2, y2 = track.boxes[j]
        mask = mouth_mask(x2 - x1, y2 - y1, track.landmarks[j] - (x1, y1))
        ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
        centre = Face.of(track.landmarks[j], (2, 2)).centre - (x1, y1)
        error = np.hypot((mask * xs).sum() / mask.sum() - centre[0], (mask * ys).sum() / mask.sum() - centre[1])
        worst = max(worst, float(error) / (x2 - x1))
    print(f"soft mask centroid error max {worst:.4f} box widths")
    assert worst <= 0.03


@pytest.mark.slow
def test_every_frame_of_v2(v2, generator):
    """All 199 frames, rendered with the new mask, today's ellipse and the box paste: the changes
    are centred on the mouth on every frame, at least 30 % smaller than today's, with the lips
    replaced in full."""
    every = list(range(199))
    outs = {kind: render_frames(v2, generator, every, **kw) for kind, kw in
            [("new", {}), ("today", {"landmarks": False}), ("box", {"blend": "box"})]}
    track, frames = v2[2], v2[5]
    errors, coverage, area = [], [], {"new": 0, "today": 0}
    for j in every:
        face = Face.of(track.landmarks[j], frames[j].shape)
        moved = changed(outs["new"][j], frames[j])
        ys, xs = np.nonzero(moved)
        errors.append(float(np.hypot(xs.mean() - face.centre[0], ys.mean() - face.centre[1]))
                      / (track.boxes[j][2] - track.boxes[j][0]))
        area["new"] += int(moved.sum())
        area["today"] += int(changed(outs["today"][j], frames[j]).sum())
        lips = face.lips()
        got, generated = outs["new"][j][lips].astype(np.float64), outs["box"][j][lips].astype(np.float64)
        offset = np.median(got - generated, axis=0)
        coverage.append(float((np.abs(got - generated - offset) <= 3).all(axis=1).mean()))
    reduction = 1 - area["new"] / area["today"]
    print(f"all frames: centroid error max {max(errors):.4f} box widths, changed area {100 * reduction:.0f} % "
          f"smaller than today's, lips replaced in full min {min(coverage):.4f}")
    assert max(errors) <= 0.03 and reduction >= 0.30 and min(coverage) >= 0.99


@pytest.mark.slow
def test_full_v2_with_default_options(tmp_path, wav2lip_checkpoint):
    """`lipdub.sync` with the default options on v2 and 6 s of a1 speech, every frame given a mouth
    (silence="generate"), the written mp4 decoded: on every frame, above the nose tip and outside
    the mouth region the output equals the input up to the codec (PSNR >= 40 dB). The option
    reaches the blend: with `mask_scale=0.6` fewer pixels change (a 2 s run, its frames compared
    with the same frames of the first)."""
    source = VideoSource(V2)
    _, track = track_video(source, load_detector("centerface"), stride=default_stride(source.info.fps),
                           pads=(0, 10, 0, 0))
    frames = decode(V2)
    areas, kept = {}, []
    for scale, seconds in ((1.0, 6.0), (0.6, 2.0)):
        out = tmp_path / f"out_{scale}.mp4"
        result = sync(V2, short_speech(tmp_path / f"a1_{seconds}.wav", seconds), out,
                      checkpoint=str(wav2lip_checkpoint), silence="generate", precision="fp32", mask_scale=scale,
                      progress=False)
        written = decode(out)
        assert result.frames_with_face == result.n_frames == len(written) >= 28 * seconds
        areas[scale] = 0
        for j, got in enumerate(written):
            x1, y1, x2, y2 = track.boxes[j]
            if j < 50:
                areas[scale] += int(changed(got[y1:y2, x1:x2], frames[j][y1:y2, x1:x2]).sum())
            if scale == 1.0:
                face = Face.of(track.landmarks[j], got.shape)
                keep = face.above_nose() | ~face.mouth_region()
                kept.append(psnr(got[keep], frames[j][keep]))
    print(f"encoded: PSNR above the nose tip and outside the mouth region min {min(kept):.1f} dB "
          f"over {len(kept)} frames; changed area at mask scale 0.6 / 1.0: {areas[0.6] / areas[1.0]:.2f}")
    assert min(kept) >= 40.0
    assert areas[0.6] < 0.7 * areas[1.0], areas
