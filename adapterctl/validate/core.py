"""The validation framework: rules, findings, the report, the rule registry and its runner.

Every rule is a small function registered with ``@rule`` under a code, a severity and a
one-line description in ``RULES``; the rule families (``structure``, ``base``, ``vllm``,
``llama_cpp``) register theirs when ``adapterctl.validate`` is imported. ``validate`` runs the
rules that apply; ``require_fit`` is the pre-flight of the commands that write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from adapterctl.adapter import Adapter, natural_key
from adapterctl.checkpoint import Checkpoint
from adapterctl.errors import UsageError, ValidationFailed
from adapterctl.validate.context import Context

Severity = Literal["error", "warning", "info"]
Scope = Literal["structure", "base", "vllm", "llama.cpp"]

SERVING_TARGETS: tuple[str, ...] = ("peft", "vllm", "llama.cpp")

# vLLM's LoRAConfig.max_lora_rank accepts only these values:
# vllm-project/vllm vllm/config/lora.py, `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320,
# 512]` (read at commit 01230b40, the v0.11 series).
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
    targets: list[str]  # the serving targets checked, "peft" meaning none beyond PEFT
    base: str | None = None
    max_rank: int
    matched_modules: int | None = None  # with a base: adapter modules found in it
    rules_checked: list[str]
    findings: list[Finding]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def target(self) -> str:
        """The targets as one string (``vllm, llama.cpp``)."""
        return ", ".join(self.targets)

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


_Check = Callable[[Context], Iterable[tuple[str | None, str]]]
RULES: dict[str, Rule] = {}
"""Every rule, by code: what JUnit lists and the README documents."""
_CHECKS: dict[str, _Check] = {}


def rule(
    code: str,
    name: str,
    severity: Severity,
    scope: Scope,
    description: str,
    *,
    needs_base: bool = False,
    source: str | None = None,
) -> Callable[[_Check], _Check]:
    """Register the decorated check as rule ``code`` in ``RULES``.

    The check receives the ``Context`` and yields ``(module or None, message)`` for each
    finding; the runner gives each the rule's code and severity. Rules with scope ``base``
    (or ``needs_base``) run only with a base checkpoint.

    Raises:
        RuntimeError: ``code`` is already registered (a bug, not a user error).
    """

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
        # Keep RULES in code order whatever order the families are imported in.
        ordered = sorted(RULES.items())
        RULES.clear()
        RULES.update(ordered)
        return check

    return register


def validate(
    adapter: Adapter,
    base: Checkpoint | None = None,
    target: str | Sequence[str] = "peft",
    max_rank: int = 16,
) -> ValidationReport:
    """Check an adapter's structure, its fit to a base, and a serving target's restrictions.

    Args:
        adapter: an adapter from ``adapterctl.formats.read`` (broken files raise there).
        base: a base checkpoint from ``adapterctl.checkpoint.open_base`` (a local folder or
            an ``hf://`` model read from its headers); enables the AC2xx rules.
        target: ``peft`` (structure and base rules only), ``vllm`` (adds AC30x) or
            ``llama.cpp`` (adds AC31x), or several of them (each target's rules run).
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
    asked = [target] if isinstance(target, str) else list(dict.fromkeys(target))
    targets = [t for t in asked if t != "peft"] or ["peft"]  # peft: no rules of its own
    for t in asked:
        if t not in SERVING_TARGETS:
            choices = ", ".join(SERVING_TARGETS)
            raise UsageError(f"unknown target {t!r}; choose one of: {choices}")
    if "vllm" in targets and max_rank not in VLLM_MAX_LORA_RANKS:
        allowed = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
        raise UsageError(
            f"--max-rank {max_rank} is not a max_lora_rank vLLM accepts; use one of {allowed}"
        )
    ctx = Context(adapter=adapter, base=base, max_rank=max_rank)
    if base is not None:
        ctx.binding = base.bind(adapter)
    checked: list[str] = []
    findings: list[Finding] = []
    for code, rule in sorted(RULES.items()):
        if not _applies(rule, targets, base is not None):
            continue
        checked.append(code)
        for module, message in _CHECKS[code](ctx):
            findings.append(
                Finding(code=code, severity=rule.severity, module=module, message=message)
            )
    findings.sort(key=lambda f: (f.code, natural_key(f.module or "")))
    return ValidationReport(
        source=str(adapter.path),
        targets=targets,
        base=base.location if base is not None else None,
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
            f"{name} does not fit {base.location}: {first.code}{where}: {first.message}{more}; "
            f"see: adapterctl validate {name} --base {base.location}"
        )
    return report


def _applies(rule: Rule, targets: Sequence[str], has_base: bool) -> bool:
    if rule.needs_base and not has_base:
        return False
    return rule.scope in ("structure", "base") or rule.scope in targets


def skip_reason(rule: Rule, targets: Sequence[str], has_base: bool) -> str:
    """Why ``rule`` was not checked (for JUnit's ``<skipped>``), or "" if it was."""
    if rule.scope in ("vllm", "llama.cpp") and rule.scope not in targets:
        return f"only with --target {rule.scope}"
    if rule.needs_base and not has_base:
        return "only with --base"
    return ""


def rules_markdown() -> str:
    """The rules as a Markdown table (for the README)."""
    lines = ["| code | severity | checks | source |", "|---|---|---|---|"]
    for code, r in sorted(RULES.items()):
        scope = "" if r.scope == "structure" else f" ({r.scope})"
        lines.append(f"| {code} | {r.severity} | {r.description}{scope} | {r.source or ''} |")
    return "\n".join(lines)
