"""Build a teacher cache from a model name and data flags: the library function behind `loopfit cache-teacher`."""

from __future__ import annotations

from pathlib import Path

from loopfit.cache.writer import CacheSettings, check_cache_output, write_cache
from loopfit.data import build_dataset, tokenizer_hash
from loopfit.data.dataset import check_format_flags
from loopfit.loading import load_model, load_tokenizer
from loopfit.models.packed_attention import use_packed_attention


def build_teacher_cache(
    teacher: str,
    data: str | list[str] | None,
    out: str | Path,
    settings: CacheSettings,
    *,
    seq_len: int = 256,
    chat: bool = False,
    assistant_only: bool = False,
    system_prompt: str | None = None,
    max_documents: int | None = None,
    val_fraction: float = 0.0,
    position_ids: bool = False,
    text_stream: bool = False,
    overwrite: bool = False,
) -> Path:
    """Run `teacher` once over the training rows of `data` and store its next-token distributions sparsely in `out`.

    The data arguments must be exactly those training will use (they decide the rows; training checks the data and
    tokenizer hashes); `settings.seed` is both the data seed and the seed of the draws. An interrupted run resumes
    when called again with the same arguments. Returns the cache folder. Raises `LoopfitError` for an output that
    exists (without `overwrite`, or not written by loopfit), invalid settings or `assistant_only` / `system_prompt`
    without `chat`, before the teacher is loaded.
    """
    check_format_flags(chat, assistant_only, system_prompt)  # before anything is loaded: a refusal costs nothing
    check_cache_output(Path(out), overwrite)
    tokenizer = load_tokenizer(teacher)
    settings.validate(len(tokenizer))
    data_kw = dict(chat=chat, assistant_only=assistant_only, system_prompt=system_prompt, val_fraction=val_fraction,
                   seed=settings.seed, max_documents=max_documents, position_ids=position_ids,
                   text_stream=text_stream)  # fmt: skip
    packed = build_dataset(data, tokenizer, seq_len, **data_kw)
    model = load_model(teacher)
    if position_ids:  # documents kept apart as `loopfit train --position_ids` reads them: SDPA per document
        use_packed_attention(model)
    vocab = model.get_output_embeddings().weight.shape[0]  # the logits' width, which students share
    info = {
        "teacher": str(teacher),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data_hash": packed.data_hash,
        "vocab_size": vocab,
        "data": {"sources": data, "seq_len": seq_len, **data_kw},
    }
    return write_cache(model, packed.train, out, settings, info, overwrite=overwrite)
