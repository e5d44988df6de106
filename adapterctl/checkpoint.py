"""A base checkpoint read from its safetensors headers: names, logical shapes and dtypes,
shards, bitsandbytes quantisation, and how adapter modules map onto its tensors.

Nothing here reads tensor data except the few-hundred-byte bitsandbytes quant-state blobs,
so opening a 70B checkpoint costs kilobytes. A checkpoint is assembled the same way wherever
its files are (``CheckpointFiles``): a local folder here, a Hub repository at one commit in
``adapterctl.hub.base`` (``hf://`` bases, read by byte ranges). ``open_base`` opens either:
remote schemes come from the ``register_remotes`` hook, so this module never imports the Hub
code.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.adapter import Adapter, Layout, LoraModule
from adapterctl.errors import BrokenFile, NotFound, UnsupportedBase, UsageError
from adapterctl.nf4 import layout as nf4_layout
from adapterctl.tensorfile import RemoteFile, SafetensorsHeader, TensorInfo, read_header

if TYPE_CHECKING:
    from adapterctl.hub.remote import HubOrigin

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# diffusers names a model's weights diffusion_pytorch_model[-0000X-of-0000N].safetensors
STEMS = ("model", "diffusion_pytorch_model")


def weight_stem(shards: Sequence[str]) -> str:
    """The stem a checkpoint's weight files are named with (``model``, or diffusers'
    ``diffusion_pytorch_model``), for naming files written in its place."""
    names = [str(s).replace("\\", "/").rsplit("/", 1)[-1] for s in shards]
    if names and all(n.startswith(STEMS[1]) for n in names):
        return STEMS[1]
    return STEMS[0]


# Models whose linear layers are transformers' Conv1D (weights stored in×out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|block|blocks|decoder_layers)\.(\d+)\.")
_TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
# What to do about a broken 4-bit weight (``Checkpoint.quant_problems``).
QUANT_FIX = "re-save the 4-bit model with transformers, or use its 16-bit original"


@dataclass(frozen=True)
class QuantInfo:
    """A bitsandbytes 4-bit weight as transformers serialises it."""

    weight: str
    quant_type: str  # "nf4" or "fp4"
    blocksize: int
    shape: tuple[int, ...]
    dtype: str  # logical (compute) dtype, safetensors name
    nested: bool
    state: dict[str, Any]
    statistics: tuple[str, ...] = ()  # names of its stored aux tensors, then its quant state


@dataclass(frozen=True)
class Target:
    """Where one adapter module lands in the base."""

    module: str
    tensor: str | None  # base weight name, None when the base has no such weight
    shape: tuple[int, ...] | None
    dtype: str | None
    layout: Layout
    quant: QuantInfo | None = None


@dataclass
class Binding:
    """An adapter's modules and saved tensors mapped onto a base's tensor names."""

    targets: dict[str, Target]
    extras: dict[str, str | None]  # adapter extra target -> base tensor name (None if absent)
    strip: str = ""
    add: str = ""

    @property
    def matched(self) -> list[Target]:
        return [t for t in self.targets.values() if t.tensor is not None]


@dataclass
class Checkpoint:
    """A base model checkpoint, known from its headers.

    ``tensors`` are the tensors as stored; ``weights`` is the logical view (a 4-bit weight
    with its unpacked shape and compute dtype, without its auxiliary tensors). ``quant``
    holds the quant state of every 4-bit weight whose state decodes; ``quant_problems`` says
    what is missing or inconsistent in each broken 4-bit weight (``validate`` reports them as
    AC213; ``check_quant`` refuses them).

    A local checkpoint has its folder (or single file) as ``path`` and its shard files as
    ``shards``. One read from the Hub has no ``path``: its ``origin`` names the repository,
    the commit and each weight file with its size and LFS sha256, and its ``shards`` are
    those files (``RemoteFile``s, read by byte ranges). ``location`` names either in
    messages and reports.
    """

    path: Path | None
    tensors: dict[str, TensorInfo]
    shards: list[Path | RemoteFile]
    config: dict[str, Any] = field(default_factory=dict)
    quant: dict[str, QuantInfo] = field(default_factory=dict)
    origin: HubOrigin | None = None
    quant_problems: dict[str, str] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """The local path, or ``hf://owner/name@commit`` for a checkpoint read from the Hub."""
        return self.origin.url if self.origin is not None else str(self.path)

    @property
    def folder(self) -> Path:
        """The local folder holding the checkpoint's files (a single file's parent).

        Raises:
            UsageError: a checkpoint read from the Hub has none: its weights are not on this
                disk (exit 2; the message says how to download them).
        """
        if self.path is None:
            raise self._not_local()
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def local_shards(self) -> list[Path]:
        """``shards`` as local files.

        Raises:
            UsageError: a checkpoint read from the Hub (as ``folder``).
        """
        local = [s for s in self.shards if isinstance(s, Path)]
        if self.path is None or len(local) != len(self.shards):
            raise self._not_local()
        return local

    def _not_local(self) -> UsageError:
        assert self.origin is not None
        return self.origin.weights_needed("this command")

    @property
    def weights(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Logical name -> (shape, dtype) for every tensor a model would hold in memory."""
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        four_bit = self.quant.keys() | self.quant_problems.keys()
        for name, info in self.tensors.items():
            if nf4_layout.is_statistic(name, four_bit):
                continue
            q = self.quant.get(name)
            out[name] = (q.shape, q.dtype) if q else (info.shape, info.dtype)
        return out

    def check_quant(self) -> None:
        """Refuse a checkpoint whose 4-bit weights are incomplete or inconsistent (a missing
        ``nested_absmax``, a blocksize bitsandbytes lacks, scales that do not fit the shape):
        reading such a weight would give wrong values without an error.

        Raises:
            BrokenFile: naming the checkpoint, the first broken weight's tensor at fault and
                what is wrong with it (exit 3).
        """
        if self.quant_problems:
            first = next(iter(self.quant_problems.values()))
            more = len(self.quant_problems) - 1
            also = f" (and {more} more broken 4-bit weight(s))" if more else ""
            raise BrokenFile(f"{self.location}: {first}{also}; {QUANT_FIX}")

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else None

    @property
    def model_type(self) -> str | None:
        mt = self.config.get("model_type")
        return str(mt) if mt else None

    @property
    def text_config(self) -> dict[str, Any]:
        """The language-model part of the config (nested ``text_config`` in multimodal ones)."""
        tc = self.config.get("text_config")
        return tc if isinstance(tc, dict) else self.config

    @property
    def vocab_size(self) -> int | None:
        v = self.text_config.get("vocab_size", self.config.get("vocab_size"))
        return int(v) if v is not None else None

    @property
    def tie_word_embeddings(self) -> bool:
        v = self.text_config.get("tie_word_embeddings", self.config.get("tie_word_embeddings"))
        return bool(v) if v is not None else self.model_type in CONV1D_MODEL_TYPES | {"t5"}

    @property
    def num_layers(self) -> int | None:
        tc = self.text_config
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in tc:
                return int(tc[key])
        indices = {int(m.group(1)) for n in self.tensors if (m := _LAYER_INDEX.search("." + n))}
        return max(indices) + 1 if indices else None

    @property
    def quantization(self) -> str | None:
        """'nf4' / 'fp4' for a bitsandbytes 4-bit checkpoint, else None."""
        kinds = {q.quant_type for q in self.quant.values()}
        return "/".join(sorted(kinds)) if kinds else None

    @property
    def size_bytes(self) -> int:
        return sum(s.size if isinstance(s, RemoteFile) else s.stat().st_size for s in self.shards)

    @property
    def fused_experts(self) -> list[str]:
        """MoE expert tensors stored fused (3-D), which per-expert LoRA modules cannot target."""
        return [n for n, i in self.tensors.items() if ".experts." in n and len(i.shape) == 3]

    def bind(self, adapter: Adapter) -> Binding:
        """Map the adapter's modules and saved tensors onto this base's tensor names.

        Handles bases saved without the head's prefix (``h.0.attn.c_attn.weight`` for an
        adapter trained on ``GPT2LMHeadModel``'s ``transformer.h.0.attn.c_attn``) and the
        reverse, choosing the one prefix change that matches the most modules. Linear
        modules whose base weight is stored in×out (GPT-2 Conv1D) get the ``conv1d`` layout,
        as PEFT forces ``fan_in_fan_out`` for them whatever the config says.

        Modules named with underscores for dots (kohya's ``lora_unet_down_blocks_0_…``) map
        onto the one base weight whose dotted name, dots as underscores, is the longest
        ``_``-separated suffix of the module's name (``down_blocks.0.….weight``). A module
        stored flat onto a convolution (LyCORIS keeps (r, in·kh·kw)) is reshaped to it: the
        adapter's module is replaced by ``LoraModule.as_convolution``.
        """
        weights = self.weights
        strip, add = _best_transform(list(adapter.modules), weights)

        def base_name(module_or_param: str) -> str:
            return add + module_or_param.removeprefix(strip)

        flat: dict[str, str] | None = None
        targets: dict[str, Target] = {}
        for name, mod in list(adapter.modules.items()):
            tname = base_name(name) + ".weight"
            if tname not in weights and "." not in name:
                flat = _flat_names(weights) if flat is None else flat
                tname = _flat_match(name, flat) or tname
            if tname not in weights:
                targets[name] = Target(name, None, None, None, mod.layout)
                continue
            shape, dtype = weights[tname]
            out_in = (shape[0], math.prod(shape[1:]))  # a convolution's weight, flattened
            if mod.layout == "linear" and len(shape) > 2 and len(mod.a.shape) == 2 and out_in == (
                mod.out_features, mod.in_features
            ):  # fmt: skip
                mod = adapter.modules[name] = mod.as_convolution(tuple(shape[2:]))
            targets[name] = Target(
                name,
                tname,
                shape,
                dtype,
                self._layout(mod, shape, tname in self.quant),
                self.quant.get(tname),
            )
        extras = {}
        for e in adapter.extras:
            tname = base_name(e.target)
            extras[e.target] = tname if tname in weights else None
        return Binding(targets=targets, extras=extras, strip=strip, add=add)

    def _layout(self, mod: LoraModule, shape: tuple[int, ...], quantized: bool = False) -> Layout:
        if mod.layout not in ("linear", "conv1d"):
            return mod.layout
        out_in = (mod.out_features, mod.in_features)
        if len(shape) != 2:
            return mod.layout
        if shape[0] != shape[1]:
            if tuple(shape) == out_in[::-1]:
                return "conv1d"
            if tuple(shape) == out_in:
                return "linear"
            return mod.layout
        # transformers quantises Conv1D layers into 4-bit Linear ones, stored (out, in).
        conv1d_model = self.model_type in CONV1D_MODEL_TYPES and not quantized
        return "conv1d" if conv1d_model else "linear"


def _flat_names(weights: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, str]:
    """Each ``….weight``'s dotted module name with dots as underscores -> the weight's name."""
    return {
        n.removesuffix(".weight").replace(".", "_"): n for n in weights if n.endswith(".weight")
    }


def _flat_match(module: str, flat: dict[str, str]) -> str | None:
    """The base weight whose flattened name is ``module`` or its longest suffix after a
    ``_`` (``lora_unet_mid_block_…`` -> ``mid_block.….weight``), else None."""
    if module in flat:
        return flat[module]
    for i, ch in enumerate(module):
        if ch == "_" and module[i + 1 :] in flat:
            return flat[module[i + 1 :]]
    return None


def _best_transform(
    modules: list[str], weights: dict[str, tuple[tuple[int, ...], str]]
) -> tuple[str, str]:
    """The (prefix to strip, prefix to add) that maps the most modules onto base weights."""
    firsts = {m.split(".", 1)[0] + "." for m in modules if "." in m}
    roots = {n.split(".", 1)[0] + "." for n in weights if "." in n}
    candidates = [("", "")] + [(f, "") for f in sorted(firsts)] + [("", r) for r in sorted(roots)]
    candidates += [(f, r) for f in sorted(firsts) for r in sorted(roots) if f != r]
    best, best_score = ("", ""), -1
    for strip, add in candidates:
        score = sum(
            1
            for m in modules
            if (m.startswith(strip) and add + m.removeprefix(strip) + ".weight" in weights)
        )
        if score > best_score:
            best, best_score = (strip, add), score
    return best


def open_base(
    base: str | os.PathLike[str] | Checkpoint,
    *,
    token: str | None = None,
    needs_weights: str | None = None,
) -> Checkpoint:
    """Open a BASE: an open checkpoint (returned as is), a local folder or ``.safetensors``
    file (``open_checkpoint``), or a remote's ``<scheme>://…`` model read from its headers only
    (hook ``register_remotes``; built in: ``hf://owner/name[@revision]``, the Hugging Face Hub).

    Args:
        base: the BASE.
        token: a token for a remote base (default: the remote's own lookup, e.g. ``HF_TOKEN``).
        needs_weights: the command, when it reads whole tensors (``merge``): a remote base is
            then refused before anything is fetched.

    Raises:
        UsageError: ``needs_weights`` and a remote base (exit 2: the message names the
            download that makes it a local BASE), or an unknown ``<scheme>://`` (2).
        NotFound, BrokenFile, UnsupportedBase: as ``open_checkpoint``; for a remote base also
            RemoteError (auth, network, offline: exit 6).

    Example:
        >>> open_base("models/Llama-3.2-1B").origin is None
        True
        >>> open_base("hf://meta-llama/Llama-3.1-70B@main").origin.repo_id
        'meta-llama/Llama-3.1-70B'
    """
    if isinstance(base, Checkpoint):
        if needs_weights and base.origin is not None:
            raise base.origin.weights_needed(needs_weights)
        return base
    text = os.fspath(base)
    scheme, sep, _ = text.partition("://")
    if not sep or "/" in scheme or not scheme:
        return open_checkpoint(text)
    from adapterctl.plugins import collect

    remotes = {r.scheme: r for r in collect("register_remotes")}
    if scheme not in remotes:
        known = ", ".join(f"{s}://" for s in sorted(remotes)) or "none"
        raise UsageError(f"{text}: unknown remote {scheme}:// (known: {known}); check the BASE")
    return remotes[scheme].open_base(text, token=token, needs_weights=needs_weights)  # type: ignore[no-any-return]


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a base checkpoint folder (or a single ``.safetensors``) from headers only.

    Args:
        path: a folder with ``model.safetensors`` or sharded ``model-0000X-of-0000N``
            files plus ``model.safetensors.index.json``, and usually ``config.json``.

    Returns:
        The checkpoint: every tensor's dtype, shape, shard and byte range, 4-bit quant
        states, and the model config.

    Raises:
        NotFound: nothing at ``path``, or a shard named by the index is missing.
        BrokenFile: malformed index, config or safetensors header.
        UnsupportedBase: pickle-only, GPTQ, AWQ, FP8 or 8-bit bases.

    Example:
        >>> ckpt = open_checkpoint("models/Llama-3.2-1B")
        >>> ckpt.architecture, ckpt.num_layers
        ('LlamaForCausalLM', 16)
    """
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{p}: no such base checkpoint; check the path")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UnsupportedBase(f"{p}: not a safetensors file; convert the base to safetensors")
        files, shards = _Folder(p.parent), [p.name]
    else:
        files = _Folder(p)
        shards = find_shards(files, str(p))
    return assemble(files, str(p), shards, path=p)


class CheckpointFiles(ABC):
    """Where a checkpoint's files are, as ``assemble`` reads them: a local folder (here), or
    a Hub repository at one commit (``adapterctl.hub.base``). Names are relative to the
    checkpoint's root, spelled with ``/``."""

    # The fix named when a shard the index names is missing.
    missing_fix = "download it"

    @abstractmethod
    def describe(self, name: str) -> str:
        """How messages name the file ``name``."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the file ``name`` is there."""

    @abstractmethod
    def names(self) -> list[str]:
        """The files at the root (not in sub-folders), sorted."""

    @abstractmethod
    def read_text(self, name: str) -> str:
        """The whole of a small file (config, index) as UTF-8 text.

        Raises:
            UnicodeDecodeError: not UTF-8.
        """

    @abstractmethod
    def shard(self, name: str) -> Path | RemoteFile:
        """The weight file ``name``, as its tensors record it."""

    def read_headers(self, names: Sequence[str]) -> list[SafetensorsHeader]:
        """The safetensors headers of the weight files ``names``, in order."""
        return [read_header(self.shard(n)) for n in names]


class _Folder(CheckpointFiles):
    """A checkpoint's files in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def names(self) -> list[str]:
        return sorted(f.name for f in self.root.iterdir() if f.is_file())

    def read_text(self, name: str) -> str:
        path = self.root / name
        if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO blocks forever
            raise BrokenFile(f"{path}: not a regular file; replace it with the real file")
        return path.read_text(encoding="utf-8")

    def shard(self, name: str) -> Path:
        return self.root / name


def assemble(
    files: CheckpointFiles,
    where: str,
    shards: Sequence[str],
    *,
    path: Path | None = None,
    origin: HubOrigin | None = None,
) -> Checkpoint:
    """Build a checkpoint from its files, wherever they are: read ``config.json`` (if any)
    and refuse GPTQ/AWQ/FP8/8-bit bases, read each shard's header, read the 4-bit quant
    states (the only tensor bytes read).

    Args:
        files: where the files are.
        where: how messages name the checkpoint.
        shards: its weight files (``find_shards``).
        path: the local folder or file, for a local checkpoint.
        origin: the repository and commit, for one read from the Hub.

    Raises:
        BrokenFile, UnsupportedBase: as ``open_checkpoint``.
    """
    config = _read_config(files) if files.exists("config.json") else {}
    _refuse_quant_method(where, config)
    tensors: dict[str, TensorInfo] = {}
    for header in files.read_headers(shards):
        tensors.update(header.tensors)
    _refuse_quant_tensors(where, tensors)
    ckpt = Checkpoint(
        path=path,
        tensors=tensors,
        shards=[files.shard(n) for n in shards],
        config=config,
        origin=origin,
    )
    ckpt.quant, ckpt.quant_problems = _read_quant_states(ckpt)
    return ckpt


def _leaves_folder(name: str) -> bool:
    """True when a shard name from an index points outside the checkpoint's folder (absolute,
    ``..``, a drive or a backslash path)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]


def _indexed_shards(files: CheckpointFiles, where: str, index_name: str) -> list[str]:
    """The shards a checkpoint's index names, checked: beside it, present."""
    try:
        data = json.loads(files.read_text(index_name))
        names = sorted(set(data["weight_map"].values()))
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError
    except (
        UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError,
        AttributeError,
    ):  # fmt: skip
        raise BrokenFile(
            f"{files.describe(index_name)}: malformed index (needs a weight_map of tensor "
            "name -> shard file); re-save the model"
        ) from None
    outside = [n for n in names if _leaves_folder(n)]
    if outside:
        raise BrokenFile(
            f"{files.describe(index_name)}: names shard {outside[0]!r}, outside the "
            "checkpoint's folder; shards must be files beside the index: re-save the model"
        )
    missing = [n for n in names if not files.exists(n)]
    if missing:
        raise NotFound(
            f"{where}: shard {missing[0]} named by {index_name} is missing; {files.missing_fix}"
        )
    return names


def find_shards(files: CheckpointFiles, where: str) -> list[str]:
    """A checkpoint's weight files: those its index names, else ``model.safetensors``, else
    the same for diffusers' ``diffusion_pytorch_model…`` names, else every ``*.safetensors``
    at its root except adapters.

    Raises:
        BrokenFile: a malformed index, or one naming a shard outside the folder.
        NotFound: a shard the index names is missing, or no safetensors at all.
        UnsupportedBase: pickle-only weights.
    """
    for stem in STEMS:
        index_name = f"{stem}.safetensors.index.json"
        if files.exists(index_name):
            return _indexed_shards(files, where, index_name)
        if files.exists(f"{stem}.safetensors"):
            return [f"{stem}.safetensors"]
    top = files.names()
    found = [n for n in top if n.endswith(".safetensors") and not n.startswith("adapter_model")]
    if found:
        return found
    if any(fnmatch.fnmatch(n, p) for n in top for p in ("pytorch_model*.bin", "*.pt", "*.pth")):
        raise UnsupportedBase(
            f"{where}: pickle-only checkpoint (no safetensors); convert it with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise NotFound(
        f"{where}: no model.safetensors or sharded safetensors found; is this a base model?"
    )


def _read_config(files: CheckpointFiles) -> dict[str, Any]:
    where = files.describe("config.json")
    try:
        data = json.loads(files.read_text("config.json"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BrokenFile(f"{where}: invalid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise BrokenFile(f"{where}: expected a JSON object; fix or re-download it")
    _check_config_types(where, data)
    if isinstance(data.get("text_config"), dict):
        _check_config_types(where, data["text_config"], "text_config.")
    return data


# config.json keys the checkpoint reads, with the JSON types they must have.
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "architectures": (list,),
    "model_type": (str,),
    "text_config": (dict,),
    "quantization_config": (dict,),
    "vocab_size": (int,),
    "tie_word_embeddings": (bool,),
    "num_hidden_layers": (int,),
    "n_layer": (int,),
    "num_layers": (int,),
    "n_layers": (int,),
}


def _check_config_types(where: str, data: dict[str, Any], prefix: str = "") -> None:
    """Refuse a config whose keys we read have the wrong JSON type (null means absent)."""
    for key, types in _CONFIG_TYPES.items():
        v = data.get(key)
        bad = v is not None and (not isinstance(v, types) or (int in types and isinstance(v, bool)))
        if key == "architectures" and isinstance(v, list):
            bad = not all(isinstance(a, str) for a in v)
        if bad:
            want = "a list of strings" if key == "architectures" else types[0].__name__
            raise BrokenFile(
                f"{where}: {prefix}{key} should be {want}, not {v!r:.40}; fix or re-download it"
            )


def _refuse_quant_method(p: str, config: dict[str, Any]) -> None:
    qc = config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if not method:
        return
    if method == "bitsandbytes":
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            raise UnsupportedBase(
                f"{p}: bitsandbytes 8-bit bases are not supported; use the 16-bit original"
            )
        return
    raise UnsupportedBase(
        f"{p}: {method.upper()}-quantised base cannot be merged into; use the 16-bit original"
    )


def _refuse_quant_tensors(p: str, tensors: dict[str, TensorInfo]) -> None:
    for name in tensors:
        if name.endswith((".qweight", ".qzeros", ".g_idx")):
            raise UnsupportedBase(f"{p}: GPTQ/AWQ-quantised base ({name}); use the 16-bit original")
        if name.endswith((".weight_scale_inv", ".weight_scale")):
            raise UnsupportedBase(f"{p}: FP8-quantised base ({name}); use the 16-bit original")
        if name.endswith(".SCB"):
            raise UnsupportedBase(f"{p}: bitsandbytes 8-bit base ({name}); use the 16-bit original")


def _read_quant_states(ckpt: Checkpoint) -> tuple[dict[str, QuantInfo], dict[str, str]]:
    """The 4-bit weights' quant states (the only tensor bytes a checkpoint reads), and what is
    wrong with those whose stored tensors are incomplete or inconsistent.

    Returns:
        (weight -> its ``QuantInfo``, for every weight whose state decodes;
        weight -> one line naming the tensor at fault and what is wrong, for every broken
        one; ``QUANT_FIX`` says what to do).
    """
    qc = ckpt.config.get("quantization_config") or {}
    compute = str(qc.get("bnb_4bit_compute_dtype", "")) if isinstance(qc, dict) else ""
    stored = {name: (info.dtype, info.shape) for name, info in ckpt.tensors.items()}
    out: dict[str, QuantInfo] = {}
    problems: dict[str, str] = {}
    for weight, group in nf4_layout.groups(ckpt.tensors).items():
        problem = nf4_layout.group_problem(group, stored)
        if problem is None:
            info = ckpt.tensors[group.state]
            try:
                state = nf4_layout.parse_state(info.array().tobytes(), group.state)  # no torch
            except BrokenFile as exc:
                problem = str(exc)
            else:
                problem = nf4_layout.group_problem(group, stored, state)
                out[weight] = QuantInfo(
                    weight=weight,
                    quant_type=str(state["quant_type"]),
                    blocksize=state["blocksize"],
                    shape=tuple(state["shape"]),
                    dtype=_TORCH_TO_ST.get(compute or str(state["dtype"]), "F32"),
                    nested=nf4_layout.is_nested(state),
                    state=state,
                    statistics=group.statistics,
                )
        if problem is not None:
            problems[weight] = problem
    return out, problems


def layer_index(name: str) -> int | None:
    """The transformer block index in a module name (``model.layers.7.mlp`` -> 7)."""
    m = _LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None
