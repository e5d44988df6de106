"""The model cards a push writes: what the Hub indexes (YAML metadata) and what a reader needs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def adapter_card(
    *,
    repo: str,
    base_id: str,
    base_revision: str | None,
    config: Mapping[str, Any],
    tag: str,
    digest: str,
    source: str,
    lineage: Sequence[tuple[str, float | None]] = (),
    method: str | None = None,
) -> str:
    """A LoRA adapter's ``README.md``: metadata ``base_model``, ``base_model_relation:
    adapter``, ``library_name: peft``, tags (``lora``…); a body with its rank, targets and
    scaling, how to load it with PEFT, its lineage when composed, and its digest.

    Args:
        repo: ``owner/name`` it is published to.
        base_id: the base model's Hub id.
        base_revision: the base commit it was trained on, when known.
        config: the published ``adapter_config.json``.
        tag: the Hub tag of this version (``v3``).
        digest: the published version's digest.
        source: the registry version it was pushed from (``chat@3``).
        lineage: (parent reference, weight) of a composed or merged version.
        method: how the parents were combined.
    """
    tags = ["lora", "peft", "adapterctl"]
    if config.get("use_dora"):
        tags.append("dora")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = ", ".join(f"`{t}`" for t in sorted(targets))
    elif targets:
        targets = f"`{targets}`"
    scaling = "α/√r (rsLoRA)" if config.get("use_rslora") else "α/r"
    revision = f', revision="{base_revision}"' if base_revision else ""
    lines = [
        f"# {repo.split('/')[-1]}",
        "",
        f"A LoRA adapter for `{base_id}`"
        + (f" (base commit `{base_revision}`)" if base_revision else "")
        + f", published from `{source}` as `{tag}`.",
        "",
        "| | |",
        "|---|---|",
        f"| rank | {config.get('r')} |",
        f"| alpha | {config.get('lora_alpha')} (scaling {scaling}) |",
        f"| target modules | {targets or '-'} |",
        f"| DoRA | {'yes' if config.get('use_dora') else 'no'} |",
        f"| digest | `{digest}` |",
        "",
        "## Use it",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}"{revision})',
        f'model = PeftModel.from_pretrained(base, "{repo}", revision="{tag}")',
        "```",
        "",
        "or with adapterctl: `adapterctl pull " + f"{repo}@{tag}`.",
    ]
    if lineage:
        lines += ["", "## Lineage", "", f"Combined by `{method or '?'}` from:", ""]
        lines += [f"- `{ref}`" + ("" if w is None else f" × {w:g}") for ref, w in lineage]
    return (
        _front_matter(
            base_model=base_id, base_model_relation="adapter", library_name="peft", tags=tags
        )
        + "\n".join(lines)
        + "\n"
    )


def model_card(
    *,
    repo: str,
    base_id: str | None,
    tag: str,
    digest: str,
    source: str,
    lineage: Sequence[tuple[str, float | None]] = (),
    method: str | None = None,
) -> str:
    """A merged full model's ``README.md``: ``base_model`` with ``base_model_relation: merge``
    (the adapters are in its weights), how to load it with transformers, its lineage."""
    lines = [
        f"# {repo.split('/')[-1]}",
        "",
        (f"`{base_id}` with LoRA adapters merged into its weights" if base_id else "A model")
        + f", published from `{source}` as `{tag}` (digest `{digest}`).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}", revision="{tag}")',
        "```",
    ]
    lines += _lineage("Merged", lineage, method)
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["adapterctl", "merge"]}
    if base_id:
        meta.update(base_model=base_id, base_model_relation="merge")
    return _front_matter(**meta) + "\n".join(lines) + "\n"


def _lineage(
    verb: str, lineage: Sequence[tuple[str, float | None]], method: str | None
) -> list[str]:
    """The card's lineage section (none for an adapter trained, not combined)."""
    if not lineage:
        return []
    lines = ["", "## Lineage", "", f"{verb} by `{method or '?'}` from:", ""]
    return lines + [f"- `{ref}`" + ("" if w is None else f" × {w:g}") for ref, w in lineage]


def _front_matter(**meta: Any) -> str:
    """The YAML block the Hub reads, written by the client's own card model."""
    from huggingface_hub import ModelCardData

    return "---\n" + ModelCardData(**meta).to_yaml() + "\n---\n\n"
