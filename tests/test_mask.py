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
    wav = load_audio(short_speech(tmp_path_factory.mktemp("speech") / "a1.wav", 2.0))
    mel = audio_mod.melspectrogram(wav)
    starts = audio_mod.chunk_starts(mel.shape[1], source.info.fps)
    frames = decode(V2)
    assert len(frames) == len(ticks) == 199
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


@pytest.mark.slow
def test_full_v2_with_default_options(tmp_path, wav2lip_checkpoint):
    """`lipdub.sync` with the default options on all of v2 and 6 s of a1 speech, every frame given a
    mouth (silence="generate"), the written mp4 decoded. On every frame: above the nose tip and
    outside the mouth region the output equals the input up to the codec (PSNR >= 40 dB), and the
    centroid of what changed (inside the box, where the codec alone rarely moves a pixel by more
    than 8 levels) lies within 3 % of the box width of the mouth corners' midpoint. The option
    reaches the blend: `mask_scale=0.6` changes fewer pixels."""
    speech = short_speech(tmp_path / "a1.wav", 6.0)
    source = VideoSource(V2)
    _, track = track_video(source, load_detector("centerface"), stride=default_stride(source.info.fps),
                           pads=(0, 10, 0, 0))
    frames = decode(V2)
    areas, kept, errors = {}, [], []
    for scale in (1.0, 0.6):
        out = tmp_path / f"out_{scale}.mp4"
        result = sync(V2, speech, out, checkpoint=str(wav2lip_checkpoint), silence="generate", precision="fp32",
                      mask_scale=scale, progress=False)
        written = decode(out)
        assert result.frames_with_face == result.n_frames == len(written) >= 170
        areas[scale] = 0
        for j, got in enumerate(written):
            x1, y1, x2, y2 = track.boxes[j]
            moved = changed(got[y1:y2, x1:x2], frames[j][y1:y2, x1:x2])
            areas[scale] += int(moved.sum())
            if scale == 1.0:
                face = Face.of(track.landmarks[j], got.shape)
                keep = face.above_nose() | ~face.mouth_region()
                kept.append(psnr(got[keep], frames[j][keep]))
                ys, xs = np.nonzero(moved)
                errors.append(float(np.hypot(x1 + xs.mean() - face.centre[0], y1 + ys.mean() - face.centre[1]))
                              / (x2 - x1))
    print(f"encoded: PSNR above the nose tip / outside the mouth region min {min(kept):.1f} dB, "
          f"centroid error max {max(errors):.4f} box widths, changed area at scale 0.6 / 1.0: "
          f"{areas[0.6] / areas[1.0]:.2f}")
    assert min(kept) >= 40.0 and max(errors) <= 0.03
    assert areas[0.6] < 0.7 * areas[1.0], areas
