"""Top-k extraction on the device: ids, log-probs and the log tail mass, in chunks of positions.

The output head and everything after it run in float32 (bf16 logits are too coarse to rank),
one chunk of rows at a time, so the float32 logits of a long context (32k x 150k) never exist
at once: peak extra memory is ``chunk_rows x V x 4`` bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.stages.models.adapters import HeadShard
from kdcache.storage.codecs import count_logprobs
from kdcache.storage.errors import ConfigError, KDCacheError


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
    log_tail (n,) float32 = log of the mass outside the top-k,
    finite (n,) bool: False for rows with NaN or inf logits.

    ``merge_topk(*local_topk(z, k), k)``: the same two steps every head path takes (one
    process, vocab-parallel ranks, the fused kernel's tiles)."""
    return merge_topk(*local_topk(z, k), k)


def local_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-min(k, V) of float32 logits z (n, V) — overwritten in place — as candidates for
    ``merge_topk``: values (n, k') sorted, ids (n, k') int64 (columns of z), and
    log_rest (n,): the log-sum-exp of every *other* entry of the row.

    Two passes over z: top-k, then the exp-sum of the other entries, shifted by the row
    maximum, in place. The rest is that sum itself, never total minus top-k mass: the
    subtraction would lose every tail below float32's ~1e-7 relative precision (a confident
    teacher's tail of 1e-9 would read as 0 or as noise). It is -inf only when k >= V or when
    every other entry lies more than ~103 nats below the maximum (exp underflows)."""
    vals, ids = _topk(z, min(k, z.shape[-1]))  # (n, k')
    m = vals[:, :1]  # (n, 1) row maximum
    z.scatter_(1, ids, float("-inf"))  # the entries outside the top-k remain
    rest = z.sub_(m).exp_().sum(dim=-1)  # (n,) rest / exp(m); NaN/inf flags a bad row
    return vals, ids, torch.where(rest > 0, torch.log(rest) + m[:, 0], float("-inf"))


def merge_topk(
    vals: torch.Tensor, ids: torch.Tensor, log_rest: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k targets from candidates: vals (n, c) logits, c >= k, sorted or not (-inf:
    padding), ids (n, c) their vocabulary ids, log_rest (n,) the log-sum-exp of every entry of
    the row that is not a candidate. The global top-k lies among the candidates whenever each
    holder of a slice of the vocabulary (a rank, a kernel tile) offers its own top-k; the
    candidates that miss it join the tail. Returns ``topk_from_logits``'s four tensors."""
    if vals.shape[-1] > k:
        top, pos = torch.topk(vals, k, dim=-1, sorted=True)  # (n, k)
        missed = torch.logsumexp(vals.scatter(1, pos, float("-inf")), dim=-1)  # (n,)
        vals, ids = top, ids.gather(1, pos)
        log_rest = torch.where(torch.isneginf(missed), log_rest, torch.logaddexp(log_rest, missed))
    m = vals[:, 0]  # (n,) row maximum
    top = (vals - m[:, None]).exp().sum(dim=-1)  # (n,) top-k mass / exp(m), >= 1
    rest = (log_rest - m).exp()  # (n,) tail mass / exp(m)
    lse = m + torch.log(top + rest)  # (n,)
    logprobs = vals - lse[:, None]
    log_tail = torch.where(torch.isneginf(log_rest), float("-inf"), log_rest - lse)
    return ids, logprobs, log_tail, torch.isfinite(lse)


def gather_candidates(
    vals: torch.Tensor, ids: torch.Tensor, log_rest: torch.Tensor, k: int, group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's candidates (vals (n, k') logits, ids (n, k') global ids, log_rest (n,)) as
    one set for ``merge_topk``: (n, N c) vals and ids, (n,) log_rest over the ranks, c = the
    most candidates a rank offers. One all-gather of one float32 tensor per chunk (ids < 2^24
    are exact in float32); a rank with fewer than c rows pads with -inf. The (n, V) logits
    never leave their rank."""
    import torch.distributed as dist

    n, got = vals.shape
    c = max(k, got)  # the same on every rank: k (eager), or the fused kernel's K >= k
    packed = torch.full((n, 2 * c + 1), float("-inf"), dtype=torch.float32, device=vals.device)
    packed[:, :got] = vals
    packed[:, c : 2 * c] = 0.0
    packed[:, c : c + got] = ids.to(torch.float32)
    packed[:, 2 * c] = log_rest
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    every = torch.stack(parts, dim=1)  # (n, N, 2c + 1)
    return (
        every[:, :, :c].reshape(n, -1),
        every[:, :, c : 2 * c].reshape(n, -1).long(),
        torch.logsumexp(every[:, :, 2 * c], dim=-1),
    )


@torch.inference_mode()
def extract_rows(
    hidden: torch.Tensor,
    head: HeadShard,
    k: int,
    chunk_rows: int = 4096,
    tf32: bool = False,
    seeds: torch.Tensor | None = None,
    proposal_temperature: float = 1.0,
    kernel: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of ``hidden (n, C) @ head.weight.T + head.bias``, ``chunk_rows`` rows at a time:
    the top-k, or (``seeds`` (n,) given) k draws per row (``sample_from_logits``, drawn at
    ``proposal_temperature``; one process only).

    ``kernel``: ``eager`` computes each chunk's float32 logits with ``F.linear`` and selects
    in torch; ``triton`` runs the fused kernel (kdcache.stages.capture.fused_head), whose
    logits never leave the chip. A vocab-parallel head (``head.group``) merges every rank's
    candidates per chunk. Returns ids (n, k) int64, logprobs (n, k) float32, log_tail (n,)
    float32, finite (n,) bool. ``tf32``: let CUDA tensor cores do the head matmul (float32 in
    and out, 10-bit mantissa products): several times faster, no effect on CPU.
    """
    if seeds is not None and head.group is not None:
        raise ConfigError("sampled targets need the whole head on one process")
    w = head.weight.float() if kernel == "eager" else head.weight
    b = head.bias.float() if head.bias is not None else None

    def logits(i: int, j: int) -> torch.Tensor:  # (j - i, V_local) float32
        with _tf32(tf32):
            return F.linear(hidden[i:j].float(), w, b)

    def candidates(i: int, j: int):
        if kernel == "triton":
            from kdcache.stages.capture.fused_head import fused_head_topk

            vals, ids, rest = fused_head_topk(hidden[i:j], w, b, k, tf32=tf32)
        else:
            vals, ids, rest = local_topk(logits(i, j), k)
        if head.group is None:
            return vals, ids, rest
        return gather_candidates(vals, ids + head.offset, rest, k, head.group)

    def select(i: int, j: int):
        if seeds is not None:
            z = logits(i, j)
            return sample_from_logits(z, k, seeds[i:j], proposal_temperature=proposal_temperature)
        return merge_topk(*candidates(i, j), k)

    return _chunks(select, len(hidden), k, chunk_rows)


@torch.inference_mode()
def extract_from_logits(
    logits: torch.Tensor,
    k: int,
    chunk_rows: int = 4096,
    seeds: torch.Tensor | None = None,
    proposal_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same targets from logits (n, V) the model already computed, in float32 chunks."""

    def select(i: int, j: int):
        z = logits[i:j].to(torch.float32, copy=True)  # one copy, any dtype
        if seeds is None:
            return topk_from_logits(z, k)
        return sample_from_logits(z, k, seeds[i:j], proposal_temperature=proposal_temperature)

    return _chunks(select, len(logits), k, chunk_rows)


class _tf32:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev
        return False


def _chunks(select, n: int, k: int, chunk_rows: int):
    """The targets of rows [i, i + chunk_rows) at a time: select(i, j) -> the four tensors."""
    outs = [select(i, min(i + chunk_rows, n)) for i in range(0, n, chunk_rows)]
    if not outs:
        empty = torch.zeros((0, k))
        return empty.long(), empty, torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


# -- sampled soft targets (Anshumann et al. 2025: unbiased, unlike top-k) ----------------------
_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64 constants as signed int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def row_seeds(sample_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(n,) int64 seed of each row from (sample id, position): the same draws in any batch,
    shard count or rerun."""
    return _mix64(sample_ids ^ _mix64(positions + 1))


def row_uniforms(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) float64 uniforms in [0, 1), counter-based: draw j of a row depends only on its seed."""
    j = torch.arange(1, n + 1, device=seeds.device, dtype=torch.int64)
    bits = _mix64(seeds[:, None] + j[None, :] * _GOLDEN)
    return ((bits >> 11) & ((1 << 53) - 1)).double() * (1.0 / (1 << 53))


@torch.inference_mode()
def sample_from_logits(
    z: torch.Tensor, n_samples: int, seeds: torch.Tensor, proposal_temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw n_samples ids per row from softmax(z) (z: (n, V) float32, overwritten) and return
    ids (n, N) unique ids, most weight first (ties: smaller id first; 0 as padding),
    logprobs (n, N) log weights (-inf for padding), log_tail (n,) -inf (the weights sum to 1),
    finite (n,) bool.

    At proposal temperature 1 the weight of an id is count / N: the expected target equals the
    teacher's distribution (unbiased). At tau != 1 the draws come from softmax(z / tau) (tau > 1
    reaches further into the tail per draw, tau < 1 gives fewer unique ids) and each id weighs
    count * p / r (teacher over proposal probability), normalized to sum to 1: self-normalized
    importance sampling, consistent (its bias shrinks as 1 / N)."""
    n, V = z.shape
    N = n_samples
    tau = float(proposal_temperature)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    if tau == 1.0:
        cdf = z.sub_(lse[:, None]).exp_().cumsum_(dim=-1)  # (n, V) float32, last entry ~1
    else:
        zt = z / tau  # (n, V) the proposal's logits; z is kept for the weights
        lse_t = torch.logsumexp(zt, dim=-1)  # (n,)
        cdf = zt.sub_(lse_t[:, None]).exp_().cumsum_(dim=-1)
    u = row_uniforms(seeds, N).to(cdf.dtype) * cdf[:, -1:]  # (n, N) inverse-CDF sampling
    ids = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)  # (n, N)
    s, _ = torch.sort(ids, dim=1)
    start = torch.ones_like(s, dtype=torch.bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]
    run = torch.cumsum(start, dim=1) - 1  # (n, N) which unique id each draw is
    counts = torch.zeros_like(s).scatter_add_(1, run, torch.ones_like(s))
    uniq = torch.zeros_like(s).scatter_(1, run, s)
    key, _ = torch.sort((N - counts) * V + uniq, dim=1)  # count descending, then id ascending
    counts, uniq = N - key // V, key % V
    table = torch.from_numpy(count_logprobs(N)).to(counts.device)  # (N + 1,) float64
    logprobs = table[counts].float()  # log(count / N), -inf where count 0 (padding)
    uniq = torch.where(counts > 0, uniq, 0)
    if tau != 1.0:
        # log(count p / r) = log count + (z - lse) - (z / tau - lse_t), then normalized
        zu = z.gather(1, uniq)  # (n, N) teacher logits of the drawn ids
        logw = logprobs + zu * (1 - 1 / tau) - (lse - lse_t)[:, None]
        logw = torch.where(counts > 0, logw, float("-inf"))
        logw = logw - torch.logsumexp(logw, dim=-1, keepdim=True)
        # most weight first; the stable sort keeps the smaller id first among equal weights
        logprobs, order = torch.sort(logw, dim=1, descending=True, stable=True)
        uniq = uniq.gather(1, order)
    return uniq, logprobs, torch.full_like(lse, float("-inf")), torch.isfinite(lse)
