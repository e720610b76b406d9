"""One distillation step's loss, as the module torch's parallel engines wrap.

``DistillStep`` holds the student (its only child) and computes a micro-batch's loss inside its
own ``forward``: the student's final hidden states, then the chunked loss through the head.
Under FSDP2 the head weight is all-gathered for the forward of the unit that owns it; running
the loss inside the forward of the root unit (which owns the head and the tied embedding)
keeps the weight unsharded while the chunks use it and sends its gradient through the
reduce-scatter. Under DDP the same forward is what the reducer watches.

The loss of an optimizer step is a mean over *every* counted row of the step: all its
accumulation micro-batches on all ranks (``step_norms``, one all-reduce per step). Each
micro-batch's forward returns its share (its rows' sum over the step's count); the shares add up
to the step's loss on one process and on N. DDP and FSDP average gradients over the ranks, so
``grad_scale`` (the world size under them) turns that average back into the sum of the shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from kdcache.stages.models.adapters import CausalLM
from kdcache.stages.train.dataset import Batch
from kdcache.stages.train.losses import Targets, chunked_loss, loss_chunk_rows

Norms = tuple[Tensor | None, ...]


def batch_targets(batch: Batch, vocab_size: int) -> Targets:
    """The loss inputs of every real position of the batch (rows in (B, T) order)."""
    return Targets(**batch.targets(batch.valid, vocab_size))


def step_norms(
    loss_fn: nn.Module,
    micro: Sequence[tuple[Batch, Targets]],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Norms:
    """The divisors of the step's means: each normalizer summed over the micro-batches, then
    (``reduce``, an all-reduce) over the ranks, in one collective."""
    # rows: every real position, known from the shapes (no device sync)
    per_batch = [loss_fn.normalizers(t, t.topk_ids.shape[0], b.topk_logprobs) for b, t in micro]
    present = [n is not None for n in per_batch[0]]
    device = micro[0][0].topk_logprobs.device
    sums = torch.zeros(len(present), device=device)
    for norms in per_batch:
        for i, n in enumerate(norms):
            if n is not None:
                sums[i] += n.to(device)
    if reduce is not None:
        sums = reduce(sums)
    return tuple(sums[i] if keep else None for i, keep in enumerate(present))


class DistillStep(nn.Module):
    """``forward(batch, targets, norms)``: the micro-batch's share of the step's loss.

    ``chunk_rows`` rows of logits are alive at once when the student's head can be reached
    (``CausalLM.has_head``); other students hand over full logits. An empty batch (this rank's
    slice of a short block) still runs the student on one dummy token with weight 0, so every
    rank joins the same collectives and every parameter receives a (zero) gradient."""

    def __init__(
        self,
        student: CausalLM,
        loss_fn: nn.Module,
        *,
        chunk_rows: int | None = None,
        grad_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.student = student.module
        self.loss_fn = loss_fn
        self.chunk_rows = chunk_rows or loss_chunk_rows(student.vocab_size)
        self.grad_scale = grad_scale
        object.__setattr__(self, "adapter", student)  # not a child: its module is self.student

    def forward(self, batch: Batch, targets: Targets, norms: Norms) -> Tensor:
        adapter: CausalLM = self.adapter
        if batch.input_ids.shape[0] == 0:
            return self._zero(batch.input_ids.device)
        if adapter.has_head:
            h = adapter.hidden(**batch.lm_inputs())[batch.valid]  # (N, C)
            loss = chunked_loss(
                self.loss_fn,
                h,
                adapter.head_module,
                chunk_size=self.chunk_rows,
                norms=norms,
                **_fields(targets),
            )
        else:
            logits = adapter.logits(**batch.lm_inputs())[batch.valid]  # (N, V)
            loss = self.loss_fn.partial(logits, targets, norms)
        return loss * self.grad_scale

    def _zero(self, device: torch.device) -> Tensor:
        adapter: CausalLM = self.adapter
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        out = adapter.head(adapter.hidden(ids)) if adapter.has_head else adapter.logits(ids)
        return out.float().sum() * 0.0


def _fields(t: Targets) -> dict[str, Tensor | None]:
    return {
        "topk_ids": t.topk_ids,
        "topk_logprobs": t.topk_logprobs,
        "log_tail": t.log_tail,
        "mask": t.mask,
        "labels": t.labels,
    }
