"""LSE-D / LSE-C (syncnet_python's recipe, streaming) and PSNR / SSIM."""
import json
import math
import weakref

import numpy as np
import pytest
import torch

from lipdub.metrics import compute_lse, mfcc_features, psnr, ssim, sync_distances
from lipdub.metrics.lse import medfilt
from lipdub.models.syncnet import SyncNetV2

from .conftest import SPECS, load_spec_module

CLIP = "v3_woman_glasses_524x524_25fps.mp4"
N_FRAMES = 40
N_SAMPLES = 60 * 640  # audio longer than the clip: min_length = 40 frames -> 35 windows
VSHIFT = 15


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip(media):
    """40 face crops (224x224 BGR uint8) and the clip's audio as 16 kHz mono int16."""
    import av
    import cv2
    path = str(media / CLIP)
    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            img = frame.to_ndarray(format="bgr24")  # 524x524; the face spans about x 110..410, y 140..440
            frames.append(cv2.resize(img[140:440, 110:410], (224, 224), interpolation=cv2.INTER_AREA))
            if len(frames) == N_FRAMES:
                break
    chunks = []
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    with av.open(path) as container:
        for frame in container.decode(audio=0):
            chunks.extend(o.to_ndarray() for o in resampler.resample(frame))
        chunks.extend(o.to_ndarray() for o in resampler.resample(None))
    samples = np.concatenate(chunks, axis=1).reshape(-1)
    assert samples.dtype == np.int16 and len(samples) >= N_SAMPLES
    return frames, samples[:N_SAMPLES]


@pytest.fixture(scope="module")
def model():
    net = SyncNetV2().eval()
    schema = json.loads((SPECS / "syncnet_v2_state_dict.json").read_text())
    net.load_state_dict(load_spec_module("fill_rule_b").fill_state_dict(schema))
    return net


@pytest.fixture(scope="module")
def result(model, clip):
    frames, samples = clip
    return sync_distances(model, iter(frames), mfcc_features(samples), num_samples=len(samples))


# ----------------------------------------------------------------------------- independent reference


def naive_lse(lip_fn, aud_fn, frames, mfcc, n_samples, vshift=VSHIFT, valid=None):
    """The metric written out directly: every feature at once, full distance matrix in numpy."""
    n = min(len(frames), n_samples // 640)
    positions = n - 5
    video = np.stack(frames[:n]).astype(np.float32)  # (n, H, W, 3)
    lip = []
    with torch.no_grad():
        for start in range(0, positions, 16):  # chunks only to bound the test's own memory
            chunk = np.stack([video[v:v + 5] for v in range(start, min(start + 16, positions))])
            lip.append(lip_fn(torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 4, 1, 2, 3)))))
        lip = torch.cat(lip).double().numpy()
        aud_in = np.stack([mfcc[:, 4 * v:4 * v + 20] for v in range(positions)])[:, None].astype(np.float32)
        aud = aud_fn(torch.from_numpy(aud_in)).double().numpy()
    dim = aud.shape[1]
    padded = np.concatenate([np.zeros((vshift, dim)), aud, np.zeros((vshift, dim))])
    dist = np.empty((positions, 2 * vshift + 1))
    for v in range(positions):
        for j in range(2 * vshift + 1):
            dist[v, j] = np.sqrt(np.sum((lip[v] - padded[v + j] + 1e-6) ** 2))
    keep = np.ones(positions, bool)
    if valid is not None:
        for v in range(positions):
            keep[v] = all(valid[v:v + 5])
    dist = dist[keep]
    mean = dist.mean(axis=0)
    lo = int(np.argmin(mean))
    return dict(dists=dist, windows=np.flatnonzero(keep), mean=mean, lse_d=mean[lo],
                lse_c=np.median(mean) - mean[lo], offset=vshift - lo)


# ----------------------------------------------------------------------------- real clip, rule-B SyncNetV2


def test_mfcc_features_shape_and_scale(clip):
    _, samples = clip
    mf = mfcc_features(samples)
    assert mf.shape == (13, 1 + math.ceil((len(samples) - 400) / 160))
    # raw int16 scale: the first coefficient is the log frame energy, so doubling adds log(4)
    mf2 = mfcc_features(samples.astype(np.float64) * 2)
    np.testing.assert_allclose(mf2[0] - mf[0], np.log(4.0), atol=1e-9)
    np.testing.assert_allclose(mf2[1:], mf[1:], atol=1e-9)


def test_lse_matches_direct_computation(model, clip, result):
    frames, samples = clip
    ref = naive_lse(model.forward_lip, model.forward_aud, frames, mfcc_features(samples), len(samples))
    assert result["n_frames"] == N_FRAMES and result["n_positions"] == N_FRAMES - 5
    assert result["n_windows"] == N_FRAMES - 5 and result["n_skipped"] == 0
    np.testing.assert_array_equal(result["windows"], ref["windows"])
    scale = ref["dists"].max()  # distances are ~1e4 with random weights: compare relative to that
    err = np.abs(result["dists"] - ref["dists"]).max()
    print(f"LSE vs direct computation: max |dist diff| {err:.3g} (distances up to {scale:.4g})")
    assert err <= 2e-6 * scale
    np.testing.assert_allclose(result["mean_dists"], ref["mean"], rtol=2e-6)
    assert result["lse_d"] == pytest.approx(ref["lse_d"], rel=2e-6)
    assert result["lse_c"] == pytest.approx(ref["lse_c"], abs=2e-6 * scale)
    assert result["offset"] == ref["offset"]
    np.testing.assert_array_equal(result["offsets"], VSHIFT - np.arange(2 * VSHIFT + 1))
    # syncnet_python's framewise confidence, and the per-window median - min
    lo = VSHIFT - result["offset"]
    np.testing.assert_allclose(result["frame_conf"], np.median(ref["mean"]) - ref["dists"][:, lo], atol=2e-6 * scale)
    np.testing.assert_allclose(result["window_conf"], np.median(ref["dists"], 1) - ref["dists"].min(1), atol=2e-6 * scale)


def test_lse_convenience_wrapper(model, clip, result):
    frames, samples = clip
    again = compute_lse(model, frames, samples)
    np.testing.assert_allclose(again["dists"], result["dists"], rtol=1e-6)


def test_audio_delay_shifts_the_distance_curve(model, clip, result):
    """Prepending k frames of silence delays the audio by k frames. For every window the distance at
    curve index j then equals the undelayed distance at j - k, wherever both compare the same audio
    window (or both a zero pad): exactly, not just on average."""
    frames, samples = clip
    k = 3
    delayed = np.concatenate([np.zeros(k * 640, np.int16), samples])
    mf0, mf1 = mfcc_features(samples), mfcc_features(delayed)
    # 640 samples = 4 MFCC hops exactly: same frames, equal up to FFT rounding
    np.testing.assert_allclose(mf1[:, 4 * k:], mf0, rtol=1e-12, atol=1e-12)
    res = sync_distances(model, iter(frames), mf1, num_samples=len(delayed))
    assert res["n_windows"] == result["n_windows"] == 35
    positions = result["n_positions"]
    d0, d1 = result["dists"].astype(np.float64), res["dists"].astype(np.float64)
    w = np.arange(positions)[:, None]
    j = np.arange(2 * VSHIFT + 1)[None, :]
    pos = w + j - VSHIFT  # audio position compared in the delayed run; the same audio is at pos - k before
    same = (j >= k) & ((pos < 0) | ((pos >= k) & (pos < positions)) | (pos - k >= positions))
    same = np.broadcast_to(same, d1.shape)
    shifted0 = np.full_like(d0, np.nan)
    shifted0[:, k:] = d0[:, :-k]
    scale = d0.max()
    err = np.abs(d1[same] - shifted0[same]).max()
    print(f"delay by {k}: {same.sum()} coinciding entries, max diff {err:.3g}")
    assert same.sum() > 0.75 * d1.size
    assert err <= 2e-6 * scale
    # where the two runs compare different things (silence-led windows / pads), they do differ
    differ = (j >= k) & ~np.broadcast_to(same, d1.shape)
    assert np.abs(d1[differ] - shifted0[differ]).min() > 1e-3 * scale
    # hence the mean curve over the coinciding windows is shifted by exactly k positions
    both = same[:, k:].all(axis=0)
    np.testing.assert_allclose(d1[:, k:][:, both].mean(0), d0[:, :-k][:, both].mean(0), rtol=2e-6)


def test_invalid_frames_skip_windows(model, clip, result):
    frames, samples = clip
    valid = np.ones(N_FRAMES, bool)
    valid[[3, 22]] = False
    res = sync_distances(model, iter(frames), mfcc_features(samples), num_samples=len(samples), valid=valid)
    expect = [v for v in range(N_FRAMES - 5) if valid[v:v + 5].all()]
    np.testing.assert_array_equal(res["windows"], expect)
    assert res["n_windows"] == len(expect) and res["n_skipped"] == N_FRAMES - 5 - len(expect)
    # skipping a window changes nothing for the others (audio features exist for every position)
    np.testing.assert_allclose(res["dists"], result["dists"][expect], rtol=2e-6)
    np.testing.assert_allclose(res["mean_dists"], result["dists"][expect].mean(0), rtol=2e-6)
    # None frames are the same as flagged ones
    with_none = [None if not ok else f for f, ok in zip(frames, valid)]
    res2 = sync_distances(model, iter(with_none), mfcc_features(samples), num_samples=len(samples))
    np.testing.assert_allclose(res2["dists"], res["dists"], rtol=1e-6)


# ----------------------------------------------------------------------------- cheap stand-in models


class Timecode(torch.nn.Module):
    """Lip feature of a window = bump at its first frame's pixel value; audio feature = bump at the
    MFCC window's first value. Equal codes give (almost) zero distance, so the offset is known."""

    @staticmethod
    def bump(t):
        d = torch.arange(1024, dtype=torch.float32)
        return torch.exp(-((d[None, :] - 8 * t[:, None]) ** 2) / 32.0)

    def forward_lip(self, x):
        return self.bump(x[:, 0, 0, 0, 0])

    def forward_aud(self, x):
        return self.bump(x[:, 0, 0, 0])


class Projection(torch.nn.Module):
    """Deterministic random features (cheap): pooled pixels / MFCC windows through fixed matrices."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("wl", torch.randn(3 * 5 * 8 * 8, 32, generator=g, dtype=torch.float64) / 20)
        self.register_buffer("wa", torch.randn(13 * 20, 32, generator=g, dtype=torch.float64) / 30)

    def forward_lip(self, x):
        pooled = x.double().reshape(x.shape[0], 3, 5, 8, 28, 8, 28).mean((4, 6)) / 255
        return torch.tanh(pooled.reshape(x.shape[0], -1) @ self.wl).float()

    def forward_aud(self, x):
        return torch.tanh(x.double().reshape(x.shape[0], -1) / 100 @ self.wa).float()


@pytest.mark.parametrize("delay", [-3, 0, 2])
def test_offset_sign_convention(delay):
    n = 60
    frames = [np.full((224, 224, 3), t, np.uint8) for t in range(n)]
    mfcc = np.tile(np.arange(4 * n + 16) / 4.0 - delay, (13, 1))  # audio position a holds time a - delay
    res = sync_distances(Timecode(), iter(frames), mfcc, num_samples=n * 640)
    assert res["offset"] == -delay  # audio lagging the video by k frames -> offset -k
    hit = res["dists"][:, VSHIFT + delay]
    inside = (res["windows"] + delay >= 0) & (res["windows"] + delay < res["n_positions"])
    assert np.all(hit[inside] < 1e-4)


@pytest.mark.parametrize("batch_size,vshift", [(1, 15), (7, 15), (20, 15), (20, 4)])
def test_streaming_equals_direct_on_long_clip(clip, batch_size, vshift):
    frames, _ = clip
    rng = np.random.default_rng(1)
    long_frames = [frames[i % len(frames)] for i in range(150)]
    mfcc = rng.normal(0, 20, size=(13, 700))
    valid = rng.random(150) > 0.03
    n_samples = 141 * 640 + 17  # audio shorter than the video: 141 frames used
    m = Projection()
    res = sync_distances(m, iter(long_frames), mfcc, batch_size=batch_size, vshift=vshift,
                         valid=valid, num_samples=n_samples)
    ref = naive_lse(m.forward_lip, m.forward_aud, long_frames, mfcc, n_samples, vshift=vshift, valid=valid)
    assert res["n_frames"] == 141 and res["n_positions"] == 136
    np.testing.assert_array_equal(res["windows"], ref["windows"])
    np.testing.assert_allclose(res["dists"], ref["dists"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res["mean_dists"], ref["mean"], rtol=1e-5)
    assert res["offset"] == ref["offset"]
    assert res["lse_d"] == pytest.approx(ref["lse_d"], rel=1e-5)
    assert res["lse_c"] == pytest.approx(ref["lse_c"], abs=1e-5)


def test_memory_does_not_grow_with_length():
    batch_size, n = 8, 240
    alive, peak = [], [0]

    def gen():
        rng = np.random.default_rng(2)
        for _ in range(n):
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            frame = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            alive.append(weakref.ref(frame))
            yield frame
            del frame

    res = sync_distances(Projection(), gen(), np.zeros((13, 4 * n + 16)), batch_size=batch_size, num_samples=n * 640)
    assert res["n_windows"] == n - 5
    assert peak[0] <= batch_size + 6, peak[0]


@pytest.mark.parametrize("n_samples", [401, 1917, 6400, 6799, 6800, 6960, 7039, 12345])
def test_audio_length_inferred_from_mfcc(n_samples):
    n_mfcc = 1 + math.ceil((n_samples - 400) / 160)  # python_speech_features' frame count
    frames = (np.zeros((224, 224, 3), np.uint8) for _ in range(100))
    res = sync_distances(Projection(), frames, np.zeros((13, n_mfcc)))
    assert res["n_frames"] in (n_samples // 640, n_samples // 640 - 1)
    assert res["n_positions"] == max(res["n_frames"] - 5, 0)


def test_medfilt_matches_scipy():
    import scipy.signal as signal
    x = np.random.default_rng(3).normal(size=37)
    np.testing.assert_allclose(medfilt(x, 9), signal.medfilt(x, kernel_size=9))


def test_no_window():
    res = sync_distances(Projection(), iter([np.zeros((224, 224, 3), np.uint8)] * 4), np.zeros((13, 100)), num_samples=6400)
    assert res["n_windows"] == 0 and res["offset"] is None and math.isnan(res["lse_d"])
    with pytest.raises(ValueError):
        sync_distances(Projection(), iter([np.zeros((96, 96, 3), np.uint8)] * 8), np.zeros((13, 100)))


# ----------------------------------------------------------------------------- PSNR / SSIM


def _gaussian_window(size=11, sigma=1.5):
    x = np.arange(size) - size // 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_direct(x, y, peak):
    """Wang et al. written out: weighted statistics of every fully-inside 11x11 window."""
    w = _gaussian_window()
    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr():
    rng = np.random.default_rng(4)
    a = rng.integers(10, 246, (32, 40, 3)).astype(np.uint8)
    assert psnr(a, a) == math.inf
    b = (a.astype(int) + rng.choice([-5, 5], a.shape)).astype(np.uint8)  # every error is exactly +-5: MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    assert psnr(a / 255.0, b / 255.0) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    mask = np.zeros((32, 40), bool)
    mask[8:24, 10:30] = True
    c = b.copy()
    c[~mask] = 0  # large errors outside the mask are ignored
    assert psnr(a, c, mask=mask) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    assert psnr(a, c) < 20


def test_ssim():
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
    img = np.stack([np.full((40, 48), 0, np.uint8)] * 3, -1)
    img[:] = base
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert ssim(img[..., 0], img[..., 0]) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(img.astype(int) + rng.normal(0, 60, img.shape).round(), 0, 255).astype(np.uint8)
    gray_direct = _ssim_direct(img[..., 0], noisy[..., 0], 255.0)
    assert ssim(img[..., 0], noisy[..., 0]) == pytest.approx(gray_direct, abs=1e-9)
    per_channel = np.mean([_ssim_direct(img[..., c], noisy[..., c], 255.0) for c in range(3)])
    assert ssim(img, noisy) == pytest.approx(per_channel, abs=1e-9)
    assert 0 < ssim(img, noisy) < 0.9
    # constant images: SSIM reduces to the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    c1 = (0.01 * 255) ** 2
    ca, cb = np.full((20, 20), 100, np.uint8), np.full((20, 20), 140, np.uint8)
    assert ssim(ca, cb) == pytest.approx((2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1), abs=1e-12)
