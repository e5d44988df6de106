"""The merge plan: every output tensor and header decided before the first byte is written.

``plan_merge`` reads headers only (base and adapters), runs ``validate``'s pre-flight, and
returns a ``MergePlan``: one ``Job`` per output tensor (copied as bytes, or merged from the base
tensor and each adapter's ``Delta``), grouped into output shards. The engines
(``numpy_engine``, ``torch_engine``) write a plan; ``verify`` checks one that was written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from adapterctl import __version__
from adapterctl.adapter import Adapter, Layout, LoraModule, TensorSource
from adapterctl.checkpoint import CONV1D_MODEL_TYPES, Checkpoint, QuantInfo, weight_stem
from adapterctl.device import workers
from adapterctl.errors import (
    Conflict,
    UnsupportedAdapter,
    UsageError,
    ValidationFailed,
)
from adapterctl.identity import adapter_digest, base_fingerprint
from adapterctl.nf4 import layout as nf4_layout
from adapterctl.tensorfile import (
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
_VOCAB_TENSORS = ("embed_tokens", "wte", "word_embeddings", "lm_head")


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
            q = self.quantize
            return nf4_layout.stored_tensors(
                self.name, self.shape, quant_type=q.quant_type, blocksize=q.blocksize,
                double_quant=q.double_quant,
            )  # fmt: skip
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
    engine: str | None = None  # "numpy" or "torch" (the engine that wrote it); None: dry run
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
    # How far BASE was checked against the inputs' base pins, weakest input first: "content"
    # (weight-file hashes), "fingerprint" (tensor names, shapes, dtypes), "unpinned" (an input
    # with no pin to compare) or "mismatch" (a differing pin let through).
    base_check: str = "unpinned"
    # How the merged values were rounded (``rounding.describe``); None: dry run
    rounding: str | None = None
    registered: str | None = None  # the registry version the output was recorded as
    published: str | None = None  # hf://owner/name@v<N> for an -o hf://… output
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
        UsageError: mismatched weights, unknown dtype.
        UnsupportedAdapter: a DoRA adapter with other adapters or a ``--method`` (exit 3, as
            in ``compose``).
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
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"weights {weights}: each -w must be a finite number")
    if quantize is not None and quantize not in nf4_layout.QUANT_TYPES:
        raise UsageError(f"unknown --quantize {quantize!r}; use nf4")
    dora = [a for a in adapters if a.is_dora]
    if dora and len(adapters) > 1:
        raise UnsupportedAdapter(
            f"{dora[0].path}: a DoRA adapter (use_dora) cannot be merged with other adapters: "
            "its update m·(W+ΔW)/‖W+ΔW‖ depends on the base weights and is not linear in ΔW; "
            "merge it on its own first, then merge the others into the result"
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
                jobs[name].quant_aux = [base.tensors[n] for n in quant.statistics]
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
    _check_range(jobs.values(), adapters)
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
            "path": base.location,
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

        from adapterctl.methods import module_seed

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
    dora = next((a for a in adapters if a.is_dora), None)
    if dora is not None:
        raise UnsupportedAdapter(
            f"{dora.path}: a DoRA adapter (use_dora) cannot be combined by --method {name}: its "
            "update m·(W+ΔW)/‖W+ΔW‖ depends on the base weights and is not linear in ΔW; "
            "merge it on its own with --method linear"
        )
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


def _check_range(jobs: Iterable[Job], adapters: list[Adapter]) -> None:
    """Refuse, before anything is written, an update the merge cannot compute: a bound on
    Σ|wᵢ·sᵢ|·|BᵢAᵢ| (``LoraModule.update_bound``; lora biases added) that is not finite (a
    weight × scale or a factor beyond float64) or beyond float32's range, where the engines
    compute (float64 for a float64 output). Values that overflow only the output dtype
    (float16's ±65504) are found while writing (``Overflow``).

    Raises:
        ValidationFailed: naming the adapter and module (the tensor, for a sum) (exit 3).
    """
    from adapterctl.lowrank import range_problem

    for job in jobs:
        terms = [*job.deltas, *([job.dora] if job.dora is not None else [])]
        total = sum(d.module.update_bound(d.weight * d.module.scale) for d in terms)
        for t, c in job.bias_add:
            total += abs(c) * float(abs(t.array()).max(initial=0.0))
        if len(terms) == 1:
            d = terms[0]
            what, where = "its update w·s·B·A", f"{adapters[d.index].path}: {d.module.name}"
        else:
            what = f"the sum of its {len(terms)} updates" if terms else "its lora bias update"
            where = job.name
        problem = range_problem(total, "float64" if job.out_dtype == "F64" else "float32", what)
        if problem is not None:
            raise ValidationFailed(
                f"{where}: {problem}; merging would write inf: lower the weights (-w) or the "
                "adapter's lora_alpha (see: adapterctl inspect SOURCE)"
            )


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
    stem = weight_stem([str(s) for s in base.shards])  # a diffusers model keeps its names
    if len(groups) == 1:
        return [OutShard(f"{stem}.safetensors", groups[0])]
    n = len(groups)
    return [OutShard(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


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
        config["quantization_config"] = nf4_layout.quantization_config(
            spec.quant_type, spec.double_quant, _compute_dtype(base, jobs), skip or None
        )
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
