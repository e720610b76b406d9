import numpy as np
import pytest

from kdcache.storage.errors import ConfigError
from kdcache.storage.schema import Block, CacheSchema, Sequence, id_dtype_for


def test_id_dtype_has_no_vocabulary_cap():
    assert id_dtype_for(65536) == np.uint16
    assert id_dtype_for(65537) == np.uint32
    assert id_dtype_for(200_000) == np.uint32


def test_labels_are_the_next_input_token():
    """Alignment (FORMAT.md): the hard label of row t is input token t+1; the last row has none."""
    s = Sequence(
        0,
        np.array([5, 6, 7]),
        np.ones(3, np.uint8),
        np.zeros(1, np.int32),
        np.zeros((3, 1)),
        np.zeros((3, 1)),
        np.zeros(3),
    )
    assert s.labels.tolist() == [6, 7, -100]


def test_schema_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        CacheSchema(k=0, vocab_size=10, logprob_dtype="bfloat16", targets_on="some")
    msg = str(e.value)
    assert "k must be" in msg and "logprob_dtype" in msg and "targets_on" in msg


def test_k_larger_than_vocabulary():
    with pytest.raises(ConfigError, match="k=11 exceeds the vocabulary size 10"):
        CacheSchema(k=11, vocab_size=10)


def test_bad_sequences_are_refused():
    schema = CacheSchema(k=2, vocab_size=10)
    good = dict(
        sample_id=1,
        input_ids=np.array([1, 2]),
        loss_mask=np.ones(2, np.uint8),
        doc_starts=np.zeros(1, np.int32),
        topk_ids=np.zeros((2, 2), np.int64),
        topk_logprobs=np.zeros((2, 2)),
        log_tail=np.zeros(2),
    )
    Block.from_sequences([Sequence(**good)], schema)
    for change, msg in [
        ({"input_ids": np.array([1, 12])}, r"input_ids must lie in \[0, 10\)"),
        ({"topk_ids": np.zeros((1, 2))}, "expected top-k arrays of shape"),
        ({"doc_starts": np.array([1], np.int32)}, "doc_starts must start at 0"),
        ({"loss_mask": np.ones(3, np.uint8)}, "loss_mask has 3 entries"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            Block.from_sequences([Sequence(**{**good, **change})], schema)


def test_identity_of_a_cache_written_before_a_schema_field_existed_still_matches(tmp_path):
    """A manifest without a field added later (proposal_temperature) compares as its default,
    so an older cache still resumes; a real difference is still refused."""
    from kdcache.storage.errors import CacheMismatchError
    from kdcache.storage.manifest import CacheIdentity

    ident = CacheIdentity(
        backend="zarr", schema=CacheSchema(k=4, vocab_size=64), fingerprints={}, settings={}
    )
    old = ident.to_dict()
    del old["schema"]["proposal_temperature"]
    ident.check_matches(old, tmp_path)
    old["schema"]["k"] = 8
    with pytest.raises(CacheMismatchError, match="schema.k: cache has 8, this run has 4"):
        ident.check_matches(old, tmp_path)


def test_a_part_written_before_a_schema_field_existed_finalizes_and_verifies(tmp_path):
    """A capture resumed next to an older part (its part.json lacks proposal_temperature):
    finalize accepts both parts, verify finds nothing wrong, the reader gives the default."""
    import json

    from kdcache.storage.manifest import CacheIdentity, finalize
    from kdcache.storage.reader import CacheReader
    from kdcache.storage.synthetic import synthetic_block
    from kdcache.storage.verify import verify_cache
    from kdcache.storage.writer import PartWriter

    schema = CacheSchema(k=4, vocab_size=64)
    ident = CacheIdentity(backend="zarr", schema=schema, fingerprints={}, settings={}, num_shards=2)
    for shard in (0, 1):
        w = PartWriter.open(tmp_path / "c", ident, shard_index=shard)
        w.add_block(synthetic_block(np.random.default_rng(shard), [5, 7], schema))
        w.commit()
        if shard == 0:  # as an older kdcache wrote it
            rec_path = tmp_path / "c" / "parts" / "part-00000" / "part.json"
            rec = json.loads(rec_path.read_text())
            del rec["schema"]["proposal_temperature"]
            rec_path.write_text(json.dumps(rec))
    finalize(tmp_path / "c")
    assert verify_cache(tmp_path / "c") == []
    assert CacheReader(tmp_path / "c").schema.proposal_temperature == 1.0
