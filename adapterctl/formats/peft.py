"""The PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``
(or a legacy pickled ``adapter_model.bin``, read with ``weights_only=True``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapterctl.adapter import Adapter, ExtraTensor, Layout, LoraModule, MemoryTensor, TensorSource
from adapterctl.config import NON_LORA_TYPES, AdapterConfig
from adapterctl.errors import BrokenFile, UnsupportedAdapter
from adapterctl.formats import ReadOptions
from adapterctl.hookspecs import hookimpl
from adapterctl.tensorfile import check_not_pointer, read_header

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# base_model.model.<module>.<lora part>[.<adapter name>][.weight|.bias]
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.|\.original_module\.")


def read_config(path: Path) -> AdapterConfig:
    """Parse an ``adapter_config.json``; refuse non-LoRA PEFT types by name."""
    check_not_pointer(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrokenFile(f"{path}: invalid JSON ({exc}); fix or re-save the config") from None
    if not isinstance(data, dict):
        raise BrokenFile(f"{path}: expected a JSON object; fix or re-save the config")
    peft_type = str(data.get("peft_type") or "LORA").upper()
    if peft_type in NON_LORA_TYPES or peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{path}: peft_type {peft_type} is not LoRA; adapterctl works on LoRA adapters only"
        )
    try:
        return AdapterConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise BrokenFile(f"{path}: invalid field {loc!r}: {err['msg']}; fix the config") from None


def parse_tensors(
    tensors: dict[str, TensorSource], config: AdapterConfig, path: Path, fmt: str,
    files: list[Path], warnings: list[str] | None = None,
) -> Adapter:  # fmt: skip
    """Group PEFT-named tensors into ``LoraModule``s and extra full tensors.

    Scales follow the config exactly as PEFT applies it (rank/alpha patterns, rsLoRA).
    """
    parts: dict[str, dict[str, TensorSource]] = {}
    extras: list[ExtraTensor] = []
    unknown: list[str] = []
    for key, src in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            part = m["part"] + (".bias" if m["param"] == "bias" else "")
            parts.setdefault(m["module"], {})[part] = src
            continue
        target = key.removeprefix("base_model.model.")
        if ".lora_" in target or not target.endswith((".weight", ".bias")):
            unknown.append(key)
        elif ".base_layer." in target:
            extras.append(ExtraTensor(target.replace(".base_layer.", "."), "base_layer", src))
        else:
            extras.append(ExtraTensor(_SAVED_COPY.sub(".", target), "modules_to_save", src))

    modules: dict[str, LoraModule] = {}
    incomplete: list[str] = []
    for name, p in sorted(parts.items()):
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a = p.get("lora_embedding_A" if embedding else "lora_A")
        b = p.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            incomplete.append(name)
            continue
        layout: Layout
        if embedding:
            layout = "embedding"
        elif len(a.shape) >= 3:
            layout = "conv"
        elif config.fan_in_fan_out:
            layout = "conv1d"
        else:
            layout = "linear"
        modules[name] = LoraModule(
            name=name,
            a=a,
            b=b,
            alpha=config.alpha_for(name),
            scale=config.scale_for(name),
            config_rank=config.rank_for(name),
            layout=layout,
            magnitude=p.get("lora_magnitude_vector"),
            bias=p.get("lora_B.bias"),
        )
    return Adapter(
        path=path, format=fmt, config=config, modules=modules, extras=extras, files=files,
        warnings=list(warnings or []), unknown_tensors=unknown, incomplete=incomplete,
    )  # fmt: skip


def load_bin(path: Path) -> dict[str, TensorSource]:
    """Read a pickled state dict safely (``weights_only=True``); refuse anything but tensors."""
    import pickle

    import torch

    check_not_pointer(path)
    try:
        obj: Any = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrokenFile(
            f"{path}: not a loadable tensor checkpoint ({first[:120]}); "
            "re-save the adapter as safetensors"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise BrokenFile(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
            "re-save the adapter as safetensors"
        )
    return {k: MemoryTensor(k, v) for k, v in obj.items()}


class PeftFolder:
    """A PEFT adapter folder as written by ``PeftModel.save_pretrained``."""

    name = "peft"
    description = "PEFT folder: adapter_config.json + adapter_model.safetensors (or legacy .bin)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG_NAME).exists()

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        config = read_config(path / CONFIG_NAME)
        st, pt = path / SAFETENSORS_NAME, path / BIN_NAME
        warnings: list[str] = []
        if st.exists():
            header = read_header(st)
            tensors: dict[str, TensorSource] = dict(header.tensors)
            weights = st
        elif pt.exists():
            tensors = load_bin(pt)
            weights = pt
            warnings.append(
                f"{pt.name} is a legacy pickle; re-save as safetensors "
                "(PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        else:
            raise BrokenFile(
                f"{path}: has {CONFIG_NAME} but no {SAFETENSORS_NAME} or {BIN_NAME}; "
                "copy the weights next to the config"
            )
        files = sorted(f for f in path.rglob("*") if f.is_file() and not _hidden(f, path))
        if weights not in files:
            files.append(weights)
        return parse_tensors(tensors, config, path, self.name, files, warnings)


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


@hookimpl
def register_formats(register: Any) -> None:
    register(PeftFolder())
