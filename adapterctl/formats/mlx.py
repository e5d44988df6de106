"""MLX-LM LoRA adapters: a folder of ``adapters.safetensors`` and MLX's own
``adapter_config.json`` (what ``mlx_lm.lora`` writes).

MLX stores each module's factors transposed against PEFT: ``….lora_a`` is (in, r) and
``….lora_b`` is (r, out), and the update is ΔW = scale · lora_bᵀ · lora_aᵀ (mlx_lm's
``LoRALinear``: ``y + scale · (x @ lora_a) @ lora_b``; an embedding's ΔW, vocab × dim, is
scale · lora_a · lora_b). Which scale: the configs of the mlx-lm versions whose
``lora_parameters`` carry an ``alpha`` applied ``scale · alpha / rank``; the others (and the
current one) apply ``scale`` itself (default 20). Both config generations are read: the older
``lora_layers`` and the newer ``num_layers`` / ``fine_tune_type``. DoRA (``fine_tune_type:
dora``), full fine-tunes and mixture-of-experts (3-D) factors are refused with the reason.

The factors are read lazily and transposed on access, so the adapter works with every command
and converts to a PEFT folder (``adapterctl convert … --to peft``) with the same ΔW.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.adapter import Adapter, LoraModule
from adapterctl.config import AdapterConfig
from adapterctl.errors import BrokenFile, UnsupportedAdapter
from adapterctl.formats import ReadOptions
from adapterctl.hookspecs import hookimpl
from adapterctl.tensorfile import read_header

if TYPE_CHECKING:
    import numpy as np
    import torch

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_a|lora_b)$")
DEFAULT_SCALE = 20.0  # mlx_lm.tuner.lora.LoRALinear


@dataclass
class Transposed:
    """A 2-D tensor of the file, read as its transpose (MLX's factors in PEFT's layout)."""

    inner: Any  # a TensorSource

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def dtype(self) -> str:
        return str(self.inner.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.inner.shape))

    @property
    def numel(self) -> int:
        return int(self.inner.numel)

    def array(self) -> np.ndarray[Any, Any]:
        import numpy as np

        return np.ascontiguousarray(self.inner.array().T)

    def load(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.array())


def mlx_scale(params: dict[str, Any]) -> float:
    """The scale mlx-lm applies for ``lora_parameters`` (see the module docstring)."""
    scale = float(params.get("scale", DEFAULT_SCALE))
    if "alpha" in params:
        return scale * float(params["alpha"]) / int(params["rank"])
    return scale


def is_mlx_folder(path: Path) -> bool:
    """A folder holding MLX's ``adapters.safetensors`` and no PEFT weights."""
    return (
        path.is_dir()
        and (path / WEIGHTS).is_file()
        and not any((path / n).exists() for n in ("adapter_model.safetensors", "adapter_model.bin"))
    )


class MlxAdapter:
    """An MLX-LM adapter folder (``adapters.safetensors`` + MLX ``adapter_config.json``)."""

    name = "mlx"
    description = "MLX-LM adapter folder: adapters.safetensors + MLX adapter_config.json"

    def detect(self, path: Path) -> bool:
        if path.is_file() and path.name == WEIGHTS:
            path = path.parent
        return is_mlx_folder(path)

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        folder = path.parent if path.is_file() else path
        try:
            raw = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BrokenFile(
                f"{folder}: {WEIGHTS} without its {CONFIG} (MLX writes both); copy the config "
                "next to the weights"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BrokenFile(f"{folder / CONFIG}: not valid JSON ({exc}); fix the file") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("lora_parameters"), dict):
            raise BrokenFile(
                f"{folder / CONFIG}: no lora_parameters (an MLX-LM adapter config has them); "
                "is this an MLX adapter?"
            )
        kind = raw.get("fine_tune_type", "lora")
        if kind != "lora":
            raise UnsupportedAdapter(
                f"{folder}: an MLX {kind} adapter (fine_tune_type); adapterctl reads MLX LoRA "
                "adapters only"
            )
        params: dict[str, Any] = raw["lora_parameters"]
        rank = params.get("rank")
        try:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(rank)
            scale = mlx_scale(params)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise BrokenFile(
                f"{folder / CONFIG}: lora_parameters needs a numeric rank and scale "
                f"(got {params!r}); fix the config"
            ) from None
        if not math.isfinite(scale):
            raise BrokenFile(f"{folder / CONFIG}: the scale {scale} is not finite; fix the config")
        header = read_header(folder / WEIGHTS)
        parts: dict[str, dict[str, Any]] = {}
        for key, info in header.tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise BrokenFile(
                    f"{folder / WEIGHTS}: tensor {key!r} is not an MLX lora_a/lora_b factor; "
                    "re-save the adapter"
                )
            if len(info.shape) != 2:
                raise UnsupportedAdapter(
                    f"{folder / WEIGHTS}: {key} has shape {list(info.shape)}: only 2-D factors "
                    "are read (mixture-of-experts factors, 3-D, are not yet)"
                )
            parts.setdefault(m["module"], {})[m["part"]] = info
        modules = _modules(folder, parts, scale, rank)
        config = AdapterConfig.model_validate(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": scale * rank,  # PEFT's alpha/r is then MLX's scale
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
                "rank_pattern": {
                    "^" + re.escape(n): m.rank for n, m in sorted(modules.items()) if m.rank != rank
                },
                "alpha_pattern": {
                    "^" + re.escape(n): scale * m.rank
                    for n, m in sorted(modules.items())
                    if m.rank != rank
                },
                "base_model_name_or_path": raw.get("model"),
            }
        )
        files = [folder / CONFIG, folder / WEIGHTS]
        return Adapter(path=folder, format=self.name, config=config, modules=modules, files=files)


def _modules(
    folder: Path, parts: dict[str, dict[str, Any]], scale: float, config_rank: int
) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if "lora_a" not in p or "lora_b" not in p:
            raise BrokenFile(
                f"{folder / WEIGHTS}: {name} has only {next(iter(p))}; re-save the adapter"
            )
        a, b = p["lora_a"], p["lora_b"]  # (in, r), (r, out)
        if a.shape[1] != b.shape[0]:
            raise BrokenFile(
                f"{folder / WEIGHTS}: {name}: lora_a {list(a.shape)} and lora_b {list(b.shape)} "
                "disagree on the rank; re-save the adapter"
            )
        rank = int(a.shape[1])
        embedding = name.endswith(("embed_tokens", "wte", "embeddings"))
        modules[name] = LoraModule(
            name=name,
            # PEFT's layout: linear A (r, in), B (out, r); embedding A (r, vocab), B (dim, r)
            a=Transposed(a),
            b=Transposed(b),
            alpha=scale * rank,
            scale=scale,
            config_rank=config_rank,
            layout="embedding" if embedding else "linear",
        )
    return modules


@hookimpl
def register_formats(register: Any) -> None:
    register(MlxAdapter())
