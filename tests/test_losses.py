"""Dense and sparse logit divergences against direct float64 formulas, their properties and the estimators' bias."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loopfit.losses import (
    DIVERGENCES,
    KDLoss,
    ObjectiveWeights,
    SparseKDLoss,
    combine_losses,
    kd_divergence,
    sparse_kd_divergence,
    tail_from_logprobs,
)


def reference(s, t, labels, kind, temp, lam=0.5, alpha=0.1, beta=0.5):
    """Direct float64 formula on probabilities, mean over valid tokens, times T^2."""
    valid = labels != -100
    q = torch.softmax(s[valid].double() / temp, -1)
    p = torch.softmax(t[valid].double() / temp, -1)

    def kl(a, b):
        return (a * (a / b).log()).nan_to_num(nan=0.0).sum(-1)

    if kind == "fkl":
        d = kl(p, q)
    elif kind == "rkl":
        d = kl(q, p)
    elif kind == "skl":
        d = lam * kl(p, q) + (1 - lam) * kl(q, p)
    elif kind == "skew":
        d = kl(p, alpha * p + (1 - alpha) * q)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    return d.mean() * temp**2


def random_case(vocab, shape=(3, 5), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=g) * scale
    t = torch.randn(*shape, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, :2] = -100
    return s, t, labels


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("vocab,temp", [(7, 1.0), (50, 2.0), (300, 0.5)])
def test_divergence_matches_float64_formula(kind, vocab, temp):
    s, t, labels = random_case(vocab, seed=vocab)
    got = kd_divergence(s, t, labels, kind=kind, temperature=temp, lam=0.3, alpha=0.2, beta=0.4)
    want = reference(s, t, labels, kind, temp, lam=0.3, alpha=0.2, beta=0.4)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_nonnegative_zero_on_equal_and_bf16_inputs(kind):
    s, t, labels = random_case(64, seed=1)
    assert kd_divergence(s, t, labels, kind=kind) > 0
    assert kd_divergence(s, s.clone(), labels, kind=kind).abs() < 1e-6
    # bf16 inputs are upcast: result equals the fp32 computation on the same (rounded) values.
    got = kd_divergence(s.bfloat16(), t.bfloat16(), labels, kind=kind)
    want = kd_divergence(s.bfloat16().float(), t.bfloat16().float(), labels, kind=kind)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_jsd_endpoints_and_tvd_bound():
    s, t, labels = random_case(40, seed=2, scale=6.0)
    fkl = kd_divergence(s, t, labels, "fkl", temperature=2.0)
    rkl = kd_divergence(s, t, labels, "rkl", temperature=2.0)
    torch.testing.assert_close(kd_divergence(s, t, labels, "jsd", temperature=2.0, beta=0.0), fkl)
    torch.testing.assert_close(kd_divergence(s, t, labels, "jsd", temperature=2.0, beta=1.0), rkl)
    # Near the endpoints the general formula vanishes (it is ~beta*FKL), unlike the special case.
    assert kd_divergence(s, t, labels, "jsd", temperature=2.0, beta=1e-4) < 0.01 * fkl
    for temp in (0.5, 1.0, 3.0):
        s_far = torch.full((4, 40), -30.0)
        s_far[:, 0] = 30.0
        t_far = torch.full((4, 40), -30.0)
        t_far[:, 1] = 30.0
        tvd = kd_divergence(s_far, t_far, torch.zeros(4, dtype=torch.long), "tvd", temperature=temp)
        assert tvd <= temp**2 + 1e-5
        assert tvd > 0.9 * temp**2  # disjoint distributions: TVD close to its bound
    assert kd_divergence(s, t, labels, "tvd", temperature=3.0) <= 9.0


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_minus_inf_logits_give_finite_loss_and_gradients(kind):
    s, t, labels = random_case(32, seed=3)
    s[..., :5] = -math.inf  # masked vocabulary entries in both models
    t[..., :5] = -math.inf
    t[..., 5:8] = -math.inf  # teacher-only zeros
    s.requires_grad_()
    loss = kd_divergence(s, t, labels, kind=kind, temperature=1.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()
    want = reference(s.detach()[..., 5:], t[..., 5:], labels, kind, 1.5)  # -inf columns carry no mass
    if kind in ("fkl", "jsd", "skew", "tvd"):  # finite under teacher zeros (rkl/skl are legitimately huge there)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_masking_and_num_items_normalisation():
    s, t, labels = random_case(16, seed=4)
    n_valid = int((labels != -100).sum())
    full = kd_divergence(s, t, labels)
    # Sum over two micro-batches each divided by the global count equals the full-batch mean.
    a = kd_divergence(s[:1], t[:1], labels[:1], num_items=n_valid)
    b = kd_divergence(s[1:], t[1:], labels[1:], num_items=n_valid)
    torch.testing.assert_close(a + b, full)
    # Masked positions do not matter whatever their logits.
    s2 = s.clone()
    s2[0, :2] = 1e4
    torch.testing.assert_close(kd_divergence(s2, t, labels), full)
    # All masked: zero, and backward still works.
    s3 = s.clone().requires_grad_()
    zero = kd_divergence(s3, t, torch.full_like(labels, -100))
    zero.backward()
    assert zero.item() == 0.0 and (s3.grad == 0).all()


def test_gradient_matches_finite_differences():
    # The loss computes in float32; compare its gradient with central differences of the float64 formula.
    s, t, labels = random_case(5, shape=(2, 2), seed=5)
    labels[0, :2] = 1  # keep every position valid
    eps = 1e-5
    for kind in DIVERGENCES:
        x = s.clone().requires_grad_()
        kd_divergence(x, t, labels, kind=kind, temperature=1.7).backward()
        numeric = torch.zeros_like(s, dtype=torch.float64)
        for idx in itertools.product(*map(range, s.shape)):
            plus, minus = s.double().clone(), s.double().clone()
            plus[idx] += eps
            minus[idx] -= eps
            diff = reference(plus, t, labels, kind, 1.7) - reference(minus, t, labels, kind, 1.7)
            numeric[idx] = diff / (2 * eps)
        torch.testing.assert_close(x.grad.double(), numeric, rtol=1e-3, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    s, t, labels = random_case(8)
    with pytest.raises(ValueError, match="unknown divergence"):
        kd_divergence(s, t, labels, kind="kl")
    with pytest.raises(ValueError, match="share the vocabulary"):
        kd_divergence(s, t[..., :7], labels)
    with pytest.raises(ValueError, match="beta"):
        kd_divergence(s, t, labels, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(s, t, labels, temperature=0.0)


def test_module_wrapper_equals_function():
    s, t, labels = random_case(20, seed=6)
    loss_fn = KDLoss("skew", temperature=2.0, alpha=0.3)
    torch.testing.assert_close(loss_fn(s, t, labels), kd_divergence(s, t, labels, "skew", 2.0, alpha=0.3))


# ---- sparse teacher targets -----------------------------------------------------------------------------------


def topk_targets(t, k):
    logp = torch.log_softmax(t.float(), -1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_tail_at_full_vocab_equals_dense(kind, temp):
    s, t, labels = random_case(24, seed=7)
    ids, values = topk_targets(t, 24)
    got = sparse_kd_divergence(s, ids, values, labels, kind=kind, estimator="topk_tail", temperature=temp)
    torch.testing.assert_close(got, kd_divergence(s, t, labels, kind=kind, temperature=temp), rtol=1e-4, atol=1e-5)
    # topk at k = V is exact too (nothing to renormalise).
    got = sparse_kd_divergence(s, ids, values, labels, kind=kind, estimator="topk", temperature=temp)
    torch.testing.assert_close(got, kd_divergence(s, t, labels, kind=kind, temperature=temp), rtol=1e-4, atol=1e-5)


def test_topk_tail_explicit_tail_and_fkl_formula():
    s, t, labels = random_case(30, seed=8)
    ids, values = topk_targets(t, 5)
    tail = tail_from_logprobs(values)
    explicit = sparse_kd_divergence(s, ids, values, labels, estimator="topk_tail", tail_logmass=tail)
    torch.testing.assert_close(explicit, sparse_kd_divergence(s, ids, values, labels, estimator="topk_tail"))
    # Direct float64 formula: KL over {k tokens, tail bucket}.
    valid = labels != -100
    p = torch.softmax(t[valid].double(), -1)
    q = torch.softmax(s[valid].double(), -1)
    pk, qk = p.gather(-1, ids[valid]), q.gather(-1, ids[valid])
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    want = (pb * (pb / qb).log()).sum(-1).mean()
    torch.testing.assert_close(explicit.double(), want, rtol=1e-5, atol=1e-6)


def test_topk_is_biased_on_a_flat_teacher_but_topk_tail_is_close():
    vocab = 200
    torch.manual_seed(0)
    t = torch.randn(8, vocab) * 0.1  # nearly flat teacher
    s = torch.randn(8, vocab) * 0.1
    labels = torch.zeros(8, dtype=torch.long)
    ids, values = topk_targets(t, 10)
    dense = kd_divergence(s, t, labels)
    topk = sparse_kd_divergence(s, ids, values, labels, estimator="topk")
    tail = sparse_kd_divergence(s, ids, values, labels, estimator="topk_tail")
    # topk pretends the teacher puts all mass on 10 of 200 tokens: KL ~ log(200/10) instead of ~0.01.
    assert topk > 2.5 and dense < 0.05
    assert abs(tail - dense) < dense
    # Its gradient pushes the student's 190 other tokens to zero mass.
    s_ = s.clone().requires_grad_()
    sparse_kd_divergence(s_, ids, values, labels, estimator="topk").backward()
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(-1, ids, False)
    assert (s_.grad[outside] > 0).all()


def test_sampled_mean_gradient_converges_to_full_fkl_gradient():
    vocab, n, draws, reps = 12, 4, 8, 3000
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, vocab, generator=g)
    t = torch.randn(n, vocab, generator=g) * 2
    labels = torch.zeros(n, dtype=torch.long)
    temp = 1.5
    s_full = s.clone().requires_grad_()
    kd_divergence(s_full, t, labels, temperature=temp).backward()
    p = torch.softmax(t / temp, -1)
    # Many independent sets of `draws` samples per position, stored as unique ids + counts padded with zeros.
    samples = torch.multinomial(p.repeat(reps, 1), draws, replacement=True, generator=g).view(reps, n, draws)
    counts = torch.zeros(reps, n, vocab).scatter_add_(-1, samples, torch.ones(reps, n, draws))
    values, ids = counts.topk(draws, dim=-1)  # unique ids first, zero-count padding after
    s_rep = s.expand(reps, n, vocab).clone().requires_grad_()
    loss = sparse_kd_divergence(
        s_rep, ids, values, labels.expand(reps, n), estimator="sampled", temperature=temp, num_items=n
    )
    loss.backward()
    mean_grad = s_rep.grad.mean(0)  # num_items=n: each repetition's gradient estimates the full-KD gradient
    err = (mean_grad - s_full.grad).abs().max()
    single = (s_rep.grad[0] - s_full.grad).abs().max()  # one draw-set alone is far off
    assert err < 0.1 * single
    assert err < 0.01
    # And the bias of topk with a comparable budget does not vanish.
    tk_ids, tk_vals = topk_targets(t / temp * temp, 4)
    s_tk = s.clone().requires_grad_()
    sparse_kd_divergence(s_tk, tk_ids, tk_vals, labels, estimator="topk", temperature=temp).backward()
    assert (s_tk.grad - s_full.grad).abs().max() > 10 * err


def test_sampled_padding_is_ignored_for_every_kind():
    vocab = 10
    s, t, labels = random_case(vocab, shape=(2, 3), seed=9)
    ids = torch.tensor([3, 5, 0]).expand(2, 3, 3)
    counts = torch.tensor([6.0, 2.0, 0.0]).expand(2, 3, 3)
    for kind in DIVERGENCES:
        a = sparse_kd_divergence(s, ids, counts, labels, kind=kind, estimator="sampled")
        b = sparse_kd_divergence(s, ids[..., :2], counts[..., :2], labels, kind=kind, estimator="sampled")
        torch.testing.assert_close(a, b)


def test_sparse_errors_and_module():
    s, t, labels = random_case(10)
    ids, values = topk_targets(t, 3)
    with pytest.raises(ValueError, match="estimator"):
        sparse_kd_divergence(s, ids, values, labels, estimator="top")
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        sparse_kd_divergence(s[..., :5], ids.clamp(min=7), values, labels.clamp(max=4))
    with pytest.raises(TypeError, match="unexpected"):
        sparse_kd_divergence(s, ids, values, labels, gamma=1.0)
    mod = SparseKDLoss("jsd", "topk_tail", temperature=2.0, beta=0.2)
    want = sparse_kd_divergence(s, ids, values, labels, "jsd", "topk_tail", 2.0, beta=0.2)
    torch.testing.assert_close(mod(s, ids, values, labels), want)


def test_combined_objective():
    ce, kd, hid = torch.tensor(2.0, requires_grad=True), torch.tensor(1.0), torch.tensor(0.5)
    out = combine_losses(ce, kd, hid, ObjectiveWeights(ce_scale=0.25, kd_scale=0.75, hidden_scale=2.0))
    assert out["total"].item() == pytest.approx(0.25 * 2 + 0.75 * 1 + 2 * 0.5)
    assert set(out) == {"total", "ce", "kd", "hidden"}
    out["total"].backward()
    assert ce.grad.item() == pytest.approx(0.25)
    out = combine_losses(ce, kd, weights=ObjectiveWeights(ce_scale=1.0, kd_scale=3.0))
    assert out["total"].item() == pytest.approx(5.0) and "hidden" not in out
    with pytest.raises(ValueError, match="kd_scale"):
        ObjectiveWeights(kd_scale=-0.5)
