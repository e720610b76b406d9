"""A teacher split over N ranks (``--tensor-parallel N`` under torchrun).

torchrun's N ranks load the teacher with its own tensor-parallel plan (transformers'
``tp_plan="auto"``: each rank holds 1/N of the weights) and capture one part together; more
parts are more such jobs (a SLURM array of N-GPU tasks with --shard-index env). Several groups
in one torchrun job are refused: with transformers 5.24 a 4-rank, 2-group test failed in
Llama's attention (its plans appear to size the local heads by the whole world, not by a
sub-mesh). The output head is vocab-parallel: each rank multiplies only its rows of the head
and offers its own top-k and rest (kdcache.stages.capture.extract), so the (n, V) logits are
never gathered. Only rank 0 opens the part's writer (its lease, its resume point) and writes;
the others hear what it decided (``share``).
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
    if world != size:
        raise ConfigError(
            f"--tensor-parallel {size} splits one teacher over all of torchrun's ranks, found "
            f"WORLD_SIZE {world}; run it under torchrun --nproc_per_node {size}, one such job "
            "per part (e.g. a SLURM array of such tasks with --shard-index env)"
        )
    rank, world, device = init_distributed(device_name)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (size,), mesh_dim_names=("tp",))
    return TensorParallel(size, mesh, rank), device
