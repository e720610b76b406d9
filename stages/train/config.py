"""Stage two's settings: ``TrainConfig``, validated completely before anything loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kdcache.stages.train.distributed import PARALLEL
from kdcache.stages.train.losses import LOSSES
from kdcache.storage.errors import ConfigError
from kdcache.storage.paths import is_within, output_problem

DEFAULT_LOSS = "forward_kl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``kdcache train`` takes; saved as RUN/config.json."""

    cache: str
    student: (
        str  # built-in size name (nano, micro, ...), HF folder, built-in checkpoint, module:factory
    )
    out: str
    loss: str = DEFAULT_LOSS
    alpha: float | None = None  # alpha * KD + (1 - alpha) * CE
    temperature: float = 1.0
    k: int | None = None  # use the first k' <= k cached entries
    beta: float = 0.5  # JSD
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_cache: str | None = None  # a second cache to evaluate on; default: a held-out slice
    eval_fraction: float = 0.05
    eval_every: int = 200
    eval_batches: int = 50
    checkpoint_every: int = 200
    chunk_rows: int | None = None  # rows of logits alive at once in the loss; None: by vocabulary
    device: str = "auto"
    tokenizer: str | None = None  # the student's tokenizer, if it ships none
    tokenizer_check: bool = True
    block_size: int | None = None  # context of a built-in student (default: longest sequence)
    replace: bool = False  # a run folder made with other settings: start it over
    progress: bool = True
    parallel: str = "auto"  # under torchrun: ddp, fsdp, or auto (distributed.PARALLEL)
    activation_checkpointing: bool = False  # recompute block activations in the backward

    def problems(self) -> list[str]:
        p = []
        if self.loss not in LOSSES:
            p.append(f"--loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if not self.temperature > 0:
            p.append(f"--temperature must be > 0, got {self.temperature}")
        if self.k is not None and self.k < 1:
            p.append(f"--k must be >= 1, got {self.k}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            p.append(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.steps < 1:
            p.append(f"--steps must be >= 1, got {self.steps}")
        for name in (
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "chunk_rows",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            p.append(
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
            )
        if not 0 <= self.eval_fraction < 1:
            p.append(f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.lr <= 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.parallel not in PARALLEL:
            p.append(f"--parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            p.append(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not Path(self.cache).exists():
            p.append(f"--cache {self.cache}: no such directory")
        if problem := output_problem(self.out, "--out"):
            p.append(problem)
        for option, cache in (("--cache", self.cache), ("--eval-cache", self.eval_cache)):
            if cache and is_within(self.out, cache):
                p.append(
                    f"--out {self.out} lies inside {option} {cache}; expected a run folder "
                    "outside the cache (checkpoints would be written into it): choose another --out"
                )
        return p

    def validate(self) -> None:
        if problems := self.problems():
            raise ConfigError("; ".join(problems))

    def identity(self) -> dict:
        """What must match for a rerun to resume a run directory (how often it evaluates or
        checkpoints, and where it runs, may change)."""
        free = (
            "progress",
            "device",
            "out",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "replace",
            "parallel",  # a checkpoint resumes under any engine and rank count
            "activation_checkpointing",
        )
        return {k: v for k, v in asdict(self).items() if k not in free}
