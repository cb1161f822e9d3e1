#!/usr/bin/env bash
# The README's test command and CI's (.ci/run). ruff check + ruff format --check once, then the test suite twice:
#   locked  in .venv, set up by scripts/setup.sh from requirements/lock.txt (the versions tested together);
#   newest  in .venv-newest: the same set-up (a hard-linked copy of .venv when that is set up from the same lock), then
#           transformers, peft, datasets, lm-eval and trl upgraded to the newest releases pyproject.toml allows (torch
#           held at requirements/torch.txt), so a coming release shows up here before it breaks a fresh machine.
# Both must pass (pytest's exit 5, no tests ran, is a failure too); the exit status is non-zero if ruff or either fails.
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
  if [ "$1" = locked ]; then
    bash scripts/setup.sh .venv
  else
    LOOPFIT_BASE=.venv LOOPFIT_UPGRADE=$UPGRADE bash scripts/setup.sh .venv-newest
  fi
}

first=${PASSES%% *}
setup_pass "$first"
venv=$(venv_of "$first")
status=0
summary="ruff: passed. "
if ! { "$venv/bin/ruff" check src tests benchmarks scripts && "$venv/bin/ruff" format --check src tests benchmarks scripts; }
then
  summary="ruff: FAILED. "  # the tests still run, so one CI run reports everything
  status=1
fi

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
