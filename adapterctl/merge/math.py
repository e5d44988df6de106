"""The merge's arithmetic, written once: what a job adds to its base tensor and how.

Every engine (``numpy_engine``, ``torch_engine``) and ``verify`` take a job's update from
here, so they agree on the formula and on where it rounds:

    V  = W + Σᵢ cᵢ·ΔWᵢ                  cᵢ = wᵢ·sᵢ (merge weight × LoRA scale), ΔWᵢ = Bᵢ·Aᵢ
    W' = m / ‖V‖ · V   (DoRA)            the norm per output: rows, or columns when stored (in, out)
    W' = W' + Σⱼ cⱼ·biasⱼ                lora biases, on bias tensors

The sum Σ cᵢ·ΔWᵢ is one product of side-by-side factors, L·R with L (rows, Σr) and
R (Σr, cols), in the weight's stored layout flattened to rows (``LoraModule.factors``:
(c·B, A) for (out, in) weights, (Aᵀ, c·Bᵀ) for weights stored (in, out): GPT-2 Conv1D,
embeddings). Each coefficient is applied to B in float64 and the factor rounded once into the
compute dtype; the biases are
summed in float64 and rounded once. The arrays are NumPy's; an engine moves them to its own
library once per tensor (``Update.map``), and ``finish`` runs on either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from adapterctl.merge.plan import Delta, Job


def delta_factors(
    d: Delta, dtype: str = "float32"
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(L, R) of one adapter's weighted update wᵢ·sᵢ·ΔWᵢ (``LoraModule.factors``)."""
    return d.module.factors(d.weight * d.module.scale, dtype)


def combined(job: Job, w: torch.Tensor) -> torch.Tensor:
    """The ``--method`` combination of the job's updates sᵢ·ΔWᵢ (the LoRA scale, not the merge
    weight: the method weighs the inputs itself), dense, shaped, typed and placed like ``w``.
    Methods need every input's whole ΔW (TIES trims by global magnitude)."""
    import torch

    assert job.combine is not None
    dtype = str(w.dtype).removeprefix("torch.")  # float32 (engines) or float64 (verify)
    deltas = [torch.zeros_like(w) for _ in job.combine.weights]
    for d in job.deltas:
        left, right = d.module.factors(dtype=dtype)  # sᵢ·Bᵢ·Aᵢ
        on = (torch.from_numpy(left).to(w.device), torch.from_numpy(right).to(w.device))
        deltas[d.index] = (on[0] @ on[1]).reshape(w.shape)  # (rows, r) @ (r, cols)
    gen = job.combine.generator(job.deltas[0].module.name)
    return job.combine.method.combine_dense(deltas, job.combine.weights, job.combine.options, gen)


@dataclass
class Update:
    """What one job adds to its base tensor W (flattened to (rows, cols)): W' = finish(W + L·R).

    ``left`` (rows, Σr) and ``right`` (Σr, cols) hold every delta's factors side by side, DoRA's
    included; ``magnitude`` is DoRA's m, per row (``norm_axis`` 1) or per column (``norm_axis``
    0: GPT-2 Conv1D, stored (in, out)); ``bias`` (rows, 1) is Σⱼ cⱼ·biasⱼ.
    """

    left: Any
    right: Any
    magnitude: Any = None
    norm_axis: int = 1
    bias: Any = None

    @property
    def rank(self) -> int:
        """The summed rank Σr of the factors."""
        return int(self.right.shape[0])

    @property
    def row_local(self) -> bool:
        """True when a row of W' needs only that row of W (DoRA norms, if any, run along rows)."""
        return self.magnitude is None or self.norm_axis == 1

    @property
    def finishes(self) -> bool:
        """True when ``finish`` has work after the sum (DoRA, lora biases)."""
        return self.magnitude is not None or self.bias is not None

    def map(self, convert: Callable[[Any], Any]) -> Update:
        """The same update with every array passed through ``convert`` (e.g. to torch, on a
        device)."""
        return replace(
            self,
            left=convert(self.left),
            right=convert(self.right),
            magnitude=None if self.magnitude is None else convert(self.magnitude),
            bias=None if self.bias is None else convert(self.bias),
        )


def update(job: Job, rows: int, cols: int, dtype: str = "float32") -> Update:
    """The job's update in NumPy arrays of ``dtype``, for its base flattened to (rows, cols).
    A ``--method`` job's deltas are not in it (they go through ``combined``), its biases are."""
    import numpy as np

    pairs = [] if job.combine is not None else [delta_factors(d, dtype) for d in job.deltas]
    magnitude = None
    axis = 1
    if job.dora is not None:
        pairs.append(delta_factors(job.dora, dtype))  # V = W + s·B·A, then rescaled
        assert job.dora.module.magnitude is not None
        magnitude = job.dora.module.magnitude.array().astype(dtype).reshape(-1)  # (out,)
        axis = 0 if job.dora.layout == "conv1d" else 1
    left = np.hstack([lf for lf, _ in pairs]) if pairs else np.empty((rows, 0), dtype)
    right = np.vstack([rf for _, rf in pairs]) if pairs else np.empty((0, cols), dtype)
    return Update(left, right, magnitude, axis, bias(job, rows, dtype))


def bias(job: Job, rows: int, dtype: str = "float32") -> np.ndarray[Any, Any] | None:
    """Σⱼ cⱼ·biasⱼ of the job's lora biases, (rows, 1), summed in float64 and rounded once;
    None when it has none."""
    import numpy as np

    if not job.bias_add:
        return None
    total = np.zeros((rows, 1), np.float64)
    for b, coeff in job.bias_add:
        total += coeff * b.array().astype(np.float64).reshape(-1, 1)  # (rows, 1)
    return total.astype(dtype)


def finish(v: Any, upd: Update, rows: Any = slice(None)) -> Any:
    """Finish V = W + L·R in place: DoRA's rescaling, then the lora biases; returns ``v``.

    Works on NumPy arrays and torch tensors alike (``upd`` mapped to the same library).

    Args:
        v: rows ``rows`` of V, (k, cols) float; the whole tensor when DoRA's norms run down
            columns (``norm_axis`` 0).
        upd: the job's update.
        rows: which rows ``v`` holds (a slice or an index array).
    """
    if upd.magnitude is not None:
        if upd.norm_axis == 1:
            v *= (upd.magnitude[rows] / _norm(v, 1))[:, None]  # m / ‖V‖ per row
        else:
            v *= (upd.magnitude / _norm(v, 0))[None, :]  # m / ‖V‖ per column
    if upd.bias is not None:
        v += upd.bias[rows]
    return v


def _norm(v: Any, axis: int) -> Any:
    """The Euclidean norms of ``v`` along ``axis`` (NumPy or torch)."""
    return (v * v).sum(axis) ** 0.5
