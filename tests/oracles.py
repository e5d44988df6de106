"""bitsandbytes as an oracle, checked before it is trusted.

Tests compare adapterctl's NF4/FP4 code with bitsandbytes (and with the 4-bit layers
transformers loads). An oracle can be wrong, and bitsandbytes 0.50.x on the CPU is, in two
known places:

- ``dequantize_4bit``'s CPU kernel mis-assigns block scales when a row's length is a multiple
  of 16 but not of the blocksize (e.g. 64 columns with blocksize 128): its own quantise →
  dequantise round trip then errs several times the NF4 step.
- On CPUs with AVX512-BF16, an eval-mode ``Linear4bit`` forward repacks its weight for a bf16
  kernel that asserts unless out-features are a multiple of 32, and computes in bf16 whatever
  the compute dtype says.

So every bitsandbytes result used as a reference goes through a check here first: decoded
values against an independent float64 decode of the same bytes (written from the format, not
from ``adapterctl.nf4``), quantised bytes against the NF4 error bound, a layer's forward
against its dequantised weight. A failed check fails the test with "oracle broken: ...", never
as a product error. Test models are built on shapes where the peers are right (in-features a
multiple of the blocksize, out-features a multiple of 32); odd shapes are tested against the
float64 decode and the bound alone.
"""

from __future__ import annotations

import copy
import json
import platform
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch

# float32 products and one sum on the way (scale = code8·nested_absmax + offset, then
# code4·scale): a few float32 roundings of the magnitudes involved.
_F32_SLACK = 8 * 2.0**-24


def cpu() -> str:
    """This CPU as the oracle faults depend on it: torch's vector capability and AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    bf16 = ", AVX512-BF16" if has_avx512bf16() else ""
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}{bf16}"


def broken(what: str) -> NoReturn:
    """Fail the running test as an oracle fault (the product is not what failed)."""
    pytest.fail(
        f"oracle broken: bitsandbytes {version('bitsandbytes')} on this CPU ({cpu()}): {what}; "
        "build the oracle on shapes it handles (in-features a multiple of the blocksize, "
        "out-features a multiple of 32) or pin a version known to be right",
        pytrace=False,
    )


# ------------------------------------------------------------------------------------------
# An independent float64 decode of the stored 4-bit layout


def decode64(
    packed: torch.Tensor,
    code: torch.Tensor,
    scales: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...] | list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, per-element tolerance) of 4-bit codes, in float64.

    Args:
        packed: the packed bytes (any dtype view, any shape), two codes per byte, high first.
        code: the 16 code values.
        scales: the float64 scale of each block, (n_blocks,).
        blocksize: values per block.
        shape: the logical shape.

    Returns:
        The float64 values in ``shape`` and how far a float32 computation of them may be off.
    """
    n = 1
    for d in shape:
        n *= int(d)
    b = packed.detach().contiguous().reshape(-1).view(torch.uint8).long()
    q = torch.stack((b >> 4, b & 15), dim=1).reshape(-1)[:n]  # (n,)
    values = code.double()[q]  # (n,)
    scale = scales.double().repeat_interleave(blocksize)[:n]  # (n,)
    out = values * scale
    return out.reshape(shape), (out.abs() * _F32_SLACK).reshape(shape)


def nested_scales(
    q8: torch.Tensor, nested_code: torch.Tensor, nested_absmax: torch.Tensor, bs: int, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 scales, their float32 tolerance) of double-quantised block scales."""
    idx = torch.arange(q8.numel()) // bs
    part = nested_code.double()[q8.reshape(-1).long()] * nested_absmax.double()[idx]
    return part + offset, (part.abs() + abs(offset)) * _F32_SLACK


def _file_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    (key,) = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    state: dict[str, Any] = json.loads(bytes(tensors[key].tolist()).decode())
    return state


def file_scales(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 block scales, their float32 tolerance) of one weight as transformers saves it."""
    state = _file_state(tensors, prefix)
    absmax = tensors[f"{prefix}.absmax"]
    if f"{prefix}.nested_absmax" not in tensors:
        return absmax.double(), torch.zeros(absmax.numel(), dtype=torch.float64)
    return nested_scales(
        absmax, tensors[f"{prefix}.nested_quant_map"], tensors[f"{prefix}.nested_absmax"],
        int(state["nested_blocksize"]), float(state["nested_offset"]),
    )  # fmt: skip


def decode_file(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 decode of one weight as transformers serialises it: (values, tolerance)."""
    state = _file_state(tensors, prefix)
    scales, tol = file_scales(tensors, prefix)
    code = tensors[f"{prefix}.quant_map"]
    return _with_scale_tolerance(tensors[prefix], code, scales, tol, state["blocksize"],
                                 state["shape"])  # fmt: skip


def within_bound(tensors: dict[str, torch.Tensor], prefix: str, w: torch.Tensor) -> bool:
    """Whether a stored 4-bit weight decodes within the 4-bit error bound of ``w``."""
    values, _ = decode_file(tensors, prefix)
    scales, _ = file_scales(tensors, prefix)
    bound = nf4_bound(
        w, tensors[f"{prefix}.quant_map"], scales, _file_state(tensors, prefix)["blocksize"]
    )
    return bool(((values - w.double()).abs() <= bound).all())


def decode_state(packed: torch.Tensor, qs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 decode of packed codes with a bitsandbytes ``QuantState``: (values, tolerance)."""
    if qs.nested:
        scales, tol = nested_scales(
            qs.absmax, qs.state2.code, qs.state2.absmax, qs.state2.blocksize, float(qs.offset)
        )
    else:
        scales, tol = qs.absmax.double(), torch.zeros(qs.absmax.numel(), dtype=torch.float64)
    return _with_scale_tolerance(packed, qs.code, scales, tol, qs.blocksize, list(qs.shape))


def _with_scale_tolerance(
    packed: torch.Tensor,
    code: torch.Tensor,
    scales: torch.Tensor,
    scale_tol: torch.Tensor,
    blocksize: int,
    shape: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    values, tol = decode64(packed, code, scales, blocksize, shape)
    spread, _ = decode64(packed, code.abs(), scale_tol, blocksize, shape)  # |code|·scale error
    return values, tol + spread


def nf4_bound(
    w: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """The largest error 4-bit codes with these block scales can make, per value.

    Codes are rounded to nearest for the block's absmax (bitsandbytes) or for its stored scale
    (``method="optimal"``), then decoded with the stored scale (after double quantisation, not
    quite the absmax): half the widest gap between neighbouring code values times the larger of
    the two, plus their difference (a scale below the absmax also clips). bitsandbytes' FP4
    decision thresholds sit a hair off the midpoints, hence the 0.1% slack.
    """
    n = w.numel()
    levels = torch.sort(code.double()).values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    scale = scales.double().abs().repeat_interleave(blocksize)[:n].reshape(w.shape)
    flat = w.double().reshape(-1)
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, bs)
    absmax = blocks.abs().amax(dim=1).repeat_interleave(blocksize)[:n].reshape(w.shape)
    return 1.001 * half_gap * torch.maximum(scale, absmax) + (absmax - scale).abs() + 1e-12


# ------------------------------------------------------------------------------------------
# Checked bitsandbytes calls


def bnb_dequantize(
    packed: torch.Tensor, qs: Any, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` in ``dtype``, checked against a float64 decode.

    Fails the test as "oracle broken" where bitsandbytes' result is not the decode of the bytes.
    """
    import bitsandbytes.functional as bnbf

    qs = copy.copy(qs)
    qs.dtype = dtype
    got = bnbf.dequantize_4bit(packed, qs)
    want, tol = decode_state(packed, qs)
    if dtype != torch.float32:
        tol = tol + want.abs() * torch.finfo(dtype).eps  # one rounding into the 16-bit dtype
    err = (got.double() - want).abs()
    if got.shape != want.shape or not bool((err <= tol).all()):
        worst = float(err.max()) if got.shape == want.shape else float("nan")
        broken(
            f"dequantize_4bit of a {list(qs.shape)} weight (blocksize {qs.blocksize}) is off its "
            f"own bytes by up to {worst:.3g}"
        )
    return got


def bnb_quantize(w: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``bitsandbytes.functional.quantize_4bit``, checked: it decodes within the 4-bit bound."""
    import bitsandbytes.functional as bnbf

    packed, qs = bnbf.quantize_4bit(w, **kwargs)
    back, _ = decode_state(packed, qs)
    if qs.nested:
        scales, _ = nested_scales(
            qs.absmax, qs.state2.code, qs.state2.absmax, qs.state2.blocksize, float(qs.offset)
        )
    else:
        scales = qs.absmax.double()
    err = (back - w.double()).abs()
    if not bool((err <= nf4_bound(w, qs.code, scales, qs.blocksize)).all()):
        broken(
            f"quantize_4bit of a {list(w.shape)} weight (blocksize {qs.blocksize}) decodes "
            f"{float(err.max()):.3g} away from it, beyond the 4-bit bound"
        )
    return packed, qs


def linear4bit_weights(model: Any) -> dict[str, torch.Tensor]:
    """``name.weight`` -> the float32 weight of every 4-bit layer, dequantised by bitsandbytes
    (checked)."""
    import bitsandbytes as bnb

    return {
        f"{name}.weight": bnb_dequantize(m.weight.data, m.weight.quant_state)
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def load_4bit(
    path: Path,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute: torch.dtype = torch.bfloat16,
    dtype: torch.dtype | None = None,
    as_saved: bool = False,
    check: bool = True,
) -> Any:
    """A transformers model loaded in 4 bits on the CPU, as users load QLoRA bases, checked.

    Args:
        path: a 16/32-bit checkpoint to quantise while loading, or (``as_saved``) a 4-bit one.
        quant_type, double_quant, compute: the ``BitsAndBytesConfig`` (unless ``as_saved``).
        dtype: the ``dtype`` passed to ``from_pretrained``.
        as_saved: load with the checkpoint's own ``quantization_config``.
        check: run :func:`check_forward` (off only where the model is used to quantise and
            save, never as a reference for a layer's output).

    bitsandbytes' AVX512-BF16 forward path is switched off, so the layers compute in their
    compute dtype (that path runs in bf16 and asserts on out-features not a multiple of 32);
    then :func:`check_forward` makes sure they do.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"device_map": "cpu"}
    if not as_saved:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute,
        )  # fmt: skip
    if dtype is not None:
        kw["dtype"] = dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    if check:
        check_forward(model)
    return model


def check_forward(model: Any) -> None:
    """Every 4-bit layer's forward equals x·Wᵀ (+ bias) for its dequantised W, or "oracle broken".

    The tolerance is the layer's compute dtype's rounding on the sum of |x|·|W|.
    """
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        w, _ = decode_state(m.weight.data, m.weight.quant_state)  # (out, in)
        dt = m.compute_dtype or torch.float32
        x = torch.randn(3, w.shape[1], generator=gen).to(dt)  # (3, in)
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0])
        want = x.double() @ w.T + bias  # (3, out)
        with torch.no_grad():
            got = m(x).double()
        # W, bias and the result each rounded into dt once; sums accumulated in float32 at least.
        size = x.double().abs() @ w.abs().T + bias.abs()  # (3, out)
        eps, eps32 = torch.finfo(dt).eps, torch.finfo(torch.float32).eps
        tol = (eps / 2) * (size + want.abs()) * (dt != torch.float32) + 16 * eps32 * size
        if got.shape != want.shape or not bool(((got - want).abs() <= tol).all()):
            broken(f"Linear4bit {name} ({list(w.shape)}) does not compute x·Wᵀ in {dt}")
