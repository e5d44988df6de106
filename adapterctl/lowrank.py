"""Linear algebra on low-rank factors, without forming the dense out×in ΔW.

For ΔW = s·B·A with B (out×r) and A (r×in): QR of B and of Aᵀ gives B = Q_b R_b and
Aᵀ = Q_a R_a, so ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ and the r×r core s·R_b R_aᵀ has the singular
values of ΔW. Norms, spectra and stable ranks all come from that core.

The functions take torch tensors (compose, resize: on any device) or NumPy arrays (inspect,
diff, validate: the reporting commands never import torch) and answer in the same kind;
``dense_truncate`` takes torch tensors only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

# A torch tensor or a NumPy array: each function answers in the kind it was given.
T = TypeVar("T", "torch.Tensor", "np.ndarray[Any, Any]")

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32 (bfloat16's is a little less)
FLOAT64_MAX = sys.float_info.max


def _xp(x: Any) -> Any:
    """The array library of ``x``: NumPy for an ndarray (without importing torch), else torch."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def _svdvals(m: Any) -> Any:
    """Singular values of a matrix, descending (NumPy 1.x has no ``svdvals``)."""
    xp = _xp(m)
    if xp.__name__ == "numpy":
        return xp.linalg.svd(m, compute_uv=False)
    return xp.linalg.svdvals(m)


def _f64(x: Any) -> Any:
    """``x`` in float64 (a copy unless it already is)."""
    return x.double() if _xp(x).__name__ == "torch" else x.astype("float64", copy=False)


def core(B: T, A: T, scale: float = 1.0) -> T:
    """The small core C with ΔW = Q_b C Q_aᵀ (orthonormal Q's); C is at most r×r."""
    xp = _xp(B)
    _, rb = xp.linalg.qr(B)  # B: (out, r) -> R_b (r, r)
    _, ra = xp.linalg.qr(A.T)  # Aᵀ: (in, r) -> R_a (r, r)
    out: T = scale * (rb @ ra.T)  # (r, r)
    return out


def singular_values(B: T, A: T, scale: float = 1.0) -> T:
    """Singular values of s·B·A, descending, from the r×r core.

    The scale multiplies the singular values of B·A, not the core: a huge scale then gives
    +inf singular values, never the NaN an SVD of an overflowed core would."""
    sv = _svdvals(core(B, A))
    if _xp(sv).__name__ == "numpy":
        import numpy as np

        with np.errstate(over="ignore"):  # an overflow is the answer (+inf), not a warning
            scaled: T = sv * abs(scale)
        return scaled
    out: T = sv * abs(scale)
    return out


def frobenius_norm(B: Any, A: Any, scale: float = 1.0) -> float:
    """‖s·B·A‖_F = |s|·sqrt(tr((BᵀB)(AAᵀ))), from r×r Gram matrices.

    ``B`` (out, r) and ``A`` (r, in) may be torch tensors or numpy arrays.
    """
    g = (B.T @ B) * (A @ A.T)  # (r, r) ⊙ (r, r): tr(XY) = Σ X⊙Yᵀ, both symmetric
    return abs(scale) * math.sqrt(max(float(g.sum()), 0.0))


def stable_rank(sv: T) -> float:
    """‖ΔW‖_F² / σ_max², a smooth count of significant directions (0 for a zero update; NaN
    when σ_max is not finite)."""
    top = float(sv.max()) if sv.shape[0] else 0.0
    if top == 0.0:
        return 0.0
    if not math.isfinite(top):
        return math.nan
    return float(((_f64(sv) / top) ** 2).sum())  # divided first: σ² may overflow, (σ/σ_max)² not


def norm_of(sv: Any) -> float:
    """‖ΔW‖_F = √Σσ² from singular values (or any vector), without overflow on the way: +inf
    only when the norm itself is beyond float64's range."""
    return math.hypot(*(float(x) for x in sv))


def _largest_norm(x: Any, axis: int) -> float:
    """An upper bound on the largest 2-norm of ``x``'s slices along ``axis`` (1: rows, 0:
    columns): float32 sums of squares with their error bound added, or (a square beyond
    float32's range) float64 scaled by max|x| so that no square overflows; +inf when ``x``
    holds NaN or Inf."""
    if math.prod(x.shape) == 0:
        return 0.0
    if _xp(x).__name__ == "numpy" and x.dtype == "float32" and x.ndim == 2:
        # One float32 pass, no copies: each sum of n squares is within (n+1)·2⁻²⁴ (relative)
        # of the exact one, so enlarged by (n+2)·2⁻²³ it bounds it. Squares that underflow
        # lose at most n·2⁻¹⁴⁹ each sum, inside that margin when the largest is ≥ 2⁻¹⁰⁰; a
        # square or sum that overflows (or NaN) takes the scaled float64 pass below.
        sums = _xp(x).einsum("ij,ij->i" if axis == 1 else "ij,ij->j", x, x)  # (rows,)|(cols,)
        sq = float(sums.max())
        if math.isfinite(sq) and sq >= 2.0**-100:
            return math.sqrt(sq * (1.0 + (x.shape[axis] + 2) * 2.0**-23))
    top = float(abs(x).max())
    if not math.isfinite(top):
        return math.inf
    if top == 0.0:
        return 0.0
    return top * math.sqrt(float(((_f64(x) / top) ** 2).sum(axis).max()))


def entry_bound(B: Any, A: Any, scale: float = 1.0) -> float:
    """An upper bound on max |s·(B·A)ᵢⱼ|, without forming B·A.

    Cauchy–Schwarz on each entry, |Σₖ BᵢₖAₖⱼ| ≤ ‖Bᵢ,:‖·‖A:,ⱼ‖, gives
    max |s·B·A| ≤ |s|·maxᵢ‖Bᵢ,:‖·maxⱼ‖A:,ⱼ‖: one pass over each factor (``_largest_norm``).

    Args:
        B: (out, r), a torch tensor or a NumPy array.
        A: (r, in), of the same kind.
        scale: s.

    Returns:
        The bound; +inf when a factor or ``scale`` is NaN or Inf, or the bound overflows
        float64; 0.0 for a zero scale or factor.
    """
    if not math.isfinite(scale):
        return math.inf
    rows, cols = _largest_norm(B, 1), _largest_norm(A, 0)  # max ‖Bᵢ,:‖, max ‖A:,ⱼ‖
    if math.inf in (rows, cols):
        return math.inf
    return abs(scale) * rows * cols  # a Python float: overflows to inf, never raises


def range_problem(
    bound: float, dtype: str = "float32", what: str = "its update s·B·A"
) -> str | None:
    """Why an update whose ``entry_bound`` is ``bound`` cannot be computed in ``dtype``
    (``float32`` or ``float64``), or None when it can: the words for a message that names the
    module before them and the fix after."""
    limit = FLOAT64_MAX if dtype == "float64" else FLOAT32_MAX
    if bound <= limit:
        return None
    if math.isnan(bound) or bound == math.inf:
        return f"{what} is beyond float32's range (even float64's: inf or NaN)"
    return f"{what} can reach {bound:.3g}, beyond {dtype}'s range (±{limit:.3g})"


def stack_factors(factors: Sequence[tuple[T, T, float]]) -> tuple[T, T]:
    """Σ cᵢ·Bᵢ·Aᵢ as one pair of factors: [c₁B₁, c₂B₂, …] · [A₁; A₂; …], exactly.

    Args:
        factors: ``(B, A, c)`` triples, B (out, rᵢ), A (rᵢ, in), all with one dtype.

    Returns:
        ``(B, A)`` with B (out, Σrᵢ) and A (Σrᵢ, in).
    """
    xp = _xp(factors[0][0])
    cat = xp.concatenate if xp.__name__ == "numpy" else xp.cat
    b: T = cat([c * bi for bi, _, c in factors], 1)  # (out, Σr)
    a: T = cat([ai for _, ai, _ in factors], 0)  # (Σr, in)
    return b, a


@dataclass
class CoreSVD(Generic[T]):
    """B·A = Q_b · U · diag(S) · Vh · Q_aᵀ with orthonormal Q_b (out, k), Q_a (in, k).

    U, S, Vh are the SVD of the k×k core R_b·R_aᵀ (k = the inner dimension of B·A), so S
    holds the singular values of B·A, descending.
    """

    qb: T  # (out, k)
    u: T  # (k, k)
    s: T  # (k,)
    vh: T  # (k, k)
    qa: T  # (in, k)

    def factors(self, rank: int) -> tuple[T, T]:
        """The best rank-``rank`` approximation as (B, A), σ split evenly: B = Q_b U √S, A =
        √S Vh Q_aᵀ (balanced factors keep both in a similar range, as a 16-bit copy needs)."""
        k = min(rank, int(self.s.shape[0]))
        root = _xp(self.s).sqrt(self.s[:k])  # (k,)
        b = (self.qb @ self.u[:, :k]) * root  # (out, k) @ (k, k) -> (out, k)
        a = root[:, None] * (self.vh[:k] @ self.qa.T)  # (k, k) @ (k, in) -> (k, in)
        return b, a

    def energy(self, rank: int) -> float:
        """The fraction of ‖B·A‖²_F kept by the best rank-``rank`` approximation (1 if zero)."""
        e = _f64(self.s) ** 2
        total = float(e.sum())
        return 1.0 if total == 0.0 else float(e[:rank].sum()) / total

    def norm(self) -> float:
        """‖B·A‖_F, from the singular values."""
        return norm_of(self.s)

    def column_basis(self, rtol: float = 1e-10) -> T:
        """An orthonormal basis of the column space of B·A (singular values above rtol·σ_max)."""
        top = float(self.s[0]) if self.s.shape[0] else 0.0
        k = int((self.s > rtol * top).sum()) if top > 0 else 0
        basis: T = self.qb @ self.u[:, :k]  # (out, k)
        return basis


def core_svd(B: T, A: T) -> CoreSVD[T]:
    """The SVD of B·A from QR of B and Aᵀ and the SVD of the small core, never the dense
    out×in product: O((out + in)·k²) instead of O(out·in·min(out, in)).

    Args:
        B: (out, k).
        A: (k, in).
    """
    xp = _xp(B)
    qb, rb = xp.linalg.qr(B)  # (out, k), (k, k) when out >= k
    qa, ra = xp.linalg.qr(A.T)  # (in, k), (k, k) when in >= k
    u, s, vh = xp.linalg.svd(rb @ ra.T, full_matrices=False)  # core: (k1, k2), k1 <= k, k2 <= k
    return CoreSVD(qb=qb, u=u, s=s, vh=vh, qa=qa)


def rank_for_energy(s: T, energy: float) -> int:
    """The smallest rank whose leading singular values keep ``energy`` of Σσ² (at least 1)."""
    e = _f64(s) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = e.cumsum(0) / total
    # A tiny allowance so energy=1.0 does not demand the float rounding of the tail.
    return min(int((kept < energy - 1e-12).sum()) + 1, int(s.shape[0]))


def inner_product(B1: T, A1: T, B2: T, A2: T) -> Any:
    """⟨B₁A₁, B₂A₂⟩_F = tr((B₁ᵀB₂)(A₂A₁ᵀ)), from r₁×r₂ Gram matrices (a 0-d tensor, or a
    NumPy scalar)."""
    return ((B1.T @ B2) * (A1 @ A2.T)).sum()  # (r1, r2) ⊙ (r1, r2): tr(XYᵀ) = Σ X⊙Y


def difference_norm(B1: T, A1: T, B2: T, A2: T) -> float:
    """‖B₁A₁ − B₂A₂‖_F through the stacked factors [B₁, −B₂]·[A₁; A₂] and their small core.

    The expanded ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ cancels catastrophically when X ≈ Y; the core of the
    stacked factors does not. Pass float64 factors for a float64 answer.
    """
    xp = _xp(B1)
    b, a = stack_factors([(B1, A1, 1.0), (B2, A2, -1.0)])  # (out, r1+r2), (r1+r2, in)
    _, rb = xp.linalg.qr(b)
    _, ra = xp.linalg.qr(a.T)
    return float(xp.linalg.norm(rb @ ra.T))  # Frobenius


def principal_angles(U1: T, U2: T) -> T:
    """Principal angles (radians, ascending) between the spans of orthonormal U₁ and U₂:
    arccos of the singular values of U₁ᵀU₂, min(k₁, k₂) of them."""
    xp = _xp(U1)
    if U1.shape[1] == 0 or U2.shape[1] == 0:
        empty: T = xp.zeros(0, dtype=U1.dtype)
        return empty
    cos = xp.clip(_svdvals(U1.T @ U2), -1.0, 1.0)  # (min(k1, k2),)
    angles: T = xp.arccos(cos)
    return angles


def dense_truncate(
    M: torch.Tensor,
    rank: int,
    *,
    how: str = "auto",
    generator: torch.Generator | None = None,
    oversample: int = 16,
    power_iterations: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Compress a dense (out, in) matrix to factors B (out, k), A (k, in), k ≤ ``rank``.

    ``exact`` takes the truncated SVD (Eckart–Young: the best rank-k approximation).
    ``randomized`` (Halko–Martinsson–Tropp) projects onto an orthonormal basis Q of M·Ω
    (Ω Gaussian, ``rank + oversample`` columns, refined by power iterations) and takes the
    SVD of the small QᵀM: O(out·in·(rank + oversample)) instead of O(out·in·min(out, in)),
    close to the best approximation when the spectrum decays. ``auto`` picks exact for small
    matrices or ranks close to full, randomized otherwise.

    Returns:
        ``(B, A, energy)``: σ split evenly between B and A; ``energy`` is the fraction of
        ‖M‖²_F that B·A keeps, exact for both algorithms (the residual is orthogonal to the
        kept part), 1.0 for a zero M.
    """
    import torch

    total = float(M.double().square().sum())
    small = min(M.shape)
    k = min(rank, small)
    if how == "auto":
        how = "exact" if small <= 1024 or 2 * (k + oversample) >= small else "randomized"
    if how == "exact":
        u, s, vh = torch.linalg.svd(M, full_matrices=False)  # (out, m), (m,), (m, in)
        u, s, vh = u[:, :k], s[:k], vh[:k]
        q = None
    elif how == "randomized":
        cols = min(k + oversample, small)
        dev = generator.device if generator is not None else torch.device("cpu")
        omega = torch.randn(M.shape[1], cols, generator=generator, device=dev)  # (in, c)
        q, _ = torch.linalg.qr(M @ omega.to(M.device, M.dtype))  # (out, c)
        for _ in range(power_iterations):  # re-orthonormalised subspace iteration
            z, _ = torch.linalg.qr(M.T @ q)  # (in, c)
            q, _ = torch.linalg.qr(M @ z)  # (out, c)
        u, s, vh = torch.linalg.svd(q.T @ M, full_matrices=False)  # (c, c), (c,), (c, in)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        raise ValueError(f"unknown SVD algorithm {how!r}; use auto, exact or randomized")
    if q is not None:
        u = q @ u  # (out, c) @ (c, k) -> (out, k)
    root = s.sqrt()  # (k,)
    b = u * root  # (out, k)
    a = root[:, None] * vh  # (k, in)
    kept = float(s.double().square().sum())
    return b, a, (1.0 if total == 0.0 else min(kept / total, 1.0))
