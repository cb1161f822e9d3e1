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
from loopfit.models.relaxed import ALIGNS, RANK_FULL, check_groups_match, check_relaxable, relaxation_groups
from loopfit.publish import set_default_depth, write_model_card, write_remote_code


def _check_architecture(config) -> None:
    if config.model_type == "looped":
        raise LoopfitError("the source model is already a looped model")
    if config.model_type not in FAMILIES:
        raise LoopfitError(
            f"architecture '{config.model_type}' is not supported; supported: {', '.join(FAMILIES)} "
            "(a Llama-shaped family is one entry in loopfit/models/families.py)"
        )


RELAXATION_INITS = ("svd", "zeros")
MAX_RELAXATION_ITERATIONS = 1024  # each delta is a full set of block-sized low-rank factors; more is a typo


def parse_relaxation(
    rank: str | int | None,
    block_init: str,
    align: str,
    relaxation_init: str = "svd",
    relaxation_iterations: int | None = None,
) -> tuple[int | str | None, str | int]:
    """`(rank, block_init)` from the command-line spellings: rank an int >= 0, `full` or None (not relaxed);
    block init `layers`, `average` or a group number; `relaxation_init` `svd` (from the source's groups) or `zeros`
    (depth-wise LoRA from zero, which needs `relaxation_iterations` >= 1 and takes no block init or alignment).
    Raises `LoopfitError` naming the flag."""
    if rank is not None and str(rank) != RANK_FULL:
        try:
            rank = int(rank)
        except ValueError:
            raise LoopfitError(f"--relaxation_rank must be an integer >= 0 or 'full', got '{rank}'") from None
        if rank < 0:
            raise LoopfitError(f"--relaxation_rank must be an integer >= 0 or 'full', got {rank}")
    if align not in ALIGNS:
        raise LoopfitError(f"--relaxation_align must be one of {', '.join(ALIGNS)}, got '{align}'")
    if relaxation_init not in RELAXATION_INITS:
        raise LoopfitError(f"--relaxation_init must be one of {', '.join(RELAXATION_INITS)}, got '{relaxation_init}'")
    block_init = str(block_init)
    if block_init not in ("layers", "average"):
        if not block_init.isdigit():
            raise LoopfitError(f"--block_init must be layers, average or a group number, got '{block_init}'")
        block_init = int(block_init)
    if rank is None and (block_init != "layers" or align != "end" or relaxation_init != "svd"):
        raise LoopfitError("--block_init, --relaxation_align and --relaxation_init need --relaxation_rank")
    if relaxation_init == "zeros":
        if rank == 0:
            raise LoopfitError("--relaxation_init zeros needs --relaxation_rank >= 1 or full (0 is the plain loop)")
        if relaxation_iterations is None or not 1 <= relaxation_iterations <= MAX_RELAXATION_ITERATIONS:
            got = "none" if relaxation_iterations is None else relaxation_iterations
            raise LoopfitError(
                f"--relaxation_init zeros needs --relaxation_iterations L in 1-{MAX_RELAXATION_ITERATIONS} "
                f"(the number of deltas), got {got}"
            )
        if block_init != "layers" or align != "end":
            raise LoopfitError("--block_init and --relaxation_align map groups of source layers; zeros has none")
    elif relaxation_iterations is not None:
        raise LoopfitError("--relaxation_iterations is for --relaxation_init zeros (svd has one delta per group)")
    return rank, block_init


def _check_state_passing(adapter_init: str | None, state_init: str | None) -> None:
    """A relaxed loop computes `s_{i+1} = block_i(s_i)` from `s_0` = prelude output: adapter `state`, state `embed`."""
    if (adapter_init or "state", state_init or "embed") != ("state", "embed"):
        raise LoopfitError("--relaxation_rank passes the state on: it needs --adapter_init state --state_init embed")


def _unrelaxable(base_config, index: int) -> str | None:
    """Why source layer `index` cannot take per-iteration deltas (a mixture of experts' stacked weights), or None;
    built on the meta device, so only names and shapes are read."""
    try:
        with torch.device("meta"):
            check_relaxable(family_of(base_config).decoder_layer(base_config, index))
    except ValueError as e:
        return str(e)
    return None


def check_block_relaxable(layout: Layout | None, base_config) -> None:
    """Raise `LoopfitError` if a block layer cannot take per-iteration deltas. With `layout` None (`--layers auto`,
    before the analysis picks the block) raise only if no layer of the model can."""
    if layout is None:
        reasons = [_unrelaxable(base_config, i) for i in range(base_config.num_hidden_layers)]
        if all(reasons):
            raise LoopfitError(f"--relaxation_rank: no layer of this model can take per-iteration deltas: {reasons[0]}")
        return
    for i in layout.block:
        if reason := _unrelaxable(base_config, i):
            raise LoopfitError(
                f"--relaxation_rank: the block's layers cannot take per-iteration deltas (layer {i}): {reason}"
            )


def relaxation_plan(layout: Layout, base_config, align: str = "end", block_init: str | int = "layers") -> list:
    """The groups of source layers the loop iterations stand for (models/relaxed.py: `relaxation_groups`), checked
    against the block and `block_init`. Raises `LoopfitError`."""
    try:
        groups, _ = relaxation_groups(layout.prelude, layout.block, layout.coda, base_config.num_hidden_layers, align)
        check_groups_match(base_config, layout.block, groups)
    except ValueError as e:
        raise LoopfitError(str(e)) from None
    check_block_relaxable(layout, base_config)
    if isinstance(block_init, int) and not block_init < len(groups):
        raise LoopfitError(f"--block_init {block_init}: there are {len(groups)} groups (0-{len(groups) - 1})")
    return groups


def _block_state(source, family, layout: Layout, groups: list, block_init: str | int) -> dict:
    """The shared block's weights: the block's own source layers, one group's, or the groups' average."""
    layers = family.layers(source)
    if block_init == "average":
        out = {}
        for j in range(len(layout.block)):
            states = [layers[g[j]].state_dict() for g in groups]
            for k, v in states[0].items():
                out[f"model.block.{j}.{k}"] = torch.stack([st[k].float() for st in states]).mean(0).to(v.dtype)
        return out
    indices = layout.block if block_init == "layers" else groups[block_init]
    return {f"model.block.{j}.{k}": v for j, i in enumerate(indices) for k, v in layers[i].state_dict().items()}


def to_looped(
    source: PreTrainedModel,
    layout: Layout,
    adapter_init: str | None = None,
    state_init: str | None = None,
    mean_recurrence: int | None = None,
    untie_embeddings: bool = False,
    relaxation_rank: int | str | None = None,
    block_init: str | int = "layers",
    relaxation_align: str = "end",
    relaxation_init: str = "svd",
    relaxation_iterations: int | None = None,
    seed: int = 0,
    **config_kwargs,
) -> LoopedForCausalLM:
    """Build a `LoopedForCausalLM` whose layers are copies of `source`'s layers named in `layout`.

    Defaults: adapter `identity`, state `normal`, R = 4. With `relaxation_rank` (an int >= 0 or `full`) the loop
    becomes a relaxed recursion (models/relaxed.py): iteration i stands for group i of the middle layers, the state
    is passed through (adapter `state` `[I | 0]`, state `embed`: `s_{i+1} = block_i(s_i)`, `s_0` = prelude output),
    the block is initialised from `block_init` (`layers`: the block's own source layers; `average`: the groups'
    average; an int: that group), each iteration gets a rank-r SVD delta on every linear layer and its own norm
    vectors (none at rank 0), and R defaults to L. With `relaxation_init="zeros"` it is depth-wise LoRA from zero
    instead: `relaxation_iterations` deltas that start at zero on the loop as its adapter and state inits make it, no
    groups, no state passing forced. `seed` draws the `random` adapter and the zero start's `down` rows (on the CPU,
    so the same model on any run and device). Raises `LoopfitError` for a layout or option that cannot work.
    """
    base = copy.deepcopy(source.config)
    _check_architecture(base)
    validate_layout(layout, base.num_hidden_layers)
    groups = None
    if relaxation_rank is not None:  # the flags' one check, also for callers that skip the command line
        relaxation_rank, block_init = parse_relaxation(
            relaxation_rank, block_init, relaxation_align, relaxation_init, relaxation_iterations
        )
    if relaxation_rank is not None and relaxation_init == "zeros":
        check_block_relaxable(layout, base)
        config_kwargs |= dict(
            relaxation_rank=relaxation_rank, relaxation_iterations=relaxation_iterations, relaxation_block_init="zeros"
        )
    elif relaxation_rank is not None:
        groups = relaxation_plan(layout, base, relaxation_align, block_init)
        _check_state_passing(adapter_init, state_init)
        adapter_init, state_init = "state", "embed"
        config_kwargs |= dict(
            relaxation_rank=relaxation_rank, relaxation_groups=groups, relaxation_block_init=str(block_init)
        )
        mean_recurrence = mean_recurrence or len(groups)
    adapter_init, state_init, mean_recurrence = adapter_init or "identity", state_init or "normal", mean_recurrence or 4
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
        seed=seed,
        **config_kwargs,
    )
    config._attn_implementation = source.config._attn_implementation
    dtype = source.dtype
    model = LoopedForCausalLM(config).to(dtype)
    family = family_of(base)
    state = {"model.embed_tokens.weight": family.embedding(source).weight}
    state |= {f"model.norm.{k}": v for k, v in family.final_norm(source).state_dict().items()}
    for part, indices in (("prelude", layout.prelude), ("coda", layout.coda)):
        for j, i in enumerate(indices):
            for k, v in family.layers(source)[i].state_dict().items():
                state[f"model.{part}.{j}.{k}"] = v
    state |= _block_state(source, family, layout, groups or [], "layers" if groups is None else block_init)
    state["lm_head.weight"] = source.get_output_embeddings().weight
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [
        k for k in missing if not k.startswith(("model.adapter.", "model.relaxation.")) and "rotary_emb" not in k
    ]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
    if model.model.relaxation is not None and relaxation_init == "zeros":
        model.model.relaxation.init_zeros(model.model.block, torch.Generator().manual_seed(seed))
    elif model.model.relaxation is not None:
        src_layers = family.layers(source)
        model.model.relaxation.init_from(model.model.block, [[src_layers[i] for i in g] for g in groups])
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
    adapter_init: str | None = None,
    state_init: str | None = None,
    mean_recurrence: int | None = None,
    cache_mode: str = "full",
    untie_embeddings: bool = False,
    relaxation_rank: str | None = None,
    block_init: str = "layers",
    relaxation_align: str = "end",
    relaxation_init: str = "svd",
    relaxation_iterations: int | None = None,
    seed: int = 0,
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
        adapter_init: `identity` ([0 | I]: reproduces the pruned model at any depth; the default), `random`,
            `average` or `state` ([I | 0]: the block sees only the state; the default with --relaxation_rank and
            --relaxation_init svd).
        state_init: initial recurrent state: `normal` (the default), `zeros` or `embed` (the prelude output; the
            default with --relaxation_rank and --relaxation_init svd).
        mean_recurrence: default number of loop iterations when none is given (default 4; L with
            --relaxation_rank and --relaxation_init svd).
        cache_mode: KV cache: `full` (exact, memory linear in depth) or `compress` (constant memory).
        untie_embeddings: give the LM head its own copy of a tied embedding matrix.
        relaxation_rank: start from the teacher (Relaxed Recursive Transformers, arXiv:2410.20672): iteration i
            stands for group i of the middle layers (between prelude and coda, cut into groups as long as the
            block), the state is passed on (s_{i+1} = block_i(s_i), s_0 = prelude output) and every block linear
            layer gets a per-iteration delta of this rank, initialised from the truncated SVD of (group layer -
            block layer), plus per-iteration norm vectors: an integer, `full` (exact: at R = L the source without
            the uncovered layers) or 0 (no deltas: one shared block). Iterations beyond L reuse the last delta.
            With --relaxation_init zeros: the rank of depth-wise LoRA from zero instead (see there).
        block_init: the shared block's weights with --relaxation_rank: `layers` (the block's own layers from
            --layers / --block), `average` (the groups' average) or a group number 0..L-1.
        relaxation_align: with --relaxation_rank: `end` (groups end at the coda; the middle layers that fit no
            group, just after the prelude, are dropped) or `start` (groups start after the prelude; those just
            before the coda are dropped).
        relaxation_init: with --relaxation_rank: `svd` (the teacher start above) or `zeros` (depth-wise LoRA from
            zero: --relaxation_iterations deltas of that rank, one per iteration, started at zero, so the model
            starts as the plain loop of the --adapter_init / --state_init given, whose defaults then stay
            `identity` / `normal`; no groups, no state passing; --block_init and --relaxation_align are refused).
        relaxation_iterations: L with --relaxation_init zeros, 1-1024: the number of per-iteration deltas
            (iterations from L on reuse the last one).
        seed: seed of the conversion's random draws (the `random` adapter, depth-wise LoRA's `down` rows; the same
            model on every run and device) and of the `normal` state initialisation in eval mode.
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
        ("adapter_init", adapter_init, ("identity", "random", "average", "state")),
        ("state_init", state_init, ("normal", "zeros", "embed")),
        ("cache_mode", cache_mode, ("full", "compress")),
    ):
        if value is not None and value not in allowed:
            raise LoopfitError(f"--{name} must be one of {', '.join(allowed)}, got '{value}'")
    if mean_recurrence is not None and mean_recurrence < 1:
        raise LoopfitError(f"--mean_recurrence must be >= 1, got {mean_recurrence}")
    relaxation_rank, block_init = parse_relaxation(
        relaxation_rank, block_init, relaxation_align, relaxation_init, relaxation_iterations
    )
    from_source = relaxation_rank is not None and relaxation_init == "svd"  # groups of source layers, state passed
    if relaxation_rank is not None and static:
        raise LoopfitError("--relaxation_rank needs a looped model (not --static)")
    if from_source and layers == "auto":
        raise LoopfitError("--relaxation_init svd maps source groups: it needs an explicit layout (not --layers auto)")
    if from_source:
        _check_state_passing(adapter_init, state_init)
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
        if from_source:
            relaxation_plan(layout, config, relaxation_align, block_init)
        elif relaxation_rank is not None:
            check_block_relaxable(layout, config)
    elif relaxation_rank is not None:  # the analysis picks the block later; refuse now if no block could work
        check_block_relaxable(None, config)
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
            relaxation_rank=relaxation_rank,
            block_init=block_init,
            relaxation_align=relaxation_align,
            relaxation_init=relaxation_init,
            relaxation_iterations=relaxation_iterations,
            seed=seed,
        )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if remote_code and not static:
            write_remote_code(tmp, result)
        result.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, result, source=model, remote_code=remote_code and not static)
    kind = "static" if static else f"looped (R defaults to {result.config.mean_recurrence})"
    print(
        f"wrote {kind} model to {out}: layers {layout} of {n}; dropped {_format_indices(layout.dropped(n)) or 'none'}"
    )
    if relaxation_rank is not None and not from_source:
        print(
            f"depth-wise LoRA (rank {relaxation_rank}) from zero: {relaxation_iterations} per-iteration deltas "
            f"(iterations from {relaxation_iterations} on reuse the last); the model starts as the plain loop"
        )
    elif relaxation_rank is not None:
        groups = result.config.relaxation_groups
        covered = set(layout.prelude + layout.coda + sum(groups, []))
        print(
            f"relaxed (rank {relaxation_rank}, block {block_init}): iterations 0-{len(groups) - 1} stand for "
            f"{'; '.join(_format_indices(g) for g in groups)}; at R = {len(groups)} the source without "
            f"{_format_indices([i for i in range(n) if i not in covered]) or 'no layer'}"
        )
