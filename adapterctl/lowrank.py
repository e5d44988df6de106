"""Linear algebra on low-rank factors, without forming the dense out×in ΔW.

For ΔW = s·B·A with B (out×r) and A (r×in): QR of B and of Aᵀ gives B = Q_b R_b and
Aᵀ = Q_a R_a, so ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ and the r×r core s·R_b R_aᵀ has the singular
values of ΔW. Norms, spectra and stable ranks all come from that core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def core(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The small core C with ΔW = Q_b C Q_aᵀ (orthonormal Q's); C is at most r×r."""
    import torch

    _, rb = torch.linalg.qr(B)  # B: (out, r) -> R_b (r, r)
    _, ra = torch.linalg.qr(A.T)  # Aᵀ: (in, r) -> R_a (r, r)
    return scale * (rb @ ra.T)  # (r, r)


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of s·B·A, descending, from the r×r core."""
    import torch

    return torch.linalg.svdvals(core(B, A, scale))


def frobenius_norm(B: Any, A: Any, scale: float = 1.0) -> float:
    """‖s·B·A‖_F = |s|·sqrt(tr((BᵀB)(AAᵀ))), from r×r Gram matrices.

    ``B`` (out, r) and ``A`` (r, in) may be torch tensors or numpy arrays.
    """
    g = (B.T @ B) * (A @ A.T)  # (r, r) ⊙ (r, r): tr(XY) = Σ X⊙Yᵀ, both symmetric
    return abs(scale) * math.sqrt(max(float(g.sum()), 0.0))


def stable_rank(sv: torch.Tensor) -> float:
    """‖ΔW‖_F² / σ_max², a smooth count of significant directions (0 for a zero update)."""
    top = float(sv.max()) if sv.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((sv.double() ** 2).sum() / top**2)


def stack_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cᵢ·Bᵢ·Aᵢ as one pair of factors: [c₁B₁, c₂B₂, …] · [A₁; A₂; …], exactly.

    Args:
        factors: ``(B, A, c)`` triples, B (out, rᵢ), A (rᵢ, in), all with one dtype.

    Returns:
        ``(B, A)`` with B (out, Σrᵢ) and A (Σrᵢ, in).
    """
    import torch

    b = torch.cat([c * bi for bi, _, c in factors], dim=1)  # (out, Σr)
    a = torch.cat([ai for _, ai, _ in factors], dim=0)  # (Σr, in)
    return b, a


@dataclass
class CoreSVD:
    """B·A = Q_b · U · diag(S) · Vh · Q_aᵀ with orthonormal Q_b (out, k), Q_a (in, k).

    U, S, Vh are the SVD of the k×k core R_b·R_aᵀ (k = the inner dimension of B·A), so S
    holds the singular values of B·A, descending.
    """

    qb: torch.Tensor  # (out, k)
    u: torch.Tensor  # (k, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, k)
    qa: torch.Tensor  # (in, k)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-``rank`` approximation as (B, A), σ split evenly: B = Q_b U √S, A =
        √S Vh Q_aᵀ (balanced factors keep both in a similar range, as a 16-bit copy needs)."""
        k = min(rank, int(self.s.shape[0]))
        root = self.s[:k].sqrt()  # (k,)
        b = (self.qb @ self.u[:, :k]) * root  # (out, k) @ (k, k) -> (out, k)
        a = root[:, None] * (self.vh[:k] @ self.qa.T)  # (k, k) @ (k, in) -> (k, in)
        return b, a

    def energy(self, rank: int) -> float:
        """The fraction of ‖B·A‖²_F kept by the best rank-``rank`` approximation (1 if zero)."""
        e = self.s.double() ** 2
        total = float(e.sum())
        return 1.0 if total == 0.0 else float(e[:rank].sum()) / total

    def column_basis(self, rtol: float = 1e-10) -> torch.Tensor:
        """An orthonormal basis of the column space of B·A (singular values above rtol·σ_max)."""
        top = float(self.s[0]) if self.s.numel() else 0.0
        k = int((self.s > rtol * top).sum()) if top > 0 else 0
        return self.qb @ self.u[:, :k]  # (out, k)


def core_svd(B: torch.Tensor, A: torch.Tensor) -> CoreSVD:
    """The SVD of B·A from QR of B and Aᵀ and the SVD of the small core, never the dense
    out×in product: O((out + in)·k²) instead of O(out·in·min(out, in)).

    Args:
        B: (out, k).
        A: (k, in).
    """
    import torch

    qb, rb = torch.linalg.qr(B)  # (out, k), (k, k) when out >= k
    qa, ra = torch.linalg.qr(A.T)  # (in, k), (k, k) when in >= k
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core: (k1, k2), k1 <= k, k2 <= k
    return CoreSVD(qb=qb, u=u, s=s, vh=vh, qa=qa)


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose leading singular values keep ``energy`` of Σσ² (at least 1)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = e.cumsum(0) / total
    # A tiny allowance so energy=1.0 does not demand the float rounding of the tail.
    return min(int((kept < energy - 1e-12).sum()) + 1, int(s.shape[0]))


def inner_product(
    B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor
) -> torch.Tensor:
    """⟨B₁A₁, B₂A₂⟩_F = tr((B₁ᵀB₂)(A₂A₁ᵀ)), from r₁×r₂ Gram matrices (a 0-d tensor)."""
    return ((B1.T @ B2) * (A1 @ A2.T)).sum()  # (r1, r2) ⊙ (r1, r2): tr(XYᵀ) = Σ X⊙Y


def difference_norm(
    B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor
) -> float:
    """‖B₁A₁ − B₂A₂‖_F through the stacked factors [B₁, −B₂]·[A₁; A₂] and their small core.

    The expanded ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ cancels catastrophically when X ≈ Y; the core of the
    stacked factors does not. Pass float64 factors for a float64 answer.
    """
    import torch

    b, a = stack_factors([(B1, A1, 1.0), (B2, A2, -1.0)])  # (out, r1+r2), (r1+r2, in)
    _, rb = torch.linalg.qr(b)
    _, ra = torch.linalg.qr(a.T)
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def principal_angles(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal U₁ and U₂:
    arccos of the singular values of U₁ᵀU₂, min(k₁, k₂) of them."""
    import torch

    if U1.shape[1] == 0 or U2.shape[1] == 0:
        return torch.zeros(0, dtype=U1.dtype)
    cos = torch.linalg.svdvals(U1.T @ U2).clamp(-1.0, 1.0)  # (min(k1, k2),)
    return torch.arccos(cos)


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
