"""AC30x: what vLLM refuses to serve (``--target vllm``).

Each rule cites the vLLM source file (and the upstream commit it was read at) of the check it
encodes; vLLM changes, so re-check them on upgrade.
"""

from __future__ import annotations

from collections.abc import Iterator

from adapterctl.validate.context import Context, list_names, saved_copies
from adapterctl.validate.core import VLLM_MAX_LORA_RANKS, rule

# Citations: the file and function each rule encodes, and the commit it was read at.
_VLLM_PEFT_HELPER = (
    "vllm/lora/peft_helper.py PEFTHelper._validate_features / validate_legal "
    "(read at vllm-project/vllm@e745baf)"
)
_VLLM_LORA_CONFIG = (
    "vllm/config/lora.py MaxLoRARanks / LoRAConfig.max_lora_rank "
    "(read at vllm-project/vllm@01230b40, the v0.11 series)"
)
_VLLM_UTILS = (
    "vllm/lora/utils.py parse_fine_tuned_lora_name / get_supported_lora_modules "
    "(read at vllm-project/vllm@0fd15707)"
)


@rule(
    "AC301",
    "vllm-rank",
    "error",
    "vllm",
    "the adapter's rank is at most --max-rank (vLLM's --max-lora-rank)",
    source=f"{_VLLM_PEFT_HELPER}; {_VLLM_LORA_CONFIG}",
)
def _vllm_rank(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # vLLM compares the config's r with max_lora_rank (PEFTHelper.validate_legal) and sizes its
    # LoRA buffers by max_lora_rank, so a larger per-module rank (rank_pattern) fails too.
    ranks = [ctx.adapter.config.r] + [m.rank for m in ctx.adapter.modules.values()]
    top = max(ranks)
    if top <= ctx.max_rank:
        return
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= top]
    hint = (
        f"serve with --max-lora-rank {fits[0]}"
        if fits
        else f"vLLM's largest max_lora_rank is {VLLM_MAX_LORA_RANKS[-1]}; resize the adapter"
    )
    yield None, f"rank {top} is greater than --max-rank {ctx.max_rank}; {hint}"


@rule(
    "AC302",
    "vllm-dora",
    "error",
    "vllm",
    "no DoRA (vLLM refuses use_dora)",
    source=_VLLM_PEFT_HELPER,
)
def _vllm_dora(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # PEFTHelper._validate_features: "vLLM does not yet support DoRA."
    if ctx.adapter.is_dora:
        yield None, "DoRA adapter (use_dora): vLLM does not support DoRA; merge it into the base"


@rule(
    "AC303",
    "vllm-bias",
    "error",
    "vllm",
    "no bias training (bias != 'none') and no lora_bias tensors",
    source=f"{_VLLM_PEFT_HELPER}; {_VLLM_UTILS}",
)
def _vllm_bias(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # PEFTHelper.validate_legal refuses bias != "none"; parse_fine_tuned_lora_name refuses any
    # tensor other than lora_A/lora_B(.weight)/lora_embedding_A/B, so lora_B.bias fails to load.
    cfg = ctx.adapter.config
    if cfg.bias != "none":
        yield None, f"bias={cfg.bias!r}: vLLM serves adapters without bias training only"
    with_bias = sorted(n for n, m in ctx.adapter.modules.items() if m.bias is not None)
    if cfg.lora_bias or with_bias:
        yield (
            None,
            (f"lora_bias: {len(with_bias)} module(s) carry a lora_B bias, which vLLM cannot load"),
        )


@rule(
    "AC304",
    "vllm-modules-to-save",
    "error",
    "vllm",
    "no modules_to_save (vLLM accepts only modules_to_save = None)",
    source=_VLLM_PEFT_HELPER,
)
def _vllm_modules_to_save(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # PEFTHelper._validate_features: "vLLM only supports modules_to_save being None." This holds
    # for embed_tokens/lm_head too: vLLM dropped its extra-vocabulary support (v0.12).
    declared = ctx.adapter.config.modules_to_save or []
    saved = saved_copies(ctx.adapter)
    if declared or saved:
        what = list_names(declared or saved)
        msg = (
            f"modules_to_save ({what}): vLLM only serves adapters without full-module copies; "
            "merge the adapter into the base instead"
        )
        yield None, msg


@rule(
    "AC305",
    "vllm-conv",
    "error",
    "vllm",
    "targets are linear layers (vLLM has no LoRA for convolutions)",
    source=_VLLM_UTILS,
)
def _vllm_conv(ctx: Context) -> Iterator[tuple[str | None, str]]:
    # get_supported_lora_modules: "In vLLM, all linear layers support LoRA" (plus FusedMoE and
    # the model's embedding_modules); nothing else can be targeted.
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "conv":
            yield name, "a convolution; vLLM applies LoRA to linear layers only"


@rule(
    "AC306",
    "vllm-embedding",
    "warning",
    "vllm",
    "embedding LoRA is served only for models whose vLLM class lists embedding_modules",
    source=_VLLM_UTILS,
)
def _vllm_embedding(ctx: Context) -> Iterator[tuple[str | None, str]]:
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "embedding":
            msg = (
                "an embedding LoRA: vLLM serves it only if the model's vLLM implementation lists "
                "it in embedding_modules; check the model or drop the module"
            )
            yield name, msg
