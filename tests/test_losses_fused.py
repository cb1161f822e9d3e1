"""Fused and chunked CE + KD over the lm_head against the unfused reference: losses and gradients."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from loopfit.losses import (
    DIVERGENCES,
    FusedKDLoss,
    chunk_grad,
    chunked_kd_loss,
    fused_kd_loss,
    get_divergence,
    kd_divergence,
    sparse_kd_divergence,
)
from loopfit.losses.chunk_grad import Spec, Workspace, divergence_grad, fkl_grad
from loopfit.losses.depths import fused_depth_loss
from loopfit.losses.divergences import resolve_kind

N, H, HT, V = 23, 16, 24, 40


def make(seed=0, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    th = torch.randn(N, HT, generator=g).to(dtype)
    tw = (torch.randn(V, HT, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6, 20]] = -100
    return h, w, b, th, tw, labels


def reference(h, w, b, labels, th=None, tw=None, tb=None, ce_scale=1.0, kd_scale=1.0, num_items=None, **kd_kw):
    """Unfused: full logits, F.cross_entropy, kd_divergence / sparse_kd_divergence."""
    logits = F.linear(h, w, b).float()
    valid = labels != -100
    denom = num_items if num_items is not None else int(valid.sum())
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / denom
    if th is not None:
        kd = kd_divergence(logits, F.linear(th, tw, tb).float(), labels, num_items=denom, **kd_kw)
    elif "teacher_ids" in kd_kw:
        kw = dict(kd_kw)
        ids, vals = kw.pop("teacher_ids"), kw.pop("teacher_values")
        kd = sparse_kd_divergence(logits, ids, vals, labels, num_items=denom, **kw)
    else:
        return ce_scale * ce, ce, None
    return ce_scale * ce + kd_scale * kd, ce, kd


def grads(total, *params):
    return torch.autograd.grad(total, [p for p in params if p is not None])


@pytest.mark.parametrize("impl", [fused_kd_loss, chunked_kd_loss])
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_dense_teacher_matches_reference(impl, kind, temp):
    h, w, b, th, tw, labels = make(seed=1, bias=True)
    out = impl(
        h, w, labels, teacher_hidden=th, teacher_weight=tw, kind=kind, temperature=temp, ce_scale=0.7,
        kd_scale=1.3, chunk_size=5, lm_head_bias=b, beta=0.3, alpha=0.2, lam=0.6,
    )  # fmt: skip
    kw = dict(kind=kind, temperature=temp, beta=0.3, alpha=0.2, lam=0.6)
    total, ce, kd = reference(h, w, b, labels, th, tw, ce_scale=0.7, kd_scale=1.3, **kw)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce, ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd, kd.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w, b), grads(total, h, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [fused_kd_loss, chunked_kd_loss])
@pytest.mark.parametrize("estimator", ["topk", "topk_tail", "sampled"])
@pytest.mark.parametrize("kind,temp", [("fkl", 1.0), ("fkl", 1.5), ("jsd", 1.5)])
def test_sparse_teacher_matches_reference(impl, estimator, kind, temp):
    h, w, _, th, tw, labels = make(seed=2)
    t_logp = torch.log_softmax(F.linear(th, tw), -1)
    if estimator == "sampled":
        draws = torch.multinomial(t_logp.exp(), 16, replacement=True, generator=torch.Generator().manual_seed(0))
        counts = torch.zeros(N, V).scatter_add_(-1, draws, torch.ones(N, 16))
        values, ids = counts.topk(16, dim=-1)
    else:
        values, ids = t_logp.topk(6, dim=-1)
    sparse = dict(teacher_ids=ids, teacher_values=values.half(), estimator=estimator)
    out = impl(h, w, labels, **sparse, kind=kind, temperature=temp, chunk_size=4, ce_scale=0.6, kd_scale=1.7)
    total, ce, kd = reference(h, w, None, labels, kind=kind, temperature=temp, ce_scale=0.6, kd_scale=1.7, **sparse)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd, kd.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w), grads(total, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ce_only_path_and_num_items():
    h, w, _, _, _, labels = make(seed=3)
    out = fused_kd_loss(h, w, labels, chunk_size=7, num_items=40)
    assert out.kd is None
    ref = F.cross_entropy(h @ w.T, labels, reduction="sum") / 40
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(out.total, h, w), grads(ref, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Two micro-batches normalised by the global count add up to the full batch.
    n_valid = int((labels != -100).sum())
    a = fused_kd_loss(h[:10], w, labels[:10], num_items=n_valid).total
    b = fused_kd_loss(h[10:], w, labels[10:], num_items=n_valid).total
    torch.testing.assert_close(a + b, fused_kd_loss(h, w, labels).total)


def test_batched_shapes_upstream_gradient_and_teacher_frozen():
    h, w, _, th, tw, labels = make(seed=4)
    th.requires_grad_()
    out = fused_kd_loss(h.view(1, N, H), w, labels.view(1, N), teacher_hidden=th.view(1, N, HT), teacher_weight=tw)
    (3.0 * out.total).backward()
    total, _, _ = reference(h, w, None, labels, th, tw)
    gh, gw = grads(3.0 * total, h, w)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-5)
    assert th.grad is None
    assert not out.ce.requires_grad and not out.kd.requires_grad


def test_minus_inf_teacher_logits_and_all_masked():
    h, w, _, th, tw, labels = make(seed=5)
    tb = torch.zeros(V)
    tb[:7] = -math.inf  # tokens the teacher never predicts
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, chunk_size=8)
    total, _, _ = reference(h, w, None, labels, th, tw, tb)
    assert torch.isfinite(out.total)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w), grads(total, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    masked = fused_kd_loss(h, w, torch.full_like(labels, -100), teacher_hidden=th, teacher_weight=tw)
    masked.total.backward()
    assert masked.total.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_closed_form_with_impossible_teacher_tokens(kind):
    """Teacher probabilities of exactly zero: every closed-form gradient stays finite and equals autograd's."""
    h, w, _, th, tw, labels = make(seed=7)
    tb = torch.zeros(V)
    tb[:7] = -math.inf
    kw = dict(kind=kind, temperature=1.5, beta=0.3, alpha=0.2, lam=0.6)
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, chunk_size=8, **kw)
    total, _, _ = reference(h, w, None, labels, th, tw, tb, **kw)
    for got, want in zip(grads(out.total, h, w), grads(total, h, w)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,params", [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skew", {"alpha": 0.0})])
def test_divergence_endpoints(kind, params):
    h, w, _, th, tw, labels = make(seed=8)
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind=kind, temperature=2.0, **params)
    total, _, kd = reference(h, w, None, labels, th, tw, kind=kind, temperature=2.0, **params)
    torch.testing.assert_close(out.kd, kd.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w), grads(total, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_frozen_lm_head_gets_no_gradient():
    """A weight without requires_grad (LoRA's frozen lm_head) skips the weight gradient; the hidden one is exact."""
    h, w, _, th, tw, labels = make(seed=9)
    w = w.detach()
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind="jsd")
    (gh,) = torch.autograd.grad(out.total, h)
    total, _, _ = reference(h, w, None, labels, th, tw, kind="jsd")
    torch.testing.assert_close(gh, torch.autograd.grad(total, h)[0], rtol=1e-5, atol=1e-5)
    assert w.grad is None


def test_bf16_inputs():
    h, w, _, th, tw, labels = make(seed=6, dtype=torch.bfloat16)
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, temperature=2.0, chunk_size=6)
    assert out.total.dtype == torch.float32
    total, _, _ = reference(h, w, None, labels, th, tw, temperature=2.0)
    torch.testing.assert_close(out.total, total, rtol=1e-3, atol=1e-3)
    gh, gw = grads(out.total, h, w)
    rh, rw = grads(total, h, w)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
@pytest.mark.parametrize("depths", [False, True])
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_autocast_runs_the_products_in_the_autocast_dtype(logits_dtypes, kind, depths, device):
    """Under bf16 autocast the fused loss multiplies in bf16, as `F.linear` would: float32 inputs give exactly the
    loss and (upcast) gradients of the same inputs cast to bf16 by hand, and the gradients arrive in float32."""

    def on(*ts):  # leaves on `device` (make's tensors are CPU leaves that require grad)
        return [t.detach().to(device).requires_grad_(t.requires_grad) for t in ts]

    h, w, b, th, tw = on(*(x for x in make(seed=11, bias=True) if x.is_floating_point()))
    labels = make(seed=11)[-1].to(device)
    hs = [h, *on(make(seed=12)[0])] if depths else [h]  # D = 2: the depth loss, every depth a leaf of its own

    def loss(hs_, w_, b_, th_, tw_):
        kw = dict(teacher_hidden=th_, teacher_weight=tw_, kind=kind, temperature=2.0, chunk_size=7, lm_head_bias=b_)
        if depths:
            return fused_depth_loss(hs_, [0.25, 0.75], w_, labels, **kw).total
        return fused_kd_loss(hs_[0], w_, labels, **kw).total

    with torch.autocast(device, dtype=torch.bfloat16):
        got = loss(hs, w, b, th, tw)
    assert logits_dtypes and all(d == (torch.bfloat16,) * 3 for d in logits_dtypes)
    leaves = [*hs, w, b]
    grads_got = torch.autograd.grad(got, leaves)
    assert all(g.dtype == torch.float32 for g in grads_got)
    cast = [t.detach().bfloat16().requires_grad_() for t in leaves]
    want = loss(cast[:-2], cast[-2], cast[-1], th.bfloat16(), tw.bfloat16())
    assert torch.equal(got, want)
    for g, r in zip(grads_got, torch.autograd.grad(want, cast)):
        assert torch.equal(g, r.float())
    # And bf16 is close to the float32 loss (the accuracy the bf16 tests above allow).
    torch.testing.assert_close(got, loss(hs, w, b, th, tw), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "kind,temp,ce_scale,kd_scale,teacher",
    [
        ("fkl", 1.0, 0.7, 1.3, "dense"),
        ("fkl", 2.0, 0.5, 1.5, "dense"),
        ("fkl", 2.0, 0.0, 1.0, "dense"),
        ("fkl", 1.0, 1.0, 0.0, "none"),
        ("fkl", 1.5, 1.0, 1.0, "minus_inf"),
        ("jsd", 2.0, 0.6, 1.4, "dense"),
    ],
)
def test_bf16_against_fp32_autograd_at_a_large_vocabulary(kind, temp, ce_scale, kd_scale, teacher):
    """bf16 logits (as the matmuls give them) over V = 3000 in row blocks and chunks: the fused loss and its bf16
    gradients against fp32 autograd on the same bf16 logits, at the tolerances of the bf16 case above."""
    g = torch.Generator().manual_seed(11)
    n, hs, v = 37, 32, 3000
    h = torch.randn(n, hs, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, hs, generator=g) * 0.6).bfloat16().requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).bfloat16().requires_grad_()
    th = torch.randn(n, hs, generator=g).bfloat16()
    tw = (torch.randn(v, hs, generator=g) * 0.6).bfloat16()
    tb = torch.zeros(v, dtype=torch.bfloat16)
    if teacher == "minus_inf":
        tb[:50] = -math.inf
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[3, 17]] = -100
    kw = dict(kind=kind, temperature=temp, ce_scale=ce_scale, kd_scale=kd_scale, beta=0.3)
    t_kw = dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb) if teacher != "none" else {}
    out = fused_kd_loss(h, w, labels, lm_head_bias=b, chunk_size=16, **t_kw, **kw)
    logits = F.linear(h, w, b).float()  # the bf16 products, upcast: the reference differs only after the matmuls
    valid = labels != -100
    want = ce_scale * F.cross_entropy(logits, labels, ignore_index=-100)
    if teacher != "none":
        t_logits = F.linear(th, tw, tb).float()
        want = want + kd_scale * kd_divergence(logits, t_logits, labels, kind=kind, temperature=temp, beta=0.3)
    # Everything after the matmuls is float32 on both sides: the loss agrees to float32 rounding.
    torch.testing.assert_close(out.total, want, rtol=1e-5, atol=1e-6)
    assert int(valid.sum()) == 35
    for got, ref in zip(grads(out.total, h, w, b), grads(want, h, w, b)):
        assert got.dtype == torch.bfloat16
        # bf16 gradients: a bf16 rounding or two (2^-9 each) apart, measured against the gradient's own size (an
        # absolute tolerance would pass anything at this vocabulary, where every entry is below 0.12).
        err = (got.float() - ref.float()).norm() / ref.float().norm()
        assert err < 1e-2, err
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_errors_and_module():
    h, w, _, th, tw, labels = make(seed=7)
    with pytest.raises(ValueError, match="share the vocabulary"):
        fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw[:-1])
    with pytest.raises(ValueError, match="teacher_hidden"):
        fused_kd_loss(h, w, labels, teacher_hidden=th)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind="kl")
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        fused_kd_loss(h, w, labels, teacher_ids=torch.full((N, 2), V), teacher_values=torch.zeros(N, 2))
    mod = FusedKDLoss(kind="rkl", temperature=2.0, ce_scale=0.5, kd_scale=0.5, chunk_size=4)
    got = mod(h, w, labels, teacher_hidden=th, teacher_weight=tw)
    want = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind="rkl", temperature=2.0,
                         ce_scale=0.5, kd_scale=0.5)  # fmt: skip
    torch.testing.assert_close(got.total, want.total)


def test_row_blocks_run_on_one_thread_and_restore_the_count():
    """The CPU row-block kernels run each part of a chunk's rows on its own Python thread with one intra-op thread
    (see `chunk_grad._rows_over_threads`) and give the caller's thread count back, also when the kernel fails."""
    h, w, _, th, tw, labels = make(seed=10)
    rkl = get_divergence("rkl")
    seen, callers, fail = set(), set(), []

    def recording(*args, **kw):
        seen.add(torch.get_num_threads())
        callers.add(threading.get_ident())
        if fail:
            raise RuntimeError("boom")
        return rkl.grad(*args, **kw)

    div = dataclasses.replace(rkl, grad=recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind=div, chunk_size=64)
        want, _, _ = reference(h, w, None, labels, th, tw, kind="rkl")
        torch.testing.assert_close(out.total, want, rtol=1e-5, atol=1e-5)
        assert seen == {1} and torch.get_num_threads() == 2
        assert len(callers) == 2  # 19 valid rows = 3 blocks of 8: two parts, the caller's thread and a worker
        fail.append(True)
        with pytest.raises(RuntimeError, match="boom"):
            fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind=div, chunk_size=64)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_over_threads_equal_one_thread(kind, dtype):
    """Rows split over 2 and 3 threads: the kernel writes the one-thread gradient exactly (each row's arithmetic is
    the same) and the same sums up to their order; through the fused loss, the same losses and gradients. 100 rows
    in chunks of 40 leave short last parts."""
    g = torch.Generator().manual_seed(3)
    n, v = 100, 300
    h = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, H, generator=g) * 0.5).to(dtype).requires_grad_()
    th, tw = torch.randn(n, HT, generator=g).to(dtype), (torch.randn(v, HT, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    s0, t = (torch.randn(n, v, generator=g) * 3).to(dtype), (torch.randn(n, v, generator=g) * 3).to(dtype)
    div, params = resolve_kind(kind, {})
    spec = Spec(div=div, params=params, temperature=2.0, ce_scale=0.5, kd_scale=0.5)
    kernel = fkl_grad if kind == "fkl" else divergence_grad
    before, results, kernels = torch.get_num_threads(), {}, {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            s = s0.clone()
            kernels[threads] = (s, *kernel(s, labels, t, spec, Workspace(s)))
            out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind=kind, temperature=2.0,
                                chunk_size=40)  # fmt: skip
            results[threads] = (out.total.detach(), out.kd, *grads(out.total, h, w))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for threads in (2, 3):
        s, ce, kd, scale = kernels[threads]
        assert torch.equal(s, kernels[1][0]) and scale == kernels[1][3]
        torch.testing.assert_close(ce, kernels[1][1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kd, kernels[1][2], rtol=1e-6, atol=1e-6)
        for got, want in zip(results[threads], results[1]):
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_logits_into_vocab_blocks_equal_one_product(monkeypatch, dtype, bias):
    """The CPU logits product in vocabulary blocks (7 columns here, the last block short) writes the logits of one
    product into the given rows of a larger buffer (as the fused loss passes its workspace) and nowhere else."""
    monkeypatch.setattr(chunk_grad, "CPU_VOCAB_BLOCK", 7)
    h, w, b, *_ = make(seed=4, dtype=dtype, bias=bias)
    out = torch.full((N + 3, V), float("nan"), dtype=dtype)
    got = chunk_grad.logits_into(h.detach(), w.detach(), None if b is None else b.detach(), out[:N])
    assert got.data_ptr() == out.data_ptr() and not out[N:].isfinite().any()
    torch.testing.assert_close(got, F.linear(h, w, b).detach())  # to the dtype's rounding (summation order)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_fused_loss_with_vocab_blocks_matches_reference(monkeypatch, kind):
    """Student and teacher logits computed in vocabulary blocks of 6 (V = 40): loss and gradients as unfused."""
    monkeypatch.setattr(chunk_grad, "CPU_VOCAB_BLOCK", 6)
    h, w, b, th, tw, labels = make(seed=5, bias=True)
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, kind=kind, temperature=2.0,
                        chunk_size=5, lm_head_bias=b, beta=0.3)  # fmt: skip
    total, _, _ = reference(h, w, b, labels, th, tw, kind=kind, temperature=2.0, beta=0.3)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w, b), grads(total, h, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, temp, teacher, ce_scale, kd_scale",
    [(torch.float32, 2.0, True, 0.5, 0.5), (torch.bfloat16, 1.0, True, 1.0, 0.0),
     (torch.float32, 1.0, False, 1.0, 1.0)],
)  # fmt: skip
def test_compiled_kernel_matches_the_reference(monkeypatch, dtype, temp, teacher, ce_scale, kd_scale):
    """`losses.compiled_fkl` (the GPU default), forced on here through inductor's CPU backend: the reference's losses
    and gradients, -inf teacher logits and a chunk of another length (recompiled) included."""
    from loopfit.losses import compiled_fkl

    monkeypatch.setenv("LOOPFIT_COMPILED_LOSS", "1")
    monkeypatch.setitem(compiled_fkl._STATE, "off", None)
    calls = []
    real = compiled_fkl.fkl_rows
    monkeypatch.setattr(compiled_fkl, "fkl_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(compiled_fkl._STATE, "fn", None)
    h, w, _, th, tw, labels = make(seed=7, dtype=dtype)
    tb = torch.zeros(V, dtype=dtype)
    tb[:5] = -math.inf
    kw = dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, temperature=temp) if teacher else {}
    out = fused_kd_loss(h, w, labels, ce_scale=ce_scale, kd_scale=kd_scale, chunk_size=8, **kw)  # 19 rows: 8, 8, 3
    assert calls and compiled_fkl._STATE["off"] is None  # traced through the compiled path, which did not fail
    ref_kw = dict(th=th.float(), tw=tw.float(), tb=tb.float(), temperature=temp) if teacher else {}
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    total, _, _ = reference(h32, w32, None, labels, ce_scale=ce_scale, kd_scale=kd_scale, **ref_kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.total.float(), total, **tol)
    for got, want in zip(grads(out.total, h, w), grads(total, h32, w32)):
        torch.testing.assert_close(got.float(), want, **tol)


def test_compiled_kernel_is_off_on_cpu_by_default_and_falls_back_with_a_warning(monkeypatch, capsys):
    from loopfit.losses import compiled_fkl

    monkeypatch.delenv("LOOPFIT_COMPILED_LOSS", raising=False)
    monkeypatch.setitem(compiled_fkl._STATE, "off", None)
    assert not compiled_fkl.compiled_fkl_wanted(torch.device("cpu"))
    monkeypatch.setenv("LOOPFIT_COMPILED_LOSS", "1")

    def broken(*a, **k):
        raise RuntimeError("no backend here")

    monkeypatch.setitem(compiled_fkl._STATE, "fn", broken)
    h, w, _, th, tw, labels = make(seed=8)
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, temperature=2.0, chunk_size=8)
    total, _, _ = reference(h, w, None, labels, th, tw, temperature=2.0)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)  # the eager kernel took over
    assert "compiled fused-loss kernel failed (no backend here)" in capsys.readouterr().err
    assert compiled_fkl._STATE["off"] == "no backend here" and not compiled_fkl.compiled_fkl_wanted(h.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_is_the_default_on_cuda_and_matches_the_reference(monkeypatch, dtype):
    from loopfit.losses import compiled_fkl

    monkeypatch.delenv("LOOPFIT_COMPILED_LOSS", raising=False)
    calls = []
    real = compiled_fkl.fkl_rows
    monkeypatch.setattr(compiled_fkl, "fkl_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(compiled_fkl._STATE, "fn", None)
    monkeypatch.setitem(compiled_fkl._STATE, "off", None)
    h, w, _, th, tw, labels = (x.cuda() if x is not None else None for x in make(seed=9, dtype=dtype))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, temperature=2.0, chunk_size=8)
    assert calls and compiled_fkl._STATE["off"] is None
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    total, _, _ = reference(h32, w32, None, labels, th.float(), tw.float(), temperature=2.0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.total.float(), total, **tol)
    for got, want in zip(grads(out.total, h, w), grads(total, h32, w32)):
        torch.testing.assert_close(got.float(), want, **tol)


def test_compiled_kernel_switch_refuses_an_unknown_value(monkeypatch):
    from loopfit.losses import compiled_fkl

    monkeypatch.setenv("LOOPFIT_COMPILED_LOSS", "false")
    monkeypatch.setitem(compiled_fkl._STATE, "off", None)
    with pytest.raises(ValueError, match="LOOPFIT_COMPILED_LOSS takes auto, 0 or 1, got 'false'"):
        compiled_fkl.compiled_fkl_wanted(torch.device("cpu"))
