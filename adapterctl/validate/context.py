"""What the validation rules look at: the adapter, the base and its binding, and views of
them computed once on first use (per-module statistics, layers the base lacks), plus the
small naming and message helpers the rule families share.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from adapterctl.adapter import Adapter, LoraModule
from adapterctl.checkpoint import Binding, Checkpoint, layer_index

if TYPE_CHECKING:
    import numpy as np

EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")
HEAD_NAMES = ("lm_head", "embed_out")


@dataclass
class ModuleStats:
    """What several rules need to know about one module's tensors, computed once."""

    nonfinite: list[str]  # which tensors hold NaN/Inf
    zero: bool  # the module changes nothing (B·A = 0, no DoRA magnitude, no lora bias)
    overflow: str | None = None  # why scale·B·A cannot be computed in float32, if it cannot


@dataclass
class Context:
    """What the rules look at; costly views are computed once, on first use."""

    adapter: Adapter
    base: Checkpoint | None
    max_rank: int
    binding: Binding | None = None

    @cached_property
    def stats(self) -> dict[str, ModuleStats]:
        """Each adapter module's statistics (non-finite tensors, zero update), by name."""
        return {name: _module_stats(mod) for name, mod in self.adapter.modules.items()}

    @cached_property
    def extra_layer_modules(self) -> dict[str, int]:
        """Adapter modules in layers the base does not have -> their layer index."""
        n = self.base.num_layers if self.base is not None else None
        if n is None:
            return {}
        out = {}
        for name in self.adapter.modules:
            i = layer_index(name)
            if i is not None and i >= n:
                out[name] = i
        return out

    @cached_property
    def fused_expert_modules(self) -> list[str]:
        """Per-expert adapter modules the base cannot hold because it stores experts fused."""
        if self.base is None or self.binding is None or not self.base.fused_experts:
            return []
        return [
            name
            for name, t in self.binding.targets.items()
            if t.tensor is None and ".experts." in f".{name}."
        ]

    @cached_property
    def base_vocab_rows(self) -> int | None:
        """Rows of the base's input embedding (its real vocabulary), else its config vocab."""
        if self.base is None:
            return None
        for name, (shape, _) in self.base.weights.items():
            if len(shape) == 2 and leaf_name(name.removesuffix(".weight")) in EMBEDDING_NAMES:
                return int(shape[0])
        return self.base.vocab_size


def leaf_name(name: str) -> str:
    """The last part of a dotted module or tensor name."""
    return name.rsplit(".", 1)[-1]


def list_names(items: Iterable[str], k: int = 3) -> str:
    """The first ``k`` names, then how many more: 'a, b, c and 4 more'."""
    items = list(items)
    head = ", ".join(items[:k])
    return head + (f" and {len(items) - k} more" if len(items) > k else "")


def has_nonfinite(t: np.ndarray[Any, Any]) -> bool:
    """True if a floating-point array holds NaN or Inf (other float formats, such as
    bfloat16, are widened to float32 exactly first)."""
    import numpy as np

    if t.dtype.kind in "biu":
        return False
    if t.dtype not in (np.float16, np.float32, np.float64):
        t = t.astype(np.float32)
    return not bool(np.isfinite(t).all())


def _module_stats(mod: LoraModule) -> ModuleStats:
    # numpy, not torch: validation (and a CPU merge's pre-flight) never pays torch's import.
    import numpy as np

    b, a = mod.arrays(None)  # (out, r), (r, in), as stored
    parts = {"lora_A": a, "lora_B": b}
    if mod.magnitude is not None:
        parts["lora_magnitude_vector"] = mod.magnitude.array()
    if mod.bias is not None:
        parts["lora_B.bias"] = mod.bias.array()
    if a.shape[0] != b.shape[1]:
        return ModuleStats(nonfinite=[r for r, t in parts.items() if has_nonfinite(t)], zero=False)
    # The r x r Gram matrices in float32 (one pass over each factor, no float64 copies) settle
    # the common case: finite diagonals mean finite factors (a NaN or Inf reaches the sum of
    # its column's squares), and ‖B·A‖² = Σ (BᵀB) ⊙ (AAᵀ) well above its rounding means B·A ≠ 0.
    # Anything else (a non-finite or zero diagonal, or ‖B·A‖ near zero) is decided exactly.
    wide = np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32
    b32: Any = b.astype(wide, copy=False)
    a32: Any = a.astype(wide, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # huge factors: decided below
        gb, ga = b32.T @ b32, a32 @ a32.T  # (r, r), (r, r)
        nb, na = float(np.trace(gb)), float(np.trace(ga))  # ‖B‖², ‖A‖²
    factors_ok = np.isfinite(nb) and np.isfinite(na)
    extras = {r: t for r, t in parts.items() if r not in ("lora_A", "lora_B")}
    bad = [r for r, t in (extras if factors_ok else parts).items() if has_nonfinite(t)]
    if bad:
        return ModuleStats(nonfinite=bad, zero=False)
    from adapterctl.lowrank import entry_bound, range_problem

    # Finite factors and a finite scale can still multiply out beyond float32 (alpha 1e308).
    overflow = range_problem(entry_bound(b, a, mod.scale))
    if overflow is None and mod.bias is not None:
        bias = parts["lora_B.bias"]
        overflow = range_problem(abs(mod.scale) * float(abs(bias).max(initial=0.0)),
                                 what="its lora bias scale·b")  # fmt: skip
    if overflow is not None:
        return ModuleStats(nonfinite=[], zero=False, overflow=overflow)
    no_bias = mod.bias is None or bool((parts["lora_B.bias"] == 0).all())
    if not (no_bias and mod.magnitude is None):
        return ModuleStats(nonfinite=[], zero=False)
    with np.errstate(over="ignore", invalid="ignore"):
        far = factors_ok and float((gb * ga).sum()) > 1e-3 * nb * na
    if far:  # far from zero: ‖BA‖ ≤ ‖B‖‖A‖
        return ModuleStats(nonfinite=[], zero=False)
    from adapterctl.lowrank import frobenius_norm

    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    no_ba = not a64.any() or not b64.any() or frobenius_norm(b64, a64, mod.scale) == 0
    return ModuleStats(nonfinite=[], zero=no_ba)


def saved_copies(adapter: Adapter) -> list[str]:
    """Targets of the full tensors saved as ``modules_to_save`` copies."""
    return [e.target for e in adapter.extras if e.kind == "modules_to_save"]
