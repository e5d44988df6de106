"""The adapter configuration: every field PEFT has ever written, unknown ones kept.

PEFT's ``adapter_config.json`` grew from 13 keys (0.2) to about 40 (0.21). ``AdapterConfig``
types the fields adapterctl reads and keeps every other key untouched, so a config read and
written back keeps every key with its value (an older config gains the typed fields'
defaults, which mean what PEFT assumes when they are missing).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from adapterctl.patterns import PatternKeys

# PEFT types that are not LoRA: recognised so we can refuse them by name.
NON_LORA_TYPES = {
    "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT",
    "IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "FOURIERFT", "HRA", "LN_TUNING", "POLY",
    "XLORA", "VBLORA", "CPT", "BONE", "MISS", "RANDLORA", "SHIRA", "C3A", "ROAD", "WAVEFT",
    "DELORA", "OSF", "GRALORA", "TRAINABLE_TOKENS",
}  # fmt: skip

# init_lora_weights values that rewrite the base weights at initialisation: such an adapter only
# makes sense together with the modified base PEFT saved next to it.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva_rewrite")


class AdapterConfig(BaseModel):
    """A PEFT LoRA config. Typed where adapterctl uses a field; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: int | float = 8  # int stays int, so a config written back is the same JSON
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = Field(default_factory=dict)
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_version: str | None = None
    task_type: str | None = None
    init_lora_weights: bool | str = True
    layer_replication: list[Any] | None = None
    layers_to_transform: list[int] | int | None = None
    # rank_pattern/alpha_pattern compiled for matching, with the dict each was built from.
    _patterns: dict[str, tuple[dict[str, Any], int, PatternKeys]] = PrivateAttr(
        default_factory=dict
    )

    @field_validator("peft_type", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return str(getattr(v, "value", v)).upper() if v is not None else "LORA"

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return v or {}

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, v: int) -> int:
        if v < 1:
            raise ValueError("a rank must be at least 1")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, v: dict[str, int]) -> dict[str, int]:
        for key, r in v.items():
            if r < 1:
                raise ValueError(f"rank for {key!r} must be at least 1")
        return v

    @field_validator("lora_alpha")
    @classmethod
    def _finite_alpha(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("alpha must be a finite number")
        return v

    @field_validator("alpha_pattern")
    @classmethod
    def _finite_alphas(cls, v: dict[str, float]) -> dict[str, float]:
        for key, a in v.items():
            if not math.isfinite(a):
                raise ValueError(f"alpha for {key!r} must be a finite number")
        return v

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init(cls, v: Any) -> Any:
        return True if v is None else v

    @property
    def is_lora(self) -> bool:
        return self.peft_type == "LORA"

    @property
    def scaling_rule(self) -> str:
        """'alpha/sqrt(r)' for rsLoRA, 'alpha/r' otherwise."""
        return "alpha/sqrt(r)" if self.use_rslora else "alpha/r"

    @property
    def rewrites_base(self) -> str | None:
        """The init method's name if it rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ)."""
        init = self.init_lora_weights
        if isinstance(init, str):
            low = init.lower()
            for name in BASE_REWRITING_INITS:
                if low.startswith(name):
                    return init
        extra = self.model_extra or {}
        if extra.get("loftq_config"):
            return "loftq"
        return None

    def patterns(self, field: Literal["rank_pattern", "alpha_pattern"]) -> PatternKeys:
        """The keys of ``rank_pattern`` or ``alpha_pattern``, compiled once for matching.

        Raises:
            UnsupportedAdapter: a key PEFT's regex matching could hang on, or one adapterctl
                cannot match (see ``adapterctl.patterns``).
        """
        source: dict[str, Any] = getattr(self, field)
        cached = self._patterns.get(field)
        if cached is None or cached[0] is not source or cached[1] != len(source):
            cached = (source, len(source), PatternKeys(source, field))
            self._patterns[field] = cached
        return cached[2]

    def rank_for(self, module: str) -> int:
        """The configured rank of ``module`` (its full dotted name), as PEFT resolves it."""
        if not self.rank_pattern:
            return self.r
        key = self.patterns("rank_pattern").first(module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """The configured alpha of ``module``, as PEFT resolves it."""
        if not self.alpha_pattern:
            return float(self.lora_alpha)
        key = self.patterns("alpha_pattern").first(module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale_for(self, module: str) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA, for ``module``."""
        r = self.rank_for(module)
        a = self.alpha_for(module)
        return a / math.sqrt(r) if self.use_rslora else a / r

    def pattern_overlaps(self, modules: list[str]) -> list[str]:
        """Warnings for modules that several ``rank_pattern``/``alpha_pattern`` keys match with
        different values.

        The first matching key wins, in the file's order, as PEFT applies a loaded config. But
        PEFT writes ``adapter_config.json`` with sorted keys, so the model it trained may have
        used another key's value: such an adapter's scale is ambiguous.
        """
        out: list[str] = []
        fields: tuple[Literal["rank_pattern", "alpha_pattern"], ...] = (
            "rank_pattern",
            "alpha_pattern",
        )
        for field in fields:
            patterns: dict[str, Any] = getattr(self, field)
            if len(patterns) < 2:
                continue
            keys_of = self.patterns(field)
            seen: set[tuple[str, ...]] = set()
            for module in modules:
                keys = keys_of.all(module)
                if len(keys) < 2 or len({patterns[k] for k in keys}) < 2 or tuple(keys) in seen:
                    continue
                seen.add(tuple(keys))
                names = " and ".join(repr(k) for k in keys)
                out.append(
                    f"{field} keys {names} all match {module} with different values; "
                    f"applying the first, {keys[0]!r} = {patterns[keys[0]]}, as PEFT does on "
                    "loading, but PEFT saves these keys sorted, so training may have used "
                    "another; make the keys disjoint"
                )
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, unknown keys included."""
        return self.model_dump(mode="json", by_alias=True)


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` the way PEFT matches them.

    A key matches when the module name ends with it at a dot boundary; keys may be regular
    expressions (``layers\\.[0-3]\\.q_proj``). Dict order decides ties, as in PEFT. For many
    modules, build one ``PatternKeys`` (``AdapterConfig.patterns`` keeps one per field).
    """
    return PatternKeys(patterns).first(module)


def matching_keys(patterns: dict[str, Any], module: str) -> list[str]:
    """Every key of ``patterns`` that matches ``module`` (PEFT's rule), in dict order."""
    return PatternKeys(patterns).all(module)
