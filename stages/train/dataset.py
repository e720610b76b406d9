"""Stage two's input pipeline: batches of cached sequences as torch tensors.

The unit of shuffling is a *batch block*: ``batch_size`` consecutive sequences in storage
order, read with one contiguous read. An epoch visits the blocks in a seeded permutation
(epoch-dependent), so the order is fixed by (seed, epoch) alone:

- any number of DataLoader workers gives the same order (worker w yields blocks w, w+W, ...
  and the DataLoader interleaves workers round-robin);
- under torchrun every rank walks the same block list (independent of the number of ranks) and
  takes its own slice of each block's sequences, so each global batch is exactly the one a
  single process would train on, and every rank runs the same number of steps (no rank waits
  forever at a collective); a block shorter than the number of ranks leaves some ranks an empty
  slice, an empty Batch that the trainer still steps through;
- resuming skips the blocks already *consumed* (counted by the training loop, not by the
  prefetcher), so a resumed run sees exactly the batches the uninterrupted run would.

A slice of the blocks (chosen by a hash of the block index) is held out for evaluation.

    ds = CacheBatches("teacher-cache", batch_size=8, seed=0)
    for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
        batch.input_ids  # (B, T) ...

``collate`` turns a Block into a ``Batch`` of padded tensors; users plug both into their own loops.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import IGNORE_INDEX, Block


@dataclass
class Batch:
    """Padded tensors of B sequences of up to T positions (k cached entries per row)."""

    input_ids: torch.Tensor  # (B, T) int64, 0-padded
    labels: torch.Tensor  # (B, T) int64 next token, IGNORE_INDEX where none (last row, padding)
    valid: torch.Tensor  # (B, T) bool real positions
    target_mask: torch.Tensor  # (B, T) bool rows that carry a target (loss mask)
    has_topk: torch.Tensor  # (B, T) bool rows whose top-k is stored
    topk_ids: torch.Tensor  # (B, T, k) int64 (0 where not stored)
    topk_logprobs: torch.Tensor  # (B, T, k) float32
    log_tail: torch.Tensor  # (B, T) float32
    position_ids: torch.Tensor | None  # (B, T) restart at each document (packed caches)
    segment_ids: torch.Tensor | None  # (B, T) document number inside the row (packed caches)

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def lm_inputs(self) -> dict[str, torch.Tensor | None]:
        """The arguments of a kdcache adapter's ``hidden`` / ``logits`` (kdcache.stages.models)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "segment_ids": self.segment_ids,
            "valid": self.valid,
        }

    def targets(self, rows: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
        """The loss inputs of the selected rows, flattened (N = rows.sum()); cached ids beyond
        the student's vocabulary fold into the tail."""
        ids = self.topk_ids[rows]  # (N, k)
        lp = self.topk_logprobs[rows].float()
        tail = self.log_tail[rows].float()
        outside = ids >= vocab
        if outside.any():
            tail = torch.logaddexp(tail, torch.where(outside, lp, float("-inf")).logsumexp(-1))
            lp = lp.masked_fill(outside, float("-inf"))
            ids = ids.masked_fill(outside, 0)
        return {
            "topk_ids": ids,
            "topk_logprobs": lp,
            "log_tail": tail,
            "mask": self.target_mask[rows] & self.has_topk[rows],
            "labels": torch.where(self.target_mask[rows], self.labels[rows], IGNORE_INDEX),
        }

    def model_inputs(self) -> dict[str, torch.Tensor | bool]:
        """Keyword arguments for a Hugging Face model's forward: ``input_ids`` with the padding
        mask, or for packed rows (a ``--pack`` cache) ``position_ids`` that restart at every
        document and no mask, so transformers (>= 4.54) keeps the documents apart with the
        model's own mask, sliding window included, as the teacher saw them. No KV cache: it
        would switch that packed-sequence detection off."""
        if self.position_ids is not None:
            return {
                "input_ids": self.input_ids,
                "position_ids": self.position_ids,
                "use_cache": False,
            }
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.valid.long(),
            "use_cache": False,
        }

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            name: (
                value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            )
            for name, value in self.__dict__.items()
        }
        return Batch(**moved)


def collate(block: Block, *, packed: bool | None = None) -> Batch:
    """Pad a block of sequences into a Batch (alignment of docs/FORMAT.md: label of row t = token t+1).

    packed: give ``position_ids`` and ``segment_ids`` that restart at every document, and no
    label on a document's last row (as alone); None: exactly when a sequence of the block holds
    several documents (a ``--pack`` cache). A student that ignores them attends across documents
    the teacher kept apart: pass ``batch.model_inputs()`` to a Hugging Face model."""
    multi_doc = bool((np.diff(block.doc_offsets) > 1).any())
    if packed is None:
        packed = multi_doc
    elif multi_doc and not packed:
        warnings.warn(
            "collate(packed=False) on packed sequences (several documents per row): the student "
            "would attend across documents the teacher kept apart; leave packed at None and pass "
            "batch.model_inputs() (or position_ids and segment_ids) to the model",
            stacklevel=2,
        )
    B = block.num_sequences
    lengths = np.diff(block.seq_offsets)
    T = int(lengths.max()) if B else 0
    k = block.topk_ids.shape[1]
    valid = np.arange(T)[None, :] < lengths[:, None]  # (B, T)
    input_ids = np.zeros((B, T), np.int64)
    input_ids[valid] = block.input_ids
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    labels[:, :-1] = np.where(valid[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    target = np.zeros((B, T), bool)
    target[valid] = block.loss_mask.astype(bool)
    # Target rows: one per position ("all") or one per masked-in position ("mask").
    has_topk = valid.copy() if block.num_rows == block.num_positions else target.copy()
    topk_ids = np.zeros((B, T, k), np.int64)
    topk_lp = np.zeros((B, T, k), np.float32)
    log_tail = np.full((B, T), -np.inf, np.float32)
    topk_ids[has_topk] = block.topk_ids
    topk_lp[has_topk] = block.topk_logprobs
    log_tail[has_topk] = block.log_tail
    pos = seg = None
    if packed:
        seg_np = np.zeros((B, T), np.int64)
        pos_np = np.tile(np.arange(T), (B, 1))
        for j in range(B):
            starts = block.doc_starts[block.doc_offsets[j] : block.doc_offsets[j + 1]]
            for d, s in enumerate(starts[1:], start=1):
                seg_np[j, s:] = d
                pos_np[j, s:] = np.arange(T - s)
                labels[j, s - 1] = IGNORE_INDEX  # a document's last row: no label, as alone
        seg, pos = torch.from_numpy(seg_np), torch.from_numpy(pos_np)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        valid=torch.from_numpy(valid),
        target_mask=torch.from_numpy(target),
        has_topk=torch.from_numpy(has_topk),
        topk_ids=torch.from_numpy(topk_ids),
        topk_logprobs=torch.from_numpy(topk_lp),
        log_tail=torch.from_numpy(log_tail),
        position_ids=pos,
        segment_ids=seg,
    )


def _is_heldout(index: int, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class CacheBatches(IterableDataset):
    """Batches (``Batch``) of a cache: shuffled batch blocks, deterministic, resumable, sharded.

    split: "train" or "eval" (the blocks held out with eval_fraction). rank/world_size: this
    process's slice of every global batch (torchrun); batch_size is the *global* batch.
    """

    def __init__(
        self,
        cache: str | Path,
        *,
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        eval_fraction: float = 0.0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path = Path(cache)
        reader = CacheReader(self.path)
        self.num_sequences = reader.num_sequences
        self.packed = bool(reader.manifest["settings"].get("pack", False))
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        # Global batch blocks: [start, stop) sequence ranges that never span two parts.
        blocks = []
        for p in range(reader.num_parts):
            lo, hi = int(reader.part_starts[p]), int(reader.part_starts[p + 1])
            blocks += [(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]
        held = [
            i
            for i in range(len(blocks))
            if eval_fraction > 0 and _is_heldout(i, eval_fraction, seed)
        ]
        if eval_fraction > 0 and not held and len(blocks) > 1:
            held = [len(blocks) - 1]  # a tiny cache still gets an eval slice
        keep = set(held) if split == "eval" else set(range(len(blocks))) - set(held)
        self.blocks = [b for i, b in enumerate(blocks) if i in keep]
        self.epoch = 0
        self.skip = 0  # blocks of this epoch already consumed (resume)
        self._reader: CacheReader | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def set_position(self, epoch: int, consumed: int) -> None:
        """Resume: the next iteration starts at block ``consumed`` of ``epoch``'s order."""
        self.epoch, self.skip = epoch, consumed

    def order(self, epoch: int) -> list[tuple[int, int]]:
        if not self.shuffle:
            return list(self.blocks)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        return [self.blocks[i] for i in perm]

    def _my_slice(self, start: int, stop: int) -> tuple[int, int]:
        n = stop - start
        return start + n * self.rank // self.world_size, start + n * (
            self.rank + 1
        ) // self.world_size

    def __iter__(self):
        if self._reader is None:  # opened lazily: one reader per DataLoader worker
            self._reader = CacheReader(self.path)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = self.order(self.epoch)
        for i in range(self.skip + worker, len(order), workers):
            start, stop = self._my_slice(*order[i])
            yield collate(self._reader.block(start, stop), packed=self.packed)
