"""Feedforward HF causal LM -> looped model (or a pruned static model), with an explicit source-layer map."""

from __future__ import annotations

import copy
import os

import torch
from transformers import PreTrainedModel

from loopfit.analysis import suggest_layout
from loopfit.data import read_documents
from loopfit.errors import LoopfitError, check_output
from loopfit.io import atomic_dir
from loopfit.layout import Layout, _format_indices, layout_from_sizes, parse_layout, validate_layout  # noqa: F401
from loopfit.loading import load_config, load_model, load_tokenizer, resolve_model_path
from loopfit.models import LoopedConfig, LoopedForCausalLM
from loopfit.models.families import FAMILIES, family_of
from loopfit.publish import set_default_depth, write_model_card, write_remote_code


def _check_architecture(config) -> None:
    if config.model_type == "looped":
        raise LoopfitError("the source model is already a looped model")
    if config.model_type not in FAMILIES:
        raise LoopfitError(
            f"architecture '{config.model_type}' is not supported; supported: {', '.join(FAMILIES)} "
            "(a Llama-shaped family is one entry in loopfit/models/families.py)"
        )


def to_looped(
    source: PreTrainedModel,
    layout: Layout,
    adapter_init: str = "identity",
    state_init: str = "normal",
    mean_recurrence: int = 4,
    untie_embeddings: bool = False,
    **config_kwargs,
) -> LoopedForCausalLM:
    """Build a `LoopedForCausalLM` whose layers are copies of `source`'s layers named in `layout`."""
    base = copy.deepcopy(source.config)
    _check_architecture(base)
    validate_layout(layout, base.num_hidden_layers)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(base, attr):
            delattr(base, attr)
    tie = bool(getattr(source.config, "tie_word_embeddings", False)) and not untie_embeddings
    base.tie_word_embeddings = tie
    config = LoopedConfig(
        base_config=base,
        prelude_layers=layout.prelude,
        block_layers=layout.block,
        coda_layers=layout.coda,
        mean_recurrence=mean_recurrence,
        adapter_init=adapter_init,
        state_init=state_init,
        tie_word_embeddings=tie,
        **config_kwargs,
    )
    config._attn_implementation = source.config._attn_implementation
    dtype = source.dtype
    model = LoopedForCausalLM(config).to(dtype)
    family = family_of(base)
    state = {"model.embed_tokens.weight": family.embedding(source).weight}
    state |= {f"model.norm.{k}": v for k, v in family.final_norm(source).state_dict().items()}
    for part, indices in (("prelude", layout.prelude), ("block", layout.block), ("coda", layout.coda)):
        for j, i in enumerate(indices):
            for k, v in family.layers(source)[i].state_dict().items():
                state[f"model.{part}.{j}.{k}"] = v
    state["lm_head.weight"] = source.get_output_embeddings().weight
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("model.adapter.") and "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
    if tie:
        model.tie_weights()
    model.generation_config = copy.deepcopy(source.generation_config)
    set_default_depth(model)
    return model


def to_static(source: PreTrainedModel, layout: Layout) -> PreTrainedModel:
    """A plain HF model of the same architecture keeping only the layout's layers, in order (the no-loop baseline)."""
    _check_architecture(source.config)
    validate_layout(layout, source.config.num_hidden_layers)
    model = copy.deepcopy(source)
    family = family_of(model.config)
    dec = family.decoder(model)
    layers = torch.nn.ModuleList(family.layers(model)[i] for i in layout.kept)
    setattr(dec, family.layers_attr, layers)
    for j, layer in enumerate(layers):
        for attn in layer.modules():  # the attention module keeps its layer index for the KV cache
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = j
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layout.kept]
    cfg.num_hidden_layers = len(layout.kept)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return model


def convert_command(
    model: str,
    out: str | None = None,
    layers: str | None = None,
    prelude: int | None = None,
    block: int | None = None,
    coda: int | None = None,
    adapter_init: str = "identity",
    state_init: str = "normal",
    mean_recurrence: int = 4,
    cache_mode: str = "full",
    untie_embeddings: bool = False,
    static: bool = False,
    analysis_data: str | None = None,
    analysis_samples: int = 64,
    target_recurrent_size: int | None = None,
    overwrite: bool = False,
    remote_code: bool = False,
) -> None:
    """Convert a feedforward HF causal LM into a looped model (prelude -> block x R -> coda).

    Args:
        model: source model: HF folder, hub id, .gguf file or `smollm2-135m`.
        out: output folder (an HF model folder: config, safetensors, tokenizer, generation config).
        layers: `prelude:block:coda` source-layer lists such as `0-3:10-15:26-29`, or `auto` (layer analysis).
        prelude: with --block/--coda: the first `prelude` layers form the prelude (the paper's a-b-c naming).
        block: the `block` layers just before the coda form the recurrent block.
        coda: the last `coda` layers form the coda.
        adapter_init: `identity` ([0 | I]: reproduces the pruned model at any depth), `random` or `average`.
        state_init: initial recurrent state: `normal`, `zeros` or `embed`.
        mean_recurrence: default number of loop iterations when none is given.
        cache_mode: KV cache: `full` (exact, memory linear in depth) or `compress` (constant memory).
        untie_embeddings: give the LM head its own copy of a tied embedding matrix.
        static: write the kept layers as a plain, non-looped model of the source architecture instead.
        analysis_data: calibration data for `--layers auto` (default: built-in data).
        analysis_samples: number of calibration samples for `--layers auto`.
        target_recurrent_size: for `--layers auto`, drop the lowest-influence thinking layers down to this size.
        overwrite: replace `out` if it exists.
        remote_code: also write the looped model's code and `auto_map` into `out`, so that people without loopfit
            load it with `trust_remote_code=True` (a static model needs none).
    """

    if out is None:
        raise LoopfitError("--out is required")
    check_output("out", out, folder=True)
    if (layers is None) == (block is None):
        raise LoopfitError("give either --layers or --prelude/--block/--coda")
    for name, value, allowed in (
        ("adapter_init", adapter_init, ("identity", "random", "average")),
        ("state_init", state_init, ("normal", "zeros", "embed")),
        ("cache_mode", cache_mode, ("full", "compress")),
    ):
        if value not in allowed:
            raise LoopfitError(f"--{name} must be one of {', '.join(allowed)}, got '{value}'")
    if mean_recurrence < 1:
        raise LoopfitError(f"--mean_recurrence must be >= 1, got {mean_recurrence}")
    if os.path.exists(out) and not overwrite:
        raise LoopfitError(f"output folder {out} already exists (pass --overwrite=true to replace it)")
    if layers == "auto" and analysis_samples < 1:
        raise LoopfitError(f"--analysis_samples must be >= 1, got {analysis_samples}")
    if target_recurrent_size is not None and target_recurrent_size < 1:
        raise LoopfitError(f"--target_recurrent_size must be >= 1, got {target_recurrent_size}")
    if layers == "auto":
        read_documents(analysis_data)  # a missing or unknown calibration source fails now, not after the load
    path = resolve_model_path(model)
    config = load_config(path)
    _check_architecture(config)
    n = config.num_hidden_layers
    if layers != "auto":  # validate before the (slow) weight load
        layout = parse_layout(layers, n) if layers is not None else layout_from_sizes(n, prelude or 0, block, coda or 0)
    tokenizer = load_tokenizer(path)  # also before the weights: the output needs it
    source = load_model(path)
    if layers == "auto":
        layers = suggest_layout(
            source,
            tokenizer,
            data=analysis_data,
            num_samples=analysis_samples,
            target_recurrent_size=target_recurrent_size,
        )
        print(f"layer analysis suggests --layers {layers}")
        layout = parse_layout(layers, n)
    if static:
        result = to_static(source, layout)
    else:
        result = to_looped(
            source,
            layout,
            adapter_init=adapter_init,
            state_init=state_init,
            mean_recurrence=mean_recurrence,
            untie_embeddings=untie_embeddings,
            cache_mode=cache_mode,
        )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if remote_code and not static:
            write_remote_code(tmp, result)
        result.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, result, source=model, remote_code=remote_code and not static)
    kind = "static" if static else f"looped (R defaults to {mean_recurrence})"
    print(
        f"wrote {kind} model to {out}: layers {layout} of {n}; dropped {_format_indices(layout.dropped(n)) or 'none'}"
    )
