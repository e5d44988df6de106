"""Human-readable rendering of reports (plain lines and tables on stdout), and the one
place where text from files (tensor and module names, config strings) is made safe to print.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterctl.introspect import InspectReport

# C0 controls, DEL, C1 controls, and the bidirectional overrides and isolates: printed raw, a
# name holding them drives the terminal (``\x1b]0;…\x07`` sets its title) or reorders the
# text around it.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# The same in serialized JSON, where C0 controls are already escaped and newlines between
# values are layout.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters and bidirectional overrides written
    as Python escapes (``\\x1b``, ``\\u202e``), everything else as is.

    Every line the CLI prints goes through here (reports, warnings, errors) or through
    ``json_text``.
    """
    return _UNSAFE.sub(_escape_char, str(text))


def json_text(text: str) -> str:
    """Serialized JSON with the characters ``printable`` escapes written as ``\\u…`` escapes
    (pydantic writes C1 controls and bidirectional overrides raw); the same JSON value."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def print_table(headers: list[str], rows: list[list[str]], align: str) -> None:
    """Plain columns, two spaces apart, sized to their widest cell; ``align`` holds one
    ``l``/``r`` per column. Cells must already be ``printable``. (A rich table costs about a
    millisecond a row: a minute for 100k modules.)"""
    import click

    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for cells in [headers, *rows]:
        padded = (
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        )
        lines.append("  ".join(padded).rstrip())
    click.echo("\n".join(lines))


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
        out.print(f"{k:<{width}}  {printable(v)}", markup=False)
    spectrum = any(m.spectrum is not None for m in r.modules)
    headers = ["module", "shape", "r", "scale", "‖ΔW‖_F", "stable rank"]
    headers += ["singular values"] if spectrum else []
    table: list[list[str]] = []
    for m in r.modules:
        flags = ("  [zero A]" if m.zero_a else "") + ("  [zero B]" if m.zero_b else "")
        flags += "  [NaN/Inf]" if m.nonfinite else ""
        flags += "  [overflows float32]" if m.overflow else ""
        flags += "  [DoRA]" if m.dora else ""
        flags += f"  [config r={m.config_rank}]" if m.config_rank is not None else ""
        row = [
            printable(m.name) + flags,
            "×".join(map(str, m.shape)),
            str(m.rank),
            _num(m.scale, "g"),
            _num(m.norm),
            _num(m.stable_rank, ".2f"),
        ]
        if spectrum:
            row.append(" ".join(_num(s, ".3g") for s in (m.spectrum or [])))
        table.append(row)
    out.print()
    print_table(headers, table, "lrrrrr" + "l" * spectrum)
    if r.zero_update_modules:
        out.print()
        out.print(
            f"{len(r.zero_update_modules)} module(s) have a zero LoRA factor (no update): "
            + printable(", ".join(r.zero_update_modules)),
            markup=False,
        )
    if r.nonfinite_modules:
        out.print(f"{len(r.nonfinite_modules)} module(s) hold NaN or Inf.")
    if r.overflow_modules:
        out.print(
            f"{len(r.overflow_modules)} module(s) have an update scale·B·A that can exceed "
            "float32's range (±3.4e38): merging them would write inf; check lora_alpha and the "
            "factors.",
            markup=False,
        )


def render_merge(r: Any) -> None:
    """Summary of a merge (or of its plan, with --dry-run): plain lines, so that a merge never
    pays for importing rich."""
    out = _lines()
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
    if r.rounding:
        out(f"rounding: {r.rounding}")
    if r.quantize:
        err = "-" if r.delta_error is None else f"{r.delta_error:.3f}"
        out(f"{r.quantize} delta error (‖Q(W+ΔW) − W − ΔW‖/‖ΔW‖): {err}")
        worst = sorted(r.layers, key=lambda x: -x.delta_error)[:5]
        for layer in worst:
            out(f"  {layer.name}: {layer.delta_error:.3f}")
        from adapterctl.merge.output import delta_error_alert

        alert = delta_error_alert(r.layers)
        if alert is not None:
            out(f"WARNING: {alert}", err=True)
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
    out = _lines()
    opts = ", ".join(f"{k}={v}" for k, v in r.options.items() if v is not None)
    weights = ", ".join(_num(w, "g") for w in r.weights)
    out(f"wrote {r.out}: {len(r.modules)} module(s), rank {_ranks(r.ranks)}")
    out(f"method {r.method}" + (f" ({opts})" if opts else "") + f", weights {weights}")
    kept = "exact (Σ wᵢ·ΔWᵢ, factors concatenated)" if r.exact else _pct(r.energy_kept)
    out(f"energy kept: {kept}; device {r.device}, {r.seconds:.2f} s")
    if r.carried:
        out("carried: " + ", ".join(r.carried))
    if r.exact:
        return
    rows = [
        [printable(m.name), str(m.inputs), str(m.rank), _num(m.norm), _pct(m.energy_kept)]
        for m in r.modules
    ]
    out("")
    print_table(["module", "inputs", "rank", "‖ΔW‖_F", "energy kept"], rows, "lrrrr")


def _lines() -> Any:
    """A function printing one line on stdout, made ``printable`` (no rich: plain text)."""
    import click

    def out(line: str, err: bool = False) -> None:
        click.echo(printable(line), err=err)

    return out


def _ranks(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{min(ranks)}–{max(ranks)} (rank_pattern)"


def render_resize(r: Any) -> None:
    """Summary of a resize: ranks before and after, energy kept per module."""
    out = _lines()
    out(
        f"wrote {r.out}: rank {_ranks(r.ranks)}, energy kept {_pct(r.energy_kept)}, "
        f"{r.parameters_after:,} parameters (was {r.parameters_before:,})"
    )
    rows = [
        [printable(m.name), str(m.rank_before), str(m.rank), _num(m.norm), _pct(m.energy_kept)]
        for m in r.modules
    ]
    out("")
    print_table(["module", "r before", "r", "‖ΔW‖_F", "energy kept"], rows, "lrrrr")


def render_diff(r: Any) -> None:
    """Config differences, the per-module comparison, and the one-line verdict last."""
    out = _lines()
    out(f"A  {r.a}")
    out(f"B  {r.b}")
    if r.config:
        out("")
        width = max(len(c.field) for c in r.config)
        for c in r.config:
            out(f"{c.field:<{width}}  {c.a!s}  →  {c.b!s}")
    if r.modules:
        rows = [
            [
                printable(m.name),
                _num(m.norm_a),
                _num(m.norm_b),
                "-" if m.relative_difference is None else f"{m.relative_difference:.3g}",
                "-" if m.cosine is None else f"{m.cosine:.4f}",
                "-" if m.subspace_overlap is None else f"{m.subspace_overlap:.3f}",
            ]
            for m in r.modules
        ]
        out("")
        headers = ["module", "‖ΔW_A‖", "‖ΔW_B‖", "‖A−B‖/‖A‖", "cosine", "subspace overlap"]
        print_table(headers, rows, "lrrrrr")
    for side, names in (("A", r.only_in_a), ("B", r.only_in_b)):
        if names:
            out("")
            out(f"only in {side} ({len(names)}): " + ", ".join(names))
    out("")
    worst = "-" if r.max_relative_difference is None else f"{r.max_relative_difference:.3g}"
    if r.verdict == "identical":
        out(f"identical (max relative difference {worst} ≤ tol {r.tol:g})")
        return
    top = ", ".join(r.most_different[:5]) + (" …" if len(r.most_different) > 5 else "")
    out(
        f"different: {len(r.most_different)} module(s) beyond tol {r.tol:g} "
        f"(max relative difference {worst}); most different: {top}"
    )


def render_methods(infos: list[Any]) -> None:
    """Each method: name, what it computes, its options and its reference."""
    out = _lines()
    for i, m in enumerate(infos):
        if i:
            out("")
        out(f"{m.name}: {m.description}")
        out(f"  reference: {m.reference}")
        for o in m.options:
            kind = "|".join(map(str, o.choices)) if o.choices else o.type
            need = "required" if o.required else f"default {o.default}"
            flag = "--" + o.name.replace("_", "-")
            out(f"  {flag} {kind} ({need}): {o.description}")
