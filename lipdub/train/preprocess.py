"""`lipdub preprocess RAW_DIR DATA_DIR`: videos -> face crops + 16 kHz audio, in the original layout.

For every video under RAW_DIR (any nesting) the clip folder ``DATA_DIR/<relative path without
suffix>/`` gets:

* ``<n>.jpg``: the face on output-clock frame n (0-based), cropped with the same detector, track,
  padding (0 10 0 0) and smoothing as `lipdub run`, resized to 96x96. Frames without a face
  have no file (windows never span them).
* ``audio.wav``: the video's own audio, 16 kHz mono PCM, shifted so that sample 0 is the time
  of frame 0 (as `run` aligns a video's own audio); ``mel.npy`` is its mel spectrogram.
* ``meta.json``: fps, frame count, the runs of frames with a face, the source's size and
  modification time. It is written last: a clip folder with it is finished, and a re-run skips
  it unless the source changed.

Plus ``DATA_DIR/filelists/{train,val}.txt`` (clip folders relative to DATA_DIR, as the
original's filelists) and ``DATA_DIR/preprocess_report.json`` (every clip: done, skipped and
why: no face, too short, no audio, unreadable). Clips run in parallel worker processes; each
streams its video twice (scan, then crop) and never holds more than a few frames.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import time
import traceback
from pathlib import Path

import cv2
import numpy as np
import torch

from .. import audio as audio_mod
from ..device import cpu_count
from ..errors import LipdubError
from ..faces import default_stride, load_detector, runs, track_video
from ..media import VideoSource, load_audio, video_start_in_audio, write_atomic
from .common import IMG_SIZE, T, write_json_atomic
from .synth import write_wav

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv"}
MIN_FRAMES = 3 * T  # the original skips clips with <= 3*T frames; we need two windows 5 apart


def find_videos(raw_dir: Path) -> list[Path]:
    return sorted(p for p in Path(raw_dir).rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                  and not p.name.startswith("."))


def clip_name(raw_dir: Path, video: Path) -> str:
    return video.relative_to(raw_dir).with_suffix("").as_posix()


def _source_id(video: Path) -> dict:
    st = video.stat()
    return {"size": st.st_size, "mtime": int(st.st_mtime)}


def split_of(name: str, val_fraction: float) -> str:
    """'val' for clips under a top folder named val/test, else a stable hash decides."""
    top = name.split("/")[0].lower()
    if top in ("val", "test", "valid", "validation"):
        return "val"
    if top == "train":
        return "train"
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def process_clip(video: Path, out: Path, detector, crop_size: int = IMG_SIZE, min_frames: int = MIN_FRAMES) -> dict:
    """Preprocess one video into `out`. Returns {"status": "done"|"skipped", "reason", ...}."""
    try:
        source = VideoSource(video)
        if source.info.is_image:
            return {"status": "skipped", "reason": "unreadable: not a video"}
        fps = float(source.info.fps)
        try:
            wav = load_audio(video, start=video_start_in_audio(video))
        except LipdubError as exc:
            return {"status": "skipped", "reason": f"no audio ({exc})"}
        if not np.any(wav):
            return {"status": "skipped", "reason": "no audio (silent track)"}
        tick_pts, track = track_video(source, detector, stride=default_stride(fps), pads=(0, 10, 0, 0))
    except LipdubError as exc:
        return {"status": "skipped", "reason": f"unreadable ({exc})"}
    n = len(tick_pts)
    if n < min_frames:
        return {"status": "skipped", "reason": f"too short ({n} frames, need {min_frames})"}
    if not track.valid.any():
        return {"status": "skipped", "reason": "no face"}
    face_runs = [[a, b] for a, b in runs(track.valid) if b - a >= T]
    usable = sum(b - a for a, b in face_runs)
    if usable < min_frames:
        return {"status": "skipped", "reason": f"too short (face in {usable} usable frames, need {min_frames})"}
    mel = audio_mod.melspectrogram(wav).astype(np.float32)
    if mel.shape[1] < audio_mod.MEL_STEP_SIZE:
        return {"status": "skipped", "reason": "too short (audio under 0.2 s)"}

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    keep = np.zeros(n, bool)
    for a, b in face_runs:
        keep[a:b] = True
    for i, frame in enumerate(source.frames_at(tick_pts, range(n))):
        if not keep[i]:
            continue
        x1, y1, x2, y2 = track.boxes[i]
        face = cv2.resize(frame[y1:y2, x1:x2], (crop_size, crop_size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / f"{i}.jpg"), face, [cv2.IMWRITE_JPEG_QUALITY, 95])
    write_wav(out / "audio.wav", wav)
    # the mel of exactly what audio.wav holds (16-bit), as a reader of the original layout computes it
    mel = audio_mod.melspectrogram(load_audio(out / "audio.wav")).astype(np.float32)
    np.save(out / "mel.npy", mel)
    meta = {"fps": fps, "n_frames": n, "runs": face_runs, "n_mel": int(mel.shape[1]), "crop_size": crop_size,
            "source": str(video), **_source_id(video)}
    write_json_atomic(out / "meta.json", meta)
    return {"status": "done", "frames": usable, "fps": fps}


# ------------------------------------------------------------------------------------- the driver

_worker_detector = None


def _worker_init(detector_name: str, threads: int) -> None:
    global _worker_detector
    torch.set_num_threads(threads)
    options = {"threads": threads} if detector_name == "centerface" else {}
    _worker_detector = load_detector(detector_name, "cpu", **options)


def _worker(job: tuple[str, str, str, int]) -> tuple[str, dict]:
    name, video, out, crop_size = job
    started = time.perf_counter()
    try:
        result = process_clip(Path(video), Path(out), _worker_detector, crop_size)
    except Exception as exc:  # one bad file must not stop the others
        result = {"status": "skipped", "reason": f"unreadable ({type(exc).__name__}: {exc})",
                  "trace": traceback.format_exc(limit=3), "retry": True}
    result["seconds"] = round(time.perf_counter() - started, 2)
    if result["status"] == "skipped" and not result.get("retry"):  # unexpected errors are retried next run
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(out) / "skipped.json", {"reason": result["reason"], **_source_id(Path(video))})
    return name, result


def _finished(video: Path, out: Path) -> dict | None:
    """The earlier result for this clip if its source has not changed since."""
    for marker, status in (("meta.json", "done"), ("skipped.json", "skipped")):
        path = out / marker
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            if data.get("size") == video.stat().st_size and data.get("mtime") == int(video.stat().st_mtime):
                result = {"status": status, "previous_run": True}
                if status == "skipped":
                    result["reason"] = data.get("reason", "")
                return result
    return None


def preprocess(raw_dir: Path, data_dir: Path, workers: int = 0, detector: str = "centerface",
               val_fraction: float = 0.1, crop_size: int = IMG_SIZE, progress: bool = True) -> dict:
    raw_dir, data_dir = Path(raw_dir), Path(data_dir)
    if not raw_dir.is_dir():
        raise LipdubError(f"input folder not found: {raw_dir}")
    videos = find_videos(raw_dir)
    if not videos:
        raise LipdubError(f"no videos found under {raw_dir} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    data_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    jobs = []
    for video in videos:
        name = clip_name(raw_dir, video)
        out = data_dir / name
        earlier = _finished(video, out)
        if earlier is not None:
            results[name] = earlier
        else:
            for marker in ("meta.json", "skipped.json"):
                (out / marker).unlink(missing_ok=True)
            jobs.append((name, str(video), str(out), crop_size))
    workers = workers or max(1, min(len(jobs), cpu_count()))
    threads = max(1, cpu_count() // max(1, workers))
    if jobs:
        if workers == 1:
            _worker_init(detector, threads)
            stream = map(_worker, jobs)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(detector, threads))
            stream = pool.imap_unordered(_worker, jobs)
        try:
            for k, (name, result) in enumerate(stream, 1):
                results[name] = result
                if progress:
                    what = "done" if result["status"] == "done" else f"skipped: {result['reason']}"
                    print(f"preprocess [{k}/{len(jobs)}] {name}: {what}", flush=True)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for name in sorted(results):
        if results[name]["status"] == "done":
            lists[split_of(name, val_fraction)].append(name)
    (data_dir / "filelists").mkdir(exist_ok=True)
    for split, names in lists.items():
        write_atomic(data_dir / "filelists" / f"{split}.txt", "".join(f"{n}\n" for n in names))
    report = {
        "raw_dir": str(raw_dir), "videos": len(videos),
        "done": sum(r["status"] == "done" for r in results.values()),
        "skipped": {n: r["reason"] for n, r in sorted(results.items()) if r["status"] == "skipped"},
        "reused_from_previous_run": sum(bool(r.get("previous_run")) for r in results.values()),
        "train": len(lists["train"]), "val": len(lists["val"]),
        "clips": results,
    }
    write_json_atomic(data_dir / "preprocess_report.json", report)
    if progress:
        print(f"preprocess: {report['done']} clips ready ({report['train']} train, {report['val']} val), "
              f"{len(report['skipped'])} skipped, {report['reused_from_previous_run']} from an earlier run; "
              f"report in {data_dir / 'preprocess_report.json'}", flush=True)
    return report
