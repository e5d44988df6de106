"""``inspect``: what an adapter is, module by module, from its factors alone."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from adapterctl.adapter import Adapter, LoraModule, natural_key
from adapterctl.checkpoint import Checkpoint
from adapterctl.identity import adapter_digest, base_fingerprint
from adapterctl.lowrank import entry_bound, norm_of, range_problem, singular_values, stable_rank


class ModuleReport(BaseModel):
    """One target module: its update's shape, rank, scale and size."""

    name: str
    layout: str
    shape: list[int]  # the base weight's shape this update applies to
    rank: int  # the rank the tensors have
    config_rank: int | None = None  # the rank the config (or --rank) declares, if it differs
    alpha: float
    scale: float
    # ‖ΔW‖_F = ‖scale·B·A‖_F (None when the factors hold NaN/Inf; +inf, null in JSON, when
    # it is beyond float64's range)
    norm: float | None
    stable_rank: float | None
    dora: bool = False
    lora_bias: bool = False
    zero_a: bool = False  # lora_A (lora_embedding_A) is all zero: the update is zero
    zero_b: bool = False  # lora_B (lora_embedding_B) is all zero: the update is zero
    nonfinite: bool = False
    overflow: bool = False  # scale·B·A can exceed float32's range (``lowrank.entry_bound``)
    base_tensor: str | None = None
    spectrum: list[float] | None = None


class BaseReport(BaseModel):
    """The base given with ``--base``."""

    path: str
    fingerprint: str
    architecture: str | None
    quantization: str | None
    matched_modules: int


class InspectReport(BaseModel):
    """Everything ``adapterctl inspect`` reports about an adapter."""

    source: str
    format: str
    digest: str
    peft_type: str
    base_model: str | None
    revision: str | None
    peft_version: str | None
    task_type: str | None
    ranks: list[int]
    alphas: list[float]
    scaling_rule: str
    use_dora: bool
    lora_bias: bool
    target_modules: list[str] | str | None
    targets: list[str]
    dtypes: list[str]
    file_size: int
    trainable_parameters: int
    modules_to_save: list[str]
    trained_biases: list[str] = []  # biases trained with bias="all" / "lora_only"
    saved_base_layers: list[str]
    total_norm: float | None
    base: BaseReport | None = None
    modules: list[ModuleReport]
    zero_b_modules: list[str]
    zero_update_modules: list[str] = []  # a zero factor (A or B): these modules change nothing
    nonfinite_modules: list[str]
    overflow_modules: list[str] = []  # updates that can exceed float32's range
    warnings: list[str]


def module_report(
    mod: LoraModule, *, spectrum: bool = False, shape: tuple[int, ...] | None = None
) -> ModuleReport:
    """Norm, stable rank and (optionally) singular values of one module, in float64,
    from the r×r core (never the dense ΔW)."""
    # NumPy, not torch: inspect never pays torch's import (bf16 is widened by bit arithmetic).
    import numpy as np

    b, a = mod.arrays("float64")  # (out, r), (r, in)
    nonfinite = not (bool(np.isfinite(a).all()) and bool(np.isfinite(b).all()))
    # A zero factor is what PEFT's init leaves untrained: lora_B = 0 for linear/conv layers,
    # lora_embedding_A = 0 for embeddings (and a frozen half of some real adapters).
    zero_a = not nonfinite and bool((a == 0).all())
    zero_b = not nonfinite and bool((b == 0).all())
    norm: float | None = None
    srank: float | None = None
    values: list[float] | None = None
    overflow = not nonfinite and range_problem(entry_bound(b, a, mod.scale)) is not None
    if not nonfinite:
        sv = singular_values(b, a, mod.scale)
        norm = norm_of(sv)
        srank = stable_rank(sv)
        srank = srank if math.isfinite(srank) else None  # σ_max beyond float64: no ratio
        if spectrum:
            values = [float(x) for x in sv]
    return ModuleReport(
        name=mod.name,
        layout=mod.layout,
        shape=list(shape or mod.weight_shape),
        rank=mod.rank,
        config_rank=mod.config_rank if mod.config_rank != mod.rank else None,
        alpha=mod.alpha,
        scale=mod.scale,
        norm=norm,
        stable_rank=srank,
        dora=mod.is_dora,
        lora_bias=mod.bias is not None,
        zero_a=zero_a,
        zero_b=zero_b,
        nonfinite=nonfinite,
        overflow=overflow,
        spectrum=values,
    )


def inspect_adapter(
    adapter: Adapter, *, base: Checkpoint | None = None, spectrum: bool = False
) -> InspectReport:
    """Build the inspect report of an adapter.

    Args:
        adapter: an adapter from ``adapterctl.formats.read``.
        base: optional base checkpoint: adds its fingerprint, refines layouts (GPT-2 Conv1D)
            and names the base tensor of each module.
        spectrum: also report each module's singular values (from the r×r core).

    Returns:
        The report; ``model_dump_json()`` is what ``inspect --json`` prints.

    Example:
        >>> report = inspect_adapter(read("my-adapter"), spectrum=True)
        >>> report.modules[0].spectrum[:2]
        [0.0412, 0.0398]
    """
    if base is not None:
        base.check_quant()  # a broken 4-bit base: exit 3 rather than a report built on it
    binding = base.bind(adapter) if base is not None else None
    modules: list[ModuleReport] = []
    for name, mod in sorted(adapter.modules.items(), key=lambda nm: natural_key(nm[0])):
        target = binding.targets.get(name) if binding else None
        if target is not None and target.layout != mod.layout:
            mod.layout = target.layout
        rep = module_report(mod, spectrum=spectrum)
        if target is not None:
            rep.base_tensor = target.tensor
        modules.append(rep)
    cfg = adapter.config
    norms = [m.norm for m in modules]
    total = norm_of(n for n in norms if n is not None) if None not in norms else None
    base_report = None
    if base is not None and binding is not None:
        base_report = BaseReport(
            path=base.location,
            fingerprint=base_fingerprint(base),
            architecture=base.architecture,
            quantization=base.quantization,
            matched_modules=len(binding.matched),
        )
    return InspectReport(
        source=str(adapter.path),
        format=adapter.format,
        digest=adapter_digest(adapter.files, Path(adapter.path)),
        peft_type=cfg.peft_type,
        base_model=cfg.base_model_name_or_path,
        revision=cfg.revision,
        peft_version=cfg.peft_version,
        task_type=cfg.task_type,
        ranks=sorted({m.rank for m in modules}),
        alphas=sorted({m.alpha for m in modules}),
        scaling_rule=cfg.scaling_rule,
        use_dora=cfg.use_dora or any(m.dora for m in modules),
        lora_bias=cfg.lora_bias or any(m.lora_bias for m in modules),
        target_modules=cfg.target_modules,
        targets=sorted({m.name.rsplit(".", 1)[-1] for m in modules}),
        dtypes=adapter.dtypes,
        file_size=adapter.size_bytes,
        trainable_parameters=adapter.trainable_parameters,
        modules_to_save=sorted(e.target for e in adapter.extras if e.kind == "modules_to_save"),
        trained_biases=sorted(e.target for e in adapter.extras if e.kind == "bias"),
        saved_base_layers=sorted(e.target for e in adapter.extras if e.kind == "base_layer"),
        total_norm=total,
        base=base_report,
        modules=modules,
        zero_b_modules=[m.name for m in modules if m.zero_b],
        zero_update_modules=[m.name for m in modules if m.zero_a or m.zero_b],
        nonfinite_modules=[m.name for m in modules if m.nonfinite],
        overflow_modules=[m.name for m in modules if m.overflow],
        warnings=list(adapter.warnings),
    )
