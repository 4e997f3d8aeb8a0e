"""Run a fuzz target (or all of them) with atheris on its corpus, and print a summary.

    .venv/bin/python fuzz/run.py TARGET|all [--seconds N] [--jobs 1] [-- LIBFUZZER_FLAGS...]

Targets: media, sniff, weights, manifest (fuzz/targets.py). Each runs in its own process,
libFuzzer's limits on: -timeout=20 (an input that takes longer is a hang), -rss_limit_mb=2048
(a runaway allocation), -max_total_time=N. New inputs that add coverage are written into
fuzz/corpus/<target>/ and every crash into fuzz/crashes/<target>/ (crash-<sha1>, kept: replayed
by tests/test_fuzz.py). The exit status is 0 when no target found a crash, 1 otherwise.

`--merge` instead minimises a target's corpus in place (libFuzzer -merge=1: the smallest set of
inputs with the same coverage), keeping the seed-* files.

Internally the script re-runs itself as `fuzz/run.py --worker TARGET ...`, the process that
hands sys.argv to libFuzzer.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
NAMES = ("media", "sniff", "weights", "manifest")
LIMITS = ["-timeout=20", "-rss_limit_mb=2048"]
# Per target: the modules imported inside atheris' instrumentation block, and the packages whose
# Python code is instrumented for coverage. C extensions (PyAV, OpenCV, torch's zip reader,
# onnxruntime) give no coverage feedback; their crashes, hangs and allocations are still caught.
MODULES = {
    "media": ["lipdub.media"],
    "sniff": ["lipdub.serve.sniff"],
    "weights": ["zipfile", "lipdub.weights"],
    "manifest": ["lipdub.options", "lipdub.batch"],
}
INSTRUMENT = {
    "media": ["lipdub.media", "fuzz"],
    "sniff": ["lipdub.serve.sniff", "fuzz"],
    "weights": ["lipdub.weights", "fuzz", "zipfile", "torch.serialization", "torch._weights_only_unpickler",
                "torch._utils"],
    "manifest": ["lipdub.batch", "lipdub.options", "fuzz", "csv", "json"],
}
MAX_LEN = {"media": 200_000, "sniff": 600, "weights": 200_000, "manifest": 4096}


def worker(target: str, flags: list[str]) -> None:
    """This process becomes the fuzzer: instrument the target's modules, then hand over to libFuzzer."""
    import atheris

    sys.path.insert(0, str(ROOT))
    # Heavy native dependencies first, uninstrumented (their Python code is not what we test).
    import av  # noqa: F401
    import cv2  # noqa: F401
    import numpy  # noqa: F401

    with atheris.instrument_imports(include=INSTRUMENT[target]):
        targets = importlib.import_module("fuzz.targets")
        for name in MODULES[target]:
            importlib.import_module(name)
    function = targets.TARGETS[target]
    # libFuzzer starts argv[0] through the shell for -merge (and -fork): the whole worker command
    argv0 = shlex.join([sys.executable, str(FUZZ / "run.py"), "--worker", target])
    atheris.Setup([argv0] + flags, function)
    atheris.Fuzz()


def _summary(log: str) -> dict:
    """Executions, coverage and corpus from libFuzzer's last status line."""
    out: dict = {}
    for line in log.splitlines():
        match = re.match(r"#(\d+)\s+(\w+)\s+(.*)", line)
        if match:
            out["execs"] = int(match.group(1))
            for key, value in re.findall(r"(cov|ft|exec/s|rss): (\S+)", match.group(3)):
                out[key] = value
            corp = re.search(r"corp: (\d+)/(\S+)", match.group(3))
            if corp:
                out["corpus"] = f"{corp.group(1)} inputs, {corp.group(2)}"
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    if done:
        out["execs"] = int(done.group(1))
    return out


def run_target(target: str, seconds: int, extra: list[str], python: str) -> tuple[int, dict, list[Path]]:
    corpus, crashes = FUZZ / "corpus" / target, FUZZ / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    before = set(crashes.iterdir())
    flags = LIMITS + [f"-max_total_time={seconds}", f"-max_len={MAX_LEN[target]}", f"-artifact_prefix={crashes}/",
                      "-print_final_stats=1", *extra, str(corpus)]
    with tempfile.TemporaryDirectory(prefix=f"lipdub-fuzz-{target}-") as tmp:
        log_path = Path(tmp) / "log"
        started = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.run([python, str(FUZZ / "run.py"), "--worker", target, *flags], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=tmp, env={**os.environ, "LIPDUB_FUZZ_SCRATCH": tmp})
        text = log_path.read_text(errors="replace")
        keep = FUZZ / "logs"
        keep.mkdir(exist_ok=True)
        shutil.copy(log_path, keep / f"{target}.log")
    summary = _summary(text)
    summary["seconds"] = round(time.monotonic() - started)
    new = sorted(set(crashes.iterdir()) - before)
    return proc.returncode, summary, new


def merge(target: str, python: str) -> None:
    """Minimise fuzz/corpus/<target> to the inputs that carry its coverage (seeds always kept)."""
    corpus = FUZZ / "corpus" / target
    with tempfile.TemporaryDirectory(prefix=f"lipdub-merge-{target}-") as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        subprocess.run([python, str(FUZZ / "run.py"), "--worker", target, "-merge=1", *LIMITS,
                        f"-max_len={MAX_LEN[target]}", str(merged), str(corpus)], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "LIPDUB_FUZZ_SCRATCH": tmp})
        kept = {p.name for p in merged.iterdir()}
        if not kept:
            raise SystemExit(f"{target}: the merge kept no input; corpus left as it was")
        for path in corpus.iterdir():
            if not path.name.startswith("seed-") and path.name not in kept:
                path.unlink()
        seeds = {hashlib.sha1(p.read_bytes()).hexdigest() for p in corpus.glob("seed-*")}
        for path in merged.iterdir():  # libFuzzer names each input by the SHA-1 of its bytes
            if path.name not in seeds and not (corpus / path.name).exists():
                shutil.copy(path, corpus / path.name)
    files = list(corpus.iterdir())
    print(f"{target}: {len(files)} inputs, {sum(p.stat().st_size for p in files)} bytes after merge")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2:])
        return 0
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description="Run lipdub's atheris fuzz targets on their corpus.")
    parser.add_argument("target", choices=NAMES + ("all",))
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--merge", action="store_true", help="minimise the corpus instead of fuzzing")
    args = parser.parse_args(argv)
    python = sys.executable
    names = NAMES if args.target == "all" else (args.target,)
    if args.merge:
        for name in names:
            merge(name, python)
        return 0
    found = 0
    for name in names:
        code, summary, new = run_target(name, args.seconds, extra, python)
        stats = ", ".join(f"{k} {summary[k]}" for k in ("execs", "exec/s", "cov", "ft", "corpus", "rss", "seconds")
                          if k in summary)
        print(f"{name}: {stats}; exit {code}; {len(new)} new crash file(s)", flush=True)
        for path in new:
            print(f"  {path.relative_to(ROOT)}")
        if new or code not in (0,):
            found += 1
            print(f"  log: {(FUZZ / 'logs' / (name + '.log')).relative_to(ROOT)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
