"""The learned exit gate (`models/exit_gate.py`): its exit distribution, the gate stage's objective against a hand
computation (value and gradient), training it with everything else frozen (and resuming), saving and loading it,
decoding with `--exit_criterion gate`, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT, make_tiny_model, make_tiny_tokenizer, write_teacher_and_looped_student
from torch.utils.flop_counter import FlopCounterMode

from loopfit.adaptive import AdaptiveDecoder, ExitConfig, generate_adaptive, generate_adaptive_batch, score_adaptive
from loopfit.cli import main
from loopfit.convert import Layout, layout_from_sizes, to_looped
from loopfit.errors import LoopfitError
from loopfit.flops import count_parameters, flop_params, train_flops_per_token
from loopfit.loading import load_model
from loopfit.losses.depths import depth_token_losses, exit_gate_loss, fused_depth_loss
from loopfit.models.exit_gate import ExitGate, exit_log_probs, gate_exit
from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
from loopfit.train.config import EveryDepthConfig, ExitGateConfig
from loopfit.train.recipe import fit, setup, train
from loopfit.train.student import Student, build_objective, exit_gate_stage, objective_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _explicit_exit_probs(z: torch.Tensor) -> torch.Tensor:
    """p(i) = lambda_i prod_{j<i} (1 - lambda_j), p(R) = prod_{j<R} (1 - lambda_j), as products (no logs)."""
    lam = torch.sigmoid(z.double())
    cols, survive = [], torch.ones_like(lam[..., 0])
    for i in range(z.shape[-1]):
        cols.append(survive * (lam[..., i] if i < z.shape[-1] - 1 else 1.0))
        survive = survive * (1 - lam[..., i])
    return torch.stack(cols, -1)


def test_exit_distribution_sums_to_one_and_is_the_product_formula():
    z = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(0)) * 3
    p = exit_log_probs(z).exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.double(), _explicit_exit_probs(z), atol=1e-6, rtol=1e-5)
    # Saturated gates: exact zeros, no NaN; all mass on the first iteration, or the remainder on the last.
    assert exit_log_probs(torch.full((1, 4), 60.0)).exp()[0].tolist() == pytest.approx([1, 0, 0, 0], abs=1e-20)
    assert exit_log_probs(torch.full((1, 4), -60.0)).exp()[0].tolist() == pytest.approx([0, 0, 0, 1], abs=1e-20)
    assert exit_log_probs(torch.zeros(1, 1)).exp().item() == 1.0  # R = 1: the one iteration takes everything


def test_gate_exit_tracks_the_cdf():
    gate = ExitGate(8, width=4, mean_recurrence=4)
    with torch.no_grad():
        gate.weight.normal_(generator=torch.Generator().manual_seed(2))
    states = torch.randn(5, 3, 1, 8, generator=torch.Generator().manual_seed(1)) * 4
    logits = torch.stack([gate(s[:, -1]) for s in states], -1).detach()  # (3, 5)
    cdf = 1 - torch.cumprod(1 - torch.sigmoid(logits.double()), -1)  # P(exit at or before i), no remainder
    for q in (0.0, 0.3, 0.7, 1.0):
        surv = None
        for i, s in enumerate(states):
            done, surv = gate_exit(gate, s, surv, q)
            want = cdf[:, i] >= q if q < 1 else torch.zeros(3, dtype=torch.bool)
            assert done.tolist() == want.tolist()
            torch.testing.assert_close(surv.exp().double(), 1 - cdf[:, i], atol=1e-6, rtol=1e-5)


def test_gate_initialisation():
    gate = ExitGate(16, width=0, mean_recurrence=5)
    z = gate(torch.randn(3, 16))
    torch.testing.assert_close(torch.sigmoid(z), torch.full((3,), 1 / 5))  # hazard 1/R everywhere
    with pytest.raises(ValueError, match="width must be >= 0"):
        ExitGate(16, width=-1)


def _inputs(depths=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(2, 9, 16, generator=g) for _ in range(depths)]
    w = torch.randn(97, 16, generator=g) * 0.3
    y = torch.randint(0, 97, (2, 9), generator=g)
    y[0, :2] = -100
    th, tw = torch.randn(2, 9, 19, generator=g), torch.randn(97, 19, generator=g) * 0.3
    values, ids = torch.log_softmax(F.linear(th, tw), -1).topk(12, -1)
    return hs, w, y, dict(teacher_hidden=th, teacher_weight=tw), dict(teacher_ids=ids, teacher_values=values)


@pytest.mark.parametrize("sparse", [False, True])
def test_depth_token_losses_are_the_fused_losses_per_token(sparse):
    """Per token and depth; summed over tokens, `fused_depth_loss`'s per-depth CE and KD; and equal to plain PyTorch."""
    hs, w, y, dense, sp = _inputs()
    teacher = sp if sparse else dense
    ce, kd = depth_token_losses(hs, w, y, **teacher, temperature=2.0, chunk_size=5)
    n = int((y != -100).sum())
    assert ce.shape == kd.shape == (4, n)
    fused = fused_depth_loss(hs, [0.25] * 4, w, y, **teacher, temperature=2.0, chunk_size=5, num_items=1.0)
    torch.testing.assert_close(ce.sum(1), fused.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd.sum(1), fused.kd, rtol=1e-5, atol=1e-5)
    mask = y != -100
    for d, h in enumerate(hs):
        logits = F.linear(h, w)[mask]
        torch.testing.assert_close(ce[d], F.cross_entropy(logits, y[mask], reduction="none"), rtol=1e-5, atol=1e-5)
        if not sparse:
            logp = torch.log_softmax(F.linear(dense["teacher_hidden"], dense["teacher_weight"])[mask] / 2, -1)
            want = (logp.exp() * (logp - torch.log_softmax(logits / 2, -1))).sum(-1) * 4
            torch.testing.assert_close(kd[d], want, rtol=1e-5, atol=1e-5)
    ce_only, none = depth_token_losses(hs, w, y)
    assert none is None and torch.equal(ce_only, depth_token_losses(hs, w, y, **teacher)[0])


def test_exit_gate_loss_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(10, 5, generator=g, requires_grad=True)
    losses = torch.rand(10, 5, generator=g) * 4
    total, entropy = exit_gate_loss(exit_log_probs(z), losses, 0.1, 7.0)
    p = _explicit_exit_probs(z)
    h = -(p * p.log()).sum()
    want = ((p * losses.double()).sum() - 0.1 * h) / 7.0
    torch.testing.assert_close(total.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), (h / 7).detach(), rtol=1e-5, atol=1e-6)
    (gz,) = torch.autograd.grad(total, z)
    (gw,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(gz.double(), gw.double(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ the gate's objective
@pytest.fixture(scope="module")
def pair():
    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    student = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros").train()
    exit_gate_stage(student, width=8)
    with torch.no_grad():  # a gate that says something: random output weights instead of the zero init
        student.model.exit_gate.weight.normal_(generator=torch.Generator().manual_seed(5))
    return teacher, student


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}, (labels[:, 1:] != -100).sum().float()


@pytest.mark.parametrize("kd", [False, True])
def test_objective_equals_a_hand_computation_from_per_depth_losses(pair, kd):
    """The stage's loss and the gate's gradient equal `sum_i p(i) L_i - beta H(p)` with L_i plain CE + KD on the
    model's own logits at depth i, p from the gate on the model's own states (product formula), via autograd."""
    teacher, student = pair
    beta, R, alpha, temp = 0.2, 4, 0.3, 2.0
    dcfg = DistillationConfig(enabled=kd, teacher_model_name="t", ce_scale=alpha, kd_scale=1 - alpha, temperature=temp)
    objective = build_objective(dcfg, student, teacher if kd else None,
                                exit_gate=ExitGateConfig(train=True, entropy_scale=beta))  # fmt: skip
    batch, n = _batch()
    student.zero_grad()
    parts = objective_loss(objective, Student(student), teacher, batch, R, n)
    parts.total.backward()
    got = {k: p.grad.clone() for k, p in student.model.exit_gate.named_parameters()}
    assert all(p.grad is None for k, p in student.named_parameters() if "exit_gate" not in k)
    student.zero_grad()

    ids, y = batch["input_ids"], batch["labels"][:, 1:]
    mask = y != -100
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(ids).logits[:, :-1].float() / temp, -1)
        states = student(ids, num_steps=R, output_states=True).states
    losses = []
    for r in range(1, R + 1):
        with torch.no_grad():
            logits = student(ids, num_steps=r).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")
        if kd:
            logq = torch.log_softmax(logits / temp, -1)
            ce = alpha * ce + (1 - alpha) * (logp_t.exp() * (logp_t - logq)).sum(-1) * temp**2
        losses.append(ce[mask])
    z = torch.stack([student.model.exit_gate(s) for s in states], -1)[:, :-1][mask]
    p = _explicit_exit_probs(z)
    want = ((p * torch.stack(losses, -1).double()).sum() + beta * (p * p.log()).sum()) / n
    want.backward()
    torch.testing.assert_close(parts.total.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for k, param in student.model.exit_gate.named_parameters():
        assert param.grad.abs().sum() > 0, k
        torch.testing.assert_close(got[k].double(), param.grad.double(), rtol=1e-4, atol=1e-7)
    assert set(parts.named()) == {"ce", "exit_entropy", "exit_depth"} | ({"kd"} if kd else set())
    pd = p.detach()
    torch.testing.assert_close(parts.named()["exit_depth"].double(), (pd @ torch.arange(1.0, 5).double()).sum() / n)
    student.zero_grad()


@pytest.mark.parametrize("kd", [False, True])
def test_gate_stage_flop_count_matches_torch_flop_counter(kd):
    """One micro-step of the gate's stage, counted by torch's flop counter, within 3% of the forward-only count."""
    src = make_tiny_model("llama", num_layers=6, hidden=64, attn_implementation="eager")
    model = to_looped(src, layout_from_sizes(6, 1, 2, 2)).train()
    exit_gate_stage(model)
    batch, seq, r = 2, 64, 3
    ids = torch.randint(4, 260, (batch, seq), generator=torch.Generator().manual_seed(0))
    dc = DistillationConfig(enabled=kd, ce_scale=0.5, kd_scale=0.5)
    objective = build_objective(dc, model, src if kd else None, exit_gate=ExitGateConfig(train=True))
    inplace = {torch.ops.aten.addmm_: lambda _c, a, b, **_: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        parts = objective_loss(objective, Student(model), src if kd else None, {"input_ids": ids, "labels": ids}, r,
                               torch.tensor(float(batch * (seq - 1))))  # fmt: skip
        parts.total.backward()
    p = flop_params(model, src if kd else None)
    want = train_flops_per_token(p, 0, r, seq, teacher=kd, depths=r, forward_only=True)
    assert counter.get_total_flops() == pytest.approx(want * batch * seq, rel=0.03)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_teacher_and_looped_student(tmp_path_factory.mktemp("exit_gate"))
    # The shared student's identity adapter and zero state make every depth compute the same thing; here the depths
    # must differ for the gate to learn anything: a random adapter.
    teacher = load_model(str(root / "teacher"))
    looped = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros")
    looped.save_pretrained(root / "student")
    make_tiny_tokenizer().save_pretrained(root / "student")
    (root / "one_batch.txt").write_text("\n\n".join(TEXT.split("\n\n")[:3]))  # one batch of 4 rows of 32 tokens
    return root


def _cfg(models, out, **kw) -> TrainConfig:
    base = dict(model_name=str(models / "student"), out=str(out), data=str(models / "data.txt"), seq_len=32,
                batch_size=4, max_steps=12, progress_bar=False, tensorboard=False, fixed_num_steps=4,
                exit_gate=ExitGateConfig(train=True, width=4, entropy_scale=0.01),
                distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")))  # fmt: skip
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.optim_config.lr = 3e-2
    return cfg


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_gate_stage_trains_only_the_gate_and_lowers_its_loss(models, tmp_path):
    run = setup(_cfg(models, tmp_path / "run", data=str(models / "one_batch.txt")))
    assert {n for n, _ in run.trainable} == {f"model.exit_gate.{k}" for k in ("up_weight", "up_bias", "weight", "bias")}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    fit(run)
    run.logger.close()
    for n, p in run.model.named_parameters():
        assert torch.equal(before[n], p.detach()) == ("exit_gate" not in n), n
    m = _metrics(tmp_path / "run")
    assert {"exit_entropy_loss", "exit_depth_loss"} <= set(m[0])
    first, last = sum(x["loss"] for x in m[:3]) / 3, sum(x["loss"] for x in m[-3:]) / 3
    assert last < first - 0.01, (first, last)
    for x in m:  # loss = E_p[0.5 CE + 0.5 KD] - beta H(p), the logged expectations
        assert x["loss"] == pytest.approx(0.5 * x["ce_loss"] + 0.5 * x["kd_loss"] - 0.01 * x["exit_entropy_loss"],
                                          rel=1e-5)  # fmt: skip
        assert 1 <= x["exit_depth_loss"] <= 4 and 0 <= x["exit_entropy_loss"] <= math.log(4) + 1e-6


def test_gate_stage_saves_the_gate_and_resumes_exactly(models, tmp_path):
    kw = dict(max_steps=6, save_every=3)
    train(_cfg(models, tmp_path / "a", **kw))
    run = setup(_cfg(models, tmp_path / "b", **kw))
    fit(run, until=4)  # checkpoint at 3, one more step, then "killed"
    run.logger.close()
    train(_cfg(models, tmp_path / "b", resume=True, **kw))
    keys = ("step", "loss", "ce_loss", "kd_loss", "exit_entropy_loss", "exit_depth_loss", "grad_norm")
    assert [[x[k] for k in keys] for x in _metrics(tmp_path / "a")] == [[x[k] for k in keys]
                                                                       for x in _metrics(tmp_path / "b")]  # fmt: skip
    a, b = load_model(str(tmp_path / "a" / "final")), load_model(str(tmp_path / "b" / "final"))
    assert a.config.exit_gate and a.config.exit_gate_width == 4
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    src = load_model(str(models / "student"))
    assert src.model.exit_gate is None and not src.config.exit_gate  # the source folder is untouched
    for n, x in src.state_dict().items():
        assert torch.equal(x, a.state_dict()[n]), n  # every other weight bit-identical after the stage


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lora=LoRAConfig(enabled=True)), "cannot be combined with --lora.enabled=true"),
        (dict(every_depth=EveryDepthConfig(2)), "every_depth.k > 1"),
        (dict(fixed_point_scale=0.1), "fixed_point_scale"),
        (dict(exit_gate=ExitGateConfig(train=True, entropy_scale=-1)), "exit_gate.entropy_scale"),
        (dict(exit_gate=ExitGateConfig(train=True, width=-2)), "exit_gate.width"),
    ],
)
def test_bad_gate_settings_refused_at_start(models, tmp_path, kw, match):
    with pytest.raises(LoopfitError, match=match):
        setup(_cfg(models, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()


def test_plain_student_refused(models, tmp_path):
    with pytest.raises(LoopfitError, match="needs a looped student"):
        setup(_cfg(models, tmp_path / "run", model_name=str(models / "teacher"), fixed_num_steps=None))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- save, load, decode
ADAPTER_SEED = 1  # with the gate's seed below, tokens exit at different iterations (asserted)


def _gated(cache_mode="full", seed=7):
    src = make_tiny_model("llama", num_layers=4, hidden=32)
    lm = to_looped(src, Layout([0], [1, 2], [3]), adapter_init="random", cache_mode=cache_mode, seed=ADAPTER_SEED)
    exit_gate_stage(lm, width=0)
    with torch.no_grad():
        lm.model.exit_gate.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(seed))
    return lm.requires_grad_(True).eval()


def test_save_load_round_trip(tmp_path):
    lm = _gated()
    lm.save_pretrained(tmp_path / "m")
    back = load_model(str(tmp_path / "m"))
    assert back.config.exit_gate and back.model.exit_gate is not None
    for k in ("weight", "bias"):
        assert torch.equal(getattr(back.model.exit_gate, k), getattr(lm.model.exit_gate, k))
    s = torch.randn(2, 3, 32)
    assert torch.equal(back.model.exit_gate(s), lm.model.exit_gate(s))
    plain = to_looped(make_tiny_model("llama", num_layers=4, hidden=32), Layout([0], [1, 2], [3]))
    assert plain.model.exit_gate is None and "exit_gate" not in json.dumps(list(plain.state_dict()))
    counts = count_parameters(back)  # `loopfit count`: the gate is a component of its own (H weights + 1 bias)
    assert counts["exit_gate"] == 33 and counts["total"] == sum(p.numel() for p in back.parameters())
    assert count_parameters(plain)["exit_gate"] == 0


R = 5


def _prompt():
    return torch.randint(4, 260, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_gate_thresholds_zero_and_one(cache_mode):
    lm = _gated(cache_mode)
    ids = _prompt()
    out = generate_adaptive(lm, ids, ExitConfig("gate", 0.0, min_num_steps=2, max_num_steps=R), max_new_tokens=8)
    assert out.iterations == [2] * 7  # CDF >= 0 at the first allowed check
    ref = lm.generate(ids, num_steps=R, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :].tolist()
    out = generate_adaptive(lm, ids, ExitConfig("gate", 1.0, max_num_steps=R), max_new_tokens=10)
    assert out.tokens == ref and out.iterations == [R] * 9
    mid = generate_adaptive(lm, ids, ExitConfig("gate", 0.5, max_num_steps=R), max_new_tokens=10)
    assert all(1 <= n <= R for n in mid.iterations)


@pytest.mark.parametrize("check_every", [1, 2])
def test_gate_exit_follows_the_cdf_and_check_every(check_every):
    """Each token exits at the first checked iteration whose CDF (over every iteration, checked or not) reaches q."""
    lm = _gated(seed=8)
    dec = AdaptiveDecoder(lm, ExitConfig("gate", 0.95, check_every=check_every, max_num_steps=R))
    dec.prefill(_prompt())
    seen = []
    hook = lm.model.exit_gate.register_forward_hook(lambda _m, _a, out: seen.append(out.item()))
    used_all = []
    for token in (10, 20, 30, 40, 50, 60, 70, 80):
        seen.clear()
        _, used = dec.step(torch.tensor([token]))
        used = int(used[0])
        cdf = 1 - torch.cumprod(1 - torch.sigmoid(torch.tensor(seen, dtype=torch.float64)), 0)
        checks = range(check_every, R, check_every)
        want = next((n for n in checks if len(seen) >= n and cdf[n - 1] >= 0.95), R)
        assert used == want and len(seen) == used, (seen, used)
        used_all.append(used)
    hook.remove()
    assert check_every == 2 or len(set(used_all)) > 1, used_all  # the gate tells tokens apart


@pytest.mark.parametrize("cache_mode", ["full", "compress"])
def test_gate_batched_equals_one_by_one(cache_mode):
    """The gate in the depth-wise batched decoder: each row's tokens and depths are those it gets alone."""
    lm = _gated(cache_mode, seed=8)
    exit = ExitConfig("gate", 0.95, max_num_steps=R)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 260, (n,), generator=g).tolist() for n in (7, 3, 11, 5)]
    batched = generate_adaptive_batch(lm, prompts, exit, max_new_tokens=8)
    alone = [generate_adaptive(lm, torch.tensor([p]), exit, max_new_tokens=8) for p in prompts]
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens and b.iterations == a.iterations
    step_depths = [{b.iterations[i] for b in batched if i < len(b.iterations)} for i in range(7)]
    assert any(len(d) > 1 for d in step_depths), step_depths  # rows left the loop at different iterations


def test_score_adaptive_with_the_gate():
    lm = _gated()
    ids = torch.randint(4, 260, (1, 12), generator=torch.Generator().manual_seed(2))
    full = score_adaptive(lm, ids, 4, ExitConfig("gate", 1.0, max_num_steps=3))
    fixed = score_adaptive(lm, ids, 4, ExitConfig("none", max_num_steps=3))
    assert full.logprobs == fixed.logprobs and full.iterations == [3] * 7
    early = score_adaptive(lm, ids, 4, ExitConfig("gate", 0.0, max_num_steps=3))
    assert early.iterations == [1] * 7 and len(early.logprobs) == 8


def test_gate_criterion_refusals():
    with pytest.raises(LoopfitError, match="bad --exit_threshold 1.5 for --exit_criterion gate"):
        ExitConfig("gate", 1.5)
    plain = to_looped(make_tiny_model("llama", num_layers=4, hidden=32), Layout([0], [1, 2], [3]))
    with pytest.raises(LoopfitError, match="needs a model with an exit gate"):
        AdaptiveDecoder(plain, ExitConfig("gate"))
    assert ExitConfig("gate").threshold == 0.5


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--exit_criterion", "gate"], "--exit_criterion gate needs a model with an exit gate"),
        (["--exit_criterion", "gate", "--exit_threshold", "2"], "bad --exit_threshold 2"),
        (["--exit_criterion", "gates"], "--exit_criterion must be one of kl, state, argmax, gate, none"),
    ],
)
def test_cli_bad_flags_are_one_line(models, capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(models / "looped"), "--max_new_tokens", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("loopfit: error: ") and expected in err[0], err


def test_cli_train_refuses_gate_with_lora(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model_name", str(models / "looped"), "--out", str(tmp_path / "r"),
              "--data", str(models / "data.txt"), "--exit_gate.train=true", "--lora.enabled=true"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--exit_gate.train=true trains the gate alone" in err[0], err
    assert not (tmp_path / "r").exists()
