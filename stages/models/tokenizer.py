"""kdcache's built-in tokenizer, tokenizer loading and tokenizer fingerprints.

A cache is only valid for the exact tokenizer that produced its token ids, so every tokenizer
carries a fingerprint: a sha256 over the canonical JSON of its full definition (vocab, merges,
normalizer, pre-tokenizer, added/special tokens, ...) plus the settings that live outside
``tokenizer.json``: chat template and BOS/EOS.

On disk a tokenizer is a Hugging Face tokenizer folder: ``tokenizer.json`` and, optionally,
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``add_bos_token``, ``chat_template``) and
``chat_template.jinja``. ``save_tokenizer`` writes a folder that ``load_tokenizer`` and
``transformers.AutoTokenizer`` both read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdcache.storage.durable import write_durable
from kdcache.storage.errors import ConfigError

ENDOFTEXT = "<|endoftext|>"  # the built-in tokenizer's only special token: id 0, BOS and EOS

# Runtime encode options, not part of the definition: kdcache windows sequences itself, so
# load_tokenizer switches them off and the fingerprint leaves them out. "version" is the
# serialization format of tokenizer.json, not of the tokenizer.
_NOT_DEFINITION = ("version", "truncation", "padding")


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer and what kdcache needs to know about it."""

    tokenizer: Tokenizer
    path: str | None  # folder or file it was loaded from; None for an in-memory tokenizer
    vocab_size: int  # including added tokens
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # documents start with BOS: encode with add_special_tokens=False, prepend bos_id
    chat_template: str | None
    fingerprint: str  # sha256 hex, see tokenizer_fingerprint

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokenizer.id_to_token(self.eos_id)


def train_builtin_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) with ``<|endoftext|>`` as id 0.

    Byte-level: every string encodes (no unknown token) and decodes back exactly.
    Deterministic: the same texts give the same ``to_str()``.
    """
    n_alphabet = len(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols
    if not isinstance(vocab_size, int) or vocab_size <= n_alphabet:
        raise ConfigError(
            f"vocab_size must be an integer above {n_alphabet} (the 256 byte symbols + "
            f"<|endoftext|>), got {vocab_size!r}; use e.g. 4096"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _canonical_definition(tokenizer_json_str: str) -> dict[str, Any]:
    definition = json.loads(tokenizer_json_str)
    for key in _NOT_DEFINITION:
        definition.pop(key, None)
    model = definition.get("model") or {}
    if isinstance(model.get("merges"), list):
        # tokenizers < 0.20 writes merges as "a b", later versions as ["a", "b"]: same merges.
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    return definition


def tokenizer_fingerprint(tokenizer_json_str: str, extra: dict[str, Any]) -> str:
    """sha256 hex of the full tokenizer definition plus ``extra`` (chat template, BOS/EOS...)."""
    try:
        blob = json.dumps(
            {"tokenizer": _canonical_definition(tokenizer_json_str), "extra": extra},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"cannot fingerprint the tokenizer: {e}; pass tokenizer.json text and a dict of "
            "JSON values as extra"
        ) from e
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def make_tokenizer_info(
    tokenizer: Tokenizer,
    *,
    path: str | os.PathLike | None = None,
    bos_token: str | None = ENDOFTEXT,
    eos_token: str | None = ENDOFTEXT,
    add_bos: bool = True,
    chat_template: str | list | None = None,
) -> TokenizerInfo:
    """Describe ``tokenizer`` (defaults: the built-in tokenizer's settings) and fingerprint it."""
    ids = {}
    for role, token in (("bos_token", bos_token), ("eos_token", eos_token)):
        ids[role] = None if token is None else tokenizer.token_to_id(token)
        if token is not None and ids[role] is None:
            raise ConfigError(
                f"{role} {token!r} is not in the tokenizer's vocabulary"
                f"{f' ({path})' if path else ''}; fix {role} in tokenizer_config.json"
            )
    extra = {
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_bos_token": add_bos,
        "chat_template": chat_template,
    }
    return TokenizerInfo(
        tokenizer=tokenizer,
        path=None if path is None else str(path),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        add_bos=add_bos,
        chat_template=_pick_template(chat_template),
        fingerprint=tokenizer_fingerprint(tokenizer.to_str(), extra),
    )


def _pick_template(chat_template: str | list | None) -> str | None:
    # tokenizer_config.json may hold several named templates: [{"name": ..., "template": ...}].
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        return named.get("default", next(iter(named.values()), None))
    return chat_template


def _token_content(value: Any) -> str | None:
    # "<s>" or an AddedToken dict {"content": "<s>", "lstrip": false, ...}
    return value.get("content") if isinstance(value, dict) else value


def _post_processor_adds(tokenizer: Tokenizer, token: str) -> bool:
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    special = tokenizer.encode("a").ids
    return len(special) > len(plain) and special[0] == tokenizer.token_to_id(token)


def load_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    """Load a ``tokenizer.json`` file or a Hugging Face tokenizer folder that holds one."""
    path = Path(path)
    if path.is_dir():
        folder, file = path, path / "tokenizer.json"
    else:
        folder, file = path.parent, path
    if not file.is_file():
        others = (
            sorted(p.name for p in folder.iterdir() if p.is_file())[:8] if folder.is_dir() else []
        )
        raise ConfigError(
            f"expected a tokenizer.json file or a folder holding one, found no {file}"
            f"{f' (folder has: {others})' if others else ''}; for a slow/sentencepiece tokenizer, "
            "write one with transformers: AutoTokenizer.from_pretrained(x).save_pretrained(folder)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:
        raise ConfigError(
            f"{file} is not a tokenizer the tokenizers library can read ({e}); "
            "pass a Hugging Face tokenizer.json"
        ) from e
    tokenizer.no_truncation()
    tokenizer.no_padding()

    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{config_file} is not valid JSON ({e}); fix or remove it") from e
    chat_template = config.get("chat_template")
    jinja = folder / "chat_template.jinja"  # newer transformers keep the template on its own
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text(encoding="utf-8")

    # Without tokenizer_config.json, fall back to <|endoftext|> as BOS/EOS when it exists.
    default = ENDOFTEXT if tokenizer.token_to_id(ENDOFTEXT) is not None else None
    bos = _token_content(config["bos_token"]) if "bos_token" in config else default
    eos = _token_content(config["eos_token"]) if "eos_token" in config else default
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:  # no setting: BOS only if the tokenizer's own post-processor adds it (e.g. Llama 3)
        add_bos = bos is not None and _post_processor_adds(tokenizer, bos)
    return make_tokenizer_info(
        tokenizer,
        path=path,
        bos_token=bos,
        eos_token=eos,
        add_bos=add_bos,
        chat_template=chat_template,
    )


def _write_atomic(file: Path, text: str) -> None:
    write_durable(file, text.encode("utf-8"))


def save_tokenizer(tok: Tokenizer | TokenizerInfo, folder: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``; returns it.

    A bare ``Tokenizer`` is saved with the built-in settings (``<|endoftext|>`` as BOS and EOS
    when it has that token). ``load_tokenizer(folder)`` gives back the same fingerprint.
    """
    if isinstance(tok, Tokenizer):
        has_eot = tok.token_to_id(ENDOFTEXT) is not None
        info = make_tokenizer_info(
            tok,
            bos_token=ENDOFTEXT if has_eot else None,
            eos_token=ENDOFTEXT if has_eot else None,
            add_bos=has_eot,
        )
        chat_template = None
    else:
        info = tok
        chat_template = info.chat_template
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # so transformers.AutoTokenizer reads it
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "add_bos_token": info.add_bos,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_atomic(folder / "tokenizer.json", info.tokenizer.to_str())
    _write_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return folder
