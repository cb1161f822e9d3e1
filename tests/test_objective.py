"""The objective built once (`build_objective` + `objective_loss`): the same terms as building it per call, a
soft-capped student trained from a teacher cache through the fused path, and its refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from loopfit.convert import layout_from_sizes, to_looped
from loopfit.errors import LoopfitError
from loopfit.losses import HiddenStateLoss
from loopfit.losses.objective import Objective, ObjectiveWeights, Terms
from loopfit.train.config import DistillationConfig
from loopfit.train.student import Student, build_objective, micro_batch_loss, objective_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(shape=(2, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, shape, generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}, (labels[:, 1:] != -100).sum().float()


def _cached(teacher, batch, k=260):
    """Sparse targets of `teacher` on `batch` as a cache would hold them (T = 1 log-probabilities, top k)."""
    with torch.no_grad():
        logp = torch.log_softmax(teacher(batch["input_ids"]).logits.float(), -1)
    values, ids = logp.topk(k, dim=-1)
    return {**batch, "teacher_ids": ids, "teacher_values": values}


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_soft_capped_student_trains_from_a_cache_through_the_fused_path(family):
    """Gemma 2 / 3 cap their logits: the fused loss from cached targets (k = V) equals the live teacher's and the
    unfused reference, losses and gradients."""
    teacher = make_tiny_model(family)
    assert teacher.config.final_logit_softcapping
    student = to_looped(teacher, layout_from_sizes(6, 2, 2, 2), adapter_init="random", state_init="zeros").train()
    batch, n = _batch()
    cached = _cached(teacher, batch)
    results = {}
    for name, fused, source in (("cache", True, "cache"), ("live", True, "live"), ("unfused", False, "live")):
        dcfg = DistillationConfig(enabled=True, ce_scale=0.4, kd_scale=0.6, temperature=2.0, kind="jsd", fused=fused)
        student.zero_grad()
        if source == "cache":
            parts = micro_batch_loss(Student(student), None, cached, 2, dcfg, n, estimator="topk")
        else:
            parts = micro_batch_loss(Student(student), teacher, batch, 2, dcfg, n)
        parts.total.backward()
        results[name] = parts, [p.grad.clone() for p in student.parameters() if p.grad is not None]
    want, want_grads = results["unfused"]
    for name in ("cache", "live"):
        got, got_grads = results[name]
        assert got.kd > 0
        torch.testing.assert_close(got.total, want.total, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.kd, want.kd, rtol=1e-4, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_objective_built_once_equals_building_it_per_call():
    """One objective serves every depth and batch; its terms are those `micro_batch_loss` gives (built per call)."""
    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    student = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), adapter_init="random", state_init="zeros").train()
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", ce_scale=0.3, kd_scale=0.7, hidden_scale=0.7,
                              kind="skl", kind_params={"lam": 0.2})  # fmt: skip
    objective = build_objective(dcfg, student, teacher, fixed_point_scale=0.5)
    assert isinstance(objective.hidden_loss, HiddenStateLoss) and objective.block_span == (1, 4)
    for r, seed in ((1, 0), (3, 1)):
        batch, n = _batch(seed=seed)
        once = objective_loss(objective, Student(student, objective.hidden_loss), teacher, batch, r, n)
        per_call = micro_batch_loss(Student(student), teacher, batch, r, dcfg, n, objective.hidden_loss,
                                    objective.block_span, fixed_point_scale=0.5)  # fmt: skip
        assert set(once.named()) == {"ce", "kd", "hidden", "fixed_point"}
        for name, value in once.named().items():
            torch.testing.assert_close(value, getattr(per_call, name))
        want = 0.3 * once.ce + 0.7 * once.kd + 0.7 * once.hidden + 0.5 * once.fixed_point
        torch.testing.assert_close(once.total.detach(), want, rtol=1e-5, atol=1e-6)


def test_objective_from_tensors_and_its_refusals():
    """The objective itself takes tensors (any training loop can use it) and refuses what it cannot compute."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (2, 6), generator=g)
    t_hidden, t_weight = torch.randn(2, 6, 8, generator=g), torch.randn(20, 8, generator=g)
    n = (labels[:, 1:] != -100).sum().float()
    kw = dict(teacher="live", divergence="tvd", temperature=1.5)
    fused = Objective(ObjectiveWeights(ce_scale=0.5, kd_scale=2.0), **kw)
    unfused = Objective(ObjectiveWeights(ce_scale=0.5, kd_scale=2.0), fused=False, **kw)
    a = fused(labels, hidden, weight, n, teacher_hidden=t_hidden, teacher_weight=t_weight)
    b = unfused(labels, hidden, weight, n, teacher_hidden=t_hidden, teacher_weight=t_weight)
    assert isinstance(a, Terms) and set(a.named()) == {"ce", "kd"}
    torch.testing.assert_close(a.total, b.total)
    ce_only = Objective(ObjectiveWeights(ce_scale=0.5, kd_scale=2.0))(labels, hidden, weight, n)
    assert ce_only.kd is None and torch.allclose(ce_only.total, a.ce)  # no teacher: CE alone at weight 1
    with pytest.raises(ValueError, match="live teacher"):
        fused(labels, hidden, weight, n)
    with pytest.raises(ValueError, match="beta of the 'jsd' divergence"):
        Objective(teacher="live", divergence="jsd", divergence_params={"beta": 2.0})
    with pytest.raises(ValueError, match="needs a live teacher"):
        Objective(teacher="cache", hidden_loss=HiddenStateLoss(8, 8), block_span=(0, 1))
    with pytest.raises(ValueError, match="needs teacher='cache'"):
        Objective(teacher="live", estimator="topk")
    with pytest.raises(ValueError, match="unknown sparse estimator"):
        Objective(teacher="cache", estimator="top")


def test_build_objective_refusals():
    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    plain = make_tiny_model("llama", num_layers=2, hidden=32, seed=1)
    looped = to_looped(teacher, layout_from_sizes(4, 1, 1, 1))
    hidden = DistillationConfig(enabled=True, teacher_model_name="t", hidden_scale=1.0)
    with pytest.raises(LoopfitError, match="needs a looped student"):
        build_objective(hidden, plain, teacher)
    with pytest.raises(LoopfitError, match="needs a live teacher"):
        build_objective(hidden, looped, None, cache_estimator="topk")
    with pytest.raises(LoopfitError, match="fixed_point_scale needs a looped student"):
        build_objective(DistillationConfig(), plain, fixed_point_scale=1.0)
    objective = build_objective(DistillationConfig(enabled=True, teacher_model_name="t"), looped, None)
    assert objective.teacher is None and objective.scales == (1.0, 0.0)  # nothing to distill from: CE alone
    batch, n = _batch()
    with pytest.raises(LoopfitError, match="no cached targets"):
        objective_loss(build_objective(DistillationConfig(enabled=True, teacher_cache="c"), looped,
                                       cache_estimator="sampled"), Student(looped), None, batch, 1, n)  # fmt: skip


def test_micro_batch_loss_never_makes_an_untrained_projection():
    """Built per call, a projection between widths would be new at every step: refused; equal widths need none."""
    teacher = make_tiny_model("llama", num_layers=4, hidden=32)
    wide = make_tiny_model("llama", num_layers=4, hidden=48, seed=2)
    looped = to_looped(teacher, layout_from_sizes(4, 1, 1, 1), state_init="zeros")
    dcfg = DistillationConfig(enabled=True, teacher_model_name="t", hidden_scale=1.0)
    batch, n = _batch()
    assert micro_batch_loss(Student(looped), teacher, batch, 2, dcfg, n).hidden > 0
    with pytest.raises(LoopfitError, match="needs a trained projection"):
        micro_batch_loss(Student(looped), wide, batch, 2, dcfg, n)
