"""``--profile-steps A:B``: torch.profiler over a window of steps, one trace per rank.

Only the window is recorded (a profiler left on for a whole run would dwarf the run), with our
phases as named ranges (``record_function``; NVTX ranges too on CUDA, for Nsight Systems).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch


def parse_profile_steps(text: str) -> tuple[int, int]:
    """'A:B' (1-based, inclusive) or 'A' (one step) -> (A, B); ValueError naming the flag."""
    parts = str(text).split(":")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last:
        raise ValueError(
            f"--profile-steps: expected A:B with 1 <= A <= B (steps of each "
            f"scheme, counted from 1), got {text!r}"
        )
    return first, last


@contextlib.contextmanager
def named_range(name: str, cuda: bool) -> Iterator[None]:
    """A range the profiler shows by name (and Nsight Systems too, on CUDA)."""
    with torch.profiler.record_function(name):
        if cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()


def profile_path(out: Path, timeline: Optional[str], scheme: str, rank: int) -> Path:
    """Next to the timeline when there is one, else under OUT/profile/."""
    if timeline:
        t = Path(timeline)
        return t.with_name(f"{t.stem}.profile.{scheme}.rank{rank}.json")
    return out / "profile" / f"{scheme}.rank{rank}.json"


class StepProfiler:
    """Starts torch.profiler before step A of each scheme and writes its trace after step B
    (or when the scheme ends first); meanwhile the scheme's PhaseTimer names its phases."""

    def __init__(
        self, window: tuple[int, int], device: torch.device, path_for: Callable[[str], Path]
    ) -> None:
        self.first, self.last = window
        self.cuda = device.type == "cuda"
        self.path_for = path_for
        self._prof: Optional[torch.profiler.profile] = None
        self._timer: Any = None
        self.written: list[Path] = []

    def before_step(self, step_no: int, timer: Any) -> None:
        """``step_no`` counts from 0 within the scheme; ``timer`` is its PhaseTimer."""
        if self._prof is None and step_no + 1 == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._timer = timer
            timer.ranges = True

    def after_step(self, step_no: int, scheme: str) -> None:
        if self._prof is not None and step_no + 1 >= self.last:
            self.finish(scheme)

    def finish(self, scheme: str) -> None:
        """Stop and write the trace, if recording (atomically: temp file, then rename)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        self._timer.ranges = False
        prof.__exit__(None, None, None)
        path = self.path_for(scheme)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            prof.export_chrome_trace(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.written.append(path)
