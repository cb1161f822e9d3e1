"""Chat formatting and assistant-only masks: the labelled tokens decode exactly to the assistant answers."""

from __future__ import annotations

import itertools
import json

import pytest

from loopfit.data import IGNORE_INDEX, build_dataset, chat_messages, read_documents, tokenize_documents
from loopfit.errors import LoopfitError
from tests.test_data import byte_tokenizer

GSM8K = "../shared/data/gsm8k/train.jsonl"


def labelled_text(tok, td) -> str:
    return tok.decode([t for t, m in zip(td.input_ids, td.trainable) if m], skip_special_tokens=True)


def test_assistant_only_mask_with_a_byte_tokenizer():
    tok = byte_tokenizer()
    docs = list(itertools.islice(read_documents(None, seed=2), 20))
    for system in (None, "You solve problems."):
        tds = tokenize_documents(docs, tok, chat=True, assistant_only=True, system=system)
        for doc, td in zip(docs, tds):
            assert labelled_text(tok, td) == doc.response
            # The end-of-turn token is trained on (the model must learn to stop), the newline after it is not.
            last = max(i for i, m in enumerate(td.trainable) if m)
            assert td.input_ids[last] == tok.eos_token_id and not td.train_separator
            prompt = tok.apply_chat_template(
                chat_messages(doc, system)[:-1], tokenize=False, add_generation_prompt=True
            )
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            assert n > 0 and not any(td.trainable[:n]) and all(td.trainable[n:last])
    plain = tokenize_documents(docs, tok, assistant_only=True)
    assert all(labelled_text(tok, td) == d.response for d, td in zip(docs, plain))
    assert all(td.train_separator for td in plain)  # without a template, EOS ends the answer
    full = tokenize_documents(docs, tok, chat=True)
    assert all(all(td.trainable) for td in full)


def test_chat_needs_a_template():
    tok = byte_tokenizer()
    tok.chat_template = None
    docs = list(read_documents(None, limit=2))
    with pytest.raises(LoopfitError, match="chat template"):
        tokenize_documents(docs, tok, chat=True)


@pytest.mark.integration
def test_gsm8k_chat_masks_decode_to_the_answers_with_smollm2(tmp_path):
    from loopfit.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    docs = list(read_documents(GSM8K, format="gsm8k", limit=200))
    tds = tokenize_documents(docs, tok, chat=True, assistant_only=True)
    for doc, td in zip(docs, tds):
        assert labelled_text(tok, td) == doc.response
    # The same holds after packing: every row's labels decode to whole answers, separated by end-of-turn tokens.
    records = [json.loads(line) for line in itertools.islice(open(GSM8K), 200)]
    data = build_dataset(GSM8K, tok, 512, chat=True, assistant_only=True, max_documents=200)
    answers = []
    for i in range(len(data.train)):
        labels = data.train[i]["labels"]
        answers += tok.decode(labels[labels != IGNORE_INDEX]).split(tok.eos_token)[:-1]
    assert sorted(answers) == sorted(r["answer"] for r in records)


@pytest.mark.integration
def test_prepare_command_writes_a_loadable_folder(tmp_path, capsys):
    from loopfit.cli import main
    from loopfit.loading import load_tokenizer

    out = tmp_path / "prep"
    args = ["prepare", "--data", GSM8K, "--format", "gsm8k", "--chat=true", "--assistant_only=true", "--seq_len",
            "256", "--max_documents", "60", "--val_fraction", "0.1", "--shards", "2", "--out", str(out)]  # fmt: skip
    main(args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["val_documents"] == 6 and len(manifest["shards"]) == 2
    data = build_dataset(str(out), load_tokenizer("smollm2-135m"), 256)
    assert data.data_hash == manifest["data_hash"] and len(data.val) > 0
    with pytest.raises(SystemExit) as e:
        main(args)  # the folder exists now
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")])
    assert capsys.readouterr().err.strip() == f"loopfit: error: data file not found: {tmp_path / 'missing.jsonl'}"
    assert not (tmp_path / "x").exists()
