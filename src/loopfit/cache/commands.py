"""`loopfit cache-teacher` and `loopfit verify-cache`."""

from __future__ import annotations

from loopfit.cache.build import build_teacher_cache
from loopfit.cache.reader import TeacherCache
from loopfit.cache.writer import CacheSettings
from loopfit.errors import LoopfitError


def cache_teacher_command(
    teacher: str | None = None,
    data: str | list[str] | None = None,
    out: str | None = None,
    seq_len: int = 256,
    estimator: str = "topk_tail",
    top_k: int = 64,
    samples: int = 32,
    temperature: float = 1.0,
    batch_size: int = 4,
    shard_rows: int = 256,
    chat: bool = False,
    assistant_only: bool = False,
    system_prompt: str | None = None,
    max_documents: int | None = None,
    val_fraction: float = 0.0,
    position_ids: bool = False,
    text_stream: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Run the teacher once over the training rows and store its next-token distributions sparsely.

    The data flags must be exactly those training will use (they decide the rows; training checks the data
    and tokenizer hashes). An interrupted run resumes when rerun with the same flags.

    Args:
        teacher: teacher model (HF folder, hub id, .gguf or alias such as smollm2-135m); its tokenizer is used.
        data: data source(s) as for `loopfit train` (path[:weight], several allowed); default: the arithmetic
            generator.
        out: output cache folder (required).
        seq_len: packed sequence length.
        estimator: topk, topk_tail or sampled.
        top_k: tokens kept per position (topk, topk_tail).
        samples: draws per position (sampled).
        temperature: draw temperature (sampled only; training must use the same).
        batch_size: sequences per teacher forward pass.
        shard_rows: sequences per shard file (unit of resumption and checksums).
        chat: format pairs with the tokenizer's chat template (as in training).
        assistant_only: targets only on assistant tokens (as in training).
        system_prompt: system prompt for chat formatting (as in training).
        max_documents: cap on documents per source (as in training).
        val_fraction: held-out fraction carved before packing (as in training).
        position_ids: rows carry position ids restarting at each document (as in training).
        text_stream: text files as contiguous `seq_len` windows (as in training).
        seed: data seed (as in training) and seed of the draws.
        overwrite: replace an existing output folder (only one loopfit wrote; it is replaced by rename once the
            new cache is complete).
    """
    if teacher is None:
        raise LoopfitError("--teacher is required")
    if out is None:
        raise LoopfitError("--out is required")
    settings = CacheSettings(estimator=estimator, top_k=top_k, samples=samples, temperature=temperature,
                             shard_rows=shard_rows, batch_size=batch_size, seed=seed)  # fmt: skip
    path = build_teacher_cache(teacher, data, out, settings, seq_len=seq_len, chat=chat,
                               assistant_only=assistant_only, system_prompt=system_prompt,
                               max_documents=max_documents, val_fraction=val_fraction, position_ids=position_ids,
                               text_stream=text_stream, overwrite=overwrite)  # fmt: skip
    print(f"wrote {path}")


def verify_cache_command(cache: str) -> None:
    """Check every shard's checksum and the coverage of a teacher cache; exit non-zero on any fault.

    Args:
        cache: the cache folder written by `loopfit cache-teacher`.
    """
    summary = TeacherCache(cache).verify()
    print(
        f"ok: {summary['rows']} rows in {summary['shards']} shards, {summary['entries']} entries, "
        f"{summary['bytes_per_token']:.1f} bytes/token ({summary['estimator']})"
    )
