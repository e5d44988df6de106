"""``adapterctl convert``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import emit, examples, force_option, json_option, source_options


@cli.command(
    "convert",
    epilog=examples(
        "adapterctl convert lora.safetensors --alpha 16 --to peft -o lora-peft",
        "adapterctl convert chat@2 --to peft -o chat-v2",
        "adapterctl convert style.safetensors --to kohya -o style-kohya.safetensors",
    ),
)
@click.argument("source", metavar="SOURCE")
@click.option(
    "--to", "to", required=True, metavar="FORMAT",
    help="The writer to use: peft, or one a plugin adds (adapterctl plugins lists them).",
)  # fmt: skip
@click.option("-o", "--out", required=True, metavar="OUT", help="Where to write.")
@force_option
@source_options
@json_option
def convert_command(
    source: str, to: str, out: str, force: bool, alpha: float | None, rank: int | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Write SOURCE in another adapter format, every module's ΔW unchanged."""
    from adapterctl.cli.render import printable
    from adapterctl.convert import convert

    report = convert(source, to, out, force=force, alpha=alpha, rank=rank)

    def render(r: object) -> None:
        click.echo(
            printable(
                f"wrote {report.out}: {report.modules} module(s), {report.source_format} -> "
                f"{report.to}"
            )
        )

    emit(report, as_json, render)
