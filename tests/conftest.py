"""Shared fixtures: where the specs and media live, and deterministic-weight checkpoints."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPDUB_SHARED", ROOT.parent / "shared"))
SPECS = SHARED / "specs"
MEDIA = SHARED / "media"


def load_spec_module(name: str):
    """Import one of the helper scripts in shared/specs (fill_rule_a.py, fill_rule_b.py)."""
    spec = importlib.util.spec_from_file_location(name, SPECS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rule_a():
    return load_spec_module("fill_rule_a")


@pytest.fixture(scope="session")
def rule_b():
    return load_spec_module("fill_rule_b")


@pytest.fixture(scope="session")
def wav2lip_checkpoint(tmp_path_factory, rule_a) -> Path:
    """Rule-A generator weights saved in the official checkpoint format (keys prefixed `module.`)."""
    path = tmp_path_factory.mktemp("weights") / "wav2lip_rule_a.pth"
    rule_a.save_official_checkpoint("wav2lip", str(path), seed_base=1000)
    return path


@pytest.fixture(scope="session")
def media() -> Path:
    if not MEDIA.is_dir():
        pytest.skip(f"shared media not found at {MEDIA}")
    return MEDIA
