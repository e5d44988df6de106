"""A bare ``.safetensors`` of PEFT-named tensors with no config next to it.

Its scale is unknown without a config, so reading it needs ``alpha`` (and optionally the
trained ``rank``); we never assume alpha = r.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapterctl.adapter import Adapter, TensorSource
from adapterctl.config import AdapterConfig
from adapterctl.errors import BrokenFile, NotFound, UsageError
from adapterctl.formats import ReadOptions
from adapterctl.formats.peft import _LORA_KEY, parse_tensors
from adapterctl.hookspecs import hookimpl
from adapterctl.tensorfile import read_header


class BareSafetensors:
    """One ``.safetensors`` file of ``…lora_A.weight`` / ``…lora_B.weight`` tensors."""

    name = "safetensors"
    description = "bare .safetensors of PEFT keys (needs --alpha, optionally --rank)"

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".safetensors"

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        config_file = path.parent / "adapter_config.json"
        if options.alpha is None and config_file.exists() and path.name.startswith("adapter_model"):
            from adapterctl.formats.peft import PeftFolder

            return PeftFolder().read(path.parent, options)
        header = read_header(path)
        tensors: dict[str, TensorSource] = dict(header.tensors)
        _refuse_foreign(path, list(tensors))
        ranks = sorted(
            {
                t.shape[0]
                for k, t in tensors.items()
                if (m := _LORA_KEY.match(k))
                and m["part"] in ("lora_A", "lora_embedding_A")
                and t.shape  # a 0-d factor is refused with the shape check below
            }
        )
        if options.alpha is None:
            raise UsageError(
                f"{path}: a bare .safetensors has no adapter_config.json, so its scale "
                "(alpha/r) is unknown; pass --alpha (and --rank) or add the config"
            )
        if not math.isfinite(options.alpha):
            raise UsageError(f"--alpha {options.alpha} is not a finite number; pass a real alpha")
        rank = options.rank if options.rank is not None else (ranks[0] if ranks else 8)
        # Without --rank, each module's rank comes from its tensors; alpha scales each as
        # alpha/r. With --rank, the declared rank is checked against the tensors (validate).
        rank_pattern = {}
        for k, t in tensors.items():
            m = _LORA_KEY.match(k)
            if options.rank is not None or not m:
                continue
            if m["part"] in ("lora_A", "lora_embedding_A") and t.shape and t.shape[0] != rank:
                rank_pattern[f"^{_escape(m['module'])}"] = int(t.shape[0])
        try:
            config = AdapterConfig(
                r=rank,
                lora_alpha=options.alpha,
                rank_pattern=rank_pattern,
                use_dora=any("lora_magnitude_vector" in k for k in tensors),
                base_model_name_or_path=_meta_base(header.metadata),
            )
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise BrokenFile(f"{path}: {msg} (a lora_A has rank 0?); re-save the adapter") from None
        return parse_tensors(tensors, config, path, self.name, [path])


# Key patterns of LoRA files in other tools' naming -> what to call them, and the fix.
_SD_PLUGIN = "install the plugin that reads it: pip install adapterctl-diffusers"
_FOREIGN = (
    (
        re.compile(r"\.(hada_w1_a|hada_w2_a|lokr_w1|lokr_w1_a)$"),
        "a LyCORIS LoHa/LoKr file",
        _SD_PLUGIN,
    ),
    (
        re.compile(r"^lora_(unet|te\d?)_|\.lora_(down|up)\.weight$"),
        "a kohya-style LoRA",
        _SD_PLUGIN,
    ),
    (
        re.compile(r"(_lora\.(down|up)|\.lora\.(down|up))\.weight$"),
        "a diffusers-style LoRA",
        _SD_PLUGIN,
    ),
    (
        re.compile(r"\.lora_[ab]$"),
        "MLX-LM adapter weights",
        "put its adapter_config.json next to it",
    ),
)


def _refuse_foreign(path: Path, keys: list[str]) -> None:
    """A file of LoRA tensors in another tool's naming, with no PEFT key at all: say what it
    is (exit 4) instead of reading an adapter of zero modules.

    Raises:
        NotFound: no installed format reads that naming.
    """
    if not keys or any(_LORA_KEY.match(k) for k in keys):
        return
    for pattern, what, fix in _FOREIGN:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit is not None:
            raise NotFound(
                f"{path}: {what} (keys like {hit!r}), not PEFT-named; no installed format reads "
                f"it: {fix} (adapterctl plugins lists what is installed)"
            )


def _escape(module: str) -> str:
    return re.escape(module)


def _meta_base(meta: dict[str, str]) -> str | None:
    for key in ("base_model_name_or_path", "base_model"):
        if key in meta:
            try:
                v = json.loads(meta[key])
                return str(v) if v else None
            except json.JSONDecodeError:
                return meta[key]
    return None


@hookimpl
def register_formats(register: Any) -> None:
    register(BareSafetensors())
