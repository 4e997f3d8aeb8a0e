"""What the benchmark scripts share: where the media and specs are, and deterministic weights.

The released checkpoints cannot be downloaded here, so the benchmarks time the real networks
with the specs' deterministic weights (`shared/specs/fill_rule_*.py`), written once to a cache
in the layout of the released files so that they load through the same code path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPDUB_SHARED", ROOT.parent / "shared"))
MEDIA = SHARED / "media"
CACHE = Path(tempfile.gettempdir()) / "lipdub-bench"


def spec_module(name: str) -> ModuleType:
    """A helper module of shared/specs (e.g. "fill_rule_a"), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, SHARED / "specs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spec_schema(kind: str) -> list:
    return json.loads((SHARED / "specs" / f"{kind}_state_dict.json").read_text())


def cached(name: str, write: Callable[[str], None]) -> Path:
    """CACHE/name, made once by `write(temporary path)` and moved into place atomically."""
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        write(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
    return path


def wav2lip_checkpoint() -> Path:
    """Rule-A generator weights in the official checkpoint format, made once."""
    return cached("wav2lip_rule_a.pth", lambda tmp: spec_module("fill_rule_a").save_official_checkpoint("wav2lip", tmp))


def wav2lip256_checkpoint() -> Path:
    """Rule-A weights of the 256x256 generator in the official checkpoint format, made once."""
    return cached("wav2lip256_rule_a.pth",
                  lambda tmp: spec_module("fill_rule_a").save_official_checkpoint("wav2lip256", tmp))
