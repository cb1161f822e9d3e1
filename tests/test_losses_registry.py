"""Divergences and cache estimators as single definitions: the registries, a divergence without a closed form (the
fused path falls back to per-chunk autograd), logit soft-caps in the fused path, and each estimator's round trip."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from loopfit.losses import (
    DIVERGENCE_REGISTRY,
    DIVERGENCES,
    ESTIMATOR_REGISTRY,
    ESTIMATORS,
    Divergence,
    Param,
    chunked_kd_loss,
    fused_kd_loss,
    get_divergence,
    get_estimator,
    kd_divergence,
    softcap,
    sparse_kd_divergence,
)
from loopfit.losses.divergences import KIND_PARAMS, check_kind_params

N, H, HT, V = 23, 16, 24, 40


def _alpha_value(logq, logp, a):
    """Amari's alpha-divergence `(1 - sum p^a q^(1-a)) / (a (1 - a))` (Amari 2009, doi:10.1109/TIT.2009.2030485): four
    times the squared Hellinger distance at a = 0.5. No closed-form gradient is given, so the fused path must use
    autograd."""
    return (1.0 - (a * logp + (1.0 - a) * logq).exp().sum(-1)) / (a * (1.0 - a))


AMARI = Divergence("amari", _alpha_value, params=(Param("a", 0.5, low=0.05, high=0.95),), formula="alpha-divergence")


def make(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).requires_grad_() if bias else None
    th = torch.randn(N, HT, generator=g)
    tw = torch.randn(V, HT, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 5, 6, 20]] = -100
    return h, w, b, th, tw, labels


def grads(total, *params):
    return torch.autograd.grad(total, [p for p in params if p is not None])


def unfused(h, w, b, labels, th=None, tw=None, ce_scale=1.0, kd_scale=1.0, cap=None, t_cap=None, sparse=None,
            **kd_kw):  # fmt: skip
    """Whole logits, autograd on everything: CE + a dense or sparse KD, soft-caps applied to the logits."""
    logits = softcap(F.linear(h, w, b).float(), cap)
    denom = int((labels != -100).sum())
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / denom
    if sparse is not None:
        kd = sparse_kd_divergence(logits, sparse["teacher_ids"], sparse["teacher_values"], labels,
                                  estimator=sparse["estimator"], **kd_kw)  # fmt: skip
    else:
        kd = kd_divergence(logits, softcap(F.linear(th, tw).float(), t_cap), labels, **kd_kw)
    return ce_scale * ce + kd_scale * kd, kd


def test_registry_holds_one_definition_per_kind():
    assert DIVERGENCES == tuple(DIVERGENCE_REGISTRY) == ("fkl", "rkl", "skl", "skew", "jsd", "tvd")
    for name, div in DIVERGENCE_REGISTRY.items():
        assert div.name == name and div.source and div.formula and div.grad is not None
        assert set(KIND_PARAMS[name]) == {p.name for p in div.params}
        assert get_divergence(name) is div and get_divergence(div) is div
    # Parameters are typed and ranged in the definition; a value at a reducing endpoint is the special case exactly.
    jsd = get_divergence("jsd")
    assert jsd.check_params({}) == {"beta": 0.5}
    assert jsd.resolve({"beta": 0.0})[0] is get_divergence("fkl")
    assert jsd.resolve({"beta": 1.0})[0] is get_divergence("rkl")
    assert get_divergence("skew").resolve({"alpha": 0.0})[0] is get_divergence("fkl")
    with pytest.raises(ValueError, match=r"alpha of the 'skew' divergence must be in \[0, 1\)"):
        check_kind_params("skew", {"alpha": 1.0})
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'"):
        get_divergence("kl")
    assert ESTIMATORS == tuple(ESTIMATOR_REGISTRY) == ("topk", "topk_tail", "sampled")
    for name, est in ESTIMATOR_REGISTRY.items():
        assert est.name == name and est.bias and get_estimator(name) is est
    with pytest.raises(ValueError, match="unknown sparse estimator"):
        get_estimator("top")


def test_a_new_divergence_needs_no_registration():
    """A `Divergence` object goes wherever a kind name does; its own parameters are checked there."""
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    labels = torch.zeros(3, 5, dtype=torch.long)
    logq, logp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    # At a = 0.5 it is 4 * squared Hellinger: 2 * sum (sqrt p - sqrt q)^2.
    hellinger = 2 * ((0.5 * logp).exp() - (0.5 * logq).exp()).pow(2).sum(-1).mean()
    torch.testing.assert_close(kd_divergence(s, t, labels, kind=AMARI).double(), hellinger, rtol=1e-5, atol=1e-6)
    assert kd_divergence(s, t, labels, kind=AMARI, a=0.2) != kd_divergence(s, t, labels, kind=AMARI)
    with pytest.raises(ValueError, match=r"a of the 'amari' divergence must be in \[0.05, 0.95\]"):
        kd_divergence(s, t, labels, kind=AMARI, a=0.99)
    with pytest.raises(TypeError, match="unexpected keyword arguments: gamma"):
        kd_divergence(s, t, labels, kind=AMARI, gamma=1.0)
    with pytest.raises(ValueError, match="'lam' is not a parameter of the 'amari' divergence"):
        check_kind_params(AMARI, {"lam": 0.5})


@pytest.mark.parametrize("impl", [fused_kd_loss, chunked_kd_loss])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_divergence_without_closed_form_falls_back_to_autograd(impl, temp):
    """No `grad`: the fused path differentiates each chunk with autograd, and equals autograd on the whole."""
    h, w, b, th, tw, labels = make(seed=1, bias=True)
    out = impl(h, w, labels, teacher_hidden=th, teacher_weight=tw, lm_head_bias=b, kind=AMARI, a=0.3,
               temperature=temp, ce_scale=0.7, kd_scale=1.3, chunk_size=5)  # fmt: skip
    total, kd = unfused(h, w, b, labels, th, tw, 0.7, 1.3, kind=AMARI, temperature=temp, a=0.3)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd, kd.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w, b), grads(total, h, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_closed_forms_equal_their_autograd_fallback(kind):
    """Each built-in's closed-form gradient against the same definition with `grad` removed (per-chunk autograd)."""
    h, w, _, th, tw, labels = make(seed=2)
    bare = dataclasses.replace(get_divergence(kind), grad=None, reduces_to=None)
    params = {p.name: 0.3 for p in bare.params}
    kw = dict(teacher_hidden=th, teacher_weight=tw, temperature=1.5, ce_scale=0.5, kd_scale=2.0, chunk_size=7)
    closed = fused_kd_loss(h, w, labels, kind=kind, **kw, **params)
    fallback = fused_kd_loss(h, w, labels, kind=bare, **kw, **params)
    torch.testing.assert_close(closed.total, fallback.total, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(closed.total, h, w), grads(fallback.total, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_divergence_without_closed_form_against_sparse_targets(estimator):
    h, w, _, th, tw, labels = make(seed=3)
    t_logp = torch.log_softmax(F.linear(th, tw), -1)
    if estimator == "sampled":
        draws = torch.multinomial(t_logp.exp(), 16, replacement=True, generator=torch.Generator().manual_seed(0))
        values, ids = torch.zeros(N, V).scatter_add_(-1, draws, torch.ones(N, 16)).topk(16, dim=-1)
    else:
        values, ids = t_logp.topk(6, dim=-1)
    sparse = dict(teacher_ids=ids, teacher_values=values, estimator=estimator)
    out = fused_kd_loss(h, w, labels, **sparse, kind=AMARI, temperature=1.5, chunk_size=4)
    total, _ = unfused(h, w, None, labels, sparse=sparse, kind=AMARI, temperature=1.5)
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w), grads(total, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
@pytest.mark.parametrize("teacher", ["dense", "sparse", "none"])
def test_fused_with_logit_softcap_equals_unfused(kind, teacher):
    """Gemma 2 / 3 cap the logits with `c * tanh(logits / c)`: the fused loss scores the capped logits of both
    models exactly (the student's cap through per-chunk autograd)."""
    h, w, b, th, tw, labels = make(seed=4, bias=True)
    h = (h * 4).detach().requires_grad_()  # logits well into the cap's curved part
    cap, t_cap = 3.0, 2.5
    common = dict(lm_head_bias=b, kind=kind, temperature=2.0, ce_scale=0.6, kd_scale=1.4, chunk_size=6, beta=0.3,
                  logit_softcap=cap)  # fmt: skip
    if teacher == "none":
        out = fused_kd_loss(h, w, labels, **common)
        logits = softcap(F.linear(h, w, b), cap)
        total = 0.6 * F.cross_entropy(logits, labels, ignore_index=-100)
        assert out.kd is None
    elif teacher == "dense":
        out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, teacher_logit_softcap=t_cap, **common)
        total, _ = unfused(h, w, b, labels, th, tw, 0.6, 1.4, cap, t_cap, kind=kind, temperature=2.0, beta=0.3)
    else:
        values, ids = torch.log_softmax(softcap(F.linear(th, tw), t_cap), -1).topk(8, dim=-1)
        sparse = dict(teacher_ids=ids, teacher_values=values, estimator="topk_tail")
        out = fused_kd_loss(h, w, labels, **sparse, **common)
        total, _ = unfused(h, w, b, labels, ce_scale=0.6, kd_scale=1.4, cap=cap, sparse=sparse, kind=kind,
                           temperature=2.0, beta=0.3)  # fmt: skip
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    uncapped = fused_kd_loss(h, w, labels, **{**common, "logit_softcap": None})
    assert not torch.allclose(uncapped.ce, out.ce)  # the cap matters at these logits
    for got, want in zip(grads(out.total, h, w, b), grads(total, h, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        fused_kd_loss(h, w, labels, logit_softcap=0.0)


def test_teacher_softcap_keeps_the_closed_form():
    """A capped teacher (no gradient) changes only the targets: same result as capping its logits by hand."""
    h, w, _, th, tw, labels = make(seed=5)
    out = fused_kd_loss(h, w, labels, teacher_hidden=th, teacher_weight=tw, teacher_logit_softcap=1.5, kind="rkl")
    total, _ = unfused(h, w, None, labels, th, tw, t_cap=1.5, kind="rkl")
    torch.testing.assert_close(out.total, total, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out.total, h, w), grads(total, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class _Settings:
    top_k: int = V
    samples: int = 4000
    temperature: float = 1.0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_round_trip(estimator):
    """encode (what the cache writer stores) -> teacher_logprobs (what training reads) and dense (inspection): at
    k = V the top-k estimators give the teacher back exactly; many draws give it back closely."""
    est = get_estimator(estimator)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 2
    settings = _Settings(temperature=1.5 if est.tempered else 1.0)
    entries, ids, values, tail = est.encode(logits, settings, torch.Generator().manual_seed(1))
    assert (tail is not None) == est.has_tail and int(entries.sum()) == ids.numel() == values.numel()
    width = est.width(settings)
    rows = torch.repeat_interleave(torch.arange(5), entries)
    cols = torch.arange(ids.numel()) - torch.repeat_interleave(torch.cumsum(entries, 0) - entries, entries)
    ids_w = torch.zeros(5, width, dtype=torch.long).index_put_((rows, cols), ids.long())
    vals_w = torch.zeros(5, width).index_put_((rows, cols), values.float())
    p = torch.softmax(logits / settings.temperature, -1)
    dense = est.dense(ids_w, vals_w, tail, torch.ones(5, dtype=torch.bool), V)
    logp, logp_tail = est.teacher_logprobs(vals_w, tail, 1.0)
    support = torch.zeros(5, V).scatter_add_(-1, ids_w, logp.exp())
    if est.counts:
        assert (vals_w.sum(-1) == settings.samples).all()
        assert (dense - p).abs().max() < 0.05 and (support - p).abs().max() < 0.05
    else:
        torch.testing.assert_close(dense, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(support, p, rtol=1e-5, atol=1e-6)
        if logp_tail is not None:
            assert logp_tail.exp().max() < 1e-6  # k = V: nothing left for the bucket
    assert math.isclose(float(support.sum()), 5.0, rel_tol=1e-5)
