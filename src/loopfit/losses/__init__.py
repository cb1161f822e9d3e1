"""Distillation losses, usable from any training loop: dense and sparse logit divergences, a fused CE + KD over the
lm_head that never materialises the logits, hidden-state alignment, and the combined objective."""

from loopfit.losses.divergences import DIVERGENCES, KDLoss, divergence_from_logprobs, kd_divergence
from loopfit.losses.fused import FusedKDLoss, KDLossOutput, chunked_kd_loss, fused_kd_loss
from loopfit.losses.hidden import HIDDEN_KINDS, HiddenStateLoss, loop_layer_map
from loopfit.losses.objective import ObjectiveWeights, combine_losses
from loopfit.losses.sparse import ESTIMATORS, SparseKDLoss, sparse_kd_divergence, tail_from_logprobs

__all__ = [
    "DIVERGENCES",
    "FusedKDLoss",
    "ESTIMATORS",
    "HIDDEN_KINDS",
    "HiddenStateLoss",
    "KDLoss",
    "KDLossOutput",
    "ObjectiveWeights",
    "SparseKDLoss",
    "chunked_kd_loss",
    "combine_losses",
    "divergence_from_logprobs",
    "fused_kd_loss",
    "kd_divergence",
    "loop_layer_map",
    "sparse_kd_divergence",
    "tail_from_logprobs",
]
