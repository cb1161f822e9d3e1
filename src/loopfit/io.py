"""Safe outputs: everything loopfit writes appears under its final name only once complete, durable and checksummed.

- `atomic_dir(out)` builds a folder beside `out` (`.tmp-<name>-<pid>-*`), fsyncs every file in it, writes the
  marker `.loopfit.json` (who wrote it, what it is, the sha256 and size of every file) and renames it to `out`;
  an existing `out` is replaced only with `overwrite=True` and only when it carries the marker (`check_replaceable`).
- `atomic_file(path)` does the same for one file.
- `verify_dir(folder)` checks a folder's files against its marker (when it is read: resume, export).
- `remove_leftovers(out)` deletes the `.tmp-<name>-<pid>-*` and `.old-<name>-<pid>` left beside `out` by a killed
  process (only when that pid is dead) and puts back an `.old-` folder whose replacement never arrived.

Every error is a `LoopfitError` with one line: what, which file, what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from loopfit import __version__
from loopfit.errors import LoopfitError

MARKER = ".loopfit.json"
"""Marker in every folder loopfit writes: `{"written_by": "loopfit", "kind", "version", "created", "files":
{relative name: {"sha256", "bytes"}}, ...}`. Its absence means "not ours": `--overwrite` refuses such a folder."""


# ------------------------------------------------------------------------------------------------ checksums
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _hash_and_fsync(path: Path) -> dict:
    """sha256 and size of a file just written, and its data forced to disk (one read pass, page-cache hot)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inside(folder: str | os.PathLike, name, listed_in: str | os.PathLike) -> Path:
    """`folder / name` for a file name read from a manifest; a name that leaves `folder` (absolute, `..`, a link
    pointing out) raises LoopfitError: a manifest only ever names files inside its own folder."""
    folder = Path(folder)
    bad = not isinstance(name, str) or not name or "\\" in name or "\0" in name
    if not bad:
        rel = Path(name)
        bad = rel.is_absolute() or ".." in rel.parts
    if not bad:
        path = folder / rel
        root = folder.resolve()
        bad = not path.resolve().is_relative_to(root)
    if bad:
        raise LoopfitError(
            f"{listed_in} names a file outside {folder}: {name!r}; the manifest is damaged or was edited, rebuild the "
            "output"
        )
    return path


# --------------------------------------------------------------------------------------------------- marker
def read_marker(folder: str | os.PathLike) -> dict | None:
    """The folder's marker, or None when it has none; LoopfitError when it is unreadable."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoopfitError(f"{path} is unreadable ({type(e).__name__}); the folder is damaged") from None
    if not isinstance(marker, dict) or marker.get("written_by") != "loopfit":
        raise LoopfitError(f"{path} is not a loopfit marker; the folder is damaged or not loopfit's")
    return marker


def write_marker(folder: str | os.PathLike, kind: str, files: dict | None = None, **info) -> None:
    """Write (and fsync) the marker of `folder`: `kind` says what the folder is; `files` their checksums."""

    marker = {"written_by": "loopfit", "kind": kind, "version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}  # fmt: skip
    if files is not None:
        marker["files"] = files
    path = Path(folder) / MARKER
    with open(path, "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def seal(folder: str | os.PathLike, kind: str, **info) -> dict:
    """Fsync every file and folder under `folder`, record their checksums in its marker; returns the marker's
    `files`."""
    folder = Path(folder)
    files = {}
    dirs = []
    for root, subdirs, names in os.walk(folder):
        subdirs.sort()
        dirs.append(Path(root))
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel == MARKER or path.is_symlink():
                continue
            files[rel] = _hash_and_fsync(path)
    write_marker(folder, kind, files, **info)
    for d in reversed(dirs):  # children first: a folder is durable once its entries are
        fsync_dir(d)
    return files


def verify_dir(folder: str | os.PathLike, required: tuple[str, ...] = (), advice: str = "") -> dict:
    """Check every file listed in `folder`'s marker (present, same size, same sha256); returns the marker.

    Raises LoopfitError naming the first damaged file (or the marker) and ending with `advice`.
    """
    folder = Path(folder)
    tail = f"; {advice}" if advice else ""
    marker = read_marker(folder)
    if marker is None:
        raise LoopfitError(f"{folder / MARKER} is missing, so {folder} cannot be checked: it is damaged or was "
                           f"written by an older loopfit{tail}")  # fmt: skip
    files = marker.get("files")
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        raise LoopfitError(f"{folder / MARKER} has no valid file list; the folder is damaged{tail}")
    for name in required:
        if name not in files:
            raise LoopfitError(f"{folder / MARKER} does not list {name}; the folder is damaged{tail}")
    for name, rec in files.items():
        path = inside(folder, name, folder / MARKER)
        if not path.is_file():
            raise LoopfitError(f"{path} is missing{tail}")
        size = path.stat().st_size
        if size != rec.get("bytes"):
            raise LoopfitError(f"{path} is damaged: {size} bytes, {MARKER} says {rec.get('bytes')}{tail}")
        if sha256_file(path) != rec.get("sha256"):
            raise LoopfitError(f"{path} is damaged: its sha256 differs from the one in {MARKER}{tail}")
    return marker


# ---------------------------------------------------------------------------------------------- replacing
def check_replaceable(out: str | os.PathLike, need_marker: bool = True) -> None:
    """Raise LoopfitError unless `out` is a folder loopfit may replace: a real folder (no link, no file) that is
    not the current folder, one of its parents, the home folder or `/`, and (with `need_marker`) carries the
    marker."""
    out = Path(out)
    what = "choose another --out, or delete it yourself if it must go"
    if out.is_symlink():
        raise LoopfitError(f"refusing to replace {out}: it is a symbolic link; {what}")
    if not out.is_dir():
        raise LoopfitError(f"refusing to replace {out}: it is not a folder; {what}")
    real, cwd, home = out.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if cwd.is_relative_to(real):
        raise LoopfitError(f"refusing to replace {out}: it is the current folder or holds it; {what}")
    if home.is_relative_to(real):
        raise LoopfitError(f"refusing to replace {out}: it is the home folder or holds it; {what}")
    if need_marker and read_marker(out) is None:
        raise LoopfitError(f"refusing to replace {out}: loopfit did not write it (no {MARKER} inside); {what}")


def temp_dir_for(out: str | os.PathLike) -> Path:
    """A new empty folder beside `out` named `.tmp-<name>-<pid>-*` (the pid lets a rerun tell a dead owner's)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; finished outputs follow the umask like any other file
    return tmp


def install_dir(tmp: str | os.PathLike, out: str | os.PathLike, keep_old: bool = False) -> Path | None:
    """Rename the finished folder `tmp` to `out`. An existing `out` is first renamed to `.old-<name>-<pid>` and
    then deleted, or, with `keep_old`, kept and returned (see `restore_old` / `discard_old`)."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        if old.exists():  # an earlier replacement by this same process that was never discarded
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None and not keep_old:
        discard_old(old)
        return None
    return old


def restore_old(old: str | os.PathLike, out: str | os.PathLike) -> None:
    """Undo `install_dir(..., keep_old=True)`: the new `out` goes (to a `.tmp-` name first, so a kill mid-way
    leaves a leftover, not a half-deleted output) and `old` gets its name back."""
    old, out = Path(old), Path(out)
    if out.exists():
        gone = out.with_name(f".tmp-{out.name}-{os.getpid()}-undone")
        if gone.exists():
            shutil.rmtree(gone)
        os.replace(out, gone)
        os.replace(old, out)
        fsync_dir(out.parent)
        shutil.rmtree(gone, ignore_errors=True)
    else:
        os.replace(old, out)
        fsync_dir(out.parent)


def discard_old(old: str | os.PathLike) -> None:
    shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def remove_leftovers(out: str | os.PathLike) -> list[Path]:
    """Clean what a killed writer of `out` left beside it; returns what was removed or restored.

    Only names built for `out` by this module count (`.tmp-<name>-<pid>-*`, `.old-<name>-<pid>`), and only when
    process `pid` is gone (pids are of this machine: on storage shared by several machines a live writer elsewhere
    could look dead, so give concurrent runs different outputs). An `.old-` folder whose `out` is missing (killed
    between the two renames of a replacement) is renamed back to `out` instead of deleted.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.(tmp|old)-{re.escape(out.name)}-(\d+)(-[a-z0-9_]+)?$")
    found = []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and (m.group(1) == "tmp") == (m.group(3) is not None) and not pid_alive(int(m.group(2))):
            found.append((m.group(1), entry))
    touched = []
    for kind, entry in sorted(found, key=lambda x: x[1].name):
        if kind == "old" and not out.exists() and entry.is_dir():
            os.replace(entry, out)
            print(f"loopfit: restored {out} from {entry.name}, left by a killed run before it was replaced",
                  file=sys.stderr)  # fmt: skip
        else:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            print(f"loopfit: removed {entry}, left by a killed run", file=sys.stderr)
        touched.append(entry)
    return touched


# ------------------------------------------------------------------------------------------------- writers
@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike,
    overwrite: bool = False,
    kind: str = "output",
    info: dict | None = None,
    replace_unmarked: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; if the block finishes without error, fsync and checksum its files
    into the marker (`kind`, `info` recorded there) and rename it to `out`.

    A crash leaves at most a `.tmp-*` folder (removed by the next writer of `out`), never something that looks
    like a finished output. An existing `out` is refused without `overwrite`, and with it unless loopfit wrote it
    (`check_replaceable`; `replace_unmarked` drops the marker condition for folders inside loopfit's own outputs,
    e.g. a damaged checkpoint). Nothing is touched before the new folder is complete.
    """
    out = Path(out)
    remove_leftovers(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise LoopfitError(f"output folder {out} already exists (pass --overwrite=true to replace it)")
        check_replaceable(out, need_marker=not replace_unmarked)
    tmp = temp_dir_for(out)
    try:
        yield tmp
        seal(tmp, kind, **(info or {}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install_dir(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path` (`.tmp-<name>-<pid>-*`), fsync it and rename it over `path` (then fsync
    the folder) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
