"""Training: typed config, schedules, optimizers, checkpoints and the healing recipe (`loopfit train`)."""

from loopfit.train.config import (
    BackpropDepthSchedule,
    DistillationConfig,
    LoRAConfig,
    LRSchedule,
    MeanRecurrenceSchedule,
    OnPolicyConfig,
    OptimConfig,
    ParamGroupRule,
    StageConfig,
    TrainConfig,
)

__all__ = [
    "BackpropDepthSchedule",
    "DistillationConfig",
    "LRSchedule",
    "LoRAConfig",
    "MeanRecurrenceSchedule",
    "OnPolicyConfig",
    "OptimConfig",
    "ParamGroupRule",
    "StageConfig",
    "TrainConfig",
]
