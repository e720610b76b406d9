"""One conformance suite that every backend runs: round trips, resume, crashes, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.storage.errors import (
    CacheMismatchError,
    FormatVersionError,
    IntegrityError,
    MissingPartError,
    NotACacheError,
    NotFinalizedError,
)
from kdcache.storage.manifest import PART_RECORD, PROGRESS, CacheIdentity, finalize
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import Block, CacheSchema, Sequence
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.verify import verify_cache
from kdcache.storage.writer import PartWriter, write_cache

BACKENDS = ["zarr", "arrow"]
# Small shards so that every test crosses shard and chunk boundaries.
SMALL = {"zarr": {"shard_rows": 64, "chunk_rows": 16}, "arrow": {"batch_positions": 50}}


def identity(backend: str, schema: CacheSchema, num_shards: int = 1, **settings_) -> CacheIdentity:
    return CacheIdentity(
        backend=backend,
        schema=schema,
        fingerprints={
            "teacher": {"name": "synthetic"},
            "tokenizer": {"hash": "t"},
            "data": {"hash": "d"},
        },
        settings={"seed": 0, **settings_},
        num_shards=num_shards,
    )


def masked_sequences(
    rng: np.random.Generator, lengths: list[int], schema: CacheSchema
) -> list[Sequence]:
    """Sequences with random loss masks; target rows only on masked-in positions if asked."""
    block = synthetic_block(rng, lengths, schema)
    out = []
    for s in block:
        mask = (rng.random(len(s.input_ids)) < 0.6).astype(np.uint8)
        keep = mask.astype(bool) if schema.targets_on == "mask" else slice(None)
        docs = np.unique(np.concatenate([[0], rng.integers(0, len(s.input_ids), size=2)])).astype(
            np.int32
        )
        out.append(
            Sequence(
                sample_id=int(rng.integers(0, 2**63)),
                input_ids=s.input_ids,
                loss_mask=mask,
                doc_starts=docs,
                topk_ids=s.topk_ids[keep],
                topk_logprobs=s.topk_logprobs[keep],
                log_tail=s.log_tail[keep],
            )
        )
    return out


def assert_same_cache(path: Path, expected: Block) -> None:
    cache = CacheReader(path)
    assert cache.num_sequences == expected.num_sequences
    assert cache.num_positions == expected.num_positions
    got = cache.block(0, cache.num_sequences)
    assert got.equals(expected)


@pytest.mark.parametrize("backend", BACKENDS)
class TestBackendConformance:
    @settings(
        max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        lengths=st.lists(st.integers(1, 90), min_size=0, max_size=12),
        k=st.sampled_from([1, 3, 8]),
        vocab=st.sampled_from([50, 65536, 65537, 200_000]),
        logprob_dtype=st.sampled_from(["float16", "float32"]),
        targets_on=st.sampled_from(["all", "mask"]),
        flushes=st.integers(1, 4),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_round_trip_bit_exact(
        self, tmp_path_factory, backend, lengths, k, vocab, logprob_dtype, targets_on, flushes, seed
    ):
        schema = CacheSchema(
            k=k, vocab_size=vocab, logprob_dtype=logprob_dtype, targets_on=targets_on
        )
        rng = np.random.default_rng(seed)
        seqs = masked_sequences(rng, lengths, schema)
        expected = Block.from_sequences(seqs, schema)
        path = tmp_path_factory.mktemp("rt") / "cache"
        cuts = np.linspace(0, len(seqs), flushes + 1).astype(int)
        blocks = [
            Block.from_sequences(seqs[a:b], schema)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        write_cache(path, identity(backend, schema), blocks, backend_options=SMALL[backend])
        assert_same_cache(path, expected)
        cache = CacheReader(path)
        assert cache.schema.id_dtype == (np.uint16 if vocab <= 65536 else np.uint32)
        for i in rng.permutation(len(seqs))[:4]:  # random single-sequence reads
            s = cache[int(i)]
            for name in (
                "input_ids",
                "loss_mask",
                "doc_starts",
                "topk_ids",
                "topk_logprobs",
                "log_tail",
            ):
                np.testing.assert_array_equal(getattr(s, name), getattr(seqs[i], name))
            assert s.sample_id == seqs[i].sample_id
        assert verify_cache(path) == []

    def test_empty_cache(self, tmp_path, backend):
        schema = CacheSchema(k=4, vocab_size=100)
        write_cache(tmp_path / "c", identity(backend, schema), [])
        cache = CacheReader(tmp_path / "c")
        assert len(cache) == 0 and cache.num_positions == 0
        assert cache.block(0, 10).num_sequences == 0
        assert list(cache) == []

    def test_blocks_and_slices_across_parts(self, tmp_path, backend):
        schema = CacheSchema(k=4, vocab_size=300)
        rng = np.random.default_rng(0)
        full = synthetic_block(rng, rng.integers(1, 40, size=30), schema)
        ident = identity(backend, schema, num_shards=3)
        for shard, (a, b) in enumerate([(0, 10), (10, 11), (11, 30)]):
            w = PartWriter.open(tmp_path, ident, shard_index=shard, backend_options=SMALL[backend])
            w.add_block(full.slice(a, b))
            w.commit()
        finalize(tmp_path)
        cache = CacheReader(tmp_path)
        assert cache.num_parts == 3
        assert cache[5:25].equals(full.slice(5, 25))
        assert cache[-1].sample_id == int(full.sample_id[-1])
        assert Block.concat(list(cache.iter_blocks(7)), schema).equals(full)

    def test_resume_after_flushes_equals_uninterrupted(self, tmp_path, backend):
        schema = CacheSchema(k=5, vocab_size=1000)
        rng = np.random.default_rng(1)
        seqs = list(synthetic_block(rng, [30] * 40, schema))
        ident = identity(backend, schema)
        opts = dict(
            backend_options=SMALL[backend], flush_positions=100
        )  # a flush every 4 sequences
        w = PartWriter.open(tmp_path / "a", ident, **opts)
        for s in seqs[:23]:
            w.add(s)
        del w  # "killed": never committed; some sequences were flushed, the rest lost
        assert not (tmp_path / "a/parts/part-00000" / PART_RECORD).exists()
        with pytest.raises(NotACacheError):
            CacheReader(tmp_path / "a")
        w = PartWriter.open(tmp_path / "a", ident, **opts)
        assert w.resume_sequences == 20
        for s in seqs[w.resume_sequences :]:
            w.add(s)
        rec_a = w.commit()
        finalize(tmp_path / "a")
        rec_b = write_cache(tmp_path / "b", ident, [Block.from_sequences(seqs, schema)], **opts)
        assert_same_cache(tmp_path / "a", Block.from_sequences(seqs, schema))
        assert rec_a["tokens_sha256"] == rec_b["parts"][0]["tokens_sha256"]

    def test_exception_mid_write_leaves_no_committed_part(self, tmp_path, backend):
        schema = CacheSchema(k=2, vocab_size=100)
        seqs = list(synthetic_block(np.random.default_rng(2), [10] * 20, schema))
        w = PartWriter.open(
            tmp_path, identity(backend, schema), flush_positions=30, backend_options=SMALL[backend]
        )
        with pytest.raises(RuntimeError):
            for i, s in enumerate(seqs):
                if i == 13:
                    raise RuntimeError("teacher crashed")
                w.add(s)
        assert not (tmp_path / "parts/part-00000" / PART_RECORD).exists()
        with pytest.raises(NotACacheError, match="not a kdcache cache"):
            CacheReader(tmp_path)
        with pytest.raises(NotACacheError, match="no committed part"):
            finalize(tmp_path)

    def test_sigkill_mid_write_then_resume(self, tmp_path, backend):
        """A writer process killed with SIGKILL leaves no committed part; a rerun completes it."""
        script = textwrap.dedent(
            f"""
            import os, signal, sys, numpy as np
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_conformance import identity, SMALL
            from kdcache.storage.schema import CacheSchema
            from kdcache.storage.synthetic import synthetic_block
            from kdcache.storage.writer import PartWriter
            schema = CacheSchema(k=6, vocab_size=70000)
            seqs = list(synthetic_block(np.random.default_rng(3), [37] * 40, schema))
            w = PartWriter.open(sys.argv[1], identity({backend!r}, schema), flush_positions=100,
                                backend_options=SMALL[{backend!r}])
            kill_at = int(sys.argv[2])
            for i, s in enumerate(seqs[w.resume_sequences:], start=w.resume_sequences):
                if i == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                w.add(s)
            w.commit()
            """
        )
        (tmp_path / "writer.py").write_text(script)
        out = tmp_path / "cache"
        r = subprocess.run([sys.executable, tmp_path / "writer.py", out, "25"], capture_output=True)
        assert r.returncode == -signal.SIGKILL
        assert (out / "parts/part-00000" / PROGRESS).exists()
        assert not (out / "parts/part-00000" / PART_RECORD).exists()
        r = subprocess.run(
            [sys.executable, tmp_path / "writer.py", out, "-1"], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        finalize(out)
        schema = CacheSchema(k=6, vocab_size=70000)
        assert_same_cache(out, synthetic_block(np.random.default_rng(3), [37] * 40, schema))

    def test_plain_library_reads_match(self, tmp_path, backend):
        """A cache read with plain zarr / pyarrow, following docs/FORMAT.md only."""
        schema = CacheSchema(k=4, vocab_size=500)
        rng = np.random.default_rng(4)
        block = synthetic_block(rng, [3, 17, 1, 40], schema)
        write_cache(
            tmp_path,
            identity(backend, schema),
            [block.slice(0, 2), block.slice(2, 4)],
            backend_options=SMALL[backend],
        )
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        part = tmp_path / "parts" / manifest["parts"][0]["name"]
        if backend == "zarr":
            import zarr

            g = zarr.open_group(part, mode="r")
            so, ro = g["seq_offsets"][:], g["row_offsets"][:]
            j = 1  # second sequence
            ids = g["input_ids"][so[j] : so[j + 1]]
            topk = g["topk_ids"][ro[j] : ro[j + 1]]
            lp = g["topk_logprobs"][ro[j] : ro[j + 1]]
            assert g["topk_ids"].metadata.codecs[0].to_dict()["name"] == "sharding_indexed"
        else:
            import pyarrow.dataset as ds

            table = ds.dataset(part, format="ipc", exclude_invalid_files=True).to_table()
            assert table.num_rows == 4
            row = table.slice(1, 1).to_pylist()[0]
            ids = np.array(row["input_ids"])
            topk = np.array(row["topk_ids"])
            lp = np.array(row["topk_logprobs"], dtype=np.float16)
        s = block.sequence(1)
        np.testing.assert_array_equal(ids, s.input_ids)
        np.testing.assert_array_equal(topk, s.topk_ids)
        np.testing.assert_array_equal(lp, s.topk_logprobs)

    def test_refuses_other_settings_and_replace_starts_over(self, tmp_path, backend):
        schema = CacheSchema(k=4, vocab_size=100)
        block = synthetic_block(np.random.default_rng(5), [5, 6], schema)
        write_cache(tmp_path, identity(backend, schema), [block])
        other = identity(backend, CacheSchema(k=8, vocab_size=100))
        with pytest.raises(
            CacheMismatchError, match=r"schema\.k: cache has 4, this run has 8.*--replace"
        ):
            PartWriter.open(tmp_path, other)
        w = PartWriter.open(tmp_path, other, replace=True)
        assert not w.committed and w.resume_sequences == 0
        assert not (tmp_path / "manifest.json").exists()

    def test_same_settings_skip_committed_part(self, tmp_path, backend):
        schema = CacheSchema(k=4, vocab_size=100)
        write_cache(
            tmp_path,
            identity(backend, schema),
            [synthetic_block(np.random.default_rng(5), [5], schema)],
        )
        assert PartWriter.open(tmp_path, identity(backend, schema)).committed

    def test_verify_detects_flipped_byte_and_read_fails(self, tmp_path, backend):
        schema = CacheSchema(k=8, vocab_size=1000)
        block = synthetic_block(np.random.default_rng(6), [100] * 10, schema)
        write_cache(tmp_path, identity(backend, schema), [block], backend_options=SMALL[backend])
        files = sorted(
            p
            for p in (tmp_path / "parts/part-00000").rglob("*")
            if p.is_file() and p.stat().st_size > 200 and p.suffix != ".json"
        )
        target = max(files, key=lambda p: p.stat().st_size)
        data = bytearray(target.read_bytes())
        data[len(data) // 3] ^= 0x5A
        target.write_bytes(bytes(data))
        problems = verify_cache(tmp_path)
        assert any("crc32c" in p for p in problems)
        with pytest.raises(IntegrityError):
            CacheReader(tmp_path).block(0, 10)


def test_newer_format_version_refused(tmp_path):
    schema = CacheSchema(k=2, vocab_size=10)
    write_cache(
        tmp_path, identity("zarr", schema), [synthetic_block(np.random.default_rng(0), [3], schema)]
    )
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="version 99.*reads version 1"):
        CacheReader(tmp_path)


def test_missing_part_and_not_finalized(tmp_path):
    schema = CacheSchema(k=2, vocab_size=10)
    ident = identity("arrow", schema, num_shards=2)
    for shard in (0, 1):
        w = PartWriter.open(tmp_path, ident, shard_index=shard)
        w.add_block(synthetic_block(np.random.default_rng(shard), [3, 4], schema))
        if shard == 0:
            w.commit()
    # Not "run kdcache finalize" (which would refuse): the missing part, and what it is doing.
    with pytest.raises(MissingPartError, match=r"part-00001 \(in progress: host .* pid"):
        CacheReader(tmp_path)
    with pytest.raises(MissingPartError, match=r"part-00001 \(in progress: host"):
        finalize(tmp_path)
    w.release()  # its writer stops (as a killed one would): the part is interrupted
    with pytest.raises(MissingPartError, match=r"part-00001 \(interrupted: rerun shard 1\)"):
        finalize(tmp_path)
    shutil.rmtree(tmp_path / "parts/part-00001")
    with pytest.raises(MissingPartError, match=r"part-00001 \(not started\)"):
        finalize(tmp_path)
    w = PartWriter.open(tmp_path, ident, shard_index=1)
    w.add_block(synthetic_block(np.random.default_rng(1), [3, 4], schema))
    w.commit()
    with pytest.raises(NotFinalizedError, match="kdcache finalize"):
        CacheReader(tmp_path)
    finalize(tmp_path)
    assert CacheReader(tmp_path).num_sequences == 4
    shutil.rmtree(tmp_path / "parts/part-00001")
    with pytest.raises(MissingPartError, match="part-00001 is listed in the manifest but missing"):
        CacheReader(tmp_path)


def test_not_a_cache(tmp_path):
    with pytest.raises(NotACacheError, match="not a kdcache cache"):
        CacheReader(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    schema = CacheSchema(k=2, vocab_size=10)
    with pytest.raises(CacheMismatchError, match="is not a kdcache cache"):
        PartWriter.open(tmp_path, identity("zarr", schema))


def test_torn_part_record_is_not_committed(tmp_path):
    schema = CacheSchema(k=2, vocab_size=10)
    write_cache(
        tmp_path, identity("zarr", schema), [synthetic_block(np.random.default_rng(0), [3], schema)]
    )
    os.remove(tmp_path / "manifest.json")
    rec = tmp_path / "parts/part-00000" / PART_RECORD
    rec.write_bytes(rec.read_bytes()[:40])  # killed while writing the commit record
    with pytest.raises(NotACacheError):
        CacheReader(tmp_path)
