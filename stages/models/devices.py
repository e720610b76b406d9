"""Where models run: the device a name picks, and the CPU thread count a capture computes with."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcache.storage.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


def device_problem(name: str, option: str = "--device") -> str | None:
    """Why ``name`` is not a device kdcache takes, or None."""
    if name in DEVICES or name.startswith("cuda:"):
        return None
    return f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}"


def use_cpu_threads(threads: int | None, device: torch.device) -> int | None:
    """Set (and return) the torch threads of a CPU capture: ``threads``, or torch's current
    count. None on CUDA: the GPU's results do not depend on the host's threads. Called in every
    thread that runs the teacher (OpenMP's count is per thread)."""
    import torch

    if device.type != "cpu":
        return None
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA device is available here; use --device cpu or auto"
        )
    return torch.device(name)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun (WORLD_SIZE > 1) the default
    process group started (NCCL on CUDA, gloo on CPU) and each rank on its LOCAL_RANK's GPU."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(device_name)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
