"""`loopfit convert` / `generate`: layouts, static baselines, CLI errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from loopfit.cli import main
from loopfit.convert import Layout, layout_from_sizes, parse_layout, to_static
from loopfit.errors import LoopfitError


def test_parse_layout_and_sizes():
    assert parse_layout("0-3:10-15:26-29", 30) == Layout([0, 1, 2, 3], list(range(10, 16)), [26, 27, 28, 29])
    assert parse_layout("0,2:4:", 6) == Layout([0, 2], [4], [])
    assert str(parse_layout("0-3:20-25:26-29", 30)) == "0-3:20-25:26-29"
    assert layout_from_sizes(30, 4, 6, 4) == Layout([0, 1, 2, 3], list(range(20, 26)), [26, 27, 28, 29])
    assert layout_from_sizes(30, 4, 6, 4).dropped(30) == list(range(4, 20))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0-3:4-5", "three"),
        ("0-3:4-40:41", "out of range"),
        ("0-3:3-5:6", "more than once"),
        ("0:x:1", "parse"),
        ("0-1::2", "at least one"),
    ],
)
def test_parse_layout_errors(spec, message):
    with pytest.raises(LoopfitError, match=message):
        parse_layout(spec, 30)


def test_static_keeps_layers_in_order():
    src = make_tiny_model("llama")
    layout = Layout([0], [3, 4], [5])
    static = to_static(src, layout)
    assert static.config.num_hidden_layers == 4
    x = torch.randint(3, 260, (1, 9))
    h = src.model.embed_tokens(x)
    ref = src.model(x, output_hidden_states=True)  # noqa: F841  (sanity: source still runs)
    for i, layer in enumerate(static.model.layers):
        torch.testing.assert_close(layer.mlp.down_proj.weight, src.model.layers[layout.kept[i]].mlp.down_proj.weight)
    assert static(x).logits.shape == (1, 9, 260) and h.shape[-1] == 32


def test_cli_convert_generate_round_trip(tiny_source_dir, tmp_path, capsys):
    out = tmp_path / "looped"
    main(
        [
            "convert",
            str(tiny_source_dir),
            "--out",
            str(out),
            "--layers",
            "0-1:2-3:4-5",
            "--adapter_init",
            "random",
            "--mean_recurrence",
            "3",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "looped" and model.config.layout == "0,1:2,3:4,5"
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
    }
    main(["generate", str(out), "--prompt", "Hi", "--num_steps", "2", "--chat=true", "--max_new_tokens", "3"])
    assert "[R=2]" in capsys.readouterr().out
    static = tmp_path / "static"
    main(
        [
            "convert",
            str(tiny_source_dir),
            "--out",
            str(static),
            "--prelude",
            "2",
            "--block",
            "2",
            "--coda",
            "1",
            "--static=true",
        ]
    )
    assert AutoModelForCausalLM.from_pretrained(static).config.num_hidden_layers == 5


def test_random_adapter_is_reproducible_and_seeded(tiny_source_dir, tmp_path):
    """`--adapter_init random` draws from the conversion's seed, not the global RNG: same seed same weights."""
    from safetensors.torch import load_file

    def adapter(name, *extra):
        torch.manual_seed(len(name))  # a different global RNG state each time: it must not matter
        main(
            ["convert", str(tiny_source_dir), "--out", str(tmp_path / name), "--layers", "0-1:2-3:4-5"]
            + ["--adapter_init", "random", *extra]
        )
        return load_file(tmp_path / name / "model.safetensors")["model.adapter.weight"]

    a, b, c = adapter("a"), adapter("bb"), adapter("c", "--seed", "1")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "c").config
    assert cfg.seed == 1
    std = cfg.adapter_init_std
    assert a.abs().max() <= 3 * std and abs(a.std().item() - std) < 0.2 * std  # truncated at 3 sigma


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0-1:2-9:4-5"], "out of range"),
        (["--layers", "0-2:2-3:4-5"], "more than once"),
        (["--prelude", "2", "--block", "5", "--coda", "2"], "needs 9 layers"),
        (["--layers", "0:1:2", "--mean_recurrence", "0"], "mean_recurrence"),
        (["--layers", "0:1:2", "--adapter_init", "magic"], "adapter_init"),
    ],
)
def test_cli_bad_input_one_line_error_no_output(tiny_source_dir, tmp_path, args, message):
    out = tmp_path / "bad"
    proc = subprocess.run(
        [sys.executable, "-m", "loopfit", "convert", str(tiny_source_dir), "--out", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_cli_missing_model_and_unknown_architecture(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--layers", "0:1:2"])
    assert exc.value.code == 2 and "model not found" in capsys.readouterr().err
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"), "--layers", "0:1:"])
    assert "not supported; supported: llama" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_real_smollm2_convert_and_generate(tmp_path, capsys):
    out = tmp_path / "smol"
    main(["convert", "smollm2-135m", "--out", str(out), "--prelude", "4", "--block", "6", "--coda", "4"])
    main(
        ["generate", str(out), "--prompt", "What is 12*7?", "--num_steps", "2", "--chat=true", "--max_new_tokens", "4"]
    )
    assert "[R=2]" in capsys.readouterr().out


def test_repeated_list_flags_append():
    from loopfit.cli import repeated_flags_append

    assert repeated_flags_append(["prepare", "--data", "a", "--data", "b", "--data=c", "--seq_len", "8"]) == [
        "prepare",
        "--data",
        "a",
        "--data+",
        "b",
        "--data+=c",
        "--seq_len",
        "8",
    ]


def test_generate_several_prompts(tiny_source_dir, tmp_path, capsys):
    out = tmp_path / "looped"
    main(["convert", str(tiny_source_dir), "--out", str(out), "--layers", "0:1-4:5"])
    main(["generate", str(out), "--prompt", "Hi", "--prompt", "Yo", "--max_new_tokens", "2"])
    printed = capsys.readouterr().out
    assert "'Hi'" in printed and "'Yo'" in printed


def test_outputs_follow_umask(tiny_source_dir, tmp_path):
    import os

    from loopfit.io import write_json

    write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
    out = tmp_path / "looped"
    main(["convert", str(tiny_source_dir), "--out", str(out), "--layers", "0:1-4:5"])
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
