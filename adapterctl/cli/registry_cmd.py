"""The registry commands: ``add``, ``list``, ``show``, ``log``, ``tag``, ``rm``, ``export`` and
the ``registry`` group (``verify``, ``gc``, ``path``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from adapterctl.cli import cli
from adapterctl.cli.options import examples, json_option, source_options, warn
from adapterctl.cli.render import human_bytes, json_text, printable

if TYPE_CHECKING:
    from pydantic import BaseModel

    from adapterctl.registry import AdapterSummary, LineageNode, LogEntry, Registry, Version


def _registry() -> Registry:
    from adapterctl.registry import Registry

    return Registry()


def _echo_json(data: BaseModel | list[Any]) -> None:
    if isinstance(data, list):
        import json

        click.echo(json.dumps([d.model_dump(mode="json") for d in data], indent=2))
    else:
        click.echo(json_text(data.model_dump_json(indent=2)))


def _rows(pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        click.echo(printable(f"{k:<{width}}  {v}"))


def _table(header: list[str], rows: list[list[str]]) -> None:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@cli.command(
    "add",
    epilog=examples(
        "adapterctl add adapters/chat-lora --name chat --base base/tiny-llama --tag prod",
        "adapterctl add out/checkpoint-500 --name chat --base base/tiny-llama --hash-base",
    ),
)
@click.argument("source")
@click.option("--name", "name", required=True, metavar="NAME", help="Name to register it under.")
@click.option(
    "--base",
    "base",
    metavar="BASE",
    default=None,
    help="Base checkpoint folder or hf://OWNER/NAME[@REV]: validate against it first (exit 3 "
    "if it does not fit) and pin the version to its fingerprint (a Hub base: to its commit "
    "and content digest, from the Hub's sha256s; nothing downloaded).",
)
@click.option(
    "--hash-base",
    is_flag=True,
    help="Also pin the base's content digest (sha256 of each weight file; cached by path, "
    "size and mtime).",
)
@click.option(
    "--allow-base-mismatch",
    is_flag=True,
    help="Add it although NAME's latest version is pinned to another base (exit 5 otherwise); "
    "a warning says so.",
)
@click.option("--tag", "tags", multiple=True, metavar="T", help="Point alias T at the version.")
@click.option("-m", "--message", default=None, metavar="MESSAGE", help="A note kept with it.")
@json_option
@source_options
def add_command(
    source: str,
    name: str,
    base: str | None,
    hash_base: bool,
    allow_base_mismatch: bool,
    tags: tuple[str, ...],
    message: str | None,
    as_json: bool,
    alpha: float | None,
    rank: int | None,
) -> None:
    """Add SOURCE to the registry as the next version of NAME.

    Each version is immutable and keyed by a digest of its files and base pin. Without
    --base, the pin is the config's base_model_name_or_path and revision (unverified).
    A name keeps to one base: a pin that differs from NAME's latest version's is refused.
    """
    with _registry() as reg:
        v = reg.add(
            source,
            name,
            base=base,
            hash_base=hash_base,
            tags=tags,
            message=message,
            alpha=alpha,
            rank=rank,
            allow_base_mismatch=allow_base_mismatch,
        )
    for w in v.warnings:
        warn(w)
    if as_json:
        _echo_json(v)
        return
    pinned = v.base.label + (f" to {base}" if base else f" ({v.base.name})" if v.base.name else "")
    click.echo(f"added {v.ref} {v.digest}")
    click.echo(f"  {len(v.files)} file(s), {human_bytes(v.size)}; base pin: {pinned}")
    if v.tags:
        click.echo(f"  tags: {', '.join(v.tags)}")


@cli.command(
    "list",
    epilog=examples(
        "adapterctl list",
        "adapterctl list --json",
    ),
)
@click.option(
    "--base",
    "base",
    metavar="BASE|FINGERPRINT",
    default=None,
    help="Only versions pinned to this base: a folder, a fingerprint/content digest "
    "(sha256:<prefix>) or a base name.",
)
@json_option
def list_command(base: str | None, as_json: bool) -> None:
    """List registered adapters: name, latest version, base, size, tags."""
    with _registry() as reg:
        items = reg.list(base=base)
    if as_json:
        _echo_json(items)
        return
    if not items:
        click.echo(
            "no adapters"
            + (" pinned to that base" if base else "")
            + "; add one with: adapterctl add PATH --name NAME",
            err=True,
        )
        return
    _table(
        ["NAME", "LATEST", "VERSIONS", "BASE", "PIN", "SIZE", "TAGS"],
        [_summary_row(s) for s in items],
    )


def _summary_row(s: AdapterSummary) -> list[str]:
    if s.latest is None:
        return [s.name, "-", f"0 ({s.removed} removed)", "-", "-", "-", ""]
    versions = str(s.versions) + (f" ({s.removed} removed)" if s.removed else "")
    base = s.base or "-"
    if s.base_fingerprint:
        base += f" [{s.base_fingerprint[7:19]}]"
    tags = ", ".join(f"{a}→{n}" for a, n in s.tags.items())
    return [s.name, str(s.latest), versions, base, s.pin or "-", human_bytes(s.size or 0), tags]


@cli.command(
    "show",
    epilog=examples(
        "adapterctl show chat@1",
        "adapterctl show chat@prod --json",
    ),
)
@click.argument("ref")
@json_option
def show_command(ref: str, as_json: bool) -> None:
    """Everything about a version: files, digests, base pin, tags, lineage tree, remotes.

    REF is name, name@3, name@alias or sha256:<prefix>; removed versions are shown with
    their tombstone.
    """
    with _registry() as reg:
        v = reg.show(ref)
    if as_json:
        _echo_json(v)
        return
    render_version(v)


def render_version(v: Version) -> None:
    """The text form of ``show``."""
    pin = v.base
    rows = [
        ("ref", v.ref + ("  [REMOVED]" if v.removed else "")),
        ("digest", v.digest),
        ("adapter digest", v.files_digest),
        ("format", v.format),
        ("size", f"{human_bytes(v.size)} in {len(v.files)} file(s)"),
        ("added", v.created_at),
    ]
    if v.message:
        rows.append(("message", v.message))
    if v.source:
        rows.append(("source", v.source))
    rows.append(("base pin", pin.label))
    if pin.fingerprint:
        rows.append(
            (
                "  fingerprint",
                pin.fingerprint + (f" ({pin.architecture})" if pin.architecture else ""),
            )
        )
    if pin.content_digest:
        rows.append(("  content digest", f"{pin.content_digest} ({len(pin.files)} weight files)"))
    if pin.name:
        rows.append(("  name", pin.name + (f" @ {pin.revision}" if pin.revision else "")))
    if pin.path:
        rows.append(("  path", pin.path))
    rows.append(("tags", ", ".join(v.tags) or "-"))
    if v.removed:
        forced = " (--force: it was a lineage parent)" if v.removed.forced else ""
        rows.append(("removed", v.removed.removed_at + forced))
    if v.method:
        import json

        opts = json.dumps(v.options or {}, sort_keys=True)
        rows.append(("made by", f"{v.method} {opts}"))
    rows.append(("children", ", ".join(v.children) or "-"))
    remotes = [r.url + (f"@{r.revision[:12]}" if r.revision else "") for r in v.remotes]
    rows.append(("remotes", ", ".join(remotes) or "-"))
    _rows(rows)
    if v.parents:
        click.echo("lineage")
        click.echo(f"  {v.ref}" + (f"  ({v.method})" if v.method else ""))
        _tree(v.parents, "  ")
    click.echo("files")
    width = max((len(f.path) for f in v.files), default=0)
    for f in v.files:
        click.echo(printable(f"  {f.path:<{width}}  {human_bytes(f.size):>10}  {f.sha256[:16]}"))


def _tree(nodes: list[LineageNode], indent: str) -> None:
    for i, n in enumerate(nodes):
        last = i == len(nodes) - 1
        weight = "" if n.weight is None else f" ×{n.weight:g}"
        extra = (f"  ({n.method})" if n.method else "") + ("  [removed]" if n.removed else "")
        click.echo(f"{indent}{'└─' if last else '├─'} {n.ref}{weight}{extra}")
        _tree(n.parents, indent + ("   " if last else "│  "))


@cli.command(
    "log",
    epilog=examples(
        "adapterctl log chat",
        "adapterctl log chat --json",
    ),
)
@click.argument("name")
@json_option
def log_command(name: str, as_json: bool) -> None:
    """NAME's history, newest first: versions added, aliases moved, versions removed."""
    with _registry() as reg:
        entries = reg.log(name)
    if as_json:
        _echo_json(entries)
        return
    _table(["WHEN", "EVENT", "VERSION", "DETAIL"], [_log_row(e) for e in entries])


def _log_row(e: LogEntry) -> list[str]:
    when = e.at[:19].replace("T", " ")
    if e.event == "tagged":
        detail = f"{e.alias} → {e.ref}"
    elif e.event == "added":
        detail = e.digest[:19] + (f"  {e.message}" if e.message else "")
    else:
        detail = "tombstone (the number is never reused)"
    return [when, e.event, e.ref, detail]


@cli.command(
    "tag",
    epilog=examples(
        "adapterctl tag chat@2 prod",
        "adapterctl tag chat@1 stable",
    ),
)
@click.argument("ref")
@click.argument("alias")
@json_option
def tag_command(ref: str, alias: str, as_json: bool) -> None:
    """Point NAME@ALIAS at the version REF (moving it if it pointed elsewhere)."""
    with _registry() as reg:
        result = reg.tag(ref, alias)
    if as_json:
        _echo_json(result)
        return
    moved = f" (was {result.name}@{result.previous})" if result.previous is not None else ""
    click.echo(f"{result.name}@{alias} → {result.ref}{moved}")


@cli.command(
    "rm",
    epilog=examples(
        "adapterctl rm chat@1",
        "adapterctl rm chat@1 --force    # even if others were composed from it",
    ),
)
@click.argument("ref")
@click.option(
    "--force", is_flag=True, help="Remove it even if live versions were composed from it."
)
@json_option
def rm_command(ref: str, force: bool, as_json: bool) -> None:
    """Remove a version: it leaves a tombstone, its number is never reused, and its files go
    at the next `adapterctl registry gc`."""
    with _registry() as reg:
        v = reg.rm(ref, force=force)
    if as_json:
        _echo_json(v)
        return
    click.echo(f"removed {v.ref} (tombstone); free its files with: adapterctl registry gc")


@cli.command(
    "export",
    epilog=examples(
        "adapterctl export chat@1 exported/chat-v1",
        "adapterctl export chat@prod hf://my-org/chat-lora",
    ),
)
@click.argument("ref")
@click.argument("dest", metavar="DIR|hf://OWNER/NAME")
@json_option
def export_command(ref: str, dest: str, as_json: bool) -> None:
    """Write version REF's files, byte for byte, into a new folder DIR (a PEFT folder); or
    publish it to the Hub (hf://OWNER/NAME: as `adapterctl push REF OWNER/NAME`)."""
    from adapterctl.hub import is_hub_ref

    if is_hub_ref(dest):
        from adapterctl.hub import push

        report = push(ref, dest)
        if as_json:
            _echo_json(report)
            return
        done = "is already at" if report.already else "pushed to"
        click.echo(f"{report.version} {done} {report.url} as {report.tag} ({report.commit[:12]})")
        return
    with _registry() as reg:
        out = reg.export(ref, dest)
        v = reg.resolve(ref)
    if as_json:
        import json

        files = [f.model_dump(mode="json") for f in v.files]
        exported = {"ref": v.ref, "digest": v.digest, "out": str(out), "files": files,
                    "size": v.size}  # fmt: skip
        click.echo(json.dumps(exported, indent=2))
        return
    click.echo(f"exported {v.ref} to {out} ({len(v.files)} file(s), {human_bytes(v.size)})")


@cli.group("registry")
def registry_group() -> None:
    """Registry maintenance: verify, gc, path (state lives in $ADAPTERCTL_HOME)."""


@registry_group.command(
    "verify",
    epilog=examples(
        "adapterctl registry verify",
        "adapterctl registry verify --json",
    ),
)
@json_option
def verify_command(as_json: bool) -> None:
    """Re-hash every stored file and check the database; exit 1 if anything is wrong."""
    with _registry() as reg:
        report = reg.verify()
    if as_json:
        _echo_json(report)
    else:
        click.echo(
            f"checked {report.versions_checked} version(s), {report.blobs_checked} blob(s), "
            f"{human_bytes(report.bytes_checked)}; database: {', '.join(report.integrity)}"
        )
        for p in report.missing + report.altered:
            click.echo(f"  {p.problem}: {p.path} (used by {', '.join(p.versions)})")
        for ref in report.bad_digests:
            click.echo(f"  digest does not match the recorded files: {ref}")
        for d in report.checkouts_altered:
            click.echo(f"  altered checkout (removed by adapterctl registry gc): {d}")
        if report.foreign_key_errors:
            click.echo(f"  {report.foreign_key_errors} foreign key error(s)")
        for line in report.dangling:
            click.echo(f"  dangling reference: {line}")
        for line in report.missing_versions:
            click.echo(f"  missing version: {line}")
        for t in report.missing_triggers:
            click.echo(f"  append-only trigger dropped: {t}")
        click.echo("ok" if report.ok else "FAILED")
    if not report.ok:
        click.get_current_context().exit(1)


@registry_group.command(
    "gc",
    epilog=examples(
        "adapterctl registry gc",
        "adapterctl registry gc --json",
    ),
)
@json_option
def gc_command(as_json: bool) -> None:
    """Delete stored files no live version uses, leftovers of interrupted adds, and stale
    checkouts."""
    with _registry() as reg:
        report = reg.gc()
    if as_json:
        _echo_json(report)
        return
    click.echo(
        f"removed {report.blobs_removed} blob(s) ({human_bytes(report.bytes_freed)}), "
        f"{report.temp_removed} temporary file(s), {report.checkouts_removed} checkout(s)"
    )


@registry_group.command(
    "path",
    epilog=examples(
        "adapterctl registry path",
    ),
)
@json_option
def path_command(as_json: bool) -> None:
    """Where the registry lives (set ADAPTERCTL_HOME to move it); --json adds the counts."""
    with _registry() as reg:
        info = reg.info()  # creates nothing
    if as_json:
        _echo_json(info)
        return
    click.echo(info.home)
