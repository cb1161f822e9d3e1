"""The `loopfit` console script: one subcommand per typed function (jsonargparse), flags with underscores."""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import sys
import traceback
import typing
from dataclasses import MISSING, fields
from pathlib import Path

# isort: split
# The command's process-wide defaults, set on import and before the imports below: PyTorch reads
# THP_MEM_ALLOC_ENABLE at its first CPU allocation, and importing peft already makes one.
import loopfit.process  # noqa: F401

# isort: split
from jsonargparse import CLI
from transformers.utils import logging as hf_logging

from loopfit.analysis import analyze_command
from loopfit.cache.commands import cache_teacher_command, verify_cache_command
from loopfit.convert import convert_command
from loopfit.data.prepare import prepare_command
from loopfit.data.sources import read_text
from loopfit.errors import LoopfitError
from loopfit.evaluate import eval_command
from loopfit.flops import count_command
from loopfit.generate import generate_command
from loopfit.gsm8k import gsm8k_command
from loopfit.pipeline import DemoConfig, demo
from loopfit.sweep import sweep_command
from loopfit.train.aliases import normalise_argv
from loopfit.train.commands import export_command, train_command
from loopfit.train.config import field_docs


def dataclass_command(cls, run, summary: str):
    """A CLI function whose keyword parameters are the fields of dataclass `cls` (typed, defaulted, documented from
    the attribute docstrings), which builds `cls(**kwargs)` and calls `run` on it: one typed definition gives the
    flags, `--config FILE` and `--print_config`."""

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


DEBUG_ENV = "LOOPFIT_DEBUG"


def one_line(text: str) -> str:
    """A message as one line: library messages often span several."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or "(no message)"


def known_failure(e: BaseException) -> str | None:
    """One line for a failure of a known kind that escaped from a library, naming the file where it is known;
    None for anything else. Most are caught where they happen, with a more precise message; this is the net."""
    name = type(e).__name__
    if isinstance(e, OSError) and e.filename is not None:
        what = str(e.filename) + (f" -> {e.filename2}" if e.filename2 else "")
        if isinstance(e, PermissionError) or e.errno == errno.EROFS:
            return f"cannot write {what}: {e.strerror}: choose another path or fix its permissions"
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return f"cannot write {what}: {e.strerror}: free some space or choose another output path"
        return f"{what}: {e.strerror or one_line(e)}"
    if isinstance(e, UnicodeDecodeError):
        return (f"the bytes at offset {e.start} of an input are not {e.encoding} text ({e.reason}): "
                "convert the file to UTF-8")  # fmt: skip
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}): fix or replace the JSON file"
    if name in ("YAMLError", "ScannerError", "ParserError", "ComposerError", "ConstructorError"):
        return f"invalid YAML: {one_line(e)}"
    if name == "SafetensorError":
        return f"a .safetensors file is corrupt or truncated ({one_line(e)}): download or save the model again"
    if name == "OutOfMemoryError" or isinstance(e, MemoryError):
        return "out of memory: lower --batch_size or --seq_len (or free the device)"
    return None


def check_config_files(argv: list[str]) -> None:
    """Refuse a `--config` file that is not UTF-8 text, naming it and the byte offset: the YAML reader would only
    say that some input did not decode."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--config" and not eq and i + 1 < len(argv):
            value = argv[i + 1]
        if name == "--config" and value and Path(value).is_file():
            read_text(value)


def _fail(message: str, code: int) -> None:
    print(f"loopfit: error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `loopfit` and `python -m loopfit`: the one error boundary.

    A user error (`LoopfitError`, a flag the parser rejects, a known library failure) prints one line
    `loopfit: error: ...` and exits 2; anything else prints one line with a hint and exits 1. With
    `LOOPFIT_DEBUG=1` the full traceback is shown as well.
    """
    argv = repeated_flags_append(sys.argv[1:] if argv is None else list(argv))
    debug = bool(os.environ.get(DEBUG_ENV))
    if not sys.stderr.isatty():
        # transformers' per-load bars ("Loading weights", "Writing model shards") only add noise to a log, and would
        # sit above an error's one line; loopfit's own progress (training, sweeps) is unaffected.
        hf_logging.disable_progress_bar()
    try:
        commands = _commands()
        check_config_files(argv)
        argv = normalise_argv(argv)  # old flag names (the seeds' --distillation.alpha) read as today's
        # exit_on_error=False: parser errors come back as exceptions, printed below as one line instead of the
        # usage block.
        CLI(commands, args=argv, as_positional=True, fail_untyped=True, exit_on_error=False)
    except LoopfitError as e:
        if debug:
            traceback.print_exc()
        _fail(str(e), 2)
    except argparse.ArgumentError as e:
        command = argv[0] if argv and argv[0] in commands else None
        _fail(f"{e} (see loopfit {command + ' ' if command else ''}--help)", 2)
    except KeyboardInterrupt:
        print("loopfit: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        message = known_failure(e)
        if message is not None:
            _fail(message, 2)
        _fail(f"unexpected {type(e).__name__}: {one_line(e)} (rerun with {DEBUG_ENV}=1 for the full traceback)", 1)


if __name__ == "__main__":
    main()
