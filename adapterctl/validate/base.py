"""AC2xx: base compatibility rules, checked only with a base checkpoint (``--base``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from adapterctl.checkpoint import QUANT_FIX, Checkpoint
from adapterctl.identity import model_key
from adapterctl.validate.context import EMBEDDING_NAMES, HEAD_NAMES, Context, leaf_name, list_names
from adapterctl.validate.core import rule


def _shape(shape: Iterable[int]) -> str:
    return "×".join(str(d) for d in shape)


def _base_keys(base: Checkpoint) -> set[str]:
    # A Hub base is known by its repository's name, a local one by its folder's.
    where = base.origin.repo_id if base.origin is not None else str(base.folder.resolve())
    keys = {model_key(where)}
    cfg_name = base.config.get("_name_or_path")
    if isinstance(cfg_name, str) and cfg_name:
        keys.add(model_key(cfg_name))
    return keys - {""}


@rule("AC201", "target-missing", "error", "base", "every target module exists in the base")
def _target_missing(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None and ctx.base is not None
    if not ctx.binding.matched:
        return  # AC204 says it once
    skip = set(ctx.extra_layer_modules) | set(ctx.fused_expert_modules)
    weights = ctx.base.weights
    tied = ctx.base.tie_word_embeddings and any(
        leaf_name(n.removesuffix(".weight")) in EMBEDDING_NAMES for n in weights
    )
    for name, t in sorted(ctx.binding.targets.items()):
        if t.tensor is not None or name in skip:
            continue
        if tied and leaf_name(name) in HEAD_NAMES:
            continue  # a tied head has no tensor of its own; AC206 covers it
        expected = ctx.binding.add + name.removeprefix(ctx.binding.strip) + ".weight"
        if expected in ctx.base.quant_problems:
            continue  # a 4-bit weight stored without its packed codes: AC213 says so
        yield name, f"the base has no {expected}"


@rule(
    "AC202", "shape-mismatch", "error", "base", "each update's shape equals its base weight's shape"
)
def _shape_mismatch(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None and ctx.base is not None
    for name, t in sorted(ctx.binding.targets.items()):
        if t.shape is None or t.tensor in ctx.base.quant_problems:
            continue  # a broken 4-bit weight has no trustworthy shape: AC213 says why
        mod = ctx.adapter.modules[name]
        shape = replace(mod, layout=t.layout).weight_shape
        if tuple(shape) == tuple(t.shape):
            continue
        if t.layout == "embedding" and tuple(shape[1:]) == tuple(t.shape[1:]):
            continue  # only the vocabulary differs: AC205
        yield (
            name,
            (f"the update is {_shape(shape)} ({t.layout}) but {t.tensor} is {_shape(t.shape)}"),
        )


@rule(
    "AC203",
    "extra-layers",
    "error",
    "base",
    "the adapter has no modules for layers beyond the base's last layer",
)
def _extra_layers(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    extra = ctx.extra_layer_modules
    if extra:
        n = ctx.base.num_layers
        layers = sorted(set(extra.values()))
        span = str(layers[0]) if len(layers) == 1 else f"{layers[0]}–{layers[-1]}"
        msg = (
            f"{len(extra)} module(s) target layer(s) {span} but the base has {n} layers "
            f"(0–{(n or 1) - 1}); PEFT drops them silently when loading, so that part of the "
            "adapter would be lost: is the base the model it was trained on?"
        )
        yield None, msg


@rule("AC204", "no-match", "error", "base", "at least one adapter module exists in the base")
def _no_match(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None and ctx.base is not None
    modules = ctx.adapter.modules
    if modules and not ctx.binding.matched:
        extra = ctx.adapter.config.model_extra or {}
        trained = (extra.get("auto_mapping") or {}).get("base_model_class")
        was = f"trained on {trained}, " if trained else ""
        msg = (
            f"none of the {len(modules)} adapter modules ({list_names(sorted(modules), 2)}) exists "
            f"in the base ({was}base is {ctx.base.architecture or 'an unknown architecture'}); "
            "wrong base model?"
        )
        yield None, msg


@rule(
    "AC205",
    "vocab-mismatch",
    "error",
    "base",
    "an embedding LoRA's vocabulary equals the base's embedding rows",
)
def _vocab_mismatch(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None and ctx.base is not None
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout != "embedding":
            continue
        t = ctx.binding.targets[name]
        rows = t.shape[0] if t.shape is not None else ctx.base_vocab_rows
        if rows is not None and mod.in_features != rows:
            msg = (
                f"the embedding LoRA covers {mod.in_features} tokens but the base has {rows}; "
                "the tokenizer was resized (or a different base was used)"
            )
            yield name, msg


@rule(
    "AC206",
    "tied-embeddings",
    "warning",
    "base",
    "no embedding or output-head LoRA on a base with tied embeddings",
)
def _tied(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    if not ctx.base.tie_word_embeddings:
        return
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "embedding" or leaf_name(name) in EMBEDDING_NAMES:
            msg = (
                "the base ties its input embeddings to the output head (tie_word_embeddings): "
                "merging this update changes lm_head too"
            )
            yield name, msg
        elif leaf_name(name) in HEAD_NAMES:
            msg = (
                "the base ties lm_head to the input embeddings (tie_word_embeddings): "
                "merging this update changes the embeddings too"
            )
            yield name, msg


@rule(
    "AC207",
    "base-rewriting-init",
    "error",
    "base",
    "the adapter was not initialised by rewriting the base (PiSSA, OLoRA, CorDA, LoftQ)",
)
def _rewrites_base(ctx: Context) -> Iterator[tuple[str | None, str]]:
    init = ctx.adapter.config.rewrites_base
    if init:
        msg = (
            f"init_lora_weights={init!r} subtracted the initial adapter from the base weights, "
            "so the adapter only fits the residual base saved with it, not this one; convert it "
            "to a plain LoRA (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
        yield None, msg


@rule(
    "AC208",
    "layer-replication",
    "error",
    "base",
    "layer_replication is not set (its layer indices refer to a stack the base lacks)",
)
def _layer_replication(ctx: Context) -> Iterator[tuple[str | None, str]]:
    rep = ctx.adapter.config.layer_replication
    if rep:
        msg = (
            f"layer_replication={rep}: PEFT duplicated base layers when loading, and the adapter's "
            "layer indices refer to that expanded stack; it cannot be merged into the base as "
            "stored (replicate the layers first)"
        )
        yield None, msg


@rule(
    "AC209",
    "base-name",
    "warning",
    "base",
    "the base named in the config (base_model_name_or_path) is the base given (loosely)",
)
def _base_name(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    named = ctx.adapter.config.base_model_name_or_path
    if not named:
        return
    keys = _base_keys(ctx.base)
    if keys and model_key(named) not in keys:
        msg = (
            f"the adapter names base {named!r} but the base given is {ctx.base.location}; "
            "fine for a sibling (the 16-bit original of a 4-bit repo, a local copy), "
            "otherwise check the base"
        )
        yield None, msg


@rule(
    "AC210",
    "heads-added",
    "info",
    "base",
    "notes modules_to_save copies of modules the base lacks (merging adds them)",
)
def _heads_added(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None
    kinds = {e.target: e.kind for e in ctx.adapter.extras}
    for target, tensor in sorted(ctx.binding.extras.items()):
        if tensor is None and kinds.get(target) == "modules_to_save":
            yield (
                target,
                "the base has no such tensor; merging adds it (e.g. a new classifier head)",
            )


@rule(
    "AC211",
    "fused-experts",
    "error",
    "base",
    "per-expert MoE modules are not targeted on a base that stores experts fused",
)
def _fused_experts(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    fused = ctx.base.fused_experts
    for name in ctx.fused_expert_modules:
        msg = (
            f"a per-expert module, but the base stores its experts fused as 3-D tensors "
            f"({fused[0]}); PEFT cannot load it onto this base"
        )
        yield name, msg


@rule(
    "AC212",
    "quantized-base",
    "info",
    "base",
    "notes a bitsandbytes 4-bit base: merging dequantises the weights it touches",
)
def _quantized_base(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    if ctx.base.quantization:
        msg = (
            f"the base is bitsandbytes 4-bit ({ctx.base.quantization}, {len(ctx.base.quant)} "
            "weights); merging dequantises the weights it touches (requantising with "
            "--quantize nf4 is lossy)"
        )
        yield None, msg


@rule(
    "AC213",
    "quant-state",
    "error",
    "base",
    "every bitsandbytes 4-bit weight of the base has all its stored tensors, consistent with "
    "its quant state",
)
def _quant_state(ctx: Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    for weight, problem in ctx.base.quant_problems.items():
        # A weight missing part of its state would merge (and load) silently wrong.
        yield weight, f"{problem}; {QUANT_FIX}"
