"""`loopfit train` (every `TrainConfig` field is a flag, `--config run.yaml` reads a dump) and `loopfit export`."""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import yaml
from jsonargparse import set_parsing_settings
from peft import PeftModel
from transformers import AutoTokenizer

from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir, check_replaceable, remove_leftovers, verify_dir
from loopfit.loading import load_model
from loopfit.publish import set_default_depth, write_model_card, write_remote_code
from loopfit.train.config import TrainConfig, field_docs
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
    run_dir = Path(run)
    final = run_dir / "final"
    if not (run_dir / "config.yaml").is_file() or not final.is_dir():
        raise LoopfitError(f"{run} is not a finished training run (no config.yaml and final/ inside)")
    remove_leftovers(Path(out))
    if Path(out).exists() or Path(out).is_symlink():
        if not overwrite:
            raise LoopfitError(f"output folder {out} already exists (pass --overwrite=true to replace it)")
        check_replaceable(out)  # before anything is loaded: a refusal costs nothing
    verify_dir(final, advice=f"delete {final} and {run_dir / 'done.json'}, then rewrite them from the last checkpoint "
               f"with loopfit train --config {run_dir / 'config.yaml'} --resume=true")  # fmt: skip
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        model_name = cfg["model_name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise LoopfitError(f"{run_dir / 'config.yaml'} is unreadable ({type(e).__name__}); the run is damaged") from e
    if (final / "adapter_config.json").is_file():
        base = load_model(model_name)
        model = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    else:
        model = load_model(final)

    tokenizer = AutoTokenizer.from_pretrained(final)  # final/ holds only an adapter: no config.json to resolve

    looped = getattr(model.config, "model_type", None) == "looped"
    if looped and getattr(model.generation_config, "num_steps", None) is None:
        set_default_depth(model)
    with atomic_dir(out, overwrite=overwrite, kind="model") as tmp:
        if remote_code and looped:
            write_remote_code(tmp, model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, model, source=model_name, run=run_dir, remote_code=remote_code and looped)
    done = run_dir / "done.json"
    step = json.loads(done.read_text())["step"] if done.is_file() else "?"
    print(f"wrote {out}: {model_name} + training of {run} (step {step}), merged")
