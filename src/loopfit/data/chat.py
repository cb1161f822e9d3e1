"""Tokenise documents, with the tokenizer's own chat template and an assistant-only loss mask.

The assistant's tokens are found by characters, not by template-specific markers: the conversation rendered with
the prompt only (plus the generation prompt) must be a textual prefix of the full conversation, and the assistant
span runs from the end of that prefix to the last non-whitespace character of the rendering (so it includes the
template's end-of-turn token, which the model must learn to emit, and excludes a trailing newline). Token offsets
from the fast tokenizer map that span to tokens. This works for ChatML (SmolLM2, Qwen2), Llama-3 and OLMo-2
templates, none of which needs `{% generation %}` markers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from loopfit.data.paragraphs import file_runs, paragraph_tokens, special_affixes
from loopfit.data.sources import Document, chat_messages
from loopfit.errors import LoopfitError

_BATCH = 512


@dataclass
class TokenizedDocument:
    """Token ids of one document and which of them carry loss."""

    input_ids: list[int]
    """Token ids, without the end-of-document separator (packing adds it)."""
    trainable: list[bool]
    """Per token: True where the token is a training target."""
    train_separator: bool
    """Whether the EOS separator that follows this document is a training target."""
    separator: bool = True
    """Whether packing puts an EOS separator after this document: not after a paragraph its text file goes on after
    (`Document.continued`), whose own blank lines end it as in the raw text."""

    @property
    def packed_size(self) -> int:
        """Tokens the document takes in packed rows: its ids and its separator, if any."""
        return len(self.input_ids) + int(self.separator)


def tokenizer_hash(tokenizer) -> str:
    """A stable hash of everything that decides token ids: vocabulary, merges, special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    extra = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.chat_template or ""]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()[:16]


def _render(tokenizer, doc: Document, chat: bool, system: str | None) -> tuple[str, int | None]:
    """The document's text and the character offset where the assistant's part starts (None: free text)."""
    if not doc.is_pair:
        return doc.text or "", None
    if not chat:
        prefix = f"Question: {doc.prompt}\nAnswer: "
        return prefix + (doc.response or ""), len(prefix)
    messages = chat_messages(doc, system)
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors (e.g. a template that rejects system turns) are user-facing problems
        raise LoopfitError(f"the tokenizer's chat template failed: {e}") from None
    if not full.startswith(prefix):
        raise LoopfitError(
            "cannot find the assistant's part: the tokenizer's chat template does not render the prompt as a "
            "prefix of the whole conversation"
        )
    return full, len(prefix)


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer,
    chat: bool = False,
    assistant_only: bool = False,
    system: str | None = None,
) -> list[TokenizedDocument]:
    """Tokenise documents; with `assistant_only`, only the assistant's (answer's) tokens of pairs are trainable.

    Free-text documents are fully trainable even with `assistant_only` (they have no assistant part). Chat
    renderings carry their own special tokens (BOS, if any, comes from the template); other text gets the
    tokenizer's default special tokens. The paragraphs of a text file (a run of `continued` documents and the one
    that ends it) are tokenised as the file reads (`loopfit.data.paragraphs`): no separator between them, and the
    tokenizer's special tokens once, around the file.
    """
    if tokenizer.eos_token_id is None:
        raise LoopfitError("the tokenizer has no EOS token, which packing puts between documents")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise LoopfitError("--chat=true needs a tokenizer with a chat template")
    if assistant_only and not getattr(tokenizer, "is_fast", False):
        raise LoopfitError("assistant-only masking needs a fast tokenizer (token offsets)")
    rendered = [_render(tokenizer, d, chat, system) for d in docs]
    # Chat renderings already contain the template's special tokens; everything else gets the tokenizer's defaults.
    special = [not (chat and boundary is not None) for _, boundary in rendered]
    out: list[TokenizedDocument | None] = [None] * len(docs)
    prefix, suffix = special_affixes(tokenizer)
    # A tokenizer that ends every text with EOS (a post-processor "<s> $A </s>") would double packing's separator.
    own_eos = suffix[-1:] == [tokenizer.eos_token_id]
    suffix = suffix[:-1] if own_eos else suffix
    for run in map(list, file_runs(range(len(docs)), lambda i: docs[i].continued)):
        if not docs[run[0]].continued:  # a document on its own, tokenised below
            continue
        ends_file = not docs[run[-1]].continued  # else the source was cut short inside the file
        for i, ids in zip(run, paragraph_tokens(tokenizer, (docs[i].text for i in run))):
            last = ends_file and i == run[-1]
            ids = (prefix if i == run[0] else []) + ids + (suffix if last else [])
            out[i] = TokenizedDocument(ids, [True] * len(ids), last, separator=last)
    for flag in (True, False):
        idx = [i for i, s in enumerate(special) if s == flag and out[i] is None]
        for start in range(0, len(idx), _BATCH):
            chunk = idx[start : start + _BATCH]
            texts = [rendered[i][0] for i in chunk]
            enc = tokenizer(texts, add_special_tokens=flag, return_offsets_mapping=assistant_only)
            for j, i in enumerate(chunk):
                ids, offsets = enc["input_ids"][j], enc.get("offset_mapping", [None] * len(chunk))[j]
                if flag and own_eos and ids[-1:] == [tokenizer.eos_token_id]:
                    ids, offsets = ids[:-1], offsets if offsets is None else offsets[:-1]
                out[i] = _masked(
                    ids,
                    offsets,
                    *rendered[i],
                    assistant_only,
                    chat,
                )
    return out


def _masked(ids: list[int], offsets, text: str, boundary: int | None, assistant_only: bool, chat: bool):
    if not assistant_only or boundary is None:
        return TokenizedDocument(ids, [True] * len(ids), True)
    end = len(text.rstrip())
    # A token straddling the boundary is kept: losing the answer's first characters is worse.
    trainable = [e > boundary and s < end and e > s for s, e in offsets]
    # Without a chat template nothing marks the end of the answer except the separator, so it is trained on.
    return TokenizedDocument(ids, trainable, not chat)


def prompt_token_ids(
    docs: Sequence[Document], tokenizer, chat: bool = False, system: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt/response pair's prompt part, rendered as `tokenize_documents` renders the pair: with
    `chat` the template through its generation prompt (its own special tokens), else `Question: ...\nAnswer:` with
    the tokenizer's default special tokens, the trailing space left to the answer (where the whole text's
    tokenisation puts it: a lone space token would be a prefix the model never saw in training).

    Raises:
        LoopfitError: a document is free text (it has no prompt part), or the chat template fails.
    """
    if any(not d.is_pair for d in docs):
        raise LoopfitError("a free-text document has no prompt part: prompts need prompt/response pairs")
    texts = []
    for d in docs:
        text, boundary = _render(tokenizer, d, chat, system)
        texts.append(text[:boundary] if chat else text[:boundary].rstrip(" "))
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        ids.extend(tokenizer(texts[start : start + _BATCH], add_special_tokens=not chat)["input_ids"])
    return ids


def format_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> str:
    """The prompt as text, wrapped in the tokenizer's chat template when `chat`."""
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise LoopfitError("--chat=true but the tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
