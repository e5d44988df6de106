"""The Hub commands: ``push`` and ``pull``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import examples, json_option
from adapterctl.cli.render import json_text

_TOKEN_HELP = (
    "A Hugging Face token (default: HF_TOKEN, or the token file `hf auth login` writes); "
    "never printed."
)


@cli.command(
    "push",
    epilog=examples(
        "adapterctl push chat@1 my-org/chat-lora",
        "adapterctl push chat@prod my-org/chat-lora --private",
    ),
)
@click.argument("ref")
@click.argument("repo", metavar="OWNER/NAME")
@click.option("--private", is_flag=True, help="Create the repository private (if it is new).")
@click.option(
    "--revision",
    "--branch",
    "branch",
    default="main",
    show_default=True,
    metavar="BRANCH",
    help="The branch to commit to.",
)
@click.option(
    "--base-id",
    metavar="OWNER/MODEL",
    default=None,
    help="The base model's Hub id, when the version's pin knows its base only by a local path.",
)
@click.option("--token", default=None, metavar="TOKEN", help=_TOKEN_HELP)
@json_option
def push_command(
    ref: str,
    repo: str,
    private: bool,
    branch: str,
    base_id: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Publish registry version REF to the Hub repository OWNER/NAME as one commit, tagged
    v<N> (N: the next number among the repository's tags), with a model card and
    adapterctl.json; pushing the same version again changes nothing."""
    from adapterctl.hub import push

    report = push(ref, repo, private=private, branch=branch, base_id=base_id, token=token)
    if as_json:
        click.echo(json_text(report.model_dump_json(indent=2)))
    elif report.already:
        click.echo(
            f"{report.version} is already at {report.url} as {report.tag} ({report.commit[:12]})"
        )
    else:
        click.echo(
            f"pushed {report.version} to {report.url} as {report.tag} "
            f"(commit {report.commit[:12]}, {len(report.files)} file(s) + README.md)"
        )


@cli.command(
    "pull",
    epilog=examples(
        "adapterctl pull my-org/chat-lora",
        "adapterctl pull my-org/chat-lora@v2 --name chat",
    ),
)
@click.argument("source", metavar="OWNER/NAME[@REV]")
@click.option("--name", default=None, metavar="NAME", help="Registry name (default: the repo's).")
@click.option("--token", default=None, metavar="TOKEN", help=_TOKEN_HELP)
@json_option
def pull_command(source: str, name: str | None, token: str | None, as_json: bool) -> None:
    """Download a Hub adapter (REV: a branch, tag or commit; default main), check every file
    against the Hub's hashes, and add it to the registry with its origin and base pin;
    pulling the same commit again changes nothing."""
    from adapterctl.cli.options import warn
    from adapterctl.hub import pull

    report = pull(source, name=name, token=token)
    if as_json:
        click.echo(json_text(report.model_dump_json(indent=2)))
        return
    for w in report.warnings:
        warn(w)
    where = f"hf://{report.repo}@{report.commit[:12]}"
    if report.already:
        click.echo(f"{where} is already {report.version}")
    else:
        click.echo(
            f"pulled {where} as {report.version} ({len(report.files)} file(s), "
            f"base pin: {report.pin})"
        )
