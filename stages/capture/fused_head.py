"""The output head fused with top-k and the tail (Triton): only (n, K) candidates leave the chip.

``fused_head_topk(hidden (n, C), weight (V, C), bias, k)`` multiplies a block of rows by the
head one tile of K vocabulary columns at a time (float32 accumulation, in the inputs' dtype:
bf16 / fp16 on tensor cores, float32 as IEEE or tf32) and keeps, per row, in registers:

- the running top-K (K = k rounded up to a power of two) as int64 keys — the logit's float32
  bits mapped to an order-preserving int32 in the high word, the column id in the low word, so
  every key is unique and one max / min finds an entry; each tile's entries that beat a row's
  K-th best replace it, largest first (the first tile, K <= V real columns, fills it);
- the exp-sum of every entry that was replaced or never got in, shifted by the running
  maximum (an online log-sum-exp). The tail is that sum itself, never total minus top-k mass
  (which would lose a confident teacher's 1e-9 tail in float32's rounding).

After the first tiles few entries beat the K-th best (about K ln(V / K) in all for a random
row), so the head's matmul dominates. The result is the input of
``kdcache.stages.capture.extract.merge_topk`` (the K candidates and the rest), so the fused and
eager paths end in the same code, and a vocab-parallel head merges the kernel's candidates of
every rank like the eager ones.

CUDA only in production; the tests run it on CPU under ``TRITON_INTERPRET=1`` (float32 and
float16: the interpreter's bf16 ``tl.dot`` is wrong, so bf16 is checked on a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # rows per program
BLOCK_C = 64  # hidden features per tl.dot step


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _key(x, cols):
    """(value, column) -> int64 keys whose signed order is the value's float order."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | cols.to(tl.int64)


@triton.jit
def _value(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tile_logits(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    row_ok,
    vids,
    C,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_N, K) float32 logits of rows x columns vids; -inf where a column is past V."""
    v_ok = vids >= 0
    acc = tl.zeros((BLOCK_N, K), tl.float32)
    feats = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        f = c0 + feats
        h = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_h + f[None, :],
            mask=row_ok[:, None] & (f[None, :] < C),
            other=0.0,
        )
        w = tl.load(
            w_ptr + vids[None, :].to(tl.int64) * stride_w + f[:, None],
            mask=v_ok[None, :] & (f[:, None] < C),
            other=0.0,
        )
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + vids, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_ok[None, :], acc, float("-inf"))


@triton.jit
def _head_topk_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    keys_ptr,
    rest_ptr,
    n,
    V,
    C,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    cols = tl.arange(0, K)
    grid = cols[None, :] + 0 * rows[:, None]  # (BLOCK_N, K) column offsets
    neg_inf = tl.full((BLOCK_N, K), float("-inf"), tl.float32)
    best = _key(neg_inf, grid)  # (BLOCK_N, K) unsorted; the first tile replaces all of it
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running row maximum
    rest = tl.zeros((BLOCK_N,), tl.float32)  # exp-sum of what is not in best, / exp(m)
    gone = _key(neg_inf, grid * 0)  # a taken entry
    for v0 in range(0, V, K):
        vids = tl.where(v0 + cols < V, v0 + cols, -1)
        z = _tile_logits(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            row_ok,
            vids,
            C,
            stride_h,
            stride_w,
            HAS_BIAS,
            K,
            BLOCK_N,
            BLOCK_C,
            PRECISION,
        )
        m_new = tl.maximum(m, tl.max(z, axis=1))
        rest = rest * tl.exp(m - m_new)  # 0 * 0 on the first tile
        tile = _key(z, v0 + grid)
        top, low = tl.max(tile, axis=1), tl.min(best, axis=1)
        # Insert the tile's entries that beat each row's K-th best, largest first: the
        # replaced entry joins the rest. Few after the first tiles: rarely more than once.
        while tl.max(((top > low) & row_ok).to(tl.int32), axis=0) > 0:
            take = (top > low) & row_ok  # (BLOCK_N,) rows past n (all zeros) never insert
            rest += tl.where(take, tl.exp(_value(low) - m_new), 0.0)
            best = tl.where(take[:, None] & (best == low[:, None]), top[:, None], best)
            tile = tl.where(take[:, None] & (tile == top[:, None]), gone, tile)
            top, low = tl.max(tile, axis=1), tl.min(best, axis=1)
        rest += tl.sum(tl.exp(_value(tile) - m_new[:, None]), axis=1)  # taken entries: -inf
        m = m_new
    out = rows[:, None] * K + cols[None, :]
    tl.store(keys_ptr + out, best, mask=row_ok[:, None])
    tl.store(rest_ptr + rows, m + tl.log(rest), mask=row_ok)


def block_k(k: int) -> int:
    """The kernel's K: k rounded up to a power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(k))


@torch.inference_mode()
def fused_head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of ``hidden (n, C) @ weight (V, C).T + bias`` for ``merge_topk``: values
    (n, K) float32 sorted descending, ids (n, K) int64, log_rest (n,) float32 the log-sum-exp
    of every other entry (K = ``block_k(k)`` >= k; merge_topk folds the extra K - k into the
    tail). ``hidden`` is cast to ``weight``'s dtype; ``tf32`` lets float32 inputs use tensor
    cores (else IEEE float32 products)."""
    n, C = hidden.shape
    V = weight.shape[0]
    K = block_k(k)
    if K > V:
        raise ValueError(f"the fused head needs V >= {K} (k={k} rounded up), got V={V}")
    h = hidden.to(weight.dtype).contiguous()
    w = weight.contiguous()
    keys = torch.empty((n, K), dtype=torch.int64, device=h.device)
    rest = torch.empty((n,), dtype=torch.float32, device=h.device)
    if n:
        _head_topk_kernel[(triton.cdiv(n, BLOCK_N),)](
            h,
            w,
            bias if bias is not None else w,  # unread without HAS_BIAS
            keys,
            rest,
            n,
            V,
            C,
            h.stride(0),
            w.stride(0),
            HAS_BIAS=bias is not None,
            K=K,
            BLOCK_N=BLOCK_N,
            BLOCK_C=BLOCK_C,
            PRECISION="tf32" if tf32 else "ieee",
        )
    keys, _ = keys.sort(dim=1, descending=True)  # the kernel keeps its top-K unsorted
    ordered = (keys >> 32).to(torch.int32)
    values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return values, keys & 0xFFFFFFFF, rest
