"""Data parallelism through PyTorch's own engine: torchrun environment, DDP, FSDP2 (`fully_shard`).

`--parallel ddp|fsdp` expects to be launched by torchrun (RANK / WORLD_SIZE / MASTER_ADDR set); the process
group backend is nccl on GPU and gloo on CPU. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from loopfit.errors import LoopfitError
from loopfit.models.families import decoder_layer_class_names


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.mode != "none"


def init_distributed(mode: str, device: torch.device) -> Dist:
    """Join the torchrun process group for `mode` in {ddp, fsdp}; `none` is a single process."""
    if mode == "none":
        return Dist()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LoopfitError(f"--parallel {mode} must be launched with torchrun (RANK / WORLD_SIZE are not set)")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, mode=mode)


def wrap_student(module: nn.Module, d: Dist, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap the (already LoRA-wrapped) student for data parallelism; the teacher is never wrapped."""
    if d.mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # No-grad loop iterations only skip activations: every trainable parameter still gets a gradient from the
        # last k iterations, so the unused-parameter search is needed only when a stage freezes parameters.
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if d.mode == "fsdp":
        mesh = init_device_mesh(device.type, (d.world_size,))
        for layer in _decoder_layers(module):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    return module


def _decoder_layers(module: nn.Module) -> list[nn.Module]:
    """FSDP's wrapping units: every supported family's decoder layers (by class name, from the family spec)."""
    names = set(decoder_layer_class_names())
    return [m for m in module.modules() if type(m).__name__ in names]


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `x` over ranks (a copy; `x` unchanged)."""
    if d.world_size == 1:
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def cleanup(d: Dist) -> None:
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
