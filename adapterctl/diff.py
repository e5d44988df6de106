"""``diff``: how two adapters differ, in their configs and in what they do (ΔW per module).

Every number comes from the factors with r×r Gram matrices and small cores, in float64:
⟨B₁A₁, B₂A₂⟩ = tr((B₁ᵀB₂)(A₂A₁ᵀ)) for the cosine, and the difference through the stacked
factors [B₁, −B₂]·[A₁; A₂] (the expanded ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ cancels catastrophically for
near-identical adapters). Two factorizations of one ΔW (B·Q, Q⁻¹·A) compare as identical.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel

from adapterctl.adapter import Adapter, LoraModule, natural_key
from adapterctl.errors import ValidationFailed

DEFAULT_TOL = 1e-6  # float32 noise: factors rounded to float32 differ by ~1e-7 relative


class ConfigDifference(BaseModel):
    """One config field that differs."""

    field: str
    a: Any
    b: Any


class ModuleDiff(BaseModel):
    """One module both adapters update."""

    name: str
    shape_a: list[int]
    shape_b: list[int]
    rank_a: int
    rank_b: int
    norm_a: float  # ‖ΔW_A‖_F
    norm_b: float  # ‖ΔW_B‖_F
    difference: float | None  # ‖ΔW_A − ΔW_B‖_F (None when the shapes differ)
    relative_difference: float | None  # difference / ‖ΔW_A‖_F (0 if both are zero)
    cosine: float | None  # ⟨ΔW_A, ΔW_B⟩ / (‖ΔW_A‖·‖ΔW_B‖), None if either is zero
    subspace_overlap: float | None  # mean cos² of the principal angles (1: same column space)
    principal_angles: list[float]  # degrees, ascending, between the column spaces


class DiffReport(BaseModel):
    """Everything ``adapterctl diff`` reports."""

    a: str
    b: str
    tol: float
    verdict: Literal["identical", "different"]
    config: list[ConfigDifference]
    modules: list[ModuleDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    max_relative_difference: float | None
    most_different: list[str]  # modules by decreasing relative difference, beyond tol


def diff(a: Adapter, b: Adapter, *, tol: float = DEFAULT_TOL) -> DiffReport:
    """Compare two adapters.

    The verdict is ``identical`` when every common module's relative difference is within
    ``tol`` and every module only one side has is a zero update; config differences (rank,
    alpha, scaling rule…) do not count: two factorizations of one ΔW are identical.

    Args:
        a: the reference adapter (relative differences are taken against it).
        b: the other adapter.
        tol: the relative difference below which a module counts as unchanged.

    Returns:
        The report.

    Raises:
        ValidationFailed: a common module's factors hold NaN or Inf (exit 3).

    Example:
        >>> diff(read("run1/checkpoint-500"), read("run1/checkpoint-1000")).verdict
        'different'
    """
    configs = _config_differences(a, b)
    common = sorted(set(a.modules) & set(b.modules), key=natural_key)
    modules = [module_diff(a.modules[n], b.modules[n]) for n in common]
    only_a = sorted(set(a.modules) - set(b.modules), key=natural_key)
    only_b = sorted(set(b.modules) - set(a.modules), key=natural_key)
    nonzero_only = [n for n in only_a if _norm(a.modules[n]) > 0] + [
        n for n in only_b if _norm(b.modules[n]) > 0
    ]

    def rel(m: ModuleDiff) -> float:
        return math.inf if m.relative_difference is None else m.relative_difference

    beyond = sorted((m for m in modules if rel(m) > tol), key=lambda m: -rel(m))
    rels = [rel(m) for m in modules]
    verdict: Literal["identical", "different"] = (
        "different" if beyond or nonzero_only else "identical"
    )
    return DiffReport(
        a=str(a.path),
        b=str(b.path),
        tol=tol,
        verdict=verdict,
        config=configs,
        modules=modules,
        only_in_a=only_a,
        only_in_b=only_b,
        max_relative_difference=max(rels) if rels and math.isfinite(max(rels)) else None,
        most_different=[m.name for m in beyond] + nonzero_only,
    )


def module_diff(x: LoraModule, y: LoraModule) -> ModuleDiff:
    """Norms, difference, cosine and column-space angles of two modules' ΔW, in float64."""
    # NumPy, not torch: diff never pays torch's import (bf16 is widened by bit arithmetic).
    import numpy as np

    from adapterctl.lowrank import core_svd, difference_norm, inner_product, principal_angles

    bx, ax = x.arrays("float64")  # (out, rx), (rx, in)
    by, ay = y.arrays("float64")  # (out, ry), (ry, in)
    for side, factors in (("A", (bx, ax)), ("B", (by, ay))):
        if not all(np.isfinite(f).all() for f in factors):
            raise ValidationFailed(
                f"{x.name}: adapter {side}'s factors hold NaN or Inf, so its update has no "
                "norm to compare; find the broken modules with: adapterctl validate SOURCE"
            )
    bx, by = bx * x.scale, by * y.scale
    svd_x, svd_y = core_svd(bx, ax), core_svd(by, ay)
    nx, ny = svd_x.norm(), svd_y.norm()
    same_shape = tuple(x.weight_shape) == tuple(y.weight_shape) and x.layout == y.layout
    diff_norm = rel = cos = overlap = None
    angles: list[float] = []
    if same_shape:
        diff_norm = difference_norm(bx, ax, by, ay)
        rel = (diff_norm / nx) if nx > 0 else (0.0 if diff_norm == 0.0 else math.inf)
        if nx > 0 and ny > 0:
            ip = float(inner_product(bx, ax, by, ay))
            cos = max(-1.0, min(1.0, ip / (nx * ny)))
        ux, uy = svd_x.column_basis(), svd_y.column_basis()
        theta = principal_angles(ux, uy)
        if theta.shape[0]:
            angles = [math.degrees(float(t)) for t in theta]
            overlap = float((np.cos(theta) ** 2).mean())
    return ModuleDiff(
        name=x.name,
        shape_a=list(x.weight_shape),
        shape_b=list(y.weight_shape),
        rank_a=x.rank,
        rank_b=y.rank,
        norm_a=nx,
        norm_b=ny,
        difference=diff_norm,
        relative_difference=None if rel is None or math.isinf(rel) else rel,
        cosine=cos,
        subspace_overlap=overlap,
        principal_angles=angles,
    )


def _norm(m: LoraModule) -> float:
    from adapterctl.lowrank import frobenius_norm

    return frobenius_norm(*m.arrays("float64"), m.scale)


def _config_differences(a: Adapter, b: Adapter) -> list[ConfigDifference]:
    """The config facts that change what an adapter is or how it loads, where they differ."""

    def facts(x: Adapter) -> dict[str, Any]:
        c = x.config
        mods = x.modules.values()
        return {
            "ranks": sorted({m.rank for m in mods}),
            "alphas": sorted({m.alpha for m in mods}),
            "scaling_rule": c.scaling_rule,
            "targets": sorted({n.rsplit(".", 1)[-1] for n in x.modules}),
            "modules": len(x.modules),
            "base_model": c.base_model_name_or_path,
            "revision": c.revision,
            "peft_version": c.peft_version,
            "use_dora": c.use_dora,
            "lora_bias": c.lora_bias,
            "modules_to_save": sorted(c.modules_to_save or []),
            "dtypes": x.dtypes,
        }

    fa, fb = facts(a), facts(b)
    return [ConfigDifference(field=k, a=fa[k], b=fb[k]) for k in fa if fa[k] != fb[k]]
