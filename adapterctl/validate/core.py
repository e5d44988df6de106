"""``validate``: rules that turn an adapter (and optionally a base) into findings with stable codes.

Every rule is a small function registered with a code, a severity and a one-line description
in ``RULES``; the codes never change meaning, so CI configurations and README links stay valid.

- ``AC1xx`` structure: the adapter's own files and config.
- ``AC2xx`` base compatibility: only with a base checkpoint.
- ``AC3xx`` serving target: ``vllm`` (AC30x) or ``llama.cpp`` (AC31x). Each of these rules
  cites the source file (and the upstream commit it was read at) of the rule it encodes.

Broken files are not findings: the readers raise ``BrokenFile`` / ``UnsupportedAdapter``
(exit 3) for an invalid or non-LoRA ``adapter_config.json``, an empty file or a Git LFS
pointer in place of the weights, before any rule can run. Rules AC101 and AC106 cover what a
readable adapter can still get wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, computed_field

from adapterctl.adapter import Adapter, LoraModule
from adapterctl.checkpoint import Binding, Checkpoint, layer_index
from adapterctl.errors import UsageError, ValidationFailed

if TYPE_CHECKING:
    import numpy as np

Severity = Literal["error", "warning", "info"]
Scope = Literal["structure", "base", "vllm", "llama.cpp"]

SERVING_TARGETS: tuple[str, ...] = ("peft", "vllm", "llama.cpp")

# vLLM's LoRAConfig.max_lora_rank accepts only these values:
# vllm-project/vllm vllm/config/lora.py, `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320,
# 512]` (read at commit 01230b40, the v0.11 series).
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Citations for the serving rules: the file and function each rule encodes, and the commit
# of the upstream repository it was read at (vLLM and llama.cpp change; re-check on upgrade).
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
_GGUF_CONVERTER = (
    "convert_lora_to_gguf.py LoraModel.get_tensors (read at ggml-org/llama.cpp@0b03adaa)"
)
_GGUF_SCALE = (
    "convert_lora_to_gguf.py set_gguf_parameters writes one adapter.lora.alpha; "
    "src/llama-adapter.h llama_adapter_lora_weight::get_scale = alpha / rank "
    "(read at ggml-org/llama.cpp@0b03adaa)"
)

_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")
_HEAD_NAMES = ("lm_head", "embed_out")
_QUANT_SUFFIX = re.compile(r"(?:-unsloth)?(?:-bnb)?-(?:4bit|8bit|nf4)$")


class Rule(BaseModel):
    """One validation rule: a stable code, its severity and what it checks."""

    model_config = ConfigDict(frozen=True)

    code: str
    name: str
    severity: Severity
    scope: Scope
    description: str
    needs_base: bool = False
    source: str | None = None  # where a serving rule comes from (file, version)


class Finding(BaseModel):
    """One thing a rule found: code, severity, the module concerned (if any) and a message."""

    code: str
    severity: Severity
    module: str | None = None
    message: str


class ValidationReport(BaseModel):
    """What ``adapterctl validate`` reports; ``model_dump_json()`` is what ``--json`` prints."""

    source: str
    target: str
    base: str | None = None
    max_rank: int
    matched_modules: int | None = None  # with a base: adapter modules found in it
    rules_checked: list[str]
    findings: list[Finding]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def warnings(self) -> int:
        return sum(1 for f in self.findings if f.severity == "warning")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def infos(self) -> int:
        return sum(1 for f in self.findings if f.severity == "info")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return self.errors == 0

    def passed(self, strict: bool = False) -> bool:
        """No errors (and, with ``strict``, no warnings either)."""
        return self.ok and not (strict and self.warnings)

    def findings_for(self, code: str) -> list[Finding]:
        """The findings of one rule."""
        return [f for f in self.findings if f.code == code]


@dataclass
class _ModuleStats:
    nonfinite: list[str]  # which tensors hold NaN/Inf
    zero: bool  # the module changes nothing (B·A = 0, no DoRA magnitude, no lora bias)


@dataclass
class _Context:
    """What the rules look at; costly views are computed once, on first use."""

    adapter: Adapter
    base: Checkpoint | None
    max_rank: int
    binding: Binding | None = None

    @cached_property
    def stats(self) -> dict[str, _ModuleStats]:
        return {name: _module_stats(mod) for name, mod in self.adapter.modules.items()}

    @cached_property
    def extra_layer_modules(self) -> dict[str, int]:
        """Adapter modules in layers the base does not have -> their layer index."""
        n = self.base.num_layers if self.base is not None else None
        if n is None:
            return {}
        out = {}
        for name in self.adapter.modules:
            i = layer_index(name)
            if i is not None and i >= n:
                out[name] = i
        return out

    @cached_property
    def fused_expert_modules(self) -> list[str]:
        """Per-expert adapter modules the base cannot hold because it stores experts fused."""
        if self.base is None or self.binding is None or not self.base.fused_experts:
            return []
        return [
            name
            for name, t in self.binding.targets.items()
            if t.tensor is None and ".experts." in f".{name}."
        ]

    @cached_property
    def base_vocab_rows(self) -> int | None:
        """Rows of the base's input embedding (its real vocabulary), else its config vocab."""
        if self.base is None:
            return None
        for name, (shape, _) in self.base.weights.items():
            if len(shape) == 2 and _leaf(name.removesuffix(".weight")) in _EMBEDDING_NAMES:
                return int(shape[0])
        return self.base.vocab_size


_Check = Callable[[_Context], Iterable[tuple[str | None, str]]]
RULES: dict[str, Rule] = {}
"""Every rule, by code: what JUnit lists and the README documents."""
_CHECKS: dict[str, _Check] = {}


def _rule(
    code: str,
    name: str,
    severity: Severity,
    scope: Scope,
    description: str,
    *,
    needs_base: bool = False,
    source: str | None = None,
) -> Callable[[_Check], _Check]:
    def register(check: _Check) -> _Check:
        if code in RULES:
            raise RuntimeError(f"rule code {code} registered twice")
        RULES[code] = Rule(
            code=code,
            name=name,
            severity=severity,
            scope=scope,
            description=description,
            needs_base=needs_base or scope == "base",
            source=source,
        )
        _CHECKS[code] = check
        return check

    return register


def validate(
    adapter: Adapter,
    base: Checkpoint | None = None,
    target: str = "peft",
    max_rank: int = 16,
) -> ValidationReport:
    """Check an adapter's structure, its fit to a base, and a serving target's restrictions.

    Args:
        adapter: an adapter from ``adapterctl.formats.read`` (broken files raise there).
        base: a base checkpoint from ``adapterctl.checkpoint.open_checkpoint``; enables the
            AC2xx rules.
        target: ``peft`` (structure and base rules only), ``vllm`` (adds AC30x) or
            ``llama.cpp`` (adds AC31x).
        max_rank: the ``--max-lora-rank`` the vLLM server runs with; must be one of the
            values vLLM accepts (``VLLM_MAX_LORA_RANKS``).

    Returns:
        The report: findings sorted by code then module, and the codes of every rule checked.

    Raises:
        UsageError: an unknown target, or a ``max_rank`` vLLM would refuse.

    Example:
        >>> report = validate(read("my-adapter"), open_checkpoint("Llama-3.2-1B"), "vllm")
        >>> report.ok, [f.code for f in report.findings]
        (False, ['AC301'])
    """
    if target not in SERVING_TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of: {', '.join(SERVING_TARGETS)}")
    if target == "vllm" and max_rank not in VLLM_MAX_LORA_RANKS:
        allowed = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
        raise UsageError(
            f"--max-rank {max_rank} is not a max_lora_rank vLLM accepts; use one of {allowed}"
        )
    ctx = _Context(adapter=adapter, base=base, max_rank=max_rank)
    if base is not None:
        ctx.binding = base.bind(adapter)
    checked: list[str] = []
    findings: list[Finding] = []
    for code, rule in sorted(RULES.items()):
        if not _applies(rule, target, base is not None):
            continue
        checked.append(code)
        for module, message in _CHECKS[code](ctx):
            findings.append(
                Finding(code=code, severity=rule.severity, module=module, message=message)
            )
    findings.sort(key=lambda f: (f.code, f.module or ""))
    return ValidationReport(
        source=str(adapter.path),
        target=target,
        base=str(base.path) if base is not None else None,
        max_rank=max_rank,
        matched_modules=len(ctx.binding.matched) if ctx.binding is not None else None,
        rules_checked=checked,
        findings=findings,
    )


def require_fit(adapter: Adapter, base: Checkpoint, source: str | None = None) -> ValidationReport:
    """The pre-flight of merge, add (and anything that writes): ``validate`` against ``base``,
    refusing on the first error.

    Args:
        adapter: the adapter about to be used.
        base: the base it must fit.
        source: how the user named the adapter (default: its path), for the message.

    Returns:
        The report (its warnings are for the caller to show).

    Raises:
        ValidationFailed: an error finding (exit 3), naming the rule and the command that
            lists every finding.
    """
    report = validate(adapter, base)
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        first = errors[0]
        where = f" {first.module}" if first.module else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        name = source or str(adapter.path)
        raise ValidationFailed(
            f"{name} does not fit {base.path}: {first.code}{where}: {first.message}{more}; "
            f"see: adapterctl validate {name} --base {base.path}"
        )
    return report


def _applies(rule: Rule, target: str, has_base: bool) -> bool:
    if rule.needs_base and not has_base:
        return False
    return rule.scope in ("structure", "base") or rule.scope == target


def skip_reason(rule: Rule, target: str, has_base: bool) -> str:
    """Why ``rule`` was not checked (for JUnit's ``<skipped>``), or "" if it was."""
    if rule.scope in ("vllm", "llama.cpp") and rule.scope != target:
        return f"only with --target {rule.scope}"
    if rule.needs_base and not has_base:
        return "only with --base"
    return ""


# ---------------------------------------------------------------------------------------------
# helpers


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _names(items: Iterable[str], k: int = 3) -> str:
    """'a, b, c and 4 more'."""
    items = list(items)
    head = ", ".join(items[:k])
    return head + (f" and {len(items) - k} more" if len(items) > k else "")


def _shape(shape: Iterable[int]) -> str:
    return "×".join(str(d) for d in shape)


def _nonfinite(t: np.ndarray[Any, Any]) -> bool:
    """True if a floating-point array holds NaN or Inf (other float formats, such as
    bfloat16, are widened to float32 exactly first)."""
    import numpy as np

    if t.dtype.kind in "biu":
        return False
    if t.dtype not in (np.float16, np.float32, np.float64):
        t = t.astype(np.float32)
    return not bool(np.isfinite(t).all())


def _module_stats(mod: LoraModule) -> _ModuleStats:
    # numpy, not torch: validation (and a CPU merge's pre-flight) never pays torch's import.
    import numpy as np

    b, a = mod.arrays(None)  # (out, r), (r, in), as stored
    parts = {"lora_A": a, "lora_B": b}
    if mod.magnitude is not None:
        parts["lora_magnitude_vector"] = mod.magnitude.array()
    if mod.bias is not None:
        parts["lora_B.bias"] = mod.bias.array()
    if a.shape[0] != b.shape[1]:
        return _ModuleStats(nonfinite=[r for r, t in parts.items() if _nonfinite(t)], zero=False)
    # The r x r Gram matrices in float32 (one pass over each factor, no float64 copies) settle
    # the common case: finite diagonals mean finite factors (a NaN or Inf reaches the sum of
    # its column's squares), and ‖B·A‖² = Σ (BᵀB) ⊙ (AAᵀ) well above its rounding means B·A ≠ 0.
    # Anything else (a non-finite or zero diagonal, or ‖B·A‖ near zero) is decided exactly.
    wide = np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32
    b32: Any = b.astype(wide, copy=False)
    a32: Any = a.astype(wide, copy=False)
    gb, ga = b32.T @ b32, a32 @ a32.T  # (r, r), (r, r)
    nb, na = float(np.trace(gb)), float(np.trace(ga))  # ‖B‖², ‖A‖²
    factors_ok = np.isfinite(nb) and np.isfinite(na)
    extras = {r: t for r, t in parts.items() if r not in ("lora_A", "lora_B")}
    bad = [r for r, t in (extras if factors_ok else parts).items() if _nonfinite(t)]
    if bad:
        return _ModuleStats(nonfinite=bad, zero=False)
    no_bias = mod.bias is None or bool((parts["lora_B.bias"] == 0).all())
    if not (no_bias and mod.magnitude is None):
        return _ModuleStats(nonfinite=[], zero=False)
    if factors_ok and float((gb * ga).sum()) > 1e-3 * nb * na:  # far from zero: ‖BA‖ ≤ ‖B‖‖A‖
        return _ModuleStats(nonfinite=[], zero=False)
    from adapterctl.lowrank import frobenius_norm

    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    no_ba = not a64.any() or not b64.any() or frobenius_norm(b64, a64, mod.scale) == 0
    return _ModuleStats(nonfinite=[], zero=no_ba)


def _saved_copies(adapter: Adapter) -> list[str]:
    """Targets of the full tensors saved as ``modules_to_save`` copies."""
    return [e.target for e in adapter.extras if e.kind == "modules_to_save"]


def _declared_match(declared: str, target: str) -> bool:
    module = target.rsplit(".", 1)[0] if target.endswith((".weight", ".bias")) else target
    return module == declared or module.endswith("." + declared)


def _model_key(name: str) -> str:
    """A base name reduced to what identifies the model: the last path part (or the repo name
    of a Hugging Face cache path), lower-cased, without a ``-bnb-4bit``-style suffix."""
    parts = [p for p in re.split(r"[/\\]", name.strip()) if p]
    if not parts:
        return ""
    key = parts[-1]
    for p in reversed(parts):
        if p.startswith("models--"):
            key = p.split("--")[-1]
            break
    return _QUANT_SUFFIX.sub("", key.lower())


def _base_keys(base: Checkpoint) -> set[str]:
    folder = base.path.parent if base.path.is_file() else base.path
    keys = {_model_key(str(folder.resolve()))}
    cfg_name = base.config.get("_name_or_path")
    if isinstance(cfg_name, str) and cfg_name:
        keys.add(_model_key(cfg_name))
    return keys - {""}


# ---------------------------------------------------------------------------------------------
# AC1xx: structure


@_rule(
    "AC101",
    "config-agrees",
    "error",
    "structure",
    "adapter_config.json is usable and agrees with the tensors (bias mode, use_dora); a "
    "config that is not JSON, not LoRA, or has r < 1 or a non-finite alpha is refused by "
    "the reader (exit 3)",
)
def _config_agrees(ctx: _Context) -> Iterator[tuple[str | None, str]]:
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


@_rule("AC102", "incomplete-pair", "error", "structure", "every module has both lora_A and lora_B")
def _incomplete(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    for name in ctx.adapter.incomplete:
        yield name, "only one of lora_A/lora_B is saved, so the update cannot be formed; re-save"


@_rule(
    "AC103",
    "rank-mismatch",
    "error",
    "structure",
    "the rank in the config (r, rank_pattern) matches the tensors' shapes",
)
def _rank_mismatch(ctx: _Context) -> Iterator[tuple[str | None, str]]:
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


@_rule(
    "AC104",
    "non-finite",
    "error",
    "structure",
    "no NaN or Inf in the LoRA factors, DoRA magnitudes, lora biases or saved copies",
)
def _non_finite(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    for name, st in sorted(ctx.stats.items()):
        if st.nonfinite:
            yield name, f"{', '.join(st.nonfinite)} hold NaN/Inf (diverged training?)"
    for e in ctx.adapter.extras:
        if _nonfinite(e.tensor.array()):
            yield e.target, f"the saved {e.kind} tensor holds NaN/Inf"


@_rule(
    "AC105",
    "zero-adapter",
    "error",
    "structure",
    "at least one module changes the base (not every B·A is zero)",
)
def _zero_adapter(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    stats = ctx.stats
    if stats and all(s.zero for s in stats.values()) and not _saved_copies(ctx.adapter):
        msg = (
            f"every module's update B·A is zero ({len(stats)} modules): an untrained or freshly "
            "initialised adapter (PEFT starts with lora_B = 0); applying it changes nothing"
        )
        yield None, msg


@_rule(
    "AC106",
    "no-modules",
    "error",
    "structure",
    "the weights hold at least one LoRA module (an empty file or a Git LFS pointer is "
    "refused by the reader, exit 3)",
)
def _no_modules(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    a = ctx.adapter
    if not a.modules and not a.incomplete:
        files = ", ".join(f.name for f in a.weight_files) or str(a.path)
        yield None, f"no lora_A/lora_B tensors in {files}; is this a LoRA adapter's weights file?"


@_rule(
    "AC107",
    "unknown-tensors",
    "warning",
    "structure",
    "every tensor in the weights file is a LoRA factor, DoRA magnitude or saved module",
)
def _unknown_tensors(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    unknown = ctx.adapter.unknown_tensors
    if unknown:
        msg = (
            f"{len(unknown)} tensor(s) adapterctl does not recognise ({_names(unknown)}); "
            "they are ignored"
        )
        yield None, msg


@_rule(
    "AC108",
    "modules-to-save-mismatch",
    "info",
    "structure",
    "modules_to_save in the config and the full copies in the file agree",
)
def _modules_to_save(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    declared = list(cfg.modules_to_save or [])
    saved = _saved_copies(ctx.adapter)
    if cfg.bias != "none":  # bias="all"/"lora_only" saves base biases as full tensors
        saved = [t for t in saved if not t.endswith(".bias")]
    for d in declared:
        if not any(_declared_match(d, t) for t in saved):
            yield d, "listed in modules_to_save but no copy is saved (the module did not exist?)"
    for t in saved:
        if not any(_declared_match(d, t) for d in declared):
            yield t, "a full copy is saved but modules_to_save does not list it"


# ---------------------------------------------------------------------------------------------
# AC2xx: base compatibility (with --base)


@_rule("AC201", "target-missing", "error", "base", "every target module exists in the base")
def _target_missing(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None and ctx.base is not None
    if not ctx.binding.matched:
        return  # AC204 says it once
    skip = set(ctx.extra_layer_modules) | set(ctx.fused_expert_modules)
    weights = ctx.base.weights
    tied = ctx.base.tie_word_embeddings and any(
        _leaf(n.removesuffix(".weight")) in _EMBEDDING_NAMES for n in weights
    )
    for name, t in sorted(ctx.binding.targets.items()):
        if t.tensor is not None or name in skip:
            continue
        if tied and _leaf(name) in _HEAD_NAMES:
            continue  # a tied head has no tensor of its own; AC206 covers it
        expected = ctx.binding.add + name.removeprefix(ctx.binding.strip) + ".weight"
        yield name, f"the base has no {expected}"


@_rule(
    "AC202", "shape-mismatch", "error", "base", "each update's shape equals its base weight's shape"
)
def _shape_mismatch(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None
    for name, t in sorted(ctx.binding.targets.items()):
        if t.shape is None:
            continue
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


@_rule(
    "AC203",
    "extra-layers",
    "error",
    "base",
    "the adapter has no modules for layers beyond the base's last layer",
)
def _extra_layers(ctx: _Context) -> Iterator[tuple[str | None, str]]:
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


@_rule("AC204", "no-match", "error", "base", "at least one adapter module exists in the base")
def _no_match(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None and ctx.base is not None
    modules = ctx.adapter.modules
    if modules and not ctx.binding.matched:
        extra = ctx.adapter.config.model_extra or {}
        trained = (extra.get("auto_mapping") or {}).get("base_model_class")
        was = f"trained on {trained}, " if trained else ""
        msg = (
            f"none of the {len(modules)} adapter modules ({_names(sorted(modules), 2)}) exists "
            f"in the base ({was}base is {ctx.base.architecture or 'an unknown architecture'}); "
            "wrong base model?"
        )
        yield None, msg


@_rule(
    "AC205",
    "vocab-mismatch",
    "error",
    "base",
    "an embedding LoRA's vocabulary equals the base's embedding rows",
)
def _vocab_mismatch(ctx: _Context) -> Iterator[tuple[str | None, str]]:
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


@_rule(
    "AC206",
    "tied-embeddings",
    "warning",
    "base",
    "no embedding or output-head LoRA on a base with tied embeddings",
)
def _tied(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    if not ctx.base.tie_word_embeddings:
        return
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "embedding" or _leaf(name) in _EMBEDDING_NAMES:
            msg = (
                "the base ties its input embeddings to the output head (tie_word_embeddings): "
                "merging this update changes lm_head too"
            )
            yield name, msg
        elif _leaf(name) in _HEAD_NAMES:
            msg = (
                "the base ties lm_head to the input embeddings (tie_word_embeddings): "
                "merging this update changes the embeddings too"
            )
            yield name, msg


@_rule(
    "AC207",
    "base-rewriting-init",
    "error",
    "base",
    "the adapter was not initialised by rewriting the base (PiSSA, OLoRA, CorDA, LoftQ)",
)
def _rewrites_base(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    init = ctx.adapter.config.rewrites_base
    if init:
        msg = (
            f"init_lora_weights={init!r} subtracted the initial adapter from the base weights, "
            "so the adapter only fits the residual base saved with it, not this one; convert it "
            "to a plain LoRA (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
        yield None, msg


@_rule(
    "AC208",
    "layer-replication",
    "error",
    "base",
    "layer_replication is not set (its layer indices refer to a stack the base lacks)",
)
def _layer_replication(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    rep = ctx.adapter.config.layer_replication
    if rep:
        msg = (
            f"layer_replication={rep}: PEFT duplicated base layers when loading, and the adapter's "
            "layer indices refer to that expanded stack; it cannot be merged into the base as "
            "stored (replicate the layers first)"
        )
        yield None, msg


@_rule(
    "AC209",
    "base-name",
    "warning",
    "base",
    "the base named in the config (base_model_name_or_path) is the base given (loosely)",
)
def _base_name(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    named = ctx.adapter.config.base_model_name_or_path
    if not named:
        return
    keys = _base_keys(ctx.base)
    if keys and _model_key(named) not in keys:
        msg = (
            f"the adapter names base {named!r} but the base given is {ctx.base.path}; "
            "fine for a sibling (the 16-bit original of a 4-bit repo, a local copy), "
            "otherwise check the base"
        )
        yield None, msg


@_rule(
    "AC210",
    "heads-added",
    "info",
    "base",
    "notes modules_to_save copies of modules the base lacks (merging adds them)",
)
def _heads_added(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.binding is not None
    kinds = {e.target: e.kind for e in ctx.adapter.extras}
    for target, tensor in sorted(ctx.binding.extras.items()):
        if tensor is None and kinds.get(target) == "modules_to_save":
            yield (
                target,
                "the base has no such tensor; merging adds it (e.g. a new classifier head)",
            )


@_rule(
    "AC211",
    "fused-experts",
    "error",
    "base",
    "per-expert MoE modules are not targeted on a base that stores experts fused",
)
def _fused_experts(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    fused = ctx.base.fused_experts
    for name in ctx.fused_expert_modules:
        msg = (
            f"a per-expert module, but the base stores its experts fused as 3-D tensors "
            f"({fused[0]}); PEFT cannot load it onto this base"
        )
        yield name, msg


@_rule(
    "AC212",
    "quantized-base",
    "info",
    "base",
    "notes a bitsandbytes 4-bit base: merging dequantises the weights it touches",
)
def _quantized_base(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    assert ctx.base is not None
    if ctx.base.quantization:
        msg = (
            f"the base is bitsandbytes 4-bit ({ctx.base.quantization}, {len(ctx.base.quant)} "
            "weights); merging dequantises the weights it touches (requantising with "
            "--quantize nf4 is lossy)"
        )
        yield None, msg


# ---------------------------------------------------------------------------------------------
# AC30x: vLLM


@_rule(
    "AC301",
    "vllm-rank",
    "error",
    "vllm",
    "the adapter's rank is at most --max-rank (vLLM's --max-lora-rank)",
    source=f"{_VLLM_PEFT_HELPER}; {_VLLM_LORA_CONFIG}",
)
def _vllm_rank(ctx: _Context) -> Iterator[tuple[str | None, str]]:
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


@_rule(
    "AC302",
    "vllm-dora",
    "error",
    "vllm",
    "no DoRA (vLLM refuses use_dora)",
    source=_VLLM_PEFT_HELPER,
)
def _vllm_dora(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    # PEFTHelper._validate_features: "vLLM does not yet support DoRA."
    dora = [n for n, m in ctx.adapter.modules.items() if m.is_dora]
    if ctx.adapter.config.use_dora or dora:
        yield None, "DoRA adapter (use_dora): vLLM does not support DoRA; merge it into the base"


@_rule(
    "AC303",
    "vllm-bias",
    "error",
    "vllm",
    "no bias training (bias != 'none') and no lora_bias tensors",
    source=f"{_VLLM_PEFT_HELPER}; {_VLLM_UTILS}",
)
def _vllm_bias(ctx: _Context) -> Iterator[tuple[str | None, str]]:
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


@_rule(
    "AC304",
    "vllm-modules-to-save",
    "error",
    "vllm",
    "no modules_to_save (vLLM accepts only modules_to_save = None)",
    source=_VLLM_PEFT_HELPER,
)
def _vllm_modules_to_save(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    # PEFTHelper._validate_features: "vLLM only supports modules_to_save being None." This holds
    # for embed_tokens/lm_head too: vLLM dropped its extra-vocabulary support (v0.12).
    declared = ctx.adapter.config.modules_to_save or []
    saved = _saved_copies(ctx.adapter)
    if declared or saved:
        what = _names(declared or saved)
        msg = (
            f"modules_to_save ({what}): vLLM only serves adapters without full-module copies; "
            "merge the adapter into the base instead"
        )
        yield None, msg


@_rule(
    "AC305",
    "vllm-conv",
    "error",
    "vllm",
    "targets are linear layers (vLLM has no LoRA for convolutions)",
    source=_VLLM_UTILS,
)
def _vllm_conv(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    # get_supported_lora_modules: "In vLLM, all linear layers support LoRA" (plus FusedMoE and
    # the model's embedding_modules); nothing else can be targeted.
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "conv":
            yield name, "a convolution; vLLM applies LoRA to linear layers only"


@_rule(
    "AC306",
    "vllm-embedding",
    "warning",
    "vllm",
    "embedding LoRA is served only for models whose vLLM class lists embedding_modules",
    source=_VLLM_UTILS,
)
def _vllm_embedding(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    for name, mod in sorted(ctx.adapter.modules.items()):
        if mod.layout == "embedding":
            msg = (
                "an embedding LoRA: vLLM serves it only if the model's vLLM implementation lists "
                "it in embedding_modules; check the model or drop the module"
            )
            yield name, msg


# ---------------------------------------------------------------------------------------------
# AC31x: llama.cpp (convert_lora_to_gguf.py)


@_rule(
    "AC311",
    "gguf-rslora",
    "error",
    "llama.cpp",
    "no rsLoRA: llama.cpp scales by alpha/r, not alpha/sqrt(r)",
    source=_GGUF_SCALE,
)
def _gguf_rslora(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    if cfg.use_rslora:
        r = cfg.r
        msg = (
            f"rsLoRA (use_rslora): the GGUF stores only lora_alpha and llama.cpp applies "
            f"alpha/r, so the update would be {math.sqrt(r):.3g}× too small at r={r}; set "
            f"lora_alpha to alpha·sqrt(r) = {cfg.lora_alpha * math.sqrt(r):g} before converting"
        )
        yield None, msg


@_rule(
    "AC312",
    "gguf-alpha-pattern",
    "error",
    "llama.cpp",
    "every module's alpha equals lora_alpha (alpha_pattern is lost; rank_pattern is kept "
    "because llama.cpp reads each tensor's rank)",
    source=_GGUF_SCALE,
)
def _gguf_alpha_pattern(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    cfg = ctx.adapter.config
    lost = sorted(
        n for n, m in ctx.adapter.modules.items() if not math.isclose(m.alpha, cfg.lora_alpha)
    )
    if lost:
        msg = (
            f"alpha_pattern gives {len(lost)} module(s) ({_names(lost)}) an alpha other than "
            f"lora_alpha={cfg.lora_alpha:g}; the GGUF keeps one alpha, so they would be scaled "
            "wrongly (fold each alpha into its lora_B first)"
        )
        yield None, msg


@_rule(
    "AC313",
    "gguf-dora",
    "error",
    "llama.cpp",
    "no DoRA: convert_lora_to_gguf.py stops at lora_magnitude_vector",
    source=_GGUF_CONVERTER,
)
def _gguf_dora(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    # get_tensors: a tensor that is neither lora_A nor lora_B (nor a norm) -> "Unexpected name".
    if ctx.adapter.config.use_dora or any(m.is_dora for m in ctx.adapter.modules.values()):
        yield None, "DoRA adapter: llama.cpp has no DoRA and the converter refuses it; merge first"


@_rule(
    "AC314",
    "gguf-full-tensors",
    "error",
    "llama.cpp",
    "no full tensors or lora biases (the converter accepts only LoRA factors and norms)",
    source=_GGUF_CONVERTER,
)
def _gguf_full_tensors(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    # get_tensors skips *.base_layer.weight and keeps *_layernorm/*.norm; anything else that is
    # not lora_A/lora_B exits with "Unexpected name '...': Not a lora_A or lora_B tensor".
    saved = [t for t in _saved_copies(ctx.adapter) if "norm" not in t]
    if saved:
        msg = (
            f"{len(saved)} full tensor(s) saved with the adapter ({_names(saved)}): "
            "convert_lora_to_gguf.py refuses them; merge the adapter into the base instead"
        )
        yield None, msg
    with_bias = sorted(n for n, m in ctx.adapter.modules.items() if m.bias is not None)
    if with_bias:
        yield None, f"{len(with_bias)} module(s) carry a lora_B bias, which the converter refuses"


@_rule(
    "AC315",
    "gguf-added-tokens",
    "warning",
    "llama.cpp",
    "the adapter does not resize the vocabulary (saved embeddings/head match the base)",
    needs_base=True,
    source=_GGUF_CONVERTER,
)
def _gguf_added_tokens(ctx: _Context) -> Iterator[tuple[str | None, str]]:
    # The converter points adapters with embeddings at llama.cpp PR 9948: added tokens need a
    # base GGUF converted with the new tokenizer.
    rows = ctx.base_vocab_rows
    if rows is None:
        return
    for e in ctx.adapter.extras:
        leaf = _leaf(e.target.removesuffix(".weight"))
        if leaf in _EMBEDDING_NAMES + _HEAD_NAMES and e.target.endswith(".weight"):
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


def rules_markdown() -> str:
    """The rules as a Markdown table (for the README)."""
    lines = ["| code | severity | checks | source |", "|---|---|---|---|"]
    for code, r in sorted(RULES.items()):
        scope = "" if r.scope == "structure" else f" ({r.scope})"
        lines.append(f"| {code} | {r.severity} | {r.description}{scope} | {r.source or ''} |")
    return "\n".join(lines)


__all__ = [
    "RULES",
    "SERVING_TARGETS",
    "VLLM_MAX_LORA_RANKS",
    "Finding",
    "Rule",
    "ValidationReport",
    "rules_markdown",
    "skip_reason",
    "validate",
]
