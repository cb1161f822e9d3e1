"""The two yardsticks of a heal at every depth: in domain (held-out tiny-shakespeare) and out of domain (GSM8K answers).

    python -m benchmarks.heal_yardsticks --models teacher=smollm2-135m,loop=runs/heal-merged --name heal_yardsticks

- In domain: the last 10% of tiny-shakespeare (the bytes after the first 1,003,854, the training file's end), cut
  into 256-token chunks as `loopfit eval --data val10.txt` cuts it (35,842 tokens for SmolLM2's tokenizer).
- Out of domain: the answer loss on the last `--gsm8k_heldout` (64) problems of GSM8K's train file, which no heal
  trains on (a mix heal reads only the rows before them): each problem in the tokenizer's chat format (user =
  question, assistant = answer), the loss only on the assistant's tokens and its end-of-turn token.

- With `--blank_lines`, the in-domain tokens also scored in two parts: the newline tokens of each blank line
  ("\n\n" is two newline tokens), which no heal before session 51 trained on (a `.txt` source's blank lines were
  dropped between its paragraph documents; docs/data.md), and the rest (rows `shakespeare_blank`, `shakespeare_rest`).

Every model is scored on the same tokens at every `--depths` (a plain model once). Writes
benchmarks/results/NAME.json; with `--gap_from` and a `teacher` model, the share of the teacher gap each row closes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import report
from loopfit.evaluate import chunk_tokens, depth_sweep, file_token_ids, is_looped
from loopfit.loading import load_model, load_tokenizer
from loopfit.pipeline.heldout import text_batches

TRAIN_BYTES = 1003854  # head -c 1003854: the training file of configs/heal-smol.yaml


def shakespeare_batches(path: str, tokenizer, seq_len: int, batch_size: int, tmp: Path) -> list[dict]:
    text = Path(path).read_bytes()[TRAIN_BYTES:]
    tmp.write_bytes(text)
    return chunk_tokens(file_token_ids(str(tmp), tokenizer), seq_len, batch_size)


def split_blank_lines(batches: list[dict], newline_id: int) -> tuple[list[dict], list[dict]]:
    """The batches twice, labels kept only on blank-line tokens, then only on the others.

    A blank-line token is a newline next to another newline in the same row; every label of a batch lands in
    exactly one of the two copies (the -100s stay -100 in both).
    """
    blank, rest = [], []
    for b in batches:
        ids = b["input_ids"]
        nl = ids == newline_id
        beside = torch.zeros_like(nl)
        beside[:, 1:] |= nl[:, :-1]
        beside[:, :-1] |= nl[:, 1:]
        on = nl & beside
        blank.append({**b, "labels": b["labels"].masked_fill(~on, -100)})
        rest.append({**b, "labels": b["labels"].masked_fill(on, -100)})
    return blank, rest


def gsm8k_batches(path: str, tokenizer, n: int, batch_size: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][-n:]
    texts = []
    for r in rows:
        user = [{"role": "user", "content": r["question"]}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": r["answer"]}], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[: len(p_ids)] != p_ids:
            raise SystemExit("the chat template does not extend the prompt: cannot split the answer tokens")
        # The template ends the turn with `<|im_end|>\n`: score the answer and its end-of-turn token, not the newline.
        answer = ids[len(p_ids) :]
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if end in answer:
            answer = answer[: answer.index(end) + 1]
        texts.append({"prompt_ids": p_ids, "ids": answer})
    return text_batches(texts, batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="label=model pairs, comma-separated (folders or smollm2-135m)")
    ap.add_argument("--depths", default="1,2,3,4,6,8,12,24")
    ap.add_argument("--shakespeare", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--gsm8k", default="../shared/data/gsm8k/train.jsonl")
    ap.add_argument("--gsm8k_heldout", type=int, default=64)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blank_lines", action="store_true", help="also score blank-line tokens and the rest apart")
    ap.add_argument("--name", default="heal_yardsticks")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/NAME.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    pairs = [m.split("=", 1) for m in args.models.split(",")]
    tokenizer = load_tokenizer(pairs[0][1])
    tmp = Path(f"/tmp/heal_yardsticks_{args.name}.txt")
    sets = {
        "shakespeare": shakespeare_batches(args.shakespeare, tokenizer, args.seq_len, args.batch_size, tmp),
        "gsm8k": gsm8k_batches(args.gsm8k, tokenizer, args.gsm8k_heldout, args.batch_size),
    }
    if args.blank_lines:
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) != 1:
            raise SystemExit("--blank_lines needs a tokenizer with one token for a newline")
        sets["shakespeare_blank"], sets["shakespeare_rest"] = split_blank_lines(sets["shakespeare"], newline[0])
    rows = []
    for label, name in pairs:
        model = load_model(name)
        for key, batches in sets.items():
            res = depth_sweep(model, batches, depths if is_looped(model) else [1])
            row = {"model": label, "looped": is_looped(model), "yardstick": key, "tokens": res["tokens"]}
            row.update({f"R={d}": round(x, 4) for d, x in zip(res["depths"], res["loss"])})
            rows.append(row)
            print(row, flush=True)
        del model
    report(args.name, rows, {"args": vars(args)}, args.out)


if __name__ == "__main__":
    main()
