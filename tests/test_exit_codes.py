"""The exit-code contract: README's "## Exit codes" table, ``adapterctl/errors.py`` and the CLI.

Three things are held against the table:

1. ``errors.py``: every exception carries a code of the table, with the meaning its row gives;
   every row is carried by an exception or produced by the CLI itself (0, click's usage
   errors 2, an unexpected exception 70, Ctrl-C 130).
2. The CLI: every code of the table is produced end to end by at least one test — here
   (``CLI_CASES``, ``PROCESS_CASES``) or in the test named in ``PINNED_ELSEWHERE`` — with one
   ``Error: …`` line on stderr and no traceback.
3. One refusal, one code: a DoRA adapter that an operation cannot handle exits 3 in ``merge``
   as in ``compose``.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from adapterctl import errors
from adapterctl.cli import cli
from adapterctl.demo import write_adapter, write_base

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# The codes the CLI produces itself, not through an exception of errors.py, and a phrase of
# their README meaning: a command that returns; click's own usage errors (a missing argument,
# an unknown flag); any other exception (a bug); KeyboardInterrupt.
CLI_OWN = {0: "success", 2: "usage error", 70: "internal error", 130: "interrupted"}

# Each family of errors.py: its code and a phrase its README row must hold. A class not
# listed here takes its code and meaning from its nearest listed ancestor.
FAMILIES: dict[type[errors.AdapterctlError], tuple[int, str]] = {
    errors.AdapterctlError: (1, "operational error"),
    errors.OperationalError: (1, "operational error"),
    errors.UsageError: (2, "usage error"),
    errors.ValidationFailed: (3, "validation failed"),
    errors.BrokenFile: (3, "a file is broken"),
    errors.UnsupportedAdapter: (3, "the adapter does not fit"),
    errors.NotFound: (4, "not found"),
    errors.VersionRemoved: (4, "a removed version"),
    errors.Conflict: (5, "conflict"),
    errors.RemoteError: (6, "remote"),
}


def readme_table(text: str | None = None) -> dict[int, str]:
    """code -> meaning, from the table under README's ``## Exit codes``."""
    text = (ROOT / "README.md").read_text() if text is None else text
    parts = re.split(r"^## Exit codes[ \t]*$", text, flags=re.M)
    assert len(parts) == 2, "README.md needs exactly one '## Exit codes' section"
    section = re.split(r"^## ", parts[1], flags=re.M)[0]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(.*?)\s*\|\s*$", section, flags=re.M)
    table = {int(code): meaning for code, meaning in rows}
    assert len(table) == len(rows), f"a code appears twice in README's exit codes: {rows}"
    return table


def error_classes() -> list[Any]:
    """Every exception class defined in adapterctl/errors.py."""
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if c.__module__ == errors.__name__ and issubclass(c, BaseException)
    ]


def family(cls: type[errors.AdapterctlError]) -> tuple[int, str]:
    for ancestor in cls.__mro__:
        if ancestor in FAMILIES:
            return FAMILIES[ancestor]
    raise AssertionError(f"{cls.__name__} is not an AdapterctlError")


# --- 1. errors.py against the README table ---------------------------------------------------


def test_readme_table_parses() -> None:
    table = readme_table()
    assert 0 in table and 70 in table and 130 in table, table
    assert all(meaning for meaning in table.values()), table
    # The parser sees a dropped row: the test below would then fail on the missing code.
    text = (ROOT / "README.md").read_text()
    assert 4 not in readme_table(re.sub(r"^\| 4 \|.*\n", "", text, flags=re.M))


def test_every_exception_carries_a_documented_code() -> None:
    table = readme_table()
    classes = error_classes()
    assert errors.NotFound in classes and errors.VersionRemoved in classes
    for cls in classes:
        assert issubclass(cls, errors.AdapterctlError), f"{cls.__name__}: not an AdapterctlError"
        code = cls.exit_code
        assert code in table, f"{cls.__name__}.exit_code = {code} is not in README's table"
        assert code not in (0, 70, 130), f"{cls.__name__}: {code} is not an error's code"
        want, phrase = family(cls)
        assert code == want, f"{cls.__name__} exits {code}, its family {want}"
        assert phrase in table[code].lower(), (cls.__name__, phrase, table[code])
        stated = re.findall(r"\(exit (\d+)\)", cls.__doc__ or "")
        assert all(int(s) == code for s in stated), (cls.__name__, stated, code)


def test_every_documented_code_is_produced() -> None:
    """Each row: an exception carries it or the CLI produces it, and means what the row says."""
    table = readme_table()
    carried = {cls.exit_code for cls in error_classes()}
    assert set(table) == carried | set(CLI_OWN), (
        f"README rows {sorted(table)}; exceptions carry {sorted(carried)}, "
        f"the CLI produces {sorted(CLI_OWN)}"
    )
    for code, phrase in CLI_OWN.items():
        assert phrase in table[code].lower(), (code, phrase, table[code])


def test_meanings_line_up() -> None:
    """The obvious pairs, spelled out (the family table above must not drift)."""
    assert errors.NotFound.exit_code == 4 and errors.VersionRemoved.exit_code == 4
    assert errors.Conflict.exit_code == 5
    assert errors.UsageError.exit_code == 2
    assert errors.ValidationFailed.exit_code == 3 and errors.BrokenFile.exit_code == 3
    assert errors.UnsupportedAdapter.exit_code == 3 and errors.UnsupportedBase.exit_code == 3
    assert errors.OperationalError.exit_code == 1
    assert errors.RemoteError.exit_code == 6


def test_other_lists_of_codes_agree_with_the_readme() -> None:
    """``errors.EXIT_CODES`` and ``adapterctl --help`` list the README's codes."""
    table = readme_table()
    assert set(errors.EXIT_CODES) == set(table)
    listed = re.search(r"Exit codes:(.*?)\.\s*$", cli.help or "", flags=re.S)
    assert listed, cli.help
    codes = {int(c) for c in re.findall(r"\b(\d+)\s+[a-z]", listed.group(1))}
    assert codes == set(table), (codes, cli.help)


def test_exceptions_live_in_errors_py() -> None:
    """DESIGN: errors.py holds every exception (so this test sees every code)."""
    names = {c.__name__ for c in error_classes()}
    strays = []
    for path in sorted((ROOT / "adapterctl").rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == "adapterctl":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None)
                         for b in node.bases}  # fmt: skip
                if bases & names:
                    strays.append(f"{path.relative_to(ROOT)}: class {node.name}")
    assert not strays, strays


# --- 2. every code produced end to end -----------------------------------------------------

# Codes that other test files already produce through the CLI (with the one-line message
# checked there): test file -> function. ``test_every_code_is_pinned`` checks they exist and
# name the code.
PINNED_ELSEWHERE: dict[int, list[str]] = {
    0: ["test_cli_basics.py::test_every_command_has_help"],
    1: [
        "test_bad_input.py::test_folder_where_a_file_should_be_is_an_operational_error",
        "test_merge_cpu.py::test_failed_write_in_the_kernel_names_the_output_and_leaves_nothing",
    ],
    2: ["test_bad_input.py::test_bad_flag_is_usage_error"],
    3: ["test_bad_input.py::test_subprocess_prints_no_traceback"],
    4: ["test_bad_input.py::test_missing_base_is_not_found"],
    5: ["test_demo.py::test_demo_keep_refuses_a_non_empty_folder"],
    70: [
        "test_bad_input.py::test_unexpected_exception_is_internal_error",
        "test_bad_input.py::test_debug_env_prints_traceback",
    ],
    130: ["test_merge.py::test_interrupted_merge_leaves_no_output_and_rerun_works"],
}


@dataclass
class Env:
    adapter: Path
    base: Path
    broken: Path  # the adapter, truncated
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[str]]  # may prepare state (a registry, a patched call)
    code: int
    says: str
    one_line: bool = True  # click's usage errors print a usage block above their Error line


def _twice(e: Env) -> list[str]:
    added = CliRunner().invoke(cli, ["add", str(e.adapter), "--name", "chat"])
    assert added.exit_code == 0, added.output
    return ["add", str(e.adapter), "--name", "chat"]


def _not_a_database(e: Env) -> list[str]:
    home = Path(os.environ["ADAPTERCTL_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "registry.db").write_text("not a database")
    return ["list"]


def _remote_failure(e: Env) -> list[str]:
    def resolve(source: object, **kwargs: object) -> Path:
        raise errors.RemoteError(f"{source}: the Hub answered 503 Service Unavailable; retry")

    e.monkeypatch.setattr("adapterctl.refs.resolve", resolve)
    return ["inspect", "hf://owner/repo"]


CLI_CASES = [
    Case("operational-registry-not-a-database", _not_a_database, 1,
         "registry database error while opening the registry"),
    Case("usage-click-missing-argument", lambda e: ["inspect"], 2, "Missing argument 'SOURCE'",
         one_line=False),
    Case("usage-library-bad-size", lambda e: ["merge", str(e.base), str(e.adapter), "-o",
         str(e.tmp / "o"), "--max-shard-size", "5XB"], 2, "cannot read size '5XB'"),
    Case("validation-add-preflight", lambda e: ["add", str(e.broken), "--name", "broken"], 3,
         "truncated"),
    Case("not-found-registry-name", lambda e: ["log", "nosuch"], 4,
         "no registry adapter named 'nosuch'"),
    Case("conflict-version-exists", _twice, 5, "chat@1 already holds this adapter"),
    Case("remote-failure", _remote_failure, 6, "hf://owner/repo: the Hub answered 503"),
]  # fmt: skip


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exit_codes")
    return write_adapter(root / "adapter"), write_base(root / "base")


@pytest.fixture
def env(originals: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAPTERCTL_DEBUG", raising=False)
    broken = Path(shutil.copytree(originals[0], tmp_path / "broken"))
    st = broken / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    return Env(originals[0], originals[1], broken, tmp_path, monkeypatch)


def assert_error(result: Result, code: int, says: str, *, one_line: bool = True) -> None:
    """Exit ``code``; nothing on stdout; one ``Error: …`` line on stderr (and nothing else,
    unless click prints its usage block above it); no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    errors_ = [line for line in lines if line.startswith("Error: ")]
    assert len(errors_) == 1 and says in errors_[0], result.stderr
    if one_line:
        assert lines == errors_, result.stderr


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_exit_code(case: Case, env: Env) -> None:
    args = case.args(env)
    assert_error(CliRunner().invoke(cli, args), case.code, case.says, one_line=case.one_line)


# A real process with one library call replaced (the command's own call to inspect_adapter):
# what the CLI does with an exception it does not know, and with Ctrl-C.
_PATCHED_MAIN = """
import sys
import adapterctl.introspect as lib
def inspect_adapter(*args, **kwargs):
    raise {raise_}
lib.inspect_adapter = inspect_adapter
from adapterctl.cli import main
sys.argv = ["adapterctl", *sys.argv[1:]]
main()
"""

PROCESS_CASES = [
    # (id, raised in the library, ADAPTERCTL_DEBUG, code, the whole of stderr or None)
    ("internal-error", "ZeroDivisionError('bug\\nmore')", False, 70,
     "Error: internal error: ZeroDivisionError: bug; set ADAPTERCTL_DEBUG=1 for a traceback "
     "and report it"),
    ("internal-error-debug", "ZeroDivisionError('bug')", True, 70, None),
    ("interrupted", "KeyboardInterrupt", False, 130, "Error: interrupted"),
    ("interrupted-debug", "KeyboardInterrupt", True, 130, "Error: interrupted"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raise_", "debug", "code", "stderr"),
    [c[1:] for c in PROCESS_CASES],
    ids=[c[0] for c in PROCESS_CASES],
)
def test_process_exit_code(
    raise_: str, debug: bool, code: int, stderr: str | None, env: Env
) -> None:
    child_env = {k: v for k, v in os.environ.items() if k != "ADAPTERCTL_DEBUG"}
    if debug:
        child_env["ADAPTERCTL_DEBUG"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _PATCHED_MAIN.format(raise_=raise_), "inspect", str(env.adapter)],
        capture_output=True, text=True, env=child_env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    if stderr is not None:  # one line, no traceback (Ctrl-C: not even with ADAPTERCTL_DEBUG)
        assert proc.stderr.splitlines() == [stderr], proc.stderr
    else:  # ADAPTERCTL_DEBUG=1: the traceback, then the one line
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith("Error: internal error: ZeroDivisionError")


def _asserted_codes(path: Path, function: str) -> set[int]:
    """The exit codes a test function asserts: ``….exit_code == N``, ``….returncode == N``,
    or ``assert_one_line_error(result, N, …)``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            found: list[ast.expr] = []
            for n in ast.walk(node):
                if (
                    isinstance(n, ast.Compare)
                    and isinstance(n.left, ast.Attribute)
                    and n.left.attr in ("exit_code", "returncode")
                    and isinstance(n.ops[0], ast.Eq)
                ):
                    found.append(n.comparators[0])
                if (
                    isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Name)
                    and n.func.id == "assert_one_line_error"
                    and len(n.args) > 1
                ):
                    found.append(n.args[1])
            return {e.value for e in found if isinstance(e, ast.Constant) and type(e.value) is int}
    raise AssertionError(f"{path.name}::{function} does not exist")


def test_every_code_is_pinned() -> None:
    """Every README code is produced by a test of this file or by a named test elsewhere."""
    here = {c.code for c in CLI_CASES} | {c[3] for c in PROCESS_CASES} | {3}  # 3: DoRA below
    elsewhere = set(PINNED_ELSEWHERE)
    assert set(readme_table()) <= here | elsewhere, sorted(set(readme_table()) - here - elsewhere)
    for code, tests in PINNED_ELSEWHERE.items():
        for test in tests:
            file, function = test.split("::")
            assert code in _asserted_codes(TESTS / file, function), (test, code)


# --- 3. one refusal, one code: DoRA --------------------------------------------------------


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import builders

    return builders.save_base(builders.llama_model(), tmp_path_factory.mktemp("dora") / "base")


def test_dora_refusals_agree_across_commands(
    llama_base: Path, peft_cases: Callable[[str], Any], tmp_path: Path
) -> None:
    """A DoRA adapter is "an adapter that does not fit this operation": ``compose`` refuses it,
    and ``merge`` refuses it next to other adapters or under ``--method``, all with exit 3
    (``UnsupportedAdapter``) and one message pattern."""
    dora, plain = str(peft_cases("llama_dora").path), str(peft_cases("llama_plain").path)
    out = str(tmp_path / "o")
    runs = {
        "compose": ["compose", dora, plain, "--method", "linear", "-o", out],
        "merge": ["merge", str(llama_base), dora, plain, "-o", out],
        "merge --method": ["merge", str(llama_base), dora, "--method", "ties", "--density",
                           "0.5", "-o", out],
    }  # fmt: skip
    codes = {}
    for name, args in runs.items():
        result = CliRunner().invoke(cli, args)
        assert_error(result, 3, f"{dora}: a DoRA adapter (use_dora) cannot be")
        assert "not linear in ΔW" in result.stderr, (name, result.stderr)
        codes[name] = result.exit_code
    assert set(codes.values()) == {errors.UnsupportedAdapter.exit_code}, codes
    assert not (tmp_path / "o").exists()
