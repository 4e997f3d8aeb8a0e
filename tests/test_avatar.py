"""`lipdub avatar prepare`: what it stores, how it is read back, and every refusal.

Expectations are built here independently of lipdub.avatar: frames are decoded with OpenCV or
PyAV directly, face crops with cv2.resize, and the face box is checked against a box drawn by
hand around p2's face (the one tests/test_pipeline.py uses).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from lipdub.cli import main
from lipdub.avatar import FORMAT, MANIFEST, VERSION, load_avatar, prepare_avatar
from lipdub.errors import LipdubError
from lipdub.generate import generator_inputs

from .conftest import MEDIA

ROOT = Path(__file__).resolve().parents[1]
P2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
V2 = MEDIA / "v2_woman_headmotion_700x700_30fps.mp4"
V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
P2_FACE = (150, 350, 150, 330)  # TOP BOTTOM LEFT RIGHT: drawn by hand around p2's face


@pytest.fixture(scope="module")
def photo_avatar(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("avatar") / "p2"
    prepare_avatar(P2, out, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def video_avatar(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("avatar") / "v3"
    prepare_avatar(V3, out, max_seconds=2.0, progress=False, device="cpu")
    return out


def test_a_photo_avatar_stores_the_image_its_face_and_the_generator_input(photo_avatar):
    info = json.loads((photo_avatar / MANIFEST).read_text())
    assert (info["format"], info["version"], info["fps"], info["n_frames"]) == (FORMAT, VERSION, 25, 1)
    avatar = load_avatar(photo_avatar)
    image = cv2.imread(str(P2), cv2.IMREAD_COLOR)
    assert np.array_equal(avatar.frames[0], image)  # lossless
    assert not avatar.frames.flags.writeable
    assert avatar.valid.tolist() == [True] and avatar.alpha.tolist() == [1.0]
    x1, y1, x2, y2 = avatar.boxes[0]
    top, bottom, left, right = P2_FACE
    assert left <= (x1 + x2) / 2 <= right and top <= (y1 + y2) / 2 <= bottom
    assert 100 <= x2 - x1 <= 260 and 120 <= y2 - y1 <= 320
    marks = avatar.landmarks[0]
    assert np.isfinite(marks).all() and ((marks[:, 0] > x1) & (marks[:, 0] < x2)).all()
    assert marks[0, 1] < marks[3, 1]  # eyes above the mouth corners
    crop = cv2.resize(image[y1:y2, x1:x2], (96, 96))
    assert np.array_equal(avatar.faces[0], crop)
    # the live session's face input is the offline one (generate.generator_inputs on the frame)
    assert np.array_equal(avatar.generator_inputs([0]), generator_inputs([image], [avatar.boxes[0]], 96))
    assert avatar.period == 1 and avatar.source_frame(12345) == 0


def test_a_video_avatar_keeps_its_frames_at_25_fps_and_loops_back_and_forth(video_avatar):
    avatar = load_avatar(video_avatar)
    with av.open(str(V3)) as container:  # v3 is 25 fps constant rate: the clock maps frames one to one
        decoded = [f.to_ndarray(format="bgr24") for _, f in zip(range(50), container.decode(video=0))]
    assert avatar.n_frames == 50 and (avatar.width, avatar.height) == (524, 524)
    assert all(np.array_equal(a, b) for a, b in zip(avatar.frames, decoded))
    assert avatar.valid.all()
    sizes = avatar.boxes[:, 2:] - avatar.boxes[:, :2]
    assert (sizes > 150).all() and np.abs(np.diff(avatar.boxes, axis=0)).max() <= 12  # tracked, smooth
    assert [avatar.source_frame(i) for i in (0, 1, 49, 50, 51, 97, 98, 99)] == [0, 1, 49, 48, 47, 1, 0, 1]
    assert avatar.period == 98
    whole = np.array([0, 0, 96, 96])
    for j in (0, 25, 49):
        assert np.array_equal(avatar.faces[j], cv2.resize(decoded[j][avatar.boxes[j][1]:avatar.boxes[j][3],
                                                                     avatar.boxes[j][0]:avatar.boxes[j][2]], (96, 96)))
    assert np.array_equal(avatar.generator_inputs([3, 7]),
                          generator_inputs([decoded[3], decoded[7]], [avatar.boxes[3], avatar.boxes[7]], 96))
    assert np.array_equal(avatar.generator_inputs([5]), generator_inputs([avatar.faces[5]], [whole], 96))


def test_a_30_fps_video_is_retimed_to_25_fps_and_cut(tmp_path):
    result = prepare_avatar(V2, tmp_path / "v2", max_seconds=1.0, progress=False, loop="loop", device="cpu")
    avatar = load_avatar(tmp_path / "v2")
    assert result.n_frames == avatar.n_frames == 25
    assert avatar.loop == "loop" and avatar.period == 25 and avatar.source_frame(26) == 1
    with av.open(str(V2)) as container:
        decoded = [f.to_ndarray(format="bgr24") for _, f in zip(range(30), container.decode(video=0))]
    # tick i (t = i/25) shows the latest frame before the middle of the tick: round down of (i + 1/2) * 30 / 25
    for i in (0, 1, 5, 24):
        assert np.array_equal(avatar.frames[i], decoded[int((i + 0.5) * 30 / 25)])


def test_a_fixed_box_skips_detection_and_resize_factor_shrinks(tmp_path):
    prepare_avatar(P2, tmp_path / "box", box=(45, 210, 40, 200), resize_factor=2, progress=False)
    avatar = load_avatar(tmp_path / "box")
    assert (avatar.width, avatar.height) == (237, 237)  # the box is on the shrunk frame, as for `lipdub run`
    assert avatar.boxes[0].tolist() == [40, 45, 200, 210]
    image = cv2.imread(str(P2), cv2.IMREAD_COLOR)
    assert np.array_equal(avatar.frames[0], cv2.resize(image, (237, 237)))
    info = json.loads((tmp_path / "box" / MANIFEST).read_text())
    assert info["detector"] is None and info["box"] == [45, 210, 40, 200]


def test_preparing_again_replaces_an_avatar(tmp_path):
    out = tmp_path / "again"
    prepare_avatar(P2, out, box=(90, 420, 80, 400), progress=False)
    prepare_avatar(P2, out, box=(100, 400, 90, 390), progress=False)
    assert load_avatar(out).boxes[0].tolist() == [90, 100, 390, 400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # nothing left beside it


def test_bad_input_is_refused_with_one_line(tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (lambda: prepare_avatar(tmp_path / "missing.png", tmp_path / "a"), "file not found"),
        (lambda: prepare_avatar(text, tmp_path / "b"), "cannot read"),
        (lambda: prepare_avatar(blank, tmp_path / "c", device="cpu", progress=False), "no face found"),
        (lambda: prepare_avatar(P2, busy), "not empty and not an avatar"),
        (lambda: prepare_avatar(P2, blank), "not a directory"),
        (lambda: prepare_avatar(P2, tmp_path / "no" / "parent"), "output folder does not exist"),
        (lambda: prepare_avatar(P2, tmp_path / "d", max_seconds=0), "--max-seconds"),
        (lambda: prepare_avatar(P2, tmp_path / "e", face_size=128), "--face-size"),
        (lambda: prepare_avatar(P2, tmp_path / "f", detector="yolo"), "unknown face detector"),
    ]
    for call, message in cases:
        with pytest.raises(LipdubError, match=message):
            call()
    assert (busy / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / name).exists() for name in "abcdef")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left


def test_a_directory_that_is_not_an_avatar_is_refused(tmp_path, photo_avatar):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LipdubError, match="not a lipdub avatar .no avatar.json.; make one with"):
        load_avatar(tmp_path / "empty")
    with pytest.raises(LipdubError, match="avatar not found"):
        load_avatar(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LipdubError, match="not a directory"):
        load_avatar(tmp_path / "file")

    def copy_with(name: str, manifest=None, remove: str | None = None, replace: tuple[str, bytes] | None = None):
        target = tmp_path / name
        target.mkdir()
        for item in photo_avatar.rglob("*"):
            dest = target / item.relative_to(photo_avatar)
            if item.is_dir():
                dest.mkdir(exist_ok=True)
            else:
                dest.parent.mkdir(exist_ok=True, parents=True)
                dest.write_bytes(item.read_bytes())
        if manifest is not None:
            (target / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        if remove:
            (target / remove).unlink()
        if replace:
            (target / replace[0]).write_bytes(replace[1])
        return target

    info = json.loads((photo_avatar / MANIFEST).read_text())
    cases = [
        (copy_with("foreign", {"format": "something-else", "version": 1}), "not a lipdub-avatar manifest"),
        (copy_with("garbled", "{not json"), "avatar.json is unreadable"),
        (copy_with("newer", dict(info, version=VERSION + 1)), "made by a newer lipdub"),
        (copy_with("noframe", remove="frames/000000.png"), "frames/000000.png is missing"),
        (copy_with("notrack", remove="track.npz"), "incomplete or damaged"),
        (copy_with("badfaces", replace=("faces.npy", b"garbage")), "incomplete or damaged"),
        (copy_with("mismatch", dict(info, n_frames=3)), "does not match the manifest"),
    ]
    for path, message in cases:
        with pytest.raises(LipdubError, match=message):
            load_avatar(path)


def test_the_command_line(tmp_path, capsys):
    ok = subprocess.run([sys.executable, "-m", "lipdub", "avatar", "prepare", str(P2), "-o", str(tmp_path / "cli"),
                         "--box", "90", "420", "80", "400", "--json"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["n_frames"] == 1
    assert load_avatar(tmp_path / "cli").boxes[0].tolist() == [80, 90, 400, 420]
    assert main(["avatar", "prepare", str(tmp_path / "missing.png"), "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"lipdub: error: file not found: {tmp_path / 'missing.png'}"]
    assert main(["live", "--avatar", str(tmp_path)]) == 2  # refused before any network or server is loaded
    assert "is not a lipdub avatar (no avatar.json)" in capsys.readouterr().err
