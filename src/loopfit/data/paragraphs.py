"""Tokenise a text file's paragraphs as the file reads.

`read_documents` splits a text file into paragraph documents that keep their blank lines (`Document.continued`).
Tokenised one by one they would not read as the file: SmolLM2's tokenizer gives "\\n\\n" at the end of a string one
token and two before more text, and a SentencePiece-style tokenizer puts a word-start mark at the start of every
string. So the paragraphs are tokenised together and each one's tokens are cut out of the whole by character
offsets: a token belongs to the paragraph it starts in. A long file goes `BATCH` paragraphs at a time, each batch
read with the paragraph before it and the one after it as context (their tokens dropped), so the cut is the same as
the whole file's for any tokenizer whose tokens depend on nearby text only, at bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, groupby, islice
from operator import attrgetter
from typing import TypeVar

from tokenizers import Tokenizer

BATCH = 512
"""Paragraphs tokenised per call."""

T = TypeVar("T")


def file_runs(items: Iterable[T], continued: Callable[[T], bool] = attrgetter("continued")) -> Iterator[Iterator[T]]:
    """`items` (documents, or anything `continued` maps to a document's flag) grouped as `read_documents` made them:
    each text file's paragraphs (a run of continued documents and the one that ends it, or only continued ones where
    the source was cut short) and every other document alone. Lazy, like `itertools.groupby`: a group is read before
    the next one is asked for."""
    file = 0

    def key(item: T) -> int:
        nonlocal file
        k = file
        file += not continued(item)
        return k

    return (run for _, run in groupby(items, key))


def _offsets_tokenizer(tokenizer):
    """The fast tokenizer's backend without its post-processor, or None for a slow tokenizer.

    The post-processor only adds special tokens, which the caller places itself, and may trim a token's offsets to
    its non-space characters (`ByteLevel(trim_offsets=True)`, RoBERTa's), which would move a space token into the
    next paragraph or out of the text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return None
    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    copy.no_truncation()
    copy.no_padding()
    return copy


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text by default (e.g. `([bos], [])`)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next((k for k in range(len(full)) if full[k : k + len(plain)] == plain), len(full))
    return full[:at], full[at + len(plain) :]


def paragraph_tokens(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each of consecutive paragraphs of one text file, without special tokens, cut from their joined
    tokenisation (see the module docstring); a paragraph whose characters all went into the token before it gets
    none. A slow tokenizer (no offsets) tokenises each paragraph alone. Reads `texts` lazily, one batch ahead."""
    backend = _offsets_tokenizer(tokenizer)
    texts = iter(texts)
    if backend is None:
        yield from (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
        return
    before, batch = "", list(islice(texts, BATCH))
    while batch:
        following = list(islice(texts, BATCH))
        after = following[0] if following else ""
        ends = [len(before) + n for n in accumulate(len(t) for t in batch)]  # where each paragraph ends
        enc = backend.encode(before + "".join(batch) + after, add_special_tokens=False)
        pieces: list[list[int]] = [[] for _ in batch]
        k = 0
        for token, (begin, _) in zip(enc.ids, enc.offsets):
            if begin < len(before):  # the previous batch's
                continue
            if begin >= ends[-1]:
                break
            while begin >= ends[k]:
                k += 1
            pieces[k].append(token)
        yield from pieces
        before, batch = batch[-1], following
