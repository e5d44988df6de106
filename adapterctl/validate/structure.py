"""AC1xx: structure rules, about the adapter's own files and config (no base needed).

Broken files are not findings: the readers raise ``BrokenFile`` / ``UnsupportedAdapter``
(exit 3) for an invalid or non-LoRA ``adapter_config.json``, an empty file or a Git LFS
pointer in place of the weights, before any rule can run. Rules AC101 and AC106 cover what a
readable adapter can still get wrong.
"""

from __future__ import annotations

from collections.abc import Iterator

from adapterctl.patterns import SuffixIndex
from adapterctl.validate.context import Context, has_nonfinite, list_names, saved_copies
from adapterctl.validate.core import rule


def _module_of(target: str) -> str:
    """The module a saved tensor belongs to (``lm_head`` for ``lm_head.weight``)."""
    return target.rsplit(".", 1)[0] if target.endswith((".weight", ".bias")) else target


@rule(
    "AC101",
    "config-agrees",
    "error",
    "structure",
    "adapter_config.json is usable and agrees with the tensors (bias mode, use_dora); a "
    "config that is not JSON, not LoRA, or has r < 1 or a non-finite alpha is refused by "
    "the reader (exit 3)",
)
def _config_agrees(ctx: Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    if cfg.bias not in ("none", "all", "lora_only"):
        yield None, f"bias is {cfg.bias!r}; PEFT knows 'none', 'all' and 'lora_only'"
    modules = ctx.adapter.modules
    dora = [n for n, m in modules.items() if m.is_dora]
    if cfg.use_dora and modules and len(dora) < len(modules):
        msg = (
            f"use_dora is true but {len(modules) - len(dora)} module(s) have no "
            "lora_magnitude_vector; PEFT would start those magnitudes from the base weights"
        )
        yield None, msg
    if dora and not cfg.use_dora:
        msg = (
            f"{len(dora)} module(s) carry a DoRA lora_magnitude_vector but use_dora is false; "
            "PEFT would ignore the magnitudes and apply plain LoRA"
        )
        yield None, msg


@rule("AC102", "incomplete-pair", "error", "structure", "every module has both lora_A and lora_B")
def _incomplete(ctx: Context) -> Iterator[tuple[str | None, str]]:
    for name in ctx.adapter.incomplete:
        yield name, "only one of lora_A/lora_B is saved, so the update cannot be formed; re-save"


@rule(
    "AC103",
    "rank-mismatch",
    "error",
    "structure",
    "the rank in the config (r, rank_pattern) matches the tensors' shapes",
)
def _rank_mismatch(ctx: Context) -> Iterator[tuple[str | None, str]]:
    for name, mod in sorted(ctx.adapter.modules.items()):
        rank_b = int(mod.b.shape[1]) if len(mod.b.shape) > 1 else -1
        if rank_b != mod.rank:
            yield name, f"lora_A has rank {mod.rank} but lora_B has rank {rank_b}"
        elif mod.config_rank != mod.rank:
            msg = (
                f"config says r={mod.config_rank} but the tensors have rank {mod.rank}; "
                "PEFT refuses to load it and the scale alpha/r would be wrong"
            )
            yield name, msg


@rule(
    "AC104",
    "non-finite",
    "error",
    "structure",
    "no NaN or Inf in the LoRA factors, DoRA magnitudes, lora biases or saved copies, and no "
    "update scale·B·A beyond float32's range",
)
def _non_finite(ctx: Context) -> Iterator[tuple[str | None, str]]:
    for name, st in sorted(ctx.stats.items()):
        if st.nonfinite:
            yield name, f"{', '.join(st.nonfinite)} hold NaN/Inf (diverged training?)"
        elif st.overflow:
            mod = ctx.adapter.modules[name]
            msg = (
                f"{st.overflow} (scale {mod.scale:.3g}, lora_alpha {mod.alpha:g}): merged, it "
                "would write inf; check lora_alpha and the factors"
            )
            yield name, msg
    for e in ctx.adapter.extras:
        if has_nonfinite(e.tensor.array()):
            yield e.target, f"the saved {e.kind} tensor holds NaN/Inf"


@rule(
    "AC105",
    "zero-adapter",
    "error",
    "structure",
    "at least one module changes the base (not every B·A is zero)",
)
def _zero_adapter(ctx: Context) -> Iterator[tuple[str | None, str]]:
    stats = ctx.stats
    if stats and all(s.zero for s in stats.values()) and not saved_copies(ctx.adapter):
        msg = (
            f"every module's update B·A is zero ({len(stats)} modules): an untrained or freshly "
            "initialised adapter (PEFT starts with lora_B = 0); applying it changes nothing"
        )
        yield None, msg


@rule(
    "AC106",
    "no-modules",
    "error",
    "structure",
    "the weights hold at least one LoRA module (an empty file or a Git LFS pointer is "
    "refused by the reader, exit 3)",
)
def _no_modules(ctx: Context) -> Iterator[tuple[str | None, str]]:
    a = ctx.adapter
    if not a.modules and not a.incomplete:
        files = ", ".join(f.name for f in a.weight_files) or str(a.path)
        yield None, f"no lora_A/lora_B tensors in {files}; is this a LoRA adapter's weights file?"


@rule(
    "AC107",
    "unknown-tensors",
    "warning",
    "structure",
    "every tensor in the weights file is a LoRA factor, DoRA magnitude or saved module",
)
def _unknown_tensors(ctx: Context) -> Iterator[tuple[str | None, str]]:
    unknown = ctx.adapter.unknown_tensors
    if unknown:
        msg = (
            f"{len(unknown)} tensor(s) adapterctl does not recognise ({list_names(unknown)}); "
            "they are ignored"
        )
        yield None, msg


@rule(
    "AC108",
    "modules-to-save-mismatch",
    "info",
    "structure",
    "modules_to_save in the config and the full copies in the file agree",
)
def _modules_to_save(ctx: Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    declared = list(cfg.modules_to_save or [])
    saved = saved_copies(ctx.adapter)
    if cfg.bias != "none":  # bias="all"/"lora_only" saves base biases as full tensors
        saved = [t for t in saved if not t.endswith(".bias")]
    index = SuffixIndex(declared)
    hits = [index.find(_module_of(t)) for t in saved]
    found = {i for h in hits for i in h}
    for i, d in enumerate(declared):
        if i not in found:
            yield d, "listed in modules_to_save but no copy is saved (the module did not exist?)"
    for t, h in zip(saved, hits, strict=True):
        if not h:
            yield t, "a full copy is saved but modules_to_save does not list it"
