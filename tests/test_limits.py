"""Size limits before allocation, and the paths through `sync()` that had no test: shot cuts,
rotation metadata, face choice, a video's own audio, S3FD, and the box blend at no-face gaps."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from lipdub import audio as audio_mod
from lipdub import sync
from lipdub.blend import paste_box
from lipdub.cli import main
from lipdub.errors import LipdubError
from lipdub.faces import load_detector, track_video
from lipdub.generate import Generator, generator_inputs, load_generator, mel_windows
from lipdub.media import MAX_SIDE, VideoSource, load_audio
from lipdub.pipeline import render

from .conftest import MEDIA, short_speech

V2 = MEDIA / "v2_woman_headmotion_700x700_30fps.mp4"
V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
V5 = MEDIA / "v5_multiface_cuts_640x360_29.97fps.mp4"
P2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
P3 = MEDIA / "p3_two_people_1126x661.jpg"


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def wide_video(path: Path, width: int) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = width, 64, "yuv420p"
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, width, 3), np.uint8), format="bgr24")
            frame.pts = i
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


# ------------------------------------------------------------------------------------ size limits


def test_a_huge_png_header_is_refused_before_decoding(tmp_path, capsys):
    bomb = png_claiming(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(LipdubError, match="30000x30000 pixels; frames of up to 8192"):
        VideoSource(bomb)
    out = tmp_path / "out.mp4"
    assert main(["run", "--face", str(bomb), "--audio", str(MEDIA / "a3_zh_mandarin_aishell_16k_mono.wav"),
                 "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "30000x30000" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png"]


def test_frames_wider_than_the_limit_are_refused(tmp_path):
    with pytest.raises(LipdubError, match=f"{MAX_SIDE + 8}x64 pixels"):
        VideoSource(wide_video(tmp_path / "wide.mp4", MAX_SIDE + 8))
    assert VideoSource(wide_video(tmp_path / "ok.mp4", MAX_SIDE)).info.width == MAX_SIDE  # the limit itself is fine


# ------------------------------------------------------------------------------------ shot cuts


def test_v5_cuts_are_found_where_the_picture_jumps():
    """SOURCES.md puts v5's shot changes at about 1.3, 3.3 and 7.9 s. Measured independently here
    (the three frames whose grey picture changes most from the frame before) they are at 1.52,
    3.59 and 7.89 s; the tracker's cuts are those frames, and nothing else."""
    with av.open(str(V5)) as c:
        grey = [(float(f.time), f.to_ndarray(format="gray").astype(np.float32)) for f in c.decode(video=0)]
    jumps = sorted(((np.abs(b - a).mean(), t) for (_, a), (t, b) in zip(grey, grey[1:])), reverse=True)[:3]
    expected = sorted(t for _, t in jumps)
    assert all(abs(t - d) < 0.35 for t, d in zip(expected, (1.3, 3.3, 7.9)))
    source = VideoSource(V5)
    _, track = track_video(source, load_detector("centerface"), stride=5)
    found = [grey[0][0] + cut / float(source.info.fps) for cut in track.cuts]
    assert len(found) == 3 and all(abs(a - b) < 0.5 / float(source.info.fps) for a, b in zip(found, expected))


def test_v2_head_motion_is_not_a_cut():
    _, track = track_video(VideoSource(V2), load_detector("centerface"), stride=5)
    assert track.cuts == [] and track.valid.all()


# ------------------------------------------------------------------------------------ through sync()


def rotated_clip(path: Path, image: np.ndarray, degrees: int, n: int = 3) -> Path:
    """`image` stored as is, with a display matrix saying: show it turned by `degrees`."""
    h, w = image.shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "10"}
        if degrees:
            s.set_display_rotation(degrees)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            frame.pts = i
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def test_rotation_metadata_is_honoured_through_sync(tmp_path, wav2lip_checkpoint):
    """p2 (cut to 360x470) stored lying on its side with a display matrix that stands it up, and
    the same picture stored upright: both runs give the same upright, 360x470 output."""
    upright = np.ascontiguousarray(cv2.imread(str(P2))[:470, 57:417])
    speech = short_speech(tmp_path / "s.wav", 0.4)
    outputs = []
    for name, image, degrees in (("upright", upright, 0),
                                 ("lying", cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE), -90)):
        out = tmp_path / f"{name}.mp4"
        result = sync(rotated_clip(tmp_path / f"{name}-in.mp4", image, degrees), speech, out,
                      checkpoint=str(wav2lip_checkpoint), silence="generate", progress=False)
        assert (result.width, result.height) == (360, 470) and result.frames_with_face == result.n_frames
        outputs.append(decode(out)[0])
    a, b = outputs
    assert 10 * np.log10(255 ** 2 / np.mean((a.astype(float) - b) ** 2)) > 30  # the same picture
    changed = np.abs(b.astype(int) - upright).max(axis=2) > 40
    assert changed.sum() > 500 and changed[:120].sum() == 0  # the mouth was driven, not the forehead


def test_face_index_chooses_the_face_through_sync(tmp_path, wav2lip_checkpoint):
    """p3 has two faces: --face-index 0 drives the left one, 1 the right one."""
    speech = short_speech(tmp_path / "s.wav", 0.4)
    photo = cv2.imread(str(P3))
    centres = []
    for index in (0, 1):
        out = tmp_path / f"face{index}.mp4"
        sync(P3, speech, out, checkpoint=str(wav2lip_checkpoint), face_index=index, silence="generate",
             progress=False)
        changed = np.abs(decode(out)[0][:661].astype(int) - photo).max(axis=2) > 40  # odd sizes are padded
        centres.append(np.nonzero(changed)[1].mean())
    assert centres[0] < 1126 / 2 < centres[1]
    with pytest.raises(LipdubError, match="no face #2"):
        sync(P3, speech, tmp_path / "none.mp4", checkpoint=str(wav2lip_checkpoint), face_index=2, progress=False)


def test_a_videos_own_audio_keeps_its_offset_through_sync(tmp_path, wav2lip_checkpoint):
    """v5's picture starts 0.844 s after its sound. Driven by its own audio, the output's audio
    at time t is v5's audio at t + 0.844 s, as the original file plays it."""
    out = tmp_path / "v5.mp4"
    sync(V5, V5, out, checkpoint=str(wav2lip_checkpoint), box=(40, 200, 250, 420), progress=False)
    source, result = load_audio(V5), load_audio(out)
    window = result[16000:24000]
    lags = np.arange(0, 24000)
    score = [float(np.dot(window, source[16000 + k:24000 + k])) for k in lags]
    assert abs(lags[int(np.argmax(score))] / 16000 - 0.844) < 0.002


def test_s3fd_in_the_full_pipeline(tmp_path, rule_a, wav2lip_checkpoint):
    """The S3FD detector drives a whole run (rule-A weights: they fire on anything, so a face is
    always 'found'); landmarks for restoration are not needed here."""
    import torch

    weights = tmp_path / "s3fd.pth"
    torch.save({k: torch.from_numpy(v) for k, v in rule_a.rule_a("s3fd").items()}, weights)
    out = tmp_path / "out.mp4"
    result = sync(V3, short_speech(tmp_path / "s.wav", 0.4), out, checkpoint=str(wav2lip_checkpoint),
                  detector="s3fd", detector_weights=str(weights), silence="generate", progress=False)
    assert result.n_frames == 10 == len(decode(out)) and result.frames_with_face > 0


def test_box_blend_fades_at_the_edges_of_a_no_face_gap(wav2lip_checkpoint):
    """`--blend box` next to a gap in the track: alpha * pasted + (1 - alpha) * frame, rounded."""

    source = VideoSource(V5)
    ticks, track = track_video(source, load_detector("centerface"), stride=5, pads=(0, 10, 0, 0))
    fading = [i for i in range(90) if 0 < track.alpha[i] < 1]
    assert fading, "v5 has a gap at ticks 43-81 with fades on both sides"
    mel = audio_mod.melspectrogram(load_audio(MEDIA / "a3_zh_mandarin_aishell_16k_mono.wav"))
    starts = audio_mod.chunk_starts(mel.shape[1], float(source.info.fps))[:90]
    generator = Generator(load_generator(str(wav2lip_checkpoint), "cpu", progress=False), "fp32")
    out = list(render(source, ticks, track, mel, starts, list(range(90)), generator, blend="box"))
    frames = list(VideoSource(V5, max_frames=90).frames())
    for i in fading:
        box = track.boxes[i]
        pred = generator(generator_inputs([frames[i]], [box]), mel_windows(mel, [starts[i]]))[0]
        pasted = frames[i].copy()
        paste_box(pasted, box, pred)  # the original's paste, alpha 1
        x1, y1, x2, y2 = box
        want = np.clip(frames[i][y1:y2, x1:x2].astype(np.float64) * (1 - track.alpha[i])
                       + pasted[y1:y2, x1:x2] * track.alpha[i] + 0.5, 0, 255).astype(np.uint8)
        assert np.abs(out[i][y1:y2, x1:x2].astype(int) - want).max() <= 1
        assert not np.array_equal(out[i], pasted) and not np.array_equal(out[i], frames[i])
