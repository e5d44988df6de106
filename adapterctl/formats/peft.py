"""The PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``
(or a legacy pickled ``adapter_model.bin``, read with ``weights_only=True``)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapterctl.adapter import Adapter, ExtraTensor, Layout, LoraModule, MemoryTensor, TensorSource
from adapterctl.config import NON_LORA_TYPES, AdapterConfig
from adapterctl.errors import BrokenFile, UnsupportedAdapter
from adapterctl.formats import ReadOptions
from adapterctl.hookspecs import hookimpl
from adapterctl.patterns import SuffixIndex
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
# ``….modules_to_save[.<adapter>].weight`` (the trained copy; bias="all" also saves it with
# the adapter name stripped) and ``….original_module.weight`` (the frozen original).
_SAVED_COPY = re.compile(r"\.modules_to_save\.(?:[^.]+\.(?=[^.]+$))?")
_ORIGINAL = ".original_module."


def read_config(path: Path) -> AdapterConfig:
    """Parse an ``adapter_config.json``; refuse non-LoRA PEFT types by name."""
    check_not_pointer(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
    saved = SuffixIndex(config.modules_to_save or [])
    for key, src in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            part = m["part"] + (".bias" if m["param"] == "bias" else "")
            parts.setdefault(m["module"], {})[part] = src
            continue
        target = key.removeprefix("base_model.model.")
        if ".lora_" in target or not target.endswith((".weight", ".bias")):
            unknown.append(key)
            continue
        base = _SAVED_COPY.sub(".", target).replace(".base_layer.", ".").replace(_ORIGINAL, ".")
        if _SAVED_COPY.search(target) and (
            base in tensors or "base_model.model." + base in tensors
        ):
            continue  # a second name for a trained copy saved under its plain name too
        if _ORIGINAL in target:
            extras.append(ExtraTensor(base, "base_layer", src))  # frozen, not trained
        elif _in_modules_to_save(base, saved):
            extras.append(ExtraTensor(base, "modules_to_save", src))
        elif base.endswith(".bias") and config.bias != "none":
            # bias="all"/"lora_only" trains biases in place, those of wrapped layers too
            # (saved as ``….base_layer.bias``): trained, not frozen copies.
            extras.append(ExtraTensor(base, "bias", src))
        elif ".base_layer." in target:
            extras.append(ExtraTensor(base, "base_layer", src))
        else:
            extras.append(ExtraTensor(base, "modules_to_save", src))

    try:
        modules, incomplete = _lora_modules(parts, config, path)
        notes = list(warnings or []) + config.pattern_overlaps(list(modules))
    except UnsupportedAdapter as exc:  # a rank/alpha pattern key we will not match
        raise UnsupportedAdapter(f"{path}: {exc}") from None
    return Adapter(
        path=path, format=fmt, config=config, modules=modules, extras=extras, files=files,
        warnings=notes, unknown_tensors=unknown, incomplete=incomplete,
    )  # fmt: skip


def _lora_modules(
    parts: dict[str, dict[str, TensorSource]], config: AdapterConfig, path: Path
) -> tuple[dict[str, LoraModule], list[str]]:
    """One ``LoraModule`` per module with both factors (scaled as the config says), and the
    names of the modules missing one."""
    modules: dict[str, LoraModule] = {}
    incomplete: list[str] = []
    for name, p in sorted(parts.items()):
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a = p.get("lora_embedding_A" if embedding else "lora_A")
        b = p.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            incomplete.append(name)
            continue
        _check_factor_shapes(path, name, a, b)
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
    return modules, incomplete


def _check_factor_shapes(path: Path, module: str, a: TensorSource, b: TensorSource) -> None:
    """A is (r, in, …) and B is (out, r, …) with the same r ≥ 1; anything else is broken."""
    ok = len(a.shape) >= 2 and len(b.shape) >= 2 and all(d > 0 for d in (*a.shape, *b.shape))
    if not ok or a.shape[0] != b.shape[1]:
        # 1-D or empty factors are what DeepSpeed ZeRO-3 / FSDP save when shards were not
        # gathered first: say so, it is the usual cause.
        hint = "" if ok else " (ungathered ZeRO-3/FSDP shards?)"
        raise BrokenFile(
            f"{path}: module {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
            f"not (r, in) and (out, r) with one rank r >= 1{hint}; re-save the adapter"
            + (" with gathered parameters" if hint else "")
        )


def _in_modules_to_save(param: str, names: SuffixIndex) -> bool:
    """True if ``param`` (``classifier.weight``) belongs to a ``modules_to_save`` module,
    matched as PEFT matches them: the whole module name or its dotted suffix."""
    return param.rsplit(".", 1)[0] in names


def load_bin(path: Path) -> dict[str, TensorSource]:
    """Read a pickled state dict safely (``weights_only=True``); refuse anything but tensors."""
    import pickle

    from adapterctl.extras import require

    require("torch", "reading a pickled .bin adapter")
    import torch

    check_not_pointer(path)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols on stderr; the error below says all there is.
            warnings.simplefilter("ignore")
            obj: Any = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise BrokenFile(
            f"{path}: refused by torch.load(weights_only=True) ({_unpickler_reason(exc)}): it "
            "holds more than tensors or is not a torch file; re-save the adapter as safetensors"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, RecursionError) as exc:
        raise BrokenFile(
            f"{path}: truncated or not a torch checkpoint ({_first_sentence(exc)}); "
            "re-download it or re-save the adapter as safetensors"
        ) from None
    if not isinstance(obj, dict):
        raise BrokenFile(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
            "re-save the adapter as safetensors"
        )
    for k, v in obj.items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            raise BrokenFile(
                f"{path}: entry {k!r} holds a {type(v).__name__}, not a tensor; "
                "re-save the adapter as safetensors"
            )
    return {k: MemoryTensor(k, v) for k, v in obj.items()}


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text.split(". ")[0].rstrip(".")[:160]) or type(exc).__name__


def _unpickler_reason(exc: BaseException) -> str:
    """The one informative line of torch's long weights-only refusal."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        if rest:
            return rest[0].split(". ")[0].rstrip(".")[:160]
    return _first_sentence(exc)


class PeftFolder:
    """A PEFT adapter folder as written by ``PeftModel.save_pretrained``."""

    name = "peft"
    description = "PEFT folder: adapter_config.json + adapter_model.safetensors (or legacy .bin)"

    def detect(self, path: Path) -> bool:
        from adapterctl.formats.mlx import is_mlx_folder

        return path.is_dir() and (path / CONFIG_NAME).exists() and not is_mlx_folder(path)

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


class PeftWriter:
    """Writes a standard PEFT folder (``write_peft``): the built-in ``convert --to peft``."""

    name = "peft"
    description = "PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"

    def write(self, adapter: Adapter, out: Path, *, force: bool) -> Path:
        """``write_peft(adapter, out, force=force)``: every module's scale folded into B."""
        return write_peft(adapter, out, force=force)


@hookimpl
def register_writers(register: Any) -> None:
    register(PeftWriter())


def unit_scale_config(adapter: Adapter) -> AdapterConfig:
    """A config under which every module of ``adapter`` loads with scale exactly 1.

    r is the most common rank and lora_alpha = r; modules of another rank get a
    ``rank_pattern`` and an ``alpha_pattern`` entry (alpha = rank) whose key is the module's
    full name, escaped and anchored with ``^``, so PEFT's ``(.*\\.)?(key)$`` matches that
    module and no other. rsLoRA and DoRA are off; ``target_modules`` lists the full module
    names. Only keys that describe the same update are carried from ``adapter.config`` (base
    name, revision, task type, auto mapping, bias mode and ``modules_to_save`` when full
    tensors are carried); anything that would change which modules PEFT wraps or how it
    scales them (layers_to_transform, exclude_modules, init schemes…) is dropped.
    """
    from collections import Counter

    ranks = {name: m.rank for name, m in adapter.modules.items()}
    counts = Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k)) if counts else 8
    rank_pattern = {"^" + re.escape(n): k for n, k in sorted(ranks.items()) if k != r}
    template = adapter.config
    extra = template.model_extra or {}
    kinds = {e.kind for e in adapter.extras}
    fields: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(adapter.modules),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": any(m.bias is not None for m in adapter.modules.values()),
        "fan_in_fan_out": any(m.layout == "conv1d" for m in adapter.modules.values()),
        "bias": template.bias if "bias" in kinds else "none",
        "modules_to_save": template.modules_to_save if "modules_to_save" in kinds else None,
        "base_model_name_or_path": template.base_model_name_or_path,
        "revision": template.revision,
        "task_type": template.task_type,
        "init_lora_weights": True,
        "inference_mode": True,
        "lora_dropout": 0.0,
        "auto_mapping": extra.get("auto_mapping"),
    }
    return AdapterConfig.model_validate(fields)


def write_peft(
    adapter: Adapter,
    out: str | Path,
    *,
    force: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` as a standard PEFT folder that ``PeftModel.from_pretrained`` loads.

    Each module's scale is folded into lora_B (and its lora bias), and the config is
    ``unit_scale_config(adapter)``: the ΔW PEFT applies is exactly scale·B·A of each module,
    whatever rank/alpha/rsLoRA scheme the adapter came with. Tensors are written as float32
    (PEFT upcasts adapters to float32 on loading anyway). Full tensors (``modules_to_save``
    copies, trained biases, saved base layers) are written under their original keys.

    The folder is written to a hidden temporary sibling and renamed into place when complete.

    Args:
        adapter: the adapter (read from disk or composed in memory); no DoRA modules.
        out: the folder to create.
        force: replace ``out`` if it exists.
        metadata: extra string metadata for the safetensors header (provenance).

    Returns:
        ``out`` as a Path.

    Raises:
        Conflict: ``out`` exists and ``force`` is False.
        UnsupportedAdapter: a DoRA module (its magnitude would need the base weights).
    """
    import torch

    from adapterctl.files import refuse_existing, staged_dir
    from adapterctl.tensorfile import write_tensors

    out = Path(out)
    refuse_existing(out, force=force)
    dora = [n for n, m in adapter.modules.items() if m.is_dora]
    if dora:
        raise UnsupportedAdapter(
            f"{adapter.path}: {dora[0]} is a DoRA module; writing DoRA adapters is not supported"
        )
    config = unit_scale_config(adapter)
    embeddings = [n for n, m in adapter.modules.items() if m.layout == "embedding"]
    if config.lora_bias and embeddings:
        raise UnsupportedAdapter(
            f"{adapter.path}: lora biases together with an embedding module ({embeddings[0]}): "
            "PEFT cannot load lora_bias on embeddings; leave one of them out"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, m in sorted(adapter.modules.items()):
        if abs(config.scale_for(name) - 1.0) > 1e-12:  # pragma: no cover - a bug, not input
            raise RuntimeError(f"config would not load {name} with scale 1")
        a = m.a.load().to(torch.float32)  # (r, in) or (r, in, *kernel)
        # scale folded in float64, rounded once: (out, r) or (out, r, 1…)
        b = (m.b.load().to(torch.float64) * m.scale).to(torch.float32).reshape(m.b_shape)
        key = f"base_model.model.{name}"
        if m.layout == "embedding":
            tensors[f"{key}.lora_embedding_A"] = a.contiguous()
            tensors[f"{key}.lora_embedding_B"] = b.contiguous()
            continue
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.contiguous()
        if config.lora_bias:
            bias = (
                m.bias.load().to(torch.float32) * m.scale
                if m.bias is not None
                else torch.zeros(m.out_features)
            )
            tensors[f"{key}.lora_B.bias"] = bias.contiguous()  # (out,)
    for e in adapter.extras:
        key = e.tensor.name
        if not key.startswith("base_model.model."):
            key = f"base_model.model.{e.target}"
        tensors[key] = e.tensor.load().contiguous()
    with staged_dir(out) as tmp:
        text = json.dumps(config.to_json_dict(), indent=2, sort_keys=True) + "\n"
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        meta = {"format": "pt", **(metadata or {})}
        write_tensors(tmp / SAFETENSORS_NAME, tensors, meta)
    return out
