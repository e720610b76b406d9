"""Top-k extraction on the device: ids, log-probs and the log tail mass, in chunks of positions.

The output head and everything after it run in float32 (bf16 logits are too coarse to rank),
one chunk of rows at a time, so the float32 logits of a long context (32k x 150k) never exist
at once: peak extra memory is ``chunk_rows x V x 4`` bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.storage.errors import KDCacheError


class NonFiniteLogitsError(KDCacheError):
    """The teacher produced NaN or inf logits."""


def group_topk(z: torch.Tensor, k: int, groups: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of z (n, V), sorted, faster than ``torch.topk`` on CPU for V >> k.

    Columns are split into w = V // groups interleaved groups {j, j+w, ..., j+(groups-1)w}. The
    top-k elements lie in the k groups with the largest maxima (an element outside them is beaten
    by k group maxima), so top-k runs over w group maxima and then over k * groups candidates
    instead of over all V columns. The max over groups reduces along contiguous memory.
    """
    n, V = z.shape
    w = V // groups
    gmax = z[:, : groups * w].view(n, groups, w).amax(dim=1)  # (n, w)
    _, top_groups = torch.topk(gmax, k, dim=-1, sorted=False)  # (n, k)
    offsets = w * torch.arange(groups, device=z.device)
    cand_idx = (top_groups[:, None, :] + offsets[None, :, None]).reshape(n, groups * k)
    if groups * w < V:  # the last V % groups columns are always candidates
        rest = torch.arange(groups * w, V, device=z.device).expand(n, V - groups * w)
        cand_idx = torch.cat([cand_idx, rest], dim=1)
    vals, pos = torch.topk(torch.gather(z, 1, cand_idx), k, dim=-1, sorted=True)
    return vals, torch.gather(cand_idx, 1, pos)


def _topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if z.device.type == "cpu" and z.shape[-1] >= 32 * k:
        return group_topk(z, k)
    return torch.topk(z, k, dim=-1, sorted=True)


def default_chunk_rows(device: torch.device) -> int:
    """Rows per head + top-k chunk: cache-sized on CPU (the passes stay in L2), large on GPU."""
    return 512 if device.type == "cpu" else 8192


@torch.inference_mode()
def topk_from_logits(
    z: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float32 logits z (n, V) — overwritten in place — return
    ids (n, k) int64 in probability order, logprobs (n, k) float32 at T=1,
    log_tail (n,) float32 = log of the mass outside the top-k (-inf when k == V),
    finite (n,) bool: False for rows with NaN or inf logits.

    Two passes over z: top-k, then exp-sum shifted by the row maximum (the first top-k value),
    in place. The tail is 1 - (top-k mass), computed in float64 over the k entries and clamped,
    so it never goes negative or NaN (-inf when the top-k hold all the mass to float32 precision).
    """
    vals, ids = _topk(z, k)  # (n, k)
    m = vals[:, :1]  # (n, 1) row maximum
    lse = m[:, 0] + torch.log(z.sub_(m).exp_().sum(dim=-1))  # (n,) NaN/inf flags a bad row
    logprobs = vals - lse[:, None]
    if k == z.shape[-1]:
        log_tail = torch.full_like(lse, float("-inf"))
    else:
        mass = torch.exp(logprobs.double()).sum(dim=-1).clamp_(max=1.0)
        log_tail = torch.log1p(-mass).float()
    return ids, logprobs, log_tail, torch.isfinite(lse)


@torch.inference_mode()
def extract_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    chunk_rows: int = 4096,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``hidden (n, C) @ weight.T (V, C) + bias`` in float32, ``chunk_rows`` rows at a time.

    Returns ids (n, k) int64, logprobs (n, k) float32, log_tail (n,) float32, finite (n,) bool.
    ``tf32``: let CUDA tensor cores do the head matmul (float32 in and out, 10-bit mantissa
    products): several times faster than true float32 on GPUs, no effect on CPU.
    """
    w = weight.float()
    b = bias.float() if bias is not None else None
    with _tf32(tf32):
        return _extract_chunks(hidden, w, b, k, chunk_rows)


class _tf32:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev
        return False


def _extract_chunks(hidden, w, b, k, chunk_rows):
    outs = [
        topk_from_logits(F.linear(hidden[i : i + chunk_rows].float(), w, b), k)
        for i in range(0, len(hidden), chunk_rows)
    ]
    if not outs:
        n0 = hidden.new_zeros((0, k))
        return n0.long(), n0.float(), hidden.new_zeros(0).float(), hidden.new_zeros(0).bool()
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


@torch.inference_mode()
def extract_from_logits(
    logits: torch.Tensor, k: int, chunk_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of logits (n, V) already computed by the model, in float32 chunks."""
    outs = [
        topk_from_logits(logits[i : i + chunk_rows].float().clone(), k)
        for i in range(0, len(logits), chunk_rows)
    ]
    if not outs:
        n0 = logits.new_zeros((0, k))
        return n0.long(), n0.float(), logits.new_zeros(0).float(), logits.new_zeros(0).bool()
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
