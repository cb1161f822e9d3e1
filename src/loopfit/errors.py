"""The one exception type that the CLI turns into a one-line message and a non-zero exit, and the shared checks of
user input that commands run before they load a model or write anything."""

from __future__ import annotations

import math
import os
from pathlib import Path


class LoopfitError(Exception):
    """A problem with the user's input (a path, a flag, a config value), reported without a traceback."""


def check_count(flag: str, value: int | None, least: int = 1) -> None:
    """Refuse a count flag below `least` (None means "not given" and passes)."""
    if value is not None and value < least:
        raise LoopfitError(f"--{flag} must be >= {least}, got {value}")


def check_number(
    flag: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a number that is NaN, infinite or outside [low, high] (`*_open`: the bound itself is excluded)."""
    if value is None:
        return
    ok = math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        if low is not None and high is not None:
            want = f"in {lo}, {hi}"
        elif low is not None:
            want = f"{'>' if low_open else '>='} {low:g}"
        else:
            want = f"{'<' if high_open else '<='} {high:g}"
        raise LoopfitError(f"--{flag} must be {want}, got {value}")


def check_output(flag: str, path: str | os.PathLike | None, folder: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work: a folder where a file goes (or the reverse),
    a parent that is a file, or a parent this process may not write to (outputs are written beside their final
    name and renamed, so it is the parent that must be writable)."""
    if path is None:
        return
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise LoopfitError(f"--{flag} {p} is a file, not a folder: give a folder path")
    if not folder and p.is_dir():
        raise LoopfitError(f"--{flag} {p} is a folder: give a file path")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LoopfitError(f"--{flag} {p}: {parent} is a file, not a folder: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoopfitError(
            f"--{flag} {p}: the folder {parent} is not writable: choose another path or fix its permissions"
        )
