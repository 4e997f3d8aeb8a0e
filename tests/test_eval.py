"""`lipdub eval`: LSE-D / LSE-C of a video file, face crops as syncnet_python makes them, errors, CLI.

The reference computations here are written out from the published recipe (specs README section 9
and syncnet_python's run_pipeline.py crop), independently of lipdub.metrics.lse.
"""
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from lipdub.errors import LipdubError
from lipdub.models.syncnet import SyncNetV2

from .conftest import SPECS

import av
import cv2
import python_speech_features as psf

from lipdub import evaluate as ev

V3 = "v3_woman_glasses_524x524_25fps.mp4"
VSHIFT = 15


# ----------------------------------------------------------------------------- helpers / fixtures


def write_clip(path, frames, samples=None, fps=25, rate=16000):
    """Frames (BGR uint8) as H.264 and, when given, int16 mono samples as PCM s16le, in Matroska."""
    with av.open(str(path), "w", format="matroska") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.height, vs.width = frames[0].shape[:2]
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": "18", "preset": "ultrafast"}
        if samples is not None:
            aus = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="bgr24")
            vf.pts = i
            for pkt in vs.encode(vf):
                out.mux(pkt)
        for pkt in vs.encode():
            out.mux(pkt)
        if samples is not None:
            af = av.AudioFrame.from_ndarray(np.asarray(samples, np.int16)[None, :], format="s16", layout="mono")
            af.sample_rate, af.pts = rate, 0
            for pkt in aus.encode(af):
                out.mux(pkt)
            for pkt in aus.encode(None):
                out.mux(pkt)
    return path


def read_clip(path):
    """Decode a clip back: BGR frames and 16 kHz mono int16 samples (plain PyAV, no lipdub code)."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    chunks = []
    res = av.AudioResampler(format="s16", layout="mono", rate=16000)
    with av.open(str(path)) as c:
        for f in c.decode(audio=0):
            chunks.extend(o.to_ndarray().reshape(-1) for o in res.resample(f))
        chunks.extend(o.to_ndarray().reshape(-1) for o in res.resample(None))
    return frames, np.concatenate(chunks)


@pytest.fixture(scope="module")
def v3_source(media):
    """v3's first 100 frames cropped around the face (224x224) and its audio as 16 kHz mono int16."""
    frames = []
    with av.open(str(media / V3)) as c:
        for f in c.decode(video=0):
            img = f.to_ndarray(format="bgr24")
            frames.append(cv2.resize(img[140:440, 110:410], (224, 224), interpolation=cv2.INTER_AREA))
            if len(frames) == 100:
                break
    chunks = []
    res = av.AudioResampler(format="s16", layout="mono", rate=16000)
    with av.open(str(media / V3)) as c:
        for f in c.decode(audio=0):
            chunks.extend(o.to_ndarray().reshape(-1) for o in res.resample(f))
    return frames, np.concatenate(chunks)


@pytest.fixture(scope="module")
def rule_b_state(rule_b):
    schema = json.loads((SPECS / "syncnet_v2_state_dict.json").read_text())
    return rule_b.fill_state_dict(schema)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, rule_b_state):
    """Rule-B weights in the released syncnet_v2.model format: a bare state dict."""
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2_rule_b.model"
    torch.save(rule_b_state, path)
    return path


@pytest.fixture(scope="module")
def model(rule_b_state):
    net = SyncNetV2()
    net.load_state_dict(rule_b_state)
    return net.eval()


@pytest.fixture(scope="module")
def crop_clip(tmp_path_factory, v3_source):
    """A 45-frame 224x224 25 fps face-crop clip with its own audio (46 frames of it)."""
    frames, samples = v3_source
    path = tmp_path_factory.mktemp("clips") / "crops.mkv"
    return write_clip(path, frames[:45], samples[:46 * 640 + 123])


def run_eval(path, checkpoint, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return ev.evaluate(path, checkpoint=str(checkpoint), **kw)


# ----------------------------------------------------------------------------- the formula, written out


def direct_lse(model, frames, samples, vshift=VSHIFT):
    """LSE as published: MFCC of the int16 samples, 5-frame lip windows against 20-MFCC-frame audio
    windows, audio features zero-padded by vshift, mean distance per offset."""
    mfcc = psf.mfcc(samples, 16000).T.astype(np.float32)  # (13, n): 4 MFCC frames per video frame
    n = min(len(frames), len(samples) // 640)
    positions = n - 5
    video = np.stack(frames[:n]).astype(np.float32)
    with torch.no_grad():
        lip = torch.cat([
            model.forward_lip(torch.from_numpy(np.stack(
                [video[v:v + 5].transpose(3, 0, 1, 2) for v in range(s, min(s + 10, positions))])))
            for s in range(0, positions, 10)
        ]).double().numpy()
        aud = model.forward_aud(torch.from_numpy(
            np.stack([mfcc[None, :, 4 * v:4 * v + 20] for v in range(positions)]))).double().numpy()
    padded = np.concatenate([np.zeros((vshift, aud.shape[1])), aud, np.zeros((vshift, aud.shape[1]))])
    dists = np.empty((positions, 2 * vshift + 1))
    for v in range(positions):
        for j in range(2 * vshift + 1):
            dists[v, j] = np.sqrt(np.sum((lip[v] - padded[v + j] + 1e-6) ** 2))
    mean = dists.mean(0)
    best = int(np.argmin(mean))
    return dict(mean=mean, dists=dists, lse_d=mean[best], lse_c=np.median(mean) - mean[best],
                offset=vshift - best, conf=np.median(mean) - dists[:, best], n=n, positions=positions)


# ----------------------------------------------------------------------------- metric on a crop clip


def test_cropped_equals_direct_formula(crop_clip, checkpoint, model):
    frames, samples = read_clip(crop_clip)
    assert len(frames) == 45 and frames[0].shape == (224, 224, 3)
    want = direct_lse(model, frames, samples)
    got = run_eval(crop_clip, checkpoint, cropped=True, keep_dists=True)
    assert got["audio_shift_samples"] == 0 and got["resized_to_224"] is False
    assert got["n_frames"] == want["n"] == 45
    assert got["n_windows"] == want["positions"] == 40 and got["n_windows_skipped"] == 0
    assert got["window_start"] == list(range(40))
    assert len(got["mean_dists"]) == 31 and got["offsets"] == list(range(15, -16, -1))
    scale = want["dists"].max()
    np.testing.assert_allclose(got["dists"], want["dists"], rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(got["mean_dists"], want["mean"], rtol=0, atol=2e-6 * scale)
    assert got["offset"] == want["offset"]
    assert got["lse_d"] == pytest.approx(want["lse_d"], rel=1e-6)
    assert got["lse_c"] == pytest.approx(want["lse_c"], abs=4e-6 * scale)
    np.testing.assert_allclose(got["window_confidence"], want["conf"], rtol=0, atol=4e-6 * scale)
    assert got["frames_without_face"] == 0 and got["frames_with_face"] == 45
    # the batch size changes nothing
    again = run_eval(crop_clip, checkpoint, cropped=True, batch_size=7)
    np.testing.assert_allclose(again["mean_dists"], got["mean_dists"], rtol=1e-6)


@pytest.mark.parametrize("k", [3, -2])
def test_audio_delay_shifts_distance_curve(tmp_path, v3_source, checkpoint, k):
    """Delaying the audio by k frames moves every distance from curve index j - k to j wherever
    both runs compare the same audio window, so the mean curve over those windows shifts by k."""
    frames, samples = v3_source
    n, first = 60, 10
    length = n * 640
    plain = write_clip(tmp_path / "plain.mkv", frames[first:first + n], samples[first * 640:first * 640 + length])
    start = (first - k) * 640  # the delayed clip plays at frame t what the plain one plays at t - k
    delayed = write_clip(tmp_path / "delayed.mkv", frames[first:first + n], samples[start:start + length])
    a = run_eval(plain, checkpoint, cropped=True, keep_dists=True)
    b = run_eval(delayed, checkpoint, cropped=True, keep_dists=True)
    positions = n - 5
    assert a["n_windows"] == b["n_windows"] == positions
    da, db = np.array(a["dists"]), np.array(b["dists"])
    # audio position compared in the delayed run: v + j - 15; the same MFCC window is at that - k in
    # the plain run (its first window differs a little: pre-emphasis starts there)
    lo, hi = max(k, 0) + 1, positions + min(k, 0)
    inner = [v for v in range(positions) if v - VSHIFT + max(k, 0) >= lo and v + VSHIFT + min(k, 0) < hi]
    assert len(inner) >= 15
    js = np.arange(max(k, 0), 2 * VSHIFT + 1 + min(k, 0))
    curve_a = da[inner][:, js - k].mean(0)
    curve_b = db[inner][:, js].mean(0)
    err = np.abs(curve_b - curve_a).max()
    print(f"delay {k}: {len(inner)} windows, curve range {np.ptp(curve_a):.3g}, max shift error {err:.3g}")
    assert err <= 2e-6 * da.max()  # float32 rounding of distances around 1e4
    # and not by chance: unshifted, the curves differ by far more
    assert np.abs(db[inner][:, js].mean(0) - da[inner][:, js].mean(0)).max() > 1000 * max(err, 1e-4)


class Timecode(torch.nn.Module):
    """A stand-in SyncNet whose offset is known: the lip feature is a bump at the code a frame's
    brightness carries, the audio feature a bump at the code the MFCC log-energy carries (both
    mapped by `value = base + slope * code`, fitted on the decoded test clip), so distances are
    smallest where picture and sound carry the same code."""

    def __init__(self, lip: tuple[float, float], audio: tuple[float, float]):
        super().__init__()
        (self.lip_slope, self.lip_base), (self.slope, self.base) = lip, audio

    @staticmethod
    def bump(code):
        d = torch.arange(256, dtype=torch.float32)
        return torch.exp(-((d[None, :] - 4 * code[:, None]) ** 2) / 8.0)

    def forward_lip(self, x):
        return self.bump((x[:, 0, 0, 0, 0] - self.lip_base) / self.lip_slope)

    def forward_aud(self, x):
        return self.bump((x[:, 0, 0, 0] - self.base) / self.slope)


def timecode_clip(path, n: int, delay: int):
    """n grey 224x224 frames, frame t at level 60 + 2t; a 440 Hz tone whose level steps up with
    every 640-sample frame, `delay` frames late (a positive delay: the audio lags the picture)."""
    frames = [np.full((224, 224, 3), 60 + 2 * t, np.uint8) for t in range(n)]
    codes = np.clip(np.arange(n) - delay, 0, None)
    amplitude = np.repeat(40.0 * np.exp(0.1 * codes), 640)  # 40 to 11000: within int16
    samples = amplitude * np.sin(2 * np.pi * 440 * np.arange(n * 640) / 16000)
    return write_clip(path, frames, samples.astype(np.int16)), samples.astype(np.int16)


def test_fix_offset_shifts_the_audio_by_the_measured_offset(tmp_path):
    """Audio 3 frames late against a stand-in network whose sync is known: the measured offset is
    -3, --fix-offset moves the audio 120 ms earlier without touching the video packets, and the
    fixed copy measures in sync."""
    clip, _ = timecode_clip(tmp_path / "late.mkv", 60, delay=3)
    frames, samples = read_clip(clip)
    brightness = np.array([f[0, 0, 0] for f in frames], np.float64)
    energy = psf.mfcc(samples, 16000)[:, 0]  # log-energy per 10 ms frame, as syncnet_python computes it
    t = np.arange(5, 60)  # frames whose audio code is above 0
    model = Timecode(lip=tuple(np.polyfit(t, brightness[t], 1)), audio=tuple(np.polyfit(t - 3, energy[4 * t], 1)))
    options = dict(cropped=True, device="cpu", progress=False, model=model)
    assert ev.evaluate(clip, **options)["offset"] == -3
    fixed = tmp_path / "fixed.mkv"
    result = ev.fix_offset(clip, fixed, **options)
    assert result["offset"] == -3 and result["audio_shift"] == pytest.approx(-0.12, abs=1 / 16000)
    assert ev.evaluate(fixed, **options)["offset"] == 0
    (before, _), (after, _) = read_clip(clip), read_clip(fixed)
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


# ----------------------------------------------------------------------------- face crops


def crop_recipe(image, x, y, s, cs=0.4):
    """syncnet_python's crop: pad the whole frame by int(s(1 + 2cs)) with 110, slice, resize."""
    bsi = int(s * (1 + 2 * cs))
    frame = np.pad(image, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=(110, 110))
    my, mx = y + bsi, x + bsi
    face = frame[int(my - s):int(my + s * (1 + 2 * cs)), int(mx - s * (1 + cs)):int(mx + s * (1 + cs))]
    return cv2.resize(face, (224, 224))


def test_face_crop_matches_recipe():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    cases = [(320.0, 180.0, 60.0), (10.3, 20.7, 55.5), (630.0, 350.0, 80.2), (100.5, 300.25, 140.0),
             (0.0, 0.0, 30.0), (639.9, 0.5, 200.0)]
    cases += [(rng.uniform(0, 640), rng.uniform(0, 360), rng.uniform(8, 150)) for _ in range(20)]
    for x, y, s in cases:
        np.testing.assert_array_equal(ev.face_crop(image, x, y, s), crop_recipe(image, x, y, s), err_msg=str((x, y, s)))


def test_crop_params_smooth_each_face_run():
    import scipy.signal as signal
    rng = np.random.default_rng(1)
    n = 80
    x1, y1 = rng.uniform(100, 120, n), rng.uniform(50, 60, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(90, 110, n), y1 + rng.uniform(100, 130, n)], 1)
    valid = np.ones(n, bool)
    valid[30:50] = False  # a long gap: two runs, smoothed separately
    params = ev.crop_params(boxes, valid, cuts=[65])  # and a cut: three runs
    assert np.isnan(params[30:50]).all()
    for a, b in [(0, 30), (50, 65), (65, 80)]:
        bx = boxes[a:b]
        s = np.maximum(bx[:, 3] - bx[:, 1], bx[:, 2] - bx[:, 0]) / 2
        np.testing.assert_allclose(params[a:b, 2], signal.medfilt(s, 13))
        np.testing.assert_allclose(params[a:b, 0], signal.medfilt((bx[:, 0] + bx[:, 2]) / 2, 13))
        np.testing.assert_allclose(params[a:b, 1], signal.medfilt((bx[:, 1] + bx[:, 3]) / 2, 13))


def test_bridge_gaps():
    n = 40
    boxes = np.tile([100.0, 100.0, 200.0, 220.0], (n, 1))
    boxes[20:] += 6  # moves a little: still one face (IoU > 0.5)
    valid = np.ones(n, bool)
    valid[10:14] = False  # short gap: bridged
    valid[16:19] = False
    b, v = ev.bridge_gaps(boxes, valid)
    assert v.all()
    np.testing.assert_allclose(b[16:19], boxes[16:19])  # between equal neighbours (15, 19): the same box
    boxes2 = boxes.copy()
    boxes2[19:] += 150  # another place entirely: not bridged
    b, v = ev.bridge_gaps(boxes2, valid)
    assert not v[16:19].any() and v[10:14].all()
    b, v = ev.bridge_gaps(boxes, valid, cuts=[17])  # never across a cut
    assert not v[16:19].any()
    long = np.ones(n, bool)
    long[5:5 + ev.MAX_MISSED + 1] = False
    assert not ev.bridge_gaps(boxes, long)[1][5:30].any()
    assert not ev.bridge_gaps(boxes, ~np.eye(1, n, 0, dtype=bool)[0])[1][0]  # nothing before the first face


# ----------------------------------------------------------------------------- whole videos


def test_tracked_video_with_reference(media, checkpoint):
    """v3 end to end: 25 fps, one face throughout; against itself the face region is identical."""
    r = run_eval(media / V3, checkpoint, reference=media / V3, det_stride=2)
    assert r["n_frames"] == 121  # 122 frames, 4.87 s of audio -> floor(77973 / 640) = 121
    assert r["n_windows"] == 116 and r["frames_without_face"] == 0 and r["no_face_ranges"] == []
    assert len(r["mean_dists"]) == 31 and len(r["window_confidence"]) == 116
    # the published read-out of the distance curve, written out: offset = vshift - argmin, LSE-D = min,
    # LSE-C = median - min
    curve = np.array(r["mean_dists"])
    assert r["offset"] == VSHIFT - int(np.argmin(curve))
    assert r["lse_d"] == pytest.approx(curve.min()) and r["lse_c"] == pytest.approx(np.median(curve) - curve.min())
    assert r["psnr"] == ev.PSNR_CAP and r["ssim"] == pytest.approx(1.0) and r["quality_frames"] == 121
    json.dumps(r, allow_nan=False)


def test_reference_quality_on_crops(tmp_path, crop_clip, checkpoint):
    frames, samples = read_clip(crop_clip)
    noisy = [np.clip(f.astype(np.int16) + np.random.default_rng(i).integers(-6, 7, f.shape), 0, 255).astype(np.uint8)
             for i, f in enumerate(frames)]
    ref = write_clip(tmp_path / "ref.mkv", noisy, samples)
    r = run_eval(crop_clip, checkpoint, cropped=True, reference=ref)
    assert 20 < r["psnr"] < 60 and 0.3 < r["ssim"] < 1.0 and r["quality_frames"] == 45


# ----------------------------------------------------------------------------- errors


def test_no_audio_is_an_error(tmp_path, v3_source, checkpoint):
    path = write_clip(tmp_path / "silent.mkv", v3_source[0][:10])
    with pytest.raises(LipdubError, match="no audio stream"):
        run_eval(path, checkpoint, cropped=True)


def test_no_face_is_an_error(tmp_path, v3_source, checkpoint):
    frames = [np.full((120, 160, 3), 90 + i, np.uint8) for i in range(15)]
    path = write_clip(tmp_path / "noface.mkv", frames, v3_source[1][:15 * 640])
    with pytest.raises(LipdubError, match="no face"):
        run_eval(path, checkpoint)


def test_file_and_checkpoint_errors(tmp_path, crop_clip, checkpoint):
    with pytest.raises(LipdubError, match="not found"):
        run_eval(tmp_path / "missing.mp4", checkpoint, cropped=True)
    bad = tmp_path / "syncnet_v2.model"
    bad.write_bytes(b"\x80\x02garbage" * 100)
    with pytest.raises(LipdubError):
        run_eval(crop_clip, bad, cropped=True)
    with pytest.raises(LipdubError):
        run_eval(crop_clip, tmp_path / "nope.model", cropped=True)
    short = write_clip(tmp_path / "short.mkv", [np.zeros((224, 224, 3), np.uint8)] * 4, np.zeros(4 * 640, np.int16))
    with pytest.raises(LipdubError, match="too short"):
        run_eval(short, checkpoint, cropped=True)


# ----------------------------------------------------------------------------- CLI


def test_cli_json(crop_clip, checkpoint, capsys):
    from lipdub.cli import main

    code = main(["eval", str(crop_clip), "--cropped", "--json", "--checkpoint", str(checkpoint), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    for key in ("offset", "lse_d", "lse_c", "n_frames", "n_windows", "mean_dists", "window_confidence",
                "frames_without_face", "warnings", "timings"):
        assert key in data, key
    assert len(data["mean_dists"]) == 31 and data["n_windows"] == 40
    assert len(data["window_confidence"]) == data["n_windows"]

    code = main(["eval", str(crop_clip), "--cropped", "--quiet", "--checkpoint", str(checkpoint), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0 and "LSE-D" in text and "LSE-C" in text and "AV offset" in text


def test_cli_errors_exit_2(tmp_path, capsys):
    from lipdub.cli import main

    assert main(["eval", str(tmp_path / "missing.mp4"), "--cropped", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipdub: error:") and len(err.strip().splitlines()) == 1


def test_given_track_skips_detection(media, checkpoint):
    """A track from the caller (e.g. the pipeline's own) replaces detection; its gaps are reported."""
    n = 122
    boxes = np.tile([160.0, 150.0, 360.0, 400.0], (n, 1))
    valid = np.ones(n, bool)
    valid[50:80] = False  # longer than the bridged gaps
    r = run_eval(media / V3, checkpoint, detector="no-such-detector", track=(boxes, valid))
    assert r["detector"] is None and r["no_face_ranges"] == [[50, 80]] and r["frames_without_face"] == 30
    assert r["n_windows"] == 116 - 34 and r["n_windows_skipped"] == 34  # windows 46..79 hold a gap frame
    assert all(not (46 <= w < 80) for w in r["window_start"])


def test_track_mapped_to_25_fps():
    boxes = np.arange(60 * 4, dtype=np.float64).reshape(60, 4)
    valid = np.ones(60, bool)
    valid[30] = False
    b, v, cuts = ev._track_on_clock((boxes, valid), [31], Fraction(30), limit=1000)
    assert len(b) == 50  # 2 s
    # tick k of 25 fps shows the latest 30 fps frame i before the tick's middle: i / 30 < (k + 1/2) / 25
    index = [max(i for i in range(60) if Fraction(i, 30) < Fraction(2 * k + 1, 50)) for k in range(50)]
    assert index[:8] == [0, 1, 2, 4, 5, 6, 7, 8]  # a 30 fps frame is skipped every 5 ticks
    np.testing.assert_array_equal(b, boxes[index])
    np.testing.assert_array_equal(v, valid[index])
    assert cuts == [index.index(next(i for i in index if i >= 31))]
