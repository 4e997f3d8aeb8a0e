"""`lipdub batch`: many lip-sync jobs from one manifest, on local worker processes or on a Ray cluster.

    lipdub batch jobs.jsonl --out-dir out/                 # local worker processes (no Ray needed)
    lipdub batch jobs.csv --out-dir out/ --ray auto        # one Ray task per job on a cluster

The steps, each its own function so each can be tested (and fuzzed) alone:

1. `parse_manifest` (pure): the manifest's bytes -> one `ManifestLine` per job line, with the run
   options checked by the one options schema (`lipdub.options`). A bad line carries its error
   ("line 3, field 'pads': ..."); only a problem of the whole file (format, CSV header) raises.
2. `plan_jobs`: inputs resolved (relative to the manifest's folder; URLs kept), outputs named
   (relative under --out-dir; without `output`, a name from the inputs plus a digest of the job,
   so two jobs never share one), and each job's fingerprint for resuming.
3. A runner executes the jobs: `LocalRunner` (worker processes, the default) or `RayRunner` (one
   Ray task per job, asking for a GPU where the cluster has them, else a CPU; Ray retries a task
   whose node is lost). Every worker process keeps its generator loaded between jobs
   (`GeneratorCache`). A failed job never stops the others.
4. `DIR/batch-report.json` tells each job's status, error line, output, frames and timings.
   Completed jobs are appended to `DIR/.lipdub-batch-journal.jsonl` as they finish; on a re-run a
   job is skipped when the journal holds its fingerprint (same inputs by path, size and mtime,
   same options, same output) and its output is there with the recorded size. Outputs are
   written atomically, so an output that exists is whole; the journal tells it is this job's.

Data movement: inputs may be local paths or URLs (http(s)://, s3://, gs://, ... through fsspec);
outputs local paths or writable URLs. On Ray, a worker that cannot see a local input (no file of
the same size and mtime at that path) asks for it, and the driver then ships the bytes through
Ray's object store; an output the worker cannot write into --out-dir (it does not see the
folder's token file) comes back the same way and the driver writes it.

A line with a bad field is reported (status "invalid") while the other jobs run; `run_batch`
then raises `BadManifest` (a LipdubError: exit code 2) naming the first bad line and field.
"""
from __future__ import annotations

import atexit
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import weights
from .device import cpu_count
from .errors import LipdubError
from .generate import GeneratorCache
from .media import check_readable, make_folder, write_atomic
from .options import SyncOptions, check_value, fields, flag_of, from_text, spec_of
from .pipeline import sync
from .progress import bar

log = logging.getLogger("lipdub.batch")

REPORT_NAME = "batch-report.json"
JOURNAL_NAME = ".lipdub-batch-journal.jsonl"
LOCK_NAME = ".lipdub-batch.lock"
TOKEN_NAME = ".lipdub-ray-token"
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
JOB_FIELDS = ("face", "audio", "output")
NOT_IN_MANIFEST = ("progress", "report")  # the bar is the batch's; the batch report replaces --report
FILE_OPTIONS = ("checkpoint", "detector_weights", "restore_checkpoint")  # values that may be files to ship
URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
READ_ONLY_SCHEMES = ("http", "https")
REPORT_EVERY_S = 10.0  # least time between two rewrites of the report while jobs run
MAX_LOCAL_ATTEMPTS = 2  # runs of a job whose worker process died before it is failed
RAY_MAX_RETRIES = 3  # Ray re-runs of a task whose worker or node died
CHANNEL_EVERY_S = 0.25  # least time between two progress reports of a Ray task


class BadManifest(LipdubError):
    """Some manifest lines were invalid; the other jobs ran. `report` is the batch report."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class JobCancelled(Exception):
    """Raised inside a job when its driver asked it to stop (the web service's cancel)."""


# ------------------------------------------------------------------------------------ manifest


@dataclass
class ManifestLine:
    """One job line as written: inputs, optional output and the run options it sets (checked)."""

    line: int
    face: str | None = None
    audio: str | None = None
    output: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # given options only, JSON-ready values
    error: str | None = None  # "line 3, field 'pads': ..." when the line is bad


def manifest_options() -> dict[str, dataclasses.Field]:
    """The run options a manifest line may set: every `lipdub run` flag but --quiet and --report."""
    return {f.name: f for f in fields() if spec_of(f).cli and f.name not in NOT_IN_MANIFEST}


def _line_error(line: int, name: str | None, message: str) -> ManifestLine:
    """A bad line's one-line error (values quoted in `message` may hold line breaks: shown as '?')."""
    where = f"line {line}, field '{_clip(name, 40)}'" if name is not None else f"line {line}"
    return ManifestLine(line, error=f"{where}: {_clip(message, 300)}")


def _clip(text: str, limit: int) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    return None


def _option_value(f: dataclasses.Field, value: Any, text: bool) -> Any:
    """A manifest value for option `f`: text (a CSV cell, or a JSON string such as "0 10 0 0") is
    parsed as the web form's text is; JSON numbers, lists and booleans are checked as they are."""
    if isinstance(value, str):
        if not text:
            try:
                return check_value(f, value)
            except LipdubError:
                pass  # e.g. "3" for an integer: read it as text below
        return check_value(f, from_text(f, value))
    return check_value(f, value)


def _field_named(message: str, names: Iterable[str]) -> str | None:
    """The option a cross-field message is about (it names flags, e.g. '--upscale needs --restore')."""
    by_name = manifest_options()
    for name in names:
        f = by_name.get(name)
        if f is not None and re.search(re.escape(flag_of(f)) + r"\b", message):
            return name
        if f is not None and re.search(re.escape("--" + name.replace("_", "-")) + r"\b", message):
            return name
    return None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_line(line: int, values: dict[Any, Any], text: bool) -> ManifestLine:
    """One job's fields (JSON values, or CSV text when `text`) -> a checked `ManifestLine`."""
    known = manifest_options()
    out = ManifestLine(line)
    options: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for raw_key, value in values.items():
        if not isinstance(raw_key, str):
            return _line_error(line, None, "a field without a name")
        key = raw_key.strip().lower().replace("-", "_")
        if key in seen:
            return _line_error(line, raw_key, f"given twice (also as '{_clip(seen[key], 40)}')")
        seen[key] = raw_key
        if key in JOB_FIELDS:
            if value is None or (isinstance(value, str) and not value.strip()):
                if key == "output":
                    continue
                return _line_error(line, raw_key, "needs a file path or URL")
            if not isinstance(value, str):
                return _line_error(line, raw_key, f"must be text (a file path or URL), got {_clip(repr(value), 40)}")
            problem = _text_problem(value)
            if problem:
                return _line_error(line, raw_key, problem)
            setattr(out, key, value.strip())
            continue
        f = known.get(key)
        if f is None:
            return _line_error(line, raw_key, "unknown field (face, audio, output, or a run option of `lipdub run` "
                                              "such as checkpoint, blend, pads, box, face_index)")
        if isinstance(value, str) and _text_problem(value):
            return _line_error(line, raw_key, _text_problem(value))
        if text and isinstance(value, str) and not value.strip():
            continue  # an empty CSV cell: the option keeps its default
        try:
            options[key] = _option_value(f, value, text)
        except LipdubError as exc:
            return _line_error(line, raw_key, str(exc))
    for required, what in (("face", "a face video or image"), ("audio", "an audio file")):
        if getattr(out, required) is None and required not in seen:
            return _line_error(line, required, f"missing: every job needs {what}")
    try:
        checked = SyncOptions.build(**options)
    except LipdubError as exc:
        name = _field_named(str(exc), options)
        return _line_error(line, seen.get(name, name) if name else None, str(exc))
    out.options = {name: _jsonable(getattr(checked, name)) for name in options}
    return out


class _Twice(Exception):
    pass


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Twice(key)
        out[key] = value
    return out


def _decode(raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LipdubError(f"line {line}: not UTF-8 text (byte {exc.start + 1} of the line)") from None


def _parse_jsonl(data: bytes) -> list[ManifestLine]:
    out = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = _decode(raw, number)
        except LipdubError as exc:
            out.append(ManifestLine(number, error=str(exc)))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text, object_pairs_hook=_object_pairs)
        except _Twice as twice:
            out.append(_line_error(number, str(twice.args[0]), "given twice"))
            continue
        except json.JSONDecodeError as exc:
            out.append(_line_error(number, None, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except (ValueError, RecursionError) as exc:  # digits beyond Python's limit, deep nesting
            out.append(_line_error(number, None, f"not valid JSON ({_clip(str(exc) or 'too deeply nested', 80)})"))
            continue
        if not isinstance(obj, dict):
            out.append(_line_error(number, None, f"not a JSON object ({type(obj).__name__}); "
                                                 'write {"face": ..., "audio": ..., ...}'))
            continue
        out.append(check_line(number, obj, text=False))
    return out


def _parse_csv(data: bytes) -> list[ManifestLine]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LipdubError(f"line {line}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    out = []
    last = 0
    try:
        for row in reader:
            first, last = last + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header, header_line = _check_header(row, first), first
                continue
            if len(row) > len(header) and any(cell.strip() for cell in row[len(header):]):
                out.append(_line_error(first, None, f"{len(row)} cells, but the header (line {header_line}) "
                                                    f"names {len(header)} columns"))
                continue
            values = {name: cell for name, cell in zip(header, row)}
            out.append(check_line(first, values, text=True))
    except csv.Error as exc:
        raise LipdubError(f"line {last + 1}: not valid CSV ({_clip(str(exc), 80)})") from None
    if header is None:
        raise LipdubError("no header row (face,audio,... column names) and no jobs")
    return out


def _check_header(row: list[str], line: int) -> list[str]:
    names = [cell.strip().lstrip("\ufeff").strip() for cell in row]
    known = set(manifest_options()) | set(JOB_FIELDS)
    seen: dict[str, str] = {}
    for column, name in enumerate(names, 1):
        if not name:
            raise LipdubError(f"line {line}: column {column} of the header has no name")
        key = name.lower().replace("-", "_")
        if key not in known:
            raise LipdubError(f"line {line}, field '{_clip(name, 40)}': unknown column (face, audio, output, or "
                              f"a run option of `lipdub run` such as checkpoint, blend, pads, box, face_index)")
        if key in seen:
            raise LipdubError(f"line {line}, field '{_clip(name, 40)}': a second column for "
                              f"'{_clip(seen[key], 40)}'")
        seen[key] = name
    for required in ("face", "audio"):
        if required not in seen:
            raise LipdubError(f"line {line}, field '{required}': the header has no '{required}' column")
    return names


def parse_manifest(data: bytes | str, fmt: str) -> list[ManifestLine]:
    """The job lines of a manifest (`fmt` "jsonl": one JSON object a line; "csv": a header row).

    Pure: no file is touched. Returns one `ManifestLine` per job line (blank lines are skipped),
    a bad one with its `error`; raises LipdubError only for the whole file (no jobs at all, a bad
    CSV header, broken CSV quoting). Field names are the run options' (`face_index`; `face-index`
    and other case are accepted too).
    """
    if fmt not in ("jsonl", "csv"):
        raise LipdubError(f"unknown manifest format '{_clip(str(fmt), 20)}' (jsonl, csv)")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark from a spreadsheet export
        data = data[3:]
    lines = _parse_jsonl(data) if fmt == "jsonl" else _parse_csv(data)
    if not lines:
        raise LipdubError("no jobs in the manifest")
    return lines


def manifest_format(path: str) -> str:
    suffix = os.path.splitext(path.split("?", 1)[0])[1].lower()
    if suffix not in FORMATS:
        raise LipdubError(f"{path}: a manifest is .jsonl (one JSON object a line) or .csv (a header row)")
    return FORMATS[suffix]


def read_manifest(path: str | os.PathLike) -> list[ManifestLine]:
    """`parse_manifest` of a local file or URL, its format chosen by the suffix."""
    path = os.fspath(path)
    fmt = manifest_format(path)
    try:
        data = read_bytes(path)
    except OSError as exc:
        raise LipdubError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    return parse_manifest(data, fmt)


# ------------------------------------------------------------------------------------ locations


def is_url(text: str) -> bool:
    return bool(URL_RE.match(text)) and not text.lower().startswith("file://")


def _local(text: str) -> str:
    return text[7:] if text.lower().startswith("file://") else text


def _fsspec():
    try:
        import fsspec  # deferred: URL support only (the `cluster` extra; also installed with torch)
    except ImportError:
        raise LipdubError("URLs need fsspec: pip install 'lipdub[cluster]'") from None
    return fsspec


def _url_call(url: str, action: Callable[[Any], Any]) -> Any:
    """Run `action(fsspec)` on a URL; a missing backend or a remote failure is one LipdubError line."""
    fsspec = _fsspec()
    try:
        return action(fsspec)
    except ImportError as exc:
        raise LipdubError(f"{url}: {_clip(str(exc), 160)}") from None
    except FileNotFoundError:
        raise LipdubError(f"file not found: {url}") from None
    except (OSError, ValueError) as exc:
        raise LipdubError(f"{url}: {_clip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)}") \
            from None


def read_bytes(location: str) -> bytes:
    if is_url(location):
        def get(fsspec):
            with fsspec.open(location, "rb") as fh:
                return fh.read()
        return _url_call(location, get)
    return Path(_local(location)).expanduser().read_bytes()


def download(url: str, dest: Path) -> Path:
    def get(fsspec):
        with fsspec.open(url, "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        return dest
    return _url_call(url, get)


def upload(path: Path, url: str) -> None:
    def put(fsspec):
        with open(path, "rb") as src, fsspec.open(url, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    _url_call(url, put)


def output_size(location: str) -> int | None:
    """Bytes of an existing output, None when there is none."""
    if is_url(location):
        def size(fsspec):
            fs, path = fsspec.core.url_to_fs(location)
            return int(fs.info(path)["size"]) if fs.exists(path) else None
        try:
            return _url_call(location, size)
        except LipdubError:
            return None
    try:
        st = os.stat(location)
    except (OSError, ValueError):
        return None
    return st.st_size if st.st_size > 0 and not os.path.isdir(location) else None


def _file_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


# ------------------------------------------------------------------------------------ planning


@dataclass
class Job:
    """One job ready to run: absolute local paths or URLs, and the options its line sets."""

    line: int
    face: str | None = None
    audio: str | None = None
    output: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # fingerprint: what must be equal for a finished output to count on a re-run
    error: str | None = None  # an invalid line

    def spec(self) -> dict:
        return {"key": self.key, "line": self.line, "face": self.face, "audio": self.audio, "output": self.output,
                "options": dict(self.options)}


def _resolve_input(text: str, base: Path) -> str:
    if is_url(text):
        return text
    path = Path(_local(text)).expanduser()
    return str(path if path.is_absolute() else (base / path).absolute())


def _safe_stem(location: str, fallback: str) -> str:
    name = location.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(name)[0]).strip("._-")
    return stem[:60] or fallback


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _resolve_file_options(options: dict, base: Path) -> dict:
    """Relative file paths of file-valued options (a .pth checkpoint) are relative to the manifest too."""
    out = dict(options)
    for name in FILE_OPTIONS:
        value = out.get(name)
        if isinstance(value, str) and value and not is_url(value) and not os.path.isabs(value):
            candidate = str((base / Path(value).expanduser()).absolute())
            if os.path.isfile(candidate):
                out[name] = candidate
    return out


def plan_jobs(lines: list[ManifestLine], manifest_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Job]:
    """Jobs with their inputs resolved, outputs named and fingerprints set; invalid lines keep their error.

    A relative `output` lies under `out_dir` (and may not leave it); an absolute path or a
    writable URL is used as given. Without `output` the name is `<face>-<audio>-<digest>.mp4`
    from the inputs' names and a digest of the job (inputs and options), stable across runs; a
    second job with the same output is invalid.
    """
    base, out_dir = Path(manifest_dir).absolute(), Path(out_dir).absolute()
    jobs: list[Job] = []
    taken: dict[str, int] = {}
    for entry in lines:
        if entry.error:
            jobs.append(Job(entry.line, error=entry.error))
            continue
        face, audio = _resolve_input(entry.face, base), _resolve_input(entry.audio, base)
        options = _resolve_file_options(entry.options, base)
        if entry.output is None:
            name = (f"{_safe_stem(face, 'face')}-{_safe_stem(audio, 'audio')}-"
                    f"{_digest(face, audio, options)[:10]}.mp4")
            output = str(out_dir / name)
        elif is_url(entry.output):
            if entry.output.split(":", 1)[0].lower() in READ_ONLY_SCHEMES:
                jobs.append(_line_job(entry.line, "output", "http(s) URLs are for inputs; write to a path, "
                                                            "s3://, gs:// or another writable URL"))
                continue
            output = entry.output
        else:
            path = Path(_local(entry.output)).expanduser()
            if path.is_absolute():
                output = os.path.normpath(path)
            elif ".." in path.parts:
                jobs.append(_line_job(entry.line, "output", "a relative output stays inside --out-dir (no '..')"))
                continue
            else:
                output = os.path.normpath(out_dir / path)
            if output.endswith(os.sep) or Path(output).name in ("", ".", REPORT_NAME, JOURNAL_NAME, LOCK_NAME):
                jobs.append(_line_job(entry.line, "output", f"'{_clip(entry.output, 60)}' is not a file name "
                                                            "for a video"))
                continue
        if output in taken:
            jobs.append(_line_job(entry.line, "output", f"the same output as line {taken[output]}"))
            continue
        taken[output] = entry.line
        stats = {name: _file_stat(value) for name, value in
                 [("face", face), ("audio", audio)] + [(n, options.get(n)) for n in FILE_OPTIONS]
                 if isinstance(value, str) and not is_url(value)}
        key = _digest(face, audio, output, options, stats)
        jobs.append(Job(entry.line, face, audio, output, options, key))
    return jobs


def _line_job(line: int, name: str, message: str) -> Job:
    return Job(line, error=_line_error(line, name, message).error)


# ------------------------------------------------------------------------------------ one job


_MODEL = GeneratorCache()  # this process's generator, kept from one job to the next
_ASSETS: dict[tuple, str] = {}  # shipped file options (checkpoints) already written here
_ASSET_DIR: list[str] = []


def _asset_dir() -> Path:
    if not _ASSET_DIR:
        path = tempfile.mkdtemp(prefix="lipdub-assets-")
        atexit.register(shutil.rmtree, path, True)
        _ASSET_DIR.append(path)
    return Path(_ASSET_DIR[0])


class _NeedBytes(Exception):
    """This worker cannot see a local file of the job; the driver must ship it."""


def _same_file(path: str, stat: tuple[int, int] | None) -> bool:
    return stat is not None and _file_stat(path) == tuple(stat)


def _fetch(shipped: dict, dest: Path) -> Path:
    import ray  # deferred: only a Ray worker gets shipped files (the optional `cluster` extra)

    data = ray.get(shipped["ref"])
    with open(dest, "wb") as out:
        out.write(data)
    return dest


def _materialize(role: str, location: str, shipped: dict | None, tmp: Path) -> str:
    """A local path of an input for this worker: as given, downloaded from a URL, or shipped."""
    name = _safe_stem(location, role) + os.path.splitext(location.split("?", 1)[0])[1][:12]
    if is_url(location):
        return str(download(location, tmp / f"{role}-{name}"))
    if shipped is None:
        return location
    if shipped.get("ref") is not None:  # shipped: use these bytes, whatever this node has at that path
        return str(_fetch(shipped, tmp / f"{role}-{name}"))
    if _same_file(location, shipped.get("stat")):
        return location
    raise _NeedBytes(role)


def _materialize_asset(location: str, shipped: dict | None) -> str:
    """A file option (checkpoint): shipped ones are written once per process and reused."""
    if shipped is None:
        return location
    if shipped.get("ref") is None:
        if _same_file(location, shipped.get("stat")):
            return location
        raise _NeedBytes(location)
    key = (location, tuple(shipped["stat"]))
    if key not in _ASSETS or not os.path.isfile(_ASSETS[key]):
        dest = _asset_dir() / f"{len(_ASSETS)}-{os.path.basename(location)}"
        _ASSETS[key] = str(_fetch(shipped, dest))
    return _ASSETS[key]


def _token_visible(token: dict | None) -> bool:
    if not token:
        return False
    try:
        return Path(token["path"]).read_text().strip() == token["value"]
    except (OSError, ValueError):
        return False


class _ChannelReporter:
    """A Ray task's `progress_callback`: throttled reports to the driver's `JobChannel`; raises
    JobCancelled when the driver asked the job to stop."""

    def __init__(self, channel: Any, key: str) -> None:
        self.channel, self.key = channel, key
        self.stage: str | None = None
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == self.stage and now - self.last < CHANNEL_EVERY_S and done < total:
            return
        self.stage, self.last = stage, now
        if self._ask(self.channel.report.remote(self.key, stage, done, total)):
            raise JobCancelled()

    def start(self, node: str, pid: int) -> None:
        if self._ask(self.channel.start.remote(self.key, node, pid)):
            raise JobCancelled()

    @staticmethod
    def _ask(ref: Any) -> bool:
        import ray  # deferred: Ray tasks only (the optional `cluster` extra)

        try:
            return bool(ray.get(ref, timeout=30))
        except Exception:  # the channel is progress only: a lost one never fails the job
            return False


def _public(message: str, names: dict[str, str]) -> str:
    for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        if path:
            message = message.replace(path, name)
    return message


def run_job(spec: dict, model: Any = None) -> dict:
    """Run one job spec where this process is (a local worker or a Ray task); never raises for
    the job's own failures: the outcome dict has `status` done, failed or cancelled (or
    need_bytes: this Ray worker cannot see a local file and the driver must ship it)."""
    started = time.monotonic()
    ray_info = spec.get("ray") or {}
    node = ray_info.get("node") or "local"
    out: dict[str, Any] = {"key": spec["key"], "node": node, "host": socket.gethostname(), "pid": os.getpid()}
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shipped = spec.get("shipped") or {}
    reporter = _ChannelReporter(ray_info["channel"], spec["key"]) if ray_info.get("channel") is not None else None
    output = spec["output"]
    names = {spec["face"]: spec["face"], spec["audio"]: spec["audio"]}
    try:
        with tempfile.TemporaryDirectory(prefix="lipdub-job-") as tmp_dir:
            tmp = Path(tmp_dir)
            names[tmp_dir + os.sep] = ""
            if reporter is not None:
                reporter.start(node, os.getpid())
            face = _materialize("face", spec["face"], shipped.get("face"), tmp)
            audio = _materialize("audio", spec["audio"], shipped.get("audio"), tmp)
            names.update({face: spec["face"], audio: spec["audio"]})
            options = dict(spec["options"])
            for name, location in (spec.get("assets") or {}).items():
                options[name] = _materialize_asset(location, shipped.get(name))
            deliver = spec.get("deliver") or {}
            if is_url(output):
                target = tmp / ("output" + (os.path.splitext(output.split("?", 1)[0])[1] or ".mp4"))
            elif deliver.get("return_bytes") or (deliver.get("token") and not (
                    deliver.get("under_token") and _token_visible(deliver["token"]))):
                target = tmp / ("output" + (os.path.splitext(output)[1] or ".mp4"))
                out["output_bytes"] = True
            else:
                target = Path(output)
                target.parent.mkdir(parents=True, exist_ok=True)
            names[str(target)] = output
            opts = SyncOptions.build(**options, progress=False, progress_callback=reporter)
            result = sync(face, audio, target, options=opts, model=model)
            if is_url(output):
                upload(target, output)
            elif out.get("output_bytes"):
                out["output_bytes"] = target.read_bytes()
    except _NeedBytes as need:
        return {**out, "status": "need_bytes", "error": f"cannot see {need.args[0]} here"}
    except JobCancelled:
        return {**out, "status": "cancelled", "error": "cancelled"}
    except LipdubError as exc:
        return {**out, "status": "failed", "error": _public(str(exc), names)}
    except Exception as exc:  # a bug: keep the traceback in this worker's log, one line in the report
        log.error("job on line %s: internal error\n%s", spec.get("line"), traceback.format_exc())
        first = (str(exc).splitlines() or [""])[0]
        return {**out, "status": "failed", "error": _public(f"internal error ({type(exc).__name__}): {first}", names)}
    data = result.as_dict()
    data.pop("output", None)
    return {**out, **data, "status": "done", "seconds": round(time.monotonic() - started, 3)}


# ------------------------------------------------------------------------------------ local runner


def _init_local_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    torch.set_num_threads(max(1, threads))


def _local_task(spec: dict) -> dict:
    return run_job(spec, _MODEL)


class LocalRunner:
    """`workers` processes on this machine (spawned, so no thread state is forked), each keeping
    its generator between jobs. A process that dies takes only its job's attempt with it: the
    pool is rebuilt and the job runs again, and fails after MAX_LOCAL_ATTEMPTS."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.threads = max(1, cpu_count() // self.workers)
        self.pool: ProcessPoolExecutor | None = None
        self.running: dict[Future, dict] = {}
        self.attempts: dict[str, int] = {}
        self.early: list[dict] = []  # outcomes known without a worker (a missing input)

    def describe(self) -> str:
        return f"{self.workers} local worker process{'es' if self.workers > 1 else ''}"

    def slots(self) -> int:
        return self.workers

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                            initializer=_init_local_worker, initargs=(self.threads,))
        return self.pool

    def submit(self, spec: dict) -> None:
        for role in ("face", "audio"):  # this machine is where the job runs: a missing file fails it now
            if not is_url(spec[role]):
                try:
                    check_readable(spec[role])
                except LipdubError as exc:
                    self.early.append({"key": spec["key"], "status": "failed", "error": str(exc), "node": "local"})
                    return
        self.attempts[spec["key"]] = self.attempts.get(spec["key"], 0) + 1
        self.running[self._pool().submit(_local_task, spec)] = spec

    def in_flight(self) -> int:
        return len(self.running) + len(self.early)

    def poll(self, timeout: float) -> list[dict]:
        outcomes, self.early = self.early, []
        if not self.running:
            return outcomes
        done, _ = wait(list(self.running), timeout=0 if outcomes else timeout, return_when=FIRST_COMPLETED)
        broken = []
        for future in done:
            spec = self.running.pop(future)
            try:
                outcome = future.result()
            except BrokenProcessPool:
                broken.append(spec)
                continue
            outcomes.append({**outcome, "attempts": self.attempts.get(spec["key"], 1)})
        if broken:  # the whole pool went down with that process: every job in it runs again
            for future, spec in list(self.running.items()):
                if future.done() and not future.cancelled() and future.exception() is None:
                    outcomes.append({**future.result(), "attempts": self.attempts.get(spec["key"], 1)})
                else:
                    broken.append(spec)
            self.running.clear()
            self._discard_pool()
            for spec in broken:
                if self.attempts[spec["key"]] >= MAX_LOCAL_ATTEMPTS:
                    outcomes.append({"key": spec["key"], "status": "failed", "node": "local",
                                     "attempts": self.attempts[spec["key"]],
                                     "error": "the worker process running this job died (killed, or out of memory)"})
                else:
                    self.submit(spec)
        return outcomes

    def _discard_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self, cancel: bool = False) -> None:
        if self.pool is None:
            return
        if cancel:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                try:
                    process.kill()
                except Exception:
                    pass
        self.pool.shutdown(wait=not cancel, cancel_futures=True)
        self.pool = None


# ------------------------------------------------------------------------------------ Ray


def import_ray():
    try:
        import ray  # deferred: the optional `cluster` extra, heavy to import
    except ImportError:
        raise LipdubError("--ray needs Ray: pip install 'lipdub[cluster]'") from None
    return ray


def connect_ray(address: str, log_to_driver: bool = False) -> tuple[Any, bool]:
    """Connect this process to the Ray cluster at `address` ("auto": the one `ray start` made here).
    Returns (ray, whether this call connected and should disconnect)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    _probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LipdubError(f"cannot connect to the Ray cluster at {address}: {_clip(first, 200)}") from None
    return ray, True


def _probe(address: str, timeout: float = 10.0) -> None:
    """A quick TCP connect to HOST:PORT (also of ray://HOST:PORT): ray.init itself waits forever for
    an address where nothing answers."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d{1,5})/?", address.strip())
    if match is None:
        if address.strip() in ("auto", "local") or address.startswith("ray://"):
            return
        raise LipdubError(f"--ray needs HOST:PORT of the cluster's head node, or auto (got '{_clip(address, 80)}')")
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise LipdubError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}") from None


class JobChannel:
    """A small Ray actor next to the driver: tasks report their start (node, attempt) and
    progress to it, and learn from it that the driver wants them to stop."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}
        self.stopping: set[str] = set()

    def start(self, key: str, node: str, pid: int) -> bool:
        entry = self.state.setdefault(key, {"starts": [], "stage": "starting", "done": 0, "total": 0,
                                            "scanned": False})
        entry["starts"].append([node, pid])
        entry.update(stage="starting", done=0, total=0)
        return key in self.stopping

    def report(self, key: str, stage: str, done: int, total: int) -> bool:
        entry = self.state.setdefault(key, {"starts": [], "scanned": False})
        entry.update(stage=stage, done=done, total=total)
        entry["scanned"] = entry.get("scanned", False) or stage == "scan"
        return key in self.stopping

    def stop(self, key: str) -> None:
        self.stopping.add(key)

    def snapshot(self) -> dict[str, dict]:
        return self.state

    def forget(self, key: str) -> dict | None:
        self.stopping.discard(key)
        return self.state.pop(key, None)


def _ray_task(spec: dict) -> dict:
    import ray  # deferred: runs inside a Ray worker (the optional `cluster` extra)

    spec = dict(spec, ray=dict(spec.get("ray") or {}, node=ray.get_runtime_context().get_node_id()))
    return run_job(spec, _MODEL)


class RayRunner:
    """Each job one Ray task on the cluster at `address`; see the module docstring.

    `ship`: "auto" sends a local file's bytes only once a worker could not see the path (then for
    every job after it); "always" ships every input (workers use these bytes, whatever they have
    at that path) and brings every output back through the object store. `token_dir`: a local
    folder whose token file tells a worker that it sees the driver's files there, so it writes
    outputs under it directly.
    """

    def __init__(self, address: str, workers: int = 0, ship: str = "auto", cpus_per_job: float = 1.0,
                 token_dir: str | os.PathLike | None = None, log_to_driver: bool = False) -> None:
        if ship not in ("auto", "always"):
            raise ValueError(f"ship must be auto or always, not {ship!r}")
        self.address, self.workers, self.ship_all = address, workers, ship == "always"
        self.ray, self.owns = connect_ray(address, log_to_driver)
        ray = self.ray
        self.token: dict | None = None
        self.token_dir = Path(token_dir).absolute() if token_dir is not None else None
        if self.token_dir is not None:
            path = self.token_dir / TOKEN_NAME
            value = secrets.token_hex(16)
            write_atomic(path, value)
            self.token = {"path": str(path), "value": value}
        self.gpu = ray.cluster_resources().get("GPU", 0) > 0
        resources = {"num_gpus": 1, "num_cpus": 1} if self.gpu else {"num_cpus": cpus_per_job}
        self.cpus_per_job = resources["num_cpus"]
        self.task = ray.remote(_ray_task).options(max_retries=RAY_MAX_RETRIES, retry_exceptions=False,
                                                  name="lipdub-job", **resources)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # deferred: Ray

        # On the driver's own node (a soft preference lets Ray put it anywhere): a node lost
        # mid-batch then never takes the channel's record of the jobs' starts with it.
        here = ray.get_runtime_context().get_node_id()
        self.channel = ray.remote(JobChannel).options(
            num_cpus=0, max_restarts=-1, max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
        self.running: dict[Any, dict] = {}  # ObjectRef -> spec
        self.refs: dict[tuple, list] = {}  # (path, size, mtime) -> [ObjectRef, users]
        self._slots = (0, 0.0)

    def describe(self) -> str:
        nodes = self.nodes_alive()
        what = "a GPU" if self.gpu else f"{self.cpus_per_job:g} CPU"
        return f"Ray cluster {self.address}: {nodes} node{'s' if nodes != 1 else ''}, {what} per job"

    def nodes_alive(self) -> int:
        try:
            return sum(1 for n in self.ray.nodes() if n.get("Alive"))
        except Exception:
            return 0

    def slots(self) -> int:
        """Jobs in flight: --workers, else twice what the cluster runs at once (re-read every 10 s)."""
        if self.workers > 0:
            return self.workers
        count, when = self._slots
        if time.monotonic() - when > 10.0 or not count:
            res = self.ray.cluster_resources()
            at_once = int(res.get("GPU", 0)) if self.gpu else int(res.get("CPU", 0) // max(self.cpus_per_job, 1e-9))
            count = max(1, 2 * max(1, at_once))
            self._slots = (count, time.monotonic())
        return count

    def in_flight(self) -> int:
        return len(self.running)

    # -------------------------------------------------------------- shipping

    def _ship(self, location: str | None) -> dict | None:
        if not isinstance(location, str) or is_url(location):
            return None
        stat = _file_stat(location)
        if stat is None:
            return None  # missing here too: the job fails with sync's message
        entry: dict[str, Any] = {"stat": list(stat), "ref": None}
        if self.ship_all:
            key = (location, stat)
            if key not in self.refs:
                self.refs[key] = [self.ray.put(Path(location).read_bytes()), 0]
            self.refs[key][1] += 1
            entry["ref"] = self.refs[key][0]
        return entry

    def _release(self, spec: dict) -> None:
        for shipped in (spec.get("shipped") or {}).values():
            if shipped and shipped.get("ref") is not None:
                for key, held in list(self.refs.items()):
                    if held[0] is shipped["ref"]:
                        held[1] -= 1
                        if held[1] <= 0:
                            del self.refs[key]

    def _prepare(self, spec: dict) -> dict:
        spec = dict(spec)
        assets = {}
        options = spec["options"]
        for name in FILE_OPTIONS:
            value = options.get(name)
            if name == "checkpoint" and value is None:
                value = SyncOptions().checkpoint
            if name == "restore_checkpoint" and (value is None and not options.get("restore")):
                continue
            if name == "restore_checkpoint" and value is None:
                value = SyncOptions().restore_checkpoint
            if not isinstance(value, str):
                continue
            if not os.path.isfile(value) and value in weights.REGISTRY and weights.cache_path(value).is_file():
                value = str(weights.cache_path(value))  # cached here: workers without it get these bytes
            if os.path.isfile(value):
                assets[name] = value
        spec["assets"] = assets
        spec["shipping"] = self.ship_all
        spec["shipped"] = {role: self._ship(spec[role]) for role in ("face", "audio")}
        spec["shipped"].update({name: self._ship(path) for name, path in assets.items()})
        under = self.token_dir is not None and not is_url(spec["output"]) and \
            Path(spec["output"]).absolute().is_relative_to(self.token_dir)
        spec["deliver"] = {"return_bytes": self.ship_all and not is_url(spec["output"]),
                           "token": self.token if not is_url(spec["output"]) else None,
                           "under_token": under}
        if self.token is None and not is_url(spec["output"]):
            spec["deliver"]["return_bytes"] = True
        spec["threads"] = max(1, int(self.cpus_per_job)) if not self.gpu else None
        spec["ray"] = {"channel": self.channel}
        return spec

    def submit(self, spec: dict) -> None:
        spec = self._prepare(spec)
        self.running[self.task.remote(spec)] = spec

    # -------------------------------------------------------------- results

    def poll(self, timeout: float) -> list[dict]:
        if not self.running:
            time.sleep(min(timeout, 0.05))
            return []
        ray = self.ray
        refs = list(self.running)
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        outcomes = []
        for ref in ready:
            spec = self.running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                outcome = {"key": spec["key"], "status": "cancelled", "error": "cancelled"}
            except ray.exceptions.RayError as exc:
                outcome = {"key": spec["key"], "status": "failed", "error": _ray_failure(exc)}
            if outcome.get("status") == "need_bytes" and not spec["shipping"]:
                self.ship_all = True  # some node does not share our files: ship them from now on
                self._release(spec)
                try:  # that try does not count as an attempt
                    self.ray.get(self.channel.forget.remote(spec["key"]), timeout=30)
                except Exception:
                    pass
                self.submit({k: spec[k] for k in ("key", "line", "face", "audio", "output", "options")})
                continue
            if outcome.get("status") == "need_bytes":
                outcome = {**outcome, "status": "failed"}
            self._release(spec)
            outcomes.append(self._finish(spec, outcome))
        return outcomes

    def _finish(self, spec: dict, outcome: dict) -> dict:
        data = outcome.pop("output_bytes", None)
        if isinstance(data, bytes) and outcome.get("status") == "done":
            try:
                target = Path(spec["output"])
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, data)
            except (LipdubError, OSError) as exc:
                outcome.update(status="failed", error=f"cannot write {spec['output']}: {exc}")
        try:
            state = self.ray.get(self.channel.forget.remote(spec["key"]), timeout=30) or {}
        except Exception:
            state = {}
        starts = state.get("starts") or []
        outcome["attempts"] = max(1, len(starts))
        outcome["nodes"] = [node for node, _ in starts]
        return outcome

    def progress(self) -> dict[str, dict]:
        """The latest report of every running job ({} when the channel cannot be reached)."""
        try:
            return self.ray.get(self.channel.snapshot.remote(), timeout=10)
        except Exception:
            return {}

    def stop(self, key: str, force: bool = False) -> None:
        """Ask a job to stop: through the channel, and by Ray's cancel when it has not started
        (or, with `force`, by killing its worker)."""
        try:
            self.channel.stop.remote(key)
        except Exception:
            pass
        for ref, spec in self.running.items():
            if spec["key"] == key:
                try:
                    self.ray.cancel(ref, force=force)
                except Exception:
                    pass

    def started(self, key: str, snapshot: dict[str, dict]) -> bool:
        return bool(snapshot.get(key, {}).get("starts"))

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in list(self.running):
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:
                    pass
        self.running.clear()
        self.refs.clear()
        try:
            self.ray.kill(self.channel)
        except Exception:
            pass
        if self.token is not None:
            Path(self.token["path"]).unlink(missing_ok=True)
        if self.owns:
            self.ray.shutdown()


def _ray_failure(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = next((line for line in lines if not line.startswith(("Traceback", "ray::", "File "))), type(exc).__name__)
    return _clip(f"the cluster could not run this job ({type(exc).__name__}: {useful})", 300)


# ------------------------------------------------------------------------------------ the batch


def _lock(out_dir: Path):
    handle = open(out_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LipdubError(f"another `lipdub batch` is writing into {out_dir}") from None
    return handle


def remove_leftovers(output: str) -> int:
    """Delete what a writer killed mid-job left next to a local output: the hidden temporary files
    `media.atomic_output` names `.<stem>.partial<pid><suffix>`. Only ever called while no attempt
    of that job is running here (before its first, after its last)."""
    if is_url(output):
        return 0
    path = Path(output)
    removed = 0
    try:
        leftovers = list(path.parent.glob(f".{glob_escape(path.stem)}.partial*{glob_escape(path.suffix)}"))
    except OSError:
        return 0
    for leftover in leftovers:
        if leftover.name[len(path.stem) + 9:len(leftover.name) - len(path.suffix)].isdigit():
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def read_journal(out_dir: Path) -> dict[str, dict]:
    """Finished jobs by fingerprint (a torn last line from a crash is ignored)."""
    out: dict[str, dict] = {}
    try:
        raw = (out_dir / JOURNAL_NAME).read_bytes()
    except OSError:
        return out
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            out[entry["key"]] = entry
    return out


def _append_journal(out_dir: Path, entry: dict) -> None:
    with open(out_dir / JOURNAL_NAME, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(job: Job, journal: dict[str, dict]) -> bool:
    """Finished by an earlier run: the journal holds this job's fingerprint and output, and the
    output is there with the size it had when the job finished."""
    entry = journal.get(job.key)
    if entry is None or entry.get("output") != job.output:
        return False
    size = output_size(job.output)
    return size is not None and size == entry.get("size")


RESULT_KEYS = ("n_frames", "fps", "width", "height", "frames_with_face", "timings", "seconds")


def _entry(job: Job, status: str, outcome: dict | None = None) -> dict:
    entry: dict[str, Any] = {"line": job.line, "status": status, "face": job.face, "audio": job.audio,
                             "output": job.output, "error": None}
    if job.error:
        entry["error"] = job.error
    if outcome:
        entry["error"] = outcome.get("error") if status != "done" else None
        for key in RESULT_KEYS:
            if key in outcome:
                entry[key] = outcome[key]
        for key in ("node", "host", "attempts", "nodes"):
            if outcome.get(key) is not None:
                entry[key] = outcome[key]
    return entry


def run_batch(jobs: str | os.PathLike, out_dir: str | os.PathLike, workers: int = 0, ray_address: str | None = None,
              progress: bool = True, ship: str = "auto") -> dict:
    """Run every job of the manifest `jobs` (.jsonl or .csv path or URL); see the module docstring.

    `workers`: local worker processes (0: one per two cores), or with `ray_address` the jobs in
    flight on the cluster (0: twice what it runs at once). Returns the report (also written to
    `out_dir/batch-report.json`): `total`, `done`, `skipped`, `failed`, `invalid`, `report` and
    `jobs`. Raises BadManifest (a LipdubError) after the other jobs ran when a line was invalid,
    and LipdubError at once when the manifest as a whole is unusable.
    """
    manifest = os.fspath(jobs)
    if workers < 0:
        raise LipdubError("--workers must be 0 (automatic) or more")
    if is_url(os.fspath(out_dir)):
        raise LipdubError("--out-dir is a local folder (outputs may still be URLs in the manifest)")
    lines = read_manifest(manifest)
    ray, connected = connect_ray(ray_address) if ray_address else (None, False)  # before anything is written
    try:
        out = make_folder(Path(out_dir).expanduser().absolute())
        base = Path(_local(manifest)).expanduser().absolute().parent if not is_url(manifest) else Path.cwd()
        planned = plan_jobs(lines, base, out)
        lock = _lock(out)
        try:
            if ray_address:  # Ray prints cluster events (a node marked dead) to stdout: keep it for the result
                with contextlib.redirect_stdout(sys.stderr):
                    return _run(manifest, out, planned, workers, ray_address, progress, ship)
            return _run(manifest, out, planned, workers, ray_address, progress, ship)
        finally:
            lock.close()
    finally:
        if connected:
            ray.shutdown()


def _run(manifest: str, out: Path, planned: list[Job], workers: int, ray_address: str | None, progress: bool,
         ship: str) -> dict:
    started, wall = time.time(), time.monotonic()
    journal = read_journal(out)
    entries: dict[int, dict] = {}
    todo: deque[Job] = deque()
    for index, job in enumerate(planned):
        if job.error:
            entries[index] = _entry(job, "invalid")
        elif is_complete(job, journal):
            entries[index] = _entry(job, "skipped", {**journal[job.key].get("result", {}), "node": None})
        else:
            remove_leftovers(job.output)
            todo.append(job)
    by_key = {job.key: index for index, job in enumerate(planned) if not job.error}
    report_path = out / REPORT_NAME
    counts = {"done": 0, "failed": 0, "cancelled": 0}
    frames = 0
    runner: Any = None
    state = {"runner": "nothing to run", "last_write": 0.0}

    def write_report(final: bool) -> dict:
        jobs_out = []
        for index, job in enumerate(planned):
            jobs_out.append(entries.get(index) or _entry(job, "interrupted" if final else "pending"))
        status = [e["status"] for e in jobs_out]
        report = {
            "manifest": manifest, "out_dir": str(out), "runner": state["runner"],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.monotonic() - wall, 3), "finished": final,
            "total": len(planned), "done": status.count("done"), "skipped": status.count("skipped"),
            "failed": status.count("failed") + status.count("cancelled"), "invalid": status.count("invalid"),
            "pending": status.count("pending") + status.count("interrupted"),
            "frames": frames, "frames_per_second": round(frames / max(1e-9, time.monotonic() - wall), 2),
            "report": str(report_path), "jobs": jobs_out,
        }
        write_atomic(report_path, json.dumps(report, indent=2, default=float))
        state["last_write"] = time.monotonic()
        return report

    progress_bar = bar(len(planned) - sum(1 for e in entries.values() if e["status"] == "invalid"), "batch",
                       progress, unit="job")
    progress_bar.update(sum(1 for e in entries.values() if e["status"] == "skipped"))
    finished = False
    try:
        if todo:
            if ray_address:
                runner = RayRunner(ray_address, workers=workers, ship=ship, token_dir=out)
            else:
                runner = LocalRunner(workers or max(1, cpu_count() // 2))
            state["runner"] = runner.describe()
            log.info("batch: %d job(s) to run on %s", len(todo), state["runner"])
        while todo or (runner is not None and runner.in_flight()):
            while todo and runner.in_flight() < runner.slots():
                runner.submit(todo.popleft().spec())
            for outcome in runner.poll(timeout=0.5):
                index = by_key[outcome["key"]]
                job = planned[index]
                status = outcome.get("status", "failed")
                remove_leftovers(job.output)  # of an attempt whose node was lost mid-write
                if status == "done":
                    size = output_size(job.output)
                    if size is None:
                        outcome = {**outcome, "status": "failed", "error": f"the output {job.output} is missing "
                                                                           "after the job finished"}
                        status = "failed"
                    else:
                        frames += int(outcome.get("n_frames", 0))
                        result = {k: outcome[k] for k in RESULT_KEYS if k in outcome}
                        _append_journal(out, {"key": job.key, "output": job.output, "size": size, "line": job.line,
                                              "finished": time.time(), "result": result})
                counts[status if status in counts else "failed"] += 1
                entries[index] = _entry(job, status if status in ("done", "failed", "cancelled") else "failed",
                                        outcome)
                elapsed = max(1e-9, time.monotonic() - wall)
                progress_bar.set_postfix_str(f"done {counts['done']}, failed {counts['failed'] + counts['cancelled']}, "
                                             f"{frames / elapsed:.1f} frames/s", refresh=False)
                progress_bar.update(1)
                if time.monotonic() - state["last_write"] > REPORT_EVERY_S:
                    write_report(final=False)
        finished = True
    finally:
        progress_bar.close()
        if runner is not None:
            runner.close(cancel=not finished)
        report = write_report(final=True)
    invalid = [e for e in report["jobs"] if e["status"] == "invalid"]
    if invalid:
        others = report["total"] - len(invalid)
        more = f" (and {len(invalid) - 1} more bad line{'s' if len(invalid) > 2 else ''})" if len(invalid) > 1 else ""
        jobs = f"job{'s' if others != 1 else ''}"
        raise BadManifest(f"{manifest} {invalid[0]['error']}{more}; the other {others} {jobs}: "
                          f"{report['done']} done, {report['skipped']} already complete, {report['failed']} failed; "
                          f"report in {report_path}", report)
    return report


__all__ = ["BadManifest", "Job", "JobCancelled", "JobChannel", "LocalRunner", "ManifestLine", "RayRunner",
           "check_line", "connect_ray", "is_complete", "manifest_format", "parse_manifest", "plan_jobs",
           "read_journal", "read_manifest", "run_batch", "run_job"]
