"""Optimizers and parameter groups: AdamW, Muon (hidden matrices) + AdamW (the rest), ELLISAdam.

Parameter groups come from regex rules (first match wins) with lr multipliers; a multiplier of 0 freezes the
matching parameters for the stage. Norms, biases and other 1-D tensors never get weight decay.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from loopfit.errors import LoopfitError
from loopfit.models.families import FAMILIES
from loopfit.train.config import OptimConfig, ParamGroupRule


class ELLISAdam(torch.optim.Optimizer):
    """Adam with tensor-wise gradient normalisation, an atan2 update (no epsilon) and element-wise update clipping.

    Each tensor's gradient is divided by its RMS before entering the moments, so every tensor moves at a rate set
    by the learning rate alone; `atan2(m, sqrt(v))` is Adam's `m / sqrt(v)` made bounded and scale-invariant
    (arXiv:2407.05872); the update is clipped to `[-update_clip, update_clip]`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, update_clip=1.0, eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, update_clip=update_clip, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                g = g / (g.pow(2).mean().sqrt() + group["eps"])
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                update = torch.atan2(m_hat, v_hat.sqrt()).clamp_(-group["update_clip"], group["update_clip"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases and other 1-D tensors are not decayed."""
    return p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def lr_multiplier(name: str, rules: list[ParamGroupRule]) -> float:
    """The first rule whose pattern is found in `name` decides; unmatched parameters get 1."""
    for rule in rules:
        if re.search(rule.pattern, name):
            return rule.lr_mult
    return 1.0


# Token embeddings and heads by attribute name: every family's (loopfit/models/families.py) and the usual heads.
_EMBEDDING_NAMES = tuple({f.embed_attr for f in FAMILIES.values()} | {"lm_head", "embed_out", "wte"})


def _is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    # Embeddings and the head are lookup tables / classifiers, not hidden linear maps: Muon is not meant for them.
    return p.ndim == 2 and not any(k in name for k in _EMBEDDING_NAMES)


def _groups(named: list[tuple[str, nn.Parameter]], rules, lr: float, wd: float) -> list[dict]:
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in named:
        mult = lr_multiplier(name, rules)
        nd = no_decay(name, p)
        g = groups.setdefault(
            (mult, nd), {"params": [], "names": [], "lr": lr * mult, "weight_decay": 0.0 if nd else wd}
        )
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizers(
    named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, rules: list[ParamGroupRule]
) -> list[torch.optim.Optimizer]:
    """Optimizer(s) over the trainable parameters; parameters whose multiplier is 0 are frozen (requires_grad off).

    Returns one optimizer, or two for `muon` (Muon for hidden matrices, AdamW for the rest).
    """
    active = []
    for name, p in named_params:
        frozen = lr_multiplier(name, rules) == 0.0
        p.requires_grad_(not frozen)
        if not frozen:
            active.append((name, p))
    if not active:
        raise LoopfitError("no trainable parameters left: every parameter is frozen by the param_groups rules")
    adam_kw = dict(betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "ellis_adam":
        return [ELLISAdam(_groups(active, rules, cfg.lr, cfg.weight_decay), update_clip=cfg.update_clip, **adam_kw)]
    if cfg.optimizer == "muon":
        matrices = [(n, p) for n, p in active if _is_muon_matrix(n, p)]
        rest = [(n, p) for n, p in active if not _is_muon_matrix(n, p)]
        opts = []
        if matrices:
            groups = _groups(matrices, rules, cfg.muon_lr, cfg.weight_decay)
            opts.append(
                torch.optim.Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
            )
        if rest:
            opts.append(torch.optim.AdamW(_groups(rest, rules, cfg.lr, cfg.weight_decay), **adam_kw))
        return opts
    return [torch.optim.AdamW(_groups(active, rules, cfg.lr, cfg.weight_decay), **adam_kw)]
