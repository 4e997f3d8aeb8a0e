"""Every option of a lip-sync run, declared once.

`SyncOptions` is a dataclass; each field carries its help text, choices, bounds and the way it
appears on the command line and in the web form (`option(...)` metadata). From that one
declaration:

* `SyncOptions.validate()` checks a set of options the same way for the library, the CLI, the
  web service and batch manifests, raising `LipdubError` with one line that names the CLI flag;
* `add_arguments(parser)` generates the argparse flags of `lipdub run`;
* `web_fields()` and `from_text()` give the web form's (and a CSV manifest's) fields and parse
  their text values.

Adding an option is one `option(...)` field here plus its use in the pipeline.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import LipdubError
from .progress import ProgressCallback

FACE_DETECTORS = ("centerface", "s3fd")
BLENDS = ("feather", "box")
LENGTHS = ("pingpong", "loop")
SILENCES = ("keep", "generate")
RESTORERS = ("gfpgan",)
RESTORE_REGIONS = ("mouth", "face")
UPSCALES = (1, 2, 4)
SIDES = ("TOP", "BOTTOM", "LEFT", "RIGHT")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


# x264's presets, fastest first. The default (superfast, CRF 18) comes from
# benchmarks/bench_encode.py: 1.5-1.9x the encode speed of veryfast with at least its PSNR.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def check_device_name(name: str) -> str | None:
    """Why `name` is not a device name (auto, cpu, cuda, cuda:N, mps), or None."""
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return None
    return f"unknown device '{name}' (auto, cpu, cuda, cuda:N, mps)"


@dataclass(frozen=True)
class Spec:
    """How one option is checked and shown; see `option`."""

    help: str
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    check: Callable[[Any], str | None] | None = None  # returns a problem (without the flag name) or None
    flag: str | None = None  # the CLI flag when not derived from the name
    consts: tuple[tuple[str, Any], ...] = ()  # extra CLI flags that store a constant: (("--loop", "loop"),)
    metavar: Any = None
    cli_help: str | None = None  # the flag's help where it differs from the option's (an inverted flag)
    cli: bool = True  # a flag of `lipdub run`
    web: bool = False  # a field of the web form / HTTP API (the server fixes everything else)


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its `Spec` (see the module docstring)."""
    factory = {"default": default}
    return dataclasses.field(**factory, metadata={"spec": Spec(help=help, **spec)})


@dataclass
class SyncOptions:
    """Every option of `lipdub run`, `lipdub.sync()`, the web form and a batch manifest line."""

    checkpoint: str = option("wav2lip_gan", "registry name (wav2lip, wav2lip_gan, wav2lip256) or a .pth path "
                                            "of a 96x96 or 256x256 generator",
                             metavar="NAME|PATH")
    detector: str = option("centerface", "face detector", choices=FACE_DETECTORS, web=True)
    detector_weights: Optional[str] = option(None, "weights file for the detector (default: registry)",
                                             metavar="PATH")
    box: Optional[tuple[int, int, int, int]] = option(
        None, "fixed face box for every frame; skips detection (as the original --box)", metavar=SIDES, web=True)
    pads: tuple[int, int, int, int] = option((0, 10, 0, 0), "padding added to detected boxes (default 0 10 0 0)",
                                             metavar=SIDES, web=True)
    smooth: bool = option(True, "smooth face boxes over time", web=True)
    face_index: Optional[int] = option(None, "drive the N-th face from the left (0-based)", low=0, metavar="N",
                                       web=True)
    blend: str = option("feather", "feather: soft lower-face blend (default); box: the original hard paste",
                        choices=BLENDS, web=True)
    mask_scale: float = option(1.0, "grow (> 1) or shrink (< 1) the feather blend's mouth mask", low=0.5, high=2.0,
                               metavar="S", web=True)
    fps: float = option(25.0, "frame rate for a still image (default 25)", low=1, high=120, metavar="F", web=True)
    length: str = option("pingpong", "when the audio outlasts the video: play back and forth, or loop",
                         choices=LENGTHS, consts=(("--loop", "loop"),), web=True)
    static: bool = option(False, "use only the first frame", web=True)
    resize_factor: int = option(1, "downscale the input by this factor first", low=1, high=16, metavar="N",
                                web=True)
    crop: tuple[int, int, int, int] = option((0, -1, 0, -1), "crop the input first (-1 = to the edge)",
                                             metavar=SIDES, web=True)
    rotate: bool = option(False, "rotate the input 90 degrees clockwise first", web=True)
    batch_size: int = option(16, "frames per generator batch", low=1, metavar="N")
    det_batch_size: int = option(0, "frames per detector batch (0 = best for the device)", low=0, metavar="N")
    det_stride: int = option(0, "detect every N-th frame (0 = about 6 per second)", low=0, high=1000, metavar="N",
                             web=True)
    device: str = option("auto", "where the networks run: auto, cpu, cuda, cuda:N, mps",
                         check=check_device_name, metavar="|".join(DEVICES))
    precision: str = option("auto", "network arithmetic: auto (bf16 where the hardware runs it natively, else "
                                    "fp32), fp32 (exactly the original's), bf16", choices=PRECISIONS)
    crf: int = option(18, "x264 quality of the output: 0 lossless .. 51 worst (default 18)", low=0, high=51,
                      metavar="N", web=True)
    preset: str = option("superfast", "x264 preset: slower ones give smaller files at the same --crf",
                         choices=X264_PRESETS)
    skip_sha256: bool = option(False, "accept downloaded weights whose hash differs")
    progress: bool = option(True, "show progress bars", flag="--quiet", cli_help="no progress bars")
    progress_callback: Optional[ProgressCallback] = option(
        None, "called as progress_callback(stage, done, total)", cli=False)
    silence: str = option("keep", "in pauses of the speech (0.3 s or longer) keep the input's own mouth, or "
                                  "generate it on every frame as the original does", choices=SILENCES, web=True)
    auto_offset: bool = option(False, "measure the output's audio-video offset with SyncNet (syncnet_v2 weights "
                                      "cached) and shift the audio to fix it")
    restore: Optional[str] = option(None, "restore the face with GFPGAN after lip-sync", choices=RESTORERS,
                                    web=True)
    restore_checkpoint: str = option("gfpgan_v1.4", "gfpgan_v1.3, gfpgan_v1.4 or a .pth path", metavar="NAME|PATH")
    restore_region: str = option("mouth", "what restoration may change (default mouth)", choices=RESTORE_REGIONS,
                                 web=True)
    restore_weight: float = option(1.0, "0..1 blend of restored and lip-synced face", low=0, high=1, metavar="W",
                                   web=True)
    upscale: int = option(1, "output size factor (with --restore)", choices=UPSCALES, web=True)
    report: Optional[str] = option(
        None, "write a JSON report: coverage, timings, and LSE-D/LSE-C when syncnet_v2 weights are cached",
        metavar="JSON")

    def validate(self) -> "SyncOptions":
        """Check (and normalise: lists become tuples, "none" becomes None) every option; returns self."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f, getattr(self, f.name)))
        if self.upscale != 1 and self.restore is None:
            raise LipdubError("--upscale needs --restore gfpgan")
        if self.static and self.length == "loop":
            raise LipdubError("--loop and --static cannot be combined")
        return self

    @classmethod
    def build(cls, **values: Any) -> "SyncOptions":
        """Options from keyword values, checked; an unknown name is a LipdubError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LipdubError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        return cls(**values).validate()

    def as_dict(self) -> dict[str, Any]:
        """The options as plain JSON-ready values (callables left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not callable(getattr(self, f.name))}


# ------------------------------------------------------------------------------------ checking

_HINTS: dict[str, Any] = {}


def _hint(f: dataclasses.Field) -> Any:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(SyncOptions))
    return _HINTS[f.name]


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata["spec"]


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag an option is known by in messages (also for the web form)."""
    spec = spec_of(f)
    if spec.flag:
        return spec.flag
    if _base_type(_hint(f))[0] is bool and f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


def _flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """`value` for option `f`, type-checked and normalised; LipdubError naming the flag otherwise."""
    base, optional = _base_type(_hint(f))
    spec = spec_of(f)
    name = _flag_name(f)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none")):
        if optional:
            return None
        raise LipdubError(f"{name} needs a value")
    if typing.get_origin(base) is collections.abc.Callable:
        if not callable(value):
            raise LipdubError(f"{f.name} must be callable")
        return value
    if typing.get_origin(base) is tuple:
        n = len(typing.get_args(base))
        try:
            items = tuple(value)
        except TypeError:
            items = ()
        if len(items) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise LipdubError(f"{name} must be {n} integers ({' '.join(spec.metavar or ())}), got {_show(value)}")
        if any(abs(v) > 100000 for v in items):
            raise LipdubError(f"{name} values must be between -100000 and 100000")
        value = items
    elif base is bool:
        if not isinstance(value, bool):
            raise LipdubError(f"{name} must be true or false, got {_show(value)}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise LipdubError(f"{name} must be an integer, got {_show(value)}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LipdubError(f"{name} must be a number, got {_show(value)}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise LipdubError(f"{name} must be text, got {_show(value)}")
    if spec.choices is not None and value not in spec.choices:
        what = name.lstrip("-").replace("-", " ")
        raise LipdubError(f"unknown {what} {_show(value)} ({', '.join(map(str, spec.choices))})")
    if spec.low is not None or spec.high is not None:
        if spec.high is None and value < spec.low:
            raise LipdubError(f"{name} must be {'at least ' + _num(spec.low) if spec.low else '0 or more'}")
        if spec.low is not None and spec.high is not None and not spec.low <= value <= spec.high:
            raise LipdubError(f"{name} must be between {_num(spec.low)} and {_num(spec.high)}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise LipdubError(problem)
    return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f"'{value}'"
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------ text values


def from_text(f: dataclasses.Field, text: str) -> Any:
    """An option's value from text (a web form field, a CSV cell); checked by `check_value` after."""
    base, optional = _base_type(_hint(f))
    text = str(text).strip()
    if optional and text.lower() in ("", "none"):
        return None
    name = _flag_name(f)
    if typing.get_origin(base) is tuple:
        parts = [p for p in re.split(r"[\s,]+", text) if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            n = len(typing.get_args(base))
            raise LipdubError(f"{f.name.replace('_', ' ')} must be {n} integers "
                              f"({' '.join(spec_of(f).metavar or ())}), got '{text[:60]}'") from None
    if base is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise LipdubError(f"{name} must be true or false, got '{text[:60]}'")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise LipdubError(f"{name} must be an integer, got '{text[:60]}'") from None
    if base is float:
        try:
            return float(text)
        except ValueError:
            raise LipdubError(f"{name} must be a number, got '{text[:60]}'") from None
    return text


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(SyncOptions)


def field(name: str) -> dataclasses.Field:
    for f in fields():
        if f.name == name:
            return f
    raise LipdubError(f"unknown option {name}")


def web_fields() -> list[dataclasses.Field]:
    """The options a web client may set; the server fixes the others (model, device, paths)."""
    return [f for f in fields() if spec_of(f).web]


def options_from_text(values: dict[str, str], allowed: list[dataclasses.Field] | None = None) -> dict[str, Any]:
    """{name: value} parsed from text values (a form, a CSV row); unknown names are a LipdubError."""
    allowed = allowed if allowed is not None else list(fields())
    by_name = {f.name: f for f in allowed}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise LipdubError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    return {name: from_text(by_name[name], text) for name, text in values.items()}


# ------------------------------------------------------------------------------------ argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every CLI option, generated from the declarations."""
    for f in fields():
        spec = spec_of(f)
        if not spec.cli:
            continue
        base, _ = _base_type(_hint(f))
        kwargs: dict[str, Any] = {"dest": f.name, "help": spec.cli_help or spec.help, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs["action"] = "store_false" if f.default is True else "store_true"
            if f.default is True and not spec.cli_help:
                kwargs["help"] = "do not " + spec.help
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs=len(typing.get_args(base)), type=int, metavar=spec.metavar)
        else:
            kwargs["type"] = {int: int, float: float}.get(base, str)
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
        parser.add_argument(flag_of(f), **kwargs)
        for flag, const in spec.consts:
            parser.add_argument(flag, dest=f.name, action="store_const", const=const, default=argparse.SUPPRESS,
                                help=f"same as {flag_of(f)} {const}")


def options_from_args(args: argparse.Namespace) -> SyncOptions:
    """SyncOptions from parsed `add_arguments` flags (options not given keep their defaults), checked."""
    names = {f.name for f in fields()}
    return SyncOptions.build(**{k: v for k, v in vars(args).items() if k in names})
