"""Decoding speed with `--compile` (and, in fp32, `--prepack`) against eager, for a plain and a looped SmolLM2.

    python -m benchmarks.compiled_generation [--model smollm2-135m] [--layout 4-6-4] [--num_steps 4]
        [--precisions fp32,bf16] [--batch_sizes 1,8] [--new_tokens 64] [--rounds 3]

What `loopfit generate --compile=true` / `--prepack=true` buy on this machine: greedy decoding of `new_tokens` tokens
(EOS suppressed) after a chat prompt, batch `b` copies of it, through HF `generate` with the arguments
`loopfit.generate.generate_text` passes (`loopfit.models.compiled.generation_kwargs`). The modes run in turn within
each round, in one process (`compile_loop` / `uncompile_loop` switch the layers), and each row reports the best round.
The compiled mode's first call pays the compilation (`first_call_s`). `same_tokens`: the generated ids equal eager's
(fp32 should; bf16 may flip near ties). Writes benchmarks/results/compiled_generation.json (or `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.common import report
from loopfit.convert import layout_from_sizes, to_looped
from loopfit.loading import load_model, load_tokenizer
from loopfit.models.compiled import compile_loop, generation_kwargs, uncompile_loop
from loopfit.models.prepacked import prepacked_linears


def _generate(model, ids: torch.Tensor, new_tokens: int, num_steps: int | None) -> tuple[torch.Tensor, float]:
    kwargs = {"num_steps": num_steps} if model.config.model_type == "looped" else {}
    kwargs.update(generation_kwargs(model))
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=0,
            **kwargs,
        )
        return out[:, ids.shape[1] :], time.perf_counter() - t


def _modes(precision: str) -> list[str]:
    return ["eager", "compile", "prepack"] if precision == "fp32" else ["eager", "compile"]


def bench(model, ids: torch.Tensor, modes: list[str], new_tokens: int, num_steps: int | None, rounds: int) -> dict:
    """`{mode: {"best_s", "first_call_s", "tokens"}}` for one model, precision and batch size."""
    res = {m: {"best_s": float("inf"), "first_call_s": None, "tokens": None} for m in modes}
    for _ in range(rounds):
        for mode in modes:
            if mode == "compile":
                compile_loop(model)
            with contextlib.ExitStack() as stack:
                if mode == "prepack":
                    stack.enter_context(prepacked_linears(model, ids.shape[0]))
                if res[mode]["first_call_s"] is None:  # warm-up: compilation, oneDNN's first-call setup, caches
                    res[mode]["tokens"], res[mode]["first_call_s"] = _generate(model, ids, new_tokens, num_steps)
                _, dt = _generate(model, ids, new_tokens, num_steps)
            res[mode]["best_s"] = min(res[mode]["best_s"], dt)
            if mode == "compile":
                uncompile_loop(model)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layout", default="4-6-4", help="P-B-C of the looped model built from --model")
    ap.add_argument("--num_steps", type=int, default=4, help="the looped model's depth R")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        p, b, c = map(int, args.layout.split("-"))
    except ValueError:
        raise SystemExit(f"loopfit: error: --batch_sizes {args.batch_sizes} / --layout {args.layout}: not "
                         "integers as 1,8 / P-B-C") from None  # fmt: skip
    if not set(precisions) <= {"fp32", "bf16"}:
        raise SystemExit(f"loopfit: error: --precisions {args.precisions}: takes fp32 and/or bf16")
    if min(batch_sizes + [args.new_tokens, args.rounds, args.num_steps]) < 1:
        raise SystemExit("loopfit: error: batch sizes, --new_tokens, --rounds and --num_steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Explain why the sky is blue."}], tokenize=False, add_generation_prompt=True
    )
    prompt = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        plain = load_model(args.model, dtype=dtype).eval()
        plain.generation_config.eos_token_id = None  # every call decodes exactly new_tokens tokens
        looped = to_looped(
            load_model(args.model, dtype=dtype), layout_from_sizes(plain.config.num_hidden_layers, p, b, c)
        ).eval()
        looped.generation_config.eos_token_id = None
        for name, model, depth in (("plain", plain, None), (f"looped {args.layout} R={args.num_steps}", looped,
                                                              args.num_steps)):  # fmt: skip
            for bs in batch_sizes:
                ids = prompt.expand(bs, -1).contiguous()
                res = bench(model, ids, _modes(precision), args.new_tokens, depth, args.rounds)
                eager = res["eager"]
                for mode, r in res.items():
                    rows.append({
                        "model": name, "precision": precision, "batch": bs, "mode": mode,
                        "tokens_per_s": bs * args.new_tokens / r["best_s"], "seconds": r["best_s"],
                        "vs_eager": eager["best_s"] / r["best_s"], "first_call_s": r["first_call_s"],
                        "same_tokens": bool(torch.equal(r["tokens"], eager["tokens"])),
                    })  # fmt: skip
        del plain, looped
    meta = {"model": args.model, "layout": args.layout, "prompt_tokens": prompt.shape[1], "new_tokens": args.new_tokens,
            "rounds": args.rounds}  # fmt: skip
    report("compiled_generation", rows, meta, args.out)


if __name__ == "__main__":
    main()
