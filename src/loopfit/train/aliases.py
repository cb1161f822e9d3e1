"""Old flag and config names that keep working, read as today's names before anything is parsed.

One meaning per name: loop iterations are R / `num_steps` (Huginn's name: `min_num_steps`, `eval_num_steps`),
optimizer steps are `max_steps` / `step` (HF Trainer's), the CE and KD weights are `ce_scale` / `kd_scale`. Two
older names are still accepted, each with a one-line deprecation note on stderr:

- `distillation.alpha` (the seeds' `--distillation.alpha=0.5`, runs saved before the rename): the classic blend
  `alpha * CE + (1 - alpha) * KD`, read as `ce_scale = alpha`, `kd_scale = 1 - alpha`. On the command line, giving
  it together with `--distillation.ce_scale` / `--distillation.kd_scale` with other values is refused; in a config
  file (a run's saved `config.yaml`) a scale that is set wins over `alpha`, as it did when the file was written, so a
  saved run resumes with the same weights.
- `loopfit generate --min_steps` (loop iterations): `--min_num_steps`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loopfit.errors import LoopfitError

ALPHA = "distillation.alpha"
# Old flag -> new flag, one to one, per command.
RENAMED = {"generate": {"min_steps": "min_num_steps"}}
# Commands whose flags are the training config's.
TRAIN_COMMANDS = ("train", "sweep")


def _note(old: str, new: str) -> None:
    print(f"loopfit: note: --{old} is deprecated; use {new}", file=sys.stderr)


def _alpha(value) -> float:
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise LoopfitError(f"--{ALPHA} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= a <= 1.0:
        raise LoopfitError(f"--{ALPHA} must be a number in [0, 1], got {value!r}")
    return a


def _split(args: list[str]) -> list[tuple[str, str | None, int]]:
    """`[(name without --, value or None, args consumed)]` for each `--name=value` / `--name value` / other arg."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if not arg.startswith("--"):
            out.append((arg, None, 1))
        elif eq:
            out.append((name[2:], value, 1))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((name[2:], args[i + 1], 2))
        else:
            out.append((name[2:], None, 1))
        i += out[-1][2]
    return out


def normalise_train_args(args: list[str], note: bool = True) -> list[str]:
    """Training flags with `--distillation.alpha=A` read as `--distillation.ce_scale=A --distillation.kd_scale=1-A`.

    Raises:
        LoopfitError: `A` is not a number in [0, 1], or `--distillation.ce_scale` / `kd_scale` is also given with a
            value other than `A` / `1 - A`.
    """
    parts = _split(args)
    given = {name: value for name, value, _ in parts}
    if ALPHA not in given:
        return list(args)
    a = _alpha(given[ALPHA])
    implied = {"distillation.ce_scale": a, "distillation.kd_scale": 1.0 - a}
    for name, want in implied.items():
        if name in given:
            try:
                same = float(given[name]) == want
            except (TypeError, ValueError):
                same = False
            if not same:
                raise LoopfitError(
                    f"--{ALPHA}={given[ALPHA]} means --{name}={want:g}, but --{name}={given[name]} is also given: "
                    "give only --distillation.ce_scale and --distillation.kd_scale"
                )
    if note:
        _note(ALPHA, f"--distillation.ce_scale={a:g} --distillation.kd_scale={1.0 - a:g}")
    out, i = [], 0
    for name, _, n in parts:
        if name == ALPHA:
            out += [f"--{k}={v!r}" for k, v in implied.items() if k not in given]
        else:
            out += args[i : i + n]
        i += n
    return out


def normalise_config(d: dict, note: bool = False, where: str = "") -> dict:
    """A training config mapping (a `--config` file, a run's `config.yaml`) with `distillation.alpha` read as
    `ce_scale` / `kd_scale` (a scale that is set wins, as before the rename); other mappings are returned as they are.
    """
    dist = d.get("distillation") if isinstance(d, dict) else None
    if not isinstance(dist, dict) or "alpha" not in dist:
        return d
    dist = dict(dist)
    a = _alpha(dist.pop("alpha"))
    if dist.get("ce_scale") is None:
        dist["ce_scale"] = a
    if dist.get("kd_scale") is None:
        dist["kd_scale"] = 1.0 - a
    if note:
        _note(ALPHA, f"distillation.ce_scale / kd_scale{' in ' + where if where else ''}")
    return d | {"distillation": dist}


def _normalise_config_files(args: list[str]) -> list[str]:
    """`--config FILE` whose YAML holds an old name -> `--config <the normalised YAML>` (jsonargparse reads a config
    given as text as it reads a file; the fields are plain strings, so no path is resolved against the file's folder).
    """
    import yaml

    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        j = i if eq else i + 1
        if name != "--config" or j >= len(out):
            continue
        path = Path(value if eq else out[j])
        try:
            if not path.is_file():
                continue
        except OSError:  # a config given as text, too long for a file name
            continue
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # jsonargparse (or check_config_files) reports it
        new = normalise_config(d, note=True, where=str(path))
        if new is not d:
            text = yaml.safe_dump(new, sort_keys=False)
            out[j] = f"--config={text}" if eq else text
    return out


def normalise_argv(argv: list[str]) -> list[str]:
    """A whole `loopfit` command line with the old names of its command's flags read as the new ones."""
    if not argv:
        return argv
    command, rest = argv[0], argv[1:]
    if command in TRAIN_COMMANDS:
        rest = _normalise_config_files(normalise_train_args(rest))
    renamed = RENAMED.get(command, {})
    for old, new in renamed.items():
        if any(name == new for name, _, _ in _split(rest)) and any(name == old for name, _, _ in _split(rest)):
            raise LoopfitError(f"give --{new} only (--{old} is its deprecated name)")
    out = []
    for arg in rest:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name[2:] in renamed:
            _note(name[2:], f"--{renamed[name[2:]]}")
            arg = f"--{renamed[name[2:]]}{eq}{value}"
        out.append(arg)
    return [command] + out
