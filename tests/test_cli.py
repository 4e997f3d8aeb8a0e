"""`lipdub run` from the command line: bad input gives one line on stderr, exit 2, no output file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipdub.cli import main

from .conftest import MEDIA, short_clip, short_speech, write_wav

V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
P2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["run", "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("lipdub: error: ")
    assert pattern in lines[0].lower(), lines[0]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def nothing_written(folder: Path) -> bool:
    return not any(folder.iterdir())


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return short_speech(tmp_path_factory.mktemp("audio") / "speech.wav", 1.0)


def test_missing_face_file(capsys, workdir, speech, wav2lip_checkpoint):
    code, _, err = run_cli(capsys, "--face", workdir.parent / "nope.mp4", "--audio", speech,
                           "-o", workdir / "o.mp4", "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "nope.mp4")
    assert nothing_written(workdir)


def test_missing_audio_file(capsys, workdir, wav2lip_checkpoint, media):
    code, _, err = run_cli(capsys, "--face", P2, "--audio", workdir.parent / "missing.wav",
                           "-o", workdir / "o.mp4", "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "missing.wav")
    assert nothing_written(workdir)


def test_audio_file_without_audio_stream(capsys, tmp_path, workdir, wav2lip_checkpoint, media):
    silent_video = short_clip(V3, tmp_path / "video_only.mp4", 5)
    code, _, err = run_cli(capsys, "--face", P2, "--audio", silent_video, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "no audio")
    assert nothing_written(workdir)


def test_face_file_without_video_stream(capsys, workdir, speech, wav2lip_checkpoint):
    code, _, err = run_cli(capsys, "--face", speech, "--audio", speech, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "no video")
    assert nothing_written(workdir)


def test_face_file_that_is_not_media(capsys, tmp_path, workdir, speech, wav2lip_checkpoint):
    junk = tmp_path / "notes.mp4"
    junk.write_bytes(os.urandom(4096))
    code, _, err = run_cli(capsys, "--face", junk, "--audio", speech, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "notes.mp4")
    assert nothing_written(workdir)


def test_audio_shorter_than_one_mel_window(capsys, tmp_path, workdir, wav2lip_checkpoint, media):
    tiny = short_speech(tmp_path / "tiny.wav", 0.05)
    code, _, err = run_cli(capsys, "--face", P2, "--audio", tiny, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "too short")
    assert nothing_written(workdir)


def test_silent_audio(capsys, tmp_path, workdir, wav2lip_checkpoint, media):
    silence = write_wav(tmp_path / "silence.wav", np.zeros(16000))
    code, _, err = run_cli(capsys, "--face", P2, "--audio", silence, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "silent")
    assert nothing_written(workdir)


def test_unknown_checkpoint_name(capsys, workdir, speech, media):
    code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", workdir / "o.mp4",
                           "--checkpoint", "wav2lip_ultra")
    assert_user_error(code, err, "unknown checkpoint")
    assert nothing_written(workdir)


def test_corrupt_checkpoints(capsys, tmp_path, workdir, speech, media, wav2lip_checkpoint, rule_a):
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(os.urandom(100_000))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(wav2lip_checkpoint.read_bytes()[:5_000_000])
    discriminator = tmp_path / "disc.pth"
    rule_a.save_official_checkpoint("wav2lip_disc_qual", str(discriminator))
    expert = tmp_path / "expert.pth"
    rule_a.save_official_checkpoint("syncnet_color", str(expert))
    for path, words in [(random_bytes, "random.pth"), (truncated, "truncated.pth"),
                        (discriminator, "discriminator"), (expert, "syncnet")]:
        code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", workdir / "o.mp4", "--checkpoint", path)
        assert_user_error(code, err, words)
        assert nothing_written(workdir)


def test_unwritable_output(capsys, tmp_path, speech, wav2lip_checkpoint, media):
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    for target in (tmp_path / "no_such_dir" / "o.mp4", afile / "o.mp4", tmp_path):
        code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", target, "--checkpoint", wav2lip_checkpoint)
        assert_user_error(code, err, "output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


def test_no_face_anywhere(capsys, tmp_path, workdir, speech, wav2lip_checkpoint):
    wall = tmp_path / "wall.jpg"
    cv2.imwrite(str(wall), np.full((200, 300, 3), 128, np.uint8))
    code, _, err = run_cli(capsys, "--face", wall, "--audio", speech, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint)
    assert_user_error(code, err, "no face")
    assert nothing_written(workdir)


def test_box_outside_frame(capsys, workdir, speech, wav2lip_checkpoint, media):
    code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint, "--box", "0", "900", "0", "100")
    assert_user_error(code, err, "--box")
    assert nothing_written(workdir)


def test_success_prints_json_and_report(capsys, tmp_path, workdir, speech, wav2lip_checkpoint, media):
    report = workdir / "report.json"
    code, out, _ = run_cli(capsys, "--face", P2, "--audio", speech, "-o", workdir / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint, "--json", "--report", report)
    assert code == 0
    summary = json.loads(out)
    assert summary["n_frames"] == summary["frames_with_face"] > 0
    assert (summary["width"], summary["height"]) == (474, 474)
    data = json.loads(report.read_text())
    assert data["coverage"] == 1.0 and data["frames_without_face"] == 0
    assert set(data["timings"]) >= {"detect", "generate", "encode", "total"}
    assert sorted(p.name for p in workdir.iterdir()) == ["o.mp4", "report.json"]


def test_report_includes_sync_metrics_when_syncnet_is_cached(capsys, tmp_path, monkeypatch, speech,
                                                            wav2lip_checkpoint, rule_b, media):
    import torch

    from lipdub import weights
    from tests.conftest import SPECS

    monkeypatch.setenv("LIPDUB_HOME", str(tmp_path / "home"))
    cached = weights.cache_path("syncnet_v2")
    cached.parent.mkdir(parents=True)
    schema = json.loads((SPECS / "syncnet_v2_state_dict.json").read_text())
    torch.save(rule_b.fill_state_dict(schema), cached)
    report = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", tmp_path / "o.mp4",
                           "--checkpoint", wav2lip_checkpoint, "--report", report)
    assert code == 0, err
    sync = json.loads(report.read_text())["sync"]
    assert len(sync["mean_dists"]) == 31
    assert sync["lse_d"] == pytest.approx(min(sync["mean_dists"]))
    assert sync["n_frames"] > 0 and sync["frames_without_face"] == 0


def test_crf_and_preset_reach_the_encoder(capsys, workdir, speech, wav2lip_checkpoint):
    """x264 writes its settings into the stream (an SEI message): the defaults (superfast: subme=1,
    CRF 18) and `--crf 30 --preset ultrafast` (subme=0) must be there; a CRF out of range is one line."""
    settings = {}
    for name, extra in (("default", ()), ("fast", ("--crf", "30", "--preset", "ultrafast"))):
        out = workdir / f"{name}.mp4"
        code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", out, "--checkpoint",
                               wav2lip_checkpoint, *extra)
        assert code == 0, err
        data = out.read_bytes()
        start = data.index(b"x264 - core")
        settings[name] = data[start:data.index(b"\x00", start)].decode()
    assert " crf=18.0 " in settings["default"] and " subme=1 " in settings["default"]
    assert " crf=30.0 " in settings["fast"] and " subme=0 " in settings["fast"]
    code, _, err = run_cli(capsys, "--face", P2, "--audio", speech, "-o", workdir / "bad.mp4", "--checkpoint",
                           wav2lip_checkpoint, "--crf", "52")
    assert_user_error(code, err, "--crf")
    assert not (workdir / "bad.mp4").exists()
