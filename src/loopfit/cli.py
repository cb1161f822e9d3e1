"""The `loopfit` console script: one subcommand per typed function (jsonargparse), flags with underscores."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def dataclass_command(cls, run, summary: str):
    """A CLI function whose keyword parameters are the fields of dataclass `cls` (typed, defaulted, documented from
    the attribute docstrings), which builds `cls(**kwargs)` and calls `run` on it: one typed definition gives the
    flags, `--config FILE` and `--print_config`."""
    import inspect
    import typing
    from dataclasses import MISSING, fields

    from loopfit.train.config import field_docs

    def command(**kwargs):
        return run(cls(**kwargs))

    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[f.name],
            default=f.default if f.default is not MISSING else f.default_factory(),
        )
        for f in fields(cls)
    ]
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {f.name: hints[f.name] for f in fields(cls)} | {"return": None}
    args = "\n".join(f"        {name}: {text}" for name, text in field_docs(cls).items())
    command.__doc__ = f"{summary}\n\n    Args:\n{args}\n"
    command.__name__ = command.__qualname__ = f"{cls.__name__}_command"
    return command


def _commands() -> dict:
    # Imported here so `loopfit --help` lists every subcommand while library imports stay lazy elsewhere.
    from loopfit.analysis import analyze_command
    from loopfit.cache.commands import cache_teacher_command, verify_cache_command
    from loopfit.convert import convert_command
    from loopfit.data.shards import prepare_command
    from loopfit.evaluate import eval_command
    from loopfit.flops import count_command
    from loopfit.generate import generate_command
    from loopfit.gsm8k import gsm8k_command
    from loopfit.pipeline import DemoConfig, demo
    from loopfit.sweep import sweep_command
    from loopfit.train.commands import export_command, train_command

    return {
        "demo": dataclass_command(
            DemoConfig,
            demo,
            "The main job: analyze, convert, cache the teacher, heal, "
            "evaluate at every depth and generate, on SmolLM2 and built-in data by default.",
        ),
        "analyze": analyze_command,
        "convert": convert_command,
        "prepare": prepare_command,
        "generate": generate_command,
        "count": count_command,
        "eval": eval_command,
        "gsm8k": gsm8k_command,
        "train": train_command,
        "export": export_command,
        "sweep": sweep_command,
        "cache-teacher": cache_teacher_command,
        "verify-cache": verify_cache_command,
    }


LIST_FLAGS = ("--data", "--prompt", "--grid")


def repeated_flags_append(argv: list[str]) -> list[str]:
    """Turn the 2nd and later uses of a list flag into jsonargparse's append form (`--data a --data b` ->
    `--data+ b`); jsonargparse otherwise keeps only the last value of a repeated list flag, silently."""
    seen: set[str] = set()
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in LIST_FLAGS:
            if name in seen:
                arg = f"{name}+{eq}{value}"
            seen.add(name)
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of `loopfit` and `python -m loopfit`; user errors print one line and exit 2."""
    from jsonargparse import CLI

    from loopfit.errors import LoopfitError

    argv = repeated_flags_append(sys.argv[1:] if argv is None else list(argv))
    try:
        CLI(_commands(), args=argv, as_positional=True, fail_untyped=True)
    except LoopfitError as e:
        print(f"loopfit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("loopfit: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
