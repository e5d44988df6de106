"""An adapter as data: a config plus one ``LoraModule`` of low-rank factors per target.

``LoraModule`` is the currency every command works on. Tensors stay on disk until a command
asks for them (``module.A()``), so reading an adapter costs its headers only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from adapterctl.config import AdapterConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

Layout = Literal["linear", "conv1d", "embedding", "conv"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[str | int, ...]:
    """A sort key that reads digit runs as numbers, so that ``layers.2`` comes before
    ``layers.10`` (the order every report lists modules in)."""
    # split() alternates text and digits, text first: positions compare like with like
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(name)))


class TensorSource(Protocol):
    """Anything that knows a tensor's name, dtype, shape and can load it (lazily)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def numel(self) -> int: ...
    def load(self) -> torch.Tensor: ...
    def array(self) -> np.ndarray[Any, Any]: ...  # its dtype; bf16, float8 as float32


@dataclass(frozen=True)
class MemoryTensor:
    """A tensor already in memory (legacy ``.bin`` adapters, composed results)."""

    name: str
    tensor: torch.Tensor

    @property
    def dtype(self) -> str:
        from adapterctl.tensorfile import TORCH_DTYPE_NAMES

        torch_name = str(self.tensor.dtype).removeprefix("torch.")
        for st, tn in TORCH_DTYPE_NAMES.items():
            if tn == torch_name:
                return st
        return torch_name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def numel(self) -> int:
        return int(self.tensor.numel())

    def load(self) -> torch.Tensor:
        return self.tensor

    def array(self) -> np.ndarray[Any, Any]:
        """The tensor as a numpy array of the same dtype, on the CPU; bfloat16 and float8
        widened to float32 exactly, as ``TensorInfo.array`` does (``floats.widen``)."""
        import torch

        from adapterctl.floats import widen_bf16, widen_f8

        t = self.tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return widen_bf16(t.view(torch.int16).numpy())
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return widen_f8(t.view(torch.uint8).numpy(), self.dtype)
        return t.numpy()


@dataclass(frozen=True)
class Reshaped:
    """Another ``TensorSource`` under a new shape of the same size (a flat factor viewed as
    a convolution's)."""

    source: TensorSource
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def numel(self) -> int:
        return self.source.numel

    def load(self) -> torch.Tensor:
        return self.source.load().reshape(self.shape)

    def array(self) -> np.ndarray[Any, Any]:
        return self.source.array().reshape(self.shape)


@dataclass
class LoraModule:
    """The low-rank update of one target module: ΔW = scale · B · A in the weight's layout.

    ``A`` is stored as PEFT stores it: (r, in) for linear, (r, in, *kernel) for conv,
    (r, num_embeddings) for embeddings; ``B`` is (out, r), (out, r, 1…) or (dim, r).
    ``layout`` says how B·A maps onto the base weight: ``linear`` (out, in); ``conv1d``
    (GPT-2 Conv1D, stored in×out, so (B·A)ᵀ); ``embedding`` ((B·A)ᵀ: vocab × dim);
    ``conv`` (B·A reshaped to (out, in, *kernel)).
    """

    name: str
    a: TensorSource
    b: TensorSource
    alpha: float
    scale: float
    config_rank: int
    layout: Layout = "linear"
    magnitude: TensorSource | None = None
    bias: TensorSource | None = None
    # The tensors the file holds when ``a`` and ``b`` are computed from them (LyCORIS LoHa and
    # LoKr): what ``tensors`` lists, so dtypes and parameter counts describe the file.
    stored: tuple[TensorSource, ...] = ()

    @property
    def rank(self) -> int:
        """The rank the tensors actually have."""
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        n = 1
        for d in self.a.shape[1:]:
            n *= d
        return n

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape the base weight must have for this update, in the weight's own layout."""
        if self.layout in ("conv1d", "embedding"):
            return (self.in_features, self.out_features)
        if self.layout == "conv":
            return (self.out_features, *self.a.shape[1:])
        return (self.out_features, self.in_features)

    @property
    def b_shape(self) -> tuple[int, ...]:
        """B's shape as PEFT and kohya store it: (out, r), or (out, r, 1, …) for a convolution
        (whatever shape ``b`` has: a computed pair's B is (out, r))."""
        ones = (1,) * (len(self.a.shape) - 2) if self.layout == "conv" else ()
        return (self.out_features, self.rank, *ones)

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def as_convolution(self, kernel: tuple[int, ...]) -> LoraModule:
        """This module, stored flat as a linear (r, in·k…) pair, as a ``conv`` module of
        ``kernel``: A viewed as (r, in, *kernel), the same numbers."""
        n = math.prod(kernel)
        if self.in_features % n:
            raise ValueError(f"{self.name}: {self.in_features} inputs are not a {kernel} kernel")
        shape = (self.rank, self.in_features // n, *kernel)
        return replace(self, a=Reshaped(self.a, shape), layout="conv")

    @property
    def tensors(self) -> list[TensorSource]:
        """The module's tensors as stored: A, B (or what they are computed from), DoRA
        magnitude and lora bias where present."""
        factors = self.stored or (self.a, self.b)
        return [t for t in (*factors, self.magnitude, self.bias) if t is not None]

    def A(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A as an (r, in) matrix (conv kernels flattened into ``in``)."""
        import torch

        a = self.a.load()
        return a.reshape(a.shape[0], -1).to(dtype or torch.float32)

    def B(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """B as an (out, r) matrix."""
        import torch

        b = self.b.load()
        return b.reshape(b.shape[0], -1).to(dtype or torch.float32)

    def arrays(
        self, dtype: str | None = "float32"
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(B, A) as numpy (out, r) and (r, in) matrices of ``dtype`` (None: as stored, with
        bfloat16 and float8 widened to float32), without torch for safetensors files."""
        b, a = self.b.array(), self.a.array()
        b, a = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)  # (out, r), (r, in)
        if dtype is None:
            return b, a
        return b.astype(dtype, copy=False), a.astype(dtype, copy=False)

    def factors(
        self, coeff: float | None = None, dtype: str = "float32"
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(L, R) with L·R = ``coeff``·B·A in the stored layout of the weight this module
        updates, flattened to rows: (out, r) @ (r, in) for ``linear``/``conv`` (conv kernels:
        (out, in·k)); (in, r) @ (r, out) for ``conv1d``/``embedding`` (stored (in, out)).

        Args:
            coeff: applied to B in float64 before the one rounding into ``dtype``; default
                the module's scale.
            dtype: the factors' numpy dtype.
        """
        import numpy as np

        b, a = self.arrays("float64")  # (out, r), (r, in)
        cb = (self.scale if coeff is None else coeff) * b
        if self.layout in ("conv1d", "embedding"):
            return (
                np.ascontiguousarray(a.T, dtype=dtype),  # (in, r)
                np.ascontiguousarray(cb.T, dtype=dtype),  # (r, out)
            )
        return np.ascontiguousarray(cb, dtype=dtype), np.ascontiguousarray(a, dtype=dtype)

    def update_bound(self, coeff: float | None = None) -> float:
        """An upper bound on max |coeff·(B·A)ᵢⱼ| (default ``coeff``: the scale), from the
        factors without forming B·A (``lowrank.entry_bound``); +inf when a factor or
        ``coeff`` is NaN or Inf."""
        from adapterctl.lowrank import entry_bound

        b, a = self.arrays(None)  # (out, r), (r, in), as stored
        return entry_bound(b, a, self.scale if coeff is None else coeff)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ΔW = scale·B·A in the base weight's layout and shape (float32 unless
        ``dtype``), computed in float64 and rounded once.

        Use for merging one module at a time; prefer ``adapterctl.lowrank`` for norms and
        spectra, which never form this matrix.
        """
        import torch

        left, right = self.factors(dtype="float64")
        d = torch.from_numpy(left @ right)  # (rows, r) @ (r, cols)
        return d.reshape(self.weight_shape).to(dtype or torch.float32)


@dataclass
class ExtraTensor:
    """A full tensor saved in the adapter: a ``modules_to_save`` copy, a bias trained with
    ``bias="all"``/``"lora_only"``, or a saved (frozen) base layer.

    ``target`` is the base parameter it stands for (``lm_head.weight``,
    ``model.embed_tokens.weight``, ``transformer.h.0.attn.c_attn.bias``); ``kind`` is
    ``modules_to_save``, ``bias`` (both trained: they replace the base's tensor) or
    ``base_layer`` (a frozen copy: the base layer PEFT saves next to an embedding LoRA, or
    the ``original_module`` of a ``modules_to_save`` module).
    """

    target: str
    kind: Literal["modules_to_save", "bias", "base_layer"]
    tensor: TensorSource


@dataclass
class Adapter:
    """A LoRA adapter read from disk."""

    path: Path
    format: str
    config: AdapterConfig
    modules: dict[str, LoraModule]
    extras: list[ExtraTensor] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Tensors the reader could not place, and modules with only one of A/B (for findings).
    unknown_tensors: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    @property
    def weight_files(self) -> list[Path]:
        return [f for f in self.files if f.suffix in (".safetensors", ".bin")]

    @property
    def all_tensors(self) -> list[TensorSource]:
        out: list[TensorSource] = []
        for m in self.modules.values():
            out.extend(m.tensors)
        out.extend(e.tensor for e in self.extras)
        return out

    @property
    def dtypes(self) -> list[str]:
        """The distinct dtypes of the adapter's LoRA tensors."""
        return sorted({t.dtype for t in self.all_tensors})

    @property
    def is_dora(self) -> bool:
        """True when the adapter is DoRA: its config says so (``use_dora``) or a module carries
        a magnitude vector. Its update m·(W+ΔW)/‖W+ΔW‖ is not linear in ΔW: merged alone only,
        never summed or combined with others (exit 3 everywhere)."""
        return self.config.use_dora or any(m.is_dora for m in self.modules.values())

    @property
    def trainable_parameters(self) -> int:
        """Parameters trained with the adapter: LoRA factors, DoRA magnitudes, lora biases,
        ``modules_to_save`` copies and trained biases (saved base layers are frozen copies and
        do not count), as PEFT's ``get_nb_trainable_parameters`` counts them."""
        n = sum(t.numel for m in self.modules.values() for t in m.tensors)
        return n + sum(e.tensor.numel for e in self.extras if e.kind != "base_layer")

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)
