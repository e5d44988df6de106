"""adapterctl-gguf: LoRA adapters as llama.cpp GGUF adapters (``adapterctl export-gguf``, and
``adapterctl convert --to gguf``), every module's ΔW exact (see ``adapterctl_gguf.export``).

This module is the plugin adapterctl loads (entry point ``adapterctl``): it stays cheap to
import; gguf and NumPy are imported when an export runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterctl.hookspecs import hookimpl

__version__ = "0.1.0"


class GgufWriter:
    """``adapterctl convert SOURCE --to gguf -o OUT.gguf`` (f32; the base from the adapter's
    ``base_model_name_or_path``: use ``export-gguf --base`` to name it, or another type)."""

    name = "gguf"
    description = "llama.cpp GGUF LoRA adapter (f32; export-gguf for --base and other types)"

    def write(self, adapter: Any, out: Path, *, force: bool) -> Path:
        """Export ``adapter`` to ``out`` in float32."""
        from adapterctl_gguf.export import export_gguf

        return Path(export_gguf(adapter, out, force=force).out)


@hookimpl
def register_writers(register: Any) -> None:
    register(GgufWriter())


@hookimpl
def register_commands(cli: Any) -> None:
    from adapterctl.cli.options import examples, json_option

    @cli.command(
        "export-gguf",
        epilog=examples(
            "adapterctl export-gguf out/checkpoint-500 --base base/llama -o chat.gguf",
            "adapterctl export-gguf chat@2 --base hf://org/model --outtype q8_0 -o chat.gguf",
        ),
    )
    @click.argument("source", metavar="SOURCE")
    @click.option("-o", "--out", required=True, metavar="FILE", help="The .gguf file to write.")
    @click.option(
        "--base", default=None, metavar="BASE",
        help="The base model (a folder with config.json, or hf://owner/name); default: the "
        "adapter's base_model_name_or_path where that is a local folder.",
    )  # fmt: skip
    @click.option(
        "--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32",
        show_default=True, help="The tensors' type (q8_0: rows of whole 32-value blocks; "
        "others are written as f16).",
    )  # fmt: skip
    @click.option("--force", is_flag=True, help="Replace FILE if it exists.")
    @click.option("--alpha", type=float, default=None, help="LoRA alpha of a bare .safetensors.")
    @json_option
    def export_gguf_command(
        source: str, out: str, base: str | None, outtype: str, force: bool,
        alpha: float | None, as_json: bool,
    ) -> None:  # fmt: skip
        """Write SOURCE as a llama.cpp GGUF LoRA adapter (llama-cli --lora FILE).

        Every module's ΔW is exact: rsLoRA, alpha_pattern and per-module ranks are folded
        into lora_b so that the file's one alpha reproduces each module's scale. DoRA, lora
        biases and full tensors are refused (exit 3): merge those instead.
        """
        from adapterctl.cli.options import emit
        from adapterctl.cli.render import printable
        from adapterctl_gguf.export import export_gguf

        report = export_gguf(source, out, base=base, outtype=outtype, force=force, alpha=alpha)

        def render(r: Any) -> None:
            click.echo(
                printable(
                    f"wrote {r.out}: {r.architecture} LoRA adapter, {r.tensors} tensors "
                    f"({r.outtype}), alpha {r.alpha:g}"
                )
            )
            if r.folded:
                click.echo(printable(f"scale folded into lora_b: {len(r.folded)} module(s)"))
            if r.as_f16:
                click.echo(
                    printable(f"written as f16 (rows not in 32-value blocks): {len(r.as_f16)}")
                )

        emit(report, as_json, render)
