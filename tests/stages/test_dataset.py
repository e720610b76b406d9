"""Stage two's input pipeline (stages/dataset.py) on synthetic caches written by the real writer:
batch order, splits, rank slices, resume, and the alignment of collated batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from train_helpers import lengths, synthetic_cache

from kdcache.stages.train.dataset import Batch, CacheBatches, collate
from kdcache.storage.background import prefetch
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import IGNORE_INDEX

BATCH = 3
# 3 DataLoader workers on a 2-core machine: torch warns, the order must not change.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """2 parts of 14 and 11 sequences: blocks of 3 never span the parts, so 5 + 4 blocks, two of
    them short (2 sequences each)."""
    path = tmp_path_factory.mktemp("ds") / "c"
    return synthetic_cache(path, [lengths(14, seed=1), lengths(11, seed=2)])


def ids_of(batch: Batch) -> list[tuple[int, ...]]:
    """Each sequence of a batch as its tuple of real input ids (sequences are told apart by
    them: random ids of 3-16 tokens over 64 ids do not repeat here)."""
    return [tuple(row[v].tolist()) for row, v in zip(batch.input_ids, batch.valid)]


def ids_of_block(reader: CacheReader, start: int, stop: int) -> list[tuple[int, ...]]:
    return [tuple(s.input_ids.tolist()) for s in reader.block(start, stop)]


def epoch(ds, workers: int = 0) -> list[list[tuple[int, ...]]]:
    return [ids_of(b) for b in DataLoader(ds, batch_size=None, num_workers=workers)]


def test_sequences_are_told_apart_by_their_ids(cache):
    seqs = [tuple(s.input_ids.tolist()) for s in CacheReader(cache)]
    assert len(set(seqs)) == len(seqs) == 25


def test_order_is_the_same_for_any_number_of_workers(cache):
    ds = CacheBatches(cache, batch_size=BATCH, seed=3)
    reader = CacheReader(cache)
    expected = [ids_of_block(reader, a, b) for a, b in ds.order(0)]
    assert len(expected) == len(ds) == 9
    for workers in (0, 1, 2, 3):
        assert epoch(ds, workers) == expected, f"num_workers={workers}"


def test_each_epoch_visits_every_block_once_in_a_seeded_order(cache):
    ds = CacheBatches(cache, batch_size=BATCH, seed=3)
    orders = [ds.order(e) for e in range(3)]
    for order in orders:
        assert sorted(order) == sorted(ds.blocks)
    covered = sorted(i for a, b in ds.blocks for i in range(a, b))
    assert covered == list(range(25))  # every sequence in exactly one block
    assert all(b - a <= BATCH for a, b in ds.blocks)
    assert orders[0] != orders[1] != orders[2]
    other_seed = CacheBatches(cache, batch_size=BATCH, seed=4)
    assert other_seed.order(0) != orders[0]
    assert CacheBatches(cache, batch_size=BATCH, seed=3).order(1) == orders[1]  # reproducible
    # What the iterator yields follows ds.epoch (set by set_position).
    ds.set_position(2, 0)
    reader = CacheReader(cache)
    assert epoch(ds) == [ids_of_block(reader, a, b) for a, b in orders[2]]


def test_eval_split_is_disjoint_from_train(cache):
    train = CacheBatches(cache, batch_size=BATCH, seed=3, split="train", eval_fraction=0.3)
    held = CacheBatches(cache, batch_size=BATCH, seed=3, split="eval", eval_fraction=0.3)
    everything = CacheBatches(cache, batch_size=BATCH, seed=3)
    assert len(held) >= 1 and len(train) >= 1
    assert not set(train.blocks) & set(held.blocks)
    assert sorted(train.blocks + held.blocks) == sorted(everything.blocks)
    train_seqs = {s for batch in epoch(train) for s in batch}
    held_seqs = {s for batch in epoch(held) for s in batch}
    assert not train_seqs & held_seqs and len(train_seqs | held_seqs) == 25


@pytest.mark.parametrize("batch_size", [3, 4])
def test_rank_slices_together_are_the_single_process_batch(tmp_path, batch_size):
    # Parts of 9 and 12: with batch 4, block [8, 9) holds one sequence, so rank 0's slice of it
    # is empty; the two ranks still walk the same blocks as one process.
    path = synthetic_cache(tmp_path / "c", [lengths(9, seed=5), lengths(12, seed=6)])
    one = CacheBatches(path, batch_size=batch_size, seed=0, eval_fraction=0.2)
    ranks = [
        CacheBatches(path, batch_size=batch_size, seed=0, eval_fraction=0.2, rank=r, world_size=2)
        for r in range(2)
    ]
    if batch_size == 4:
        assert (8, 9) in one.blocks + CacheBatches(
            path, batch_size=4, seed=0, eval_fraction=0.2, split="eval"
        ).blocks
    for r in ranks:
        assert r.blocks == one.blocks
    for e in range(2):
        for ds in [one, *ranks]:
            ds.set_position(e, 0)
        whole = epoch(one)
        parts = [epoch(r) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == len(whole)
        for w, a, b in zip(whole, *parts):
            assert a + b == w
            assert abs(len(a) - len(b)) <= 1


def test_set_position_continues_with_the_next_batch(cache):
    ds = CacheBatches(cache, batch_size=BATCH, seed=3, eval_fraction=0.2)
    ds.set_position(1, 0)
    full = epoch(ds)
    for n in (0, 1, 4, len(full) - 1, len(full)):
        ds.set_position(1, n)
        assert epoch(ds) == full[n:]
        assert epoch(ds, workers=2) == full[n:]


def test_collate_aligns_labels_and_targets(cache):
    reader = CacheReader(cache)
    block = reader.block(0, 5)
    batch = collate(block)
    B, T = batch.input_ids.shape
    assert T == max(len(s.input_ids) for s in block) and B == 5
    for j, seq in enumerate(block):
        n = len(seq.input_ids)
        assert batch.valid[j].tolist() == [True] * n + [False] * (T - n)
        assert batch.input_ids[j, :n].tolist() == seq.input_ids.tolist()
        assert batch.labels[j, : n - 1].tolist() == seq.input_ids[1:].tolist()
        assert (batch.labels[j, n - 1 :] == IGNORE_INDEX).all()  # last row and padding
        assert batch.has_topk[j].tolist() == batch.valid[j].tolist()
        assert batch.topk_ids[j, :n].tolist() == seq.topk_ids.tolist()
        assert torch.equal(batch.topk_logprobs[j, :n], torch.from_numpy(seq.topk_logprobs))
        assert torch.equal(batch.log_tail[j, :n], torch.from_numpy(seq.log_tail))
    assert batch.position_ids is None and batch.segment_ids is None
    assert batch.num_tokens == block.num_positions


def test_mask_cache_puts_rows_only_on_target_positions(tmp_path):
    path = synthetic_cache(tmp_path / "c", [lengths(6, seed=7)], targets_on="mask")
    reader = CacheReader(path)
    assert reader.schema.targets_on == "mask" and reader.num_rows < reader.num_positions
    block = reader.block(0, 6)
    batch = collate(block)
    for j, seq in enumerate(block):
        n = len(seq.input_ids)
        mask = torch.from_numpy(seq.loss_mask.astype(bool))
        assert batch.target_mask[j, :n].tolist() == mask.tolist()
        assert batch.has_topk[j, :n].tolist() == mask.tolist()
        assert not batch.has_topk[j, n:].any() and not batch.target_mask[j, n:].any()
        rows = batch.has_topk[j]
        assert batch.topk_ids[j][rows].tolist() == seq.topk_ids.tolist()  # i-th row: i-th 1
        assert torch.equal(batch.topk_logprobs[j][rows], torch.from_numpy(seq.topk_logprobs))
        assert (batch.topk_ids[j][~rows] == 0).all() and batch.log_tail[j][~rows].isneginf().all()
        assert batch.labels[j, : n - 1].tolist() == seq.input_ids[1:].tolist()


def test_packed_cache_restarts_positions_at_each_document(tmp_path):
    path = synthetic_cache(tmp_path / "c", [lengths(8, seed=8, lo=6)], pack=True)
    block = CacheReader(path).block(0, 8)
    ds = CacheBatches(path, batch_size=8, shuffle=False)
    assert ds.packed
    [batch] = list(ds)
    assert batch.position_ids is not None and batch.segment_ids is not None
    multi = 0
    for j, seq in enumerate(block):
        n, starts = len(seq.input_ids), seq.doc_starts.tolist()
        multi += len(starts) > 1
        ends = starts[1:] + [n]
        seg = sum(([d] * (e - s) for d, (s, e) in enumerate(zip(starts, ends))), [])
        pos = sum((list(range(e - s)) for s, e in zip(starts, ends)), [])
        assert batch.segment_ids[j, :n].tolist() == seg
        assert batch.position_ids[j, :n].tolist() == pos
        # A document's last row has no label (the next token belongs to another document),
        # exactly as when the document is alone.
        want = np.full(batch.labels.shape[1], IGNORE_INDEX)
        for s, e in zip(starts, ends):
            want[s : e - 1] = seq.input_ids[s + 1 : e]
        assert batch.labels[j].tolist() == want.tolist()
    assert multi >= 4


def test_a_users_own_loop_keeps_packed_documents_apart(tmp_path):
    """collate() finds packed rows by itself (a user's CacheReader + collate loop), warns when
    told they are not packed, and ``model_inputs()`` gives a Hugging Face model what keeps the
    documents apart: each document's hidden states equal the document's alone."""
    transformers = pytest.importorskip("transformers")
    path = synthetic_cache(tmp_path / "c", [lengths(8, seed=8, lo=6)], pack=True)
    block = CacheReader(path).block(0, 8)
    batch = collate(block)  # packed=None: detected from the documents per sequence
    assert batch.position_ids is not None
    with pytest.warns(UserWarning, match="attend across documents"):
        collate(block, packed=False)
    inputs = batch.model_inputs()
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    torch.manual_seed(0)
    model = transformers.GPT2Model(
        transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    ).eval()
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state  # (B, T, C)
        docs = 0
        for j, seq in enumerate(block):
            bounds = [*seq.doc_starts.tolist(), len(seq.input_ids)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                alone = model(torch.tensor(seq.input_ids[a:b].astype(np.int64))[None])
                torch.testing.assert_close(hidden[j, a:b], alone.last_hidden_state[0])
                docs += 1
    assert docs > len(block.sample_id)
    plain = collate(CacheReader(synthetic_cache(tmp_path / "u", [[5, 7]])).block(0, 2))
    assert plain.position_ids is None and plain.model_inputs()["attention_mask"].shape == (2, 7)


def test_empty_slice_collates_to_an_empty_batch(tmp_path):
    path = synthetic_cache(tmp_path / "c", [[5]])
    ds = CacheBatches(path, batch_size=4, rank=0, world_size=2)
    [batch] = list(ds)  # the single sequence goes to rank 1
    assert batch.input_ids.shape == (0, 0) and batch.topk_ids.shape == (0, 0, 8)


def test_prefetch_yields_the_source_and_reraises_its_error():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise OSError("disk gone")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
