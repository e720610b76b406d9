"""Data sources of stage one (teacher -> cache): read documents, fingerprint them, tokenize them.

``--data`` is a file or a folder. Each file is read according to its type:

- ``.jsonl`` / ``.json``: one JSON object per line (or one JSON array of objects) holding a text
  field (``text``, or ``text_field``), a ``messages`` list of ``{"role", "content"}`` dicts (chat)
  or a list of token ids (``ids_field``, or ``input_ids`` / ``token_ids``);
- ``.parquet``: the same choice of column, read in record batches with pyarrow;
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (it holds ``dataset_info.json``
  or ``state.json``): the same choice of column, loaded lazily with ``datasets.load_from_disk``;
- anything else: a UTF-8 text file, one document per file.

A folder is walked recursively, hidden files and folders skipped, in sorted relative-path order,
so the same data always gives the same documents in the same order. ``source_fingerprint`` hashes
exactly the files that ``iter_documents`` reads, before any tokenizer or teacher work.

Tokenization has one BOS/EOS policy (see ``tokenize``). The chat template is part of the
tokenizer fingerprint (``TokenizerInfo.fingerprint``), so rendering chats needs no extra key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.stages.models.tokenizer import TokenizerInfo
from kdcache.storage.errors import ConfigError

_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_AUTO_IDS = ("input_ids", "token_ids")
_PROBE = "\u2063kdcache-probe\u2063"  # stands in for an assistant content; never in real data
_BATCH_ROWS = 1024  # rows per Parquet / datasets batch: bounds memory, not a tuning knob


@dataclass(frozen=True)
class Document:
    source: str  # file path relative to the data root (POSIX), or the dataset folder's name
    index: int  # 0-based index of the document within its source
    text: str | None = None
    token_ids: np.ndarray | None = None  # (T,) int64, already tokenized
    messages: list[dict] | None = None  # chat: [{"role": ..., "content": ...}, ...]


@dataclass
class TokenizedDoc:
    ids: np.ndarray  # (T,) int64
    target_mask: np.ndarray  # (T,) uint8: 1 where row t (which predicts token t+1) is trained on


# ----------------------------------------------------------------------------- finding sources


def _is_hf_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in _HF_MARKERS)


def _kind(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(
        path.suffix.lower(), "text"
    )


def _sources(data: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """The data root and its sources as sorted (relative POSIX path, path) pairs."""
    data = Path(data)
    if not data.exists():
        raise ConfigError(
            f"expected --data to be a file or a folder, found nothing at {data}; check the path"
        )
    if data.is_file() or _is_hf_dataset(data):
        return data.parent, [(data.name, data)]
    found = []
    for dirpath, dirnames, filenames in os.walk(data):  # does not follow symlinked folders
        here = Path(dirpath)
        rel_dir = here.relative_to(data).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        if here != data and _is_hf_dataset(here):
            found.append((rel_dir, here))  # one source: do not read its files one by one
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [(prefix + f, here / f) for f in filenames if not f.startswith(".")]
    if not found:
        raise ConfigError(f"expected files under --data {data}, found none; check the path")
    return data, sorted(found)


def _files_read(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())  # a datasets folder: every file


def source_fingerprint(data: Path) -> dict[str, Any]:
    """Name, file count, byte count and sha256 of every file ``iter_documents`` would read.

    The sha256 runs over (relative path, sha256 of content) pairs in order, so renaming, adding,
    removing or editing one byte of any file changes it. Contents are hashed, not validated.
    """
    root, sources = _sources(data)
    total = hashlib.sha256()
    n_files = n_bytes = 0
    for _, path in sources:
        for file in _files_read(path):
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    n_bytes += len(chunk)
            total.update(f"{file.relative_to(root).as_posix()}\0{digest.hexdigest()}\n".encode())
            n_files += 1
    return {
        "root": Path(data).name,
        "files": n_files,
        "bytes": n_bytes,
        "sha256": total.hexdigest(),
    }


# ----------------------------------------------------------------------------- reading sources


def iter_documents(
    data: Path, *, text_field: str | None = None, ids_field: str | None = None
) -> Iterator[Document]:
    """Yield every document under ``data`` in a deterministic order (sorted relative paths).

    A record (JSON line, Parquet row, dataset row) becomes: token ids from ``ids_field`` if given;
    else text from ``text_field`` if given; else the first of ``text`` (text), ``messages``
    (chat), ``input_ids`` / ``token_ids`` (token ids) that it holds.
    """
    if text_field is not None and ids_field is not None:
        raise ConfigError(
            f"expected --text-field or --ids-field, found both ({text_field!r}, {ids_field!r}); "
            "pass only the one that holds the documents"
        )
    root, sources = _sources(data)
    readers = {
        "text": _read_text,
        "json": _read_json,
        "parquet": _read_parquet,
        "datasets": _read_datasets,
    }
    for rel, path in sources:
        yield from readers[_kind(path)](path, rel, text_field, ids_field)


def _not_text(rel: str) -> ConfigError:
    return ConfigError(
        f"expected UTF-8 text, but {rel} is not a UTF-8 text file (binary?); "
        "remove it from --data or point --data at the text files"
    )


def _read_head(path: Path, rel: str) -> bytes:
    """The first 8 KiB; a NUL byte there means binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise ConfigError(
            f"expected a readable file, cannot read {rel} ({e.strerror}); "
            "fix its permissions or remove it from --data"
        ) from None
    if b"\0" in head:
        raise _not_text(rel)
    return head


def _read_text(path: Path, rel: str, text_field, ids_field) -> Iterator[Document]:
    _read_head(path, rel)
    try:
        yield Document(rel, 0, text=path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise _not_text(rel) from None


def _read_json(path: Path, rel: str, text_field, ids_field) -> Iterator[Document]:
    if _read_head(path, rel).lstrip()[:1] == b"[":  # one JSON array of records, not JSON lines
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise _not_text(rel) from None
        except ValueError as e:
            raise ConfigError(
                f"{rel}: expected a JSON array of objects, found invalid JSON ({e}); fix the file"
            ) from None
        for i, record in enumerate(records):
            yield _from_record(record, rel, i, f"{rel} item {i}", text_field, ids_field)
        return
    index = 0
    with open(path, "rb") as f:  # streamed: a JSON-lines file may be larger than memory
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{rel} line {line_no}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise _not_text(where) from None
            except ValueError as e:
                raise ConfigError(
                    f"{where}: expected one JSON object per line, found invalid JSON ({e}); "
                    "fix or remove the line"
                ) from None
            yield _from_record(record, rel, index, where, text_field, ids_field)
            index += 1


def _pick_field(where: str, names, strings: list[str], text_field, ids_field) -> tuple[str, str]:
    """(kind, field) holding the documents of a record or table with these field names."""
    if ids_field is not None or text_field is not None:
        kind, name = ("ids", ids_field) if ids_field is not None else ("text", text_field)
        if name in names:
            return kind, name
        raise ConfigError(
            f"{where}: expected a {name!r} field (--{kind}-field); found fields "
            f"{sorted(names)}; check the field name"
        )
    for kind, name in [("text", "text"), ("chat", "messages")] + [("ids", n) for n in _AUTO_IDS]:
        if name in names:
            return kind, name
    hint = f"pass --text-field {strings[0]}" if strings else "pass --text-field or --ids-field"
    raise ConfigError(
        f"{where}: expected a 'text' field (or --text-field) or a 'messages' list; "
        f"found fields {sorted(names)}; {hint}"
    )


def _from_record(record, rel, index, where, text_field, ids_field) -> Document:
    if not isinstance(record, dict):
        raise ConfigError(
            f"{where}: expected a JSON object, found {type(record).__name__}; "
            'write one object per document, e.g. {"text": "..."}'
        )
    strings = [k for k, v in record.items() if isinstance(v, str)]
    kind, name = _pick_field(where, record, strings, text_field, ids_field)
    return _make_document(kind, name, record[name], rel, index, where)


def _make_document(kind: str, name: str, value, rel, index, where) -> Document:
    if kind == "text":
        if not isinstance(value, str):
            raise ConfigError(
                f"{where}: expected field {name!r} to be a string, found "
                f"{type(value).__name__}; pick the text field with --text-field"
            )
        return Document(rel, index, text=value)
    if kind == "chat":
        if not isinstance(value, list) or not all(
            isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
            for m in value
        ):
            raise ConfigError(
                f"{where}: expected 'messages' to be a list of {{'role': str, 'content': str}}, "
                f"found {str(value)[:80]}; fix the record"
            )
        return Document(rel, index, messages=[dict(m) for m in value])
    try:
        ids = np.asarray(value) if isinstance(value, list | np.ndarray) else None
    except ValueError:  # ragged nested lists
        ids = None
    if ids is None or ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError(
            f"{where}: expected field {name!r} to be a list of token ids, found "
            f"{str(value)[:80]}; pick the ids field with --ids-field"
        )
    return Document(rel, index, token_ids=ids.astype(np.int64))


def _read_table(columns, text_columns, batches, rel, text_field, ids_field) -> Iterator[Document]:
    """Documents from a table, given its columns, its string columns, and ``batches(column)``
    that yields lists of that column's values."""
    kind, name = _pick_field(rel, columns, text_columns, text_field, ids_field)
    index = 0
    for batch in batches(name):
        for value in batch:
            yield _make_document(kind, name, value, rel, index, f"{rel} row {index}")
            index += 1


def _read_parquet(path: Path, rel: str, text_field, ids_field) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(
            f"expected a Parquet file, but {rel} is not readable as one ({e}); fix or remove it"
        ) from e

    def batches(name):
        for batch in table.iter_batches(batch_size=_BATCH_ROWS, columns=[name]):
            yield batch.column(0).to_pylist()

    schema = table.schema_arrow
    strings = [
        f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    yield from _read_table(schema.names, strings, batches, rel, text_field, ids_field)


def _read_datasets(path: Path, rel: str, text_field, ids_field) -> Iterator[Document]:
    try:
        from datasets import Dataset, load_from_disk
    except ImportError:
        raise ConfigError(
            f"{rel} is a Hugging Face datasets folder, but the datasets library is not "
            "installed; install kdcache[datasets] (pip install 'kdcache[datasets]')"
        ) from None
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, Dataset):  # a DatasetDict: several splits
        raise ConfigError(
            f"expected one dataset split at {rel}, found splits {sorted(dataset)}; "
            f"point --data at one split folder, e.g. {rel}/{next(iter(sorted(dataset)), 'train')}"
        )

    def batches(name):
        for batch in dataset.select_columns([name]).iter(batch_size=_BATCH_ROWS):
            yield batch[name]

    strings = [k for k, v in dataset.features.items() if getattr(v, "dtype", None) == "string"]
    yield from _read_table(dataset.column_names, strings, batches, rel, text_field, ids_field)


# ----------------------------------------------------------------------------- tokenization


def tokenize(
    doc: Document,
    tok: TokenizerInfo,
    *,
    add_bos: bool | None = None,
    add_eos: bool = True,
    assistant_only: bool = False,
) -> TokenizedDoc:
    """Token ids and target mask of one document.

    Text and rendered chats are encoded with ``add_special_tokens=False``, so the tokenizer's own
    post-processor adds nothing and this is the only BOS/EOS policy: prepend ``tok.bos_id`` when
    ``add_bos`` (default ``tok.add_bos``) unless the ids already start with it (a chat template
    that writes ``bos_token``); append ``tok.eos_id`` when ``add_eos`` unless already last.
    Pre-tokenized documents are taken as they are, with the same BOS/EOS rule.

    ``target_mask`` is all ones, except with ``assistant_only=True`` (chat only): then row t is 1
    only when its label, token t+1, lies in an assistant message's content or the end-of-turn
    text the template writes right after it. Which rows are context-only at window boundaries
    is left to the windowing code.
    """
    add_bos = tok.add_bos if add_bos is None else add_bos
    for wanted, token_id, name in ((add_bos, tok.bos_id, "bos"), (add_eos, tok.eos_id, "eos")):
        if wanted and token_id is None:
            raise ConfigError(
                f"expected the tokenizer to have a {name.upper()} token for add_{name}=True, "
                f"found none; set {name}_token in tokenizer_config.json or pass add_{name}=False"
            )
    if assistant_only and doc.messages is None:
        raise ConfigError(
            f"expected chat data (a 'messages' list) for assistant_only, found a plain document "
            f"({doc.source} #{doc.index}); turn assistant_only off for text data"
        )

    in_span = None  # (T,) bool: token j lies in an assistant span (assistant_only only)
    if doc.token_ids is not None:
        ids = np.asarray(doc.token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
            raise ConfigError(
                f"expected token ids in [0, {tok.vocab_size}) for {doc.source} #{doc.index}, "
                f"found {ids.min()}..{ids.max()}; the ids were made with another tokenizer"
            )
    else:
        text = doc.text if doc.messages is None else render_chat(doc.messages, tok)
        encoding = tok.tokenizer.encode(text or "", add_special_tokens=False)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if assistant_only:
            in_span = _tokens_in_spans(encoding.offsets, _assistant_spans(doc.messages, tok))

    if add_bos and (len(ids) == 0 or ids[0] != tok.bos_id):
        ids = np.concatenate([[tok.bos_id], ids]).astype(np.int64)
        in_span = None if in_span is None else np.concatenate([[False], in_span])
    if add_eos and (len(ids) == 0 or ids[-1] != tok.eos_id):
        ids = np.concatenate([ids, [tok.eos_id]]).astype(np.int64)
        in_span = None if in_span is None else np.concatenate([in_span, [False]])
    mask = np.ones(len(ids), dtype=np.uint8)
    if in_span is not None:
        mask[:] = 0
        mask[:-1] = in_span[1:]  # row t predicts token t+1
    return TokenizedDoc(ids=ids, target_mask=mask)


def render_chat(messages: list[dict], tok: TokenizerInfo) -> str:
    """The conversation rendered by the tokenizer's chat template, no generation prompt."""
    if tok.chat_template is None:
        raise ConfigError(
            "tokenizer has no chat template; chat data needs one: add chat_template to "
            "tokenizer_config.json"
        )
    try:
        return _compile(tok.chat_template).render(
            messages=messages,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            add_generation_prompt=False,
        )
    except ConfigError:
        raise
    except Exception as e:  # a template bug or a conversation the template refuses
        raise ConfigError(
            f"the chat template failed on a conversation ({type(e).__name__}: {e}); "
            "fix the conversation or the template"
        ) from e


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    # Like transformers: sandboxed, trim_blocks/lstrip_blocks, loopcontrols, raise_exception,
    # tojson without HTML escaping, and {% generation %} blocks rendered as plain content.
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise ConfigError(f"the chat template refused a conversation: {message}; fix the data")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"expected a valid Jinja chat template, found a syntax error at line {e.lineno} "
            f"({e.message}); fix chat_template in tokenizer_config.json"
        ) from e


def _assistant_spans(messages: list[dict], tok: TokenizerInfo) -> list[tuple[int, int]]:
    """Character spans of assistant contents (+ their end-of-turn text) in ``render_chat``.

    When the template is prefix-stable (turn i renders the same whatever follows), rendering
    messages[:i] and messages[:i+1] brackets turn i, and rendering turn i with a probe string
    for its content tells where the content starts (after the role header): the span runs from
    there to the end of the turn, trailing whitespace excluded. Otherwise (e.g. a template that
    drops earlier reasoning) the content is searched for in the full rendering, left to right,
    and the span is the content alone. Content must be rendered verbatim (or stripped).
    """
    full = render_chat(messages, tok)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        before, upto = render_chat(messages[:i], tok), render_chat(messages[: i + 1], tok)
        at = -1  # where the content starts, when the template is prefix-stable
        if upto.startswith(before) and full.startswith(upto):
            probe = render_chat([*messages[:i], {**message, "content": _PROBE}], tok)
            at = probe.find(_PROBE, len(before))
        for text in (content, content.strip()):  # templates often write content | trim
            start = at if at >= 0 and full.startswith(text, at) else full.find(text, cursor)
            if start >= 0:
                break
        else:
            raise ConfigError(
                f"expected the chat template to write assistant message {i}'s content verbatim, "
                "found it missing from the rendering; use assistant_only=False with this template"
            )
        end = start + len(text)
        if start == at:
            end = max(end, len(upto.rstrip()))
        spans.append((start, end))
        cursor = end
    return spans


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """(T,) bool: token j's characters overlap one of the spans."""
    chars = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2) [start, end) per token
    inside = np.zeros(len(chars), dtype=bool)
    for start, end in spans:
        inside |= (chars[:, 0] < end) & (chars[:, 1] > start)
    return inside
