"""Hidden-state alignment loss and the loop-iteration -> teacher-layer map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopfit.losses import HiddenStateLoss, loop_layer_map


def test_loop_layer_map_spreads_iterations_over_the_span():
    assert loop_layer_map(4, (4, 25)) == [9, 14, 20, 25]
    assert loop_layer_map(1, (4, 25)) == [25]
    assert loop_layer_map(3, (20, 25)) == [21, 23, 25]
    # More iterations than layers: non-decreasing, ends on the last layer, never before the span.
    m = loop_layer_map(8, (10, 12))
    assert m == sorted(m) and m[-1] == 12 and m[0] >= 10
    with pytest.raises(ValueError):
        loop_layer_map(0, (4, 25))
    with pytest.raises(ValueError):
        loop_layer_map(2, (5, 4))


def test_same_width_cosine_and_mse_match_formulas():
    torch.manual_seed(0)
    s = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 5, 8) for _ in range(2)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss = HiddenStateLoss([8, 8], [8, 8], kind="cosine")
    assert len(list(loss.parameters())) == 0  # equal widths: no projection
    want = torch.stack([(1 - F.cosine_similarity(a[mask], b[mask], dim=-1)).mean() for a, b in zip(s, t)]).mean()
    torch.testing.assert_close(loss(s, t, mask), want)
    mse = HiddenStateLoss(8, 8, kind="mse")
    want = torch.stack([((a[mask] - b[mask]) ** 2).mean() for a, b in zip(s, t)]).mean()
    torch.testing.assert_close(mse(s, t, mask), want)
    # Identical states: zero loss; masked positions do not count.
    assert loss([t[0], t[1]], [t[0].clone(), t[1].clone()], mask).abs() < 1e-6
    t2 = [x.clone() for x in t]
    t2[0][1, 4] = 1e3
    torch.testing.assert_close(mse(s, t2, mask), mse(s, t, mask))


def test_projection_created_from_widths_and_trained():
    torch.manual_seed(1)
    loss = HiddenStateLoss([6, 6], [10, 6], kind="mse", layer_norm=True)
    proj = loss.projections[0]
    assert isinstance(proj, torch.nn.Linear) and tuple(proj.weight.shape) == (10, 6)
    assert isinstance(loss.projections[1], torch.nn.Identity)
    s = [torch.randn(3, 4, 6), torch.randn(3, 4, 6)]
    t = [torch.randn(3, 4, 10), torch.randn(3, 4, 6)]
    t[0] = s[0] @ torch.randn(6, 10)  # reachable by a linear map
    opt = torch.optim.Adam(loss.parameters(), lr=0.1)
    first = loss(s, t).item()
    w0 = proj.weight.detach().clone()
    for _ in range(50):
        opt.zero_grad()
        loss(s, t).backward()
        opt.step()
    assert not torch.equal(proj.weight, w0)
    # Pair 0 is learnable down to ~0; pair 1 (random, no projection) stays ~constant; overall loss decreases.
    assert loss(s, t).item() < first - 0.3
    with pytest.raises(ValueError, match="widths"):
        loss([torch.randn(3, 4, 7), s[1]], t)


def test_teacher_gets_no_gradient_and_errors():
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, requires_grad=True)
    HiddenStateLoss(4, 4)([s], [t]).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="unknown hidden-state loss"):
        HiddenStateLoss(4, 4, kind="l1")
    with pytest.raises(ValueError, match="student states"):
        HiddenStateLoss(4, 4)([s], [t, t])
