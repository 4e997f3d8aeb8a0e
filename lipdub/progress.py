"""Stage timings and progress bars, shared by every job.

`Timer` sums wall-clock seconds per named stage over a job (the `timings` of every result and
`--report`). `bar` is the one tqdm progress bar style of the command line (on stderr, so a
`--json` result on stdout stays clean). A `ProgressCallback` is how a job reports to a caller
that is not a terminal (the web service's workers): `callback(stage, done, total)`.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm import tqdm

ProgressCallback = Callable[[str, int, int], None]


class Timer:
    """Wall-clock seconds per stage, summed over the job. Safe to use from several threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - started)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "frame", leave: bool = True) -> tqdm:
    """A progress bar on stderr (disabled when `enabled` is False)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, file=sys.stderr,
                dynamic_ncols=True)
