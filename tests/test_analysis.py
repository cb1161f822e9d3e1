"""Layer analysis: block influence / angular distance sums, knees and zones, suggested layout, `loopfit analyze`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoConfig

from loopfit.analysis import (
    calibration_batches,
    envelope,
    find_zones,
    layer_stats,
    residual_streams,
    suggest,
    suggest_layout,
)
from loopfit.cli import main
from loopfit.convert import parse_layout
from loopfit.errors import LoopfitError
from loopfit.models.families import family_of

IDENTITY = 3


def _model_with_identity_layer(num_layers: int = 6):
    model = make_tiny_model("llama", num_layers=num_layers)
    layer = model.model.layers[IDENTITY]
    with torch.no_grad():  # attention and MLP both add zero to the residual stream: the layer is an exact identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model


def _padded_batch(seed: int = 0, batch: int = 3, seq: int = 12, vocab: int = 260):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 5 :] = 0  # right padding of different lengths
    mask[2, seq - 2 :] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_identity_layer_has_zero_influence_and_is_dropped():
    model = _model_with_identity_layer()
    stats = layer_stats(model, [_padded_batch(0), _padded_batch(1)])
    bi, ad = stats.block_influence, stats.angular_distance
    assert abs(bi[IDENTITY]) <= 1e-5
    assert 0 <= ad[IDENTITY] < 1e-3
    others = [i for i in range(6) if i != IDENTITY]
    assert min(bi[i] for i in others) > 1e-2  # the other layers do change the stream, so only the identity drops
    analysis = suggest(bi, ad)
    assert IDENTITY in analysis.dropped
    assert IDENTITY not in analysis.layout.kept
    assert analysis.layout.kept == [i for i in others if i not in analysis.dropped]


def test_metrics_match_direct_computation_before_final_norm():
    model = make_tiny_model("llama", num_layers=4)
    with torch.no_grad():  # a non-uniform norm weight, else the cosine could not tell normed from pre-norm states
        model.model.norm.weight.uniform_(0.2, 2.0)
    ids, mask = _padded_batch(2)
    stats = layer_stats(model, [(ids, mask)])

    last_out = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, a, o: last_out.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hook.remove()
    states = [*out.hidden_states[:-1], last_out[0]]  # HF's last entry is after the final norm
    keep = mask.bool()
    for i in range(4):
        a, b = states[i][keep].double(), states[i + 1][keep].double()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        assert stats.block_influence[i] == pytest.approx(1 - cos.mean().item(), abs=1e-6)
        angle = torch.arccos(cos.clamp(-1, 1)) / math.pi
        assert stats.angular_distance[i] == pytest.approx(angle.mean().item(), abs=1e-6)
    assert stats.num_tokens == int(mask.sum())
    # Using the normed last entry would have given the last layer a different influence.
    a, b = states[3][keep].double(), out.hidden_states[-1][keep].double()
    normed_bi = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    assert abs(normed_bi - stats.block_influence[3]) > 1e-3


def test_streaming_over_batches_equals_one_batch():
    model = make_tiny_model("llama", num_layers=3)
    (i1, m1), (i2, m2) = _padded_batch(3), _padded_batch(4)
    split = layer_stats(model, [(i1, m1), (i2, m2)])
    joint = layer_stats(model, [(torch.cat([i1, i2]), torch.cat([m1, m2]))])
    assert split.num_tokens == joint.num_tokens == int(m1.sum() + m2.sum())
    assert split.block_influence == pytest.approx(joint.block_influence, abs=1e-9)
    assert split.angular_distance == pytest.approx(joint.angular_distance, abs=1e-9)


def test_residual_streams_are_prenorm_and_complete(arch):
    model = make_tiny_model(arch, num_layers=3)
    norm = family_of(model.config).final_norm(model)
    with torch.no_grad():
        norm.weight.uniform_(0.2, 2.0)
    ids, mask = _padded_batch(5)
    with torch.no_grad():
        states = residual_streams(model, ids, mask)
        hf = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(states) == 4
    for i in range(3):
        assert torch.equal(states[i], hf[i])
    assert torch.allclose(norm(states[3]), hf[3], atol=1e-6)
    assert not torch.allclose(states[3], hf[3], atol=1e-2)


def test_find_zones_on_a_u_shaped_curve():
    # Falling encoder (0-1), flat noisy plateau (2-8), rising decoder (9-10).
    curve = [0.5, 0.25, 0.1, 0.09, 0.11, 0.08, 0.1, 0.09, 0.1, 0.3, 0.6]
    zones, knees = find_zones(curve)
    assert knees == (2, 8)
    assert zones == ["encoder"] * 2 + ["thinking"] * 7 + ["decoder"] * 2


def test_find_zones_fallbacks_and_ignored_layers():
    assert envelope([3.0, 1.0, 2.0, 0.5, 0.7], "decreasing") == [3.0, 1.0, 1.0, 0.5, 0.5]
    assert envelope([0.3, 0.1, 0.2, 0.5, 0.4, 0.9], "increasing") == [0.1, 0.1, 0.2, 0.4, 0.4, 0.9]
    zones, knees = find_zones([0.1] * 6)  # flat: kneed finds no knee, so encoder and decoder are one layer each
    assert knees == (1, 4)
    assert zones == ["encoder"] + ["thinking"] * 4 + ["decoder"]
    # An ignored near-zero layer must not become the plateau that decides the knees.
    curve = [0.5, 0.25, 0.1, 0.0, 0.09, 0.11, 0.08, 0.1, 0.3, 0.6]
    assert find_zones(curve, ignore=[3])[1] == (2, 7)
    with pytest.raises(LoopfitError, match="at least 3 layers"):
        find_zones([0.1, 0.0, 0.2], ignore=[1])


def test_target_recurrent_size_keeps_highest_influence_thinking_layers():
    ad = [0.5, 0.25, 0.1, 0.09, 0.11, 0.08, 0.1, 0.09, 0.1, 0.3, 0.6]
    bi = [0.9, 0.3, 0.05, 0.02, 0.07, 0.01, 0.06, 0.00001, 0.03, 0.2, 0.5]
    full = suggest(bi, ad)
    assert str(full.layout) == "0-1:2-6,8:9-10"
    assert full.dropped == [7]  # BI below 1e-4
    cut = suggest(bi, ad, target_recurrent_size=3)
    assert cut.layout.block == [2, 4, 6]
    assert cut.dropped == [3, 5, 7, 8]
    assert cut.zones == full.zones
    with pytest.raises(LoopfitError, match="larger than the thinking zone"):
        suggest(bi, ad, target_recurrent_size=7)


@pytest.mark.parametrize("batch", [512, 1])  # 1: the file tokenised a paragraph at a time, read the same
def test_calibration_windows_are_consecutive_text(tmp_path, monkeypatch, batch):
    from loopfit.data import paragraphs

    monkeypatch.setattr(paragraphs, "BATCH", batch)
    tok = make_tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("first paragraph here\n\nsecond one\n\nthird and last paragraph, somewhat longer\n")
    batches = list(calibration_batches(tok, str(text), num_samples=10, seq_len=16, batch_size=2))
    ids = torch.cat([b[0] for b in batches])
    mask = torch.cat([b[1] for b in batches])
    # The file reads as itself, blank lines included, with one EOS at its end (none between its paragraphs).
    expected = tok(text.read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert len(expected) == 77  # 4 full 16-token windows and a padded one of 13: the source runs out before 10
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert ids[mask.bool()].tolist() == expected
    assert mask[:4].all() and mask[4].sum() == 13
    assert len(list(calibration_batches(tok, str(text), num_samples=1, seq_len=16, batch_size=4))[0][0]) == 1


def test_analyze_cli_and_convert_auto_agree(tmp_path, capsys):
    src = tmp_path / "src"
    _model_with_identity_layer().save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    data = tmp_path / "cal.txt"
    data.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(60)))
    out_json, out_png = tmp_path / "a" / "layers.json", tmp_path / "a" / "layers.png"
    common = ["--seq_len", "64"]
    main(["analyze", str(src), "--data", str(data), "--num_samples", "6", *common, "--json", str(out_json),
          "--plot", str(out_png)])  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert set(result) >= {"model", "num_tokens", "block_influence", "angular_distance", "zones", "dropped",
                           "suggested_layers"}  # fmt: skip
    assert result["num_tokens"] == 6 * 64
    assert len(result["block_influence"]) == len(result["angular_distance"]) == len(result["zones"]) == 6
    assert set(result["zones"]) <= {"encoder", "thinking", "decoder"}
    assert IDENTITY in result["dropped"]
    layout = parse_layout(result["suggested_layers"], 6)  # valid: in range, no duplicates, non-empty block
    parts = [p for p in (layout.prelude, layout.block, layout.coda) if p]
    assert all(max(a) < min(b) for a, b in zip(parts, parts[1:]))  # ordered, non-overlapping
    assert layout.kept == sorted(layout.kept)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"--layers {result['suggested_layers']}" in printed

    out = tmp_path / "looped"
    main(["convert", str(src), "--layers", "auto", "--analysis_data", str(data), "--analysis_samples", "6",
          "--out", str(out)])  # fmt: skip
    config = AutoConfig.from_pretrained(out)
    assert (config.prelude_layers, config.block_layers, config.coda_layers) == (
        layout.prelude,
        layout.block,
        layout.coda,
    )


def test_suggest_layout_string_is_parseable():
    model, tok = _model_with_identity_layer(), make_tiny_tokenizer()
    spec = suggest_layout(model, tok, num_samples=4, seq_len=32)
    layout = parse_layout(spec, 6)
    assert IDENTITY not in layout.kept


@pytest.mark.parametrize(
    "args, message",
    [(["--num_samples", "0"], "num_samples"), (["--seq_len", "1"], "seq_len"),
     (["--target_recurrent_size", "0"], "target_recurrent_size"), (["--data", "/nonexistent/x.txt"], "not found"),
     (["--plot", "/tmp"], "is a folder")],
)  # fmt: skip
def test_analyze_cli_errors(tmp_path, capsys, args, message):
    src = tmp_path / "src"
    make_tiny_model("llama", num_layers=4).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    capsys.readouterr()
    flags = {"--num_samples": "2", "--seq_len": "16", **dict(zip(args[::2], args[1::2]))}
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(src), *[x for kv in flags.items() for x in kv], "--json", str(tmp_path / "o.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopfit: error:") and message in err[0]
    assert not (tmp_path / "o.json").exists()


@pytest.mark.integration
def test_smollm2_streams_and_first_layer():
    from loopfit.loading import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    batches = list(calibration_batches(tok, None, num_samples=2, seq_len=32, batch_size=2))
    with torch.no_grad():
        states = residual_streams(model, *batches[0])
    assert len(states) == 31
    stats = layer_stats(model, batches)
    assert stats.num_tokens == 64
    assert stats.block_influence[0] > 0.5  # the first layer rewrites the embedding
    assert min(stats.block_influence) > 1e-4  # no SmolLM2 layer is an identity
    parse_layout(str(suggest(stats.block_influence, stats.angular_distance).layout), 30)
