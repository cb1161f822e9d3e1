"""Read documents from any supported source: plain text, JSONL, Parquet, HF datasets, GSM8K records, built-in.

A `Document` is either free text (`text`) or a prompt/response pair (`prompt`, `response`). Plain text files are
split into documents at blank lines (one or more empty lines), so paragraphs, speeches or sections stay whole;
a file with no blank lines is one document (packing splits it across rows). Nothing of the file is lost: each
paragraph keeps its own newline and the blank lines after it (the first also any before it), so the documents
joined give the file's text back (newlines normalised to `\n`), and every paragraph but the last is `continued`:
packing puts no end-of-text between it and the rest, as in the raw file (a model trained on the split file learns
the blank lines it will meet in the raw text, and no end-of-text where the text goes on).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loopfit.data.arithmetic import arithmetic_problems
from loopfit.errors import LoopfitError

FORMATS = ("auto", "text", "jsonl", "parquet", "hf", "gsm8k", "arithmetic")
ARITHMETIC = "arithmetic"
_TEXT_SUFFIXES = {".txt", ".md", ".text"}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


@dataclass(frozen=True)
class Document:
    """One training document: free text, or a prompt/response pair (chat or question/answer)."""

    text: str | None = None
    """Free text (used as is)."""
    prompt: str | None = None
    """User turn / question."""
    response: str | None = None
    """Assistant turn / answer (the part trained on with assistant-only loss)."""
    continued: bool = False
    """True for a paragraph of a text file that the file goes on after: no end-of-text separator follows it."""

    @property
    def is_pair(self) -> bool:
        return self.prompt is not None


def source_format(spec: str, format: str = "auto") -> str:
    """The format a source is read as: `format`, or with `auto` the one its name implies (`LoopfitError` if none)."""
    return _detect_format(spec) if format == "auto" else format


def _detect_format(spec: str) -> str:
    path = Path(spec)
    if spec == ARITHMETIC:
        return ARITHMETIC
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        return "text"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if path.exists():
        raise LoopfitError(f"cannot tell the format of {spec} from its name; pass --format (one of {FORMATS[1:]})")
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return "hf"  # a hub dataset name such as `openai/gsm8k`
    raise LoopfitError(f"data source not found: {spec}")


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, without a leading byte-order mark; bytes that are not UTF-8 text (or a NUL
    byte, the mark of a binary file) are refused with the file and the byte offset, instead of being replaced
    silently or failing mid-run."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LoopfitError(
                    f"{path}: the bytes at offset {offset + e.start} are not UTF-8 text ({e.reason}): convert the "
                    "file to UTF-8 (e.g. iconv -t utf-8) or pass another file"
                ) from None
            nul = line.find("\0")
            if nul >= 0:
                at = offset + len(line[:nul].encode())
                raise LoopfitError(f"{path}: NUL byte at offset {at}: this is a binary file, not text")
            if offset == 0 and line.startswith("\ufeff"):
                line = line[1:]  # a byte-order mark (as "utf-8-sig" reads it) is not text to train on
            offset += len(raw)
            # Universal newlines, as text mode would give: CRLF and a lone CR end a line too.
            parts = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            yield from (part + "\n" for part in parts[:-1])
            if parts[-1]:
                yield parts[-1]


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file, refused as in `text_lines` when it is not text."""
    return "".join(text_lines(Path(path)))


def _text_documents(path: Path) -> Iterator[Document]:
    """The paragraphs of a text file, each with its following blank lines (see the module docstring)."""
    lines: list[str] = []  # the paragraph being read, then the blank lines after it
    has_text = blank_tail = False  # leading blank lines (no text yet) join the first paragraph
    for line in text_lines(path):
        if not line.strip():
            lines.append(line)
            blank_tail = has_text
        elif blank_tail:
            yield Document(text="".join(lines), continued=True)
            lines, blank_tail = [line], False
        else:
            lines.append(line)
            has_text = True
    if has_text:
        yield Document(text="".join(lines))


def _jsonl_records(path: Path) -> Iterator[dict]:
    for n, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoopfitError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise LoopfitError(f"{path}: line {n} is not a JSON object")
        yield record


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise LoopfitError(f"cannot read {path} as Parquet: {e}") from None
    for batch in pf.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _hf_records(spec: str) -> Iterator[dict]:
    import datasets

    path = Path(spec)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(spec)
    except Exception as e:  # datasets raises many types (missing hub, bad folder); report them as one line
        raise LoopfitError(
            f"cannot load dataset {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise LoopfitError(f"dataset {spec} has no 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    yield from ds


def _field(record: dict, name: str, where: str, n: int) -> str:
    if name not in record:
        raise LoopfitError(f"{where}: record {n} has no field '{name}' (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise LoopfitError(f"{where}: field '{name}' of record {n} is {type(value).__name__}, not text")
    return value


def _record_documents(
    records: Iterable[dict], where: str, pairs: bool, text_field: str | None, question_field: str, answer_field: str
) -> Iterator[Document]:
    for n, record in enumerate(records, 1):
        if text_field is not None:
            yield Document(text=_field(record, text_field, where, n))
        elif pairs or (question_field in record and answer_field in record):
            yield Document(
                prompt=_field(record, question_field, where, n), response=_field(record, answer_field, where, n)
            )
        else:
            yield Document(text=_field(record, "text", where, n))


def read_documents(
    spec: str | None,
    format: str = "auto",
    text_field: str | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
    seed: int = 0,
) -> Iterator[Document]:
    """Iterate over the documents of one source, in the source's order (`limit` caps how many).

    `spec=None` or `"arithmetic"` is the built-in unbounded generator (seeded by `seed`). Records (JSONL,
    Parquet, HF datasets) become free text from `text_field` if given; else prompt/response pairs from
    `question_field`/`answer_field` when the record has both (always for `format="gsm8k"`); else text from `text`.
    Raises `LoopfitError` for a missing source or unknown format (at the call), and for a missing field or a
    source with no documents (while iterating).
    """
    if format not in FORMATS:
        raise LoopfitError(f"unknown data format '{format}' (expected one of {', '.join(FORMATS)})")
    if limit is not None and limit < 1:
        raise LoopfitError(f"the document limit must be >= 1, got {limit}")
    if spec is None or spec == ARITHMETIC or format == ARITHMETIC:
        docs = _arithmetic_documents(seed)
        where = ARITHMETIC
    else:
        spec = str(spec)
        fmt = source_format(spec, format)
        where = spec
        path = Path(spec)
        if fmt != "hf" and not path.is_file():
            raise LoopfitError(f"data file not found: {spec}")
        if fmt == "text":
            docs = _text_documents(path)
        else:
            if fmt == "hf":
                records = _hf_records(spec)
            elif fmt == "parquet" or (fmt == "gsm8k" and path.suffix.lower() == ".parquet"):
                records = _parquet_records(path)
            else:
                records = _jsonl_records(path)
            docs = _record_documents(records, where, fmt == "gsm8k", text_field, question_field, answer_field)
    return _limited(docs, where, limit)


def _limited(docs: Iterator[Document], where: str, limit: int | None) -> Iterator[Document]:
    count = 0
    for doc in docs:
        if limit is not None and count >= limit:
            return
        count += 1
        yield doc
    if count == 0:
        raise LoopfitError(f"data source {where} has no documents")


def _arithmetic_documents(seed: int) -> Iterator[Document]:
    for p in arithmetic_problems(seed):
        yield Document(prompt=p.question, response=p.solution)


def document_text(doc: Document, tokenizer=None, chat: bool = False, system: str | None = None) -> str:
    """The text a document is trained on.

    Free text is used as is. A prompt/response pair becomes the tokenizer's chat template applied to
    (optional system, user, assistant) with `chat=True`, else `"Question: {prompt}\\nAnswer: {response}"`.
    """
    if not doc.is_pair:
        return doc.text or ""
    if not chat:
        return f"Question: {doc.prompt}\nAnswer: {doc.response}"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LoopfitError("chat formatting needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(chat_messages(doc, system), tokenize=False)


def chat_messages(doc: Document, system: str | None = None) -> list[dict]:
    """The conversation of a prompt/response pair, with an optional system turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": doc.prompt})
    if doc.response is not None:
        messages.append({"role": "assistant", "content": doc.response})
    return messages
