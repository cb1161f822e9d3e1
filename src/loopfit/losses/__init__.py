"""Distillation losses, usable from any training loop: divergences and cache estimators (one definition each, in a
registry), dense and sparse logit divergences, a fused CE + KD over the lm_head that never materialises the logits,
hidden-state alignment, and the combined objective."""

from loopfit.losses.chunk_grad import softcap
from loopfit.losses.divergences import (
    DIVERGENCE_REGISTRY,
    DIVERGENCES,
    Divergence,
    KDLoss,
    Param,
    divergence_from_logprobs,
    get_divergence,
    kd_divergence,
)
from loopfit.losses.estimators import ESTIMATOR_REGISTRY, ESTIMATORS, Estimator, get_estimator
from loopfit.losses.fused import FusedKDLoss, KDLossOutput, chunked_kd_loss, fused_kd_loss
from loopfit.losses.hidden import HIDDEN_KINDS, HiddenStateLoss, loop_layer_map
from loopfit.losses.objective import LogitTransform, Objective, ObjectiveWeights, Terms, combine_losses
from loopfit.losses.sparse import SparseKDLoss, sparse_kd_divergence, tail_from_logprobs

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_REGISTRY",
    "Divergence",
    "ESTIMATORS",
    "ESTIMATOR_REGISTRY",
    "Estimator",
    "FusedKDLoss",
    "HIDDEN_KINDS",
    "HiddenStateLoss",
    "KDLoss",
    "KDLossOutput",
    "LogitTransform",
    "Objective",
    "ObjectiveWeights",
    "Param",
    "SparseKDLoss",
    "Terms",
    "chunked_kd_loss",
    "combine_losses",
    "divergence_from_logprobs",
    "fused_kd_loss",
    "get_divergence",
    "get_estimator",
    "kd_divergence",
    "loop_layer_map",
    "softcap",
    "sparse_kd_divergence",
    "tail_from_logprobs",
]
