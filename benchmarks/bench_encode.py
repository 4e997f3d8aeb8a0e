"""Which x264 preset and CRF `lipdub run` should encode with: speed, size and quality, measured.

    python benchmarks/bench_encode.py                  # v3 and v4, 100 frames each
    python benchmarks/bench_encode.py --frames 200 --presets ultrafast superfast veryfast

For each clip it decodes the frames once, then encodes them through `lipdub.media.VideoWriter`
with every preset and CRF asked for and prints encode frames/s (the median of --repeat runs),
bytes per second of video, and the PSNR of the decoded result against the source frames.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from bench_common import MEDIA

CLIPS = {"v3": "v3_woman_glasses_524x524_25fps.mp4", "v4": "v4_man_halfbody_hevc_1080x1920_25fps.mp4"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", default=["v3", "v4"], choices=sorted(CLIPS))
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--presets", nargs="+", default=["ultrafast", "superfast", "veryfast", "faster"])
    parser.add_argument("--crfs", nargs="+", type=int, default=[18, 20, 23])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from lipdub.media import VideoSource, VideoWriter

    for name in args.clips:
        source = VideoSource(MEDIA / CLIPS[name], max_frames=args.frames)
        frames = list(source.frames())
        fps = source.info.fps
        print(f"{name}: {len(frames)} frames {source.info.width}x{source.info.height} at {float(fps):g} fps")
        print(f"{'preset':>10} {'crf':>4} {'encode fps':>11} {'kB per s':>9} {'PSNR dB':>8}")
        for preset in args.presets:
            for crf in args.crfs:
                speeds, size, quality = [], 0, 0.0
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "out.mp4"
                    for _ in range(args.repeat):
                        start = time.perf_counter()
                        with VideoWriter(out, source.info.width, source.info.height, fps, crf=crf,
                                         preset=preset) as writer:
                            for frame in frames:
                                writer.write(frame)
                        speeds.append(len(frames) / (time.perf_counter() - start))
                    size = out.stat().st_size
                    with av.open(str(out)) as c:
                        decoded = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
                    quality = float(np.mean([psnr(a, b) for a, b in zip(decoded, frames)]))
                seconds = len(frames) / float(fps)
                print(f"{preset:>10} {crf:>4} {statistics.median(speeds):11.1f} {size / 1024 / seconds:9.0f} "
                      f"{quality:8.2f}")


if __name__ == "__main__":
    main()
