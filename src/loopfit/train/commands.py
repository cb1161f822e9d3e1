"""`loopfit train` (every `TrainConfig` field is a flag, `--config run.yaml` reads a dump) and `loopfit export`."""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields

from jsonargparse import set_parsing_settings

from loopfit.errors import LoopfitError
from loopfit.train.config import TrainConfig, field_docs
from loopfit.train.export import export_run
from loopfit.train.recipe import train


def train_command(**kwargs) -> None:
    cfg = TrainConfig(**kwargs)
    train(cfg)


def _build_train_signature() -> None:
    """Give `train_command` TrainConfig's fields as its keyword parameters, documented from the attribute docstrings,
    so jsonargparse builds `--lora.r`-style flags and `--config` from the one typed definition."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name])
        )
    train_command.__signature__ = inspect.Signature(params, return_annotation=None)
    train_command.__annotations__ = {f.name: hints[f.name] for f in fields(TrainConfig)} | {"return": None}
    docs = field_docs(TrainConfig)
    args = "\n".join(f"        {name}: {text}" for name, text in docs.items())
    train_command.__doc__ = (
        "Heal a model: LoRA and/or distillation from a teacher under a recurrence curriculum.\n\n"
        "    Run `loopfit train --print_config` for a complete YAML to edit; `--config FILE` reads one.\n\n"
        f"    Args:\n{args}\n"
    )


_build_train_signature()
# Nested configs (`--lora.r`) are documented by their dataclasses' attribute docstrings.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def export_command(run: str, out: str | None = None, overwrite: bool = False, remote_code: bool = False) -> None:
    """Write a trained run as a plain HF model folder (LoRA merged into the weights) that `from_pretrained` loads.

    `final/` is checked against its checksums before it is read; `out` is replaced (with `--overwrite=true`, and
    only if loopfit wrote it) by rename once the new folder is complete.

    Args:
        run: run folder written by `loopfit train` (holds `config.yaml` and `final/`).
        out: output folder.
        overwrite: replace `out` if it exists (only a folder loopfit wrote).
        remote_code: also write the looped model's code and `auto_map`, so that people without loopfit load it
            with `trust_remote_code=True`.
    """
    if out is None:
        raise LoopfitError("--out is required")
    export_run(run, out, overwrite=overwrite, remote_code=remote_code)
