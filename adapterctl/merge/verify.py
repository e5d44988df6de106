"""``merge --verify``: re-read the written checkpoint and check sampled rows of every merged
tensor against a fresh float64 computation.

Most merged tensors are row-local — a row of W' needs only that row of W and of the factors
(LoRA updates in any layout, lora biases, saved copies, DoRA with its per-row norms) — so only
the sampled rows are read, from the output and from the base, and computed in NumPy: checking
costs a few rows per tensor whatever the model's size, and no torch import. The others need
whole tensors and go through torch: a 4-bit base (dequantised whole), ``--method`` merges
(TIES and DARE look at every entry), DoRA on GPT-2 Conv1D (its norms run down columns) and
4-bit Conv1D weights written back transposed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.errors import ValidationFailed
from adapterctl.merge import math, rounding
from adapterctl.merge.plan import Job, MergePlan
from adapterctl.tensorfile import DTYPE_SIZES, TensorInfo, numpy_dtype, read_header

if TYPE_CHECKING:
    import torch


def verify_output(plan: MergePlan, out_dir: Path, rows: int = 4) -> int:
    """Check ``rows`` sampled rows of every merged tensor in ``out_dir`` against float64 math:
    plain LoRA merges bit for bit against the correctly rounded exact sum
    (``adapterctl.merge.rounding``), DoRA, lora biases, methods and 4-bit bases within one
    rounding of their float64 value plus float32 noise.

    Returns:
        The number of rows checked.

    Raises:
        ValidationFailed: a row is not what it should be.
    """
    import numpy as np

    from adapterctl import floats

    stored: dict[str, TensorInfo] = {}
    for shard in plan.shards:
        stored.update(read_header(out_dir / shard.name).tensors)
    rng = np.random.default_rng(0)
    checked = 0
    for job in plan.jobs:
        if not (job.deltas or job.bias_add or job.dora) or job.quantize is not None:
            continue
        n = _rows(job)
        if n == 0:
            continue
        pick = np.sort(rng.choice(n, size=min(rows, n), replace=False))
        want = None  # plain LoRA merges: the correctly rounded exact sums, widened
        if _row_local(job):
            got, ref, want = _sampled_rows(job, stored[job.name], pick)
        else:
            got, ref = _from_whole_tensors(job, stored[job.name], pick)
        odd = ~np.isfinite(got) | ~np.isfinite(ref)
        if odd.any():  # inf/NaN: agreeing ones come from the base; others are data, not a bug
            same = (got == ref) | (np.isnan(got) & np.isnan(ref))
            if not bool(same[odd].all()):
                raise ValidationFailed(
                    f"verification failed: {job.name} holds inf or NaN where its float64 "
                    "reference does not, or the other way round: a data problem (values out "
                    "of range in the output, the base or the adapter); check the adapter "
                    "with: adapterctl validate SOURCE --base BASE"
                )
            got, ref = np.where(odd, 0.0, got), np.where(odd, 0.0, ref)
        if want is not None:
            # A plain LoRA merge: every value is the correctly rounded exact sum, bit for bit.
            if not bool(((got == want) | odd).all()):
                raise ValidationFailed(
                    f"verification failed: {job.name} is not the correctly rounded exact "
                    "sum; report this with ADAPTERCTL_DEBUG=1"
                )
            checked += len(pick)
            continue
        eps = floats.eps(job.out_dtype)
        # One rounding of the reference into the output dtype, plus float32 accumulation noise.
        tol = np.abs(ref) * (eps / 2) + np.abs(ref).max() * 1e-5 + 1e-12
        if bool((np.abs(got - ref) > tol * 1.01).any()):
            raise ValidationFailed(
                f"verification failed: {job.name} differs from the float64 reference; "
                "report this with ADAPTERCTL_DEBUG=1"
            )
        checked += len(pick)
    return checked


def _rows(job: Job) -> int:
    """Rows of the merged tensor as it is computed ((out, in) for a 4-bit Conv1D weight,
    which is written back transposed)."""
    if job.transpose_out:
        return job.shape[1]
    return job.shape[0] if job.shape else 1


def _row_local(job: Job) -> bool:
    conv1d_dora = job.dora is not None and job.dora.layout == "conv1d"
    return not (job.quant_in or job.combine or job.transpose_out or conv1d_dora)


def _correctly_rounded(job: Job, upd: math.Update, w: Any, pick: Any) -> Any:
    """The correctly rounded exact W + Σ cᵢ·BᵢAᵢ of the base rows ``w`` (rows ``pick``,
    float64 (k, cols)), widened to float64; NaN where the base holds inf or NaN (those are
    compared as they are)."""
    import numpy as np

    from adapterctl.floats import widen

    want = np.full(w.shape, np.nan)
    r, c = np.nonzero(np.isfinite(w))  # (n,), (n,)
    values = rounding.settle(job, upd.left, upd.right, w[r, c], pick[r], c, job.out_dtype)
    want[r, c] = widen(values, job.out_dtype).astype(np.float64)
    return want


def _sampled_rows(job: Job, out: TensorInfo, pick: Any) -> tuple[Any, Any, Any]:
    """(written rows, float64 reference rows, and for a plain LoRA merge the correctly rounded
    exact rows, else None), each (k, cols): only the picked rows are read and computed."""
    import numpy as np

    source = job.replace if job.replace is not None else job.source
    assert source is not None
    if isinstance(source, TensorInfo):
        w = _read_rows(source, pick)
    else:  # a tensor already in memory (legacy .bin adapter)
        w = source.array().reshape(_rows(job), -1)[pick].astype(np.float64)
    upd = math.update(job, _rows(job), w.shape[1], "float64")
    ref = w.copy()
    if upd.rank:
        ref += upd.left[pick] @ upd.right  # (k, Σr) @ (Σr, cols)
    math.finish(ref, upd, pick)
    want = _correctly_rounded(job, upd, w, pick) if rounding.exact(job) else None
    return _read_rows(out, pick), ref, want


def _read_rows(info: TensorInfo, pick: Any) -> Any:
    """Rows ``pick`` of a stored tensor (row-major), as float64 (k, cols): one read per row."""
    import numpy as np

    from adapterctl.floats import widen

    n = info.shape[0] if info.shape else 1
    cols = info.numel // n
    row_bytes = int(cols * DTYPE_SIZES[info.dtype])
    dtype = numpy_dtype(info.dtype)
    out = np.empty((len(pick), cols), dtype=np.float64)
    with open(info.local_path, "rb") as fh:
        for i, r in enumerate(pick):
            fh.seek(info.start + int(r) * row_bytes)
            out[i] = widen(np.frombuffer(fh.read(row_bytes), dtype=dtype), info.dtype)  # exact
    return out


def _from_whole_tensors(job: Job, out: TensorInfo, pick: Any) -> tuple[Any, Any]:
    """(written rows, float64 reference rows) for jobs that need whole tensors (torch)."""
    import torch

    got = out.load().to(torch.float64)
    if job.transpose_out:
        got = got.T
    ref = _reference(job, _reference_base(job))
    n = ref.shape[0]
    index = torch.from_numpy(pick)
    return got.reshape(n, -1)[index].numpy(), ref.reshape(n, -1)[index].numpy()


def _reference_base(job: Job) -> torch.Tensor:
    import torch

    from adapterctl.merge.torch_engine import load_inputs

    inputs = load_inputs(job)
    if job.quant_in is not None:
        from adapterctl import nf4

        return nf4.dequantize(inputs, job.name).to(torch.float64)
    return inputs["w"].to(torch.float64)


def _reference(job: Job, w: torch.Tensor) -> torch.Tensor:
    """The float64 merged tensor, computed densely (``adapterctl.merge.math``)."""
    import torch

    rows = w.shape[0] if w.ndim else 1
    v = w.reshape(rows, -1).clone()  # (rows, cols) float64
    upd = math.update(job, rows, v.shape[1], "float64").map(torch.from_numpy)
    if job.combine is not None:
        v += math.combined(job, w).reshape(rows, -1)
    if upd.rank:
        v += upd.left @ upd.right  # (rows, Σr) @ (Σr, cols)
    return math.finish(v, upd).reshape(w.shape)
