"""Media I/O on the real test media: output clock (VFR/CFR), rotation, random access,
audio loading, images, the mp4 writer and the frame transform."""
import hashlib
import os
import wave
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from lipdub.errors import LipdubError
from lipdub.media import Transform, VideoSource, VideoWriter, _apply_rotation, load_audio, read_image


V1 = "v1_man_frontal_vfr_700x700.mp4"
V2 = "v2_woman_headmotion_700x700_30fps.mp4"
V3 = "v3_woman_glasses_524x524_25fps.mp4"
V4 = "v4_man_halfbody_hevc_1080x1920_25fps.mp4"
V5 = "v5_multiface_cuts_640x360_29.97fps.mp4"


def digest(frame: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frame).tobytes()).hexdigest() + str(frame.shape)


def packet_times(path) -> tuple[list[int], float]:
    """Presentation timestamps of the video packets (demuxed only, no decoding) and the time base."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = sorted(p.pts for p in c.demux(s) if p.pts is not None)
        return pts, float(s.time_base)


def clock_of(path, transform=Transform()):
    """(tick pts, frame digests) of VideoSource.clock()."""
    src = VideoSource(path, transform=transform)
    ticks, digests = [], []
    for pts, frame in src.clock():
        ticks.append(pts)
        digests.append(digest(frame))
    return src, ticks, digests


@pytest.fixture(scope="module")
def v1_clock(media):
    return clock_of(media / V1)


@pytest.fixture(scope="module")
def v5_clock(media):
    return clock_of(media / V5)


def ping_pong(n_out: int, n: int):
    """Forward, then back and forth without repeating the turning frames."""
    period = 2 * n - 2
    return [i if i < n else (i % period if i % period < n else period - i % period) for i in range(n_out)]


# ------------------------------------------------------------------------------- output clock


def test_vfr_clock_has_no_drift(media, v1_clock):
    src, ticks, _ = v1_clock
    fps = float(src.info.fps)
    assert src.info.fps == 30  # r_frame_rate, not the 22.13 average
    raw, tb = packet_times(media / V1)
    assert len(raw) == 135  # SOURCES.md

    # Tick count follows the duration, not the number of input frames (135 / 30 fps = 4.5 s would drift).
    with av.open(str(media / V1)) as c:
        container_seconds = c.duration / 1e6
        video_seconds = c.streams.video[0].duration * tb
    assert abs(len(ticks) - container_seconds * fps) <= 1.5
    assert abs(len(ticks) - video_seconds * fps) <= 1
    assert abs(src.info.n_frames_estimate - len(ticks)) <= 1  # the progress total

    # pts never go backwards and are real input timestamps; the first tick shows the first frame
    assert all(b >= a for a, b in zip(ticks, ticks[1:]))
    assert set(ticks) <= set(raw)
    assert ticks[0] == raw[0] and ticks[-1] == raw[-1]

    # No drift: tick i (at t0 + i/fps) shows a frame from at most one input gap before it and
    # never one more than half a tick after it; the error does not grow along the clip.
    t0 = raw[0] * tb
    err = np.array([p * tb - (t0 + i / fps) for i, p in enumerate(ticks)])
    max_gap = np.diff(raw).max() * tb
    assert err.max() <= 0.5 / fps + 1e-6
    assert err.min() >= -max_gap - 1e-6
    assert abs(err[-20:].mean() - err[:20].mean()) < 0.5 / fps

    # v1's gaps are exactly one tick (33 ms) or two (67 ms): each frame shows for gap/tick ticks.
    gaps = np.diff(raw)
    assert set(gaps.tolist()) == {512, 1024}
    counts = {p: ticks.count(p) for p in raw}
    assert [counts[p] for p in raw[:-1]] == (gaps // 512).tolist()
    assert counts[raw[-1]] == 1


@pytest.mark.parametrize("name, n_frames, fps", [(V3, 122, Fraction(25)), (V5, 275, Fraction(2997, 100))])
def test_cfr_clock_is_one_to_one(media, name, n_frames, fps, v5_clock):
    if name == V5:
        src, ticks, digests = v5_clock
    else:
        src, ticks, digests = clock_of(media / name)
    raw, _ = packet_times(media / name)
    assert src.info.fps == fps
    assert len(raw) == n_frames
    assert ticks == raw  # every frame exactly once, in order
    assert src.info.n_frames_estimate == n_frames
    assert len(set(digests)) > 0.9 * n_frames  # real, changing pictures
    if name == V3:  # and the frames are the decoder's frames, in presentation order
        with av.open(str(media / name)) as c:
            direct = [digest(f.to_ndarray(format="bgr24")) for f in c.decode(video=0)]
        assert digests == direct


def test_v2_30fps_clock(media):
    src = VideoSource(media / V2)
    ticks = [pts for pts, _ in src.clock()]
    assert src.info.fps == 30 and (src.info.width, src.info.height) == (700, 700)
    assert len(ticks) == 199 and len(set(ticks)) == 199 and src.info.n_frames_estimate == 199


def numbered_clip(path, fps: Fraction, n: int):
    """n frames whose index is written in binary as 8 black or white stripes (H.264), at a constant `fps`."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        stream.codec_context.time_base = 1 / fps
        for i in range(n):
            bits = np.array([(i >> b) & 1 for b in range(8)], np.uint8) * 255
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.broadcast_to(
                np.repeat(bits, 4)[None, :, None], (32, 32, 3))), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def frame_number(frame: np.ndarray) -> int:
    stripes = frame[16, 2::4, 1] > 127
    return int(sum(1 << b for b in range(8) if stripes[b]))


@pytest.mark.parametrize("fps", [Fraction(30), Fraction(2997, 100), Fraction(25), Fraction(20), Fraction(50)])
def test_clock_retimes_to_another_rate(tmp_path, fps):
    """`VideoSource(fps=25)` shows at tick k the latest frame i before the middle of the tick
    (i / fps < (k + 1/2) / 25), for as long as the source lasts (its duration rounded to ticks)."""
    n = 97
    clip = numbered_clip(tmp_path / "numbered.mp4", fps, n)
    source = VideoSource(clip, fps=25)
    shown = [frame_number(frame) for frame in source.frames()]
    assert len(shown) == int(Fraction(n) * 25 / fps + Fraction(1, 2))
    for k, i in enumerate(shown):
        assert Fraction(i) / fps * 25 < k + Fraction(1, 2)
        assert i == n - 1 or Fraction(i + 1) / fps * 25 >= k + Fraction(1, 2)
    if fps == 25:
        assert shown == list(range(n))
    assert [frame_number(f) for f in VideoSource(clip, fps=25, max_frames=5).frames()] == shown[:5]


def test_v5_starts_late_but_clock_starts_at_its_first_frame(v5_clock, media):
    src, ticks, _ = v5_clock
    raw, tb = packet_times(media / V5)
    assert raw[0] * tb == pytest.approx(0.852, abs=1e-3)  # SOURCES.md
    assert ticks[0] == raw[0]
    assert (src.info.width, src.info.height) == (640, 360)


# ----------------------------------------------------------------------------------- rotation


def test_apply_rotation_matches_display_matrix_convention():
    """FFmpeg's rotation value is counter-clockwise: -90 (phone portrait) is shown turned clockwise."""
    img = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    np.testing.assert_array_equal(_apply_rotation(img, -90), cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))
    np.testing.assert_array_equal(_apply_rotation(img, 270), cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE))
    np.testing.assert_array_equal(_apply_rotation(img, 90), cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE))
    np.testing.assert_array_equal(_apply_rotation(img, 180), cv2.rotate(img, cv2.ROTATE_180))
    np.testing.assert_array_equal(_apply_rotation(img, -180), cv2.rotate(img, cv2.ROTATE_180))
    assert _apply_rotation(img, 0) is img


def test_no_shared_media_has_rotation_and_v4_is_native_portrait(media):
    for name in (V1, V2, V3, V4, V5):
        with av.open(str(media / name)) as c:
            assert next(c.decode(video=0)).rotation == 0, name
    src = VideoSource(media / V4)  # HEVC, decodes the first frame only
    assert (src.info.width, src.info.height, src.info.rotation) == (1080, 1920, 0)
    assert src.info.fps == 25


def write_clip(path, image: np.ndarray, degrees: int | None = None, n: int = 4) -> None:
    """A few frames of `image` (shifted a little each frame), H.264, no audio, optionally with a
    display-matrix rotation."""
    h, w = image.shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "8"}
        if degrees is not None:
            s.set_display_rotation(degrees)  # PyAV >= 18 (the floor in pyproject.toml)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.roll(image, 3 * i, axis=1), format="bgr24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize(
    "degrees, cv_code", [(-90, cv2.ROTATE_90_CLOCKWISE), (90, cv2.ROTATE_90_COUNTERCLOCKWISE), (180, cv2.ROTATE_180)]
)
def test_rotation_metadata_is_honoured(media, tmp_path, degrees, cv_code):
    image = cv2.resize(read_image(media / "p2_woman_frontal_closed_mouth_474.png"), (96, 64))
    path = tmp_path / "rotated.mp4"
    write_clip(path, image, degrees)
    with av.open(str(path)) as c:
        raw = next(c.decode(video=0))
        assert (raw.width, raw.height) == (96, 64)
        assert raw.rotation % 360 == degrees % 360  # the metadata really is in the file

    src = VideoSource(path)
    expected = [cv2.rotate(np.roll(image, 3 * i, axis=1), cv_code) for i in range(4)]
    assert (src.info.height, src.info.width) == expected[0].shape[:2]
    ticks, frames = zip(*src.clock())
    assert len(frames) == 4
    for want, got in zip(expected, frames):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 4  # lossy, but the right way up
    if degrees != 180:  # the opposite turn is far off
        wrong = cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE if degrees == -90 else cv2.ROTATE_90_CLOCKWISE)
        assert np.abs(frames[0].astype(int) - wrong).mean() > 20
    # random access returns the same, rotated frames
    again = list(src.frames_at(list(ticks), [3, 1, 2, 0, 0]))
    for j, got in zip([3, 1, 2, 0, 0], again):
        np.testing.assert_array_equal(got, frames[j])


# -------------------------------------------------------------------------------- frames_at


def check_frames_at(src, ticks, digests, order):
    got = [digest(f) for f in src.frames_at(ticks, order)]
    assert len(got) == len(order)
    wrong = [j for j, g in zip(order, got) if g != digests[j]]
    assert not wrong, f"{len(wrong)} wrong frames, first at ticks {wrong[:5]}"


def test_frames_at_ping_pong_on_vfr(v1_clock):
    src, ticks, digests = v1_clock
    n = len(ticks)
    order = ping_pong(2 * n + 9, n)
    assert order[n - 1 : n + 2] == [n - 1, n - 2, n - 3] and order[2 * n - 2] == 0 and order[2 * n - 1] == 1
    check_frames_at(src, ticks, digests, order)


def test_frames_at_loop_and_backwards(v5_clock):
    src, ticks, digests = v5_clock
    n = len(ticks)
    check_frames_at(src, ticks, digests, [i % n for i in range(n + 25)])  # loop restart
    check_frames_at(src, ticks, digests, list(range(n - 1, n - 60, -1)))  # straight backwards


def test_frames_at_arbitrary_order(v5_clock):
    src, ticks, digests = v5_clock
    rng = np.random.default_rng(11)
    n = len(ticks)
    order = rng.integers(0, n, 14).tolist() + [5, 5, 5, 4, 200, 201, 59, 60, 61, 119, 120, 0]
    check_frames_at(src, ticks, digests, order)


def test_frames_at_with_duplicated_ticks_order(v1_clock):
    src, ticks, digests = v1_clock
    dup = [i for i in range(1, len(ticks)) if ticks[i] == ticks[i - 1]]
    assert dup  # VFR: some ticks repeat a frame
    order = sorted({d - 1 for d in dup[:6]} | set(dup[:6]) | {d + 1 for d in dup[:6]})
    check_frames_at(src, ticks, digests, order[::-1] + order)


def test_frames_at_applies_transform(media):
    transform = Transform(resize_factor=2, rotate=True, crop=(10, -1, 0, 200))
    src, ticks, digests = clock_of(media / V3, transform)
    assert (src.info.width, src.info.height) == (200, 262 - 10)
    with av.open(str(media / V3)) as c:
        first = [transform(f.to_ndarray(format="bgr24")) for _, f in zip(range(3), c.decode(video=0))]
    assert digests[:3] == [digest(f) for f in first]
    check_frames_at(src, ticks, digests, [100, 99, 98, 3, 2, 1, 0, 1, 2])


@pytest.mark.slow
def test_frames_at_hevc_across_keyframes(media):
    """v4: HEVC with B-frames and keyframes at 250 and 498 (about 9 s on 2 cores)."""
    src, ticks, digests = clock_of(media / V4)
    assert len(ticks) == 502
    check_frames_at(src, ticks, digests, [260, 255, 251, 250, 249, 248, 240, 501, 500, 499, 497, 496, 250])


def test_image_source(media):
    path = media / "p3_two_people_1126x661.jpg"
    src = VideoSource(path, fps=30)
    assert src.info.is_image and (src.info.width, src.info.height) == (1126, 661) and src.info.fps == 30
    items = list(src.clock())
    assert len(items) == 1 and items[0][0] == 0
    frames = list(src.frames_at([0], [0, 0, 0]))
    assert len(frames) == 3
    for f in frames:
        np.testing.assert_array_equal(f, items[0][1])


# ---------------------------------------------------------------------------------- load_audio


def test_load_audio_resamples_48k_stereo(media):
    wav = load_audio(media / "a2_en_48k_stereo.wav")
    assert wav.dtype == np.float32 and wav.ndim == 1
    with wave.open(str(media / "a2_en_48k_stereo.wav")) as fh:
        seconds = fh.getnframes() / fh.getframerate()
        pcm = np.frombuffer(fh.readframes(fh.getnframes()), "<i2").reshape(-1, 2)
    assert seconds == pytest.approx(5.013, abs=1e-3)
    assert abs(len(wav) - seconds * 16000) <= 2
    # same signal at the same level as the channel mean decimated by 3 (ideal FFT low-pass here)
    mono = pcm.astype(np.float64).mean(axis=1) / 32768
    n = len(mono) // 3 * 3
    ref = np.fft.irfft(np.fft.rfft(mono[:n])[: n // 6 + 1], n // 3) / 3
    k = min(len(ref), len(wav))
    a, b = wav[:k].astype(np.float64), ref[:k]
    assert np.corrcoef(a, b)[0, 1] > 0.99
    assert np.sqrt(np.mean(a**2) / np.mean(b**2)) == pytest.approx(1.0, abs=0.02)


def test_load_audio_from_video_with_late_video(media):
    wav = load_audio(media / V5)
    with av.open(str(media / V5)) as c:
        s = c.streams.audio[0]
        seconds = s.duration * float(s.time_base)
    assert abs(len(wav) / 16000 - seconds) < 0.03
    assert np.sqrt(np.mean(wav**2)) > 0.01


def test_load_audio_errors(media, tmp_path):
    mute = tmp_path / "mute.mp4"
    write_clip(mute, np.zeros((32, 32, 3), np.uint8), n=2)
    with pytest.raises(LipdubError, match="no audio"):
        load_audio(mute)
    with pytest.raises(LipdubError, match="no audio"):
        load_audio(media / "p1_astronaut_eileen_collins_512.png")
    with pytest.raises(LipdubError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    text = tmp_path / "notes.wav"
    text.write_text("this is not a wav file\n" * 20)
    with pytest.raises(LipdubError, match="not a recognised media file"):
        load_audio(text)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(LipdubError, match="empty"):
        load_audio(empty)
    with pytest.raises(LipdubError):
        load_audio(tmp_path)


# ---------------------------------------------------------------------------------- read_image


@pytest.mark.parametrize(
    "name, shape, exact",
    [
        ("p1_astronaut_eileen_collins_512.png", (512, 512, 3), True),
        ("p2_woman_frontal_closed_mouth_474.png", (474, 474, 3), True),
        ("p3_two_people_1126x661.jpg", (661, 1126, 3), False),
    ],
)
def test_read_image(media, name, shape, exact):
    image = read_image(media / name)
    assert image.shape == shape and image.dtype == np.uint8
    with av.open(str(media / name)) as c:  # FFmpeg's decoder as the independent reference, RGB -> BGR
        rgb = next(c.decode(video=0)).to_ndarray(format="rgb24")
    bgr = rgb[:, :, ::-1]
    if exact:
        np.testing.assert_array_equal(image, bgr)
    else:  # two JPEG decoders (and upsamplers) may differ by a level here and there
        assert np.abs(image.astype(int) - bgr).mean() < 1.5
        assert np.abs(image.astype(int) - rgb).mean() > 5  # the channel order matters


def test_read_image_errors(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG not really")
    with pytest.raises(LipdubError):
        read_image(fake)
    with pytest.raises(LipdubError, match="not found"):
        read_image(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------------- VideoWriter


@pytest.fixture(scope="module")
def v5_frames(media):
    """Every 9th frame of v5 (several shots), 64x48: real, clearly different pictures."""
    out = []
    with av.open(str(media / V5)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i % 9 == 0:
                out.append(cv2.resize(f.to_ndarray(format="bgr24"), (65, 49), interpolation=cv2.INTER_AREA))
            if len(out) == 30:
                break
    return out


def read_back(path):
    """(video stream info, decoded BGR frames, audio samples per channel, first audio/video times)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {
            "vcodec": v.codec_context.name,
            "size": (v.codec_context.width, v.codec_context.height),
            "rate": v.average_rate,
            "vstart": v.start_time,
            "audio": bool(c.streams.audio),
        }
        if c.streams.audio:
            a = c.streams.audio[0]
            info.update(acodec=a.codec_context.name, arate=a.rate, achannels=a.channels, astart=a.start_time)
    with av.open(str(path)) as c:
        frames = [f for f in c.decode(video=0)]
        info["first_video_time"] = frames[0].time
        images = [f.to_ndarray(format="bgr24") for f in frames]
    samples = 0
    if info["audio"]:
        with av.open(str(path)) as c:
            afr = list(c.decode(audio=0))
            info["first_audio_time"] = afr[0].time
            samples = sum(f.samples for f in afr)
    return info, images, samples


def test_writer_h264_aac_size_fps_count_audio(media, tmp_path, v5_frames):
    frames = [f[:48, :64] for f in v5_frames]
    out = tmp_path / "out.mp4"
    n = 200  # a1 is 8.000 s: 200 frames at 25 fps
    with VideoWriter(out, 64, 48, Fraction(25), audio_path=media / "a1_en_radio_16k_stereo.wav") as writer:
        for i in range(n):
            writer.write(frames[i % len(frames)])
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]  # the temp file was renamed
    info, images, samples = read_back(out)
    assert info["vcodec"] == "h264" and info["acodec"] == "aac"
    assert info["size"] == (64, 48) and info["rate"] == 25
    assert len(images) == n
    assert info["arate"] == 16000 and info["achannels"] == 2
    assert samples / info["arate"] == pytest.approx(8.0, abs=0.03)
    for i in (0, 1, 7, 199):
        want = frames[i % len(frames)]
        assert np.abs(images[i].astype(int) - want).mean() < 5
        other = frames[(i + 1) % len(frames)]
        assert np.abs(images[i].astype(int) - other).mean() > np.abs(images[i].astype(int) - want).mean()


def test_writer_ntsc_rate_and_v5_audio_start_aligned(media, tmp_path, v5_frames):
    """v5's audio starts at 0.008 s and its video at 0.852 s; the output streams both start at 0."""
    fps = Fraction(2997, 100)
    with av.open(str(media / V5)) as c:
        a = c.streams.audio[0]
        assert a.start_time * float(a.time_base) > 0.005
        audio_seconds = a.duration * float(a.time_base)
    out = tmp_path / "v5audio.mp4"
    n = int(audio_seconds * float(fps))
    with VideoWriter(out, 64, 48, fps, audio_path=media / V5) as writer:
        for i in range(n):
            writer.write(v5_frames[i % len(v5_frames)][:48, :64])
    info, images, samples = read_back(out)
    assert info["rate"] == fps and len(images) == n
    assert info["vstart"] == 0 and info["astart"] == 0
    assert info["first_video_time"] == 0 and info["first_audio_time"] == 0
    assert samples / info["arate"] == pytest.approx(audio_seconds, abs=0.03)


def test_writer_odd_size(tmp_path, v5_frames):
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 65, 49, Fraction(25)) as writer:
        for f in v5_frames[:10]:
            assert f.shape == (49, 65, 3)
            writer.write(f)
    info, images, _ = read_back(out)
    assert not info["audio"]
    assert info["size"] == (66, 50)  # padded by one replicated row and column for 4:2:0
    assert len(images) == 10
    for want, got in zip(v5_frames, images):
        assert np.abs(got[:49, :65].astype(int) - want).mean() < 5
        assert np.abs(got[:49, 65].astype(int) - want[:, 64]).mean() < 8
        assert np.abs(got[49, :65].astype(int) - want[48]).mean() < 8


def test_writer_accepts_float_fps(tmp_path, v5_frames):
    out = tmp_path / "float.mp4"
    with VideoWriter(out, 64, 48, 29.97) as writer:
        for f in v5_frames[:5]:
            writer.write(f[:48, :64])
    info, images, _ = read_back(out)
    assert info["rate"] == Fraction(2997, 100) and len(images) == 5


def test_writer_leaves_nothing_on_exception(media, tmp_path, v5_frames):
    out = tmp_path / "fail.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, 64, 48, Fraction(25), audio_path=media / "a1_en_radio_16k_stereo.wav") as writer:
            for f in v5_frames[:20]:
                writer.write(f[:48, :64])
            partial = [p for p in os.listdir(tmp_path) if p.startswith(".")]
            assert partial, "the encoder should be writing a hidden temp file by now"
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_audio_without_audio_stream(media, tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(LipdubError, match="no audio"):
        with VideoWriter(out, 64, 48, Fraction(25), audio_path=media / "p1_astronaut_eileen_collins_512.png") as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
    assert os.listdir(tmp_path) == []
    with pytest.raises(LipdubError):
        VideoWriter(tmp_path / "nofolder" / "x.mp4", 64, 48, Fraction(25))


# ------------------------------------------------------------------------------------- Transform


def test_transform_resize_rotate_crop_in_original_order(media):
    img = read_image(media / "p3_two_people_1126x661.jpg")
    assert Transform()(img) is not None and np.array_equal(Transform()(img), img)

    half = Transform(resize_factor=2)(img)
    assert half.shape == (661 // 2, 1126 // 2, 3)
    np.testing.assert_array_equal(half, cv2.resize(img, (563, 330), interpolation=cv2.INTER_LINEAR))

    turned = Transform(rotate=True)(img)
    np.testing.assert_array_equal(turned, np.rot90(img, k=-1))  # clockwise

    cropped = Transform(crop=(10, 200, 20, -1))(img)
    np.testing.assert_array_equal(cropped, img[10:200, 20:])
    np.testing.assert_array_equal(Transform(crop=(0, -1, 5, 50))(img), img[:, 5:50])

    # resize, then rotate, then crop in the rotated frame's coordinates
    all3 = Transform(resize_factor=3, rotate=True, crop=(7, 300, 11, -1))(img)
    small = cv2.resize(img, (1126 // 3, 661 // 3))
    np.testing.assert_array_equal(all3, np.rot90(small, k=-1)[7:300, 11:])
    assert all3.flags["C_CONTIGUOUS"]


def test_pyav_python_log_callback_stays_off():
    """With a numeric level PyAV's log callback takes the GIL for every FFmpeg error message; a
    decoder thread logging while the main thread closes that decoder (each seek in frames_at)
    then hangs the process. Importing lipdub.media must leave PyAV's no-op callback in place."""
    import lipdub.media  # noqa: F401

    assert av.logging.get_level() is None


def test_own_audio_keeps_its_place_against_the_picture(media, tmp_path):
    """v5's picture starts 0.85 s after its sound: reusing its audio drops exactly that lead."""
    import av

    from lipdub.media import VideoWriter, load_audio, video_start_in_audio

    v5 = media / "v5_multiface_cuts_640x360_29.97fps.mp4"
    with av.open(str(v5)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        expected = float(v.start_time * v.time_base) - float(a.start_time * a.time_base)
    lead = video_start_in_audio(v5)
    assert lead == pytest.approx(expected) and lead > 0.5
    full, cut = load_audio(v5), load_audio(v5, start=lead)
    k = round(lead * 16000)
    assert np.array_equal(cut, full[k:])
    padded = load_audio(v5, start=-0.25)
    assert np.all(padded[:4000] == 0) and np.array_equal(padded[4000:], full)

    out = tmp_path / "aligned.mp4"
    with VideoWriter(out, 64, 64, 25, audio_path=v5, audio_start=lead) as writer:
        for _ in range(25):
            writer.write(np.zeros((64, 64, 3), np.uint8))
    with av.open(str(out)) as c:
        written = np.concatenate([f.to_ndarray().mean(axis=0) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].rate
    source = load_audio(v5, sample_rate=rate)
    # The written audio is the source from `lead` on (AAC-coded): find where it best matches.
    probe = written[rate : rate + 4096]
    scores = np.correlate(source[: 4 * rate].astype(np.float64), probe.astype(np.float64), mode="valid")
    found = int(np.argmax(scores)) - rate
    assert abs(found - round(lead * rate)) <= 64, (found, round(lead * rate))


def test_writer_colours_round_trip(tmp_path):
    """A flat colour survives encode + decode within 1 level (FFmpeg's default path lost 2-5)."""
    import av

    from lipdub.media import VideoWriter

    out = tmp_path / "flat.mp4"
    colours = [(128, 128, 128), (40, 90, 200), (230, 210, 20)]
    with VideoWriter(out, 64, 48, 25) as writer:
        for bgr in colours:
            writer.write(np.full((48, 64, 3), bgr, np.uint8))
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    for frame, bgr in zip(frames, colours):
        assert np.abs(frame[8:-8, 8:-8].astype(int) - np.array(bgr)).max() <= 2, (frame[24, 32], bgr)


@pytest.mark.parametrize("codec,container", [("mpeg4", "mp4"), ("libvpx-vp9", "webm")])
def test_other_input_codecs_decode_on_the_clock(media, tmp_path, codec, container):
    """MPEG-4 Part 2 and VP9 inputs (H.264 and HEVC are the shared media) decode frame for frame."""
    from fractions import Fraction

    import av

    from lipdub.media import VideoSource

    src = media / "v3_woman_glasses_524x524_25fps.mp4"
    path = tmp_path / f"clip.{container}"
    originals = []
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 524, 524, "yuv420p"
        for i, frame in enumerate(inp.decode(video=0)):
            if i == 8:
                break
            originals.append(frame.to_ndarray(format="bgr24"))
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    source = VideoSource(path)
    frames = [f for _, f in source.clock()]
    assert (source.info.width, source.info.height, float(source.info.fps)) == (524, 524, 25.0)
    assert len(frames) == 8
    for got, want in zip(frames, originals):
        assert np.abs(got.astype(float) - want).mean() < 8  # lossy re-encode, same picture


# ------------------------------------------------------------------------------------ prefetch lanes


@pytest.mark.parametrize("size", [0, 1, 3])
def test_prefetch_keeps_order_works_ahead_and_bounds_what_is_alive(size):
    """A lane hands items on in order, prepares the next one while the consumer works (the
    consumer waits for that below, so the test would hang, not pass, without it), and never
    pulls more than size + 1 items ahead of the one the consumer holds (size 0: one)."""
    import threading

    from lipdub.media import prefetch

    produced = []
    pulled = threading.Condition()

    def source():
        for i in range(40):
            with pulled:
                produced.append(i)
                pulled.notify_all()
            yield i

    lead = []
    for consumed, item in enumerate(prefetch(source(), size=size)):
        assert item == consumed
        with pulled:  # the worker prepares the next item while this one is "worked on"
            assert pulled.wait_for(lambda: len(produced) > min(consumed + 1, 39), timeout=10)
            lead.append(len(produced) - (consumed + 1))
    assert max(lead) <= size + 1
    assert produced == list(range(40))


def test_prefetch_raises_the_workers_error_and_closes_upstream_when_stopped_early():
    from lipdub.media import prefetch

    def failing():
        yield 1
        raise ValueError("decoder broke")

    lane = prefetch(failing(), size=0)
    assert next(lane) == 1
    with pytest.raises(ValueError, match="decoder broke"):
        next(lane)

    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    lane = prefetch(endless(), size=0)
    assert [next(lane) for _ in range(3)] == [0, 1, 2]
    lane.close()
    assert closed == [True]


def test_make_folder_creates_parents_and_names_what_is_in_the_way(tmp_path):
    from lipdub.media import make_folder

    made = make_folder(tmp_path / "a" / "b")
    assert made.is_dir() and made == tmp_path / "a" / "b"
    assert make_folder(made) == made  # already there: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(LipdubError, match=r"^cannot create the data folder .*file/sub: Not a directory$"):
        make_folder(tmp_path / "file" / "sub", "data folder")
