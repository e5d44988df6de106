"""``adapterctl merge``."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from adapterctl.cli import cli
from adapterctl.cli.options import (
    check_weights,
    device_option,
    emit,
    examples,
    force_option,
    json_option,
    method_options,
    register_option,
    weights_option,
)
from adapterctl.errors import UsageError
from adapterctl.nf4 import layout as nf4_layout

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '512MiB' -> 536_870_912."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"cannot read size {text!r}; write e.g. 5GB or 500MB")
    unit = (m.group(2) or "").upper()
    binary = "I" in unit
    letter = unit[:1] if unit[:1] in "KMGT" else ""
    factor = 1024 ** "KMGT".index(letter) * 1024 if (binary and letter) else _UNITS[letter]
    return int(float(m.group(1)) * factor)


@cli.command(
    "merge",
    epilog=examples(
        "adapterctl merge base/tiny-llama adapters/chat-lora -o merged",
        "adapterctl merge base/tiny-llama chat@1 code@1 -w 0.7 -w 0.3 -o merged --verify",
        "adapterctl merge base/tiny-llama chat@1 --quantize nf4 --max-delta-error 1 -o merged-nf4",
    ),
)
@click.argument("base", metavar="BASE")
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True)
@click.option("-o", "--out", required=True, metavar="OUT", help="Output checkpoint folder.")
@weights_option
@click.option(
    "--method", default="linear", show_default=True,
    help="linear (exact Σ wᵢ·ΔWᵢ), or ties, dare_linear, dare_ties, magnitude_prune applied "
    "to each module's dense deltas at full rank (see: adapterctl methods).",
)  # fmt: skip
@method_options
@device_option
@click.option(
    "--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
    show_default=True, help="Output dtype; auto keeps each tensor's (4-bit → compute dtype).",
)  # fmt: skip
@click.option(
    "--quantize", type=click.Choice(nf4_layout.QUANT_TYPES), default=None,
    help="Write linear weights in bitsandbytes 4-bit (reports how much of ΔW survives).",
)  # fmt: skip
@click.option(
    "--quant-method", type=click.Choice(nf4_layout.METHODS), default="optimal",
    show_default=True, help="4-bit block scales: error-minimising search, or plain absmax.",
)  # fmt: skip
@click.option(
    "--max-delta-error", type=float, default=None, metavar="X",
    help="With --quantize: fail (exit 3), writing nothing, if a layer's delta error is above X.",
)  # fmt: skip
@click.option("--max-shard-size", default=None, metavar="SIZE", help="e.g. 5GB: repack shards.")
@click.option(
    "--allow-base-mismatch", is_flag=True,
    help="Merge even if BASE differs from a registry SOURCE's base pin (exit 5 otherwise).",
)  # fmt: skip
@click.option(
    "--hash-base", is_flag=True,
    help="Hash BASE's weight files (cached by path, size and mtime) so a registry SOURCE "
    "pinned to a content digest is compared by content, not only by fingerprint.",
)  # fmt: skip
@register_option
@force_option
@click.option(
    "--fsync", is_flag=True, help="Flush OUT to disk before renaming it into place (slower)."
)
@click.option("--verify", is_flag=True, help="Re-read OUT and check rows against float64 math.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha for bare .safetensors sources.")
@json_option
def merge_command(
    base: str, sources: tuple[str, ...], out: str, weights: tuple[float, ...], method: str,
    density: float | None, majority_sign: str | None, convention: str | None, seed: int | None,
    device: str,
    dtype: str, quantize: str | None, quant_method: str, max_delta_error: float | None,
    max_shard_size: str | None, allow_base_mismatch: bool, hash_base: bool,
    register_as: str | None,
    force: bool, fsync: bool, verify: bool, dry_run: bool, alpha: float | None, as_json: bool,
) -> None:  # fmt: skip
    """Merge one or more adapters into BASE, streaming one tensor at a time, into OUT.

    W' = W + Σ wᵢ·ΔWᵢ computed in float32 and rounded once. A bitsandbytes NF4 BASE is
    dequantised (exactly W_nf4 + ΔW, in the compute dtype) unless --quantize nf4.
    The output is written to a temporary sibling and renamed into place when complete.
    """
    # A merge runs its own workers on every core, one BLAS thread each: OpenBLAS's thread
    # pool would only spin beside them (about 0.1 s of CPU after NumPy loads, more after each
    # call). Read when NumPy loads, which is below; a user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from adapterctl.merge import merge

    with _progress(as_json) as progress:
        report = merge(
            base, list(sources), out, check_weights(weights, sources), dtype=dtype,
            quantize=quantize, quant_method=quant_method,
            max_shard_size=parse_size(max_shard_size) if max_shard_size else None,
            method=method,
            method_options={
                "density": density, "majority_sign": majority_sign, "convention": convention,
                "seed": seed,
            },
            device=device, force=force, verify=verify, max_delta_error=max_delta_error,
            fsync=fsync, dry_run=dry_run, allow_base_mismatch=allow_base_mismatch,
            hash_base=hash_base, alpha=alpha,
            register_as=register_as, progress=progress,
        )  # fmt: skip
    from adapterctl.cli.render import render_merge
    from adapterctl.merge.output import delta_error_alert

    alert = None if as_json else delta_error_alert(report.layers)
    if alert is not None:  # render_merge ends with it, as a WARNING rather than a Warning
        report.warnings.remove(alert)
    emit(report, as_json, render_merge)


class _progress:
    """A rich progress bar on stderr (bytes and tensors) when it is a terminal; a no-op
    otherwise. ``run_merge`` reports once per tensor written."""

    def __init__(self, quiet: bool) -> None:
        self.bar: Any = None
        self.task: Any = None
        self.done = 0
        if not quiet and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )  # fmt: skip

            from adapterctl.cli.render import console

            self.bar = Progress(
                "merging", BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]}"),
                TransferSpeedColumn(), TimeRemainingColumn(), console=console(stderr=True),
                transient=True,
            )  # fmt: skip

    def __enter__(self) -> Callable[[int, int], None] | None:
        if self.bar is None:
            return None
        self.bar.__enter__()
        self.task = self.bar.add_task("merge", total=None, tensors="0 tensors")

        def update(done: int, total: int) -> None:
            assert self.bar is not None
            self.done += 1
            tensors = f"{self.done} tensors"
            self.bar.update(self.task, completed=done, total=total, tensors=tensors)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
