"""How far the default precision's output is from fp32's: face-box PSNR of `lipdub run` on v3.

    python benchmarks/bench_accuracy.py                          # deterministic (rule-A) weights
    python benchmarks/bench_accuracy.py --checkpoint trained.pth # e.g. the proof's generator

Runs the same job twice through `lipdub.sync` (v3, `--box`, its own audio up to --seconds), once with
`--precision fp32` and once with the default, both written losslessly (`crf=0`) so the encoder
adds nothing, decodes both and prints the PSNR of the face box (the only region the generator
changes) per frame: the minimum, median and mean. Issue 13's bound for the default is >= 35 dB.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import av
import numpy as np

from bench_common import MEDIA, wav2lip_checkpoint

V3 = "v3_woman_glasses_524x524_25fps.mp4"
BOX = (150, 450, 110, 410)  # top, bottom, left, right


def frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="generator .pth (default: rule-A weights)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--precision", default="auto", help="the precision compared with fp32 (default auto)")
    parser.add_argument("--blend", default="box", choices=["box", "feather"])
    args = parser.parse_args()

    import lipdub
    from lipdub.media import load_audio

    checkpoint = args.checkpoint or str(wav2lip_checkpoint())
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "speech.wav"
        pcm = load_audio(MEDIA / V3)[: int(args.seconds * 16000)]
        with av.open(str(audio), "w") as out:
            stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
            frame = av.AudioFrame.from_ndarray((np.clip(pcm, -1, 1) * 32767).astype(np.int16)[None], format="s16",
                                               layout="mono")
            frame.rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        outputs = {}
        for precision in ("fp32", args.precision):
            path = Path(tmp) / f"{precision}.mp4"
            result = lipdub.sync(MEDIA / V3, audio, path, checkpoint=checkpoint, box=BOX, blend=args.blend,
                                 precision=precision, silence="generate", crf=0, progress=False)
            outputs[precision] = (path, result.precision)
        a, b = frames(outputs["fp32"][0]), frames(outputs[args.precision][0])
    top, bottom, left, right = BOX
    values = [psnr(x[top:bottom, left:right], y[top:bottom, left:right]) for x, y in zip(a, b)]
    finite = [v for v in values if np.isfinite(v)]
    print(f"checkpoint {Path(checkpoint).name}; {len(values)} frames; fp32 vs {args.precision} "
          f"(ran as {outputs[args.precision][1]}), face box {BOX}, lossless output")
    print(f"face-box PSNR dB: min {min(values):.2f}  median {statistics.median(values):.2f}  "
          f"mean {statistics.mean(finite) if finite else float('inf'):.2f}  "
          f"({len(values) - len(finite)} frames identical)")
    print("bound >= 35 dB:", "MET" if min(values) >= 35 else "NOT MET")


if __name__ == "__main__":
    main()
