"""Stable Diffusion LoRA files: kohya naming (``lora_unet_…``/``lora_te…_``,
``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) and diffusers naming (the newer
``unet.….lora.down.weight``, the text encoders' ``….lora_linear_layer.down.weight`` and the
legacy attention-processor ``…processor.to_q_lora.down.weight``) and the PEFT-style keys
diffusers' ``save_lora_weights`` writes (``unet.….lora_A.weight``, each component's LoraConfig
in the header), read into adapterctl's ``LoraModule``s and written in kohya naming.

Scales as the tools apply them: each module's ``alpha`` tensor over its rank (kohya's
``alpha / dim``); a module without an alpha tensor, or with alpha 0, has alpha = rank (scale
1). ``lora_down`` is A, (r, in) or (r, in, kh, kw) for convolutions (3×3 included);
``lora_up`` is B, (out, r) or (out, r, 1, 1): ΔW = scale · up · down, a convolution's reshaped
to (out, in, kh, kw). LyCORIS LoHa/LoKr modules (Hadamard and Kronecker products) are read as
their exact factor pairs (``adapterctl_diffusers.lycoris``); any other part (``dora_scale``,
LyCORIS's full/OFT/IA³ modules) is refused, never dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from adapterctl.adapter import Adapter, LoraModule, TensorSource
from adapterctl.config import AdapterConfig
from adapterctl.errors import BrokenFile, UnsupportedAdapter, UsageError
from adapterctl.tensorfile import read_header
from adapterctl_diffusers.lycoris import LOHA_PARTS, LOKR_PARTS, loha, lokr

_KOHYA = re.compile(r"^(?P<module>lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(?P<part>[A-Za-z0-9_.]+)$")
_LORA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up"}
_DIFFUSERS = re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight$")
_LEGACY = re.compile(
    r"^(?P<pre>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_KNOWN_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")


def _keys(path: Path) -> dict[str, Any]:
    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    return dict(read_header(path).tensors)


def kohya_parts(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kohya-named keys grouped per module: ``down``, ``up``, ``alpha`` and, for LyCORIS
    modules, their ``hada_…``/``lokr_…`` parts (any other part is kept, to be refused)."""
    parts: dict[str, dict[str, Any]] = {}
    for key, info in tensors.items():
        m = _KOHYA.match(key)
        if m is not None:
            part = _LORA_PARTS.get(m["part"], m["part"])
            parts.setdefault(m["module"], {})[part] = info
    return parts


def _kind(parts: dict[str, Any]) -> str:
    """``lora``, ``loha``, ``lokr`` or ``other`` for one module's parts."""
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    return "lora" if ("down" in parts or "up" in parts) else "other"


def is_lycoris(parts: dict[str, dict[str, Any]]) -> bool:
    """True when any module is a LyCORIS LoHa or LoKr module."""
    return any(_kind(p) in ("loha", "lokr") for p in parts.values())


def diffusers_parts(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """diffusers keys (both namings) grouped per module; legacy UNet-only files get ``unet.``."""
    parts: dict[str, dict[str, Any]] = {}
    for key, info in tensors.items():
        if (m := _LEGACY.match(key)) is not None:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            module = f"{m['pre']}.{proj}"
            if not module.startswith(_KNOWN_PREFIXES):
                module = "unet." + module
            parts.setdefault(module, {})[m["part"]] = info
        elif (m := _DIFFUSERS.match(key)) is not None:
            parts.setdefault(m["module"], {})[m["part"]] = info
        elif key.endswith(".alpha"):
            parts.setdefault(key.removesuffix(".alpha"), {})["alpha"] = info
    return {k: v for k, v in parts.items() if "down" in v or "up" in v}


def _alpha(path: Path, name: str, p: dict[str, Any], rank: int) -> float:
    """The module's alpha: its ``alpha`` tensor, or ``rank`` when it has none or it is 0 (as
    kohya's and LyCORIS's trainers and loaders read it)."""
    import numpy as np

    if "alpha" not in p:
        return float(rank)
    value = np.asarray(p["alpha"].array(), dtype=np.float64).reshape(-1)
    if value.size != 1 or not np.isfinite(value[0]):
        raise BrokenFile(f"{path}: {name}.alpha is not one finite number; fix the file")
    return float(value[0]) or float(rank)


_KNOWN = {
    "lora": {"down", "up", "alpha"},
    "loha": {"alpha", *LOHA_PARTS},
    "lokr": {"alpha", *LOKR_PARTS},
}


def _lora_module(path: Path, name: str, p: dict[str, Any]) -> LoraModule:
    """One module of any kind as a ``LoraModule`` (LoHa/LoKr as their exact factor pair)."""
    kind = _kind(p)
    unknown = sorted(set(p) - _KNOWN.get(kind, set()))
    if kind == "other" or unknown:
        what = "dora_scale (DoRA)" if "dora_scale" in unknown else ", ".join(unknown or sorted(p))
        raise UnsupportedAdapter(
            f"{path}: {name} has {what}, which is not a LoRA, LoHa or LoKr update adapterctl "
            "can read exactly; re-save the file without it"
        )
    if kind == "loha":
        a, b, stored = loha(path, name, p)
        scale = _alpha(path, name, p, stored) / stored
    elif kind == "lokr":
        a, b, maybe = lokr(path, name, p)
        # both factors full: no rank to divide by, scale 1 (as LyCORIS)
        scale = 1.0 if maybe is None else _alpha(path, name, p, maybe) / maybe
    else:
        if "down" not in p or "up" not in p:
            have = ", ".join(sorted(p))
            raise BrokenFile(f"{path}: {name} has only {have}; a LoRA module needs down and up")
        a, b = p["down"], p["up"]
        if len(a.shape) not in (2, 4) or len(b.shape) != len(a.shape):
            raise BrokenFile(
                f"{path}: {name}: down {list(a.shape)} and up {list(b.shape)} are not a "
                "linear or convolution LoRA pair; re-save the file"
            )
        r = int(a.shape[0])
        if r < 1 or b.shape[1] != r or (len(b.shape) == 4 and b.shape[2:] != (1, 1)):
            raise BrokenFile(
                f"{path}: {name}: down {list(a.shape)} and up {list(b.shape)} disagree on "
                "the rank; re-save the file"
            )
        alpha = _alpha(path, name, p, r)
        return LoraModule(
            name=name, a=a, b=b, alpha=alpha, scale=alpha / r, config_rank=r,
            layout="conv" if len(a.shape) == 4 else "linear",
        )  # fmt: skip
    rank = int(a.shape[0])  # r1·r2: the pair's alpha is the one that gives the same scale
    return LoraModule(
        name=name, a=a, b=b, alpha=scale * rank, scale=scale, config_rank=rank,
        layout="conv" if len(a.shape) > 2 else "linear",
        stored=tuple(t for k, t in sorted(p.items()) if k != "alpha"),
    )  # fmt: skip


def build_adapter(path: Path, fmt: str, parts: dict[str, dict[str, Any]]) -> Adapter:
    """``LoraModule``s from grouped parts (scale = alpha / rank; LoHa/LoKr modules as their
    exact factor pairs, ``adapterctl_diffusers.lycoris``), and a config that says the same in
    PEFT's terms (the most common rank and alpha, patterns for the others)."""
    modules = {name: _lora_module(path, name, p) for name, p in sorted(parts.items())}
    if not modules:
        raise BrokenFile(f"{path}: no LoRA modules in it; is it a LoRA file?")
    return Adapter(
        path=path, format=fmt, config=modules_config(modules), modules=modules, files=[path]
    )


def modules_config(modules: dict[str, LoraModule]) -> AdapterConfig:
    """A PEFT config that says what the modules are: the most common rank and alpha, a
    ``rank_pattern``/``alpha_pattern`` entry (full name, escaped, anchored) for the others;
    alpha is the module's own where alpha / rank gives its scale, else scale · rank."""

    def alpha(m: LoraModule) -> float:
        return m.alpha if m.alpha / m.rank == m.scale else m.scale * m.rank

    ranks = Counter(m.rank for m in modules.values())
    r = min(ranks, key=lambda k: (-ranks[k], k))
    alphas = Counter(alpha(m) for m in modules.values() if m.rank == r)
    a = min(alphas, key=lambda k: (-alphas[k], k)) if alphas else float(r)
    return AdapterConfig.model_validate(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": a,
            "target_modules": sorted(modules),
            "rank_pattern": {
                "^" + re.escape(n): m.rank for n, m in sorted(modules.items()) if m.rank != r
            },
            "alpha_pattern": {
                "^" + re.escape(n): alpha(m)
                for n, m in sorted(modules.items())
                if alpha(m) != a or m.rank != r
            },
        }
    )


class KohyaFile:
    """A Stable Diffusion LoRA in kohya's naming (sd-scripts, most shared SD LoRAs)."""

    name = "kohya"
    description = "Stable Diffusion LoRA .safetensors in kohya naming (lora_unet_…, lora_te_…)"

    def detect(self, path: Path) -> bool:
        parts = kohya_parts(_keys(path))
        return bool(parts) and not is_lycoris(parts)

    def read(self, path: Path, options: Any) -> Adapter:
        return build_adapter(path, self.name, kohya_parts(_keys(path)))


class LycorisFile:
    """A LyCORIS file in kohya naming with LoHa (``hada_…``) or LoKr (``lokr_…``) modules,
    read as their exact factor pairs (plain LoRA/LoCon modules in it as kohya's)."""

    name = "lycoris"
    description = "LyCORIS LoHa/LoKr .safetensors (lora_unet_….hada_w1_a, ….lokr_w1)"

    def detect(self, path: Path) -> bool:
        return is_lycoris(kohya_parts(_keys(path)))

    def read(self, path: Path, options: Any) -> Adapter:
        return build_adapter(path, self.name, kohya_parts(_keys(path)))


class DiffusersFile:
    """A Stable Diffusion LoRA in diffusers' naming (``….lora.down.weight``, or the legacy
    attention processors' ``…processor.to_q_lora.down.weight``)."""

    name = "diffusers"
    description = "Stable Diffusion LoRA .safetensors in diffusers naming (….lora.down.weight)"

    def detect(self, path: Path) -> bool:
        return bool(diffusers_parts(_keys(path)))

    def read(self, path: Path, options: Any) -> Adapter:
        return build_adapter(path, self.name, diffusers_parts(_keys(path)))


_PEFT_STYLE = re.compile(
    r"^(?P<component>unet|text_encoder|text_encoder_2|transformer)\."
    r".+\.(?:lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$"
)


def _components(keys: Any) -> list[str]:
    """The SD components (``unet``, ``text_encoder``…) of a PEFT-style diffusers file's keys,
    or [] when its keys are not all of that naming."""
    found: set[str] = set()
    for key in keys:
        m = _PEFT_STYLE.match(key)
        if m is None:
            return []
        found.add(m["component"])
    return sorted(found)


def _component_config(path: Path, component: str, metadata: dict[str, str]) -> AdapterConfig | None:
    """The LoRA config diffusers saved for ``component`` (``lora_adapter_metadata``: PEFT's
    LoraConfig with keys prefixed ``unet.`` …), or None in files saved without one."""
    import json

    from pydantic import ValidationError

    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise BrokenFile(f"{path}: its lora_adapter_metadata is not JSON; re-save it") from None
    if not isinstance(data, dict):
        raise BrokenFile(f"{path}: its lora_adapter_metadata is not an object; re-save it")
    prefix = component + "."
    fields = {k.removeprefix(prefix): v for k, v in data.items() if k.startswith(prefix)}
    if not fields:
        return None
    keep = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
            "target_modules", "bias")  # fmt: skip
    try:
        return AdapterConfig.model_validate(
            {"peft_type": "LORA", **{k: fields[k] for k in keep if k in fields}}
        )
    except ValidationError as exc:
        raise BrokenFile(
            f"{path}: the {component} config in its metadata is not valid "
            f"({exc.errors()[0]['msg']}); re-save it"
        ) from None


# Parses a component saved without a config; each module then gets alpha = its rank.
_UNIT = AdapterConfig.model_validate({"peft_type": "LORA", "r": 1, "lora_alpha": 1})


class DiffusersPeftFile:
    """A Stable Diffusion LoRA as diffusers' ``save_lora_weights`` writes it with its PEFT
    backend: ``unet.….lora_A.weight`` / ``text_encoder.….lora_B.weight``, the LoRA config
    of each component in the ``lora_adapter_metadata`` header entry."""

    name = "diffusers-peft"
    description = "Stable Diffusion LoRA .safetensors, PEFT-style diffusers keys (unet.….lora_A)"

    def detect(self, path: Path) -> bool:
        return bool(_components(_keys(path)))

    def read(self, path: Path, options: Any) -> Adapter:
        """Each component's modules scaled as its saved config says (rank and alpha patterns,
        rsLoRA), as PEFT does; without a saved config alpha = rank (scale 1)."""
        from adapterctl.formats.peft import parse_tensors

        header = read_header(path)
        tensors: dict[str, TensorSource] = dict(header.tensors)
        modules: dict[str, LoraModule] = {}
        parsed: list[Adapter] = []
        for component in _components(tensors):
            config = _component_config(path, component, header.metadata)
            mine = {k: t for k, t in tensors.items() if k.startswith(component + ".")}
            adapter = parse_tensors(mine, config or _UNIT, path, self.name, [path])
            for name, m in adapter.modules.items():
                if config is None:  # saved without a config: alpha = the module's rank
                    m.alpha, m.scale, m.config_rank = float(m.rank), 1.0, m.rank
                modules[name] = m
            parsed.append(adapter)
        if not modules:
            raise BrokenFile(f"{path}: no LoRA modules in it; is it a LoRA file?")
        return Adapter(
            path=path, format=self.name, config=modules_config(modules), modules=modules,
            files=[path], warnings=[w for a in parsed for w in a.warnings],
            unknown_tensors=[k for a in parsed for k in a.unknown_tensors],
            incomplete=[k for a in parsed for k in a.incomplete],
        )  # fmt: skip


def kohya_name(module: str) -> str:
    """The kohya name of a module: kohya names as they are; diffusers' dotted names of the
    UNet and the text encoders with their prefix and dots as underscores.

    Raises:
        UsageError: a module of neither (kohya naming is for Stable Diffusion models).
    """
    if _KOHYA.match(module + ".alpha"):
        return module
    for prefix, kohya in (("unet.", "lora_unet_"), ("text_encoder.", "lora_te_"),
                          ("text_encoder_2.", "lora_te2_")):  # fmt: skip
        if module.startswith(prefix):
            return kohya + module.removeprefix(prefix).replace(".", "_")
    raise UsageError(
        f"{module}: kohya naming is for Stable Diffusion modules (unet.…, text_encoder.…); "
        "write this adapter in another format"
    )


class KohyaWriter:
    """Writes kohya naming: ``lora_down`` = A, ``lora_up`` = B, ``alpha`` = scale · rank
    (float32; where that alpha would not give the scale exactly, the scale is folded into
    ``lora_up`` and alpha = rank)."""

    name = "kohya"
    description = "Stable Diffusion LoRA .safetensors in kohya naming"

    def write(self, adapter: Adapter, out: Path, *, force: bool) -> Path:
        """Write ``adapter`` at ``out`` (one .safetensors, atomically)."""
        import numpy as np
        from safetensors.numpy import save_file

        from adapterctl.errors import UnsupportedAdapter
        from adapterctl.files import refuse_existing, staged_file

        refuse_existing(out, force=force)
        tensors: dict[str, np.ndarray[Any, Any]] = {}
        for name, m in sorted(adapter.modules.items()):
            if m.is_dora or m.bias is not None or m.layout not in ("linear", "conv"):
                what = "DoRA" if m.is_dora else "a lora bias" if m.bias is not None else m.layout
                raise UnsupportedAdapter(
                    f"{adapter.path}: {name} is {what}, which kohya files do not carry"
                )
            key = kohya_name(name)
            up = m.b.array().astype(np.float32)
            alpha = np.float32(m.scale * m.rank)
            if float(alpha) / m.rank != m.scale:  # not exact in float32: fold the scale
                up = (m.b.array().astype(np.float64) * m.scale).astype(np.float32)
                alpha = np.float32(m.rank)
            tensors[f"{key}.lora_down.weight"] = np.ascontiguousarray(m.a.array(), np.float32)
            tensors[f"{key}.lora_up.weight"] = np.ascontiguousarray(up).reshape(m.b_shape)
            tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
        with staged_file(out) as tmp:
            save_file(tensors, str(tmp), metadata={"ss_network_module": "networks.lora"})
        return out
