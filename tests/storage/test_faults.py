"""Fault injection: every kind of file of a committed cache deleted, truncated or flipped, on
both backends, and every read path either refuses (a KDCacheError) or returns exactly the
original data. Never other numbers, never another exception."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.stages.train.dataset import CacheBatches
from kdcache.storage.convert import convert_cache
from kdcache.storage.errors import (
    CacheMismatchError,
    ConfigError,
    FormatVersionError,
    IntegrityError,
    KDCacheError,
    PartLockedError,
)
from kdcache.storage.lease import is_lease_file
from kdcache.storage.manifest import CacheIdentity, finalize
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import Block, CacheSchema
from kdcache.storage.stats import cache_stats
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.verify import verify_cache
from kdcache.storage.writer import PartWriter, prepare_output, write_cache

SMALL = {"zarr": {"shard_rows": 64, "chunk_rows": 16}, "arrow": {"batch_positions": 50}}
FLIPS_PER_FILE = {"zarr": 4, "arrow": 24}  # arrow parts have few files: flip them more often


def make_cache(root: Path, backend: str) -> Path:
    """Two parts (a manifest that lists several), k=4, sequences crossing shard boundaries."""
    schema = CacheSchema(k=4, vocab_size=500)
    ident = CacheIdentity(
        backend=backend,
        schema=schema,
        fingerprints={"teacher": {"name": "t"}},
        settings={},
        num_shards=2,
    )
    rng = np.random.default_rng(1)
    for shard, lengths in enumerate(([30, 7, 50, 1, 40], [20, 70, 3])):
        w = PartWriter(root, ident, shard_index=shard, backend_options=SMALL[backend])
        w.add_block(synthetic_block(rng, lengths, schema, first_sample_id=10 * shard))
        w.commit()
    finalize(root)
    return root


def read_paths(root: Path) -> dict[str, object]:
    """What each read path returns, as comparable values (numpy arrays, tensors, JSON)."""
    out: dict[str, object] = {}
    cache = CacheReader(root)
    out["counts"] = (cache.num_sequences, cache.num_positions, cache.num_rows, cache.k)
    whole = cache.block(0, cache.num_sequences)
    out["block"] = {n: getattr(whole, n) for n in ("input_ids", "topk_ids", "topk_logprobs")} | {
        "log_tail": whole.log_tail,
        "seq_offsets": whole.seq_offsets,
        "sample_id": whole.sample_id,
        "doc_starts": whole.doc_starts,
    }
    out["sequences"] = [
        np.concatenate([s.input_ids, s.topk_ids.ravel()]) for s in CacheReader(root)
    ]
    out["blocks"] = [b.topk_logprobs for b in CacheReader(root).iter_blocks(2)]
    out["batches"] = [
        (b.input_ids, b.topk_logprobs, b.log_tail)
        for b in CacheBatches(root, batch_size=2, shuffle=False)
    ]
    stats = cache_stats(root, workers=1)
    out["stats"] = json.dumps(stats, sort_keys=True, default=str)
    out["arrow"] = CacheReader(root).to_arrow().read_all().to_pydict()
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return a == b


def damages(root: Path, backend: str, rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """(file relative to root, how, where) for every file of the cache: deleted, truncated to
    half and by one byte, and bits flipped at its first and last byte and elsewhere (the last
    bytes of a zarr shard are its index)."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    out = []
    for rel in files:
        size = (root / rel).stat().st_size
        out += [(rel, "delete", 0), (rel, "truncate", size // 2), (rel, "truncate", size - 1)]
        flips = {0, size - 1} | {int(x) for x in rng.integers(0, size, FLIPS_PER_FILE[backend])}
        out += [(rel, "flip", pos) for pos in sorted(flips)]
    return out


def damage(root: Path, rel: str, how: str, where: int, rng: np.random.Generator) -> None:
    path = root / rel
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:where])
    else:
        data = bytearray(path.read_bytes())
        data[where] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_every_damaged_file_is_refused_or_reads_the_original_data(tmp_path, backend):
    clean = make_cache(tmp_path / "clean", backend)
    original = read_paths(clean)
    rng = np.random.default_rng(12)
    cases = damages(clean, backend, rng)
    kinds = {Path(rel).name for rel, _, _ in cases}
    assert {
        "part.json",
        "manifest.json",
        "zarr.json" if backend == "zarr" else "part.json",
    } <= kinds
    refused = identical = 0
    wrong = []
    for i, (rel, how, where) in enumerate(cases):
        work = tmp_path / f"case{i}"
        shutil.copytree(clean, work)
        damage(work, rel, how, where, rng)
        try:
            got = read_paths(work)
        except KDCacheError:
            refused += 1
        except Exception as e:  # anything else is a defect: a traceback, not one line
            wrong.append(f"{rel} {how}@{where}: {type(e).__name__}: {e}")
        else:
            if same(got, original):
                identical += 1
            else:
                diff = [k for k in original if not same(got[k], original[k])]
                wrong.append(f"{rel} {how}@{where}: read other data ({diff})")
        if not rel.endswith(".json") and not verify_cache(work):
            wrong.append(f"{rel} {how}@{where}: verify found nothing")
        shutil.rmtree(work)
    print(f"{backend}: {len(cases)} cases, {refused} refused, {identical} identical")
    assert not wrong, "\n".join(wrong[:20])
    assert refused + identical == len(cases) and refused > 0.8 * len(cases)


# -- each defect on its own -----------------------------------------------------------------
def kdcache(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["kdcache", *map(str, args)], capture_output=True, text=True)


def one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit ``code`` with exactly one ``kdcache: error:`` line naming every needle."""
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("kdcache: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_deleted_zarr_shard_stops_training_instead_of_reading_zeros(tmp_path):
    root = make_cache(tmp_path / "c", "zarr")
    (root / "parts/part-00000/topk_logprobs/c/0/0").unlink()
    with pytest.raises(IntegrityError, match="topk_logprobs/c/0/0: missing"):
        CacheReader(root).block(0, 2)
    r = kdcache(
        *"train --steps 3 --no-progress --loss forward_kl".split(),
        "--cache",
        root,
        "--student",
        "nano",
        "--out",
        tmp_path / "run",
    )
    one_line(r, 1, "topk_logprobs/c/0/0: missing")
    steps = tmp_path / "run" / "steps.tsv"
    assert not steps.exists() or len(steps.read_text().splitlines()) <= 1  # no step on zeros


def test_a_reader_stops_when_its_cache_is_replaced_under_it(tmp_path):
    root = make_cache(tmp_path / "c", "zarr")
    reader = CacheReader(root)
    first = reader.block(0, 2)
    other = CacheIdentity(
        backend="zarr", schema=CacheSchema(k=2, vocab_size=500), fingerprints={}, settings={}
    )
    prepare_output(root, other, replace=True)
    assert not (root / "parts/part-00000").exists() and not (root / "manifest.json").exists()
    with pytest.raises(IntegrityError, match="missing, but part.json records it"):
        reader.block(0, 2)
    make_cache(root, "zarr")  # a new cache of the same shape at the same place
    with pytest.raises(IntegrityError, match="changed while this reader had the part open"):
        reader.block(0, 2)
    assert CacheReader(root).block(0, 2).equals(first)  # a fresh reader reads the new one


def test_replace_refuses_a_live_writer_and_deletes_nothing(tmp_path):
    root = make_cache(tmp_path / "c", "zarr")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    lease = {
        "owner": {"host": "gpu-node-3", "pid": 77, "id": "a" * 32},
        "expires_at": time.time() + 60,
    }
    (root / "parts/part-00001/.lease-000001.json").write_text(json.dumps(lease))
    other = CacheIdentity(
        backend="zarr", schema=CacheSchema(k=2, vocab_size=500), fingerprints={}, settings={}
    )
    with pytest.raises(PartLockedError, match="host gpu-node-3 pid 77"):
        prepare_output(root, other, replace=True)
    after = sorted(p.relative_to(root) for p in root.rglob("*") if not is_lease_file(p.name))
    assert after == before and verify_cache(root) == []
    (root / "parts/part-00001/.lease-000001.json").unlink()
    prepare_output(root, other, replace=True)
    assert not (root / "parts").exists() or not any((root / "parts").iterdir())


@pytest.mark.parametrize("name", [".DS_Store", ".manifest.json.4242.tmp", ".gitignore"])
def test_dot_files_in_the_cache_folder_never_block_a_rerun(tmp_path, name):
    root = make_cache(tmp_path / "c", "zarr")
    (root / name).write_text("x")
    ident = CacheIdentity(
        **{
            k: CacheReader(root).manifest[k]
            for k in ("backend", "fingerprints", "settings", "num_shards")
        },
        schema=CacheReader(root).schema,
    )
    prepare_output(root, ident, replace=False)  # the same cache: nothing to refuse
    (root / "notes.txt").write_text("x")
    with pytest.raises(CacheMismatchError, match=r"not a kdcache cache \(found \['notes.txt'\]\)"):
        prepare_output(root, ident, replace=False)


def test_convert_onto_its_source_or_inside_it_is_refused_before_anything_is_touched(tmp_path):
    root = make_cache(tmp_path / "c", "zarr")
    before = CacheReader(root).block(0, 8)
    for out in (root, root / "sub", root / "parts"):
        r = kdcache("convert", root, out, "--backend", "arrow", "--replace")
        one_line(r, 2, "expected an output outside the source cache")
    assert verify_cache(root) == [] and CacheReader(root).block(0, 8).equals(before)
    with pytest.raises(ConfigError, match="nested"):
        convert_cache(tmp_path, root / "x", "arrow")  # a source that contains the output


def test_verify_flags_rows_that_are_not_distributions(tmp_path):
    """A part whose data no longer means what its records say (all log-probs 0, as a convert
    of a deleted source once wrote) is damage, even with matching checksums and hashes."""
    schema = CacheSchema(k=4, vocab_size=500)
    block = synthetic_block(np.random.default_rng(0), [20, 30], schema)
    block.topk_logprobs[:] = 0
    write_cache(tmp_path / "z", CacheIdentity("zarr", schema, {}, {}), [block])
    problems = verify_cache(tmp_path / "z")
    assert any("probabilities that sum to 4." in p for p in problems), problems
    assert kdcache("verify", tmp_path / "z").returncode == 1


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_part_of_a_newer_format_version_is_refused_by_every_reader(tmp_path, backend):
    root = make_cache(tmp_path / "c", backend)
    record = root / "parts/part-00001/part.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "format_version": 99}))
    for read in (
        lambda: CacheReader(root),
        lambda: CacheBatches(root, batch_size=2),
        lambda: cache_stats(root),
    ):
        with pytest.raises(FormatVersionError, match="format version 99"):
            read()
    one_line(kdcache("inspect", root), 2, "format version 99")


@pytest.mark.parametrize(
    "backend, key, change",
    [
        ("zarr", "totals.sequences", 5),
        ("zarr", "totals.positions", 5),
        ("arrow", "schema.k", -2),  # k halved: a traceback in train before
        ("arrow", "parts.0.counts.rows", 1),
        ("zarr", "num_shards", 1),
    ],
)
def test_the_manifest_is_checked_against_the_part_records(tmp_path, backend, key, change):
    root = make_cache(tmp_path / "c", backend)
    m = json.loads((root / "manifest.json").read_text())
    d = m
    *head, last = key.split(".")
    for h in head:
        d = d[int(h)] if h.isdigit() else d[h]
    d[last] += change
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="the manifest does not match the parts"):
        CacheReader(root)
    one_line(kdcache("inspect", root), 1, "does not match")
    r = kdcache(
        "train", "--cache", root, "--student", "nano", "--out", tmp_path / "r", "--steps", 1
    )
    one_line(r, 1, "does not match")


def test_leftover_leases_and_zarr_temp_files_never_stay_in_a_committed_part(tmp_path):
    schema = CacheSchema(k=4, vocab_size=500)
    ident = CacheIdentity("zarr", schema, {}, {})
    rng = np.random.default_rng(0)
    w = PartWriter(tmp_path / "c", ident, backend_options=SMALL["zarr"])
    w.add_block(synthetic_block(rng, [30, 40], schema))
    part = tmp_path / "c/parts/part-00000"
    (part / "input_ids/c/0.1234abcd.partial").write_bytes(b"half a shard")  # a killed write
    w._writer.close()
    w.release()
    w = PartWriter(tmp_path / "c", ident, backend_options=SMALL["zarr"])  # resume
    assert w.resume_sequences == 2
    w.commit()
    record = json.loads((part / "part.json").read_text())
    assert not [f for f in record["files"] if f.endswith(".partial")]
    assert not list(part.rglob("*.partial"))
    # A writer killed between its commit and its release leaves its lease: removed on the
    # next look at the part.
    (part / ".lease-000003.json").write_text("{}")
    assert PartWriter(tmp_path / "c", ident).committed
    assert not [p for p in part.iterdir() if is_lease_file(p.name)]


def test_resume_over_damaged_durable_data_starts_the_part_over(tmp_path, caplog):
    """A progress record whose data is gone (a shard deleted, the group removed) is not
    resumed onto zeros and not a GroupNotFoundError traceback: the part starts over."""
    schema = CacheSchema(k=4, vocab_size=500)
    ident = CacheIdentity("zarr", schema, {}, {})
    rng = np.random.default_rng(0)
    blocks = [synthetic_block(rng, [30, 40], schema), synthetic_block(rng, [50], schema)]
    for damage_it in (
        lambda part: (part / "topk_ids/c/0/0").unlink(),
        lambda part: (part / "zarr.json").unlink(),
    ):
        root = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        w = PartWriter(root, ident, backend_options=SMALL["zarr"])
        w.add_block(blocks[0])
        w.release()
        damage_it(root / "parts/part-00000")
        w = PartWriter(root, ident, backend_options=SMALL["zarr"])
        assert w.resume_sequences == 0 and "starting the part over" in caplog.text
        for b in blocks:
            w.add_block(b)
        w.commit()
        finalize(root)
        assert CacheReader(root).block(0, 3).equals(Block.concat(blocks, schema))


def test_an_empty_part_is_a_part(tmp_path):
    """A shard that gets no document commits an empty part; every command accepts it."""
    schema = CacheSchema(k=4, vocab_size=500)
    for backend in ("zarr", "arrow"):
        ident = CacheIdentity(backend, schema, {"teacher": {"name": "t"}}, {}, num_shards=2)
        root = tmp_path / backend
        w = PartWriter(root, ident, shard_index=0, backend_options=SMALL[backend])
        w.add_block(synthetic_block(np.random.default_rng(0), [30, 40, 20], schema))
        w.commit()
        PartWriter(root, ident, shard_index=1, backend_options=SMALL[backend]).commit()
        assert kdcache("finalize", root).returncode == 0
        assert kdcache("verify", root).returncode == 0
        assert re.search(r"^sequences +3$", kdcache("inspect", root).stdout, re.M)
        assert json.loads(kdcache("stats", root, "--json").stdout)["target_rows"] == 90
        assert CacheReader(root).block(0, 3).num_sequences == 3


def test_duckdb_reads_the_default_cache(tmp_path):
    """float16 log-probs (the default) through to_arrow(), and the plain-pyarrow recipe of
    docs/FORMAT.md for Arrow files, with the real duckdb package."""
    import duckdb

    for backend in ("zarr", "arrow"):
        root = make_cache(tmp_path / backend, backend)
        cache = CacheReader(root)
        batches = cache.to_arrow()  # noqa: F841 - duckdb finds it by name
        ((n, positions, first),) = duckdb.sql(
            "SELECT count(*), sum(len(input_ids)), min(topk_logprobs[1][1]) FROM batches"
        ).fetchall()
        whole = cache.block(0, cache.num_sequences)
        assert (n, positions) == (cache.num_sequences, cache.num_positions)
        firsts = whole.topk_logprobs[whole.row_offsets[:-1], 0]  # each sequence's first row
        assert first == pytest.approx(float(firsts.min()))
    text = (Path(__file__).resolve().parents[2] / "docs/FORMAT.md").read_text()
    recipe = text.split("so hand it a reader that casts each batch to float32:")[1]
    recipe = recipe.split("```python")[1].split("```")[0].replace("CACHE", str(tmp_path / "arrow"))
    env: dict = {}
    exec(recipe.replace("duckdb.sql(", "result = duckdb.sql("), env)
    assert env["result"].fetchall() == [(8, 221)]


def test_a_part_that_does_not_match_its_source_is_not_committed(tmp_path):
    """convert's last guard: the written part must hash to its source part's tokens_sha256."""
    schema = CacheSchema(k=4, vocab_size=500)
    w = PartWriter(tmp_path / "c", CacheIdentity("zarr", schema, {}, {}))
    w.add_block(synthetic_block(np.random.default_rng(0), [20, 30], schema))
    expect = {"counts": dict(w.counts), "tokens_sha256": "0" * 64}
    with pytest.raises(IntegrityError, match="tokens_sha256 differ from the source's"):
        w.commit(expect=expect)
    assert not (tmp_path / "c/parts/part-00000/part.json").exists()
