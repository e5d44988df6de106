"""``compose``: several adapters into one, by a registered method, on ΔW rather than on factors.

PEFT's ``add_weighted_adapter`` combines A and B separately, so its ``linear``/``ties``/``dare``
results carry cross terms and are not the weighted sum; it also copies rsLoRA/DoRA/lora-bias
flags into an adapter whose factors already hold the scale. Here every method is defined on the
per-module updates ΔWᵢ = scaleᵢ·Bᵢ·Aᵢ:

- weighted sums (``linear``, ``cat``, ``svd``) are computed on the factors: the concatenation
  [w₁s₁B₁, w₂s₂B₂, …]·[A₁; A₂; …] is the sum exactly; truncating it uses the small core
  (QR of the stacked B's and Aᵀ's, SVD of the Σrᵢ × Σrᵢ product), never a dense out×in SVD;
- the other methods (TIES, DARE, magnitude pruning) are defined elementwise on the dense
  ΔWᵢ: they run in float32 on the device, one module at a time, and the result is compressed
  to a rank with an exact or randomized SVD, reporting the fraction of energy kept.

The output's scale is folded into lora_B and written with alpha = r, so any PEFT loads it as
it is meant (see ``adapterctl.formats.peft.write_peft``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from adapterctl.adapter import Adapter, ExtraTensor, LoraModule, MemoryTensor, natural_key
from adapterctl.errors import Conflict, UnsupportedAdapter, UsageError, ValidationFailed
from adapterctl.methods import Method, MethodOptions, get_method, module_seed, parse_options

if TYPE_CHECKING:
    import torch

# Below this fraction of ‖ΔW‖² kept, a truncated result is reported with a warning.
LOW_ENERGY = 0.9


class ModuleComposition(BaseModel):
    """One output module."""

    name: str
    shape: list[int]  # the base weight's shape this update applies to
    inputs: int  # how many inputs have this module (the others count as zero)
    rank: int  # the rank written
    norm: float  # ‖ΔW‖_F of the method's exact result, before any truncation
    energy_kept: float  # fraction of ‖ΔW‖²_F the written rank keeps (1.0: exact)


class ComposeReport(BaseModel):
    """What ``compose`` did, as ``adapterctl compose --json`` prints it."""

    method: str
    options: dict[str, Any]
    weights: list[float]
    inputs: list[str]
    out: str | None = None
    device: str
    exact: bool  # every module written without truncation
    energy_kept: float  # Σ kept energy / Σ energy over all modules
    ranks: list[int]
    modules: list[ModuleComposition]
    carried: list[str]  # full tensors carried over (modules_to_save copies, trained biases…)
    warnings: list[str]
    seconds: float
    registered: str | None = None  # the registry version OUT was recorded as
    published: str | None = None  # hf://owner/name@v<N> for an -o hf://… output


@dataclass
class Composition:
    """The composed adapter (in memory, scale folded into B) and the report."""

    adapter: Adapter
    report: ComposeReport


def compose(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    method: str | Method = "linear",
    options: Mapping[str, Any] | MethodOptions | None = None,
    *,
    device: str = "auto",
    allow_base_mismatch: bool = False,
    svd: str = "auto",
) -> Composition:
    """Combine adapters into one by ``method``; write the result with ``formats.peft.write_peft``.

    Inputs may differ in ranks, target modules (a module missing from an input counts as a
    zero update), scaling (rsLoRA, rank/alpha patterns) and dtype; weights may be negative.
    lora biases combine linearly (Σ wᵢ·scaleᵢ·biasᵢ, for every method). Full tensors
    (``modules_to_save`` copies, trained biases, saved base layers) are carried over as they
    are, unweighted; two inputs carrying different copies of one tensor are refused.

    Args:
        adapters: the inputs, from ``adapterctl.formats.read``.
        weights: one per input (default 1.0 each).
        method: a registered method or its name (``adapterctl.methods.methods()``).
        options: the method's options (``rank``, ``density``, ``majority_sign``,
            ``convention``, ``seed``), validated against its ``options_model``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``: where dense methods run (float32).
        allow_base_mismatch: compose inputs whose configs name different base models.
        svd: ``auto``, ``exact`` or ``randomized``: how dense results are compressed.

    Returns:
        The composed adapter and its report.

    Raises:
        UsageError: a wrong number of weights, a bad option.
        NotFound: an unknown method.
        UnsupportedAdapter: a DoRA input (its update is not linear in ΔW).
        ValidationFailed: an input fails ``validate``'s structure rules, inputs disagree on a
            module's shape, or carry different copies of one full tensor; a module's result
            (or its weighted inputs) would leave float32's range.
        Conflict: inputs name different base models (without ``allow_base_mismatch``).

    Example:
        >>> result = compose([read("a"), read("b")], [0.7, 0.3], "svd", {"rank": 16})
        >>> write_peft(result.adapter, "ab")
        >>> round(result.report.energy_kept, 3)
        0.998
    """
    from adapterctl.extras import require

    require("torch", "compose")
    import torch

    from adapterctl.device import resolve_device

    start = time.perf_counter()
    m = get_method(method) if isinstance(method, str) else method
    opts = parse_options(m, options)
    if not adapters:
        raise UsageError("compose needs at least one SOURCE")
    w = [1.0] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise UsageError(f"got {len(w)} weights for {len(adapters)} SOURCE(s); pass one per SOURCE")
    if not all(math.isfinite(x) for x in w):
        raise UsageError(f"weights {w}: each -w must be a finite number")
    warnings = check_inputs(adapters, allow_base_mismatch=allow_base_mismatch)
    extras = _carry_extras(adapters)
    dev = torch.device(resolve_device(device))
    modules = _union(adapters)
    rank_opt = getattr(opts, "rank", None)
    default_rank = max(mod.rank for a in adapters for mod in a.modules.values())
    truncate = m.truncates or rank_opt is not None
    rank = rank_opt or default_rank
    seed = int(getattr(opts, "seed", 0))

    out: dict[str, LoraModule] = {}
    rows: list[ModuleComposition] = []
    kept_total = energy_total = 0.0
    for name, present in modules.items():
        parts = [(i, mod) for i, mod in enumerate(present) if mod is not None]
        first = parts[0][1]
        total = sum(mod.update_bound(w[i] * mod.scale) for i, mod in parts)
        _require_range(name, total, "the weighted sum Σ w·s·B·A", "lower the weights (-w)")
        if m.factored:
            b, a, norm, kept = _factored(parts, w, rank if truncate else None)
        else:
            gen = torch.Generator().manual_seed(module_seed(seed, name))
            b, a, norm, kept = _dense(m, opts, parts, w, len(adapters), rank, dev, gen, svd)
        bias = _bias(parts, w)
        out[name] = factors_module(first, b, a, bias)
        kept_total += kept * norm**2
        energy_total += norm**2
        rows.append(
            ModuleComposition(
                name=name, shape=list(first.weight_shape), inputs=len(parts),
                rank=int(a.shape[0]), norm=norm, energy_kept=kept,
            )
        )  # fmt: skip
    energy = 1.0 if energy_total == 0.0 else kept_total / energy_total
    if (not m.factored or truncate) and energy < LOW_ENERGY:
        hint = (
            "the result is close to full rank: merge it into the base at full rank with "
            f"adapterctl merge BASE SOURCE... --method {m.name}, or raise --rank"
            if not m.factored
            else "raise --rank (or compose with --method linear: exact, rank Σrᵢ)"
        )
        warnings.append(f"rank {rank} keeps {energy:.1%} of ‖ΔW‖² overall; {hint}")
    check_result(out, "composed", "lower the weights (-w)")
    composed = Adapter(
        path=Path("<composed>"),
        format="peft",
        config=_template_config(adapters),
        modules=out,
        extras=extras,
    )
    report = ComposeReport(
        method=m.name,
        options=opts.model_dump(mode="json"),
        weights=w,
        inputs=[str(a.path) for a in adapters],
        device=str(dev),
        exact=all(r.energy_kept == 1.0 for r in rows) and m.factored and not truncate,
        energy_kept=energy,
        ranks=sorted({r.rank for r in rows}),
        modules=rows,
        carried=sorted(e.target for e in extras),
        warnings=warnings,
        seconds=time.perf_counter() - start,
    )
    return Composition(adapter=composed, report=report)


def check_inputs(adapters: Sequence[Adapter], *, allow_base_mismatch: bool = False) -> list[str]:
    """Refuse inputs that cannot be combined; return warnings about what is dropped.

    DoRA inputs are refused (exit 3), as are inputs failing ``validate``'s structure rules;
    inputs naming different base models are a conflict (exit 5) unless allowed.
    """
    from adapterctl.identity import model_key
    from adapterctl.validate import validate

    warnings: list[str] = []
    for a in adapters:
        if a.is_dora:
            raise UnsupportedAdapter(
                f"{a.path}: a DoRA adapter (use_dora) cannot be combined: its update "
                "m·(W+ΔW)/‖W+ΔW‖ depends on the base weights and is not linear in ΔW; merge "
                "it into the base on its own with: adapterctl merge BASE SOURCE"
            )
        report = validate(a)
        errors = [f for f in report.findings if f.severity == "error"]
        if errors:
            f = errors[0]
            where = f" {f.module}" if f.module else ""
            raise ValidationFailed(
                f"{a.path}: {f.code}{where}: {f.message}; see: adapterctl validate {a.path}"
            )
        if a.unknown_tensors:
            warnings.append(
                f"{a.path}: {len(a.unknown_tensors)} tensor(s) adapterctl does not know are "
                f"left out (e.g. {a.unknown_tensors[0]})"
            )
    named = {
        (model_key(a.config.base_model_name_or_path), a.config.base_model_name_or_path)
        for a in adapters
        if a.config.base_model_name_or_path
    }
    keys = {k for k, _ in named}
    if len(keys) > 1:
        names = ", ".join(sorted(repr(n) for _, n in named))
        if not allow_base_mismatch:
            raise Conflict(
                f"the inputs name different base models ({names}); pass --allow-base-mismatch "
                "if they were trained on the same weights"
            )
        warnings.append(f"inputs name different base models ({names}); composed anyway")
    return warnings


def _union(adapters: Sequence[Adapter]) -> dict[str, list[LoraModule | None]]:
    """Module name → each input's module (None where missing); shapes must agree."""
    names = sorted({n for a in adapters for n in a.modules}, key=natural_key)
    out: dict[str, list[LoraModule | None]] = {}
    for name in names:
        present = [a.modules.get(name) for a in adapters]
        seen = [(a, mod) for a, mod in zip(adapters, present, strict=True) if mod is not None]
        a0, m0 = seen[0]
        for a1, m1 in seen[1:]:
            same = (m1.layout, m1.weight_shape, m1.b.shape[2:]) == (
                m0.layout, m0.weight_shape, m0.b.shape[2:]
            )  # fmt: skip
            if not same:
                raise ValidationFailed(
                    f"{name} updates a {m0.layout} {list(m0.weight_shape)} weight in {a0.path} "
                    f"but a {m1.layout} {list(m1.weight_shape)} one in {a1.path}; "
                    "were they trained on the same base?"
                )
        out[name] = present
    return out


def _factored(
    parts: list[tuple[int, LoraModule]], weights: list[float], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Σ wᵢ·sᵢ·BᵢAᵢ as factors: concatenated (rank None) or truncated by the small-core SVD.

    Returns (B, A, ‖exact sum‖_F, energy kept); the algebra runs in float64.
    """
    import torch

    from adapterctl.lowrank import core_svd, stack_factors

    b, a = stack_factors(
        [(mod.B(torch.float64), mod.A(torch.float64), weights[i] * mod.scale) for i, mod in parts]
    )  # (out, Σr), (Σr, in)
    svd = core_svd(b, a)
    norm = float(svd.s.square().sum().sqrt())
    if rank is None:
        return b.float(), a.float(), norm, 1.0
    kept = svd.energy(rank)
    bt, at = svd.factors(rank)  # (out, k), (k, in)
    return bt.float(), at.float(), norm, kept


def _dense(
    m: Method, opts: MethodOptions, parts: list[tuple[int, LoraModule]], weights: list[float],
    n: int, rank: int, dev: torch.device, gen: torch.Generator, how: str,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:  # fmt: skip
    """Apply the method to the dense float32 ΔWᵢ on ``dev`` and compress to ``rank``."""
    import torch

    from adapterctl.lowrank import dense_truncate

    first = parts[0][1]
    shape = (first.out_features, first.in_features)
    deltas = [torch.zeros(shape, device=dev) for _ in range(n)]  # missing inputs: zero
    for i, mod in parts:
        b = mod.B().to(dev)  # (out, r) float32
        a = mod.A().to(dev)  # (r, in) float32
        deltas[i] = torch.mul(b @ a, mod.scale)  # (out, in)
    combined = m.combine_dense(deltas, weights, opts, gen)  # (out, in) float32
    del deltas
    if not bool(torch.isfinite(combined).all()):  # e.g. DARE's 1/density rescaling
        raise ValidationFailed(
            f"{first.name}: the {m.name} result leaves float32's range (inf or NaN); nothing "
            "was written: lower the weights (-w)"
        )
    norm = float(combined.double().square().sum().sqrt())
    b, a, kept = dense_truncate(combined, rank, how=how, generator=gen)
    return b.cpu(), a.cpu(), norm, kept


def _bias(parts: list[tuple[int, LoraModule]], weights: list[float]) -> torch.Tensor | None:
    """Σ wᵢ·sᵢ·biasᵢ (lora biases are linear for every method), or None without any."""
    import torch

    terms = [(weights[i] * mod.scale, mod.bias) for i, mod in parts if mod.bias is not None]
    if not terms:
        return None
    total = sum(c * t.load().to(torch.float64).reshape(-1) for c, t in terms)
    assert isinstance(total, torch.Tensor)
    return total.float()  # (out,)


def check_result(modules: Mapping[str, LoraModule], what: str, fix: str) -> None:
    """Refuse a composed or resized adapter, before it is written, where a module's factors
    or lora bias hold inf or NaN or its update s·B·A leaves float32's range.

    Args:
        modules: the result's modules (scale folded into B).
        what: what made them (``composed``, ``resized``), for the message.
        fix: the next thing to try, for the message.

    Raises:
        ValidationFailed: naming the first such module (exit 3).
    """
    for name, mod in sorted(modules.items()):
        _require_range(name, mod.update_bound(), f"the {what} update s·B·A", fix)
        if mod.bias is not None:
            top = float(abs(mod.bias.array()).max(initial=0.0)) * abs(mod.scale)
            _require_range(name, top, f"the {what} lora bias", fix)


def _require_range(name: str, bound: float, what: str, fix: str) -> None:
    """Raise ``ValidationFailed`` naming ``name`` if ``bound`` (``lowrank.entry_bound``) is
    beyond float32's range or not finite."""
    from adapterctl.lowrank import range_problem

    problem = range_problem(bound, what=what)
    if problem is not None:
        raise ValidationFailed(f"{name}: {problem}; nothing was written: {fix}")


def factors_module(
    like: LoraModule, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None = None
) -> LoraModule:
    """A scale-1 module of factors B (out, k), A (k, in) in ``like``'s layout and shapes."""
    k = int(a.shape[0])
    a_shape = (k, *like.a.shape[1:])  # conv: (k, in, *kernel)
    b_shape = (like.b.shape[0], k, *like.b.shape[2:])  # conv: (out, k, 1, 1)
    return LoraModule(
        name=like.name,
        a=MemoryTensor(f"{like.name}.lora_A", a.reshape(a_shape).contiguous()),
        b=MemoryTensor(f"{like.name}.lora_B", b.reshape(b_shape).contiguous()),
        alpha=float(k),
        scale=1.0,
        config_rank=k,
        layout=like.layout,
        bias=None if bias is None else MemoryTensor(f"{like.name}.lora_B.bias", bias),
    )


def _carry_extras(adapters: Sequence[Adapter]) -> list[ExtraTensor]:
    """Full tensors carried over as they are; different copies of one tensor are refused."""
    import torch

    chosen: dict[str, tuple[ExtraTensor, Adapter]] = {}
    for a in adapters:
        for e in a.extras:
            if e.target not in chosen:
                chosen[e.target] = (e, a)
                continue
            prev, owner = chosen[e.target]
            if not torch.equal(prev.tensor.load(), e.tensor.load()):
                raise ValidationFailed(
                    f"{owner.path} and {a.path} carry different full copies of {e.target} "
                    f"({e.kind}); full tensors cannot be combined: compose without one of "
                    "them, or drop it from one adapter"
                )
    return [e for e, _ in chosen.values()]


def _template_config(adapters: Sequence[Adapter]) -> Any:
    """The fields the output config carries: the first base name, agreeing task types,
    the union of ``modules_to_save`` and the first non-default bias mode."""
    cfgs = [a.config for a in adapters]
    first = cfgs[0]
    task_types = {c.task_type for c in cfgs}
    mts = sorted({n for c in cfgs for n in (c.modules_to_save or [])})
    bias = next((c.bias for c in cfgs if c.bias != "none"), "none")
    return first.model_copy(
        update={
            "base_model_name_or_path": next(
                (c.base_model_name_or_path for c in cfgs if c.base_model_name_or_path), None
            ),
            "task_type": first.task_type if len(task_types) == 1 else None,
            "modules_to_save": mts or None,
            "bias": bias,
        }
    )


def compose_to(
    sources: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    options: Mapping[str, Any] | None = None,
    *,
    device: str = "auto",
    allow_base_mismatch: bool = False,
    alpha: float | None = None,
    force: bool = False,
    register_as: str | None = None,
) -> ComposeReport:
    """Compose SOURCEs, write the result as a PEFT folder at ``out`` and, if asked, register
    it with its lineage: ``adapterctl compose`` in one call.

    Registry inputs must share one base pin (or ``allow_base_mismatch``); ``out`` is refused
    before any work if it exists (unless ``force``).

    Args:
        sources: local paths, registry references or read ``Adapter`` objects.
        out: the output folder, or ``hf://owner/name`` to publish it (``hub.publish_folder``).
        weights, method, options, device, allow_base_mismatch: as for :func:`compose`.
        alpha: LoRA alpha of bare ``.safetensors`` sources.
        force: replace an existing ``out``.
        register_as: record ``out`` as the next version of this name (every source must then
            be a registry reference).

    Returns:
        The report, with ``out`` and (when registered) ``registered`` set.

    Raises:
        Conflict: ``out`` exists, or registry inputs are pinned to different bases (5); and
            what :func:`compose` raises.

    Example:
        >>> compose_to(["chat@1", "code@1"], "chat-code", [0.6, 0.4], "ties",
        ...            {"density": 0.5, "rank": 16}, register_as="chat-code").registered
        'chat-code@1'
    """
    from adapterctl.files import refuse_existing
    from adapterctl.hub import output

    refuse_existing(out, force=force)
    with output(out) as dest:
        report = _compose_into(
            dest.path, sources, weights, method, options, device=device, force=force,
            alpha=alpha, allow_base_mismatch=allow_base_mismatch, register_as=register_as,
        )  # fmt: skip
        published = dest.publish("adapter", "compose")
    report.out = dest.shown
    report.published = None if published is None else f"{published.url}@{published.tag}"
    return report


def _compose_into(
    out: Path,
    sources: Sequence[str | os.PathLike[str] | Adapter],
    weights: Sequence[float] | None,
    method: str,
    options: Mapping[str, Any] | None,
    *,
    device: str,
    force: bool,
    alpha: float | None,
    allow_base_mismatch: bool,
    register_as: str | None,
) -> ComposeReport:
    from adapterctl.files import refuse_overlap
    from adapterctl.formats.peft import write_peft
    from adapterctl.refs import read_inputs

    adapters, versions = read_inputs(sources, alpha=alpha, register_as=register_as)
    refuse_overlap(out, [a.path for a in adapters])
    pin_warnings: list[str] = []
    if any(v is not None for v in versions):
        from adapterctl.registry import check_same_base

        pin_warnings = check_same_base(
            [v for v in versions if v is not None], allow_mismatch=allow_base_mismatch
        )
    result = compose(
        adapters, weights, method, options, device=device, allow_base_mismatch=allow_base_mismatch
    )
    write_peft(result.adapter, out, force=force, metadata=_provenance(result.report))
    report = result.report
    report.warnings = [w for a in adapters for w in a.warnings] + pin_warnings + report.warnings
    if register_as:
        from adapterctl.registry import Registry

        used = list(weights) if weights is not None else [1.0] * len(sources)
        with Registry() as reg:
            registered = reg.record_lineage(
                register_as,
                [(v, w) for v, w in zip(versions, used, strict=True) if v is not None],
                method,
                {k: v for k, v in (options or {}).items() if v is not None},
                out,
            )
        report.registered = registered.ref
    return report


def _provenance(report: ComposeReport) -> dict[str, str]:
    """The safetensors metadata of a composed adapter: what made it."""
    import json

    from adapterctl import __version__

    data = {
        "adapterctl": __version__,
        "method": report.method,
        "options": report.options,
        "weights": report.weights,
        "inputs": report.inputs,
    }
    return {"adapterctl": json.dumps(data, sort_keys=True)}
