"""``adapterctl validate``: findings as text, JSON or GitHub annotations; JUnit XML for CI."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from adapterctl.cli import cli
from adapterctl.cli.options import (
    base_option,
    examples,
    json_option,
    load_base,
    load_source,
    source_options,
)
from adapterctl.cli.options import warn as warn_stderr
from adapterctl.files import write_text_atomic

if TYPE_CHECKING:
    from adapterctl.validate import Finding, ValidationReport

GROUP_AFTER = 3  # findings of one rule beyond which the text output prints one line for them


@cli.command(
    "validate",
    epilog=examples(
        "adapterctl validate adapters/chat-lora --base base/tiny-llama",
        "adapterctl validate chat@1 --target vllm --target llama.cpp --max-rank 16",
        "adapterctl validate out/adapter --base hf://org/model --junit reports/validate.xml",
    ),
)
@click.argument("source")
@base_option
@click.option(
    "--target",
    "targets",
    type=click.Choice(["peft", "vllm", "llama.cpp"]),
    multiple=True,
    help="Also check the restrictions of a serving stack (vLLM, llama.cpp's GGUF converter); "
    "repeat it to check several (default: peft, structure and base rules only).",
)
@click.option(
    "--max-rank",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="The --max-lora-rank vLLM runs with (one of 1, 8, 16, 32, 64, 128, 256, 320, 512).",
)
@click.option("--strict", is_flag=True, help="Fail (exit 3) on warnings too.")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help=f"Text output: one line per finding (default: a rule with more than {GROUP_AFTER} "
    "findings prints one line with their count; JSON always lists every finding).",
)
@json_option
@click.option(
    "--junit",
    "junit",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write a JUnit XML report with one testcase per rule.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "github"]),
    default="text",
    show_default=True,
    help="Output: one line per finding, JSON (same as --json) or GitHub workflow annotations.",
)
@source_options
def validate_command(
    source: str,
    base: str | None,
    targets: tuple[str, ...],
    max_rank: int,
    strict: bool,
    verbose: bool,
    as_json: bool,
    junit: Path | None,
    fmt: str,
    alpha: float | None,
    rank: int | None,
) -> None:
    """Check that an adapter is well formed, fits BASE and can be served by --target.

    Each finding has a stable code (AC1xx structure, AC2xx base, AC3xx serving target) and a
    severity. Exit 0 when there is no error finding (with --strict: no warning either), 3
    otherwise. Broken files (invalid config, empty file, Git LFS pointer) stop with exit 3
    before any rule runs.
    """
    from adapterctl.validate import validate

    adapter = load_source(source, alpha, rank)
    ckpt = load_base(base)
    report = validate(adapter, base=ckpt, target=targets or ("peft",), max_rank=max_rank)
    for w in adapter.warnings:
        warn_stderr(w)
    from adapterctl.cli.render import json_text, printable

    if as_json or fmt == "json":
        click.echo(json_text(report.model_dump_json(indent=2)))
    elif fmt == "github":
        for line in github_lines(report, strict):
            click.echo(printable(line))
    else:
        for line in text_lines(report.findings, verbose):
            click.echo(printable(line))
        click.echo(printable(summary(report, strict)))
    if junit is not None:  # in a folder of its own if need be (CI's reports/…)
        junit.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(junit, junit_xml(report, strict), "JUnit report")
    if not report.passed(strict):
        click.get_current_context().exit(3)


def text_lines(findings: list[Finding], verbose: bool = False) -> list[str]:
    """One line per finding, except that (unless ``verbose``) a rule with more than
    ``GROUP_AFTER`` findings gets one line: how many modules, the first few, and the first
    finding's message (``findings`` come sorted by rule, then module)."""
    if verbose:
        return [text_line(f) for f in findings]
    by_rule: dict[str, list[Finding]] = {}
    for f in findings:
        by_rule.setdefault(f.code, []).append(f)
    lines: list[str] = []
    for code, group in by_rule.items():
        if len(group) <= GROUP_AFTER:
            lines.extend(text_line(f) for f in group)
            continue
        first = group[0]
        some = ", ".join(f.module or "(adapter)" for f in group[:GROUP_AFTER])
        where = f"{first.module}: " if first.module else ""
        lines.append(
            f"{first.severity.upper()} {code} in {len(group)} modules ({some}, …); the first: "
            f"{where}{first.message} (--verbose lists all)"
        )
    return lines


def text_line(f: Finding) -> str:
    """``SEVERITY CODE module: message``."""
    where = f" {f.module}" if f.module else ""
    return f"{f.severity.upper()} {f.code}{where}: {f.message}"


def summary(report: ValidationReport, strict: bool = False) -> str:
    """One line: verdict, counts, rules checked."""
    verdict = "ok" if report.passed(strict) else "FAILED"
    if strict and report.ok and not report.passed(strict):
        verdict += " (--strict: warnings count as errors)"
    counts = (
        f"{report.errors} error(s), {report.warnings} warning(s), {report.infos} info; "
        f"{len(report.rules_checked)} rules checked (target {report.target}"
        + (f", base {report.base}, {report.matched_modules} modules matched" if report.base else "")
        + ")"
    )
    return f"{verdict}: {counts}"


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")


def github_lines(report: ValidationReport, strict: bool = False) -> list[str]:
    """GitHub workflow commands: ``::error title=AC201::module: message`` (info -> notice)."""
    lines = []
    for f in report.findings:
        level = {"error": "error", "warning": "warning", "info": "notice"}[f.severity]
        if strict and level == "warning":
            level = "error"
        where = f"{f.module}: " if f.module else ""
        lines.append(
            f"::{level} title={_escape_property(f.code)}::{_escape_data(where + f.message)}"
        )
    lines.append(f"::notice title=adapterctl validate::{_escape_data(summary(report, strict))}")
    return lines


def junit_xml(report: ValidationReport, strict: bool = False) -> str:
    """A JUnit report: one testcase per rule in ``RULES``; a failure for each failing rule
    (errors, and warnings with ``strict``), ``<skipped>`` for rules that did not apply."""
    import xml.etree.ElementTree as ET

    from adapterctl.validate import RULES, skip_reason

    has_base = report.base is not None
    suite = ET.Element("testsuite", name=f"adapterctl validate {report.source}")
    failures = skipped = 0
    for code, rule in sorted(RULES.items()):
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"adapterctl.validate.{rule.scope}",
            name=f"{code} {rule.name}: {rule.description}",
        )
        if code not in report.rules_checked:
            ET.SubElement(case, "skipped", message=skip_reason(rule, report.targets, has_base))
            skipped += 1
            continue
        found = report.findings_for(code)
        failing = [
            f for f in found if f.severity == "error" or (strict and f.severity == "warning")
        ]
        body = "\n".join(text_line(f) for f in found)
        if failing:
            failures += 1
            el = ET.SubElement(case, "failure", message=failing[0].message, type=rule.severity)
            el.text = body
        elif found:
            ET.SubElement(case, "system-out").text = body
    suite.set("tests", str(len(RULES)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    root = ET.Element("testsuites", name="adapterctl validate")
    root.set("tests", str(len(RULES)))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("skipped", str(skipped))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
