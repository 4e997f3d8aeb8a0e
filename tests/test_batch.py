"""`lipdub batch` without Ray: manifest parsing (every malformed input is one line naming the
line and the field), output naming, local worker processes on real media, the report, resuming,
and URL inputs/outputs through fsspec. The Ray runner is tested in tests/test_cluster.py.

Outputs are checked by decoding them with PyAV: frame size, frame count (the picture lasts as
long as the audio: round(seconds x fps) frames), audio duration.
"""
from __future__ import annotations

import http.server
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import av
import pytest

from lipdub.batch import (
    BadManifest, REPORT_NAME, is_complete, parse_manifest, plan_jobs, read_journal, run_batch, run_job,
)
from lipdub.errors import LipdubError

from .conftest import MEDIA, short_clip, short_speech

ROOT = Path(__file__).resolve().parents[1]
P2 = MEDIA / "p2_woman_frontal_closed_mouth_474.png"
P2_BOX = [90, 420, 80, 400]
V3 = MEDIA / "v3_woman_glasses_524x524_25fps.mp4"
V3_BOX = [100, 400, 120, 420]


# ------------------------------------------------------------------------------------ helpers


def expected_frames(audio_seconds: float, fps: float) -> int:
    """Output frames for a face video or image driven by `audio_seconds` of speech: the picture
    lasts as long as the audio, to within a frame (`lipdub run`'s rule)."""
    return round(audio_seconds * fps)


def check_video(path: Path, audio_seconds: float, fps: float, size: tuple[int, int]) -> int:
    """Decode an output independently: H.264 frames of `size` at `fps`, as many as the audio
    lasts, and the whole audio (AAC)."""
    expected = expected_frames(audio_seconds, fps)
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert float(video.average_rate) == pytest.approx(fps)
        audio_duration = float(audio.duration * audio.time_base)
        frames = 0
        for frame in container.decode(video=0):
            assert (frame.width, frame.height) == size
            frames += 1
    assert frames == expected, (path, frames, expected)
    assert abs(audio_duration - audio_seconds) < 0.05, (path, audio_duration)
    assert abs(audio_duration - frames / fps) <= 1 / fps + 0.01, (path, audio_duration, frames)
    return frames


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def lipdub(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipdub", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory, media) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("batch-media")
    return {
        "s10": short_speech(folder / "speech-1.0s.wav", 1.0),
        "s14": short_speech(folder / "speech-1.4s.wav", 1.4, offset=3.0),
        "v3": short_clip(V3, folder / "v3-10frames.mp4", 10),
    }


# ------------------------------------------------------------------------------------ parsing


def test_a_good_jsonl_line_and_its_options():
    lines = parse_manifest(b'{"face": "a.mp4", "audio": "b.wav", "pads": "0 5 0 0", "face-index": 1, '
                           b'"box": [1, 2, 3, 4], "smooth": false, "fps": 30, "batch_size": "8"}\n'
                           b'\n{"face": "c.png", "audio": "d.wav", "output": "x/y.mp4", "blend": "box"}\r\n', "jsonl")
    assert [(x.line, x.error) for x in lines] == [(1, None), (3, None)]
    assert (lines[0].face, lines[0].audio, lines[0].output) == ("a.mp4", "b.wav", None)
    assert lines[0].options == {"pads": [0, 5, 0, 0], "face_index": 1, "box": [1, 2, 3, 4], "smooth": False,
                                "fps": 30.0, "batch_size": 8}
    assert lines[1].output == "x/y.mp4" and lines[1].options == {"blend": "box"}


def test_a_good_csv_with_empty_cells_and_quotes():
    data = ('\ufeffface,audio,output,pads,face-index,restore\n'
            'a.mp4,b.wav,,"0, 10, 0, 0",,\n'
            '\n'
            '"dir with, comma/c.png",d.wav,out.mp4,,2,gfpgan\n').encode()
    lines = parse_manifest(data, "csv")
    assert [(x.line, x.error) for x in lines] == [(2, None), (4, None)]
    assert lines[0].output is None and lines[0].options == {"pads": [0, 10, 0, 0]}
    assert lines[1].face == "dir with, comma/c.png"
    assert lines[1].options == {"face_index": 2, "restore": "gfpgan"}


BAD_LINES = [
    ('{"face": "a", "audio": "b", "colour": "red"}', "jsonl", "line 2, field 'colour': unknown field"),
    ('{"face": "a", "audio": "b", "blend": "sharp"}', "jsonl", "line 2, field 'blend': unknown blend 'sharp'"),
    ('{"face": "a", "audio": "b", "blend": "x\\ny\\rz"}', "jsonl", "line 2, field 'blend': unknown blend 'x?y?z'"),
    ('{"face": "a", "audio": "b", "pads": [1, 2]}', "jsonl", "line 2, field 'pads': --pads must be 4 integers"),
    ('{"face": "a", "audio": "b", "pads": "1 x 2 3"}', "jsonl", "line 2, field 'pads': pads must be 4 integers"),
    ('{"face": "a", "audio": "b", "fps": 500}', "jsonl", "line 2, field 'fps': --fps must be between 1 and 120"),
    ('{"face": "a", "audio": "b", "face_index": -1}', "jsonl", "line 2, field 'face_index': --face-index must be"),
    ('{"face": "a", "audio": "b", "smooth": "perhaps"}', "jsonl", "line 2, field 'smooth':"),
    ('{"face": "a", "audio": "b", "device": "tpu"}', "jsonl", "line 2, field 'device': unknown device 'tpu'"),
    ('{"face": "a", "audio": "b", "upscale": 2}', "jsonl", "line 2, field 'upscale': --upscale needs --restore"),
    ('{"face": "a", "audio": "b", "static": true, "length": "loop"}', "jsonl", "line 2, field '"),
    ('{"face": "a", "audio": "b", "report": "r.json"}', "jsonl", "line 2, field 'report': unknown field"),
    ('{"face": "a", "audio": "b", "progress": false}', "jsonl", "line 2, field 'progress': unknown field"),
    ('{"face": "a"}', "jsonl", "line 2, field 'audio': missing"),
    ('{"audio": "b"}', "jsonl", "line 2, field 'face': missing"),
    ('{"face": "", "audio": "b"}', "jsonl", "line 2, field 'face': needs a file path or URL"),
    ('{"face": 3, "audio": "b"}', "jsonl", "line 2, field 'face': must be text"),
    ('{"face": "a\\u0000b", "audio": "b"}', "jsonl", "line 2, field 'face': contains a NUL character"),
    ('{"face": "\\ud800", "audio": "b"}', "jsonl", "line 2, field 'face': is not valid Unicode text"),
    ('{"face": "a", "face": "b", "audio": "c"}', "jsonl", "line 2, field 'face': given twice"),
    ('{"face": "a", "audio": "b", "face_index": 1, "face-index": 2}', "jsonl",
     "line 2, field 'face-index': given twice"),
    ('["a", "b"]', "jsonl", "line 2: not a JSON object (list)"),
    ('{"face": "a", "audio": "b",', "jsonl", "line 2: not valid JSON"),
    ('{"face": "a", "audio": "b", "batch_size": ' + "9" * 5000 + "}", "jsonl", "line 2: not valid JSON"),
    ("[" * 100000, "jsonl", "line 2: not valid JSON"),
    ("a.mp4,b.wav,1 2", "csv", "line 2, field 'pads': --pads must be 4 integers"),
    ('a.mp4,b.wav,"1\nx"', "csv", "line 2, field 'pads': pads must be 4 integers (TOP BOTTOM LEFT RIGHT), got '1?x'"),
    ("a.mp4,,", "csv", "line 2, field 'audio': needs a file path or URL"),
    ("a.mp4,b.wav,,extra", "csv", "line 2: 4 cells, but the header (line 1) names 3 columns"),
]


@pytest.mark.parametrize("line, fmt, message", BAD_LINES)
def test_a_bad_line_is_reported_with_its_line_and_field(line, fmt, message):
    first = ('{"face": "ok.mp4", "audio": "ok.wav"}' if fmt == "jsonl" else "face,audio,pads")
    lines = parse_manifest((first + "\n" + line + "\n").encode("utf-8", "surrogatepass"), fmt)
    bad = [x for x in lines if x.error]
    assert len(bad) == 1 and bad[0].line == 2
    assert bad[0].error.startswith(message), bad[0].error
    assert "\n" not in bad[0].error and len(bad[0].error) < 400


def test_bytes_that_are_not_utf8_name_their_line():
    lines = parse_manifest(b'{"face": "a", "audio": "b"}\n{"face": "\xff\xfe", "audio": "b"}\n', "jsonl")
    assert lines[1].error == "line 2: not UTF-8 text (byte 11 of the line)"
    with pytest.raises(LipdubError, match=r"^line 3: not UTF-8 text$"):
        parse_manifest(b"face,audio\na,b\n\xff,b\n", "csv")


@pytest.mark.parametrize("data, fmt, message", [
    (b"face,colour\na,b\n", "csv", r"^line 1, field 'colour': unknown column"),
    (b"face,output\na,b\n", "csv", r"^line 1, field 'audio': the header has no 'audio' column"),
    (b"face,audio,Face\na,b,c\n", "csv", r"^line 1, field 'Face': a second column for 'face'"),
    (b"face,,audio\n", "csv", r"^line 1: column 2 of the header has no name"),
    (b'face,audio\n"a,b\n', "csv", r"^line 2: not valid CSV"),
    (b"face,audio\n\n\n", "csv", r"^no jobs in the manifest$"),
    (b"\n  \n", "jsonl", r"^no jobs in the manifest$"),
    (b"", "csv", r"^no header row"),
    (b"{}", "yaml", r"^unknown manifest format 'yaml'"),
])
def test_a_bad_manifest_as_a_whole_raises_one_line(data, fmt, message):
    with pytest.raises(LipdubError, match=message):
        parse_manifest(data, fmt)


def test_malformed_manifests_never_raise_anything_but_one_line_errors():
    """A seeded mutation fuzz: flipped, inserted, removed and truncated bytes of valid manifests."""
    seeds = {
        "jsonl": b'{"face": "v.mp4", "audio": "a.wav", "pads": [0, 10, 0, 0], "box": "1 2 3 4", "fps": 25.5, '
                 b'"smooth": true, "output": "o.mp4", "face_index": null}\n{"face": "p.png", "audio": "a.wav"}\n',
        "csv": b'face,audio,output,pads,blend,smooth\nv.mp4,a.wav,o.mp4,"0 10 0 0",box,no\np.png,a.wav,,,,\n',
    }
    alphabet = b'{}[]",:\\\n\r\x00\xff\xc3 0123456789-.eEtruefalsnl#;' + bytes(range(1, 32))
    rng = random.Random(20)
    cases = 0
    for fmt, seed in seeds.items():
        for _ in range(400):
            data = bytearray(seed)
            for _ in range(rng.randint(1, 6)):
                op, at = rng.random(), rng.randrange(len(data) + 1)
                if op < 0.4 and data:
                    data[min(at, len(data) - 1)] = rng.choice(alphabet)
                elif op < 0.7:
                    data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                elif op < 0.9 and data:
                    del data[at:at + rng.randint(1, 8)]
                else:
                    data = data[:at]
            try:
                lines = parse_manifest(bytes(data), fmt)
            except LipdubError as exc:
                assert "\n" not in str(exc)
                continue
            cases += 1
            for entry in lines:
                if entry.error:
                    assert entry.error.startswith(f"line {entry.line}") and "\n" not in entry.error, entry.error
                else:
                    assert isinstance(entry.face, str) and isinstance(entry.audio, str)
    assert cases > 100  # most mutations leave some parseable lines to check


# ------------------------------------------------------------------------------------ naming


def test_outputs_are_named_under_the_out_dir_and_never_collide(tmp_path):
    lines = parse_manifest("\n".join(json.dumps(row) for row in [
        {"face": "talk.mp4", "audio": "en.wav"},
        {"face": "other/talk.mp4", "audio": "en.wav"},  # same stems, other folder
        {"face": "talk.mp4", "audio": "en.wav", "blend": "box"},  # same inputs, other options
        {"face": "talk.mp4", "audio": "en.wav", "output": "fr/talk.mp4"},
        {"face": "/abs/talk.mp4", "audio": "s3://bucket/de.wav", "output": "s3://bucket/out/de.mp4"},
        {"face": "talk.mp4", "audio": "es.wav", "output": "fr/talk.mp4"},  # taken by line 4
        {"face": "talk.mp4", "audio": "es.wav", "output": "../outside.mp4"},
        {"face": "talk.mp4", "audio": "es.wav", "output": "https://example.invalid/x.mp4"},
        {"face": "talk.mp4", "audio": "en.wav"},  # the very same job as line 1
    ]), "jsonl")
    manifest_dir, out_dir = tmp_path / "m", tmp_path / "out"
    jobs = plan_jobs(lines, manifest_dir, out_dir)
    good = [j for j in jobs if not j.error]
    assert [j.line for j in good] == [1, 2, 3, 4, 5]
    assert jobs[0].face == str(manifest_dir / "talk.mp4") and jobs[1].face == str(manifest_dir / "other/talk.mp4")
    assert jobs[4].face == "/abs/talk.mp4" and jobs[4].audio == "s3://bucket/de.wav"
    derived = [Path(j.output) for j in good[:3]]
    assert all(p.parent == out_dir and p.name.startswith("talk-en-") and p.suffix == ".mp4" for p in derived)
    assert len(set(derived)) == 3
    assert jobs[3].output == str(out_dir / "fr" / "talk.mp4") and jobs[4].output == "s3://bucket/out/de.mp4"
    errors = {j.line: j.error for j in jobs if j.error}
    assert errors[6] == "line 6, field 'output': the same output as line 4"
    assert errors[7].startswith("line 7, field 'output': a relative output stays inside --out-dir")
    assert errors[8].startswith("line 8, field 'output': http(s) URLs are for inputs")
    assert errors[9] == "line 9, field 'output': the same output as line 1"
    again = plan_jobs(lines, manifest_dir, out_dir)  # names and fingerprints are stable across runs
    assert [(j.output, j.key) for j in again] == [(j.output, j.key) for j in jobs]
    assert len({j.key for j in good}) == 5


# ------------------------------------------------------------------------------------ local runs


def test_local_workers_report_and_resume(tmp_path, clips, wav2lip_checkpoint):
    """Three jobs (one with a missing input) on two local worker processes through the CLI, then
    re-runs: finished outputs are skipped; one that changed, or whose input changed, runs again."""
    manifest = write_jsonl(tmp_path / "jobs.jsonl", [
        {"face": str(P2), "audio": str(clips["s10"]), "box": P2_BOX, "checkpoint": str(wav2lip_checkpoint)},
        {"face": str(clips["v3"]), "audio": str(clips["s14"]), "box": " ".join(map(str, V3_BOX)),
         "checkpoint": str(wav2lip_checkpoint), "output": "nested/v3.mp4", "blend": "box"},
        {"face": "no-such-face.mp4", "audio": str(clips["s10"]), "checkpoint": str(wav2lip_checkpoint)},
    ])
    out = tmp_path / "out"
    run = lipdub("batch", str(manifest), "--out-dir", str(out), "--workers", "2", "--json")
    assert run.returncode == 1, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert json.loads((out / REPORT_NAME).read_text())["jobs"] == report["jobs"]
    assert (report["total"], report["done"], report["skipped"], report["failed"]) == (3, 2, 0, 1)
    first, second, missing = report["jobs"]
    assert first["status"] == second["status"] == "done" and missing["status"] == "failed"
    assert missing["error"] == f"file not found: {tmp_path / 'no-such-face.mp4'}"
    assert second["output"] == str(out / "nested" / "v3.mp4")
    assert check_video(Path(first["output"]), 1.0, 25.0, (474, 474)) == first["n_frames"] == 25
    assert check_video(Path(second["output"]), 1.4, 25.0, (524, 524)) == second["n_frames"]
    assert first["timings"]["total"] > 0 and first["frames_with_face"] == 25
    assert not [p for p in out.rglob("*partial*")]

    mtimes = {p: p.stat().st_mtime_ns for p in (Path(first["output"]), Path(second["output"]))}
    rerun = lipdub("batch", str(manifest), "--out-dir", str(out), "--workers", "2", "--json", "--quiet")
    again = json.loads(rerun.stdout)
    assert (rerun.returncode, again["done"], again["skipped"], again["failed"]) == (1, 0, 2, 1)
    assert [j["status"] for j in again["jobs"]] == ["skipped", "skipped", "failed"]
    assert again["jobs"][0]["n_frames"] == 25  # from the journal
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # "Complete" means this job's own output, whole: a replaced output or a changed input runs again.
    Path(first["output"]).write_bytes(b"not the video any more")
    os.utime(clips["s14"], ns=(clips["s14"].stat().st_atime_ns, clips["s14"].stat().st_mtime_ns + 10**9))
    third = json.loads(lipdub("batch", str(manifest), "--out-dir", str(out), "--json", "--quiet").stdout)
    assert [j["status"] for j in third["jobs"]] == ["done", "done", "failed"]
    check_video(Path(first["output"]), 1.0, 25.0, (474, 474))
    journal = read_journal(out)
    # Job 1 kept its fingerprint (only its output was replaced); job 2 has a second (its input changed).
    assert sorted(e["line"] for e in journal.values()) == [1, 2, 2]


def test_a_bad_line_is_exit_code_2_after_the_other_jobs(tmp_path, clips, wav2lip_checkpoint):
    """The CLI names the first bad line and field in one line, exit code 2, once the other jobs
    ran (here one whose input is missing: it fails before any worker starts)."""
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("face,audio,box,checkpoint,pads\n"
                        f"absent.png,{clips['s10']},{' '.join(map(str, P2_BOX))},{wav2lip_checkpoint},\n"
                        f"{P2},{clips['s14']},{' '.join(map(str, P2_BOX))},{wav2lip_checkpoint},1 2 3\n"
                        f"{P2},{clips['s14']},,,blue\n")
    run = lipdub("batch", str(manifest), "--out-dir", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lipdub: error: {manifest} line 3, field 'pads': "
                                                   "--pads must be 4 integers"), run.stderr
    assert "(and 1 more bad line); the other 1 job: 0 done, 0 already complete, 1 failed" in lines[0]
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert [j["status"] for j in report["jobs"]] == ["failed", "invalid", "invalid"]
    assert report["jobs"][0]["error"] == f"file not found: {tmp_path / 'absent.png'}"
    assert report["jobs"][2]["error"].startswith("line 4, field 'pads': pads must be 4 integers")


def test_run_batch_api_raises_bad_manifest_with_the_report(tmp_path, clips, wav2lip_checkpoint):
    manifest = write_jsonl(tmp_path / "jobs.jsonl", ['{"face": "x", "audio": "y", "blend": 1}'])
    with pytest.raises(BadManifest) as caught:
        run_batch(manifest, tmp_path / "out", progress=False)
    assert "line 1, field 'blend'" in str(caught.value)
    assert caught.value.report["invalid"] == 1 and caught.value.report["total"] == 1
    with pytest.raises(LipdubError, match="a manifest is .jsonl"):
        run_batch(tmp_path / "jobs.txt", tmp_path / "out")
    with pytest.raises(LipdubError, match="cannot read the manifest"):
        run_batch(tmp_path / "absent.csv", tmp_path / "out")


def test_is_complete_needs_the_journal_entry_and_the_same_output(tmp_path):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"x" * 100)
    job = plan_jobs(parse_manifest(json.dumps({"face": "f.png", "audio": "a.wav", "output": str(out)}), "jsonl"),
                    tmp_path, tmp_path)[0]
    assert not is_complete(job, {})  # an output that merely exists is not this job's
    assert is_complete(job, {job.key: {"output": str(out), "size": 100}})
    assert not is_complete(job, {job.key: {"output": str(out), "size": 99}})
    assert not is_complete(job, {job.key: {"output": str(tmp_path / "other.mp4"), "size": 100}})


# ------------------------------------------------------------------------------------ data movement


def _spec(face: str, audio: str, output: str, checkpoint: Path, **extra) -> dict:
    return {"key": "k", "line": 1, "face": face, "audio": audio, "output": output,
            "options": {"box": P2_BOX, "checkpoint": str(checkpoint), **extra}}


def test_url_inputs_and_outputs_go_through_fsspec(tmp_path, clips, wav2lip_checkpoint):
    """An http:// input from a loopback server and memory:// input and output, in this process."""
    import fsspec

    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(MEDIA)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    memory = fsspec.filesystem("memory")
    try:
        memory.pipe("/lipdub-test/in/speech.wav", clips["s10"].read_bytes())
        face_url = f"http://127.0.0.1:{server.server_address[1]}/{P2.name}"
        outcome = run_job(_spec(face_url, "memory://lipdub-test/in/speech.wav", "memory://lipdub-test/out/r.mp4",
                                wav2lip_checkpoint))
        assert outcome["status"] == "done", outcome
        local = tmp_path / "r.mp4"
        local.write_bytes(memory.cat("/lipdub-test/out/r.mp4"))
        assert check_video(local, 1.0, 25.0, (474, 474)) == outcome["n_frames"]
        missing = run_job(_spec(face_url + ".absent", str(clips["s10"]), str(tmp_path / "x.mp4"), wav2lip_checkpoint))
        assert missing["status"] == "failed" and missing["error"] == f"file not found: {face_url}.absent"
        assert not (tmp_path / "x.mp4").exists()
    finally:
        server.shutdown()
        memory.rm("/lipdub-test", recursive=True)


def test_a_worker_that_cannot_see_a_local_input_asks_for_its_bytes(tmp_path, clips, wav2lip_checkpoint):
    """The shipping decision on a Ray worker: a local path counts as seen only with the size and
    mtime the driver saw; otherwise, with no bytes shipped, the job asks for them (and writes nothing)."""
    stat = [clips["s10"].stat().st_size, clips["s10"].stat().st_mtime_ns]
    output = tmp_path / "out.mp4"
    spec = _spec(str(P2), str(clips["s10"]), str(output), wav2lip_checkpoint)
    asked = run_job({**spec, "shipped": {"audio": {"stat": [stat[0], stat[1] + 1], "ref": None}}})
    assert asked["status"] == "need_bytes" and "audio" in asked["error"] and not output.exists()
    seen = run_job({**spec, "shipped": {"audio": {"stat": stat, "ref": None}}})
    assert seen["status"] == "done" and output.is_file()
