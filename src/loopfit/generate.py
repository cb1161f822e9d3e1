"""Text generation at any depth, with an optional chat template."""

from __future__ import annotations

import contextlib
import sys

import torch

from loopfit.adaptive import ExitConfig, adaptive_generation_lines
from loopfit.data.chat import format_prompt  # noqa: F401  (re-exported)
from loopfit.errors import LoopfitError, check_count, check_number
from loopfit.loading import load_config, load_model, load_tokenizer, resolve_device
from loopfit.models.compiled import compile_loop, generation_kwargs
from loopfit.models.depth import generation_depth
from loopfit.models.families import family_of
from loopfit.models.graphed import GraphCaptureError, GraphedDecoder, graph_unsupported
from loopfit.models.prepacked import prepacked_linears

_GRAPH_BUCKET = 128  # cache lengths of CUDA-graph decoders round up to this: one graph serves nearby prompt lengths
# Generation-config settings that add a logits processor to `generate` (value: the settings that add none). The
# CUDA-graph decoder applies none of them, so a model that sets one is refused rather than decoded differently.
_PROCESSORS = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
}
# Sampling alone (`generate_text` passes top_k = top_p = None, which overrides the config's, on both paths).
_SAMPLING_PROCESSORS = {"min_p": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
                        "eta_cutoff": (None, 0.0)}  # fmt: skip


@torch.inference_mode()
def generate_text(
    model,
    tokenizer,
    prompts: list[str],
    num_steps=None,
    max_new_tokens: int = 64,
    chat: bool = False,
    system: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    use_cache: bool = True,
    graphs: dict | None = None,
) -> list[str]:
    """Greedy (or sampled) continuations of `prompts`, left-padded into one batch, on the model's device.

    `graphs`: decode a looped model at fixed depth through CUDA graphs (`loopfit.models.graphed`), keeping the
    decoders in this dict (keyed by batch size, cache length and depth) so that later calls replay their graphs.
    """
    if max_new_tokens < 1 or (do_sample and not temperature > 0):
        raise LoopfitError(f"need max_new_tokens >= 1 and, when sampling, temperature > 0 (got {max_new_tokens}, "
                           f"{temperature})")  # fmt: skip
    texts = [format_prompt(tokenizer, p, chat, system) for p in prompts]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(model.device)
    if graphs is not None:
        out = _graphed_generate(model, graphs, enc, num_steps, max_new_tokens, do_sample, temperature,
                                tokenizer.pad_token_id)  # fmt: skip
        return tokenizer.batch_decode(out, skip_special_tokens=True)
    kwargs = {"num_steps": num_steps} if num_steps is not None and model.config.model_type == "looped" else {}
    if use_cache:
        kwargs.update(generation_kwargs(model))  # a compiled plain model: a cache whose write is a graph break
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=use_cache,
        **kwargs,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def graph_blockers(generation_config, do_sample: bool) -> list[str]:
    """The `name=value` settings of `generation_config` that `generate` would apply and CUDA-graph decoding does not."""
    table = {**_PROCESSORS, **(_SAMPLING_PROCESSORS if do_sample else {})}
    return [f"{k}={getattr(generation_config, k)!r}" for k, ok in table.items()
            if getattr(generation_config, k, None) not in ok]  # fmt: skip


def _graphed_generate(model, graphs: dict, enc, num_steps, max_new_tokens, do_sample, temperature, pad_token_id):
    depth = num_steps if num_steps is not None else generation_depth(model)
    b, n = enc["input_ids"].shape
    max_len = -(-(n + max_new_tokens) // _GRAPH_BUCKET) * _GRAPH_BUCKET
    key = (b, max_len, depth)
    if key not in graphs:
        graphs[key] = GraphedDecoder(model, b, max_len, depth)
    eos = model.generation_config.eos_token_id
    try:
        return graphs[key].generate(enc["input_ids"], enc["attention_mask"], max_new_tokens, do_sample, temperature,
                                    eos_token_id=eos, pad_token_id=pad_token_id)  # fmt: skip
    except GraphCaptureError as e:
        raise LoopfitError(f"--cuda_graphs: {e}; decode without --cuda_graphs") from e


def generate_command(
    model: str,
    prompt: list[str] | str = "What is 12*7?",
    num_steps: int | None = None,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    cache_mode: str | None = None,
    seed: int = 0,
    exit_criterion: str = "none",
    exit_threshold: float | None = None,
    min_num_steps: int = 1,
    check_every: int = 1,
    compile: bool = False,
    prepack: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    cuda_graphs: bool = False,
) -> None:
    """Generate text from a (looped or plain) model at a chosen depth.

    Args:
        model: model folder, hub id, .gguf file or `smollm2-135m`.
        prompt: one prompt, or several (`--prompt a --prompt b`).
        num_steps: loop iterations R (looped models; default: the generation config's `num_steps`, else the model's
            mean_recurrence).
        chat: wrap the prompt in the tokenizer's chat template.
        system: optional system prompt (with --chat=true).
        max_new_tokens: tokens to generate.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        cache_mode: override the KV cache mode of a looped model: `full` or `compress`.
        seed: random seed (sampling, state noise in training mode).
        exit_criterion: adaptive exit per token: `kl`, `state`, `argmax`, `gate` (the model's learned exit gate) or
            `none` (fixed depth; see loopfit.adaptive).
        exit_threshold: exit threshold (default kl 1e-3, state 0.03, argmax 5 stable checks, gate 0.5: the gate's
            cumulative exit probability, in [0, 1]).
        min_num_steps: adaptive exit: never stop before this many iterations.
        check_every: adaptive exit: check the criterion every this many iterations.
        compile: `torch.compile` the decoder layers (`loopfit.models.compiled`; a looped model's prelude, block
            and coda, or a plain model's layers where loopfit has a spec for its family): in fp32 the same tokens as
            eager (in bf16 inductor's fused rounding can flip a near tie), the first tokens pay the compilation;
            without a working compiler it warns and runs eager. On CPU it decodes no faster than eager (SmolLM2,
            2-core AMX Xeon: 0.88-0.95x, `benchmarks/compiled_generation.py`): the per-token graph calls and the
            cache write's graph break outweigh the fused elementwise work; it is for GPUs and training.
        prepack: on CPU in fp32, decode through weights reordered once into oneDNN's layout for the batch
            (`loopfit.models.prepacked`): ~1.5x faster at batch 4 on a 2-core AVX2 CPU, 1.16-1.2x at batch 8 and
            0.74-0.79x at batch 1 on a 2-core AMX Xeon (`benchmarks/compiled_generation.py`), the same model up to float
            rounding (a token can differ where two nearly tie), one packed copy of the weights in memory. Not with
            --compile; without oneDNN in the PyTorch build it packs nothing and says so.
        batch_size: prompts decoded together (left-padded), at fixed depth or with adaptive exit (each row of the
            batch then stops iterating at its own exit); default: all prompts in one batch.
        device: `auto` (a CUDA GPU if one is visible, else the CPU), `cpu`, `cuda` or `cuda:N`.
        precision: weights and activations in `fp32` or `bf16`.
        cuda_graphs: with a CUDA device, decode at fixed depth with each one-token step replayed from a CUDA graph
            on a static KV cache (`loopfit.models.graphed`): the tokens of eager decoding without the launch cost of
            a step's hundreds of small kernels. Looped models with sdpa or eager attention; not with an exit
            criterion, --compile or --prepack. The first decoding step of each batch shape captures the graph.
    """

    check_count("num_steps", num_steps)
    check_count("max_new_tokens", max_new_tokens)
    check_count("min_num_steps", min_num_steps)
    check_count("check_every", check_every)
    check_count("batch_size", batch_size)
    # Checked whether or not sampling is on: a temperature of 0 or below is never meaningful, and greedy decoding,
    # the usual intent behind "temperature 0", is --do_sample=false.
    check_number("temperature", temperature, low=0, low_open=True)
    check_number("exit_threshold", exit_threshold, low=0)
    if cache_mode is not None and cache_mode not in ("full", "compress"):
        raise LoopfitError(f"--cache_mode takes `full` or `compress`, got '{cache_mode}'")
    if prepack and compile:
        raise LoopfitError("--prepack and --compile: choose one (the compiled layers would not see the packed weights)")
    if precision not in ("fp32", "bf16"):
        raise LoopfitError(f"--precision takes `fp32` or `bf16`, got '{precision}'")
    if cuda_graphs and (exit_criterion != "none" or compile or prepack):
        raise LoopfitError("--cuda_graphs decodes at a fixed depth on its own: not with --exit_criterion, --compile "
                           "or --prepack")  # fmt: skip
    dev = resolve_device(device)
    if cuda_graphs and dev.type != "cuda":
        raise LoopfitError("--cuda_graphs=true needs --device cuda: CUDA graphs replay GPU kernels")
    if cuda_graphs and load_config(model).model_type != "looped":  # before the weights load
        raise LoopfitError(f"--cuda_graphs: {model} is a plain model; CUDA-graph decoding runs a looped model's loop")
    if compile:  # before the weights load: a family without a spec has no decoder layers to compile
        _check_compilable(model)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    exit = None
    if exit_criterion != "none":
        exit = ExitConfig(exit_criterion, exit_threshold, min_num_steps, check_every, num_steps)
    torch.manual_seed(seed)
    tok = load_tokenizer(model)  # before the weights: a missing tokenizer or an empty prompt fails fast
    check_prompts(tok, prompts, chat, system)
    lm = load_model(model, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval().to(dev)
    if cache_mode is not None:
        if lm.config.model_type != "looped":
            raise LoopfitError(f"--cache_mode applies to looped models only; {model} is a plain model")
        lm.config.cache_mode = cache_mode
    if compile:
        compile_loop(lm)
    graphs = None
    if cuda_graphs:
        why = graph_unsupported(lm, dev)
        if why:
            raise LoopfitError(f"--cuda_graphs: {why}")
        blockers = graph_blockers(lm.generation_config, do_sample)
        if blockers:
            raise LoopfitError(f"--cuda_graphs: the model's generation config sets {', '.join(blockers)}, which "
                               "CUDA-graph decoding does not apply: decode without --cuda_graphs")  # fmt: skip
        graphs = {}
    depth = num_steps if num_steps is not None else generation_depth(lm)
    label = f"[R={depth}] " if lm.config.model_type == "looped" else ""
    size = batch_size or len(prompts)
    with contextlib.ExitStack() as stack:
        if prepack and not stack.enter_context(prepacked_linears(lm, size)):
            print("loopfit: warning: --prepack: nothing to pack (it needs fp32 linear layers on CPU and a PyTorch "
                  "build with oneDNN); decoding as usual", file=sys.stderr)  # fmt: skip
        for i in range(0, len(prompts), size):
            chunk = prompts[i : i + size]
            if exit is not None:
                lines = adaptive_generation_lines(
                    lm, tok, chunk, exit, max_new_tokens, chat, system, do_sample, temperature
                )
            else:
                texts = generate_text(lm, tok, chunk, num_steps, max_new_tokens, chat, system, do_sample, temperature,
                                      graphs=graphs)  # fmt: skip
                lines = [f"{label}{p!r} -> {text.strip()!r}" for p, text in zip(chunk, texts)]
            print("\n".join(lines))


def _check_compilable(model: str) -> None:
    """Refuse `--compile` for a plain model of a family loopfit has no spec for (its decoder layers are unknown)."""
    config = load_config(model)
    if config.model_type == "looped":
        return
    try:
        family_of(config)
    except ValueError as e:
        raise LoopfitError(f"--compile: {model} is a plain model of a family loopfit has no spec for ({e}): no "
                           "decoder layers to compile") from None  # fmt: skip


def check_prompts(tokenizer, prompts: list[str], chat: bool, system: str | None = None) -> None:
    """Refuse a prompt that tokenizes to nothing: a model cannot continue an empty sequence."""
    if not prompts:
        raise LoopfitError("--prompt is empty: give at least one prompt")
    for i, p in enumerate(prompts, 1):
        text = format_prompt(tokenizer, p, chat, system)
        if not tokenizer(text, add_special_tokens=not chat)["input_ids"]:
            which = f"prompt {i} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
            raise LoopfitError(f"--prompt: {which} is empty: give some text to continue (or --chat=true)")
