"""Build packed training data from one or several weighted sources, with a deterministic held-out split.

Mixing is by tokens: with weights w_i (normalised to p_i) the train set holds the largest mix whose token shares
match p_i without repeating any document, so the source that is scarcest relative to its weight is used whole
and the others are subsampled (seeded). What was used of each source is recorded in the manifest. The held-out
split is carved per source before mixing: the documents whose seeded content hash is smallest, so the same
documents are held out for the same seed and sources, whatever their order.

With `text_stream` a text file's paragraphs are not documents of their own: each side of the split joins its
paragraphs of the file, in file order, into one token stream cut into `seq_len` windows
(nanoGPT's and litgpt's contiguous text, HF `run_clm`'s `group_texts`), and the windows are what is mixed,
shuffled and packed: a full window is a row of its own, so the rows read as the file does.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from loopfit.data.chat import TokenizedDocument, tokenize_documents, tokenizer_hash
from loopfit.data.packing import (  # noqa: F401  (PackedDataset, PackedData, data_hash, MANIFEST: re-exported)
    IGNORE_INDEX,
    MANIFEST,
    PackedData,
    PackedDataset,
    PackedRows,
    data_hash,
    pack_documents,
)
from loopfit.data.shards import load_prepared
from loopfit.data.sources import ARITHMETIC, Document, read_documents, source_format
from loopfit.errors import LoopfitError

DEFAULT_GENERATED_DOCUMENTS = 2000


def parse_source(entry: str) -> tuple[str, float]:
    """Split `path:weight` into (path, weight); an entry without a numeric suffix has weight 1."""
    spec, sep, tail = entry.rpartition(":")
    if sep and spec:
        try:
            weight = float(tail)
        except ValueError:
            return entry, 1.0
        if not weight >= 0:
            raise LoopfitError(f"the weight of data source {spec} must be a number >= 0, got {tail}")
        return spec, weight
    return entry, 1.0


def _doc_key(seed: int, doc: Document) -> bytes:
    return hashlib.sha256(f"{seed}\0{doc.text}\0{doc.prompt}\0{doc.response}".encode()).digest()


def _carve(docs: list[Document], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): the round(fraction*n) documents with the smallest seeded content hash are held out."""
    if fraction <= 0:
        return list(range(len(docs))), []
    k = min(max(1, round(fraction * len(docs))), len(docs) - 1)
    if k < 1:
        raise LoopfitError("a held-out split needs at least 2 documents in every source")
    order = sorted(range(len(docs)), key=lambda i: _doc_key(seed, docs[i]))
    val = order[:k]  # in hash order, so the packed held-out rows do not depend on the source's order either
    held = set(val)
    return [i for i in range(len(docs)) if i not in held], val


def _mix(sources: list[list[TokenizedDocument]], weights: list[float], seed: int) -> list[list[int]]:
    """Per source, the indices of the documents used so that token shares follow the weights."""
    if len(sources) == 1:
        return [list(range(len(sources[0])))]
    total_w = sum(weights)
    shares = [w / total_w for w in weights]
    tokens = [sum(d.packed_size for d in docs) for docs in sources]
    budget = min(t / p for t, p in zip(tokens, shares) if p > 0)
    chosen = []
    for n, (docs, p) in enumerate(zip(sources, shares)):
        order = list(range(len(docs)))
        random.Random(f"{seed}:mix:{n}").shuffle(order)
        target, used, picked = p * budget, 0, []
        for i in order:
            size = docs[i].packed_size
            if used + size / 2 > target:  # stop where the share is closest to the target
                break
            picked.append(i)
            used += size
        chosen.append(sorted(picked))
    return chosen


def _stream_windows(tok: list[TokenizedDocument], indices: list[int], seq_len: int) -> list[TokenizedDocument]:
    """A text file's paragraphs `tok[i]` for `indices`, joined in file order into one stream and cut into windows of
    `seq_len` packed tokens; the last window carries the file's end-of-text separator, if the file's last paragraph
    is among them (an EOS that would start a window of its own is one: a file of exactly k * seq_len tokens)."""
    if not indices:
        return []
    indices = sorted(indices)
    ids = [t for i in indices for t in tok[i].input_ids]
    trainable = [m for i in indices for m in tok[i].trainable]
    end = tok[indices[-1]]
    size = len(ids) + int(end.separator)
    windows = []
    for k in range(0, size, seq_len):
        last = k + seq_len >= size
        separator = last and end.separator
        windows.append(
            TokenizedDocument(
                ids[k : k + seq_len], trainable[k : k + seq_len], separator and end.train_separator, separator
            )
        )
    return windows


def is_prepared(entry: str) -> bool:
    """Whether a data entry is a folder written by `loopfit prepare` (it holds a manifest)."""
    return (Path(entry) / MANIFEST).is_file()


def check_sources(data: str | list[str] | None, format: str = "auto", text_field: str | None = None) -> list[str]:
    """Validate data entries (existence, format, weights) before any work; returns them as a list."""
    entries = [data] if isinstance(data, str) else list(data or [ARITHMETIC])
    if not entries:
        raise LoopfitError("no data sources given")
    prepared = [e for e in entries if is_prepared(e)]
    if prepared:
        if len(entries) > 1:
            raise LoopfitError(f"a prepared data folder ({prepared[0]}) cannot be mixed with other sources")
        return entries
    parsed = [parse_source(e) for e in entries]
    if sum(w for _, w in parsed) <= 0:
        raise LoopfitError("the data weights must sum to a positive number")
    for spec, _ in parsed:  # opens each source (lazily: no documents are read) to fail before any work
        read_documents(spec, format=format, text_field=text_field)
    return entries


def check_format_flags(chat: bool, assistant_only: bool, system_prompt: str | None) -> None:
    """Refuse formatting flags that only the chat template gives a meaning to.

    Raises:
        LoopfitError: `assistant_only` or a `system_prompt` without `chat` (the answer's start and the system turn
            come from the template; without it the flags would be silently ignored).
    """
    if (assistant_only or system_prompt is not None) and not chat:
        raise LoopfitError("--assistant_only and --system_prompt need --chat=true (they shape the chat template)")


def build_dataset(
    data: str | list[str] | None,
    tokenizer,
    seq_len: int,
    chat: bool = False,
    assistant_only: bool = False,
    system_prompt: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_documents: int | None = None,
    position_ids: bool = False,
    format: str = "auto",
    text_field: str | None = None,
    text_stream: bool = False,
) -> PackedData:
    """Read, tokenise, carve, mix and pack the data; or load a folder written by `loopfit prepare`.

    `data`: None (the built-in arithmetic generator), one entry or a list; each entry is a source (see
    `read_documents`) optionally suffixed `:weight`. `max_documents` caps each source (default for the
    generator: 2000). `text_stream`: text files train as contiguous `seq_len` windows (see the module docstring).
    A prepared folder brings its own formatting; `seq_len` and the tokenizer must match it.
    """
    check_format_flags(chat, assistant_only, system_prompt)
    entries = check_sources(data, format, text_field)
    if seq_len < 2:
        raise LoopfitError(f"--seq_len must be >= 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise LoopfitError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if max_documents is not None and max_documents < 1:
        raise LoopfitError(f"--max_documents must be >= 1, got {max_documents}")
    if is_prepared(entries[0]):
        prepared = load_prepared(entries[0], tokenizer, seq_len, position_ids)
        _check_prepared_flags(prepared.manifest, entries[0], chat=chat, assistant_only=assistant_only,
                              system_prompt=system_prompt, text_stream=text_stream, max_documents=max_documents,
                              val_fraction=val_fraction)  # fmt: skip
        check_targets(prepared, entries[0])
        return prepared
    parsed = [(s, w) for s, w in map(parse_source, entries) if w > 0]
    train_docs, val_docs, records = [], [], []
    for spec, weight in parsed:
        docs = _source_documents(spec, format, text_field, max_documents, seed)
        tr, va = _carve(docs, val_fraction, seed)
        tok = tokenize_documents(docs, tokenizer, chat=chat, assistant_only=assistant_only, system=system_prompt)
        streamed = text_stream and source_format(spec, format) == "text"
        if streamed:
            train_docs.append(_stream_windows(tok, tr, seq_len))
            val_docs.extend(_stream_windows(tok, va, seq_len))
        else:
            train_docs.append([tok[i] for i in tr])
            val_docs.extend(tok[i] for i in va)
        # documents and val_documents count what was read (a text file's paragraphs); the train_documents_* counts
        # below count the units mixed, windows of a streamed text file
        records.append({"spec": spec, "weight": weight, "documents": len(docs), "val_documents": len(va),
                        "train_units": "windows" if streamed else "documents"})  # fmt: skip
    chosen = _mix(train_docs, [w for _, w in parsed], seed)
    mixed = []
    for rec, docs, idx in zip(records, train_docs, chosen):
        rec["train_documents_available"] = len(docs)
        rec["train_documents_used"] = len(idx)
        rec["train_tokens_used"] = sum(docs[i].packed_size for i in idx)
        mixed.extend(docs[i] for i in idx)
    random.Random(f"{seed}:shuffle").shuffle(mixed)

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    train = PackedDataset(pack_documents(mixed, seq_len, eos, pad), position_ids)
    val = PackedDataset(pack_documents(val_docs, seq_len, eos, pad), position_ids)
    manifest = {
        "format_version": 1,
        "seq_len": seq_len,
        "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", ""), "hash": tokenizer_hash(tokenizer)},
        "eos_token_id": eos,
        "pad_token_id": pad,
        "chat": chat,
        "assistant_only": assistant_only,
        "system_prompt": system_prompt,
        "format": format,
        "text_field": text_field,
        "position_ids": position_ids,
        "text_stream": text_stream,
        "seed": seed,
        "val_fraction": val_fraction,
        "max_documents": max_documents,
        "sources": records,
        "counts": {"train": train.stats(), "val": val.stats()},
        "data_hash": data_hash(train, val),
    }
    packed = PackedData(train, val, manifest)
    check_targets(packed, ", ".join(spec for spec, _ in parsed), chat, assistant_only)
    return packed


def _check_prepared_flags(manifest: dict, folder: str, **given) -> None:
    """A prepared folder's rows are formatted, split and capped already: a flag given with another value than the
    folder was prepared with would be silently ignored, so it is refused (defaults pass: the folder decides)."""
    for flag, value in given.items():
        if value not in (False, None) and value != manifest.get(flag):  # 0.0 == False: val_fraction's default
            made, asked = _shown(manifest.get(flag)), _shown(value)
            raise LoopfitError(f"{folder} is a prepared data folder made with --{flag} {made}: its rows cannot "
                               f"follow --{flag} {asked} (leave it out, or prepare the data again)")  # fmt: skip


def _shown(value) -> str:
    """A flag's value as it is typed on the command line (`true`, `null`, `'text'`, `0.1`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _source_documents(spec: str, format: str, text_field: str | None, max_documents: int | None, seed: int):
    generated = spec == ARITHMETIC or format == ARITHMETIC
    limit = max_documents or (DEFAULT_GENERATED_DOCUMENTS if generated else None)
    return list(read_documents(spec, format=format, text_field=text_field, limit=limit, seed=seed))


def train_documents(
    data: str | list[str] | None,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_documents: int | None = None,
    format: str = "auto",
    text_field: str | None = None,
) -> list[Document]:
    """The documents `build_dataset` with the same arguments may train on: every source of weight > 0, read with
    the same limit, less the same held-out split, before the token-share mix (which may subsample a source).

    Raises:
        LoopfitError: a bad source, or a prepared data folder (it holds token rows, not documents).
    """
    entries = check_sources(data, format, text_field)
    if is_prepared(entries[0]):
        raise LoopfitError(f"{entries[0]} is a prepared data folder: it holds token rows, not the documents asked "
                           "for; pass the source records instead")  # fmt: skip
    out = []
    for spec, weight in map(parse_source, entries):
        if weight > 0:
            docs = _source_documents(spec, format, text_field, max_documents, seed)
            out.extend(docs[i] for i in _carve(docs, val_fraction, seed)[0])
    return out


def scored_targets(ds: PackedDataset) -> int:
    """Target tokens a causal LM is scored on: labels at positions 1.. (position 0 has no preceding state)."""
    return int((ds.target_labels()[:, 1:] != IGNORE_INDEX).sum())


def check_targets(data: PackedData, where: str, chat: bool = False, assistant_only: bool = False) -> None:
    """Refuse data whose every label is masked: training on it reports a loss of 0.0 and "succeeds" on nothing,
    and a held-out split without targets reports a validation loss of 0.0."""
    hint = (
        " (with --assistant_only=true only the answers are targets: do the records have non-empty answers, and "
        "does the chat template render them?)"
        if chat and assistant_only
        else ""
    )
    if len(data.train) and scored_targets(data.train) == 0:
        raise LoopfitError(f"no target tokens in the training data {where}: every label is masked{hint}")
    if len(data.val) and scored_targets(data.val) == 0:
        raise LoopfitError(f"no target tokens in the held-out split of {where}: every label is masked{hint}")
