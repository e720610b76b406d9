"""Under torchrun: the process group, torch's parallel engines around the student, sums over
ranks.

--parallel picks the engine (``PARALLEL``):
  none   one process (the default without torchrun)
  ddp    torch.nn.parallel.DistributedDataParallel: a whole replica per rank, gradients
         all-reduced in buckets overlapping the backward pass, only on the last accumulation
         micro-step (``no_sync`` before it)
  fsdp   FSDP2 (torch.distributed.fsdp.fully_shard) per transformer block and at the root
         (embeddings, final norm, head: one unit, so a tied head and embedding stay one
         parameter); bf16 parameters with float32 gradient reduction on CUDA
  auto   ddp under torchrun when a replica with its AdamW state fits in half a GPU's memory,
         fsdp when it does not (and on CPU always ddp); none without torchrun
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from kdcache.stages.models.adapters import CausalLM
from kdcache.storage.errors import ConfigError

log = logging.getLogger(__name__)

PARALLEL = ("auto", "none", "ddp", "fsdp")
# bytes a parameter costs in training: float32 weight, gradient and two AdamW moments
TRAIN_BYTES_PER_PARAM = 16


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (one process: [obj])."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_parallel(mode: str, world: int, module: nn.Module, device: torch.device) -> str:
    """The engine ``mode`` means for this run: what ``auto`` picks; ``none`` on one process."""
    if mode not in PARALLEL:
        raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL)}, got {mode!r}")
    if world == 1:
        if mode in ("ddp", "fsdp"):
            log.info("--parallel %s on one process: nothing to replicate or shard", mode)
        return "none"
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "ddp"
    need = TRAIN_BYTES_PER_PARAM * sum(p.numel() for p in module.parameters())
    fits = need <= 0.5 * torch.cuda.get_device_properties(device).total_memory
    return "ddp" if fits else "fsdp"


def parallelize(
    step: nn.Module, student: CausalLM, mode: str, device: torch.device, *, checkpointing: bool
) -> nn.Module:
    """``step`` (the module whose forward computes the loss, owning the student) under the
    engine ``mode``; activation checkpointing of the student's blocks first, if asked."""
    if checkpointing:
        student.enable_activation_checkpointing()
    if mode == "none":
        return step
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = device.type == "cuda"
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32 if cuda else None
    )
    blocks = student.blocks()
    if not blocks:
        log.warning(
            "%s: no transformer blocks found; --parallel fsdp shards it as one unit", student.name
        )
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    # The root keeps the teacher's log-probs float32: its inputs are not cast to bf16.
    root_mp = MixedPrecisionPolicy(
        param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False
    )
    fully_shard(step, mp_policy=root_mp)
    return step


def no_sync(model: nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on every accumulation micro-step but the last."""
    if last or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """The root unit's parameters (embeddings, head) whole for calls outside its forward (the
    held-out evaluation); the blocks gather their own in their forward."""
    unshard = getattr(model, "unshard", None)  # an FSDP2 module
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        model.reshard()
