"""`lipdub synth`: a synthetic talking-face data set whose mouths follow real speech.

Real talking-head sets cannot be downloaded here, so this makes one that has the property
training needs: the mouth moves with the sound, and nothing else in the picture does.

* Faces: real portraits (the photos and first video frames of ``shared/media``), found with the
  project's own face detector (a face it does not keep finding with the mouth wide open is left
  out, see `open_mouth_score`), their mouths painted out and replaced by a parametric mouth
  (lips, dark opening, teeth) drawn between the detected mouth corners. Per clip the face gets
  its own colour cast, size, and smooth head motion (shift, tilt, zoom); the background is a
  random gradient with shapes that drifts.
* Sound: pieces of the speech recordings in ``shared/media`` (random start, speed 0.85..1.2,
  level-normalised, silences between) mixed with a small formant "babble" synthesiser (voiced
  syllables with random pitch and vowel formants, and fricative bursts). Train and val clips
  draw from different recordings / parts of recordings and different babble seeds, so the val
  set has held-out audio.
* Mouth: per video frame, the opening is the loudness of the 250..4000 Hz band in a 60 ms
  window centred 20 ms after the frame's time (in dB, mapped 0..1; lips move ahead of the
  sound they make; no smoothing across frames, so each frame's opening is decided by audio inside
  the mel window that frame is paired with), and the width follows the balance of high to low
  band energy (spread vs rounded). The opening is drawn large (up to 0.8 of the mouth width)
  and near-black, and grows downwards only (the jaw drops, the upper lip stays): an open mouth
  never reaches into the upper half of the crop that the generator sees unmasked.

Clips are written as ordinary mp4 files (lossless H.264 + AAC, so a seed always gives the same
pictures) under ``OUT/train`` and ``OUT/val`` and go through `lipdub preprocess` like real
footage. `mouth_opening()` measures the opening back from a 96x96 face crop; the
proof-of-learning benchmark uses it on generated and true faces.
"""
from __future__ import annotations

import json
import os
import wave
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from scipy.signal import lfilter

from ..errors import LipdubError
from ..faces import load_detector
from ..media import VideoSource, VideoWriter, is_image, load_audio, read_image

SR = 16000
MOUTH_LEAD = 0.02  # seconds the mouth shape runs ahead of the sound
FACE_WIDTH = 100  # face-box width of the stored face textures, pixels
# Lowest CenterFace score a face must keep with its mouth wide open, over four varied renders
# (`open_mouth_score`; the detector's own threshold is 0.5). Measured: p1 (astronaut) 0.00, the
# other seven 0.70-0.81. With p1 in, preprocess lost 34-58 % of the frames of its clips, those
# with the mouth open (mean opening 0.72-0.83 in the lost frames against 0.12-0.29 in the kept).
OPEN_MOUTH_MIN_SCORE = 0.6

# (file, frame index for videos, face index from the left)
FACE_SOURCES = [
    ("p1_astronaut_eileen_collins_512.png", 0, 0),
    ("p2_woman_frontal_closed_mouth_474.png", 0, 0),
    ("p3_two_people_1126x661.jpg", 0, 0),
    ("p3_two_people_1126x661.jpg", 0, 1),
    ("v1_man_frontal_vfr_700x700.mp4", 0, 0),
    ("v2_woman_headmotion_700x700_30fps.mp4", 0, 0),
    ("v3_woman_glasses_524x524_25fps.mp4", 0, 0),
    ("v4_man_halfbody_hevc_1080x1920_25fps.mp4", 0, 0),
]

# speech recordings: (file, train part [start, stop) seconds, val part)
SPEECH_SOURCES = [
    ("a1_en_radio_16k_stereo.wav", (0.0, 5.6), (5.6, 8.0)),
    ("a2_en_48k_stereo.wav", (0.0, 5.1), None),
    ("a3_zh_mandarin_aishell_16k_mono.wav", None, (0.0, 4.3)),
]


def default_media_dir() -> Path:
    env = os.environ.get("LIPDUB_SHARED")
    here = Path(__file__).resolve().parents[2]
    for base in ([Path(env)] if env else []) + [here.parent / "shared", here / "shared"]:
        if (base / "media").is_dir():
            return base / "media"
    raise LipdubError("shared media folder not found (set LIPDUB_SHARED or use --media)")


# ------------------------------------------------------------------------------------------ faces


@dataclass
class FaceTexture:
    image: np.ndarray  # BGR uint8, mouth painted out
    alpha: np.ndarray  # float32 0..1, soft ellipse around the head
    mouth: tuple[float, float]  # centre (x, y)
    mouth_width: float  # corner distance
    angle: float  # degrees, mouth line tilt
    lip: tuple[int, int, int]  # BGR lip colour


def _first_frame(path: Path, index: int) -> np.ndarray:
    if is_image(path):
        return read_image(path)
    for i, (_, frame) in enumerate(VideoSource(path).clock()):
        if i == index:
            return frame
    raise LipdubError(f"{path} has fewer than {index + 1} frames")


def load_faces(media: Path, detector=None, skipped: list[str] | None = None) -> list[FaceTexture]:
    """Face textures from the shared media, mouths painted out (see the module docstring).

    A face is left out (and named in `skipped`) when the detector that `lipdub preprocess` uses
    does not find it confidently (score >= OPEN_MOUTH_MIN_SCORE) with its mouth wide open."""
    detector = detector or load_detector("centerface")
    faces = []
    skipped = [] if skipped is None else skipped
    for name, frame_index, face_index in FACE_SOURCES:
        path = media / name
        if not path.is_file():
            continue
        image = _first_frame(path, frame_index)
        found = sorted(detector.detect([image])[0], key=lambda f: f.box[0])
        if face_index >= len(found) or found[face_index].landmarks is None:
            continue
        face = found[face_index]
        scale = FACE_WIDTH / face.width
        x1, y1, x2, y2 = face.box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half_w, half_h = 0.95 * face.width, 0.95 * face.height
        # crop around the face (replicate the border where it runs off the image)
        M = np.array([[scale, 0, half_w * scale - cx * scale], [0, scale, half_h * scale - cy * scale]])
        size = (int(round(2 * half_w * scale)), int(round(2 * half_h * scale)))
        tex = cv2.warpAffine(image, M, size, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
        lm = face.landmarks * scale + np.array([M[0, 2], M[1, 2]])
        (lx, ly), (rx, ry) = lm[3], lm[4]
        mouth = ((lx + rx) / 2, (ly + ry) / 2)
        width = float(np.hypot(rx - lx, ry - ly))
        angle = float(np.degrees(np.arctan2(ry - ly, rx - lx)))
        tex = _paint_out_mouth(tex, mouth, width, angle)
        h, w = tex.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        fx1, fy1 = (x1 - cx) * scale + size[0] / 2, (y1 - cy) * scale + size[1] / 2
        fx2, fy2 = (x2 - cx) * scale + size[0] / 2, (y2 - cy) * scale + size[1] / 2
        ex, ey = (fx1 + fx2) / 2, (fy1 + fy2) / 2 + 0.02 * h
        rx_, ry_ = 0.78 * (fx2 - fx1), 0.72 * (fy2 - fy1)
        r = np.sqrt(((xx - ex) / rx_) ** 2 + ((yy - ey) / ry_) ** 2)
        alpha = np.clip((1.15 - r) / 0.3, 0, 1).astype(np.float32)
        # lips: the skin below the mouth pushed towards red
        skin = np.median(tex[int(mouth[1] + 0.25 * width) : int(mouth[1] + 0.45 * width),
                             int(mouth[0] - 0.3 * width) : int(mouth[0] + 0.3 * width)].reshape(-1, 3), axis=0)
        lip = tuple(int(v) for v in np.clip(np.array([skin[0] * 0.55, skin[1] * 0.5, min(255, skin[2] * 0.95 + 30)]), 0, 255))
        texture = FaceTexture(tex, alpha, mouth, width, angle, lip)
        score = open_mouth_score(texture, detector)
        if score < OPEN_MOUTH_MIN_SCORE:
            # The detector would lose this face whenever its mouth opens wide: preprocess would
            # then drop exactly the open-mouth frames, and the data set would teach (and measure)
            # mostly closed mouths for it.
            skipped.append(f"{name}#{face_index} (open-mouth detection score {score:.2f})")
            continue
        faces.append(texture)
    if not faces:
        raise LipdubError(f"no usable face found in {media}")
    return faces


def open_mouth_score(tex: FaceTexture, detector, size: int = 160, renders: int = 4) -> float:
    """The detector's lowest best-face score over `renders` frames of this face with the mouth wide
    open (opening 1), each with its own colour cast, face size, pose and background (as
    `render_clip` varies them, from fixed seeds)."""
    scores = []
    for k in range(renders):
        frame = render_clip(tex, np.random.default_rng([k, 17]), np.ones(1), np.ones(1), size, 25.0)[0]
        scores.append(max((f.score for f in detector.detect([frame])[0]), default=0.0))
    return float(min(scores))


def _paint_out_mouth(tex: np.ndarray, mouth, width: float, angle: float) -> np.ndarray:
    mask = np.zeros(tex.shape[:2], np.uint8)
    cv2.ellipse(mask, (int(mouth[0]), int(mouth[1])), (int(0.85 * width), int(0.45 * width)), angle, 0, 360, 255, -1)
    return cv2.inpaint(tex, mask, 5, cv2.INPAINT_TELEA)


def draw_mouth(tex: FaceTexture, opening: float, spread: float) -> np.ndarray:
    """The face texture with a mouth opened `opening` (0..1), `spread` (about 0.85..1.15) wide."""
    img = tex.image.copy()
    w = tex.mouth_width * spread
    cx, cy = tex.mouth
    half_w = 0.55 * w
    gap = opening * 0.8 * tex.mouth_width  # height of the dark opening
    lip_h = 0.09 * tex.mouth_width
    # The upper lip stays where it is and the jaw drops: the mouth grows downwards only, so an
    # open mouth never shows above the mouth line (the generator's input mask hides the lower
    # half; a mouth that grew upwards would leak its opening into the visible upper half).
    a = np.radians(tex.angle)
    mx, my = cx - np.sin(a) * gap / 2, cy + np.cos(a) * gap / 2
    shift = 2  # cv2 fixed-point: coordinates times 4
    center = (int(round(mx * 4)), int(round(my * 4)))
    outer = (int(round(half_w * 4)), int(round((lip_h + gap / 2) * 4)))
    cv2.ellipse(img, center, outer, tex.angle, 0, 360, tex.lip, -1, cv2.LINE_AA, shift)
    if gap > 0.5:
        inner = (int(round(half_w * 0.82 * 4)), int(round(gap / 2 * 4)))
        cv2.ellipse(img, center, inner, tex.angle, 0, 360, (30, 18, 40), -1, cv2.LINE_AA, shift)
        if opening > 0.35:  # upper teeth, just under the upper lip
            teeth = (int(round(half_w * 0.5 * 4)), int(round(gap * 0.09 * 4)))
            tc = (int(round((mx + np.sin(a) * gap * 0.4) * 4)), int(round((my - np.cos(a) * gap * 0.4) * 4)))
            cv2.ellipse(img, tc, teeth, tex.angle, 0, 360, (215, 225, 230), -1, cv2.LINE_AA, shift)
    else:
        x0, x1 = cx - half_w * 0.9, cx + half_w * 0.9
        cv2.line(img, (int(x0 * 4), center[1]), (int(x1 * 4), center[1]), (50, 40, 90), 1, cv2.LINE_AA, shift)
    return img


def mouth_opening(face: np.ndarray) -> float:
    """How open the mouth of a 96x96 BGR face crop is: mean darkness of the lower-middle region.

    The synthetic mouth's opening is drawn near-black and everything else around it is skin or
    lips, so darkness there grows with the opening. Works on blurry generated faces too (it is
    a soft measure); compare values within one clip (identities differ in their baseline).
    """
    face = np.asarray(face)
    if face.shape[:2] != (96, 96):
        face = cv2.resize(face, (96, 96), interpolation=cv2.INTER_AREA)
    region = face[52:90, 24:72].astype(np.float32)
    gray = region @ np.array([0.114, 0.587, 0.299], np.float32)
    return float(np.clip((100.0 - gray) / 100.0, 0, 1).mean())


# ------------------------------------------------------------------------------------------ audio


def _resample(x: np.ndarray, factor: float) -> np.ndarray:
    """Play `x` `factor` times faster (linear interpolation; pitch moves too, like tape)."""
    n = max(2, int(len(x) / factor))
    return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)


def _normalise(x: np.ndarray, db: float = -20.0) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) + 1e-9
    return (x * (10 ** (db / 20) / rms)).astype(np.float32)


def babble(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Speech-like sound: voiced syllables (pulse train through two formant resonators) and noise bursts."""
    n = int(seconds * SR)
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(0, 0.15) * SR)
    vowels = [(730, 1090), (270, 2290), (300, 870), (530, 1840), (660, 1720), (490, 1350), (440, 1020)]
    while pos < n:
        dur = int(rng.uniform(0.09, 0.32) * SR)
        t = np.arange(dur) / SR
        if rng.random() < 0.2:  # fricative
            sig = rng.standard_normal(dur).astype(np.float32)
            sig = lfilter([1, -0.95], [1], sig) * 0.3
        else:
            f0 = rng.uniform(95, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
            phase = np.cumsum(f0 / SR)
            pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
            sig = pulses
            f1, f2 = vowels[rng.integers(len(vowels))]
            for f, bw in ((f1 * rng.uniform(0.9, 1.1), 90), (f2 * rng.uniform(0.9, 1.1), 120)):
                r = np.exp(-np.pi * bw / SR)
                sig = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / SR), r * r], sig)
        env = np.minimum(1, np.minimum(t / 0.03, (t[-1] - t + 1e-3) / 0.05))
        seg = (sig * env).astype(np.float32)
        seg = _normalise(seg, rng.uniform(-26, -16))
        stop = min(n, pos + dur)
        out[pos:stop] += seg[: stop - pos]
        pos = stop + int((rng.uniform(0, 0.08) if rng.random() < 0.75 else rng.uniform(0.15, 0.45)) * SR)
    return out


def load_speech(media: Path) -> dict[str, list[np.ndarray]]:
    """Speech pieces per split ('train', 'val') from the shared recordings."""
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for name, train_part, val_part in SPEECH_SOURCES:
        path = media / name
        if not path.is_file():
            continue
        wav = load_audio(path)
        for split, part in (("train", train_part), ("val", val_part)):
            if part is not None:
                piece = wav[int(part[0] * SR) : int(part[1] * SR)]
                if len(piece) > SR // 2:
                    pools[split].append(_normalise(piece))
    return pools


def make_audio(rng: np.random.Generator, seconds: float, pool: list[np.ndarray]) -> np.ndarray:
    """`seconds` of speech: recording pieces and babble, with pauses, level-varied, over a faint noise floor."""
    n = int(seconds * SR)
    out = np.zeros(n, np.float32)
    pos = int(rng.uniform(0, 0.3) * SR)
    while pos < n:
        length = rng.uniform(0.7, 2.2)
        if pool and rng.random() < 0.6:
            src = pool[rng.integers(len(pool))]
            src = _resample(src, rng.uniform(0.85, 1.2))
            take = min(len(src), int(length * SR))
            start = rng.integers(0, max(1, len(src) - take))
            seg = src[start : start + take]
        else:
            seg = babble(rng, length)
        seg = seg * 10 ** (rng.uniform(-6, 4) / 20)
        stop = min(n, pos + len(seg))
        out[pos:stop] += seg[: stop - pos]
        pos = stop + int(rng.uniform(0.1, 0.5) * SR)
    out += (rng.standard_normal(n) * 10 ** (-62 / 20)).astype(np.float32)
    return np.clip(out, -0.99, 0.99)


def mouth_track(wav: np.ndarray, fps: float, n_frames: int, lead: float = MOUTH_LEAD) -> tuple[np.ndarray, np.ndarray]:
    """(opening 0..1, spread) per video frame from the speech band energy `lead` s after each frame's time."""
    half = int(0.03 * SR)
    window = np.hanning(2 * half)
    freqs = np.fft.rfftfreq(2 * half, 1 / SR)
    low = (freqs >= 250) & (freqs < 1500)
    high = (freqs >= 1500) & (freqs < 4000)
    padded = np.pad(wav.astype(np.float64), half)
    opening = np.zeros(n_frames)
    spread = np.ones(n_frames)
    for i in range(n_frames):
        c = int(round((i / fps + lead) * SR)) + half
        spec = np.abs(np.fft.rfft(padded[c - half : c + half] * window)) ** 2
        e_low, e_high = spec[low].sum() + 1e-10, spec[high].sum() + 1e-10
        db = 10 * np.log10((e_low + e_high) / (2 * half) ** 2 * 4)
        opening[i] = np.clip((db + 52) / 32, 0, 1)
        spread[i] = 0.85 + 0.3 / (1 + np.exp(-1.5 * np.log10(e_high / e_low) - 0.8))
    return opening, spread


# ---------------------------------------------------------------------------------------- picture


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    big = size * 2
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, big)[:, None, None]
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    t = (t - t.min()) / (t.max() - t.min() + 1e-9)
    bg = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    del ramp
    for _ in range(rng.integers(3, 9)):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        p = tuple(int(v) for v in rng.integers(0, big, 2))
        if rng.random() < 0.5:
            cv2.circle(bg, p, int(rng.integers(big // 20, big // 5)), color, -1, cv2.LINE_AA)
        else:
            q = tuple(int(v) for v in rng.integers(0, big, 2))
            cv2.rectangle(bg, p, q, color, -1)
    noise = rng.normal(0, 4, bg.shape)
    return np.clip(bg + noise, 0, 255).astype(np.uint8)


@dataclass
class ClipPlan:
    face: int
    seed: int
    gains: np.ndarray
    face_scale: float


def render_clip(tex: FaceTexture, rng: np.random.Generator, opening: np.ndarray, spread: np.ndarray,
                size: int, fps: float) -> list[np.ndarray]:
    n = len(opening)
    bg = _background(rng, size)
    gains = rng.uniform(0.85, 1.15, 3)
    brightness = rng.uniform(-20, 20)
    face_px = rng.uniform(0.42, 0.55) * size  # face-box width in the frame
    scale0 = face_px / FACE_WIDTH
    h, w = tex.image.shape[:2]
    # smooth head motion: sums of slow sines with random phases
    t = np.arange(n) / fps

    def wave(amp: float) -> np.ndarray:
        out = np.zeros(n)
        for _ in range(2):
            out += amp / 2 * np.sin(2 * np.pi * rng.uniform(0.08, 0.5) * t + rng.uniform(0, 2 * np.pi))
        return out

    dx, dy = wave(0.03 * size), wave(0.025 * size)
    rot, zoom = wave(4.0), 1 + wave(0.03)
    bg_vx, bg_vy = rng.uniform(-0.2, 0.2, 2) * size / 4 / max(t[-1], 1e-3)
    cx0, cy0 = size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2 + rng.uniform(-0.02, 0.06) * size
    frames = []
    for i in range(n):
        face = draw_mouth(tex, float(opening[i]), float(spread[i])).astype(np.float32)
        face = np.clip(face * gains + brightness, 0, 255)
        s = scale0 * zoom[i]
        M = cv2.getRotationMatrix2D((w / 2, h / 2), float(rot[i]), s)
        M[0, 2] += cx0 + dx[i] - w / 2
        M[1, 2] += cy0 + dy[i] - h / 2
        warped = cv2.warpAffine(face, M, (size, size), flags=cv2.INTER_LINEAR)
        a = cv2.warpAffine(tex.alpha, M, (size, size), flags=cv2.INTER_LINEAR)[..., None]
        ox = int(size / 2 + bg_vx * t[i])
        oy = int(size / 2 + bg_vy * t[i])
        ox, oy = np.clip(ox, 0, size), np.clip(oy, 0, size)
        back = bg[oy : oy + size, ox : ox + size].astype(np.float32)
        frames.append(np.clip(warped * a + back * (1 - a), 0, 255).astype(np.uint8))
    return frames


def write_wav(path: Path, wav: np.ndarray, rate: int = SR) -> None:
    pcm = np.clip(np.round(np.asarray(wav, np.float64) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm.tobytes())


def synth(out_dir: Path, clips: int = 40, seconds: float = 4.0, size: int = 160, fps: int = 25,
          val_fraction: float = 0.2, seed: int = 0, media: Path | None = None, progress: bool = True) -> dict:
    """Write `clips` synthetic talking-face videos under out_dir/{train,val}/; returns a summary."""
    if clips < 1:
        raise LipdubError("--clips must be at least 1")
    if seconds < 1.0:
        raise LipdubError("--seconds must be at least 1")
    if size < 64:
        raise LipdubError("--size must be at least 64")
    out_dir = Path(out_dir)
    media = Path(media) if media else default_media_dir()
    skipped_faces: list[str] = []
    faces = load_faces(media, skipped=skipped_faces)
    pools = load_speech(media)
    n_val = int(round(clips * val_fraction)) if clips > 1 else 0
    if clips > 1 and val_fraction > 0:
        n_val = max(1, n_val)
    n_frames = int(round(seconds * fps))
    written = []
    for k in range(clips):
        split = "val" if k >= clips - n_val else "train"
        rng = np.random.default_rng([seed, k, 7 if split == "val" else 3])
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"clip{k:04d}.mp4"
        if path.exists():
            written.append(str(path))
            continue
        wav = make_audio(rng, n_frames / fps + 0.1, pools[split])
        opening, spread = mouth_track(wav, fps, n_frames)
        tex = faces[k % len(faces)]
        frames = render_clip(tex, rng, opening, spread, size, fps)
        wav_path = folder / f".clip{k:04d}.wav"
        write_wav(wav_path, wav)
        try:
            # Lossless H.264 (crf 0): the decoded pictures are exactly the rendered ones. Lossy
            # x264 output is not repeatable here: the same frames, encoded in three processes,
            # gave different bitstreams (and pictures) for 1 to 6 of 12 clips, with one encoder
            # thread too; so lossy clips made a different data set on every run.
            with VideoWriter(path, size, size, Fraction(fps), audio_path=wav_path, crf=0) as writer:
                for frame in frames:
                    writer.write(frame)
        finally:
            wav_path.unlink(missing_ok=True)
        np.save(folder / f"clip{k:04d}.opening.npy", opening.astype(np.float32))
        written.append(str(path))
        if progress:
            print(f"synth: {path} ({split}, face {k % len(faces)})", flush=True)
    summary = {"clips": clips, "val": n_val, "seconds": seconds, "size": size, "fps": fps,
               "faces": len(faces), "faces_left_out": skipped_faces, "files": written}
    (out_dir / "synth.json").write_text(json.dumps(summary, indent=2))
    return summary
