"""The distillation losses of stage two, and a chunked driver that bounds their memory.

Every loss reads one flattened batch of N rows (the collate code produces it)::

    student_logits  (N, V)  any float dtype; upcast to at least float32 here. V may exceed the
                            teacher's vocabulary (padded student heads), never fall short of it.
    topk_ids        (N, k)  int64 teacher token ids, probability order (descending)
    topk_logprobs   (N, k)  float teacher log-probs at temperature 1, same order
    log_tail        (N,)    float32 log of the teacher mass outside the top-k (may be -inf)
    mask            (N,)    bool, rows that carry a target (None: every row)
    labels          (N,)    int64 next-token labels, IGNORE_INDEX (-100) where there is none

and returns a float32 scalar: the sum of its per-row values divided by the number of rows that
count (``mask`` for the KD losses, labelled rows for CE). A batch where no row counts gives 0 with
a gradient path, never NaN. Masked rows affect neither the value nor the gradient: their teacher
inputs are replaced by harmless constants before any arithmetic.

The KD losses on the top-k support (ForwardKL, ReverseKL, JSD) renormalize both distributions
over the k cached ids. Renormalized, ``log_softmax(z / T)[ids]`` equals ``log_softmax(z[ids] / T)``
(the full-vocabulary normalizer cancels), so they gather k columns and never touch the other
V - k. Every loss reads the logits only through ``_logit_stats`` (a logsumexp over a row and
the logits at a few columns, with a hand-written backward), and Mixed makes one such call for
KD and CE together: alpha * ForwardKL + (1 - alpha) * CE costs about what CE alone costs.

Temperature: every KD loss tempers both sides and multiplies by T**2 (Hinton et al.), so the
gradient scale does not change with T. The cache holds the teacher at T=1 only; for top-k
losses ``softmax(log p / T)`` over the k ids is exactly the teacher at temperature T,
renormalized over those ids. ForwardKLWithTail cannot re-temper the tokens inside the tail (they
are not cached), so it tempers the k+1 *bucket* distribution: the tail is one bucket whose
log-mass acts as its logit, on both sides (see ForwardKLWithTail).

``chunked_loss`` evaluates any of these losses from final hidden states and the output head,
chunk by chunk, so the (N, V) logits and their gradient exist for one chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.storage.errors import ConfigError
from kdcache.storage.schema import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "JSD",
    "LOSSES",
    "ForwardKL",
    "ForwardKLWithTail",
    "HardCE",
    "Mixed",
    "ReverseKL",
    "SoftCE",
    "Targets",
    "build_loss",
    "chunked_loss",
    "loss_chunk_rows",
]


@dataclass(frozen=True)
class Targets:
    """One batch of cached targets, all row-aligned with the student logits."""

    topk_ids: Tensor | None = None  # (N, k) int64
    topk_logprobs: Tensor | None = None  # (N, k) float log-probs at T=1, descending
    log_tail: Tensor | None = None  # (N,) float32 log of the mass outside the top-k
    mask: Tensor | None = None  # (N,) bool, rows that carry a target
    labels: Tensor | None = None  # (N,) int64, IGNORE_INDEX where unlabelled

    def rows(self, start: int, end: int) -> Targets:
        """The targets of rows [start, end)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[start:end]

        return Targets(*(cut(t) for t in self._fields()))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.topk_ids, self.topk_logprobs, self.log_tail, self.mask, self.labels)


def _compute_dtype(t: Tensor) -> torch.dtype:
    # float16/bfloat16 go up to float32; float64 (gradcheck) stays float64.
    return torch.promote_types(t.dtype, torch.float32)


def _row_count(n_rows: int, valid: Tensor | None, like: Tensor) -> Tensor:
    """The divisor of a mean over rows: the number of rows that count (float32 scalar).

    Not clamped here: under data parallelism the ranks' counts are summed first (a rank whose
    slice has no such row adds 0, not 1); ``_masked_sum`` clamps the sum to at least 1."""
    if valid is None:
        return torch.tensor(float(n_rows), device=like.device)
    return valid.sum().float()


def _masked_sum(values: Tensor, valid: Tensor | None, norm: Tensor) -> Tensor:
    """sum over valid rows of values (N,), divided by norm (at least 1, so an all-masked batch
    gives 0, not NaN); still on the graph if no row is valid."""
    if valid is not None:
        values = torch.where(valid, values, 0.0)
    return values.sum() / norm.clamp_min(1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probs (..., k) -> (...); terms with a == 0 count 0."""
    a = log_a.exp()
    # where, not a * (...): a == 0 with log_a == log_b == -inf would give 0 * nan.
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


class _LogitStats(torch.autograd.Function):
    """(N, V) logits -> (lse (N,) or None, z_cols (N, m)), with a hand-written backward.

    ``z_cols`` are the logits at ``cols``; ``lse`` is the logsumexp over every column except
    ``cols[:, :exclude]`` (``exclude=0``: the whole row). Every loss here reads the logits only
    through these two, so one pass over V forward and one backward, which writes the (N, V)
    gradient once (softmax term, then a scatter-add of the k column gradients), serve CE and any
    top-k KD loss together. Autograd's own gather + log_softmax would add a zero-filled (N, V)
    gradient per gather and a sum of them. Only the input logits are saved (no upcast copy).
    """

    @staticmethod
    def forward(ctx, z: Tensor, cols: Tensor, exclude: int, need_lse: bool):
        dtype = _compute_dtype(z)
        z_cols = z.gather(1, cols).to(dtype)  # (N, m)
        lse = None
        if need_lse:
            if exclude:
                # The most negative finite float, not -inf: with all V columns excluded a row
                # of -inf would give a nan logsumexp. exp() of it is exactly 0 next to any real
                # logit, and a row made only of it gives ~ -3e38, a zero mass.
                outside = z.to(dtype, copy=True).scatter_(
                    1, cols[:, :exclude], torch.finfo(dtype).min
                )
                lse = torch.logsumexp(outside, -1)  # (N,)
                del outside
            else:
                lse = torch.logsumexp(z.to(dtype), -1)  # (N,)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, cols, lse)
        ctx.exclude = exclude
        return lse, z_cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lse: Tensor | None, g_cols: Tensor | None):
        z, cols, lse = ctx.saved_tensors
        grad = None
        if g_lse is not None:
            # d lse / dz = softmax over the included columns, 0 on the excluded ones.
            finite = torch.isfinite(lse)  # -inf only for a row of -inf logits: gradient 0
            shift = torch.where(finite, lse, 0.0)[:, None]
            grad = (z - shift).exp_()  # (N, V) in the compute dtype (promotion from lse)
            if ctx.exclude:
                grad.scatter_(1, cols[:, : ctx.exclude], 0.0)
            grad.mul_(torch.where(finite, g_lse, 0.0)[:, None])
        if g_cols is not None:
            if grad is None:
                grad = torch.zeros(z.shape, dtype=g_cols.dtype, device=z.device)
            grad.scatter_add_(1, cols, g_cols.to(grad.dtype))
        return (None if grad is None else grad.to(z.dtype)), None, None, None


def _logit_stats(
    z: Tensor, cols: Tensor, *, exclude: int = 0, need_lse: bool = True
) -> tuple[Tensor | None, Tensor]:
    return _LogitStats.apply(z, cols, exclude, need_lse)


class _Loss(nn.Module):
    """The protocol every loss here follows, so chunked_loss can drive any of them.

    ``normalizers`` sees the whole batch and returns the divisors (one per mean the loss takes);
    ``partial`` takes any slice of rows and returns its share of the loss, already divided by
    those whole-batch divisors, so the shares of all chunks add up to the loss.
    """

    needs_tail: bool = False

    def forward(
        self,
        student_logits: Tensor,
        topk_ids: Tensor | None = None,
        topk_logprobs: Tensor | None = None,
        log_tail: Tensor | None = None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """The loss: a float32 (float64 for float64 logits) scalar, mean over counted rows."""
        targets = Targets(topk_ids, topk_logprobs, log_tail, mask, labels)
        norms = self.normalizers(targets, student_logits.shape[0], student_logits)
        return self.partial(student_logits, targets, norms)

    def normalizers(self, targets: Targets, n_rows: int, like: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def partial(self, student_logits: Tensor, targets: Targets, norms: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError


def _check_temperature(temperature: float) -> float:
    if not temperature > 0 or temperature == float("inf"):
        raise ConfigError(
            f"expected a temperature > 0, found {temperature}; pass e.g. --temperature 1.0"
        )
    return float(temperature)


def _check_k(k: int | None) -> int | None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(
            f"expected k >= 1 (or None for every cached entry), found {k!r}; pass --k 1 or more"
        )
    return k


class _KDLoss(_Loss):
    """Shared by the KD losses: validation, top-k truncation, masking and the mean over rows.

    A subclass implements ``_rows``: per-row values (N,) from the student logits at the k ids
    (and, for the tail loss, the student's logsumexp outside them) and the teacher's buckets.
    """

    name = ""
    # The student logsumexp a loss reads: None, "rest" (over the ids outside the k, the tail
    # loss) or "all" (the whole row, soft_ce).
    student_lse: str | None = None

    def __init__(self, *, temperature: float = 1.0, k: int | None = None) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.k = _check_k(k)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, k={self.k}"

    def normalizers(self, targets: Targets, n_rows: int, like: Tensor) -> tuple[Tensor, ...]:
        return (_row_count(n_rows, targets.mask, like),)

    def partial(self, student_logits: Tensor, targets: Targets, norms: Sequence[Tensor]) -> Tensor:
        ids, logprobs, log_tail = self._select(student_logits, targets)
        exclude = ids.shape[1] if self.student_lse == "rest" else 0
        lse, z_ids = _logit_stats(
            student_logits, ids, exclude=exclude, need_lse=self.student_lse is not None
        )
        values = self._rows(z_ids, lse, logprobs, log_tail)  # (N,)
        return _masked_sum(values, targets.mask, norms[0])

    def _rows(
        self, z_ids: Tensor, lse_out: Tensor | None, logprobs: Tensor, log_tail: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    def _select(
        self, student_logits: Tensor, targets: Targets
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate, keep the first k' entries, and neutralize masked rows."""
        ids, logprobs, log_tail = targets.topk_ids, targets.topk_logprobs, targets.log_tail
        if ids is None or logprobs is None:
            raise ConfigError(
                f"expected topk_ids and topk_logprobs for the {self.name} loss, found "
                f"{'none' if ids is None and logprobs is None else 'only one of them'}; "
                "pass the cached top-k targets (or use --loss ce)"
            )
        if self.needs_tail and log_tail is None:
            raise ConfigError(
                f"expected a cache with log_tail for the {self.name} loss, found none; "
                "this cache stores no tail mass; use --loss forward_kl or re-capture"
            )
        cached_k = ids.shape[-1]
        if self.k is not None and self.k > cached_k:
            raise ConfigError(
                f"expected k <= the cached k={cached_k}, found k={self.k}; "
                f"pass --k {cached_k} or less, or re-capture with a larger k"
            )
        dtype = _compute_dtype(student_logits)
        logprobs = logprobs.to(dtype)
        log_tail = None if log_tail is None or not self.needs_tail else log_tail.to(dtype)
        if self.k is not None and self.k < cached_k:
            if log_tail is not None:
                # The mass of the entries dropped joins the tail, exactly as if the capture
                # had stored k' entries: log(tail + sum_{i >= k'} p_i).
                dropped = logprobs[:, self.k :]
                log_tail = torch.logsumexp(torch.cat([log_tail[:, None], dropped], -1), -1)
            ids, logprobs = ids[:, : self.k], logprobs[:, : self.k]
        mask = targets.mask
        if mask is not None:
            # Padding rows may hold anything (-1 ids, nan log-probs): replace them by constants
            # so neither the value nor the gradient (0 * nan = nan) can see them.
            ids = torch.where(mask[:, None], ids, 0)
            logprobs = torch.where(mask[:, None], logprobs, 0.0)
            if log_tail is not None:
                log_tail = torch.where(mask, log_tail, 0.0)
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            vocab = student_logits.shape[-1]
            if int(lo) < 0 or int(hi) >= vocab:
                raise ConfigError(
                    f"expected cached token ids in [0, {vocab}) (the student vocabulary), "
                    f"found ids in [{int(lo)}, {int(hi)}]; use a student whose output head "
                    "covers the teacher's vocabulary"
                )
        return ids, logprobs, log_tail


class _TopKLoss(_KDLoss):
    """A divergence between teacher and student, both renormalized over the k cached ids."""

    def _rows(
        self, z_ids: Tensor, lse_out: Tensor | None, logprobs: Tensor, log_tail: Tensor | None
    ) -> Tensor:
        t = self.temperature
        log_q = (z_ids / t).log_softmax(-1)  # (N, k) student, renormalized over the k ids
        log_p = (logprobs / t).log_softmax(-1)  # (N, k) teacher at T, same
        return self._divergence(log_p, log_q) * t**2

    def _divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        raise NotImplementedError


class ForwardKL(_TopKLoss):
    """KL(teacher || student) on the teacher's top-k, both renormalized over the k ids."""

    name = "forward_kl"

    def _divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return _kl(log_p, log_q)


class ReverseKL(_TopKLoss):
    """KL(student || teacher) on the teacher's top-k, both renormalized over the k ids."""

    name = "reverse_kl"

    def _divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return _kl(log_q, log_p)


class JSD(_TopKLoss):
    """Generalized Jensen-Shannon divergence on the top-k (TRL / DistillKit convention).

    M = beta p + (1 - beta) q;  JSD = beta KL(p || M) + (1 - beta) KL(q || M), p the teacher.
    """

    name = "jsd"

    def __init__(
        self, *, beta: float = 0.5, temperature: float = 1.0, k: int | None = None
    ) -> None:
        super().__init__(temperature=temperature, k=k)
        if not 0.0 < beta < 1.0:
            raise ConfigError(
                f"expected a JSD beta strictly between 0 and 1, found {beta}; pass e.g. --beta 0.5"
            )
        self.beta = float(beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, {super().extra_repr()}"

    def _divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        b = self.beta
        # log M in log space: (2, N, k) -> (N, k)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(b), log_q + math.log1p(-b)]), 0)
        return b * _kl(log_p, log_m) + (1 - b) * _kl(log_q, log_m)


class ForwardKLWithTail(_KDLoss):
    """KL(teacher || student) over k+1 buckets: the k cached ids and the rest of the vocabulary.

    Teacher buckets: the cached log-probs and ``log_tail``. Student buckets at T=1: the full
    softmax at the k ids, and the tail log-mass, a logsumexp taken directly over the student
    logits outside the k ids (never ``log(1 - sum q_topk)``, which cancels to noise as the tail
    gets small). With k = V (tail -inf on both sides) this is the full forward KL.

    Temperature: the tail's tokens are not cached, so the teacher cannot be re-tempered token by
    token. Both sides instead temper their k+1 bucket distribution: bucket log-masses are divided
    by T and renormalized, the tail acting as one token whose logit is its log-mass. At T=1 this
    is the exact bucket KL; at k = V it is the full forward KL at temperature T; in between the
    tail bucket is flattened or sharpened as one token, the same way on both sides.
    """

    name = "forward_kl_tail"
    needs_tail = True
    student_lse = "rest"

    def _rows(
        self, z_ids: Tensor, lse_out: Tensor | None, logprobs: Tensor, log_tail: Tensor | None
    ) -> Tensor:
        assert lse_out is not None and log_tail is not None  # by needs_tail and _select
        t = self.temperature
        # (N, k+1) bucket log-masses at T=1, unnormalized for the student; tempered, renormalized
        log_q = (torch.cat([z_ids, lse_out[:, None]], -1) / t).log_softmax(-1)
        log_p = (torch.cat([logprobs, log_tail[:, None]], -1) / t).log_softmax(-1)
        return _kl(log_p, log_q) * t**2


class SoftCE(_KDLoss):
    """Cross-entropy to the cached soft targets: ``-sum_i w_i log q(id_i)`` with q the student's
    full softmax (over the whole vocabulary) and w the cached entries renormalized.

    - Sampled caches (``kdcache cache --targets sampled``): ``w_i = count_i / N``, or the stored
      importance weights for a proposal temperature != 1. Its expectation over the draws is the
      full forward KL (up to the teacher's entropy): unbiased (Anshumann et al. 2025).
      Temperature and k' do not apply to draws (``kdcache train`` refuses them).
    - Top-k caches: w is the teacher renormalized over its top-k ("sparse KD", as in Megatron-LM
      and DistillKit). Unlike forward_kl, the student's normalizer covers every id, so it learns
      to push the rest of the vocabulary down; still biased toward the head. At temperature T
      both sides are tempered (w = softmax(log p / T), q = softmax(z / T)) and the loss is
      multiplied by T**2.

    Padding entries (-inf) weigh 0.
    """

    name = "soft_ce"
    student_lse = "all"

    def partial(self, student_logits: Tensor, targets: Targets, norms: Sequence[Tensor]) -> Tensor:
        t = self.temperature
        # The student's normalizer at T needs the tempered logits (one (N, V) copy per chunk).
        return super().partial(student_logits if t == 1.0 else student_logits / t, targets, norms)

    def _rows(
        self, z_ids: Tensor, lse: Tensor | None, logprobs: Tensor, log_tail: Tensor | None
    ) -> Tensor:
        # z_ids and lse come from logits already divided by T (partial above)
        t = self.temperature
        w = torch.softmax(logprobs / t, -1)  # (N, n) renormalized weights, 0 for padding
        return (w * (lse[:, None] - z_ids)).sum(-1) * t**2


class HardCE(_Loss):
    """Cross-entropy on the hard labels; rows with IGNORE_INDEX (or outside ``mask``) skipped."""

    name = "ce"

    def _valid(self, targets: Targets) -> Tensor:
        if targets.labels is None:
            raise ConfigError(
                "expected next-token labels for the ce loss, found none; pass labels "
                f"(with {IGNORE_INDEX} where a row has none) or use a KD loss without --alpha"
            )
        valid = targets.labels != IGNORE_INDEX
        return valid if targets.mask is None else valid & targets.mask

    def normalizers(self, targets: Targets, n_rows: int, like: Tensor) -> tuple[Tensor, ...]:
        return (_row_count(n_rows, self._valid(targets), like),)

    def _select(self, targets: Targets) -> tuple[Tensor, Tensor]:
        """(valid (N,) bool, labels (N, 1) with unlabelled rows pointing at column 0)."""
        valid = self._valid(targets)
        return valid, torch.where(valid, targets.labels, 0)[:, None]  # type: ignore[arg-type]

    def _rows(self, lse: Tensor, z_label: Tensor) -> Tensor:
        return lse - z_label[:, 0]  # (N,) -log softmax(z)[label]

    def partial(self, student_logits: Tensor, targets: Targets, norms: Sequence[Tensor]) -> Tensor:
        valid, labels = self._select(targets)
        lse, z_label = _logit_stats(student_logits, labels)
        return _masked_sum(self._rows(lse, z_label), valid, norms[0])


class Mixed(_Loss):
    """alpha * KD + (1 - alpha) * CE, each averaged over its own rows.

    Both read the logits through one ``_logit_stats`` call (the k ids and the label gathered
    together), so the KD term costs little more than the CE alone.
    """

    def __init__(self, kd: nn.Module, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"expected alpha in [0, 1] (the weight of the KD loss), found {alpha}; "
                "pass e.g. --alpha 0.5"
            )
        if not isinstance(kd, _KDLoss):
            raise ConfigError(
                f"expected a KD loss to mix with CE, found {type(kd).__name__}; "
                f"pick one of {sorted(n for n in LOSSES if n != 'ce')}"
            )
        self.kd, self.ce, self.alpha = kd, HardCE(), float(alpha)
        self.needs_tail = kd.needs_tail
        # soft_ce at T != 1 needs the logsumexp of the tempered logits, CE the untempered one
        self.shared_pass = not (kd.student_lse == "all" and kd.temperature != 1.0)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def normalizers(self, targets: Targets, n_rows: int, like: Tensor) -> tuple[Tensor | None, ...]:
        # alpha 1 or 0 skips the other loss: a pure-KD run needs no labels, a pure-CE no top-k.
        kd = self.kd.normalizers(targets, n_rows, like) if self.alpha > 0 else (None,)
        ce = self.ce.normalizers(targets, n_rows, like) if self.alpha < 1 else (None,)
        return (*kd, *ce)

    def partial(self, student_logits: Tensor, targets: Targets, norms: Sequence[Tensor]) -> Tensor:
        if self.alpha == 0.0:
            return self.ce.partial(student_logits, targets, norms[1:])
        if self.alpha == 1.0:
            return self.kd.partial(student_logits, targets, norms[:1])
        if not self.shared_pass:
            kd = self.kd.partial(student_logits, targets, norms[:1])
            return self.alpha * kd + (1 - self.alpha) * self.ce.partial(
                student_logits, targets, norms[1:]
            )
        ids, logprobs, log_tail = self.kd._select(student_logits, targets)
        valid, labels = self.ce._select(targets)
        k = ids.shape[1]
        rest = self.kd.student_lse == "rest"
        lse, z_cols = _logit_stats(
            student_logits, torch.cat([ids, labels], -1), exclude=k if rest else 0
        )
        assert lse is not None
        z_ids = z_cols[:, :k]
        if rest:
            lse_kd = lse  # over the columns outside the k ids; CE needs the whole row:
            lse_all = torch.logaddexp(lse, torch.logsumexp(z_ids, -1))
        else:
            lse_kd = lse if self.kd.student_lse == "all" else None
            lse_all = lse
        kd = _masked_sum(self.kd._rows(z_ids, lse_kd, logprobs, log_tail), targets.mask, norms[0])
        ce = _masked_sum(self.ce._rows(lse_all, z_cols[:, k:]), valid, norms[1])
        return self.alpha * kd + (1 - self.alpha) * ce


LOSSES: dict[str, type[_Loss]] = {
    "forward_kl": ForwardKL,
    "forward_kl_tail": ForwardKLWithTail,
    "reverse_kl": ReverseKL,
    "jsd": JSD,
    "ce": HardCE,
    "soft_ce": SoftCE,
}


def build_loss(
    name: str,
    *,
    temperature: float = 1.0,
    k: int | None = None,
    alpha: float | None = None,
    beta: float = 0.5,
) -> nn.Module:
    """The loss called ``name``; with ``alpha``, mixed with hard-label CE as alpha*KD + (1-a)*CE.

    ``ce`` takes no temperature, k or beta (they are ignored), and no alpha.
    """
    if name not in LOSSES:
        raise ConfigError(
            f"expected a loss in {sorted(LOSSES)}, found {name!r}; pass one of them to --loss"
        )
    cls = LOSSES[name]
    if cls is HardCE:
        if alpha is not None:
            raise ConfigError(
                f"expected no alpha with --loss ce (alpha weighs a KD loss against CE), found "
                f"alpha={alpha}; drop --alpha or pick a KD loss"
            )
        return HardCE()
    if cls is JSD:
        loss: _Loss = JSD(beta=beta, temperature=temperature, k=k)
    else:
        loss = cls(temperature=temperature, k=k)
    return loss if alpha is None else Mixed(loss, alpha)


# ---------------------------------------------------------------------------------------------
# Chunked driver


HeadFn = Callable[[Tensor, Sequence[Tensor]], Tensor]

# Bytes of (rows, V) float32 tensors alive at once per loss chunk: the logits, one working copy
# and the gradient (3 x rows x V x 4). 256 MiB keeps a 151,936-id student at 4,096 positions
# under half of one full float32 logits tensor (benchmarks/train_bench.py --memory measures it).
LOSS_CHUNK_BYTES = 256 * 2**20
LIVE_ROW_TENSORS = 3


def loss_chunk_rows(vocab_size: int, budget_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Rows per loss chunk for a student of ``vocab_size`` outputs: the byte budget divided by
    what a row costs, in [16, 4096] (fewer rows than 16 only add launches; more than 4096 gain
    nothing on a small vocabulary)."""
    rows = budget_bytes // (LIVE_ROW_TENSORS * 4 * max(vocab_size, 1))
    return int(min(4096, max(16, rows)))


def _run_chunks(
    loss: _Loss,
    head_fn: HeadFn,
    hidden: Tensor,
    params: Sequence[Tensor],
    targets: Targets,
    norms: Sequence[Tensor],
    chunk_size: int,
    needs: Sequence[bool],
) -> tuple[Tensor, list[Tensor | None]]:
    """The loss and, where ``needs`` says, its gradients w.r.t. (hidden, *params).

    Each chunk's logits are built, used for its share of the loss and its gradients, and freed
    before the next chunk: at most one (chunk, V) block of logits and gradient is alive.
    """
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = torch.zeros_like(hidden) if needs[0] else None
    # Parameter gradients summed over chunks in at least float32 (bf16 sums lose bits).
    g_params = [
        torch.zeros_like(p, dtype=_compute_dtype(p)) if need else None
        for p, need in zip(params, needs[1:])
    ]
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:end].detach().requires_grad_(needs[0])  # (n, C)
        ps = [p.detach().requires_grad_(need) for p, need in zip(params, needs[1:])]
        with torch.enable_grad():
            logits = head_fn(h, ps)  # (n, V)
            part = loss.partial(logits, targets.rows(start, end), norms)
        wrt = [x for x, need in zip([h, *ps], needs) if need]
        if wrt and part.requires_grad:
            grads = iter(torch.autograd.grad(part, wrt, allow_unused=True))
            if g_hidden is not None:
                g = next(grads)
                if g is not None:
                    g_hidden[start:end] = g
            for acc in g_params:
                if acc is not None:
                    g = next(grads)
                    if g is not None:
                        acc += g
        total += part.detach().float()
        del logits, part
    out_grads = [g_hidden] + [
        None if g is None else g.to(p.dtype) for g, p in zip(g_params, params)
    ]
    return total, out_grads


class _ChunkedLossFunction(torch.autograd.Function):
    """Forward runs every chunk's forward and backward; backward only scales the saved grads.

    Doing the per-chunk backward inside forward (as Liger's fused linear cross-entropy does)
    builds each chunk's logits once; torch.utils.checkpoint would build them twice.
    """

    @staticmethod
    def forward(ctx, run: Callable[..., tuple[Tensor, list]], hidden: Tensor, *params: Tensor):
        total, grads = run(hidden, params, ctx.needs_input_grad[1:])
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.grads]
        return (None, *grads)


def chunked_loss(
    loss: nn.Module,
    hidden: Tensor,
    head: nn.Module | Tensor,
    *,
    bias: Tensor | None = None,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    log_tail: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    chunk_size: int = 1024,
    norms: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """``loss(head(hidden), ...)`` without the full (N, V) logits or their gradient.

    ``hidden`` is (N, C) final hidden states; ``head`` is the output head: an nn.Module (an
    nn.Linear, or any module mapping (n, C) -> (n, V) row by row) or a weight tensor (V, C) with
    an optional ``bias`` (V,). The value and the gradients w.r.t. ``hidden`` and the head's
    parameters equal the unchunked computation; only ``chunk_size`` rows of logits are alive.
    ``norms`` are the divisors of the means (``loss.normalizers``) when the mean runs over more
    rows than ``hidden`` holds: every micro-batch of an optimizer step on every rank
    (kdcache.stages.train.step.step_norms); None: this call's rows alone.
    """
    if not isinstance(loss, _Loss):
        raise ConfigError(
            f"expected a kdcache loss, found {type(loss).__name__}; build it with build_loss"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"expected chunk_size >= 1, found {chunk_size!r}; pass e.g. 1024")
    if hidden.dim() != 2:
        raise ConfigError(
            f"expected hidden states of shape (N, C), found {tuple(hidden.shape)}; "
            "flatten the batch first: hidden.reshape(-1, hidden.shape[-1])"
        )
    head_fn: HeadFn
    if isinstance(head, Tensor):
        params: list[Tensor] = [head] if bias is None else [head, bias]

        def head_fn(h: Tensor, ps: Sequence[Tensor]) -> Tensor:
            return F.linear(h, *ps)

    elif isinstance(head, nn.Module):
        if bias is not None:
            raise ConfigError(
                "expected bias only with a weight tensor as head, found an nn.Module and a bias; "
                "drop bias (the module's own bias is used)"
            )
        named = list(head.named_parameters())
        names, params = [n for n, _ in named], [p for _, p in named]

        def head_fn(h: Tensor, ps: Sequence[Tensor]) -> Tensor:
            return torch.func.functional_call(head, dict(zip(names, ps)), (h,))

    else:
        raise ConfigError(
            f"expected the output head as an nn.Module or a (V, C) weight tensor, found "
            f"{type(head).__name__}; pass model.lm_head"
        )
    targets = Targets(topk_ids, topk_logprobs, log_tail, mask, labels)
    if norms is None:
        norms = loss.normalizers(targets, hidden.shape[0], hidden)

    def run(h: Tensor, ps: Sequence[Tensor], needs: Sequence[bool]):
        return _run_chunks(loss, head_fn, h, ps, targets, norms, chunk_size, needs)

    inputs = (hidden, *params)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _ChunkedLossFunction.apply(run, *inputs)
    with torch.no_grad():
        return run(hidden, params, [False] * len(inputs))[0]
