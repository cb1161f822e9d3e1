"""Sources, the arithmetic generator, packing, mixing, held-out split and prepared folders (tiny byte tokenizer)."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loopfit.data import (
    IGNORE_INDEX,
    Document,
    TokenizedDocument,
    arithmetic_problem,
    build_dataset,
    document_text,
    load_prepared,
    pack_documents,
    paragraphs,
    read_documents,
    save_prepared,
    tokenize_documents,
)
from loopfit.errors import LoopfitError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A real fast tokenizer with one token per byte and ChatML specials (vocab 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHATML
    return hf


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


QA = [
    {"question": f"What is {i} plus {i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
    for i in range(40)
]


# ---------------------------------------------------------------- generator


def _check_solution(p) -> None:
    """Every `<<expr=value>>` is right, each step starts from the previous result, and `#### N` is the last one."""
    steps = re.findall(r"<<([^=]+)=(\d+)>>", p.solution)
    assert len(steps) >= 2
    for expr, value in steps:
        a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
        got = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
        assert got == int(value) and got >= 0
    assert p.solution.splitlines()[-1] == f"#### {p.answer}"
    assert int(steps[-1][1]) == p.answer


def test_arithmetic_problems_are_correct_seeded_and_varied():
    problems = [arithmetic_problem(3, i) for i in range(300)]
    for p in problems:
        _check_solution(p)
        assert p.question.endswith("have now?")
    assert arithmetic_problem(3, 17) == problems[17]  # a pure function of (seed, index)
    assert arithmetic_problem(4, 17) != problems[17]
    assert len({p.question for p in problems}) == 300
    ops = "".join(re.findall(r"<<\d+([-+*/])", "".join(p.solution for p in problems)))
    assert all(ops.count(o) > 20 for o in "+-*/")


def test_default_source_is_the_unbounded_generator():
    docs = list(itertools.islice(read_documents(None, seed=5), 3000))
    assert len(docs) == 3000 and all(d.is_pair and d.response.split("\n")[-1].startswith("#### ") for d in docs)
    assert docs[:5] == list(read_documents("arithmetic", seed=5, limit=5))
    assert docs[0].prompt == arithmetic_problem(5, 0).question


# ---------------------------------------------------------------- sources


def test_text_file_splits_at_blank_lines_and_keeps_every_byte(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("First line\nsecond line\n\n\nPara two\n   \nThree\n")
    docs = list(read_documents(str(f)))
    assert [d.text for d in docs] == ["First line\nsecond line\n\n\n", "Para two\n   \n", "Three\n"]
    assert [d.continued for d in docs] == [True, True, False]  # only the file's end gets an end-of-text
    assert [d.text for d in read_documents(str(f), limit=2)] == ["First line\nsecond line\n\n\n", "Para two\n   \n"]
    # Joined, the documents give the file back, leading and trailing blank lines and a missing last newline included.
    for text in ("\n\n  \nA\nB\n\nC", "A", "A\n\n\n", "\tA\n\tB\n \n\nC\n\nD\n \n"):
        f.write_text(text)
        docs = list(read_documents(str(f)))
        assert "".join(d.text for d in docs) == text
        assert all(d.text.strip() for d in docs) and [d.continued for d in docs] == [True] * (len(docs) - 1) + [False]
    f.write_bytes(b"A\r\n\r\nB\rC")  # universal newlines, as text mode reads them
    assert "".join(d.text for d in read_documents(str(f))) == "A\n\nB\nC"
    f.write_bytes("\ufeffA\n\nB".encode())  # a byte-order mark is not text
    assert "".join(d.text for d in read_documents(str(f))) == "A\n\nB"
    f.write_bytes("\ufeff\n".encode())
    with pytest.raises(LoopfitError, match="no documents"):
        list(read_documents(str(f)))
    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
    if real.is_file():  # the real corpus: every byte is trained on, 1 + its blank runs documents
        docs = list(read_documents(str(real)))
        assert "".join(d.text for d in docs) == real.read_text(encoding="utf-8")


def test_paragraphs_of_a_text_file_get_no_separator(tok, tmp_path):
    """A paragraph the file goes on after is packed with its blank lines and without an EOS (the raw text has none
    there); the file's last paragraph gets its trained EOS as any document."""
    f = tmp_path / "a.txt"
    f.write_text("Alpha beta.\n\nGamma delta.\n")
    docs = tokenize_documents(list(read_documents(str(f))), tok)
    assert [(d.separator, d.train_separator) for d in docs] == [(False, False), (True, True)]
    assert [d.packed_size for d in docs] == [len(docs[0].input_ids), len(docs[1].input_ids) + 1]
    rows = pack_documents(docs, 64, tok.eos_token_id, tok.pad_token_id)
    real = rows.input_ids[0, : rows.num_tokens[0]].tolist()
    assert real.count(tok.eos_token_id) == 1 and rows.num_tokens[0] == sum(d.packed_size for d in docs)
    assert "".join(tok.decode(d.input_ids) for d in docs) == f.read_text()


def test_file_runs_group_a_files_paragraphs_lazily(tmp_path):
    """Each text file's paragraphs form one run, any other document is alone, a source cut inside a file ends on a
    continued paragraph, and nothing past the current run is read."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("One.\n\nTwo.\n\nThree.\n")
    b.write_text("Lone paragraph.\n")
    docs = [*read_documents(str(a)), Document(prompt="q", response="r"), *read_documents(str(b))]
    docs += list(read_documents(str(a), limit=2))  # cut short: both paragraphs are continued
    runs = [[d.text or d.prompt for d in run] for run in paragraphs.file_runs(docs)]
    assert runs == [["One.\n\n", "Two.\n\n", "Three.\n"], ["q"], ["Lone paragraph.\n"], ["One.\n\n", "Two.\n\n"]]

    read = []
    stream = paragraphs.file_runs(read.append(d) or d for d in docs)
    assert [d.text for d in next(stream)] == ["One.\n\n", "Two.\n\n", "Three.\n"]
    assert len(read) == 4  # groupby looks one document ahead to find the run's end, no further
    indices = [list(r) for r in paragraphs.file_runs(range(len(docs)), lambda i: docs[i].continued)]
    assert indices == [[0, 1, 2], [3], [4], [5, 6]]


def merging_tokenizer():
    """`byte_tokenizer` with a BOS and two merges, newline + newline and that + space: like SmolLM2's tokenizer, it
    reads "\n\n" as one token at the end of a text and as two before more text (GPT-2's pre-tokenisation splits off
    the last one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {
        "\u010a\u010a": len(alphabet),
        "\u010a\u010a\u0120": len(alphabet) + 1,
    }
    # The second merge makes a token that runs across a paragraph start: "\n\n " before an indented paragraph.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u010a", "\u010a"), ("\u010a\u010a", "\u0120")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    bos = hf.convert_tokens_to_ids("<s>")
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return hf


@pytest.mark.parametrize("batch", [512, 2])  # 2: the file tokenised two paragraphs at a time, cut the same
def test_paragraphs_are_tokenised_as_the_file_reads(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(paragraphs, "BATCH", batch)
    tok = merging_tokenizer()
    two = tok.convert_tokens_to_ids("\u010a\u010a")
    assert tok("Ab.\n\n", add_special_tokens=False).input_ids[-1] == two  # alone: one token ...
    assert two not in tok("Ab.\n\nCd", add_special_tokens=False).input_ids  # ... in running text: two
    f = tmp_path / "a.txt"
    # Paragraphs 2, 4 and 6 are indented: "\n\n " before them is one token that runs into them (and, two paragraphs
    # at a time, into the next batch).
    text = "\n".join(f"{'  ' * (i in (2, 4, 6))}Speaker {i}:\nline {i} \u00e9t\u00e9.\n" for i in range(7)) + "\nEnd."
    f.write_text(text)
    docs = list(read_documents(str(f)))
    assert len(docs) == 8
    tokenized = tokenize_documents(docs, tok)
    assert [t for d in tokenized for t in d.input_ids] == tok(text).input_ids  # BOS once, then the file's tokens
    newline, span = tok.convert_tokens_to_ids(["\u010a", "\u010a\u010a\u0120"])
    assert tokenized[0].input_ids[-2:] == [newline, newline] and tokenized[1].input_ids[-1] == span
    assert tokenized[2].input_ids[:2] == tok(" Speaker", add_special_tokens=False).input_ids[:2]
    assert [d.separator for d in tokenized] == [False] * 7 + [True] and tokenized[-1].train_separator
    # A source cut short (--max_documents) ends on a paragraph the file goes on after: no EOS there either; only the
    # cut paragraph's last blank line, with no text after it to read, may tokenise otherwise.
    cut = tokenize_documents(docs[:3], tok)
    assert [d.input_ids for d in cut[:2]] == [d.input_ids for d in tokenized[:2]] and not any(d.separator for d in cut)
    assert tok.decode([t for d in cut for t in d.input_ids], skip_special_tokens=True) == "".join(
        d.text for d in docs[:3]
    )
    assert cut[2].input_ids[-1] == two


def test_jsonl_parquet_and_hf_folder_give_the_same_documents(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "qa.jsonl", QA)
    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "qa.parquet")
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "hf"))
    want = [Document(prompt=r["question"], response=r["answer"]) for r in QA]
    assert list(read_documents(jsonl)) == want
    assert list(read_documents(str(tmp_path / "qa.parquet"))) == want
    assert list(read_documents(str(tmp_path / "hf"))) == want
    assert list(read_documents(jsonl, format="gsm8k")) == want
    # configurable fields
    assert [d.text for d in read_documents(jsonl, text_field="answer", limit=2)] == [QA[0]["answer"], QA[1]["answer"]]
    renamed = write_jsonl(tmp_path / "r.jsonl", [{"q": r["question"], "a": r["answer"]} for r in QA])
    assert list(read_documents(renamed, question_field="q", answer_field="a")) == want


def test_a_tokenizer_that_appends_eos_gets_one_separator(tmp_path):
    """A post-processor "<s> $A </s>" already ends each text with EOS; packing's separator must not double it."""
    from tokenizers import processors

    tok = merging_tokenizer()
    eos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", eos)]
    )
    assert tok("a").input_ids[-1] == eos
    f = tmp_path / "a.txt"
    f.write_text("Ab.\n\nCd.\n")
    qa = write_jsonl(tmp_path / "qa.jsonl", QA[:2])
    for source in (str(f), qa):
        rows = build_dataset(source, tok, 512).train.rows
        real = rows.input_ids[0, : rows.num_tokens[0]].tolist()
        assert real.count(eos) == (1 if source == str(f) else 2)  # the file: one, at its end
        assert real.count(tok.bos_token_id) == (1 if source == str(f) else 2)


def _whole_file_cases():
    """(tokenizer, text) pairs where cutting paragraphs by offsets is easy to get wrong."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    trimmed = merging_tokenizer()
    # RoBERTa-style: a space token's offsets moved to its end.
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    metaspace = Tokenizer(
        models.BPE(vocab={"<unk>": 0, "\u2581": 1, "A": 2, "B": 3, "\n": 4}, merges=[], unk_token="<unk>")
    )
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # a word mark at a string's start
    metaspace = PreTrainedTokenizerFast(tokenizer_object=metaspace, eos_token="</s>")
    return [(trimmed, "A\n\n  B\n\nA  "), (metaspace, "A\n\nB\n\nA\nB\n\nB")]


@pytest.mark.parametrize("case", [0, 1])
def test_paragraph_cuts_hold_for_trimmed_offsets_and_word_marks(tmp_path, monkeypatch, case):
    """One paragraph per batch, the hardest cut: every token of the file once, none invented at a batch start."""
    monkeypatch.setattr(paragraphs, "BATCH", 1)
    tok, text = _whole_file_cases()[case]
    f = tmp_path / "a.txt"
    f.write_text(text)
    docs = list(read_documents(str(f)))
    assert len(docs) == 3 + case
    assert [t for d in tokenize_documents(docs, tok) for t in d.input_ids] == tok(text).input_ids


def test_a_slow_tokenizers_bos_comes_once_per_file(tmp_path):
    """Without offsets each paragraph is tokenised alone, but the tokenizer's BOS still only starts the file."""
    from transformers.tokenization_python import PythonBackend

    class CharTokenizer(PythonBackend):
        def __init__(self, **kw):
            self.vocab = {c: i for i, c in enumerate(["<s>", "</s>", "<unk>", *"\n abcdef"])}
            super().__init__(bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kw)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text, **kw):
            return list(text)

        def _convert_token_to_id(self, t):
            return self.vocab.get(t, 2)

        def _convert_id_to_token(self, i):
            return {v: k for k, v in self.vocab.items()}.get(i, "<unk>")

        def build_inputs_with_special_tokens(self, a, b=None):
            return [0] + a

    tok = CharTokenizer()
    assert not tok.is_fast and tok("ab").input_ids == [0, 3 + 2, 3 + 3]
    f = tmp_path / "a.txt"
    f.write_text("ab\n\ncd\n\n\nef")
    docs = tokenize_documents(list(read_documents(str(f))), tok)
    assert [t for d in docs for t in d.input_ids] == tok(f.read_text()).input_ids  # one BOS, at the start
    assert [d.separator for d in docs] == [False, False, True]


def test_document_text_plain_and_chat(tok):
    doc = Document(prompt="What is 2+2?", response="4\n#### 4")
    assert document_text(doc) == "Question: What is 2+2?\nAnswer: 4\n#### 4"
    assert document_text(Document(text="hello")) == "hello"
    chat = document_text(doc, tok, chat=True, system="Be brief.")
    assert chat == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4\n#### 4<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing.jsonl"), "not found"),
        (lambda p: write_jsonl(p / "e.jsonl", []), "no documents"),
        (lambda p: write_jsonl(p / "t.jsonl", [{"body": "x"}]), "no field 'text'"),
        (
            lambda p: (p / "bad.jsonl").write_text('{"text": 1}\nnot json\n') and str(p / "bad.jsonl"),
            "is int, not text",
        ),
        (lambda p: (p / "x.bin").write_text("abc") and str(p / "x.bin"), "cannot tell the format"),
    ],
)
def test_bad_sources_raise_clear_errors(tmp_path, make, message):
    with pytest.raises(LoopfitError, match=message):
        list(read_documents(make(tmp_path)))


def test_wrong_field_and_format_errors(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(LoopfitError, match="no field 'body'"):
        list(read_documents(f, text_field="body"))
    with pytest.raises(LoopfitError, match="no field 'q'"):
        list(read_documents(f, format="gsm8k", question_field="q"))
    with pytest.raises(LoopfitError, match="unknown data format"):
        read_documents(f, format="xml")
    (tmp_path / "bad.jsonl").write_text('{"x": "a"}\nnot json\n')
    with pytest.raises(LoopfitError, match="line 2 is not valid JSON"):
        list(read_documents(str(tmp_path / "bad.jsonl"), text_field="x"))


# ---------------------------------------------------------------- packing


def _random_docs(n, seed, max_len):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        ids = [rng.randrange(3, 250) for _ in range(rng.randint(1, max_len))]
        docs.append(TokenizedDocument(ids, [rng.random() < 0.7 for _ in ids], rng.random() < 0.5))
    return docs


@pytest.mark.parametrize("seq_len", [16, 37])
def test_packing_is_lossless_and_never_splits_a_fitting_document(seq_len):
    eos, pad = 1, 0
    docs = _random_docs(200, seq_len, max_len=3 * seq_len)
    rows = pack_documents(docs, seq_len, eos, pad)
    # Concatenating all rows without padding equals concatenating the pieces (document + EOS) in packing order.
    real = np.concatenate([rows.input_ids[r, : rows.num_tokens[r]] for r in range(len(rows.num_tokens))])
    pieces = [([*docs[d].input_ids, eos])[a:b] for row in rows.segments for d, a, b in row]
    assert real.tolist() == [t for p in pieces for t in p]
    # Each document (with its EOS) appears exactly once, whole and in order across its pieces.
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for row in rows.segments:
        for d, a, b in row:
            by_doc.setdefault(d, []).append((a, b))
    assert sorted(by_doc) == list(range(len(docs)))
    for d, spans in by_doc.items():
        n = len(docs[d].input_ids) + 1
        assert sorted(spans)[0][0] == 0 and sum(b - a for a, b in spans) == n
        if n <= seq_len:
            assert len(spans) == 1
    # Labels: the document's trainable tokens, -100 elsewhere; padding is masked and uses pad ids.
    for r, row in enumerate(rows.segments):
        k = 0
        for d, a, b in row:
            doc = docs[d]
            want = [t if m else IGNORE_INDEX for t, m in zip(doc.input_ids, doc.trainable)]
            want.append(eos if doc.train_separator else IGNORE_INDEX)
            assert rows.labels[r, k : k + b - a].tolist() == want[a:b]
            assert rows.position_ids[r, k : k + b - a].tolist() == list(range(b - a))
            k += b - a
        assert (rows.labels[r, k:] == IGNORE_INDEX).all() and (rows.input_ids[r, k:] == pad).all()
    assert 1 - rows.num_tokens.sum() / rows.input_ids.size < 0.15  # best fit keeps padding low


# ---------------------------------------------------------------- build, mix, split, prepared folders


def test_build_dataset_items_val_split_and_hash(tok, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = build_dataset(f, tok, 64, val_fraction=0.25, seed=1, position_ids=True)
    item = data.train[0]
    assert set(item) == {"input_ids", "labels", "position_ids"}
    assert all(v.dtype == torch.long and v.shape == (64,) for v in item.values())
    assert data.manifest["sources"][0]["val_documents"] == 10
    # The same documents are held out whatever the order of the source.
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", random.Random(0).sample(QA, len(QA)))
    again = build_dataset(shuffled, tok, 64, val_fraction=0.25, seed=1, position_ids=True)

    def val_texts(d):
        return [tok.decode(d.val.rows.input_ids[r, : d.val.num_tokens[r]]) for r in range(len(d.val))]

    assert val_texts(again) == val_texts(data)
    assert np.array_equal(again.val.rows.labels, data.val.rows.labels)
    assert build_dataset(f, tok, 64, val_fraction=0.25, seed=1, position_ids=True).data_hash == data.data_hash
    assert build_dataset(f, tok, 64, val_fraction=0.25, seed=2).data_hash != data.data_hash
    train_text = "".join(tok.decode(data.train.rows.input_ids[r]) for r in range(len(data.train)))
    assert not any(q in train_text for q in val_texts(data))
    assert len(build_dataset(f, tok, 64).val) == 0


def test_default_data_is_generated_and_mixing_follows_weights(tok, tmp_path):
    data = build_dataset(None, tok, 512, max_documents=30)
    assert data.manifest["sources"][0]["spec"] == "arithmetic" and data.manifest["sources"][0]["documents"] == 30
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i} " * 5 for i in range(200)))
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    mixed = build_dataset([f"{text}:0.25", f"{qa}:0.75"], tok, 128, seed=3)
    t, q = (s["train_tokens_used"] for s in mixed.manifest["sources"])
    assert q == sum(len(r["question"]) + len(r["answer"]) + len("Question: \nAnswer: ") + 1 for r in QA)  # all used
    longest = max(len(f"paragraph {i} " * 5) + 3 for i in range(200))  # with its blank line and EOS
    assert abs(t - q * 0.25 / 0.75) <= longest / 2  # the share is as close to 25% as whole documents allow
    assert 0 < mixed.manifest["sources"][0]["train_documents_used"] < 200
    with pytest.raises(LoopfitError, match="sum to a positive"):
        build_dataset([f"{text}:0", f"{qa}:0"], tok, 128)
    with pytest.raises(LoopfitError, match="not found"):
        build_dataset([f"{qa}:1", str(tmp_path / "nope.txt")], tok, 128)


def _windows(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[k : k + n]) for k in range(0, len(ids), n)]


def _real_rows(ds) -> list[tuple[int, ...]]:
    return [tuple(ds.rows.input_ids[r, : ds.rows.num_tokens[r]].tolist()) for r in range(len(ds))]


@pytest.mark.parametrize("position_ids", [False, True])
def test_text_stream_rows_are_the_files_windows(tok, tmp_path, position_ids):
    """With text_stream a text file trains as nanoGPT reads it: its token stream (the whole file's tokenisation and
    one EOS) cut into consecutive seq_len windows, one per row; without it the rows hold its paragraphs packed."""
    f = tmp_path / "a.txt"
    text = "".join(f"Paragraph {i} says {'la ' * (i % 7)}.\n\n" for i in range(40)) + "The end.\n"
    f.write_text(text)
    stream = tok(text)["input_ids"] + [tok.eos_token_id]
    data = build_dataset(str(f), tok, 64, text_stream=True, position_ids=position_ids)
    assert sorted(_real_rows(data.train)) == sorted(_windows(stream, 64))
    assert data.manifest["text_stream"] is True
    if position_ids:  # each window is a document of its own: positions restart, its first token is no target
        item = data.train[0]
        assert torch.equal(item["position_ids"][: data.train.rows.num_tokens[0]], torch.arange(len(item["labels"])))
        assert item["labels"][0] == IGNORE_INDEX
    plain = build_dataset(str(f), tok, 64, position_ids=position_ids)
    assert sorted(_real_rows(plain.train)) != sorted(_windows(stream, 64))
    assert plain.data_hash != data.data_hash  # a run or cache built one way refuses the other


def test_text_stream_windows_mix_and_split_like_documents(tok, tmp_path):
    """Windows, not whole files, are what the token-share mix subsamples; a held-out split keeps whole paragraphs,
    each side joining its own in file order, and nothing of the file is lost or repeated."""
    f = tmp_path / "a.txt"
    paragraphs_ = [f"Paragraph {i} says {'ho ' * (i % 5)}.\n\n" for i in range(60)]
    f.write_text("".join(paragraphs_))
    qa = write_jsonl(tmp_path / "qa.jsonl", QA[:10])  # fewer tokens than the file: the file is subsampled
    mixed = build_dataset([f"{f}:0.5", f"{qa}:0.5"], tok, 32, text_stream=True)
    text_rec = mixed.manifest["sources"][0]
    assert 0 < text_rec["train_documents_used"] < text_rec["train_documents_available"]  # some windows of the file
    assert text_rec["train_units"] == "windows" and mixed.manifest["sources"][1]["train_units"] == "documents"
    assert text_rec["documents"] == 60 and text_rec["train_documents_available"] < 60  # paragraphs, then windows
    split = build_dataset(str(f), tok, 32, text_stream=True, val_fraction=0.25)
    train_text = "".join(tok.decode(r, skip_special_tokens=True) for r in _real_rows(split.train))
    val_text = "".join(tok.decode(r, skip_special_tokens=True) for r in _real_rows(split.val))
    held = [p for p in paragraphs_ if p in val_text]
    assert len(held) == 15 and all(p not in train_text for p in held)
    assert sorted(train_text + val_text) == sorted("".join(paragraphs_))  # the same characters, once each


def test_text_stream_leaves_records_alone_and_windows_a_file_without_blank_lines(tok, tmp_path):
    """Records keep their rows and held-out order (the data hash of a JSONL source does not depend on the flag); a
    text file without blank lines (one paragraph) is windowed too, so a mix takes a share of it, not all or nothing."""
    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    for val_fraction in (0.0, 0.25):
        a = build_dataset(qa, tok, 64, val_fraction=val_fraction)
        b = build_dataset(qa, tok, 64, val_fraction=val_fraction, text_stream=True)
        assert _real_rows(a.val) == _real_rows(b.val) and _real_rows(a.train) == _real_rows(b.train)
    one = tmp_path / "one.txt"
    one.write_text("".join(f"Line {i} of a file without blank lines.\n" for i in range(100)))
    alone = build_dataset(str(one), tok, 32, text_stream=True)
    assert sorted(_real_rows(alone.train)) == sorted(
        _windows(tok(one.read_text())["input_ids"] + [tok.eos_token_id], 32)
    )
    mixed = build_dataset(
        [f"{one}:0.5", f"{write_jsonl(tmp_path / 'few.jsonl', QA[:10])}:0.5"], tok, 32, text_stream=True
    )
    rec = mixed.manifest["sources"][0]
    assert 0 < rec["train_documents_used"] < rec["train_documents_available"]


def test_prepared_folder_round_trip(tok, tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = build_dataset(f, tok, 48, chat=True, assistant_only=True, val_fraction=0.1)
    out = save_prepared(data, tmp_path / "prep", shards=3)
    assert sorted(p.name for p in out.iterdir()) == [
        ".loopfit.json", "manifest.json", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
        "train-00002-of-00003.parquet", "val.parquet",
    ]  # fmt: skip
    loaded = build_dataset(str(out), tok, 48)
    assert loaded.data_hash == data.data_hash and len(loaded.train) == len(data.train)
    for i in range(len(data.train)):
        for k in ("input_ids", "labels"):
            assert torch.equal(loaded.train[i][k], data.train[i][k])
    with pytest.raises(LoopfitError, match="seq_len 48"):
        build_dataset(str(out), tok, 64)
    with pytest.raises(LoopfitError, match="cannot be mixed"):
        build_dataset([str(out), f], tok, 48)
    with pytest.raises(LoopfitError, match="without position ids"):
        load_prepared(out, tok, 48, position_ids=True)
    (out / "val.parquet").unlink()
    with pytest.raises(LoopfitError, match="incomplete"):
        load_prepared(out, tok, 48)
