"""A teacher split over N ranks (``--tensor-parallel N`` under torchrun).

The ranks of torchrun form groups of N consecutive ranks; each group loads the teacher with
its own tensor-parallel plan (transformers' ``tp_plan="auto"``: each rank holds 1/N of the
weights) and captures one part. The output head is vocab-parallel: each rank multiplies only
its rows of the head and offers its own top-k and rest (kdcache.stages.capture.extract), so
the (n, V) logits are never gathered. Only the group's first rank opens the part's writer (its
lease, its resume point) and writes; the others hear what it decided (``share``).

    world = 8, --tensor-parallel 2:  ranks 0-1 part 0, 2-3 part 1, 4-5 part 2, 6-7 part 3
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.stages.models.devices import init_distributed, pick_device
from kdcache.storage.errors import ConfigError


@dataclass
class TensorParallel:
    size: int  # ranks per teacher (N)
    mesh: object  # the group's one-dimensional torch DeviceMesh ("tp")
    rank: int  # this rank within the group
    part: int  # which group: the part it captures with --shard-index env
    parts: int  # how many groups

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def writer(self) -> bool:
        """Whether this rank writes the group's part (its first rank)."""
        return self.rank == 0

    def share(self, obj=None):
        """The writer's ``obj`` on every rank of the group (an exception is raised there too)."""
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


def start_tensor_parallel(
    size: int, device_name: str
) -> tuple[TensorParallel | None, torch.device]:
    """The group this rank belongs to (None for --tensor-parallel 1) and its device."""
    if size == 1:
        return None, pick_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < size or world % size:
        raise ConfigError(
            f"--tensor-parallel {size} needs a multiple of {size} processes, found WORLD_SIZE "
            f"{world}; run it under torchrun --nproc_per_node {size} (or a multiple)"
        )
    rank, world, device = init_distributed(device_name)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // size, size), mesh_dim_names=("part", "tp"))
    return TensorParallel(size, mesh["tp"], rank % size, rank // size, world // size), device
