"""Stage one's settings: ``CaptureConfig``, validated completely before anything loads, and the
allowed values of each option (the CLI's choices are read from here and from the registries
that implement them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcache.stages.models.adapters import DTYPES
from kdcache.stages.models.devices import device_problem
from kdcache.storage.backends import BACKENDS, DEFAULT_BACKEND
from kdcache.storage.errors import ConfigError
from kdcache.storage.lease import DEFAULT_LEASE_SECONDS
from kdcache.storage.paths import is_within, output_problem
from kdcache.storage.schema import target_problems
from kdcache.storage.writer import DEFAULT_FLUSH_POSITIONS

# --targets-on: every row, or only the assistant tokens of chat data (stored as the schema's
# targets_on "all" / "mask")
TARGETS_ON_OPTIONS = ("all", "assistant")
# How the output head multiplies (kdcache.stages.capture.extract): float32, tf32 tensor cores
# (CUDA only: several times faster, log-probs within ~1e-3), or auto (tf32 on CUDA).
HEAD_PRECISIONS = ("auto", "float32", "tf32")
# Which code selects the top-k from the head (kdcache.stages.capture.extract): eager torch in
# float32 chunks, the fused Triton kernel (CUDA; kdcache.stages.capture.fused_head), or auto
# (triton on CUDA for top-k targets when Triton is installed).
HEAD_KERNELS = ("auto", "eager", "triton")
DEFAULT_SAMPLES = 16  # --targets sampled: draws per position (the CLI's --samples sets k)
MAX_DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class CaptureConfig:
    """Everything ``kdcache cache`` takes. Saved (resolved) in every part record."""

    teacher: str
    data: str
    out: str
    tokenizer: str | None = None  # default: the teacher's own
    k: int = 64
    seq_len: int | None = None  # default: the teacher's context, at most 2048
    stride: int | None = None  # window step for long documents; default seq_len // 2; 0: none
    pack: bool = False
    text_field: str | None = None
    ids_field: str | None = None
    targets_on: str = "all"  # "all" rows, or "assistant" rows of chat data only
    add_eos: bool = True
    backend: str = DEFAULT_BACKEND
    logprob_dtype: str = "float16"
    codec: str = "plain"  # plain | sorted-q8 | sorted-q10 | sorted-q12 (kdcache.storage.codecs)
    targets: str = "topk"  # topk: the k most likely ids; sampled: k draws per row (unbiased)
    proposal_temperature: float = 1.0  # sampled: draw at this temperature, store IS weights
    num_shards: int | None = None  # None: the cache's own when resuming, else the array's, else 1
    shard_index: int | str = 0  # or "env": SLURM_ARRAY_TASK_ID, or RANK (torchrun)
    batch_tokens: int = 16384  # padded tokens per teacher batch
    group_docs: int = 256  # documents per batching group (the unit of sharding)
    flush_positions: int = DEFAULT_FLUSH_POSITIONS  # the most work a crash loses
    device: str = "auto"
    chunk_rows: int | None = None  # positions per float32 head + top-k chunk; None: by device
    head_precision: str = "auto"  # float32 | tf32 (CUDA tensor cores) | auto: tf32 on CUDA
    head_kernel: str = "auto"  # eager | triton (fused head + top-k, CUDA) | auto
    dtype: str = "auto"  # the teacher's weights: bfloat16 | float16 | float32 | auto
    tensor_parallel: int = 1  # ranks one teacher is split over (torchrun, tp_plan="auto")
    # torch threads on a CPU device, recorded: BLAS rounds small matmuls differently with
    # another thread count, so every part (and every executor) uses one. None: torch's default.
    cpu_threads: int | None = None
    replace: bool = False
    progress: bool = True
    lease_seconds: float = DEFAULT_LEASE_SECONDS  # a killed writer's part is free after this
    lease_wait: float = 0.0  # wait this long for another writer's live lease before refusing

    def problems(self) -> list[str]:
        p = []
        if not isinstance(self.k, int) or self.k < 1:
            p.append(f"--k must be an integer >= 1, got {self.k!r}")
        if self.seq_len is not None and self.seq_len < 2:
            p.append(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.stride is not None and self.stride < 0:
            p.append(f"--stride must be >= 0 (0: no windows), got {self.stride}")
        if self.stride and self.seq_len and self.stride > self.seq_len:
            p.append(
                f"--stride {self.stride} exceeds --seq-len {self.seq_len}; windows would skip tokens"
            )
        p += target_problems(
            targets=self.targets,
            codec=self.codec,
            logprob_dtype=self.logprob_dtype,
            proposal_temperature=self.proposal_temperature,
            names={f: "--" + f.replace("_", "-") for f in ("targets", "codec", "logprob_dtype")}
            | {"proposal_temperature": "--proposal-temperature"},
        )
        if self.targets_on not in TARGETS_ON_OPTIONS:
            p.append(f"--targets-on must be one of {TARGETS_ON_OPTIONS}, got {self.targets_on!r}")
        if self.backend not in BACKENDS:
            p.append(f"--backend must be one of {tuple(BACKENDS)}, got {self.backend!r}")
        if self.num_shards is not None and self.num_shards < 1:
            p.append(f"--num-shards must be >= 1, got {self.num_shards}")
        if (
            isinstance(self.shard_index, int)
            and self.num_shards
            and not (0 <= self.shard_index < self.num_shards)
        ):
            p.append(f"--shard-index must lie in [0, {self.num_shards}), got {self.shard_index}")
        if isinstance(self.shard_index, str) and self.shard_index != "env":
            p.append(f"--shard-index must be an integer or 'env', got {self.shard_index!r}")
        for name in ("batch_tokens", "group_docs", "flush_positions", "chunk_rows", "cpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lease_seconds > 0:
            p.append(f"--lease-seconds must be > 0, got {self.lease_seconds}")
        if not self.lease_wait >= 0:
            p.append(f"--lease-wait must be >= 0, got {self.lease_wait}")
        if self.head_kernel not in HEAD_KERNELS:
            p.append(f"--head-kernel must be one of {HEAD_KERNELS}, got {self.head_kernel!r}")
        if self.dtype not in DTYPES:
            p.append(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            p.append(f"--tensor-parallel must be an integer >= 1, got {self.tensor_parallel!r}")
        elif self.tensor_parallel > 1 and self.targets != "topk":
            p.append(
                f"--tensor-parallel {self.tensor_parallel} captures top-k targets; --targets "
                f"{self.targets} draws from the whole distribution on one process: drop one"
            )
        if self.head_precision not in HEAD_PRECISIONS:
            p.append(
                f"--head-precision must be one of {HEAD_PRECISIONS}, got {self.head_precision!r}"
            )
        if problem := device_problem(self.device):
            p.append(problem)
        if not Path(self.data).exists():
            p.append(f"--data {self.data}: no such file or folder")
        if problem := output_problem(self.out, "--out"):
            p.append(problem)
        if Path(self.data).exists() and (
            is_within(self.out, self.data) or is_within(self.data, self.out)
        ):
            p.append(
                f"--out {self.out} and --data {self.data} are nested; expected the cache outside "
                "the data (its files would become data, and the data's fingerprint would change "
                "with every run): choose another --out"
            )
        return p

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def stored_settings(self) -> dict:
        """The settings that change stored values: part of the cache identity."""
        keys = (
            "k",
            "seq_len",
            "stride",
            "pack",
            "text_field",
            "ids_field",
            "targets_on",
            "add_eos",
        )
        keys += ("logprob_dtype", "batch_tokens", "group_docs", "head_precision", "cpu_threads")
        keys += ("head_kernel", "dtype")
        return {key: getattr(self, key) for key in keys}
