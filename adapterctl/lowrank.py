"""Linear algebra on low-rank factors, without forming the dense out×in ΔW.

For ΔW = s·B·A with B (out×r) and A (r×in): QR of B and of Aᵀ gives B = Q_b R_b and
Aᵀ = Q_a R_a, so ΔW = Q_b (s·R_b R_aᵀ) Q_aᵀ and the r×r core s·R_b R_aᵀ has the singular
values of ΔW. Norms, spectra and stable ranks all come from that core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def frobenius_norm(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> float:
    """‖s·B·A‖_F = |s|·sqrt(tr((BᵀB)(AAᵀ))), from r×r Gram matrices."""
    g = (B.T @ B) * (A @ A.T)  # (r, r) ⊙ (r, r): tr(XY) = Σ X⊙Yᵀ, both symmetric
    return float(abs(scale) * g.sum().clamp_min(0).sqrt())


def stable_rank(sv: torch.Tensor) -> float:
    """‖ΔW‖_F² / σ_max², a smooth count of significant directions (0 for a zero update)."""
    top = float(sv.max()) if sv.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((sv.double() ** 2).sum() / top**2)
