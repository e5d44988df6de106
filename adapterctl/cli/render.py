"""Human-readable rendering of reports (rich tables on stdout)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterctl.introspect import InspectReport


def console(stderr: bool = False) -> Any:
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal, never truncate module names: tables size to their content.
    width = None if stream.isatty() else 400
    return Console(file=stream, highlight=False, soft_wrap=True, width=width)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "nan/inf" if x is None else format(x, fmt)


def render_inspect(r: InspectReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    out = console()
    alphas = ", ".join(_num(a, "g") for a in r.alphas)
    rows = [
        ("source", f"{r.source} ({r.format})"),
        ("digest", r.digest),
        ("type", f"{r.peft_type}" + (" + DoRA" if r.use_dora else "")),
        ("base model", f"{r.base_model or '-'}" + (f" @ {r.revision}" if r.revision else "")),
        ("peft version", r.peft_version or "-"),
        ("rank", ", ".join(map(str, r.ranks)) or "-"),
        ("alpha", alphas or "-"),
        ("scaling", r.scaling_rule),
        ("targets", ", ".join(r.targets) or "-"),
        ("modules", str(len(r.modules))),
        ("dtype", ", ".join(r.dtypes)),
        ("size", human_bytes(r.file_size)),
        ("trainable params", f"{r.trainable_parameters:,}"),
        ("‖ΔW‖_F total", _num(r.total_norm)),
    ]
    if r.modules_to_save:
        rows.append(("modules_to_save", ", ".join(r.modules_to_save)))
    if r.trained_biases:
        rows.append(("trained biases", str(len(r.trained_biases))))
    if r.saved_base_layers:
        rows.append(("saved base layers", ", ".join(r.saved_base_layers)))
    if r.base:
        rows.append(("base", f"{r.base.path} ({r.base.architecture or '?'})"))
        rows.append(("base fingerprint", r.base.fingerprint))
        rows.append(("base matches", f"{r.base.matched_modules} of {len(r.modules)} modules"))
        if r.base.quantization:
            rows.append(("base quantization", r.base.quantization))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.print(f"{k:<{width}}  {v}", markup=False)
    spectrum = any(m.spectrum is not None for m in r.modules)
    table = Table(show_edge=False, pad_edge=False, box=None)
    for col in ("module", "shape", "r", "scale", "‖ΔW‖_F", "stable rank"):
        table.add_column(col, justify="left" if col == "module" else "right")
    if spectrum:
        table.add_column("singular values", justify="left")
    for m in r.modules:
        flags = ("  [zero A]" if m.zero_a else "") + ("  [zero B]" if m.zero_b else "")
        flags += "  [NaN/Inf]" if m.nonfinite else ""
        flags += "  [DoRA]" if m.dora else ""
        flags += f"  [config r={m.config_rank}]" if m.config_rank is not None else ""
        row = [
            escape(m.name + flags),  # "[zero B]" is not rich markup
            "×".join(map(str, m.shape)),
            str(m.rank),
            _num(m.scale, "g"),
            _num(m.norm),
            _num(m.stable_rank, ".2f"),
        ]
        if spectrum:
            row.append(" ".join(_num(s, ".3g") for s in (m.spectrum or [])))
        table.add_row(*row)
    out.print()
    out.print(table)
    if r.zero_update_modules:
        out.print(
            f"\n{len(r.zero_update_modules)} module(s) have a zero LoRA factor (no update): "
            + ", ".join(r.zero_update_modules),
            markup=False,
        )
    if r.nonfinite_modules:
        out.print(f"{len(r.nonfinite_modules)} module(s) hold NaN or Inf.")


def render_merge(r: Any) -> None:
    """Summary of a merge (or of its plan, with --dry-run): plain lines, so that a merge never
    pays for importing rich."""
    import click

    out = click.echo
    verb = "would write" if r.dry_run else "wrote"
    out(f"{verb} {r.out}: {len(r.shards)} shard(s), {human_bytes(r.bytes_written)}")
    out(
        f"tensors: {len(r.tensors_merged)} merged, {len(r.tensors_replaced)} replaced, "
        f"{len(r.tensors_added)} added, {r.tensors_copied} copied as bytes "
        f"(of {r.tensors_total})"
    )
    out(
        f"read {human_bytes(r.bytes_read)}; peak tensor memory ≈ "
        f"{human_bytes(r.peak_memory_estimate)}"
    )
    for line in r.base_pin_checks:
        out(line)
    if r.dry_run:
        for name in r.tensors_merged:
            out(f"  merge    {name}")
        for name in r.tensors_replaced:
            out(f"  replace  {name}")
        for name in r.tensors_added:
            out(f"  add      {name}")
        return
    kernel = f", {r.kernel} kernel" if r.kernel else ""
    engine = f" ({r.engine} engine{kernel})" if r.engine else ""
    out(f"device {r.device}{engine}, {r.seconds:.2f} s")
    if r.quantize:
        err = "-" if r.delta_error is None else f"{r.delta_error:.3f}"
        out(f"{r.quantize} delta error (‖Q(W+ΔW) − W − ΔW‖/‖ΔW‖): {err}")
        worst = sorted(r.layers, key=lambda x: -x.delta_error)[:5]
        for layer in worst:
            out(f"  {layer.name}: {layer.delta_error:.3f}")
    if r.verified is not None:
        out(f"verified {r.verified} rows against float64 math")
    if r.registered:
        out(f"registered as {r.registered}")
    if r.published:
        out(f"published as {r.published}")


def _pct(x: float) -> str:
    return "100%" if x >= 1.0 else f"{100 * x:.2f}%"


def render_compose(r: Any) -> None:
    """Summary of a composition: what was written and how much of ΔW it keeps."""
    from rich.table import Table

    out = console()
    opts = ", ".join(f"{k}={v}" for k, v in r.options.items() if v is not None)
    weights = ", ".join(_num(w, "g") for w in r.weights)
    out.print(f"wrote {r.out}: {len(r.modules)} module(s), rank {_ranks(r.ranks)}", markup=False)
    out.print(f"method {r.method}" + (f" ({opts})" if opts else "") + f", weights {weights}",
              markup=False)  # fmt: skip
    kept = "exact (Σ wᵢ·ΔWᵢ, factors concatenated)" if r.exact else _pct(r.energy_kept)
    out.print(f"energy kept: {kept}; device {r.device}, {r.seconds:.2f} s", markup=False)
    if r.carried:
        out.print("carried: " + ", ".join(r.carried), markup=False)
    if r.exact:
        return
    table = Table(show_edge=False, pad_edge=False, box=None)
    for col in ("module", "inputs", "rank", "‖ΔW‖_F", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in r.modules:
        table.add_row(m.name, str(m.inputs), str(m.rank), _num(m.norm), _pct(m.energy_kept))
    out.print()
    out.print(table)


def _ranks(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{min(ranks)}–{max(ranks)} (rank_pattern)"


def render_resize(r: Any) -> None:
    """Summary of a resize: ranks before and after, energy kept per module."""
    from rich.table import Table

    out = console()
    out.print(
        f"wrote {r.out}: rank {_ranks(r.ranks)}, energy kept {_pct(r.energy_kept)}, "
        f"{r.parameters_after:,} parameters (was {r.parameters_before:,})",
        markup=False,
    )
    table = Table(show_edge=False, pad_edge=False, box=None)
    for col in ("module", "r before", "r", "‖ΔW‖_F", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in r.modules:
        table.add_row(m.name, str(m.rank_before), str(m.rank), _num(m.norm), _pct(m.energy_kept))
    out.print()
    out.print(table)


def render_diff(r: Any) -> None:
    """Config differences, the per-module comparison, and the one-line verdict last."""
    from rich.table import Table

    out = console()
    out.print(f"A  {r.a}\nB  {r.b}", markup=False)
    if r.config:
        out.print()
        width = max(len(c.field) for c in r.config)
        for c in r.config:
            out.print(f"{c.field:<{width}}  {c.a!s}  →  {c.b!s}", markup=False)
    if r.modules:
        table = Table(show_edge=False, pad_edge=False, box=None)
        for col in ("module", "‖ΔW_A‖", "‖ΔW_B‖", "‖A−B‖/‖A‖", "cosine", "subspace overlap"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for m in r.modules:
            table.add_row(
                m.name, _num(m.norm_a), _num(m.norm_b),
                "-" if m.relative_difference is None else f"{m.relative_difference:.3g}",
                "-" if m.cosine is None else f"{m.cosine:.4f}",
                "-" if m.subspace_overlap is None else f"{m.subspace_overlap:.3f}",
            )  # fmt: skip
        out.print()
        out.print(table)
    for side, names in (("A", r.only_in_a), ("B", r.only_in_b)):
        if names:
            out.print(f"\nonly in {side} ({len(names)}): " + ", ".join(names), markup=False)
    out.print()
    worst = "-" if r.max_relative_difference is None else f"{r.max_relative_difference:.3g}"
    if r.verdict == "identical":
        out.print(f"identical (max relative difference {worst} ≤ tol {r.tol:g})", markup=False)
        return
    top = ", ".join(r.most_different[:5]) + (" …" if len(r.most_different) > 5 else "")
    out.print(
        f"different: {len(r.most_different)} module(s) beyond tol {r.tol:g} "
        f"(max relative difference {worst}); most different: {top}",
        markup=False,
    )


def render_methods(infos: list[Any]) -> None:
    """Each method: name, what it computes, its options and its reference."""
    out = console()
    for i, m in enumerate(infos):
        if i:
            out.print()
        out.print(f"{m.name}: {m.description}", markup=False)
        out.print(f"  reference: {m.reference}", markup=False)
        for o in m.options:
            kind = "|".join(map(str, o.choices)) if o.choices else o.type
            need = "required" if o.required else f"default {o.default}"
            flag = "--" + o.name.replace("_", "-")
            out.print(f"  {flag} {kind} ({need}): {o.description}", markup=False)
