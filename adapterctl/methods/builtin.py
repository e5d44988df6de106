"""The built-in composition methods, registered through ``register_methods`` like any plugin.

Every one is a configuration of the task-arithmetic core (``task_arithmetic.py``): the weighted
sum (``linear``, ``cat``, ``svd``), TIES, DARE and magnitude pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from adapterctl.hookspecs import hookimpl
from adapterctl.methods import MethodOptions
from adapterctl.methods.task_arithmetic import Convention, MajoritySign, Sparsify, task_arithmetic

if TYPE_CHECKING:
    import torch


class SumOptions(MethodOptions):
    """``cat``: none (the rank is the sum of the input ranks)."""


class RankOptions(MethodOptions):
    """``linear``/``svd``: the output rank."""

    rank: int | None = Field(
        default=None, ge=1,
        description="Output rank (small-core SVD of the exact sum). linear: default exact "
        "(rank Σrᵢ); others: default the largest input rank.",
    )  # fmt: skip


class PruneOptions(RankOptions):
    """Methods that sparsify each delta."""

    density: float = Field(
        gt=0.0, le=1.0, description="Fraction of each delta's entries kept, in (0, 1]."
    )


class DareOptions(PruneOptions):
    """DARE: random drop and rescale, reproducible with a seed."""

    seed: int = Field(default=0, description="Seed of the drop masks (one stream per module).")


class TiesOptions(PruneOptions):
    """TIES: trim, elect signs, disjoint mean."""

    majority_sign: MajoritySign = Field(
        default="total", description="Elect each entry's sign by the sum or by the count of signs."
    )
    convention: Convention = Field(
        default="adapterctl",
        description="adapterctl: weight before electing, divide by the agreeing weights "
        "(mergekit); peft: elect on unweighted deltas, divide by the agreeing count.",
    )


class DareTiesOptions(TiesOptions):
    """DARE-TIES: random drop and rescale, then TIES' sign election and disjoint mean."""

    seed: int = Field(default=0, description="Seed of the drop masks (one stream per module).")


@dataclass(frozen=True)
class TaskArithmeticMethod:
    """A configuration of the task-arithmetic core: how to sparsify, whether to elect signs.

    Satisfies ``adapterctl.methods.Method``; ``combine_dense`` is the definition the tests
    check, and ``merge --method`` applies it at full rank.
    """

    name: str
    description: str
    reference: str
    options_model: type[MethodOptions]
    sparsify: Sparsify = "none"
    consensus: bool = False
    factored: bool = False
    truncates: bool = True

    def combine_dense(
        self,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        options: MethodOptions,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Combine one module's dense deltas (see ``adapterctl.methods.Method.combine_dense``).

        Example:
            >>> ties = get_method("ties")
            >>> opts = parse_options(ties, {"density": 0.2})
            >>> ties.combine_dense([d1, d2], [0.5, 0.5], opts).shape == d1.shape
            True
        """
        opts: Any = options
        return task_arithmetic(
            deltas,
            weights,
            sparsify=self.sparsify,
            density=float(getattr(opts, "density", 1.0)),
            consensus=self.consensus,
            majority_sign=getattr(opts, "majority_sign", "total"),
            convention=getattr(opts, "convention", "adapterctl"),
            generator=generator,
        )


TIES_URL = "https://arxiv.org/abs/2306.01708"
DARE_URL = "https://arxiv.org/abs/2311.03099"

BUILTIN_METHODS = (
    TaskArithmeticMethod(
        "linear", "Σ wᵢ·ΔWᵢ exactly (factors concatenated); --rank truncates by SVD",
        "https://arxiv.org/abs/2212.04089", RankOptions, factored=True, truncates=False,
    ),
    TaskArithmeticMethod(
        "cat", "Σ wᵢ·ΔWᵢ exactly, factors concatenated: rank Σrᵢ (PEFT's name)",
        "https://huggingface.co/docs/peft/developer_guides/model_merging", SumOptions,
        factored=True, truncates=False,
    ),
    TaskArithmeticMethod(
        "svd", "Σ wᵢ·ΔWᵢ truncated to --rank (best rank-R approximation, small-core SVD)",
        "https://en.wikipedia.org/wiki/Low-rank_approximation", RankOptions, factored=True,
    ),
    TaskArithmeticMethod(
        "ties", "TIES: keep the top-density magnitudes, elect signs, disjoint mean",
        TIES_URL, TiesOptions, sparsify="magnitude", consensus=True,
    ),
    TaskArithmeticMethod(
        "dare_linear", "DARE: drop entries with probability 1−density, rescale, weighted sum",
        DARE_URL, DareOptions, sparsify="random",
    ),
    TaskArithmeticMethod(
        "dare_ties", "DARE drop-and-rescale, then TIES' sign election and disjoint mean",
        DARE_URL, DareTiesOptions, sparsify="random", consensus=True,
    ),
    TaskArithmeticMethod(
        "magnitude_prune", "keep the top-density magnitudes of each delta, weighted sum",
        TIES_URL, PruneOptions, sparsify="magnitude",
    ),
)  # fmt: skip


@hookimpl
def register_methods(register: Callable[[Any], None]) -> None:
    for method in BUILTIN_METHODS:
        register(method)
