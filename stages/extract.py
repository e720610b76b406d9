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
    vals, ids = torch.topk(z, k, dim=-1, sorted=True)  # (n, k)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``hidden (n, C) @ weight.T (V, C) + bias`` in float32, ``chunk_rows`` rows at a time.

    Returns ids (n, k) int64, logprobs (n, k) float32, log_tail (n,) float32, finite (n,) bool.
    """
    w = weight.float()
    b = bias.float() if bias is not None else None
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
