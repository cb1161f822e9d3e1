"""Loss at every depth (`--every_depth.k`): the fused multi-depth loss against per-depth references, the objective
against a hand-written sum over depths, truncated backprop, FLOPs, training, logging and resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, write_teacher_and_looped_student
from torch.utils.flop_counter import FlopCounterMode

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.errors import LoopfitError
from loopfit.flops import flop_params, train_flops_per_token, training_flops
from loopfit.losses.depths import depth_weights, fused_depth_loss
from loopfit.losses.fused import chunked_kd_loss, fused_kd_loss
from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
from loopfit.train.config import EveryDepthConfig
from loopfit.train.recipe import fit, setup, train
from loopfit.train.schedules import DepthSchedule
from loopfit.train.student import Student, build_objective, objective_loss

pytestmark = pytest.mark.usefixtures("one_thread")

V, H = 97, 16


def test_depth_weights():
    assert depth_weights(1) == (1.0,) and depth_weights(1, "linear") == (1.0,)
    assert depth_weights(4) == (0.25,) * 4
    assert depth_weights(3, "linear") == pytest.approx((1 / 6, 2 / 6, 3 / 6))
    with pytest.raises(ValueError):
        depth_weights(0)
    with pytest.raises(ValueError):
        depth_weights(2, "cubic")


def _inputs(depths=3, n=(2, 9), softcap=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(*n, H, generator=g, requires_grad=True) for _ in range(depths)]
    w = torch.randn(V, H, generator=g).mul_(0.3).requires_grad_()
    y = torch.randint(0, V, n, generator=g)
    y[0, :2] = -100
    th = torch.randn(*n, H + 3, generator=g)
    tw = torch.randn(V, H + 3, generator=g) * 0.3
    logp = torch.log_softmax(F.linear(th, tw), -1)
    values, ids = logp.topk(12, -1)
    return hs, w, y, dict(teacher_hidden=th, teacher_weight=tw), dict(teacher_ids=ids, teacher_values=values)


# (kind, params, temperature, sparse, student soft-cap): the closed-form FKL kernel at T = 1 and T != 1, a divergence
# with a closed-form gradient, the autograd fallback (no closed form; soft-capped student), sparse targets.
CASES = [
    ("fkl", {}, 1.0, False, None),
    ("fkl", {}, 2.0, False, None),
    ("jsd", {"beta": 0.3}, 1.5, False, None),
    ("fkl", {}, 2.0, False, 5.0),
    ("skew", {"alpha": 0.2}, 1.0, False, None),
    ("fkl", {}, 2.0, True, None),
    ("rkl", {}, 1.0, True, None),
]


@pytest.mark.parametrize("kind, params, temp, sparse, cap", CASES)
@pytest.mark.parametrize("weighting", ["uniform", "linear"])
def test_fused_depth_loss_equals_the_weighted_per_depth_references(kind, params, temp, sparse, cap, weighting):
    """The multi-depth fused loss (teacher side computed once per chunk, reused by every depth) equals the weighted
    sum of the autograd reference at each depth: total, per-depth CE / KD, gradients for every hidden and the head;
    chunks smaller than the tokens so reuse crosses chunk borders."""
    hs, w, y, dense, sparse_t = _inputs()
    teacher = sparse_t if sparse else dense
    weights = depth_weights(len(hs), weighting)
    kw = dict(kind=kind, temperature=temp, ce_scale=0.4, kd_scale=0.7, chunk_size=5, num_items=20.0,
              logit_softcap=cap, **teacher, **params)  # fmt: skip
    got = fused_depth_loss(hs, weights, w, y, **kw)
    g_got = torch.autograd.grad(got.total, [*hs, w])
    refs = [chunked_kd_loss(h, w, y, **kw) for h in hs]
    want = sum(wt * r.total for wt, r in zip(weights, refs))
    g_want = torch.autograd.grad(want, [*hs, w])
    torch.testing.assert_close(got.total, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce, torch.stack([r.ce for r in refs]).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kd, torch.stack([r.kd for r in refs]).detach(), rtol=1e-5, atol=1e-6)
    assert (got.kd != 0).all() and len(set(got.ce.tolist())) == len(hs)  # the depths really differ
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_one_depth_is_the_fused_loss_exactly(sparse):
    """One hidden state at weight 1: bit-identical to `fused_kd_loss` (values and gradients)."""
    hs, w, y, dense, sparse_t = _inputs(depths=1)
    kw = dict(kind="fkl", temperature=2.0, ce_scale=0.5, kd_scale=0.5, chunk_size=4, **(sparse_t if sparse else dense))
    a = fused_depth_loss(hs, [1.0], w, y, **kw)
    ga = torch.autograd.grad(a.total, [hs[0], w])
    b = fused_kd_loss(hs[0], w, y, **kw)
    gb = torch.autograd.grad(b.total, [hs[0], w])
    assert torch.equal(a.total, b.total) and torch.equal(a.ce[0], b.ce) and torch.equal(a.kd[0], b.kd)
    assert all(torch.equal(x, z) for x, z in zip(ga, gb))


def test_fused_depth_loss_refusals():
    hs, w, y, dense, _ = _inputs(depths=2)
    with pytest.raises(ValueError, match="one weight"):
        fused_depth_loss(hs, [1.0], w, y)
    with pytest.raises(ValueError, match="one weight"):
        fused_depth_loss(hs, [1.0, -0.5], w, y)
    with pytest.raises(ValueError, match="shapes differ"):
        fused_depth_loss([hs[0], hs[1][:, :3]], [0.5, 0.5], w, y)


# ------------------------------------------------------------------------------------------- the objective
@pytest.fixture(scope="module")
def pair():
    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    student = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros").train()
    return teacher, student


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}, (labels[:, 1:] != -100).sum().float()


def _loss(teacher, student, k, weighting="uniform", num_steps=4, fused=True, alpha=0.3):
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", ce_scale=alpha, kd_scale=1 - alpha, temperature=2.0,
                              fused=fused)  # fmt: skip
    objective = build_objective(dcfg, student, teacher, every_depth=EveryDepthConfig(k, weighting))
    batch, n = _batch()
    return objective_loss(objective, Student(student), teacher, batch, num_steps, n)


def _hand_written(teacher, student, depths, weights, alpha=0.3, temp=2.0):
    """sum_j w_j (alpha CE_j + (1 - alpha) T^2 KL(p_T || q_T)_j), each depth's logits from the model's own forward at
    that depth, plain full-vocabulary PyTorch; every term per scored token of the micro-batch."""
    batch, n = _batch()
    ids, y = batch["input_ids"], batch["labels"][:, 1:]
    mask = y != -100
    with torch.no_grad():
        logp = torch.log_softmax(teacher(ids).logits[:, :-1].float() / temp, -1)
    total = 0.0
    terms = []
    for r, wt in zip(depths, weights):
        logits = student(ids, num_steps=r).logits[:, :-1].float()
        ce = F.cross_entropy(logits[mask], y[mask], reduction="sum") / n
        logq = torch.log_softmax(logits / temp, -1)
        kd = (logp.exp() * (logp - logq)).sum(-1)[mask].sum() * temp**2 / n
        total = total + wt * (alpha * ce + (1 - alpha) * kd)
        terms.append((ce.detach(), kd.detach()))
    return total, terms


@pytest.mark.parametrize("weighting", ["uniform", "linear"])
@pytest.mark.parametrize("fused", [True, False])
def test_objective_equals_a_hand_written_sum_over_depths(pair, weighting, fused):
    """k = 3 at R = 4: the objective's loss, its per-depth terms and every parameter's gradient equal the weighted
    sum of plain CE + KD on the logits of the model run at depths 2, 3 and 4."""
    teacher, student = pair
    student.zero_grad()
    parts = _loss(teacher, student, 3, weighting, fused=fused)
    parts.total.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    want, terms = _hand_written(teacher, student, [2, 3, 4], depth_weights(3, weighting))
    want.backward()
    torch.testing.assert_close(parts.total, want.detach(), rtol=1e-5, atol=1e-6)
    assert set(parts.named()) == {"ce", "kd", "ce_R-1", "kd_R-1", "ce_R-2", "kd_R-2"}
    for j, (ce, kd) in zip((2, 1, 0), terms):
        name = "" if j == 0 else f"_R-{j}"
        torch.testing.assert_close(parts.named()["ce" + name], ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts.named()["kd" + name], kd, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6)
    student.zero_grad()


def test_k_one_is_todays_loss_exactly(pair):
    """k = 1 (and k = 0): the loss and gradients of an objective without the option, bit for bit."""
    teacher, student = pair
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", ce_scale=0.3, kd_scale=0.7, temperature=2.0)
    batch, n = _batch()
    results = []
    for every in (None, EveryDepthConfig(1), EveryDepthConfig(0, "linear")):
        student.zero_grad()
        parts = objective_loss(build_objective(dcfg, student, teacher, every_depth=every), Student(student), teacher,
                               batch, 3, n)  # fmt: skip
        parts.total.backward()
        results.append((parts, [p.grad.clone() for p in student.parameters()]))
    (a, ga), *rest = results
    for b, gb in rest:
        assert set(b.named()) == {"ce", "kd"}
        assert torch.equal(a.total, b.total) and torch.equal(a.ce, b.ce) and torch.equal(a.kd, b.kd)
        assert all(torch.equal(x, z) for x, z in zip(ga, gb))
    student.zero_grad()


def test_fewer_iterations_than_k_and_truncated_backprop(pair):
    """R = 2 with k = 4 scores the 2 depths there are; the states of no-grad iterations are scored too (the same loss
    value whatever the backprop depth), and their gradient stops at the coda's input."""
    teacher, student = pair
    short = _loss(teacher, student, 4, num_steps=2)
    want, _ = _hand_written(teacher, student, [1, 2], depth_weights(2))
    torch.testing.assert_close(short.total, want.detach(), rtol=1e-5, atol=1e-6)
    assert set(short.named()) == {"ce", "kd", "ce_R-1", "kd_R-1"}
    full = _loss(teacher, student, 3, num_steps=(0, 4))
    student.zero_grad()
    truncated = _loss(teacher, student, 3, num_steps=(3, 1))
    torch.testing.assert_close(truncated.total, full.total, rtol=1e-6, atol=1e-7)
    truncated.total.backward()
    # Only the last iteration has gradient: the block's gradient is that of the final depth's loss alone, through
    # one iteration; the earlier depths add gradient to the coda but none to the block.
    block = {n: p.grad.clone() for n, p in student.named_parameters() if ".block." in n or "adapter" in n}
    student.zero_grad()
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", ce_scale=0.3, kd_scale=0.7, temperature=2.0)
    batch, n = _batch()
    final_only = objective_loss(build_objective(dcfg, student, teacher), Student(student), teacher, batch, (3, 1), n)
    (final_only.total * depth_weights(3)[-1]).backward()
    for name, p in student.named_parameters():
        if name in block:
            torch.testing.assert_close(block[name], p.grad, rtol=1e-5, atol=1e-7)
    student.zero_grad()


def test_plain_student_refused(pair):
    teacher, _ = pair
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t")
    with pytest.raises(LoopfitError, match="every_depth.k > 1 needs a looped student"):
        build_objective(dcfg, teacher, teacher, every_depth=EveryDepthConfig(2))


# ----------------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("num_steps, k", [((0, 3), 3), ((2, 2), 3), ((1, 1), 4)])
def test_flop_count_with_every_depth_matches_torch_flop_counter(num_steps, k):
    """A micro-step with the loss at every depth, counted by torch's flop counter, within 3% of
    `train_flops_per_token(..., depths=min(k, R))`."""
    src = make_tiny_model("llama", num_layers=6, hidden=64, attn_implementation="eager")
    model = to_looped(src, layout_from_sizes(6, 1, 2, 2)).train()
    batch, seq = 2, 64
    ids = torch.randint(4, 260, (batch, seq), generator=torch.Generator().manual_seed(0))
    dc = DistillationConfig(enabled=True, ce_scale=0.5, kd_scale=0.5)
    objective = build_objective(dc, model, src, every_depth=EveryDepthConfig(k))
    inplace = {torch.ops.aten.addmm_: lambda _c, a, b, **_: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        parts = objective_loss(objective, Student(model), src, {"input_ids": ids, "labels": ids}, num_steps,
                               torch.tensor(float(batch * (seq - 1))))  # fmt: skip
        parts.total.backward()
    n, kg = num_steps
    want = train_flops_per_token(flop_params(model, src), n, kg, seq, teacher=True, depths=min(k, n + kg))
    assert counter.get_total_flops() == pytest.approx(want * batch * seq, rel=0.03)
    assert want > train_flops_per_token(flop_params(model, src), n, kg, seq, teacher=True)


def test_supervised_depths_integrate_the_sampler():
    """`E[min(k, R)]` under the sampler against draws, and `training_flops` adding its cost."""
    sched = DepthSchedule(total_steps=10, base_mean=3, backprop_depth=2, seed=1)
    draws = [sum(sched.draw(0)) for _ in range(20000)]
    for k in (1, 2, 4):
        emp = sum(min(k, r) for r in draws) / len(draws)
        assert sched.supervised_depths_at(0, k) == pytest.approx(emp, rel=0.02)
    p = {"prelude": 10, "block": 100, "coda": 20, "head": 50}
    base = training_flops(p, 1e3, sched, 20)["flops"]
    extra = sched.supervised_depths_at(0, 4) - 1
    assert training_flops(p, 1e3, sched, 20, every_depth=4)["flops"] == pytest.approx(base + 1e3 * extra * 6 * 70)


# ---------------------------------------------------------------------------------------- training, resume
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_teacher_and_looped_student(tmp_path_factory.mktemp("every_depth"))


def _cfg(models, out, **kw) -> TrainConfig:
    base = dict(model_name=str(models / "looped"), out=str(out), data=str(models / "data.txt"), seq_len=32,
                batch_size=4, max_steps=3, progress_bar=False, tensorboard=False, fixed_num_steps=3,
                every_depth=EveryDepthConfig(3, "linear"), lora=LoRAConfig(enabled=True, r=4),
                distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_training_changes_every_trainable_parameter_and_logs_the_depths(models, tmp_path):
    cfg = _cfg(models, tmp_path / "run")
    cfg.optim_config.lr = 1e-2
    run = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainable = {n for n, _ in run.trainable}
    fit(run)
    run.logger.close()
    for n, p in run.model.named_parameters():
        assert (not torch.equal(before[n], p.detach())) == (n in trainable), n
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for x in m:
        assert {"ce_R-1_loss", "kd_R-1_loss", "ce_R-2_loss", "kd_R-2_loss"} <= set(x)
        w = depth_weights(3, "linear")
        parts = [(x[f"ce{s}_loss"], x[f"kd{s}_loss"]) for s in ("_R-2", "_R-1", "")]
        assert x["loss"] == pytest.approx(sum(wt * 0.5 * (c + k) for wt, (c, k) in zip(w, parts)), rel=1e-5)


def test_resume_refuses_a_changed_k(models, tmp_path):
    out = tmp_path / "run"
    train(_cfg(models, out, max_steps=2))
    with pytest.raises(LoopfitError, match=r"every_depth.k \(3 -> 2\)"):
        setup(_cfg(models, out, max_steps=4, resume=True, every_depth=EveryDepthConfig(2, "linear")))
    with pytest.raises(LoopfitError, match="every_depth.weighting"):
        setup(_cfg(models, out, max_steps=4, resume=True, every_depth=EveryDepthConfig(3, "uniform")))


@pytest.mark.parametrize("kw, match", [(dict(k=-1), "every_depth.k must be >= 0"),
                                       (dict(weighting="cubic"), "every_depth.weighting must be one of")])  # fmt: skip
def test_bad_settings_refused_at_start(models, tmp_path, kw, match):
    with pytest.raises(LoopfitError, match=match):
        _cfg(models, tmp_path / "run", every_depth=EveryDepthConfig(**kw)).validate()
    assert not (tmp_path / "run").exists()
