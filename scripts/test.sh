#!/usr/bin/env bash
# The README's test command and CI's (.ci/run). ruff check + ruff format --check once, then the test suite twice:
#   locked  in .venv, set up by scripts/setup.sh from requirements/lock.txt (the versions tested together);
#   newest  in .venv-newest: the same set-up, then transformers, peft, datasets, lm-eval and trl upgraded to the newest
#           releases pyproject.toml allows (torch held at requirements/torch.txt), so a coming release shows up here
#           before it breaks a fresh machine.
# Both must pass (pytest's exit 5, no tests ran, is a failure too); the exit status is non-zero if either fails.
# Arguments go to both pytest runs:     bash scripts/test.sh tests/test_losses.py -x
# One pass only, for quick local runs:  LOOPFIT_TEST_PASSES=locked bash scripts/test.sh   (or =newest)
set -euo pipefail
cd "$(dirname "$0")/.."
PASSES=${LOOPFIT_TEST_PASSES:-locked newest}
UPGRADE="transformers peft datasets lm-eval trl"
for p in $PASSES; do
  case $p in locked | newest) ;; *) echo "test.sh: LOOPFIT_TEST_PASSES: '$p' is not locked or newest" >&2; exit 2;; esac
done

venv_of() { if [ "$1" = locked ]; then echo .venv; else echo .venv-newest; fi; }

setup_pass() {  # set up the venv of pass $1
  local venv
  venv=$(venv_of "$1")
  bash scripts/setup.sh "$venv"
  [ "$1" = newest ] || return 0
  local specs
  # The requirement strings of the packages to upgrade, as pyproject.toml writes them (its ranges apply).
  specs=$("$venv/bin/python" - $UPGRADE <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
want = {norm(n) for n in sys.argv[1:]}
found = [r for r in reqs if norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) in want]
assert len(found) == len(want), (found, want)
print("\n".join(found))
PY
  )
  mapfile -t specs <<<"$specs"
  local log rc=0
  log=$(mktemp)
  "$venv/bin/python" -m pip install -q --upgrade -c requirements/torch.txt "${specs[@]}" >"$log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then cat "$log" >&2; rm -f "$log"; echo "test.sh: upgrading ${specs[*]} in $venv failed" >&2; exit $rc; fi
  rm -f "$log"
  "$venv/bin/python" -c "from importlib.metadata import version as v; print('$venv (newest pass): ' + ', '.join(f'{n} {v(n)}' for n in 'torch transformers peft datasets lm-eval trl'.split()))"
}

first=${PASSES%% *}
setup_pass "$first"
venv=$(venv_of "$first")
"$venv/bin/ruff" check src tests benchmarks scripts
"$venv/bin/ruff" format --check src tests benchmarks scripts

status=0
summary=""
for p in $PASSES; do
  [ "$p" = "$first" ] || setup_pass "$p"
  venv=$(venv_of "$p")
  echo "== pytest, $p pass ($venv) =="
  rc=0
  "$venv/bin/python" -m pytest -p no:cacheprovider -q --durations=10 "$@" || rc=$?
  if [ $rc -eq 0 ]; then summary+="$p: passed. "; else summary+="$p: FAILED (pytest exit $rc). "; status=1; fi
done
echo "test.sh: $summary"
exit $status
