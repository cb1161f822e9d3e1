import json
import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit.convert import Layout, to_looped
from loopfit.errors import LoopfitError
from loopfit.evaluate import chunk_tokens, depth_sweep

SMALL = Layout([0], [2, 3], [5])


def _looped(adapter_init="random", layout=SMALL, **kw):
    src = make_tiny_model("llama", num_layers=6, hidden=32)
    return src, to_looped(src, layout, adapter_init=adapter_init, **kw).eval()


def test_chunking_covers_every_token_once():
    ids = list(range(10, 10 + 23))
    batches = chunk_tokens(ids, seq_len=8, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (1, 7)]
    flat = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).tolist()
    assert flat == ids
    # 3 chunks (8, 8, 7 tokens) predict 7 + 7 + 6 tokens
    assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) == 20
    # a last chunk of one token predicts nothing and is dropped
    assert len(chunk_tokens(list(range(17)), 8, 8)[0]["input_ids"]) == 2


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_depth_sweep_equals_direct_forward_at_each_depth(cache_mode):
    _, lm = _looped(cache_mode=cache_mode)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (37,), generator=g).tolist()
    batches = chunk_tokens(ids, seq_len=16, batch_size=2)
    out = depth_sweep(lm, batches, [1, 3, 5])
    assert out["depths"] == [1, 3, 5] and out["tokens"] == 36 - 2
    with torch.no_grad():
        for r, loss in zip(out["depths"], out["loss"]):
            total = n = 0
            for b in batches:
                for row, lab in zip(b["input_ids"], b["labels"]):
                    keep = lab != -100
                    logits = lm(input_ids=row[keep][None], num_steps=r).logits[0, :-1]
                    total += torch.nn.functional.cross_entropy(logits, row[keep][1:], reduction="sum").item()
                    n += int(keep.sum()) - 1
            assert loss == pytest.approx(total / n, rel=1e-5)
    assert out["ppl"][0] == pytest.approx(math.exp(out["loss"][0]))
    assert len(set(out["loss"])) == 3  # a random adapter makes depth matter


def test_identity_adapter_at_depth_one_equals_source_loss():
    src, lm = _looped("identity", Layout([0, 1], [2, 3], [4, 5]))
    ids = torch.randint(4, 260, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    batches = chunk_tokens(ids, seq_len=20, batch_size=4)
    looped = depth_sweep(lm, batches, [1, 2])
    plain = depth_sweep(src, batches, [1, 2])
    assert looped["loss"][0] == pytest.approx(plain["loss"][0], rel=1e-5)
    assert plain["loss"][0] == plain["loss"][1]  # a plain model ignores the depth
    # the identity adapter [0 | I] ignores the state: every depth computes block(e), the source model
    assert looped["loss"][1] == pytest.approx(looped["loss"][0], rel=1e-5)


def test_eval_command_end_to_end(tmp_path, capsys):
    from loopfit.cli import main

    src, lm = _looped()
    tok = make_tiny_tokenizer()
    folder, base = tmp_path / "looped", tmp_path / "base"
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    src.save_pretrained(base)
    tok.save_pretrained(base)
    text = tmp_path / "held.txt"
    text.write_text("To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer\n" * 3)
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    main(
        [
            "eval",
            str(folder),
            "--data",
            str(text),
            "--seq_len",
            "32",
            "--depths",
            "1,2,4",
            "--baseline",
            str(base),
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--batch_size",
            "3",
        ]
    )
    res = json.loads(out_json.read_text())
    n_tok = len(tok(text.read_text(), add_special_tokens=False)["input_ids"])
    assert res["tokens"] == n_tok - math.ceil(n_tok / 32)
    assert res["depths"] == [1, 2, 4] and len(res["loss"]) == len(res["ppl"]) == 3
    batches = chunk_tokens(tok(text.read_text(), add_special_tokens=False)["input_ids"], 32, 3)
    assert res["baseline_loss"] == pytest.approx(depth_sweep(src, batches, [1])["loss"][0], rel=1e-5)
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "baseline" in capsys.readouterr().out
    with pytest.raises(LoopfitError, match="--data is required"):
        from loopfit.evaluate import eval_command

        eval_command(str(folder))


def test_val_fraction_uses_the_training_split(tmp_path):
    from loopfit.data import build_dataset
    from loopfit.evaluate import validation_batches

    tok = make_tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "words and more words " * (i % 4 + 1) for i in range(40)))
    val = build_dataset(str(text), tok, 32, val_fraction=0.25, seed=3).val
    batches = validation_batches(str(text), tok, 32, 0.25, batch_size=4, seed=3)
    assert sum(len(b["input_ids"]) for b in batches) == len(val) > 0
    assert torch.equal(batches[0]["input_ids"][0], val[0]["input_ids"])
    assert batches[0]["attention_mask"][0].sum() == val.num_tokens[0]
    _, lm = _looped()
    out = depth_sweep(lm, batches, [1, 2])
    assert out["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def test_parse_depths():
    from loopfit.evaluate import parse_depths

    assert parse_depths("1,2,4", [8]) == [1, 2, 4]
    assert parse_depths("[1, 16]", [8]) == [1, 16]
    assert parse_depths([3], [8]) == [3] and parse_depths(None, [8]) == [8]
    for bad in ("1,x", "0,2", ""):
        with pytest.raises(LoopfitError, match="--depths"):
            parse_depths(bad, [8])


@pytest.mark.integration
def test_smollm2_identity_loop_at_depth_one_equals_source():
    from loopfit.evaluate import file_token_ids
    from loopfit.loading import load_model, load_tokenizer

    src = load_model("smollm2-135m").eval()
    lm = to_looped(src, Layout(list(range(4)), list(range(4, 26)), list(range(26, 30))), adapter_init="identity")
    ids = file_token_ids("../shared/data/text/tinyshakespeare.txt", load_tokenizer("smollm2-135m"), 300)
    batches = chunk_tokens(ids, 150, 2)
    looped, plain = depth_sweep(lm, batches, [1]), depth_sweep(src, batches, [1])
    assert looped["tokens"] == plain["tokens"] == 298
    assert looped["loss"][0] == pytest.approx(plain["loss"][0], rel=1e-4)
    assert 1.0 < plain["loss"][0] < 6.0


def test_padded_batches_give_the_same_loss():
    _, lm = _looped()
    ids = torch.randint(4, 260, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    one = depth_sweep(lm, chunk_tokens(ids, 16, 1), [1, 3])
    padded = depth_sweep(lm, chunk_tokens(ids, 16, 3), [1, 3])  # chunks of 16, 16 and 5 tokens in one batch
    assert padded["tokens"] == one["tokens"]
    assert padded["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    from conftest import write_teacher_and_looped_student

    from loopfit.data.prepare import prepare_command

    root = write_teacher_and_looped_student(tmp_path_factory.mktemp("evalrun"))
    src, lm = _looped()  # a random adapter: the loss changes with the depth
    lm.save_pretrained(root / "looped")
    rows = [{"question": f"What is {i} plus {i % 5}?", "answer": f"{i} plus {i % 5} is {i + i % 5}. " * (1 + i % 3)}
            for i in range(48)]  # fmt: skip
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_command(str(root / "qa.jsonl"), chat=True, assistant_only=True, tokenizer=str(root / "looped"),
                    seq_len=48, val_fraction=0.2, position_ids=True, out=str(root / "prepared"))  # fmt: skip
    return root


# (model, data, the run's flags); `val_data` names the run's --val_data source, `eval_batches` becomes --max_rows
RUNS = {
    "stream": ("looped", "data.txt", dict(val_fraction=0.2, text_stream=True)),
    "capped": ("looped", "data.txt", dict(val_fraction=0.25, max_documents=40, seed=3)),
    "chat-positions": ("looped", "qa.jsonl", dict(val_fraction=0.2, chat=True, assistant_only=True, position_ids=True)),
    "val-data": ("looped", "data.txt", dict(val_data="qa.jsonl", chat=True, system_prompt="Be brief.")),
    "plain-positions": ("teacher", "qa.jsonl", dict(val_fraction=0.2, chat=True, position_ids=True)),
    "mix": ("looped", ["data.txt:0.5", "qa.jsonl:0.5"], dict(val_fraction=0.2, chat=True, seed=2)),
    "first-rows": ("looped", "data.txt", dict(val_fraction=0.3, eval_batches=2)),
    "prepared": ("looped", "prepared", dict(val_fraction=0.2, position_ids=True)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_eval_gives_the_runs_own_validation_loss(run_files, tmp_path, name):
    """`loopfit eval` with a run's data flags scores exactly the rows the run validates on, as the run does."""
    from loopfit.cli import main
    from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
    from loopfit.train.recipe import setup, validate

    model, data, flags = RUNS[name]
    flags = dict(flags)
    sources = [str(run_files / d) for d in ([data] if isinstance(data, str) else data)]
    if "val_data" in flags:
        flags["val_data"] = str(run_files / flags["val_data"])
    cfg = TrainConfig(model_name=str(run_files / model), out=str(tmp_path / "run"), data=sources, seq_len=48,
                      batch_size=2, max_steps=1, progress_bar=False, tensorboard=False, precision="fp32",
                      lora=LoRAConfig(enabled=True, r=4), distillation=DistillationConfig(enabled=False),
                      **flags)  # fmt: skip
    depths = [1, 3] if model == "looped" else [1]
    run = setup(cfg)
    want = validate(run, depths)
    run.logger.close()
    rows = len(run.val_set) if not cfg.eval_batches else cfg.eval_batches * cfg.batch_size
    assert rows >= 2
    if "val_data" in flags:
        sources = [flags.pop("val_data")]
    if "eval_batches" in flags:
        flags["max_rows"] = flags.pop("eval_batches") * cfg.batch_size
    args = ["eval", str(run_files / model), "--seq_len", "48", "--depths", "1,3", "--batch_size", "3",
            "--json", str(tmp_path / "e.json")]  # fmt: skip
    for source in sources:
        args += ["--data", source]
    for k, v in flags.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    main(args)
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["loss"] == pytest.approx([want[r] for r in depths], rel=1e-5)
    assert got["tokens"] == sum(int((run.val_set[i]["labels"][1:] != -100).sum()) for i in range(rows))
    assert got["seed"] == cfg.seed and got["position_ids"] == cfg.position_ids
    if model == "looped":
        assert got["loss"][0] != pytest.approx(got["loss"][1], rel=1e-4)  # the depth matters: not one number twice


def test_eval_pipeline_flags_change_the_rows_and_bad_combinations_are_refused(run_files, tmp_path):
    from loopfit.evaluate import eval_command

    looped, qa, prepared = str(run_files / "looped"), str(run_files / "qa.jsonl"), str(run_files / "prepared")
    losses = {}
    for name, kw in {"plain": {}, "chat": dict(chat=True), "answers": dict(chat=True, assistant_only=True)}.items():
        eval_command(looped, data=qa, seq_len=48, depths="2", json=str(tmp_path / f"{name}.json"), **kw)
        losses[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert losses["answers"]["tokens"] < losses["chat"]["tokens"]
    assert losses["chat"]["chat"] is True and "chat" not in losses["plain"] and losses["plain"]["limit_tokens"] is None
    assert len({round(v["loss"][0], 6) for v in losses.values()}) == 3
    # a prepared folder without --val_fraction: all of its training rows
    eval_command(looped, data=prepared, seq_len=48, depths="2", json=str(tmp_path / "p.json"))
    from loopfit.data import build_dataset
    from loopfit.loading import load_tokenizer

    train = build_dataset(prepared, load_tokenizer(looped), 48).train
    targets = sum(int((train[i]["labels"][1:] != -100).sum()) for i in range(len(train)))
    assert json.loads((tmp_path / "p.json").read_text())["tokens"] == targets
    refused = {
        "--assistant_only and --system_prompt need --chat": dict(data=qa, assistant_only=True),
        "need --chat=true": dict(data=qa, system_prompt="Be brief."),
        "--limit_tokens cuts a whole file": dict(data=qa, val_fraction=0.2, limit_tokens=100),
        "--max_documents must be >= 1": dict(data=qa, max_documents=0),
        "--max_rows must be >= 1": dict(data=qa, max_rows=0),
        "without a split .* use --max_rows": dict(data=qa, chat=True, max_documents=10),
        "made with --text_stream false: .* follow --text_stream true": dict(data=prepared, text_stream=True),
        "made with --val_fraction 0.2: its rows cannot follow --val_fraction 0.5": dict(
            data=prepared, val_fraction=0.5
        ),
        "made with --system_prompt null: its rows cannot follow --system_prompt 'Hi'": dict(
            data=prepared, chat=True, system_prompt="Hi"
        ),
        r"--val_fraction must be in \[0, 1\)": dict(data=qa, val_fraction=1.0),
    }
    for message, kw in refused.items():
        with pytest.raises(LoopfitError, match=message):
            eval_command(looped, seq_len=48, **kw)
