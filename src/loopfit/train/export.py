"""A finished training run as a plain HF model folder: the library function behind `loopfit export`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoTokenizer

from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir, check_replaceable, remove_leftovers, verify_dir
from loopfit.loading import load_model
from loopfit.publish import set_default_depth, write_model_card, write_remote_code
from loopfit.train.student import peft_quiet


def merged_model(final: str | Path, model_name: str):
    """The trained student a run saved in `final` (its `final/` or a checkpoint's model folder) as one HF model: a
    LoRA adapter there is loaded onto `model_name` and merged into its weights; a full model there is loaded as is."""
    final = Path(final)
    if (final / "adapter_config.json").is_file():
        base = load_model(model_name)
        with peft_quiet():
            return PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    return load_model(final)


def export_run(run: str | Path, out: str | Path, overwrite: bool = False, remote_code: bool = False) -> Path:
    """Write the run folder `run` (written by `loopfit train`: `config.yaml` and `final/`) to `out` as a model that
    `from_pretrained` loads, LoRA merged into the weights, with a model card and the run's default depth.

    `final/` is checked against its checksums before it is read; an existing `out` is replaced only with
    `overwrite` and only if loopfit wrote it, by rename once the new folder is complete. `remote_code` also writes
    the looped model's code and `auto_map` (loading with `trust_remote_code=True`, without loopfit). Returns `out`.
    Raises `LoopfitError` for an unfinished or damaged run, or an output it may not replace, before loading anything.
    """
    run_dir, path = Path(run), Path(out)
    final = run_dir / "final"
    if not (run_dir / "config.yaml").is_file() or not final.is_dir():
        raise LoopfitError(f"{run} is not a finished training run (no config.yaml and final/ inside)")
    remove_leftovers(path)
    if path.exists() or path.is_symlink():
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
    model = merged_model(final, model_name)
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
    return path
