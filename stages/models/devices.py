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
