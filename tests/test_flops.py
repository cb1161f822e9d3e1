import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from loopfit.convert import Layout, to_looped
from loopfit.errors import LoopfitError
from loopfit.flops import Curriculum, count_parameters, inference_flops_per_token, training_flops
from loopfit.models import sample_num_steps
from loopfit.train.schedules import DepthSchedule


def _ramp_means(t: np.ndarray, max_mean: int, warmup: float, shape: str) -> list[int]:
    """The mean depth at training fractions `t` of `loopfit count`'s curriculum, read off its `DepthSchedule`."""
    sched = Curriculum(max_mean, shape=shape, warmup=warmup).schedule(1000)
    return [sched.mean_at(x * 1000) for x in t]


def _expected_n_k(mean: int, backprop_depth: int, min_num_steps: int = 1) -> tuple[float, float]:
    """Expected `(n_no_grad, k_grad)` of the sampler at a constant mean, from `DepthSchedule`."""
    sched = DepthSchedule(1, mean, backprop_depth, min_num_steps=min_num_steps)
    return sched.expected_depth_at(0) - sched.gradient_depth_at(0), sched.gradient_depth_at(0)


@pytest.mark.parametrize("untie", [False, True])
def test_parameter_counts_by_component(untie):
    src = make_tiny_model("llama", num_layers=6, hidden=32)
    lm = to_looped(src, Layout([0], [2, 3], [5]), untie_embeddings=untie)
    c = count_parameters(lm)
    d = lm.model
    assert c["embeddings"] == d.embed_tokens.weight.numel() == 260 * 32
    assert c["prelude"] == sum(p.numel() for p in d.prelude.parameters())
    assert c["adapter"] == 2 * 32 * 32
    assert c["block"] == sum(p.numel() for p in d.block.parameters()) == 2 * c["prelude"]
    assert c["coda"] == c["prelude"]
    assert c["final_norm"] == 32
    assert c["head"] == (260 * 32 if untie else 0)
    unique = {id(p): p.numel() for p in lm.parameters()}
    assert c["total"] == sum(unique.values()) == sum(c[k] for k in c if k != "total")


def test_plain_model_counts_layers_as_prelude():
    src = make_tiny_model("llama", num_layers=3, hidden=32, tie=False)
    c = count_parameters(src)
    assert c["prelude"] == sum(p.numel() for p in src.model.layers.parameters())
    assert c["block"] == c["adapter"] == c["coda"] == 0
    assert c["head"] == 260 * 32
    assert c["total"] == sum(p.numel() for p in src.parameters())


def test_training_flops_constant_mean_hand_computed():
    params = {"prelude": 10, "block": 100, "coda": 5}
    cur = Curriculum(mean_recurrence=4, backprop_depth=2, shape="none", sampled=False)
    out = training_flops(params, 1000, cur)
    # n = 2 no-grad, k = 2 grad: N1 = 10 + 2*100 + 5 = 215, N2 = 2*100 = 200
    assert out["flops"] == pytest.approx(6 * 1000 * 215 + 2 * 1000 * 200)
    assert (out["mean_num_steps_no_grad"], out["mean_num_steps_grad"]) == (2, 2)


def test_training_flops_linear_curriculum_hand_computed():
    # mean ramps 1 -> 3 over the first half: ceil(1 + 4t) is 2 on (0, 0.25], 3 afterwards.
    t = np.array([0.1, 0.25, 0.3, 0.9])
    assert _ramp_means(t, 3, 0.5, "linear") == [2, 2, 3, 3]
    params = {"prelude": 10, "block": 100, "coda": 5}
    cur = Curriculum(mean_recurrence=3, backprop_depth=8, shape="linear", warmup=0.5, sampled=False)
    out = training_flops(params, 1e6, cur)
    assert out["flops"] == pytest.approx(6 * 1e6 * (15 + 100 * (0.25 * 2 + 0.75 * 3)))
    # f(t) = 1 - sqrt(1 - t) lies below t: the mean stays lower early, and both reach the max at the warmup's end.
    assert _ramp_means(t, 8, 0.5, "1-sqrt") == [2, 4, 4, 8]
    assert _ramp_means(t, 8, 0.5, "linear") == [3, 5, 6, 8]


def test_expected_steps_match_the_sampler():
    g = torch.Generator().manual_seed(0)
    draws = [sample_num_steps(4, 2, g) for _ in range(4000)]
    n_mc = np.mean([d[0] for d in draws])
    k_mc = np.mean([d[1] for d in draws])
    n, k = _expected_n_k(4, 2)
    assert n + k == pytest.approx(5.0, abs=1e-3)  # E[R] = mean + 1
    assert n == pytest.approx(n_mc, abs=0.15)
    assert k == pytest.approx(k_mc, abs=0.05)


def test_expected_steps_with_a_floor_match_the_sampler():
    g = torch.Generator().manual_seed(1)
    draws = [sample_num_steps(3, 3, g, min_num_steps=3) for _ in range(4000)]
    assert min(n + k for n, k in draws) == 3 and all(k == 3 for _, k in draws)
    n, k = _expected_n_k(3, 3, min_num_steps=3)
    assert k == pytest.approx(3.0, abs=1e-6)
    assert n == pytest.approx(np.mean([d[0] for d in draws]), abs=0.1)
    assert n + k > sum(_expected_n_k(3, 3))  # the floor only adds iterations


def test_inference_flops_per_token():
    params = {"prelude": 10, "adapter": 4, "block": 100, "coda": 5}
    assert inference_flops_per_token(params, 3, head_matmul=50) == 2 * (10 + 3 * 104 + 5 + 50)


def test_bad_curriculum_is_a_clear_error():
    with pytest.raises(LoopfitError, match="curriculum shape"):
        training_flops({"prelude": 1, "block": 1, "coda": 1}, 10, Curriculum(shape="cosine"))


def test_count_command_writes_json_and_plot(tmp_path, capsys):
    from loopfit.cli import main

    src = make_tiny_model("llama", num_layers=6, hidden=32)
    folder = tmp_path / "looped"
    to_looped(src, Layout([0], [2, 3], [5])).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    results = tmp_path / "sweep.json"
    results.write_text(json.dumps({"depths": [1, 2, 4], "loss": [3.0, 2.5, 2.4], "baseline_loss": 2.45}))
    out_json, out_png = tmp_path / "flops.json", tmp_path / "flops.png"
    main(
        [
            "count",
            str(folder),
            "--mean_recurrence",
            "4",
            "--backprop_depth",
            "2",
            "--tokens",
            "1e6",
            "--results",
            str(results),
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    out = json.loads(out_json.read_text())
    assert out["parameters"]["head"] == 0
    assert out["inference"]["depths"] == [1, 2, 4]
    f = out["inference"]["flops_per_token"]
    assert f[2] - f[1] == pytest.approx(2 * (f[1] - f[0]))  # linear in R
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "training FLOPs" in capsys.readouterr().out
