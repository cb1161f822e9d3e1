"""scripts/setup.sh's hard-linked copy of a base venv (LOOPFIT_BASE, scripts/test.sh's newest pass).

The base here is a bare venv (no pip) that sees the running interpreter's packages through a .pth file and carries
the stamp of the current lock, so setup.sh takes it as set up and installs nothing: the copy is what is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="setup.sh is a bash script for Linux")


def _stamp() -> str:
    # What setup.sh writes into VENV/.loopfit-setup for the current lock (its own formula, printed).
    out = subprocess.run(
        ["bash", "scripts/setup.sh", "--print-stamp"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _base_venv(path: Path, stamp: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (site,) = (path / "lib").glob("python*/site-packages")
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name in ("pip", "tool"):  # console scripts as pip writes them: the venv's absolute path in the shebang
        script = path / "bin" / name
        script.write_text(f"#!{path}/bin/python3\nimport sys\nprint(sys.prefix)\n")
        script.chmod(0o755)
    (path / ".loopfit-setup").write_text(stamp + "\n")
    return path


def _setup(venv: Path | str, base: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/setup.sh", str(venv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "LOOPFIT_BASE": str(base), **env},
    )


def test_newest_venv_is_a_hard_linked_copy_that_leaves_the_base_as_it_was(tmp_path):
    stamp = _stamp()
    base = _base_venv(tmp_path / "base", stamp)
    clone = tmp_path / "clone"
    run = _setup(f"{clone}/", base)  # a trailing slash names the same venv
    assert run.returncode == 0, run.stderr
    assert "installing in full" not in run.stderr
    (site,) = (clone / "lib").glob("python*/site-packages")
    # The packages are shared, not copied: one inode, two names.
    (base_pth,) = base.glob("lib/python*/site-packages/outer.pth")
    assert (site / "outer.pth").stat().st_ino == base_pth.stat().st_ino
    assert (site / "outer.pth").stat().st_nlink == 2
    # Scripts and pyvenv.cfg name the copy; the base's still name the base (new files, not edits through the link).
    assert (clone / "bin" / "tool").read_text().startswith(f"#!{clone}/bin/python3\n")
    assert (base / "bin" / "tool").read_text().startswith(f"#!{base}/bin/python3\n")
    assert (clone / "bin" / "tool").stat().st_ino != (base / "bin" / "tool").stat().st_ino
    assert os.access(clone / "bin" / "tool", os.X_OK)
    assert str(clone) in (clone / "pyvenv.cfg").read_text()
    assert str(clone) not in (base / "pyvenv.cfg").read_text()
    prefix = subprocess.run(
        [clone / "bin" / "python", "-c", "import sys, torch; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert prefix == str(clone)
    assert (clone / ".loopfit-setup").read_text().strip() == stamp
    assert (clone / ".loopfit-setup").stat().st_ino != (base / ".loopfit-setup").stat().st_ino
    assert not (tmp_path / "clone.partial").exists()
    # A copy set up from this lock is kept as it is on the next run.
    ino = (clone / "bin" / "tool").stat().st_ino
    again = _setup(clone, base)
    assert again.returncode == 0, again.stderr
    assert (clone / "bin" / "tool").stat().st_ino == ino


def _fake_df(tmp_path: Path, free_mib: int) -> str:
    """A PATH whose `df` reports FREE_MIB free on every filesystem (the disk check, without filling a disk)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text(
        f"#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
        f"echo 'x 1 1 {free_mib * 1024} 1% /'\n"
    )
    df.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_a_base_from_another_lock_is_not_copied(tmp_path):
    base = _base_venv(tmp_path / "base", "0" * 64)
    clone = tmp_path / "clone"
    # Not copied, so setup.sh goes for a full install, and a full install checks for 3 GiB before pip starts.
    run = _setup(clone, base, PATH=_fake_df(tmp_path, 2000))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"setup.sh: not enough free disk: 2000 MiB where {clone} lives, 2000 MiB in {os.environ.get('TMPDIR', '/tmp')};"
        " installing needs about 3072 MiB in each"
    )
    assert not list(clone.glob("lib/python*/site-packages/outer.pth"))
    assert not (clone / ".loopfit-setup").exists()


def test_the_upgrade_of_a_copy_checks_the_disk_first(tmp_path):
    stamp = _stamp()
    base = _base_venv(tmp_path / "base", stamp)
    clone = tmp_path / "clone"
    run = _setup(clone, base, PATH=_fake_df(tmp_path, 300), LOOPFIT_UPGRADE="transformers")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].endswith("upgrading needs about 512 MiB in each")
    # The copy itself takes no room worth checking for (hard links), so it is made and kept.
    assert (clone / ".loopfit-setup").read_text().strip() == stamp
