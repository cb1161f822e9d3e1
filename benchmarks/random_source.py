"""A random-weight model of SmolLM2-135M's shape, with a tokenizer, for machines that lack the real weights.

GPU machines lent for timing runs reach no hub and carry no GGUF; speed does not depend on the weights' values, so
a Llama of SmolLM2's configuration with fresh random weights times the same. Two steps, because the tokenizer can
only be exported where the GGUF is installed:

    python -m benchmarks.random_source --tokenizer_out .gpu/tok          # here: SmolLM2's tokenizer and config
    python -m benchmarks.random_source --tokenizer .gpu/tok --out /tmp/smol-rand   # there: random weights + both
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m"


def write_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer and config (no weights) into `out`."""
    from loopfit.loading import load_config, load_tokenizer

    load_tokenizer(SMOLLM2).save_pretrained(out)
    load_config(SMOLLM2).save_pretrained(out)


def write_random_model(tokenizer_dir: Path, out: Path, seed: int = 0) -> None:
    """A `LlamaForCausalLM` of the config in `tokenizer_dir`, random weights (`seed`), saved with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer_out", type=Path, help="write SmolLM2's tokenizer and config here (needs the GGUF)")
    ap.add_argument("--tokenizer", type=Path, help="a folder written by --tokenizer_out")
    ap.add_argument("--out", type=Path, help="write the random-weight model here (with --tokenizer)")
    args = ap.parse_args()
    if args.tokenizer_out:
        write_tokenizer(args.tokenizer_out)
    elif args.tokenizer and args.out:
        write_random_model(args.tokenizer, args.out)
    else:
        ap.error("give --tokenizer_out DIR, or --tokenizer DIR --out DIR")


if __name__ == "__main__":
    main()
