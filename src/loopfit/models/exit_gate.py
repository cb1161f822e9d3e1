"""A learned exit gate on the loop state (Ouro, arXiv:2510.25741, section 3: "adaptive computation via gating").

After iteration i (1-based) the gate reads the state `s_i` `(B, T, H)` and gives a halting logit `z_i` per
position; `lambda_i = sigmoid(z_i)` is the probability of stopping at i given that no earlier iteration stopped.
Over a loop of R iterations the exit distribution is

    p(i) = lambda_i * prod_{j<i} (1 - lambda_j)   for i < R,     p(R) = prod_{j<R} (1 - lambda_j)

(the remainder on the last iteration, so that it sums to 1 whatever the gate says). Everything is computed in log
space (`log(1 - sigmoid(z)) = logsigmoid(-z)`), so a saturated gate gives exact zeros, never NaN.

Training (`loopfit train --exit_gate.train=true`, the rest frozen) minimises `sum_i p(i) L_i - beta * H(p)` per token
(`loopfit.losses.depths.exit_gate_loss`). At inference (`loopfit generate --exit_criterion gate`) a token stops at
the first checked iteration whose cumulative exit probability `CDF(i) = 1 - prod_{j<=i} (1 - lambda_j)` reaches the
threshold q (Ouro's Q-exit): q = 0 stops at the first check, q = 1 never stops early.

The gate: a parameter-free RMS normalisation of the state (the state's scale grows and differs from model to model; a
gate on the raw state would need its learning rate matched to it), then a linear map to one logit (`width` 0), or a
one-hidden-layer SiLU MLP of `width` units. It has no LayerNorm weights of its own and is stored with the model
(`model.exit_gate.*` in the safetensors; `LoopedConfig.exit_gate` / `exit_gate_width`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


class ExitGate(nn.Module):
    """Halting logit per position from the loop state: `(..., H)` -> `(...)` float32.

    Args:
        hidden_size: H. width: 0 for a linear gate, else the hidden width of a SiLU MLP.
        mean_recurrence: R the model usually runs; the initial bias makes `lambda = 1 / R` everywhere (the first
            hazard of the uniform exit distribution over R iterations), so training starts from a spread-out exit.
        eps: of the RMS normalisation.
    """

    def __init__(self, hidden_size: int, width: int = 0, mean_recurrence: int = 4, eps: float = 1e-6):
        super().__init__()
        if width < 0:
            raise ValueError(f"exit gate width must be >= 0, got {width}")
        self.hidden_size, self.width, self.eps = hidden_size, width, eps
        self.mean_recurrence = max(int(mean_recurrence), 1)
        # Raw parameters (no nn.Linear): transformers' generic init would redraw a Linear at every `post_init`.
        if width:
            self.up_weight = nn.Parameter(torch.empty(width, hidden_size))
            self.up_bias = nn.Parameter(torch.empty(width))
        self.weight = nn.Parameter(torch.empty(width or hidden_size))
        self.bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @property
    def initial_bias(self) -> float:
        """`logit(1 / R)` = -log(R - 1); 0 (a hazard of 1/2) at R <= 2."""
        return -math.log(max(self.mean_recurrence - 1, 1))

    def reset_parameters(self) -> None:
        """Output weights 0 and bias `initial_bias` (every position starts with the same hazard); the MLP's first layer
        drawn N(0, 1/H) so that its units start distinct."""
        if self.width:
            init.normal_(self.up_weight, std=self.hidden_size**-0.5)
            init.zeros_(self.up_bias)
        init.zeros_(self.weight)
        init.constant_(self.bias, self.initial_bias)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(state.float(), (state.shape[-1],), eps=self.eps)
        if self.width:
            x = F.silu(F.linear(x, self.up_weight, self.up_bias))
        return x @ self.weight + self.bias

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, width={self.width}"

    @classmethod
    def from_config(cls, config) -> ExitGate | None:
        """The gate a `LoopedConfig` asks for, or None (`config.exit_gate` false)."""
        if not getattr(config, "exit_gate", False):
            return None
        return cls(config.hidden_size, config.exit_gate_width, config.mean_recurrence)


def exit_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log of the exit distribution over R iterations from the halting logits `(..., R)` (iteration 1 first).

    Returns `(..., R)` float32 `log p(i)`, `p` as in the module docstring (the last iteration takes the remainder);
    `exp` of it sums to 1 over the last axis.
    """
    z = logits.float()
    log_stay = F.logsigmoid(-z)  # log(1 - lambda_i)
    log_survive = torch.cumsum(log_stay, dim=-1) - log_stay  # log prod_{j<i} (1 - lambda_j), exclusive
    log_p = F.logsigmoid(z) + log_survive
    return torch.cat([log_p[..., :-1], log_survive[..., -1:]], dim=-1)  # the last iteration takes the remainder


def gate_exit(
    gate: ExitGate, state: torch.Tensor, log_survival: torch.Tensor | None, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of the gate criterion at decoding time.

    Args:
        gate: the model's `ExitGate`. state: `(B, 1, H)` the state after this iteration (the last position is read).
        log_survival: `(B,)` `log prod_{j<i} (1 - lambda_j)` over the earlier iterations of this token, or None
            before the first (log 1 = 0). It must be updated at every iteration, checked or not.
        threshold: q in [0, 1].

    Returns:
        `(done (B,) bool, new log_survival (B,) float32)`: done where `CDF = 1 - survival >= q`, i.e.
        `log_survival <= log(1 - q)` (q = 1: never).
    """
    z = gate(state[:, -1])
    log_survival = (0.0 if log_survival is None else log_survival) + F.logsigmoid(-z)
    bound = math.log1p(-threshold) if threshold < 1 else -math.inf
    return log_survival <= bound, log_survival
