"""LyCORIS LoHa and LoKr modules as exact low-rank factor pairs.

LoHa stores two low-rank pairs and applies their Hadamard (elementwise) product,
ΔW = s · (W1a·W1b) ⊙ (W2a·W2b); LoKr applies a Kronecker product, ΔW = s · W1 ⊗ W2, each
factor either full or a low-rank pair. Neither is a single low-rank pair as stored, but both
are one exactly, of a larger rank:

- Hadamard: (B1·A1) ⊙ (B2·A2) = B·A with B = B1 ⊙ᵣ B2 (row-wise Kronecker, out × r1·r2) and
  A = A1 ⊙꜀ A2 (column-wise Kronecker, r1·r2 × in): entry (p, q) of both sides is
  Σᵢⱼ B1[p,i]·A1[i,q]·B2[p,j]·A2[j,q].
- Kronecker: (U1·V1) ⊗ (U2·V2) = (U1 ⊗ U2)·(V1 ⊗ V2) (mixed products); a full factor W is
  W·I or I·W, whichever has the smaller rank.

Every entry of these B and A is a product of two stored numbers, exact in float64, so the
rank-(r1·r2) pair's ΔW equals the float64 Hadamard/Kronecker product, and every adapterctl
command (inspect, validate, diff, compose, resize, merge) works on it unchanged. The factors
are computed when a command asks for them, never stored.

Scales as LyCORIS and the SD front ends apply them: alpha over the rank of the stored
low-rank pairs (LoHa: ``hada_w1_b``'s rows; LoKr: ``lokr_w1_b``'s rows, else ``lokr_w2_b``'s),
alpha = rank where the file has none or alpha is 0, and scale 1 for a LoKr whose two factors
are both full. (LyCORIS's own ``get_diff_weight`` multiplies by the scale twice; its forward
pass, ComfyUI, the WebUI and PEFT apply it once, as here.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterctl.errors import BrokenFile

if TYPE_CHECKING:
    import numpy as np
    import torch

    from adapterctl.adapter import TensorSource

Array = Any  # numpy float64 array

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(frozen=True)
class Computed:
    """A float64 factor computed from stored tensors when asked for (a ``TensorSource``)."""

    name: str
    shape: tuple[int, ...]
    compute: Callable[[], Array]

    @property
    def dtype(self) -> str:
        return "F64"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def array(self) -> np.ndarray[Any, Any]:
        out = self.compute()
        assert tuple(out.shape) == self.shape, (out.shape, self.shape)
        return out

    def load(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.array())


def _f64(t: TensorSource) -> Array:
    import numpy as np

    return np.asarray(t.array(), dtype=np.float64)


def _tucker(core: Array, down: Array) -> Array:
    """A Tucker pair's right factor: R[i, (q, k…)] = Σⱼ core[i, j, k…]·down[j, q], (r, in·k…)."""
    import numpy as np

    r = core.shape[0]
    return np.einsum("ij...,jq->iq...", core, down).reshape(r, -1)  # (r, in, k…) → (r, in·k…)


def _row_kron(x: Array, y: Array) -> Array:
    """(n, r1), (n, r2) → (n, r1·r2): row p is x[p] ⊗ y[p]."""
    return (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1)


def _col_kron(x: Array, y: Array) -> Array:
    """(r1, n), (r2, n) → (r1·r2, n): column q is x[:, q] ⊗ y[:, q]."""
    return (x[:, None, :] * y[None, :, :]).reshape(-1, x.shape[1])


def _where(path: object, name: str) -> str:
    return f"{path}: {name}"


def loha(path: object, name: str, p: dict[str, TensorSource]) -> tuple[Computed, Computed, int]:
    """(A, B, rank of the stored pairs) of a LoHa module: B·A = (W1a·W1b) ⊙ (W2a·W2b), A shaped
    (r1·r2, in, k…) where a Tucker core gives the kernel, else (r1·r2, in·k…)."""
    missing = [k for k in LOHA_PARTS[:4] if k not in p]
    if missing or (("hada_t1" in p) != ("hada_t2" in p)):
        raise BrokenFile(
            f"{_where(path, name)} is a LoHa module without {', '.join(missing) or 'both cores'}; "
            "re-save the file"
        )
    w1a, w1b, w2a, w2b = (p[k] for k in LOHA_PARTS[:4])
    tucker = "hada_t1" in p
    try:
        if tucker:  # w·a (r, out), w·b (r, in), t (r, r, k…)
            t1, t2 = p["hada_t1"], p["hada_t2"]
            r1, r2 = w1a.shape[0], w2a.shape[0]
            out, inn = w1a.shape[1], w1b.shape[1]
            kernel = tuple(t1.shape[2:])
            ok = (
                len(w1a.shape) == len(w1b.shape) == len(w2a.shape) == len(w2b.shape) == 2
                and w1b.shape[0] == r1 and w2b.shape[0] == r2
                and tuple(t1.shape[:2]) == (r1, r1) and tuple(t2.shape[:2]) == (r2, r2)
                and tuple(t2.shape[2:]) == kernel and w2a.shape[1] == out and w2b.shape[1] == inn
            )  # fmt: skip
            a_shape: tuple[int, ...] = (r1 * r2, inn, *kernel)
        else:  # w·a (out, r), w·b (r, in·k…)
            r1, r2 = w1a.shape[1], w2a.shape[1]
            out, inn = w1a.shape[0], w1b.shape[1]
            ok = (
                len(w1a.shape) == len(w1b.shape) == len(w2a.shape) == len(w2b.shape) == 2
                and w1b.shape[0] == r1 and w2b.shape[0] == r2
                and w2a.shape[0] == out and w2b.shape[1] == inn
            )  # fmt: skip
            a_shape = (r1 * r2, inn)
    except IndexError:
        ok = False
    if not ok:
        shapes = ", ".join(f"{k} {list(p[k].shape)}" for k in LOHA_PARTS if k in p)
        raise BrokenFile(f"{_where(path, name)}: LoHa factors do not fit ({shapes}); re-save it")

    def left() -> Array:  # (out, r1·r2)
        if tucker:
            return _row_kron(_f64(w1a).T, _f64(w2a).T)
        return _row_kron(_f64(w1a), _f64(w2a))

    def right() -> Array:  # (r1·r2, in·k…)
        if tucker:
            x, y = _tucker(_f64(p["hada_t1"]), _f64(w1b)), _tucker(_f64(p["hada_t2"]), _f64(w2b))
        else:
            x, y = _f64(w1b), _f64(w2b)
        return _col_kron(x, y).reshape(a_shape)

    a = Computed(f"{name}.hada_w1_b⊙hada_w2_b", a_shape, right)
    b = Computed(f"{name}.hada_w1_a⊙hada_w2_a", (out, r1 * r2), left)
    return a, b, int(r1)


def _pair_or_full(
    path: object, name: str, p: dict[str, TensorSource], which: str
) -> tuple[tuple[int, int, tuple[int, ...]], int | None]:
    """((out, in, kernel), rank of its low-rank pair or None) of a LoKr factor ``which``."""
    full, a, b = (p.get(f"lokr_{which}{s}") for s in ("", "_a", "_b"))
    t = p.get("lokr_t2") if which == "w2" else None
    if full is not None and a is None and b is None and t is None:
        s = tuple(full.shape)
        if len(s) < 2:
            raise BrokenFile(f"{_where(path, name)}: lokr_{which} {list(s)} is not a matrix")
        return (s[0], s[1], s[2:]), None
    if full is None and a is not None and b is not None:
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise BrokenFile(f"{_where(path, name)}: lokr_{which}_a/_b are not matrices")
        if t is not None:  # a (r, out), b (r, in), t (r, r, k…)
            r = a.shape[0]
            if b.shape[0] != r or tuple(t.shape[:2]) != (r, r):
                raise BrokenFile(f"{_where(path, name)}: lokr_t2 does not fit lokr_w2_a/_b")
            return (a.shape[1], b.shape[1], tuple(t.shape[2:])), int(b.shape[0])
        if a.shape[1] != b.shape[0]:
            raise BrokenFile(
                f"{_where(path, name)}: lokr_{which}_a {list(a.shape)} and lokr_{which}_b "
                f"{list(b.shape)} disagree on the rank; re-save the file"
            )
        return (a.shape[0], b.shape[1], ()), int(b.shape[0])
    raise BrokenFile(
        f"{_where(path, name)} is a LoKr module with neither lokr_{which} nor "
        f"lokr_{which}_a and lokr_{which}_b; re-save the file"
    )


def _lokr_side(p: dict[str, TensorSource], which: str, side: int) -> Array:
    """One side of (U, V) with U·V = the factor: U (out, k) for ``side`` 0, V (k, in·kernel)
    for 1, k its rank (or the smaller side of a full factor: W = W·I or I·W). Only the
    tensors that side needs are read."""
    import numpy as np

    full = p.get(f"lokr_{which}")
    if full is not None:
        out, inn = full.shape[0], math.prod(full.shape[1:])
        w_on_left = inn <= out  # W·I, else I·W
        if (side == 0) == w_on_left:
            return _f64(full).reshape(out, inn)  # (out, in·k…)
        return np.eye(inn if w_on_left else out)
    tucker = which == "w2" and "lokr_t2" in p  # a (r, out), b (r, in), t (r, r, k…)
    if side == 0:
        a = _f64(p[f"lokr_{which}_a"])
        return a.T if tucker else a
    b = _f64(p[f"lokr_{which}_b"])
    return _tucker(_f64(p["lokr_t2"]), b) if tucker else b


def lokr(
    path: object, name: str, p: dict[str, TensorSource]
) -> tuple[Computed, Computed, int | None]:
    """(A, B, rank of the stored pairs or None when both factors are full) of a LoKr module:
    B·A = W1 ⊗ W2, the convolution kernel (if any) coming from W2."""
    (o1, i1, k1), r1 = _pair_or_full(path, name, p, "w1")
    (o2, i2, k2), r2 = _pair_or_full(path, name, p, "w2")
    if k1 and any(k != 1 for k in k1):
        raise BrokenFile(f"{_where(path, name)}: lokr_w1 has a kernel; LyCORIS keeps it in w2")
    flat2 = math.prod(k2)
    rank1 = r1 if r1 is not None else min(o1, i1)
    # w2 flattened to (o2, i2·kernel) when full; a low-rank w2's right side already is.
    rank2 = r2 if r2 is not None else min(o2, i2 * flat2)
    rank = rank1 * rank2
    kernel = k2
    a_shape = (rank, i1 * i2, *kernel) if kernel else (rank, i1 * i2)
    out = o1 * o2

    def left() -> Array:  # (o1·o2, rank)
        import numpy as np

        return np.kron(_lokr_side(p, "w1", 0), _lokr_side(p, "w2", 0))

    def right() -> Array:  # (rank, i1·i2·k…): (i1, (i2, k…)) is the kernel-major layout
        import numpy as np

        return np.kron(_lokr_side(p, "w1", 1), _lokr_side(p, "w2", 1)).reshape(a_shape)

    a = Computed(f"{name}.lokr_w1⊗lokr_w2(right)", a_shape, right)
    b = Computed(f"{name}.lokr_w1⊗lokr_w2(left)", (out, rank), left)
    stored = r1 if r1 is not None else r2
    return a, b, stored
