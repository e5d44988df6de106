"""The generic task-arithmetic core: sparsify each task vector, optionally elect a sign per
element, and combine. Linear, TIES, DARE and magnitude pruning are configurations of it.

For deltas Δᵢ (one module of each input) and weights wᵢ:

1. sparsify: ``magnitude`` keeps the ⌊density·n⌋ largest |Δᵢ| entries (TIES' trim);
   ``random`` keeps each entry with probability density and rescales by 1/density
   (DARE's drop-and-rescale, unbiased); ``none`` keeps Δᵢ. Call the result Pᵢ.
2. without consensus: Σ wᵢ·Pᵢ.
3. with consensus (TIES' elect + disjoint merge), in one of two conventions:

   - ``adapterctl`` (mergekit's): Tᵢ = wᵢ·Pᵢ; the elected sign is that of Σ Tᵢ (``total``)
     or of Σ sign(Tᵢ) (``frequency``); the result is Σ Tᵢ over the agreeing entries divided
     by Σ |wᵢ| over the same entries: a weighted mean of the agreeing updates. (mergekit
     divides by Σ wᵢ; with non-negative weights that is the same, and |wᵢ| keeps a negated
     task negated.)
   - ``peft`` (PEFT's ``ties``/``dare_ties``): the sign is elected on the unweighted Pᵢ,
     and Σ wᵢ·Pᵢ over the agreeing entries is divided by how many agree.

   A zero entry agrees with no sign; ties in the election go to +.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Sparsify = Literal["none", "magnitude", "random"]
Convention = Literal["adapterctl", "peft"]
MajoritySign = Literal["total", "frequency"]


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ entries of largest magnitude, zero the rest (a new tensor).

    ``density >= 1`` keeps everything, as PEFT does.
    """
    import torch

    if density >= 1.0:
        return delta.clone()
    flat = delta.reshape(-1)  # (n,)
    k = int(density * flat.numel())
    out = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k=k, largest=True, sorted=False).indices  # (k,)
        out[idx] = flat[idx]
    return out.reshape(delta.shape)


def random_prune(
    delta: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by 1/density (unbiased).

    The mask is drawn on the generator's device (CPU without one) and moved to ``delta``'s.
    """
    import torch

    if density >= 1.0:
        return delta.clone()
    dev = generator.device if generator is not None else torch.device("cpu")
    keep = torch.rand(delta.shape, generator=generator, device=dev) < density  # bool, delta's shape
    return delta * keep.to(delta.device) * (1.0 / density)


def task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsify = "none",
    density: float = 1.0,
    consensus: bool = False,
    majority_sign: MajoritySign = "total",
    convention: Convention = "adapterctl",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine one module's deltas (see the module docstring for the definitions).

    Args:
        deltas: ΔWᵢ, one shape, one device; computed in their dtype (pass float32).
        weights: wᵢ, one per delta.
        sparsify: ``none``, ``magnitude`` (TIES trim) or ``random`` (DARE).
        density: the fraction kept by sparsification, in (0, 1].
        consensus: elect a sign per entry and take the disjoint mean (TIES).
        majority_sign: ``total`` (sign of the sum) or ``frequency`` (sign of the sign count).
        convention: ``adapterctl`` or ``peft`` (only matters with consensus).
        generator: the random source of ``random`` sparsification.

    Returns:
        The combined ΔW, in the deltas' dtype, device and shape.
    """
    import torch

    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"{len(deltas)} deltas for {len(weights)} weights")
    if sparsify == "magnitude":
        pruned = [magnitude_prune(d, density) for d in deltas]
    elif sparsify == "random":
        pruned = [random_prune(d, density, generator) for d in deltas]
    else:
        pruned = list(deltas)
    out = torch.zeros_like(pruned[0])
    if not consensus:
        for p, w in zip(pruned, weights, strict=True):
            out.add_(p, alpha=float(w))
        return out
    if convention == "adapterctl":
        pruned = [p * float(w) for p, w in zip(pruned, weights, strict=True)]  # Tᵢ = wᵢ·Pᵢ
    vote = torch.zeros_like(out)
    for p in pruned:
        vote.add_(p if majority_sign == "total" else p.sign())
    elected = torch.where(vote >= 0, 1.0, -1.0).to(out.dtype)  # ties go to +
    count = torch.zeros_like(out)
    for p, w in zip(pruned, weights, strict=True):
        agree = (p.sign() == elected).to(out.dtype)  # a zero entry agrees with no sign
        if convention == "adapterctl":
            out.add_(p * agree)
            count.add_(agree, alpha=abs(float(w)))
        else:
            out.add_(p * agree, alpha=float(w))
            count.add_(agree)
    if convention == "adapterctl":
        return out / torch.where(count == 0, 1.0, count)
    return out / count.clamp_min(1.0)
