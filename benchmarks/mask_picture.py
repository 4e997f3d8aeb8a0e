"""The README picture of the feather blend's mouth mask (issue 19): one tilted v2 frame, today's
box ellipse against the landmark mask, side by side.

    python benchmarks/mask_picture.py                  # docs/mask.png
    python benchmarks/mask_picture.py --frame 160 -o /tmp/mask.png

v2 is tracked as `lipdub run` tracks it (CenterFace, default stride, pads 0 10 0 0, smoothing),
and the frame with the strongest roll of the mouth corners' line is shown unless --frame says
otherwise. Each panel tints what the blend replaces, in proportion to the mask's weight, and
outlines where the weight reaches 2 % (thin) and 98 % (thick: replaced in full); the right panel
also marks the five landmarks. The caption gives the share of the face box each mask reaches
(weight > 2 %). No network runs: the masks are the ones `lipdub.blend` builds for that frame.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipdub.blend import lower_face_mask, mouth_mask  # noqa: E402
from lipdub.faces import load_detector, track_video  # noqa: E402
from lipdub.faces.video import default_stride  # noqa: E402
from lipdub.media import VideoSource  # noqa: E402

MEDIA = ROOT.parent / "shared" / "media"
V2 = "v2_woman_headmotion_700x700_30fps.mp4"
TINT = np.array([255, 60, 200], np.float32)  # BGR magenta


def roll(points: np.ndarray) -> float:
    """Degrees the line from the left to the right mouth corner turns from the horizontal."""
    (lx, ly), (rx, ry) = points[3], points[4]
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


def panel(frame: np.ndarray, box: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int],
          title: str, points: np.ndarray | None = None, zoom: float = 1.0) -> np.ndarray:
    """The frame with `mask` (box coordinates) tinted and outlined, cut to `crop`, scaled, captioned."""
    x1, y1, x2, y2 = (int(v) for v in box)
    full = np.zeros(frame.shape[:2], np.float32)
    full[y1:y2, x1:x2] = mask
    out = frame.astype(np.float32)
    weight = 0.55 * full[:, :, None]
    out = (out * (1 - weight) + TINT * weight).round().astype(np.uint8)
    cx1, cy1, cx2, cy2 = crop
    out = cv2.resize(out[cy1:cy2, cx1:cx2], None, fx=zoom, fy=zoom, interpolation=cv2.INTER_AREA)
    part = cv2.resize(full[cy1:cy2, cx1:cx2], (out.shape[1], out.shape[0]), interpolation=cv2.INTER_LINEAR)
    for level, thickness in ((0.02, 1), (0.98, 2)):
        contours, _ = cv2.findContours((part > level).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness, lineType=cv2.LINE_AA)
    cv2.rectangle(out, (round((x1 - cx1) * zoom), round((y1 - cy1) * zoom)),
                  (round((x2 - cx1) * zoom), round((y2 - cy1) * zoom)), (90, 220, 90), 1, lineType=cv2.LINE_AA)
    if points is not None:
        for x, y in points:
            cv2.circle(out, (round((x - cx1) * zoom), round((y - cy1) * zoom)), 3, (0, 230, 255), -1,
                       lineType=cv2.LINE_AA)
    share = float((mask > 0.02).mean())
    caption = np.full((46, out.shape[1], 3), 255, np.uint8)
    cv2.putText(caption, title, (8, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.52, (20, 20, 20), 1, cv2.LINE_AA)
    cv2.putText(caption, f"reaches {100 * share:.0f} % of the face box", (8, 39), cv2.FONT_HERSHEY_SIMPLEX, 0.46,
                (90, 90, 90), 1, cv2.LINE_AA)
    return np.vstack([out, caption])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, default=MEDIA / V2)
    parser.add_argument("--frame", type=int, default=None, help="frame index (default: the most rolled one)")
    parser.add_argument("--scale", type=float, default=1.0, help="--mask-scale for both masks")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "mask.png")
    args = parser.parse_args()

    source = VideoSource(args.video)
    _, track = track_video(source, load_detector("centerface"), stride=default_stride(source.info.fps),
                           pads=(0, 10, 0, 0))
    usable = [j for j in range(len(track.valid)) if track.valid[j] and np.isfinite(track.landmarks[j]).all()]
    j = args.frame if args.frame is not None else max(usable, key=lambda k: abs(roll(track.landmarks[k])))
    frame = next(iter(source.frames_at([pts for pts, _ in source.clock()], [j])))
    box, points = track.boxes[j], track.landmarks[j]
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    today = lower_face_mask(w, h, args.scale)
    new = mouth_mask(w, h, points - (x1, y1), args.scale)
    margin = int(0.12 * w)
    crop = (max(0, x1 - margin), max(0, y1 - margin), min(frame.shape[1], x2 + margin),
            min(frame.shape[0], y2 + margin))
    zoom = 300 / (crop[2] - crop[0])
    left = panel(frame, box, today, crop, "today: ellipse in the box", zoom=zoom)
    right = panel(frame, box, new, crop, "new: from the landmarks", points, zoom=zoom)
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    picture = np.hstack([left, gap, right])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.output), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{args.output}: frame {j} of {args.video.name}, roll {roll(points):+.1f} degrees, "
          f"replaced (weight > 2 %): today {int((today > 0.02).sum())} px, new {int((new > 0.02).sum())} px "
          f"of the {w}x{h} box; {args.output.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
