"""The cost to deploy a model, measured on this machine: tokens/s and latency at batch 1, tokens/s
batched, peak memory at inference.

- batch 1: greedy decoding, ``new_tokens`` tokens one at a time after a ``prompt``-token prompt.
  There is no KV cache: every new token runs the model over the whole prefix (kdcache's built-in
  GPT has none; Hugging Face models are called the same way so that the figures compare).
- batched: forward passes over (``batch``, T) windows, T = ``seq_len`` capped at the model's
  context, logits at every position (scoring, or the prefill of generation).
- peak memory: the bytes of the weights + the rise of memory over one batched pass (after a
  warm-up pass). On CUDA the rise of ``torch.cuda.max_memory_allocated``. On CPU torch keeps no
  allocator statistics, so the rise of the process's peak resident set (Linux VmHWM, reset
  through ``/proc/self/clear_refs`` after ``malloc_trim``). None where the OS does not allow it.

Each setting runs once to warm up, then repeats until ``seconds`` are spent (at least once); a
figure is the work done over the time taken. Token ids are random: speed does not depend on them.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdcache.stages.models.adapters import CausalLM


@dataclass(frozen=True)
class SpeedSettings:
    seconds: float = 1.0  # timed per setting and model (after one warm-up)
    batch: int = 16  # sequences per batched forward
    seq_len: int = 128  # tokens per batched sequence (capped at the model's context)
    prompt: int = 16  # batch 1: prompt tokens
    new_tokens: int = 32  # batch 1: tokens generated

    def describe(self, device: torch.device) -> dict:
        return {
            **asdict(self),
            "device": str(device),
            "threads": torch.get_num_threads(),  # torch intra-op threads during the measurement
            "batch1": f"greedy decoding of {self.new_tokens} tokens after a {self.prompt}-token prompt, "
            "full recompute per token (no KV cache)",
            "batched": f"forward passes over {self.batch} x {self.seq_len}-token sequences "
            "(capped at the model's context), logits at every position",
            "memory": "weight bytes + the rise of "
            + (
                "torch.cuda.max_memory_allocated"
                if device.type == "cuda"
                else "the process's peak resident set (VmHWM, reset via /proc/self/clear_refs "
                "after malloc_trim)"
            )
            + " over one batched pass, after a warm-up pass",
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, seconds: float, device: torch.device) -> tuple[int, float]:
    """(calls, elapsed seconds) after one warm-up call."""
    fn()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        _sync(device)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return calls, elapsed


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> int | None:
    """Return freed heap pages to the OS, reset VmHWM to the current RSS; that RSS in bytes."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere the rise may read lower
    except (AttributeError, OSError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        return None
    rss = _proc_status_kb("VmRSS")
    return None if rss is None else rss * 1024


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters (a tied tensor once) and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def measure_inference(model: CausalLM, settings: SpeedSettings, device: torch.device) -> dict:
    """tokens/s at batch 1 and batched, latency per token (ms), peak memory (bytes)."""
    ctx = model.max_positions or settings.seq_len + settings.prompt + settings.new_tokens
    T = max(1, min(settings.seq_len, ctx))
    prompt = max(1, min(settings.prompt, ctx - 1))
    new = max(1, min(settings.new_tokens, ctx - prompt))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (settings.batch, T), generator=g).to(device)
    start = torch.randint(0, model.vocab_size, (1, prompt), generator=g).to(device)
    model.module.eval()

    def next_token(x: torch.Tensor) -> torch.Tensor:
        if model.has_head:  # the head on the last position only, as a decoder would
            return model.head(model.hidden(x)[:, -1]).argmax(-1, keepdim=True)
        return model.logits(x)[:, -1].argmax(-1, keepdim=True)

    def generate() -> None:
        x = start
        for _ in range(new):
            x = torch.cat([x, next_token(x)], 1)

    def batched() -> None:
        model.logits(ids)

    # Peak memory: weights + the rise over one batched pass, after a warm-up pass (lazy
    # initialisation, e.g. the cuBLAS workspace, belongs to the runtime, not to this model).
    batched()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        batched()
        _sync(device)
        rise = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _reset_peak_rss()
        batched()
        hwm = _proc_status_kb("VmHWM")
        rise = None if before is None or hwm is None else hwm * 1024 - before
    peak = None if rise is None else weight_bytes(model.module) + max(0, rise)
    calls, s1 = _timed(generate, settings.seconds, device)
    tok_s_1 = calls * new / s1
    calls, sb = _timed(batched, settings.seconds, device)
    return {
        "tokens_per_s_batch1": tok_s_1,
        "latency_ms_per_token": 1000.0 / tok_s_1,
        "tokens_per_s_batched": calls * settings.batch * T / sb,
        "batched_shape": [settings.batch, T],
        "peak_memory_bytes": peak,
    }
