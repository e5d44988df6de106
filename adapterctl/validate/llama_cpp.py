"""AC31x: what llama.cpp's ``convert_lora_to_gguf.py`` refuses or gets wrong
(``--target llama.cpp``).

Scales the upstream converter gets wrong (rsLoRA, alpha_pattern, which also covers per-module
ranks written with alpha = rank) are info findings: ``adapterctl export-gguf`` (the
first-party plugin ``adapterctl-gguf``) folds each module's scale into its lora_B and writes
them exactly. What a GGUF adapter cannot carry at all (DoRA, full tensors, lora biases) stays
an error.

Each rule cites the llama.cpp source file (and the upstream commit it was read at) of the check
it encodes; llama.cpp changes, so re-check them on upgrade.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from adapterctl.validate.context import (
    EMBEDDING_NAMES,
    HEAD_NAMES,
    Context,
    leaf_name,
    list_names,
    saved_copies,
)
from adapterctl.validate.core import rule

# Citations: the file and function each rule encodes, and the commit it was read at.
_GGUF_CONVERTER = (
    "convert_lora_to_gguf.py LoraModel.get_tensors (read at ggml-org/llama.cpp@0b03adaa)"
)
_GGUF_SCALE = (
    "convert_lora_to_gguf.py set_gguf_parameters writes one adapter.lora.alpha; "
    "src/llama-adapter.h llama_adapter_lora_weight::get_scale = alpha / rank "
    "(read at ggml-org/llama.cpp@0b03adaa)"
)


_EXPORT = "adapterctl export-gguf (plugin adapterctl-gguf) writes it exactly"


@rule(
    "AC311",
    "gguf-rslora",
    "info",
    "llama.cpp",
    "no rsLoRA for the upstream converter: llama.cpp scales by alpha/r, not alpha/sqrt(r)",
    source=_GGUF_SCALE,
)
def _gguf_rslora(ctx: Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    if cfg.use_rslora:
        r = cfg.r
        msg = (
            f"rsLoRA (use_rslora): convert_lora_to_gguf.py stores only lora_alpha and llama.cpp "
            f"applies alpha/r, so its update would be {math.sqrt(r):.3g}× too small at r={r}; "
            f"{_EXPORT}"
        )
        yield None, msg


@rule(
    "AC312",
    "gguf-alpha-pattern",
    "info",
    "llama.cpp",
    "every module's alpha equals lora_alpha for the upstream converter (alpha_pattern is "
    "lost; rank_pattern is kept because llama.cpp reads each tensor's rank)",
    source=_GGUF_SCALE,
)
def _gguf_alpha_pattern(ctx: Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    lost = sorted(
        n for n, m in ctx.adapter.modules.items() if not math.isclose(m.alpha, cfg.lora_alpha)
    )
    if lost:
        msg = (
            f"alpha_pattern gives {len(lost)} module(s) ({list_names(lost)}) an alpha other than "
            f"lora_alpha={cfg.lora_alpha:g}; convert_lora_to_gguf.py keeps one alpha and would "
            f"scale them wrongly; {_EXPORT}"
        )
        yield None, msg


@rule(
    "AC313",
    "gguf-dora",
    "error",
    "llama.cpp",
    "no DoRA: convert_lora_to_gguf.py stops at lora_magnitude_vector",
    source=_GGUF_CONVERTER,
)
def _gguf_dora(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # get_tensors: a tensor that is neither lora_A nor lora_B (nor a norm) -> "Unexpected name".
    if ctx.adapter.config.use_dora or any(m.is_dora for m in ctx.adapter.modules.values()):
        yield None, "DoRA adapter: llama.cpp has no DoRA and the converter refuses it; merge first"


@rule(
    "AC314",
    "gguf-full-tensors",
    "error",
    "llama.cpp",
    "no full tensors or lora biases (the converter accepts only LoRA factors and norms)",
    source=_GGUF_CONVERTER,
)
def _gguf_full_tensors(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # get_tensors skips *.base_layer.weight and keeps *_layernorm/*.norm; anything else that is
    # not lora_A/lora_B exits with "Unexpected name '...': Not a lora_A or lora_B tensor".
    saved = [t for t in saved_copies(ctx.adapter) if "norm" not in t]
    if saved:
        msg = (
            f"{len(saved)} full tensor(s) saved with the adapter ({list_names(saved)}): "
            "convert_lora_to_gguf.py refuses them; merge the adapter into the base instead"
        )
        yield None, msg
    with_bias = sorted(n for n, m in ctx.adapter.modules.items() if m.bias is not None)
    if with_bias:
        yield None, f"{len(with_bias)} module(s) carry a lora_B bias, which the converter refuses"


@rule(
    "AC315",
    "gguf-added-tokens",
    "warning",
    "llama.cpp",
    "the adapter does not resize the vocabulary (saved embeddings/head match the base)",
    needs_base=True,
    source=_GGUF_CONVERTER,
)
def _gguf_added_tokens(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # The converter points adapters with embeddings at llama.cpp PR 9948: added tokens need a
    # base GGUF converted with the new tokenizer.
    rows = ctx.base_vocab_rows
    if rows is None:
        return
    for e in ctx.adapter.extras:
        leaf = leaf_name(e.target.removesuffix(".weight"))
        if leaf in EMBEDDING_NAMES + HEAD_NAMES and e.target.endswith(".weight"):
            n = int(e.tensor.shape[0])
            if n != rows:
                msg = (
                    f"saved with {n} rows but the base vocabulary has {rows}: the adapter adds "
                    "tokens, which a LoRA GGUF cannot carry; merge and convert the whole model"
                )
                yield e.target, msg
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "embedding" and mod.in_features != rows:
            msg = (
                f"an embedding LoRA over {mod.in_features} tokens but the base has {rows}: the "
                "adapter adds tokens, which a LoRA GGUF cannot carry"
            )
            yield name, msg
