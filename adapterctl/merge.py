"""The streaming merge of LoRA adapters into a base checkpoint.

Every output header is planned before the first byte is written (``plan_merge``); then each
tensor is read once, merged in float32 on the chosen device and rounded once into its output
dtype, and written (``run_merge``). Tensors no adapter touches are copied as bytes. The output
goes to a temporary sibling folder that is renamed into place only when complete.

Two engines write the plan: ``merge_cpu`` (NumPy, one worker thread per core, no torch import)
for 16/32-bit merges on the CPU, and ``merge_torch`` for everything else (CUDA, bitsandbytes
4-bit in or out, ``--method``, DoRA on GPT-2 Conv1D). This module plans and runs a merge and
reports on it; ``merge_verify`` checks the result.

For a target weight W: W' = W + Σᵢ wᵢ·scaleᵢ·ΔWᵢ, ΔW = B·A in the weight's layout. A DoRA
adapter (merged alone) gives W' = m / ‖W + s·B·A‖_row · (W + s·B·A), the norm taken per output
row as PEFT takes it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from adapterctl import __version__
from adapterctl.adapter import Adapter, Layout, LoraModule, TensorSource
from adapterctl.checkpoint import CONV1D_MODEL_TYPES, INDEX_NAME, Checkpoint, QuantInfo
from adapterctl.errors import (
    AdapterctlError,
    Conflict,
    OperationalError,
    UnsupportedAdapter,
    UsageError,
    ValidationFailed,
)
from adapterctl.files import copy_range, fsync_dir, replace_dir
from adapterctl.identity import adapter_digest, base_fingerprint
from adapterctl.tensorfile import (
    BYTES_READ,
    TORCH_DTYPE_NAMES,
    TensorInfo,
    tensor_nbytes,
)

if TYPE_CHECKING:
    import torch

DTYPE_CHOICES = {"auto": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# Rows per merge chunk are chosen so one float32 chunk (1 MiB) stays in the CPU's cache.
CHUNK_ELEMENTS = 1 << 18
RING = 3  # chunk buffers the torch engine cycles through
NF4_STATE_BYTES = 384  # quant-state JSON is space-padded to this size so headers can be planned
# Names of weights that transformers never turns into 4-bit Linear layers.
_NOT_LINEAR = (
    "embed",
    "wte",
    "wpe",
    "shared",
    "lm_head",
    "score",
    "classifier",
    "relative_attention",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "spiece.model", "vocab.txt",
)  # fmt: skip
_QUANT_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_VOCAB_TENSORS = ("embed_tokens", "wte", "word_embeddings", "lm_head")
PAUSE_ENV = "ADAPTERCTL_TEST_PAUSE_AT"  # test-only: pause before writing tensor N (see tests)


@dataclass
class Delta:
    """One adapter's update to one weight: wᵢ·scaleᵢ·ΔWᵢ in ``layout``."""

    module: LoraModule
    weight: float
    layout: Layout
    index: int = 0  # which input adapter (for --method, which combines all inputs per module)


@dataclass
class Job:
    """One logical output tensor. A 4-bit output expands into several stored tensors."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str  # logical output dtype (the compute dtype when quantised)
    source: TensorInfo | None = None  # the base tensor as stored
    quant_in: QuantInfo | None = None  # the base stores this weight in 4-bit
    quant_aux: list[TensorInfo] = field(default_factory=list)  # its 4-bit statistics
    transpose_out: bool = False  # written transposed (a 4-bit Conv1D weight back to in×out)
    combine: Combine | None = None  # --method: combine the dense deltas of all inputs
    replace: TensorSource | None = None  # a full copy saved in the adapter replaces the base's
    deltas: list[Delta] = field(default_factory=list)
    dora: Delta | None = None
    bias_add: list[tuple[TensorSource, float]] = field(default_factory=list)
    quantize: QuantSpec | None = None

    @property
    def merged(self) -> bool:
        """True when an adapter changes this tensor's values."""
        return bool(self.deltas or self.dora or self.bias_add or self.replace is not None)

    @property
    def copy_bytes(self) -> bool:
        """True when the output is the base tensor's bytes, unchanged."""
        return (
            not self.merged
            and self.quant_in is None
            and self.quantize is None
            and self.source is not None
            and self.source.dtype == self.out_dtype
        )

    def stored(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """The (name, dtype, shape, nbytes) entries this job writes, in order."""
        if self.copy_bytes and self.source is not None:
            return [(self.name, self.source.dtype, self.source.shape, self.source.nbytes)]
        if self.quantize is not None:
            return self.quantize.entries(self.name, self.shape)
        return [(self.name, self.out_dtype, self.shape, tensor_nbytes(self.out_dtype, self.shape))]

    @property
    def nbytes_out(self) -> int:
        return sum(e[3] for e in self.stored())

    @property
    def nbytes_in(self) -> int:
        if self.replace is not None:
            return 0
        if self.quant_in is not None and self.source is not None:
            return self.source.nbytes + sum(t.nbytes for t in self.quant_aux)
        return self.source.nbytes if self.source else 0


@dataclass(frozen=True)
class QuantSpec:
    """How to write a weight in bitsandbytes 4-bit (layout transformers reads back)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    method: str = "optimal"

    def entries(
        self, name: str, shape: tuple[int, ...]
    ) -> list[tuple[str, str, tuple[int, ...], int]]:
        numel = 1
        for d in shape:
            numel *= d
        blocks = -(-numel // self.blocksize)
        out: list[tuple[str, str, tuple[int, ...]]] = [(name, "U8", ((numel + 1) // 2, 1))]
        if self.double_quant:
            out += [
                (f"{name}.absmax", "U8", (blocks,)),
                (f"{name}.quant_map", "F32", (16,)),
                (f"{name}.nested_absmax", "F32", (-(-blocks // 256),)),
                (f"{name}.nested_quant_map", "F32", (256,)),
            ]
        else:
            out += [(f"{name}.absmax", "F32", (blocks,)), (f"{name}.quant_map", "F32", (16,))]
        out.append(
            (f"{name}.quant_state.bitsandbytes__{self.quant_type}", "U8", (NF4_STATE_BYTES,))
        )
        return [(n, d, s, tensor_nbytes(d, s)) for n, d, s in out]


@dataclass
class OutShard:
    name: str
    jobs: list[Job]

    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        return [e for j in self.jobs for e in j.stored()]

    @property
    def nbytes(self) -> int:
        return sum(e[3] for e in self.entries())


@dataclass
class MergePlan:
    """Everything the merge will write, decided before writing a byte."""

    base: Checkpoint
    adapters: list[Adapter]
    weights: list[float]
    shards: list[OutShard]
    config: dict[str, Any]
    quantize: QuantSpec | None
    tokenizer_from: Path | None
    warnings: list[str]
    provenance: dict[str, Any]

    @property
    def jobs(self) -> list[Job]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def bytes_in(self) -> int:
        return sum(j.nbytes_in for j in self.jobs)

    @property
    def header_metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of every output shard: the format and the provenance."""
        return {"format": "pt", "adapterctl": json.dumps(self.provenance, sort_keys=True)}

    def peak_memory_estimate(self) -> int:
        """Bytes of working memory the merge holds at once on the CPU, where base tensors are
        read through memory maps (page cache, not counted here): the float32 work chunks and
        output staging chunks (a ring of them, or a few per worker thread), the whole float32
        tensors of the jobs that need them (4-bit in or out, DoRA on Conv1D, ``--method``, a
        4-bit Conv1D written back), and the adapters' factors. On CUDA add three pinned
        copies of the largest input."""
        from adapterctl.merge_cpu import workers

        rings = max(RING, 2 * workers()) * CHUNK_ELEMENTS * (4 + 4)
        whole = 0
        for j in self.jobs:
            if j.copy_bytes:
                continue
            numel = 1
            for d in j.shape:
                numel *= d
            copies = 0
            if j.quantize is not None or j.quant_in is not None or j.transpose_out:
                copies = 3  # the merged weight, the base in float32, its re-quantised copy
            if j.dora is not None and j.dora.layout == "conv1d":
                copies = max(copies, 2)
            if j.combine is not None:
                copies = max(copies, len(j.combine.weights) + 2)  # W', each ΔWᵢ, the result
            whole = max(whole, 4 * numel * copies + (j.nbytes_in if j.quant_in else 0))
        factors = sum(t.numel * 4 for a in self.adapters for t in a.all_tensors)
        return rings + whole + factors


class LayerError(BaseModel):
    """How much of the delta survived 4-bit re-quantisation in one layer."""

    name: str
    delta_norm: float
    delta_error: float  # ‖(Q(W+ΔW) − W) − ΔW‖ / ‖ΔW‖


class MergeReport(BaseModel):
    """What ``adapterctl merge`` did (or, with ``dry_run``, would do)."""

    out: str
    dry_run: bool
    device: str
    engine: str | None = None  # "numpy" (merge_cpu) or "torch" (merge_torch); None: dry run
    # The numpy engine's sums: "numpy", or the compiled kernel and its vector width
    # ("fused-avx512", "fused-avx2", "fused-generic").
    kernel: str | None = None
    shards: list[str]
    tensors_total: int
    tensors_merged: list[str]
    tensors_replaced: list[str]
    tensors_added: list[str]
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    peak_memory_estimate: int
    seconds: float
    quantize: str | None
    delta_error: float | None = None
    layers: list[LayerError] = []
    verified: int | None = None
    base_pin_checks: list[str] = []
    registered: str | None = None  # the registry version the output was recorded as
    warnings: list[str]
    provenance: dict[str, Any]


# ----------------------------------------------------------------------------- planning


def plan_merge(
    base: Checkpoint,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    *,
    dtype: str = "auto",
    quantize: str | None = None,
    quant_method: str = "optimal",
    max_shard_size: int | None = None,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
) -> MergePlan:
    """Decide every output tensor, shard and header before anything is written.

    Args:
        base: the base checkpoint (16/32-bit or bitsandbytes 4-bit).
        adapters: adapters to merge, in order.
        weights: one weight per adapter (default 1.0 each).
        dtype: ``auto`` keeps each tensor's dtype (a 4-bit weight becomes its compute dtype);
            ``bf16``/``fp16``/``fp32`` cast every floating tensor.
        quantize: ``"nf4"``/``"fp4"`` writes the linear weights in bitsandbytes 4-bit.
        quant_method: ``optimal`` (per-block scale minimising the error) or ``absmax``.
        max_shard_size: repack the output into shards of at most this many bytes.
        method: a composition method applied to each module's dense deltas at full rank
            (``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``; ``linear`` or None
            is the exact weighted sum); see ``adapterctl methods``.
        method_options: the method's options (``density``, ``majority_sign``,
            ``convention``, ``seed``).

    Raises:
        UsageError: mismatched weights, unknown dtype, DoRA combined with other adapters.
        ValidationFailed: an adapter does not fit the base (missing module, wrong shape).
        Conflict: two adapters replace the same tensor.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if not adapters:
        raise UsageError("give at least one adapter to merge")
    if len(weights) != len(adapters):
        raise UsageError(
            f"got {len(weights)} weights for {len(adapters)} adapters; pass -w once per SOURCE"
        )
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    if quantize is not None and quantize not in ("nf4", "fp4"):
        raise UsageError(f"unknown --quantize {quantize!r}; use nf4")
    dora = [a for a in adapters if any(m.is_dora for m in a.modules.values())]
    if dora and len(adapters) > 1:
        raise UsageError(
            f"{dora[0].path}: DoRA is not linear (W' = m·V/‖V‖), so a DoRA adapter merges "
            "alone; merge it first, then merge the others into the result"
        )
    combine = _method(method, method_options, adapters, weights)
    warnings = _preflight(base, adapters)
    weights_logical = base.weights
    jobs: dict[str, Job] = {}
    force = DTYPE_CHOICES[dtype]
    for shard in base.shards:
        for name, info in sorted(
            ((n, i) for n, i in base.tensors.items() if i.path == shard), key=lambda x: x[1].start
        ):
            if name not in weights_logical:
                continue  # 4-bit statistics travel with their weight
            shape, logical = weights_logical[name]
            out = force if (force and logical in FLOAT_DTYPES) else logical
            quant = base.quant.get(name)
            jobs[name] = Job(name, shape, out, source=info, quant_in=quant)
            if quant is not None:
                jobs[name].quant_aux = [
                    base.tensors[f"{name}{suffix}"]
                    for suffix in _QUANT_AUX_SUFFIXES
                    if f"{name}{suffix}" in base.tensors
                ] + [base.tensors[f"{name}.quant_state.bitsandbytes__{quant.quant_type}"]]
    added: list[str] = []
    extra_owner: dict[str, Path] = {}
    for index, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        binding = base.bind(adapter)
        missing = [t.module for t in binding.targets.values() if t.tensor is None]
        if missing:
            raise ValidationFailed(
                f"{adapter.path}: {len(missing)} module(s) not in the base, e.g. {missing[0]}; "
                "check the base with: adapterctl validate SOURCE --base BASE"
            )
        for extra in adapter.extras:
            tname = binding.extras.get(extra.target) or binding.add + extra.target.removeprefix(
                binding.strip
            )
            if tname in extra_owner:
                raise Conflict(
                    f"{tname} is replaced by both {extra_owner[tname]} and {adapter.path}; "
                    "merge them one at a time"
                )
            extra_owner[tname] = adapter.path
            if tname not in jobs:
                jobs[tname] = Job(tname, extra.tensor.shape, force or extra.tensor.dtype)
                added.append(tname)
            job = jobs[tname]
            job.replace = extra.tensor
            job.quant_in = None
            job.shape = extra.tensor.shape
            if job.out_dtype not in FLOAT_DTYPES:
                job.out_dtype = extra.tensor.dtype
        for name, mod in adapter.modules.items():
            target = binding.targets[name]
            assert target.tensor is not None
            mod.layout = target.layout
            job = jobs[target.tensor]
            if job.replace is None and tuple(mod.weight_shape) != tuple(job.shape):
                raise ValidationFailed(
                    f"{adapter.path}: {name} updates a {tuple(mod.weight_shape)} weight but the "
                    f"base's {target.tensor} is {tuple(job.shape)}; is this the right base?"
                )
            if mod.layout == "embedding" and job.replace is not None:
                rows = job.shape[0]
                if mod.in_features != rows:
                    raise ValidationFailed(
                        f"{adapter.path}: {name} has {mod.in_features} embedding rows, "
                        f"its saved layer {rows}"
                    )
            delta = Delta(mod, w, mod.layout, index)
            if mod.is_dora:
                if mod.layout == "embedding":
                    raise UnsupportedAdapter(
                        f"{adapter.path}: DoRA on embedding {name} is not supported by merge yet"
                    )
                job.dora = delta
            else:
                job.deltas.append(delta)
            if mod.bias is not None:
                bname = target.tensor.removesuffix("weight") + "bias"
                if bname not in jobs:
                    raise ValidationFailed(
                        f"{adapter.path}: {name} has a lora bias but the base layer has no bias "
                        f"({bname}); it cannot be merged"
                    )
                jobs[bname].bias_add.append((mod.bias, w * mod.scale))
    spec = _quant_spec(base, quantize, quant_method)
    skip = _skip_modules(base, spec)
    for job in jobs.values():
        if spec is not None and _quantizable(job, base, skip):
            job.quantize = spec
            if job.out_dtype not in ("BF16", "F16", "F32"):
                job.out_dtype = "BF16"
        elif job.quant_in is not None:
            job.out_dtype = force or job.quant_in.dtype
            if base.model_type in CONV1D_MODEL_TYPES and len(job.shape) == 2:
                # 4-bit Conv1D layers are stored as Linear (out, in); a 16-bit Conv1D is (in, out).
                job.transpose_out = True
                job.shape = (job.shape[1], job.shape[0])
    shards = _shard(base, list(jobs.values()), max_shard_size, added)
    config = _output_config(base, jobs, spec, skip, force)
    tokenizer_from = next(
        (a.path for a in adapters if a.path.is_dir() and _has_tokenizer(a.path)), None
    )
    if base.quant and spec is None:
        warnings.append(
            "the base is 4-bit: writing W_nf4 + ΔW in the compute dtype (the model the adapter "
            "was trained against); pass --quantize nf4 to write 4-bit instead"
        )
    provenance = {
        "tool": "adapterctl",
        "version": __version__,
        "base": {
            "path": str(base.path),
            "fingerprint": base_fingerprint(base),
            "architecture": base.architecture,
            "quantization": base.quantization,
        },
        "adapters": [
            {
                "path": str(a.path),
                "digest": adapter_digest(a.files, a.path),
                "weight": w,
                "base_model_name_or_path": a.config.base_model_name_or_path,
            }
            for a, w in zip(adapters, weights, strict=True)
        ],
        "dtype": dtype,
        "quantize": None if spec is None else {"type": spec.quant_type, "method": spec.method},
    }
    if combine is not None:
        chosen = {k: v for k, v in combine.options.model_dump().items() if v is not None}
        provenance["method"] = {"name": combine.method.name, **chosen}
        for job in jobs.values():
            job.combine = combine if job.deltas else None
    return MergePlan(
        base=base, adapters=adapters, weights=weights, shards=shards, config=config,
        quantize=spec, tokenizer_from=tokenizer_from, warnings=warnings, provenance=provenance,
    )  # fmt: skip


@dataclass(frozen=True)
class Combine:
    """A composition method applied at full rank to each module's dense deltas."""

    method: Any  # adapterctl.methods.Method
    options: Any  # its options model instance
    weights: tuple[float, ...]

    def generator(self, module: str) -> torch.Generator:
        """The per-module random stream (the same one ``compose`` uses for that module)."""
        import torch

        from adapterctl.compose import module_seed

        seed = int(getattr(self.options, "seed", 0))
        return torch.Generator().manual_seed(module_seed(seed, module))


def _method(
    name: str | None,
    options: dict[str, Any] | None,
    adapters: list[Adapter],
    weights: list[float],
) -> Combine | None:
    if name is None or name == "linear":
        if options and any(v is not None for v in options.values()):
            raise UsageError("--density/--majority-sign/--convention/--seed need --method")
        return None
    from adapterctl.methods import get_method, parse_options

    method = get_method(name)
    if method.factored:
        raise UsageError(
            f"--method {name} only makes sense for low-rank adapters: use "
            f"`adapterctl compose --method {name}`, or --method linear to merge the exact sum"
        )
    if any(m.is_dora for a in adapters for m in a.modules.values()):
        raise UsageError("DoRA adapters cannot be combined by --method (DoRA is not linear)")
    return Combine(method, parse_options(method, options), tuple(weights))


def _preflight(base: Checkpoint, adapters: list[Adapter]) -> list[str]:
    """Run ``validate``'s rules against the base before planning: errors refuse the merge
    (exit 3); warnings (e.g. a differing base name) come back to be reported."""
    from adapterctl.validate import require_fit

    warnings: list[str] = []
    for a in adapters:
        report = require_fit(a, base)
        warnings += [f"{f.code}: {f.message}" for f in report.findings if f.severity == "warning"]
    return warnings


def _quant_spec(base: Checkpoint, quantize: str | None, method: str) -> QuantSpec | None:
    if quantize is None:
        return None
    qc = base.config.get("quantization_config") or {}
    if base.quant and isinstance(qc, dict):
        first = next(iter(base.quant.values()))
        return QuantSpec(
            quant_type=str(qc.get("bnb_4bit_quant_type", first.quant_type)),
            blocksize=first.blocksize,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", first.nested)),
            method=method,
        )
    # BitsAndBytesConfig's defaults, except double quantisation as QLoRA uses it.
    return QuantSpec(quant_type=quantize, blocksize=64, double_quant=True, method=method)


def _skip_modules(base: Checkpoint, spec: QuantSpec | None) -> list[str]:
    if spec is None:
        return []
    qc = base.config.get("quantization_config") or {}
    skip = qc.get("llm_int8_skip_modules") if isinstance(qc, dict) else None
    if skip:
        return list(skip)
    return ["lm_head"]


def _quantizable(job: Job, base: Checkpoint, skip: list[str]) -> bool:
    if base.quant:
        return job.name in base.quant
    if len(job.shape) != 2 or not job.name.endswith(".weight"):
        return False
    module = job.name.removesuffix(".weight")
    if any(part in module for part in _NOT_LINEAR):
        return False
    if any(module == s or module.endswith("." + s) for s in skip):
        return False
    return job.out_dtype in FLOAT_DTYPES


def _shard(
    base: Checkpoint, jobs: list[Job], max_size: int | None, added: list[str]
) -> list[OutShard]:
    if max_size is None:
        groups: list[list[Job]] = [[] for _ in base.shards]
        index = {p: i for i, p in enumerate(base.shards)}
        for j in jobs:
            groups[index[j.source.path] if j.source is not None else len(groups) - 1].append(j)
        groups = [g for g in groups if g]
    else:
        groups, size = [[]], 0
        for j in jobs:
            n = j.nbytes_out
            if groups[-1] and size + n > max_size:
                groups.append([])
                size = 0
            groups[-1].append(j)
            size += n
    if len(groups) == 1:
        return [OutShard("model.safetensors", groups[0])]
    n = len(groups)
    return [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _output_config(
    base: Checkpoint,
    jobs: dict[str, Job],
    spec: QuantSpec | None,
    skip: list[str],
    force: str | None,
) -> dict[str, Any]:
    config = json.loads(json.dumps(base.config))
    if not config:
        return config
    if spec is None:
        config.pop("quantization_config", None)
    else:
        compute = _compute_dtype(base, jobs)
        config["quantization_config"] = {
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": spec.quant_type, "bnb_4bit_use_double_quant": spec.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip or None, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
        }  # fmt: skip
    if force:
        name = TORCH_DTYPE_NAMES[force]
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = name
    # A resized vocabulary (saved embedding/head layers of another size) goes into the config.
    for job in jobs.values():
        resized = (
            job.replace is not None and job.source is not None and job.shape != job.source.shape
        )
        if resized and any(k in job.name for k in _VOCAB_TENSORS):
            target = config.get("text_config") if "text_config" in config else config
            if isinstance(target, dict):
                target["vocab_size"] = int(job.shape[0])
    return config


def _compute_dtype(base: Checkpoint, jobs: dict[str, Job]) -> str:
    qc = base.config.get("quantization_config") or {}
    if isinstance(qc, dict) and qc.get("bnb_4bit_compute_dtype"):
        return str(qc["bnb_4bit_compute_dtype"])
    dtypes = [j.out_dtype for j in jobs.values() if j.out_dtype in ("BF16", "F16", "F32")]
    common = max(set(dtypes), key=dtypes.count) if dtypes else "BF16"
    return TORCH_DTYPE_NAMES[common]


def _has_tokenizer(path: Path) -> bool:
    return any((path / n).exists() for n in TOKENIZER_FILES)


# ----------------------------------------------------------------------------- execution


def resolve_device(device: str) -> str:
    """``auto`` → the first CUDA device when there is one, else ``cpu``; checks the others.

    Returns a device string (``cpu``, ``cuda``, ``cuda:1``). torch is imported only when the
    answer could be CUDA: on a machine without an NVIDIA driver, ``auto`` and ``cpu`` cost
    nothing (importing torch takes seconds, as long as a whole CPU merge of a small model).
    """
    if device == "cpu":
        return "cpu"
    if device == "auto" and not _nvidia_driver_present():
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported --device {device!r}; use auto, cpu or cuda[:N]")
    return str(dev)


def _nvidia_driver_present() -> bool:
    """False only where CUDA surely cannot work: Linux without the NVIDIA driver's device
    files (native or WSL2). Elsewhere, ask torch."""
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def run_merge(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    force: bool = False,
    verify: bool = False,
    max_delta_error: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    fsync: bool = False,
) -> MergeReport:
    """Write the planned checkpoint to ``out``, atomically.

    Args:
        plan: from ``plan_merge``.
        out: the output folder; refused if it exists unless ``force``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``: where the float32 math runs.
        force: replace an existing ``out``.
        verify: re-read the output and check sampled rows of every merged tensor against a
            fresh float64 computation.
        max_delta_error: with 4-bit output, fail (exit 3) when the overall delta error is
            above this; nothing is left behind.
        progress: called once per tensor written, with (bytes written so far, total bytes).
        fsync: flush every shard to the disk before the rename (survives a power loss, at
            the disk's write speed). Without it, as with ``cp`` and ``save_pretrained``, the
            OS writes the data back in its own time; the rename still guarantees that an
            interrupted process never leaves a half-written OUT.

    Returns:
        The report (also written, with the provenance, to ``out/adapterctl.json``).

    Raises:
        Conflict: ``out`` exists and ``force`` is False.
        OperationalError: not enough free disk space, or an I/O error.
        ValidationFailed: the delta error exceeded ``max_delta_error``.
    """
    out_path = Path(out)
    dev = resolve_device(device)
    if out_path.exists() and not force:
        raise Conflict(f"{out_path} already exists; pass --force to replace it")
    parent = out_path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_path)
    free = shutil.disk_usage(parent).free
    need = plan.bytes_out + (1 << 20)
    if free < need:
        raise OperationalError(
            f"not enough free space in {parent}: the merge writes {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free some space or choose another -o"
        )
    tmp = parent / f".{out_path.name}.partial-{os.getpid()}"
    tmp.mkdir()
    _keep_heap_small()
    start = time.perf_counter()
    read_before = BYTES_READ.value
    try:
        overflow = Overflow()
        engine, kernel, layers = _execute(plan, tmp, dev, progress, fsync, overflow)
        report = _report(plan, out_path, dev, layers, time.perf_counter() - start)
        report.engine, report.kernel = engine, kernel
        overflowed = overflow.warning()
        if overflowed:
            report.warnings.append(overflowed)
        report.bytes_read = BYTES_READ.value - read_before + _copied_bytes(plan)
        err = report.delta_error
        if max_delta_error is not None and err is not None and err > max_delta_error:
            raise ValidationFailed(
                f"4-bit re-quantisation kept too little of the adapter: delta error "
                f"{report.delta_error:.3f} > --max-delta-error {max_delta_error}; "
                "merge without --quantize"
            )
        _write_side_files(plan, tmp, report)
        if verify:
            from adapterctl.merge_verify import verify_output

            report.verified = verify_output(plan, tmp)
            (tmp / "adapterctl.json").write_text(_provenance_json(plan, report))
        if fsync:
            fsync_dir(tmp)
        replace_dir(tmp, out_path)
        return report
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, AdapterctlError) or exc.filename:
            raise
        # A write that failed mid-merge (a full disk, a quota, an I/O error) names no file.
        raise OperationalError(
            f"{out_path}: writing the merged model failed ({exc.strerror or exc}); nothing "
            "was left behind; free some space or choose another -o"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _execute(
    plan: MergePlan,
    tmp: Path,
    dev: str,
    progress: Callable[[int, int], None] | None,
    durable: bool,
    overflow: Overflow,
) -> tuple[str, str | None, list[LayerError]]:
    """Write the plan's shards into ``tmp`` with the engine that fits: NumPy on the CPU for
    plain 16/32-bit merges (``merge_cpu``: no torch import), torch otherwise. Returns the
    engine's name, the NumPy engine's kernel (None for torch) and the 4-bit layers' delta
    errors."""
    from adapterctl import merge_cpu

    if dev == "cpu" and merge_cpu.supports(plan):
        return "numpy", merge_cpu.write_shards(plan, tmp, progress, durable, overflow), []
    from adapterctl import merge_torch

    layers = merge_torch.write_shards(plan, tmp, dev, progress, durable, overflow)
    return "torch", None, layers


def _keep_heap_small() -> None:
    """Make glibc hand big tensor buffers back to the OS when freed.

    glibc raises its mmap threshold after large frees, after which freed tensor memory stays
    in the heap (per thread) and the process's anonymous memory grows with each tensor;
    fixing the threshold keeps peak memory at the few tensors actually alive.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _remove_stale_partials(out_path: Path) -> None:
    """Delete partial outputs of earlier runs that were killed (their process is gone)."""
    parent = out_path.resolve().parent
    for p in parent.glob(f".{out_path.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copied_bytes(plan: MergePlan) -> int:
    return sum(j.source.nbytes for j in plan.jobs if j.copy_bytes and j.source is not None)


# ------------------------------------------------------------------- shared by the engines


class Overflow:
    """Values that became ±inf when rounded into a float16 output, per tensor. The engines
    count them (only for float16 outputs, where a bf16 or float32 value beyond ±65504 does
    not fit); ``run_merge`` turns the counts into a warning. Safe to add to from threads."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self.counts[name] = self.counts.get(name, 0) + n

    def warning(self) -> str | None:
        if not self.counts:
            return None
        name, n = max(self.counts.items(), key=lambda kv: kv[1])
        return (
            f"{len(self.counts)} tensor(s) hold values beyond float16's range (±65504) that "
            f"became ±inf, e.g. {n} in {name}; write bf16 or fp32 (--dtype) instead"
        )


def pause_for_tests(tmp: Path) -> None:
    """Test-only pause point: announce the partial folder and wait to be killed."""
    marker = os.environ.get("ADAPTERCTL_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(str(tmp))
    threading.Event().wait(600)


def require_inside(info: TensorInfo, size: int) -> None:
    """Refuse a base file that has shrunk below a tensor since it was opened."""
    if info.end > size:
        from adapterctl.errors import BrokenFile

        raise BrokenFile(f"{info.path}: truncated inside {info.name}; re-download it")


def copy_tensor_bytes(info: TensorInfo, fd: int, offset: int) -> None:
    """Copy a tensor's bytes from the base file into ``fd`` at ``offset`` (in the kernel where
    possible)."""
    try:
        copy_range(info.path, info.start, info.nbytes, fd, offset)
    except EOFError:
        from adapterctl.errors import BrokenFile

        raise BrokenFile(f"{info.path}: truncated inside {info.name}; re-download it") from None


# ----------------------------------------------------------------------------- side files


def _write_side_files(plan: MergePlan, tmp: Path, report: MergeReport) -> None:
    base_dir = plan.base.path if plan.base.path.is_dir() else plan.base.path.parent
    skip = {INDEX_NAME, "adapterctl.json"}
    tokenizer_names = set(TOKENIZER_FILES)
    for f in sorted(base_dir.iterdir()):
        if not f.is_file() or f.name in skip or f.suffix in (".safetensors", ".bin", ".pt"):
            continue
        if f.name.startswith("."):
            continue
        if plan.tokenizer_from is not None and f.name in tokenizer_names:
            continue
        if f.name == "config.json" and plan.config:
            continue
        shutil.copy2(f, tmp / f.name)
    if plan.tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = plan.tokenizer_from / name
            if src.exists():
                shutil.copy2(src, tmp / name)
    if plan.config:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": sum(e[3] for s in plan.shards for e in s.entries())},
            "weight_map": {e[0]: s.name for s in plan.shards for e in s.entries()},
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "adapterctl.json").write_text(_provenance_json(plan, report))


def _provenance_json(plan: MergePlan, report: MergeReport) -> str:
    data = dict(plan.provenance)
    data["result"] = {
        "tensors_merged": len(report.tensors_merged),
        "delta_error": report.delta_error,
        "verified_rows": report.verified,
    }
    return json.dumps(data, indent=2) + "\n"


def _report(
    plan: MergePlan, out: Path, dev: Any, layers: list[LayerError], seconds: float
) -> MergeReport:
    import math

    jobs = plan.jobs
    total_delta = math.sqrt(sum(layer.delta_norm**2 for layer in layers))
    total_err = (
        math.sqrt(sum((layer.delta_error * layer.delta_norm) ** 2 for layer in layers))
        / total_delta
        if layers and total_delta > 0
        else None
    )
    warnings = list(plan.warnings)
    if total_err is not None and total_err > 0.5:
        warnings.append(
            f"4-bit re-quantisation erased most of the adapter: delta error {total_err:.2f} "
            "(1.0 = nothing of ΔW survives); merge without --quantize to keep it"
        )
    return MergeReport(
        out=str(out),
        dry_run=False,
        device=str(dev),
        shards=[s.name for s in plan.shards],
        tensors_total=len(jobs),
        tensors_merged=[j.name for j in jobs if j.deltas or j.dora or j.bias_add],
        tensors_replaced=[j.name for j in jobs if j.replace is not None and j.source is not None],
        tensors_added=[j.name for j in jobs if j.source is None],
        tensors_copied=sum(1 for j in jobs if j.copy_bytes),
        bytes_read=plan.bytes_in,
        bytes_written=plan.bytes_out,
        peak_memory_estimate=plan.peak_memory_estimate(),
        seconds=seconds,
        quantize=None if plan.quantize is None else plan.quantize.quant_type,
        delta_error=total_err,
        layers=layers,
        warnings=warnings,
        provenance=plan.provenance,
    )


def dry_run_report(plan: MergePlan, out: str | os.PathLike[str]) -> MergeReport:
    """The report of a merge that is planned but not written (``--dry-run``)."""
    report = _report(plan, Path(out), "-", [], 0.0)
    report.dry_run = True
    return report


def check_base_pins(
    versions: list[Any], base: Checkpoint, *, allow_mismatch: bool = False
) -> tuple[list[str], list[str]]:
    """Check each registry input's base pin against ``base`` (DESIGN: "Identity").

    Args:
        versions: ``adapterctl.refs.registry_versions`` of the SOURCEs (None: a local path,
            which has no pin to check).
        base: the checkpoint about to be merged into.
        allow_mismatch: report a mismatch as a warning instead of refusing.

    Returns:
        (what was checked, one line per input; warnings for allowed mismatches).

    Raises:
        Conflict: a pin differs from ``base`` and ``allow_mismatch`` is False (exit 5).
    """
    if not any(v is not None for v in versions):
        return [], []
    from adapterctl.registry import Registry

    checks: list[str] = []
    warnings: list[str] = []
    with Registry(create=False) as reg:
        for v in versions:
            if v is None:
                continue
            try:
                checks.append(f"{v.ref}: base pin checked by {reg.check_base_pin(v, base)}")
            except Conflict as exc:
                if not allow_mismatch:
                    raise
                warnings.append(f"--allow-base-mismatch: {exc}")
    return checks, warnings


def merge(
    base: Checkpoint,
    adapters: list[Adapter],
    out: str | os.PathLike[str],
    weights: list[float] | None = None,
    **options: Any,
) -> MergeReport:
    """Plan and run a merge in one call (see ``plan_merge`` and ``run_merge`` for options).

    Example:
        >>> from adapterctl.checkpoint import open_checkpoint
        >>> from adapterctl.formats import read
        >>> report = merge(open_checkpoint("base"), [read("adapter")], "merged")
        >>> report.tensors_merged[:1]
        ['model.layers.0.self_attn.q_proj.weight']
    """
    plan_keys = {"dtype", "quantize", "quant_method", "max_shard_size", "method", "method_options"}
    plan = plan_merge(
        base, adapters, weights, **{k: v for k, v in options.items() if k in plan_keys}
    )
    return run_merge(plan, out, **{k: v for k, v in options.items() if k not in plan_keys})
