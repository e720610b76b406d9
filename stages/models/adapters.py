"""Teacher and student adapters: one small interface over the built-in GPT, Hugging Face causal
LMs and any ``module:factory``.

    model = load_model("path/to/teacher", device)   # built-in folder/.pt, HF folder, or mod:fn
    h = model.hidden(input_ids, position_ids, segment_ids, valid)  # (B, T, C) if model.has_head
    logits = model.head(h)                                  # (B, T, V)
    logits = model.logits(input_ids, ...)                   # (B, T, V)  always

``has_head`` models let the caller apply the output head a chunk of positions at a time (so
(B, T, V) float32 logits never exist at once); the others hand over logits.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from kdcache.storage.durable import write_durable
from kdcache.storage.errors import ConfigError

log = logging.getLogger(__name__)

BUILTIN_WEIGHTS = "model.pt"  # a built-in GPT folder: model.pt + tokenizer.json
DTYPES = ("auto", "bfloat16", "float16", "float32")  # --dtype


@dataclass(frozen=True)
class HeadShard:
    """The output head's rows [offset, offset + rows) held by this process: all of it on one
    process, 1/N of it on each rank of a vocab-parallel teacher (``group``: the ranks holding
    the other rows; each offers its own top-k and one all-gather merges them)."""

    weight: torch.Tensor  # (rows, C)
    bias: torch.Tensor | None = None  # (rows,)
    offset: int = 0
    group: object = None  # a torch.distributed ProcessGroup, or None: the whole head is here

    @property
    def rows(self) -> int:
        return self.weight.shape[0]


@dataclass
class CausalLM:
    """A loaded causal LM and what kdcache needs to know about it; one subclass per kind
    (``BuiltinLM``, ``HFLM``, ``FactoryLM``), each saying how to run its model.

    ``valid`` (B, T) bool marks the real positions of a padded batch; ``position_ids`` and
    ``segment_ids`` (B, T) restart at each document of a packed row (None: not packed)."""

    kind: ClassVar[str]
    name: str  # what the user passed
    module: nn.Module
    vocab_size: int  # output size V
    max_positions: int | None  # context length, None if unknown
    tokenizer_path: Path | None  # its own tokenizer, if it ships one
    weight_files: list[Path] = field(default_factory=list)
    _packing: bool | None = None

    @property
    def has_head(self) -> bool:
        """Whether ``head(hidden(x))`` are the model's logits: then the caller applies the head a
        chunk of positions at a time (no (B, T, V) float32 logits at once)."""
        return False

    @property
    def head_module(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} hands over logits, not a head")

    def hidden(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        """Final hidden states (B, T, C) before the output head (``has_head`` models)."""
        raise NotImplementedError(f"{type(self).__name__} hands over logits, not hidden states")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_module(hidden)

    def head_shard(self, group=None) -> HeadShard:
        """The head rows this process multiplies: all of them (``group`` None), else this
        rank's slice of the vocabulary among the ranks of ``group`` — the local rows of a head
        that tensor parallelism sharded by rows (a DTensor on Shard(0)), or, for a replicated
        head, rows cut the way torch.chunk cuts. The (n, V) logits are then never gathered."""
        head = self.head_module
        weight, bias = head.weight, getattr(head, "bias", None)
        if group is None:
            return HeadShard(_full(weight), None if bias is None else _full(bias))
        import torch.distributed as dist

        rank, size = dist.get_rank(group), dist.get_world_size(group)
        if _row_sharded(weight):
            local = weight.to_local()
            counts = [None] * size
            dist.all_gather_object(counts, local.shape[0], group=group)
            offset = sum(counts[:rank])
        else:
            full = _full(weight)
            step = -(-full.shape[0] // size)  # torch.chunk's rows per rank
            offset = min(rank * step, full.shape[0])
            local = full[offset : offset + step]
        if bias is not None:
            bias = bias.to_local() if _row_sharded(bias) else _full(bias)[offset:][: len(local)]
        return HeadShard(local, bias, offset, group)

    def logits(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        """Logits (B, T, V)."""
        raise NotImplementedError

    def supports_packing(self, seq_len: int) -> bool:
        """Whether packed documents of up to ``seq_len`` tokens get exactly the logits they get
        alone (probed once, with a document longer than the model's sliding window, if any)."""
        if self._packing is None:
            self._packing = _probe_packing(self, seq_len)
        return self._packing

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (FSDP's units): the modules whose class the model names in
        ``_no_split_modules`` (Hugging Face's list), else none."""
        names = set(getattr(self.module, "_no_split_modules", None) or ())
        return [m for m in self.module.modules() if type(m).__name__ in names]

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        raise ConfigError(
            f"--activation-checkpointing needs a built-in or Hugging Face student, found "
            f"{self.kind} {self.name}; drop the flag or checkpoint inside your factory's model"
        )

    def fingerprint(self) -> dict:
        """name + kind + sha256 of the weight files (or of the state dict for a factory)."""
        digest = hashlib.sha256()
        if self.weight_files:
            for f in sorted(self.weight_files):
                digest.update(f.name.encode() + b"\0" + file_sha256(f).encode())
        else:
            for key, t in sorted(self.module.state_dict().items()):
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                digest.update(key.encode() + b"\0" + data.tobytes())
        return {
            "name": Path(self.name).name or self.name,
            "kind": self.kind,
            "sha256": digest.hexdigest(),
            "vocab_size": self.vocab_size,
        }

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        """The trained model as a folder its own kind loads again; ``state_dict``: these
        weights instead of the module's own (gathered from a sharded run)."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict or self.module.state_dict(), folder / "state_dict.pt")


def _row_sharded(t: torch.Tensor) -> bool:
    """A DTensor split by rows (dim 0) over a one-dimensional mesh."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(t, DTensor) and tuple(t.placements) == (Shard(0),)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered, a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class BuiltinLM(CausalLM):
    """kdcache's built-in GPT (kdcache.stages.models.gpt): takes position and segment ids."""

    kind = "builtin"

    @property
    def has_head(self) -> bool:
        return True

    @property
    def head_module(self) -> nn.Module:
        return self.module.lm_head

    def hidden(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        return self.module.hidden_states(
            input_ids, position_ids=position_ids, segment_ids=segment_ids
        )

    def logits(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        return self.module(input_ids, position_ids=position_ids, segment_ids=segment_ids)

    def supports_packing(self, seq_len: int) -> bool:
        return True  # segment ids reset its attention; tested in tests/stages/test_gpt.py

    def blocks(self) -> list[nn.Module]:
        return list(self.module.blocks)

    def enable_activation_checkpointing(self) -> None:
        self.module.checkpointing = True

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        from kdcache.stages.models.gpt import save_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.module, folder / BUILTIN_WEIGHTS, state_dict=state_dict)


class HFLM(CausalLM):
    """A Hugging Face causal LM: padding masks, or packed rows through restarting position ids
    (``_hf_mask_kwargs``); its head is used alone unless its forward changes the head's output."""

    kind = "hf"
    _head_exact: bool | None = None

    @property
    def has_head(self) -> bool:
        """Probed once: Gemma 2 soft-caps, Cohere and Granite scale the head's output."""
        if self._head_exact is None:
            self._head_exact = _probe_head(self)
        return self._head_exact

    @property
    def head_module(self) -> nn.Module:
        return self.module.get_output_embeddings()

    def hidden(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        kwargs = _hf_mask_kwargs(position_ids, segment_ids, valid)
        out = self.module.base_model(input_ids=input_ids, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        kwargs = _hf_mask_kwargs(position_ids, segment_ids, valid)
        return self.module(input_ids=input_ids, **kwargs).logits

    def enable_activation_checkpointing(self) -> None:
        self.module.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def save(self, folder: Path, state_dict: dict | None = None) -> None:
        self.module.save_pretrained(folder, state_dict=state_dict)


class FactoryLM(CausalLM):
    """Any ``module:factory``: a module mapping ids (B, T) to logits (B, T, V); packed rows
    only if its forward takes ``position_ids`` and ``segment_ids``."""

    kind = "factory"

    def logits(self, input_ids, position_ids=None, segment_ids=None, valid=None) -> torch.Tensor:
        kwargs = {}
        if segment_ids is not None:
            kwargs = {"position_ids": position_ids, "segment_ids": segment_ids}
        out = self.module(input_ids, **kwargs)
        return out.logits if hasattr(out, "logits") else out

    def supports_packing(self, seq_len: int) -> bool:
        if "segment_ids" not in inspect.signature(self.module.forward).parameters:
            return False
        return super().supports_packing(seq_len)


def _hf_mask_kwargs(position_ids, segment_ids, valid) -> dict:
    """Keyword arguments of a Hugging Face forward. Packed rows (segment_ids given) pass only
    position_ids that restart at every document, and no attention mask: transformers then
    builds the model's own mask (causal, sliding window, chunked) intersected with the
    documents' blocks (packed-sequence detection, transformers >= 4.54). A hand-made 4-D mask
    would replace the model's and drop its sliding window. No KV cache: it would switch that
    detection off, and a single forward pass has no use for it."""
    kwargs: dict = {"use_cache": False}
    if segment_ids is not None:
        kwargs["position_ids"] = position_ids
        return kwargs
    if valid is not None:
        kwargs["attention_mask"] = valid.long()
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return kwargs


def sliding_window(module: nn.Module) -> int | None:
    """The model's attention window in tokens, if it has one (Mistral, Qwen2, Gemma 2/3)."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


@torch.inference_mode()
def _probe_head(model: CausalLM) -> bool:
    """Some causal LMs change the head's output in forward (Gemma 2 soft-caps it, Cohere and
    Granite scale it): for them the head alone is not the model, so they hand over logits."""
    device = next(model.module.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, 8), generator=g).to(device)
    training = model.module.training  # a student may be in train mode: no dropout here
    model.module.eval()
    try:
        via_head = model.head(model.hidden(ids)).float()  # (1, 8, V)
        exact = torch.allclose(via_head, model.logits(ids).float(), atol=1e-4, rtol=1e-4)
    finally:
        model.module.train(training)
    if not exact:
        log.info("%s: its forward transforms the head's output; using full logits", model.name)
    return bool(exact)


@torch.inference_mode()
def _probe_packing(model: CausalLM, seq_len: int) -> bool:
    """Two documents packed into one row must give the logits each gives alone. The second is
    longer than the model's sliding window (where the row has room): a mask that loses the
    window only shows on a document longer than it."""
    first = next(model.module.parameters(), None)  # a factory model may have no parameters
    device = first.device if first is not None else torch.device("cpu")
    window = sliding_window(model.module) or 0
    n_a = 5
    n_b = max(2, min(seq_len - n_a, window + 7))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, model.vocab_size, (1, n_a), generator=g).to(device)
    b = torch.randint(0, model.vocab_size, (1, n_b), generator=g).to(device)
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * n_a + [1] * n_b], device=device)
    pos = torch.tensor([list(range(n_a)) + list(range(n_b))], device=device)
    try:
        alone = torch.cat([model.logits(a), model.logits(b)], dim=1).float()
        together = model.logits(packed, position_ids=pos, segment_ids=seg).float()
    except Exception as e:  # the model refuses position ids or packed rows
        log.info("packing probe failed: %s", e)
        return False
    dtype = first.dtype if first is not None else torch.float32
    tol = 1e-3 if dtype == torch.float32 else 5e-2  # 16-bit rounding; a wrong mask is O(1) off
    return bool(torch.allclose(alone, together, atol=tol, rtol=tol))


# -- weight hashes, computed once per file version ------------------------------------------
def _hash_memo_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "kdcache" / "file-sha256.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoized by (absolute path, size, mtime) so big weights hash once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    memo_path = _hash_memo_path()
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    memo[key] = h.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_durable(memo_path, json.dumps(memo).encode())
    except OSError:
        pass  # a read-only home only costs a rehash next time
    return memo[key]


# -- loading ---------------------------------------------------------------------------------
AUTOCAST = "float32+bf16-autocast"  # what --dtype auto resolves to for a float32 checkpoint on CUDA


def resolve_dtype(name: str, device: torch.device, spec: str | None = None) -> str:
    """What ``--dtype name`` runs a model in, as recorded: a dtype's name, ``AUTOCAST``
    (float32 weights, the body under bf16 autocast: the head and its inputs stay float32), or
    ``own`` (a module:factory keeps its dtype). ``auto``: float32 on CPU; on CUDA the
    checkpoint's own 16-bit dtype (a Hugging Face config's ``dtype`` / ``torch_dtype``), else
    ``AUTOCAST``."""
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return name
    if spec and ":" in spec and not Path(spec).exists():
        return "own"
    if device.type != "cuda":
        return "float32"
    config = Path(spec or "") / "config.json"
    try:
        meta = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    own = meta.get("dtype") or meta.get("torch_dtype")
    return own if own in ("bfloat16", "float16") else AUTOCAST


def weights_dtype(resolved: str) -> torch.dtype | None:
    """The dtype the weights load in for a ``resolve_dtype`` answer (None: the model's own)."""
    if resolved == "own":
        return None
    return torch.float32 if resolved == AUTOCAST else getattr(torch, resolved)


def load_model(
    spec: str,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tp_mesh=None,
) -> CausalLM:
    """A built-in GPT (folder with model.pt, or a .pt file), a Hugging Face causal-LM folder
    (config.json; loaded with local_files_only), or ``module:factory``; its weights in ``dtype``
    (None: float32). ``tp_mesh``: a one-dimensional torch DeviceMesh to split a Hugging Face
    model over with its own tensor-parallel plan (``tp_plan="auto"``): each rank holds 1/N."""
    path = Path(spec)
    hf = path.is_dir() and (path / "config.json").is_file()
    if tp_mesh is not None and (not hf or (path / BUILTIN_WEIGHTS).is_file()):
        raise ConfigError(
            f"--tensor-parallel needs a Hugging Face model folder (its tensor-parallel plan); "
            f"{spec} is not one: drop --tensor-parallel, or use the Dask executor to run one "
            "part per GPU"
        )
    if path.is_dir() and (path / BUILTIN_WEIGHTS).is_file():
        return _load_builtin(spec, path / BUILTIN_WEIGHTS, device, dtype)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return _load_builtin(spec, path, device, dtype)
    if hf:
        return _load_hf(spec, path, device, dtype, tp_mesh)
    if ":" in spec and not path.exists():
        return _load_factory(spec, device, dtype)
    if path.exists():
        raise ConfigError(
            f"{spec} is not a model kdcache can load: expected a folder with config.json (Hugging Face) "
            f"or {BUILTIN_WEIGHTS} (built-in GPT), a .pt checkpoint, or module:factory"
        )
    raise ConfigError(
        f"model {spec!r} not found: no such file or folder, and not of the form module:factory"
    )


def _load_builtin(spec: str, weights: Path, device, dtype) -> CausalLM:
    from kdcache.stages.models.gpt import load_checkpoint

    model, _ = load_checkpoint(weights, map_location=device)
    model.to(dtype or torch.float32)
    tok = weights.parent if (weights.parent / "tokenizer.json").is_file() else None
    return BuiltinLM(
        name=spec,
        module=model.eval(),
        vocab_size=model.config.vocab_size,
        max_positions=model.config.block_size,
        tokenizer_path=tok,
        weight_files=[weights],
    )


def _load_hf(spec: str, path: Path, device, dtype, tp_mesh) -> CausalLM:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ConfigError(
            f"{spec} is a Hugging Face model folder; install the extra: pip install 'kdcache[hf]'"
        ) from e
    parallel = {} if tp_mesh is None else {"tp_plan": "auto", "device_mesh": tp_mesh}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype or torch.float32, **parallel
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = " with its tensor-parallel plan (tp_plan='auto')" if parallel else ""
        raise ConfigError(
            f"the teacher folder {spec} does not load as a Hugging Face causal LM{what}: {first}"
            + ("; drop --tensor-parallel for a model without a plan" if parallel else "")
        ) from e
    if tp_mesh is None:
        model.to(device)
    model.eval()
    cfg = model.config
    vocab = model.get_output_embeddings().weight.shape[0]
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    tok = path if (path / "tokenizer.json").is_file() else None
    weights = sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"
    )
    return HFLM(
        name=spec,
        module=model,
        vocab_size=vocab,
        max_positions=max_pos,
        tokenizer_path=tok,
        weight_files=weights,
    )


def _load_factory(spec: str, device, dtype) -> CausalLM:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"cannot import {spec!r} ({e}); expected module:factory importable on PYTHONPATH"
        ) from e
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{spec}() returned {type(model).__name__}; expected a torch.nn.Module mapping ids (B, T) to logits (B, T, V)"
        )
    model.to(device) if dtype is None else model.to(device, dtype)
    model.eval()
    first = next(model.parameters(), None)
    dev = first.device if first is not None else torch.device(device)
    with torch.inference_mode():
        out = model(torch.zeros(1, 1, dtype=torch.long, device=dev))
    out = out.logits if hasattr(out, "logits") else out
    if not (isinstance(out, torch.Tensor) and out.dim() == 3):
        raise ConfigError(
            f"{spec}: the model returned {type(out).__name__} for ids (1, 1); expected logits (B, T, V)"
        )
    return FactoryLM(
        name=spec,
        module=model,
        vocab_size=int(out.shape[-1]),
        max_positions=getattr(model, "max_positions", None),
        tokenizer_path=None,
    )
