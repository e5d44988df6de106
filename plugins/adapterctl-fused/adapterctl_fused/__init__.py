"""adapterctl-fused: the NumPy merge engine's compiled kernel, as a plugin.

The kernel (``_fused.c``) merges a block of rows of a 16/32-bit weight in one pass over
memory: L·R summed in registers (float32 for 16-bit outputs, each value proven by an error
bound and the unproven few summed again in float64; float64 for float32 outputs), the base
added, rounded into the output dtype (bfloat16 to nearest even, float16, float32), noting the
rare values whose rounding ``adapterctl.merge.rounding`` must settle — faster than NumPy's
several passes (matmul, widening add, roundings, checks). It is compiled for three vector
widths (AVX-512, AVX2, generic 4-float vectors); the widest the CPU runs is the default.

Importing this package is cheap: the compiled module is imported only when a merge asks for
it (``FusedKernel.load``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from adapterctl.hookspecs import hookimpl


class FusedKernel:
    """The merge kernel adapterctl's NumPy engine calls where it pays (``pays``)."""

    name = "fused"
    description = "W + L·R summed and rounded in one pass (C, AVX-512/AVX2/generic vectors)"

    def load(self) -> ModuleType | None:
        """The compiled module (``ISAS``, ``TILE_ROWS``, ``TILE_COLS``, ``FLOAT16``, ``DTYPES``,
        ``addmm_round``, ``addmm_round_into``), or None where it was not built (no C compiler
        at install time) or was built by an older version."""
        try:
            from adapterctl_fused import _fused
        except ImportError:
            return None
        current = getattr(_fused, "FACTORS_FLOAT64", 0) and getattr(_fused, "FLOAT32_SUMS", 0) >= 2
        return _fused if current else None

    def pays(self, isa: str, rank: int, cols: int) -> bool:
        """Whether the kernel sums W + L·R faster than NumPy's float64 ``matmul`` path here,
        as ``bench/kernel.py`` measured it (adapterctl's bench/RESULTS.md, "kernel"): the
        16-float build at every rank (1.1–5.8×), the 8-float build up to rank 64 (1.1–5×;
        from 128 its float64 sums are 1.2–1.9× slower), the 4-float build at the lowest ranks
        (2.2× at 16, 1.4× slower at 64).

        Args:
            isa: the vector width that runs (one of the module's ``ISAS``).
            rank: the summed rank of the tensor's deltas (Σ rᵢ).
            cols: values per row of the stored weight.
        """
        del cols  # measured on rows of 4096 and 11008 values alike
        if isa == "generic":
            return rank <= 16
        return isa != "avx2" or rank <= 64


@hookimpl
def register_merge_kernels(register: Any) -> None:
    """Register the fused kernel with adapterctl."""
    register(FusedKernel())
