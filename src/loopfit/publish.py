"""What a converted or exported folder carries for people without loopfit: a model card, and optionally the code.

`write_model_card` writes `README.md` with YAML metadata (the Hub's model-card format): source model and license,
layout and dropped layers, adapter and state initialisation, the healing recipe and its measured losses by depth
when known, and how to load and generate. `write_remote_code` copies the looped model's three source files into
the folder with their imports made relative and sets `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works with transformers alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

import loopfit.models as _models

# The looped model's code, in dependency order; each imports only torch, transformers and the files before it.
REMOTE_CODE_FILES = (
    "families.py",
    "configuration_looped.py",
    "depth.py",
    "outputs.py",
    "layers.py",
    "relaxed.py",
    "exit_gate.py",
    "modeling_looped.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_looped.LoopedConfig",
    "AutoModel": "modeling_looped.LoopedModel",
    "AutoModelForCausalLM": "modeling_looped.LoopedForCausalLM",
}
# Training settings worth naming in a card (the rest is in the run's config.yaml).
_RECIPE_KEYS = ("data", "seq_len", "batch_size", "max_steps", "max_minutes", "precision", "seed", "fixed_num_steps",
                "fixed_point_scale")  # fmt: skip


def write_remote_code(folder: str | Path, model) -> None:
    """Copy the looped model's code into `folder` and point `model.config.auto_map` at it (before saving).

    Raises:
        ValueError: `model` is not a looped model.
    """
    if getattr(model.config, "model_type", None) != "looped":
        raise ValueError("only a looped model needs remote code; a static model loads with transformers as it is")
    src = Path(_models.__file__).parent
    for name in REMOTE_CODE_FILES:
        text = (src / name).read_text(encoding="utf-8")
        # `from loopfit.models.families import X` -> `from .families import X`: the folder is the package.
        text = re.sub(r"from loopfit\.models\.(\w+) import", r"from .\1 import", text)
        if re.search(r"^\s*(from|import) loopfit\b", text, re.M):
            raise RuntimeError(f"{name} still imports loopfit; it cannot ship as remote code")
        (Path(folder) / name).write_text(text, encoding="utf-8")
    model.config.auto_map = dict(AUTO_MAP)


def _source_license(source: str) -> str | None:
    """The `license` of a source HF folder's model card, if it has one."""
    card = Path(source) / "README.md"
    if not card.is_file():
        return None
    match = re.match(r"^---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    return str(meta["license"]) if isinstance(meta, dict) and meta.get("license") else None


def _fmt(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) or "none"


def model_card(model, source: str, run: str | Path | None = None, remote_code: bool = False) -> str:
    """The README.md text of a converted (`run=None`) or exported (`run` = the training run) model."""
    c = model.config
    looped = c.model_type == "looped"
    base = c.base_config if looped else c
    n = base.num_hidden_layers if looped else None
    meta = {
        "base_model": source,
        "license": _source_license(source) or "other",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["loopfit", "looped", "recurrent-depth"] if looped else ["loopfit", "pruned"],
    }
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    kind = "a looped (prelude -> recurrent block x R -> coda) model" if looped else "a pruned (static) model"
    lines += [f"# {kind} from {source}", "", f"Made with loopfit from `{source}` (license: {meta['license']}, as the "
              "source's own card says; `other` where it says nothing).", ""]  # fmt: skip
    if looped:
        used = set(c.prelude_layers + c.block_layers + c.coda_layers)
        lines += [
            "| part | source layers |",
            "|---|---|",
            f"| prelude | {_fmt(c.prelude_layers)} |",
            f"| recurrent block | {_fmt(c.block_layers)} |",
            f"| coda | {_fmt(c.coda_layers)} |",
            f"| dropped | {_fmt([i for i in range(n) if i not in used])} |",
            "",
            f"Source family `{base.model_type}`, {n} layers. Adapter `Linear(2h -> h)` initialised `{c.adapter_init}`"
            f" (`identity`: every iteration computes block(e), the pruned source), state initialised "
            f"`{c.state_init}`, KV cache `{c.cache_mode}`. Default depth R = {c.mean_recurrence} "
            "(`generation_config.json` carries `num_steps`).",
            "",
        ]
        if c.relaxation_rank != 0 and not c.relaxation_groups:
            lines += [
                f"Depth-wise LoRA: the block carries a rank-`{c.relaxation_rank}` delta per iteration on every linear "
                f"layer and its own norm vectors, for {c.num_relaxed} iterations (later ones reuse the last), "
                "started at zero (the plain loop).",
                "",
            ]
        elif c.relaxation_rank != 0:
            groups = "; ".join(f"{i}: {_fmt(g)}" for i, g in enumerate(c.relaxation_groups))
            lines += [
                f"Relaxed recursion (arXiv:2410.20672): the block (initialised `{c.relaxation_block_init}`) carries a "
                f"rank-`{c.relaxation_rank}` delta per iteration on every linear layer and its own norm vectors; "
                f"iteration i stands for source layers {groups} (later iterations reuse the last one's).",
                "",
            ]
    lines += _healing(run) if run is not None else ["Not healed: this is the model as converted.", ""]
    load = ", trust_remote_code=True" if remote_code else ""
    prefix = "" if remote_code or not looped else "import loopfit  # registers the looped model type\n"
    depth = ", num_steps=8" if looped else ""
    lines += [
        "## Use",
        "",
        "```python",
        f"{prefix}from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{load})',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'ids = tokenizer("The capital of France is", return_tensors="pt").input_ids',
        f"out = model.generate(ids, max_new_tokens=32{depth})",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
    ]
    if looped:
        lines += ["`num_steps` is the number of loop iterations R; any R runs with the same weights.", ""]
    return "\n".join(lines)


def _healing(run: str | Path) -> list[str]:
    run = Path(run)
    out = ["## Healing", ""]
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    d, lora = cfg.get("distillation") or {}, cfg.get("lora") or {}
    recipe = {k: cfg[k] for k in _RECIPE_KEYS if cfg.get(k) is not None}
    if lora.get("enabled"):
        recipe["lora"] = f"r = {lora.get('r')}, alpha = {lora.get('lora_alpha')}"
    if d.get("enabled"):
        teacher = d.get("teacher_model_name") or d.get("teacher_cache")
        recipe["distillation"] = f"{d.get('kind')} at T = {d.get('temperature')} from {teacher}"
    out += [f"- {k}: {v}" for k, v in recipe.items()] + ["", "Full recipe: the run's `config.yaml`.", ""]
    try:
        val = json.loads((run / "done.json").read_text(encoding="utf-8")).get("val_loss") or {}
    except (OSError, ValueError):
        val = {}
    if val:
        depths = list(val)
        out += ["Held-out loss by depth R at the end of training:", "",
                "| R | " + " | ".join("default" if r == "None" else r for r in depths) + " |",
                "|---|" + "---|" * len(depths),
                "| loss | " + " | ".join(f"{val[r]:.4f}" for r in depths) + " |", ""]  # fmt: skip
    else:
        out += ["No held-out loss was measured during training.", ""]
    return out


def write_model_card(folder: str | Path, model, source: str, run=None, remote_code: bool = False) -> None:
    """Write `README.md` (see `model_card`) into `folder`."""
    (Path(folder) / "README.md").write_text(model_card(model, source, run, remote_code), encoding="utf-8")


def set_default_depth(model) -> None:
    """Record the looped model's default depth in its generation config, which `generate` reads."""
    if getattr(model.config, "model_type", None) == "looped":
        model.generation_config.num_steps = model.config.mean_recurrence
        model.generation_config._from_model_config = False  # otherwise rebuilt from config.json on load, unsaved
