"""Composition methods: small objects with a name, a reference, typed options and a dense
per-module combine. Built-in and third-party methods register through the same hook,
``register_methods(register)`` (see ``adapterctl.hookspecs``).

A method is anything with the attributes and the method of ``Method``. ``compose`` uses
``factored`` methods (ΔW = Σ wᵢ·ΔWᵢ) on the low-rank factors directly; every other method is
applied to the dense per-module deltas through ``combine_dense``, which the streaming merge
(``merge --method``) calls too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterctl.errors import NotFound, UsageError

if TYPE_CHECKING:
    import torch


class MethodOptions(BaseModel):
    """Options of a method. Unknown options are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method(Protocol):
    """What a composition method provides.

    Attributes:
        name: the ``--method`` value.
        description: one line for ``adapterctl methods``.
        reference: a URL for the method's definition (paper or reference code).
        options_model: the pydantic model of its options.
        factored: True if the method is the weighted sum Σ wᵢ·ΔWᵢ, which ``compose`` computes
            on the factors exactly (concatenation) or truncated by the small-core SVD.
        truncates: True if ``compose`` always compresses the result to a rank (``--rank``,
            by default the largest input rank); False if that happens only with ``--rank``.
    """

    name: str
    description: str
    reference: str
    options_model: type[MethodOptions]
    factored: bool
    truncates: bool

    def combine_dense(
        self,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float],
        options: MethodOptions,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Combine the dense updates of one module.

        Args:
            deltas: each input's ΔWᵢ = scaleᵢ·Bᵢ·Aᵢ for this module, all of one shape and on
                one device, in float32 (an input without the module passes zeros).
            weights: one weight per delta (negative weights negate a task).
            options: an instance of ``options_model``.
            generator: the random source of stochastic methods (DARE's drop masks), or None
                for a fresh unseeded one. Masks are drawn on the generator's device and moved
                to the deltas', so a CPU generator gives the same result on every device.

        Returns:
            The combined ΔW, float32, on the deltas' device, in their shape.
        """
        ...


def methods() -> list[Method]:
    """Every registered method, plugins' first, then the built-ins (``plugins.collect``)."""
    from adapterctl.plugins import collect

    return collect("register_methods")


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        NotFound: no such method.
    """
    found = {m.name: m for m in methods()}
    if name not in found:
        raise NotFound(
            f"no composition method {name!r}; choose one of: {', '.join(found)} "
            "(see: adapterctl methods)"
        )
    return found[name]


def parse_options(
    method: Method, values: Mapping[str, Any] | MethodOptions | None
) -> MethodOptions:
    """Validate ``values`` against ``method.options_model``.

    Raises:
        UsageError: an option the method does not take, a missing one, or a bad value.
    """
    if isinstance(values, method.options_model):
        return values
    if isinstance(values, MethodOptions):
        values = values.model_dump()
    given = {k: v for k, v in (values or {}).items() if v is not None}
    try:
        return method.options_model.model_validate(given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "options"
        flag = "--" + field.replace("_", "-")
        if err["type"] == "extra_forbidden":
            raise UsageError(
                f"method {method.name} does not take {flag}; see its options with: "
                "adapterctl methods"
            ) from None
        if err["type"] == "missing":
            raise UsageError(f"method {method.name} needs {flag}; e.g. {flag} 0.5") from None
        raise UsageError(
            f"{flag} {given.get(field)!r}: {err['msg']}; see: adapterctl methods"
        ) from None


class OptionInfo(BaseModel):
    """One option of a method, for ``adapterctl methods``."""

    name: str
    type: str
    required: bool
    default: Any = None
    choices: list[Any] | None = None
    description: str = ""


class MethodInfo(BaseModel):
    """A method as ``adapterctl methods --json`` lists it."""

    name: str
    description: str
    reference: str
    factored: bool
    truncates: bool
    options: list[OptionInfo] = Field(default_factory=list)


def describe(method: Method) -> MethodInfo:
    """A method's name, reference and options (from its pydantic model) as data."""
    schema = method.options_model.model_json_schema()
    required = set(schema.get("required", []))
    options: list[OptionInfo] = []
    for name, prop in schema.get("properties", {}).items():
        kinds = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
        kind = kinds[0] if kinds else {}
        options.append(
            OptionInfo(
                name=name,
                type=str(kind.get("type", "string")),
                required=name in required,
                default=prop.get("default"),
                choices=kind.get("enum"),
                description=prop.get("description", ""),
            )
        )
    return MethodInfo(
        name=method.name,
        description=method.description,
        reference=method.reference,
        factored=method.factored,
        truncates=method.truncates,
        options=options,
    )


def module_seed(seed: int, name: str) -> int:
    """A per-module seed, so a module's random masks do not depend on which others exist."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
