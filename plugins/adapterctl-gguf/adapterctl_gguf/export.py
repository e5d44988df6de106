"""A LoRA adapter as a llama.cpp GGUF adapter (``general.type = adapter``,
``adapter.type = lora``), every module's ΔW exact.

llama.cpp applies one ``adapter.lora.alpha`` to every tensor pair, as alpha / r with r the
pair's own rank (``llama-adapter.cpp``), or a scale of 1 where alpha is 0. The upstream
converter (``convert_lora_to_gguf.py``) writes the adapter's ``lora_alpha`` and the factors as
they are, which is right only for a plain LoRA of one alpha: an rsLoRA adapter (alpha/√r),
an ``alpha_pattern`` or per-module ranks come out with the wrong scale. Here each module's
true scale s is folded into its B (B' = B·s·r/alpha, computed in float64 and rounded once into
the written type), so the one global alpha reproduces every module's ΔW = s·B·A; a plain
LoRA is written exactly as upstream writes it (its factor is 1). What GGUF adapters cannot
express is refused with the reason: DoRA (its magnitude needs the base weights), lora biases
and full tensors (``modules_to_save``, trained biases), and embedding updates (not written
yet).

Tensors follow llama.cpp's layout: ``<gguf name>.lora_a`` holds A (r, in) and ``.lora_b``
holds B (out, r), NumPy's row-major shapes (ggml's ``ne`` reversed); names come from gguf's
name map for the base's architecture; Llama-family q/k rows are permuted as llama.cpp's
converter permutes the base's (its rotary layout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from adapterctl.errors import UnsupportedAdapter, UnsupportedBase, UsageError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Hugging Face ``model_type`` -> (gguf architecture, whether q/k rows are permuted)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "gemma": ("GEMMA", False),
    "gemma2": ("GEMMA2", False),
    "phi3": ("PHI3", False),
}


class GgufReport(BaseModel):
    """What ``export_gguf`` wrote."""

    source: str
    out: str
    architecture: str
    alpha: float
    outtype: str
    modules: int
    tensors: int
    folded: list[str]  # modules whose scale was folded into B (rsLoRA, patterns, mixed ranks)
    as_f16: list[str]  # q8_0: tensors whose rows are not whole 32-value blocks, written as f16
    warnings: list[str] = []


def base_config(adapter: Any, base: str | None) -> dict[str, Any]:
    """The base model's ``config.json``: from ``base`` (a checkpoint folder or a remote BASE,
    headers only), else from the adapter's ``base_model_name_or_path`` where that is a local
    folder.

    Raises:
        UsageError: no base named and none found from the adapter (exit 2).
    """
    from adapterctl.checkpoint import open_base

    if base is not None:
        return dict(open_base(base).config)
    named = adapter.config.base_model_name_or_path
    if named and (Path(named) / "config.json").is_file():
        return dict(open_base(named).config)
    raise UsageError(
        f"{adapter.path}: the GGUF needs the base model's config (architecture, layers, heads), "
        f"and the adapter names {named or 'no base'}; pass --base BASE (a folder with "
        "config.json, or hf://owner/name)"
    )


def _permute(rows: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """llama.cpp's rotary reordering of a q/k weight's rows (out, …), applied to B (out, r)."""
    out = rows.shape[0]
    return (
        rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def _encode(a: np.ndarray[Any, Any], outtype: str) -> tuple[np.ndarray[Any, Any], Any, bool]:
    """``a`` (float64) in the written type: (data, gguf type, whether q8_0 fell back to f16)."""
    import gguf

    q = gguf.GGMLQuantizationType
    a32 = a.astype(np.float32)
    if outtype == "f32":
        return a32, q.F32, False
    if outtype == "f16":
        return a.astype(np.float16), q.F16, False
    if outtype == "bf16":
        return gguf.quants.quantize(a32, q.BF16), q.BF16, False
    if a.shape[-1] % 32 == 0:  # Q8_0 blocks are 32 values of a row
        return gguf.quants.quantize(a32, q.Q8_0), q.Q8_0, False
    return a.astype(np.float16), q.F16, True


def export_gguf(
    source: Any,
    out: str | os.PathLike[str],
    *,
    base: str | None = None,
    outtype: str = "f32",
    force: bool = False,
    alpha: float | None = None,
    rank: int | None = None,
) -> GgufReport:
    """Write the adapter ``source`` as a llama.cpp GGUF LoRA adapter at ``out``.

    Args:
        source: a SOURCE (path, registry ref, ``hf://``) or an ``Adapter`` already read.
        out: the ``.gguf`` file to write (atomically: a hidden sibling renamed into place).
        base: the base model (for its config); default: the adapter's
            ``base_model_name_or_path`` where that is a local folder.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        force: replace an existing ``out``.
        alpha, rank: for a bare ``.safetensors`` SOURCE.

    Raises:
        UsageError: an unknown outtype, or no base config to be found (exit 2).
        UnsupportedBase: an architecture the exporter does not know (exit 3).
        UnsupportedAdapter: something GGUF adapters cannot carry (exit 3), with the reason.
        Conflict: ``out`` exists (without ``force``) or overlaps the input (exit 5).

    Example:
        >>> export_gguf("adapters/chat-lora", "chat.gguf", base="base/tiny-llama").tensors
        28
    """
    import gguf

    from adapterctl.files import refuse_existing, refuse_overlap, staged_file
    from adapterctl.refs import read_source

    if outtype not in OUTTYPES:
        raise UsageError(f"--outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
    adapter = read_source(source, alpha=alpha, rank=rank)
    out = Path(out)
    refuse_existing(out, force=force)
    refuse_overlap(out, [adapter.path])
    _refuse_inexpressible(adapter)
    hparams = base_config(adapter, base)
    model_type = str(hparams.get("model_type", ""))
    if model_type not in ARCHITECTURES:
        raise UnsupportedBase(
            f"{adapter.path}: base architecture {model_type or 'unknown'!r} is not one export-gguf "
            f"writes ({', '.join(sorted(ARCHITECTURES))})"
        )
    arch_name, permutes = ARCHITECTURES[model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    try:
        layers = int(hparams["num_hidden_layers"])
        heads = int(hparams.get("num_attention_heads", 1))
        kv_heads = int(hparams.get("num_key_value_heads") or heads)
        if min(layers, heads, kv_heads) < 1:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UnsupportedBase(
            f"the base's config.json needs positive integers num_hidden_layers and "
            f"num_attention_heads (got {hparams.get('num_hidden_layers')!r}, "
            f"{hparams.get('num_attention_heads')!r}); fix the base config"
        ) from None
    names = gguf.get_tensor_name_map(arch, layers)

    ranks = [m.rank for m in adapter.modules.values()]
    cfg_alpha = float(adapter.config.lora_alpha or 0.0)
    g_alpha = cfg_alpha if cfg_alpha > 0 else float(max(set(ranks), key=ranks.count))
    tensors: list[tuple[str, np.ndarray[Any, Any], Any]] = []
    folded: list[str] = []
    as_f16: list[str] = []
    for name, m in sorted(adapter.modules.items()):
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None:
            raise UnsupportedAdapter(
                f"{adapter.path}: {name} has no GGUF tensor in a {model_type} model; leave it "
                "out of the adapter"
            )
        a = m.a.array().astype(np.float64)  # (r, in)
        b = m.b.array().astype(np.float64)  # (out, r)
        factor = m.scale * m.rank / g_alpha  # llama.cpp applies g_alpha / r
        if factor != 1.0:
            b = b * factor
            folded.append(name)
        rotary = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}
        group = next((h for k, h in rotary.items() if name.endswith(k)), None)
        if permutes and group is not None:
            if b.shape[0] % (2 * group):
                raise UnsupportedAdapter(
                    f"{adapter.path}: {name} has {b.shape[0]} rows, which {group} heads do not "
                    "split into rotary halves: is --base the model it was trained on?"
                )
            b = _permute(b, group)
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            data, qtype, fell_back = _encode(arr, outtype)
            tensors.append((target + suffix, data, qtype))
            if fell_back:
                as_f16.append(target + suffix)

    with staged_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, g_alpha)
        writer.add_name(adapter.path.name)
        for tname, data, qtype in tensors:
            writer.add_tensor(tname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufReport(
        source=str(adapter.path),
        out=str(out),
        architecture=gguf.MODEL_ARCH_NAMES[arch],
        alpha=g_alpha,
        outtype=outtype,
        modules=len(adapter.modules),
        tensors=len(tensors),
        folded=folded,
        as_f16=as_f16,
        warnings=list(adapter.warnings),
    )


def _refuse_inexpressible(adapter: Any) -> None:
    """Refuse what a GGUF LoRA adapter cannot carry, naming the first module and why."""
    for name, m in sorted(adapter.modules.items()):
        if m.is_dora:
            raise UnsupportedAdapter(
                f"{adapter.path}: {name} is a DoRA module: GGUF adapters carry no magnitude "
                "(it needs the base weights); merge it instead (adapterctl merge)"
            )
        if m.bias is not None:
            raise UnsupportedAdapter(
                f"{adapter.path}: {name} has a lora bias, which GGUF adapters cannot carry; "
                "merge it instead (adapterctl merge)"
            )
        if m.layout != "linear":
            raise UnsupportedAdapter(
                f"{adapter.path}: {name} is a {m.layout} update; export-gguf writes linear "
                "modules only (merge it instead: adapterctl merge)"
            )
    for extra in adapter.extras:
        if extra.kind != "base_layer":  # frozen copies of the base: nothing to carry
            raise UnsupportedAdapter(
                f"{adapter.path}: {extra.target} is a full tensor ({extra.kind}), which GGUF "
                "adapters cannot carry; merge it instead (adapterctl merge)"
            )
