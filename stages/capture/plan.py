"""Planning stage one: documents -> sequences -> batches, all before the teacher runs.

One document per sequence, long documents as overlapping windows (``windows``), or packed
documents (``_pack``); then batches by token budget inside fixed groups of documents
(``make_batches``), so batch boundaries depend only on the data and settings, never on how many
shards run or where a run was interrupted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kdcache.stages.capture.sources import iter_documents, tokenize
from kdcache.stages.models.tokenizer import TokenizerInfo
from kdcache.storage.errors import ConfigError

if TYPE_CHECKING:
    from kdcache.stages.capture.config import CaptureConfig


@dataclass
class Planned:
    """One sequence to run through the teacher."""

    sample_id: int
    ids: np.ndarray  # (T,) int64
    target_mask: np.ndarray  # (T,) uint8
    doc_starts: np.ndarray  # (D,) int32


def sample_id(*parts: object) -> int:
    """Stable 64-bit id of (source, document, window): never depends on the shard count."""
    h = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def windows(
    ids: np.ndarray, mask: np.ndarray, seq_len: int, stride: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a long document into windows of seq_len starting every stride tokens.

    Row p predicts token p+1; each row is a target in exactly one window: the first
    ``seq_len - stride`` rows of every window after the first were targets in the previous
    window (with less left context), so they are context only here.
    """
    n = len(ids)
    out, start = [], 0
    while True:
        end = min(start + seq_len, n)
        m = mask[start:end].copy()
        if start > 0:
            m[: seq_len - stride] = 0
        out.append((ids[start:end], m))
        if end == n:
            return out
        start += stride


def plan_sequences(
    cfg: CaptureConfig, tok: TokenizerInfo, shard: int, num_shards: int, seq_len: int, stride: int
):
    """Yield (group index, [Planned]) for this shard's groups, in order.

    Document i belongs to group i // group_docs; group g belongs to shard g % num_shards.
    """
    assistant = cfg.targets_on == "assistant"
    current = -1
    pieces: list[tuple[int, np.ndarray, np.ndarray]] = []  # (sample id, ids, mask)

    def flush_group():
        nonlocal pieces
        seqs = (
            _pack(pieces, seq_len)
            if cfg.pack
            else [Planned(s, i, m, np.zeros(1, np.int32)) for s, i, m in pieces]
        )
        pieces = []
        return seqs

    n_docs = 0
    for i, doc in enumerate(
        iter_documents(Path(cfg.data), text_field=cfg.text_field, ids_field=cfg.ids_field)
    ):
        n_docs += 1
        g = i // cfg.group_docs
        if g != current:
            if pieces:
                yield current, flush_group()
            current = g
        if g % num_shards != shard:
            continue
        t = tokenize(doc, tok, add_eos=cfg.add_eos, assistant_only=assistant)
        if len(t.ids) < 2 and not cfg.pack:
            continue  # nothing to predict
        if len(t.ids) > seq_len:
            if not stride:
                raise ConfigError(
                    f"{doc.source} document {doc.index} has {len(t.ids)} tokens, more than --seq-len {seq_len} "
                    "and no stride; pass --stride S to cut long documents into overlapping windows"
                )
            for w, (ids, m) in enumerate(windows(t.ids, t.target_mask, seq_len, stride)):
                pieces.append((sample_id(doc.source, doc.index, w), ids, m))
        else:
            pieces.append((sample_id(doc.source, doc.index, 0), t.ids, t.target_mask))
    if pieces:
        yield current, flush_group()
    if n_docs == 0:
        raise ConfigError(
            f"--data {cfg.data} holds no documents; expected at least one non-empty file or record"
        )


def _pack(pieces: list[tuple[int, np.ndarray, np.ndarray]], seq_len: int) -> list[Planned]:
    """Join pieces in order into sequences of at most seq_len tokens (a piece is never split)."""
    out, cur = [], []

    def close():
        if cur:
            starts = np.cumsum([0] + [len(p[1]) for p in cur[:-1]]).astype(np.int32)
            out.append(
                Planned(
                    sample_id=sample_id("pack", *[p[0] for p in cur]),
                    ids=np.concatenate([p[1] for p in cur]),
                    target_mask=np.concatenate([p[2] for p in cur]),
                    doc_starts=starts,
                )
            )

    used = 0
    for piece in pieces:
        if cur and used + len(piece[1]) > seq_len:
            close()
            cur, used = [], 0
        cur.append(piece)
        used += len(piece[1])
    close()
    return out


def make_batches(seqs: list[Planned], batch_tokens: int) -> list[list[Planned]]:
    """Longest first inside the group, then greedy: B * longest <= batch_tokens (>= 1 sequence)."""
    order = sorted(seqs, key=lambda s: -len(s.ids))  # stable: ties keep document order
    batches, cur = [], []
    for s in order:
        if cur and (len(cur) + 1) * len(cur[0].ids) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    if cur:
        batches.append(cur)
    return batches
