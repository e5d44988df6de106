"""Hardening, one test per class: rank/alpha pattern keys are matched as PEFT matches them but
can neither hang (catastrophic regular expressions are refused, exit 3, naming the key) nor
go quadratic (200k keys × 100k modules, counted in operations, not timed); reading and
reporting many modules grows linearly in work and memory; names from files are escaped
before they reach a terminal; tests that could hang run under a timeout."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from builders import many_module_adapter
from click.testing import CliRunner

from adapterctl.cli import cli
from adapterctl.errors import UnsupportedAdapter
from adapterctl.patterns import PatternKeys

# An OSC sequence that sets the terminal's title, a right-to-left override, a C1 CSI.
HOSTILE = "\x1b]0;pwned\x07"
RAW = ("\x1b", "\x07", "\u202e", "\x9b")


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _peft_keys(keys: list[str], module: str) -> list[str]:
    """Every key PEFT's ``get_pattern_key`` rule accepts for ``module``, in order."""
    return [k for k in keys if re.match(rf"(.*\.)?({k})$", module)]


# --- catastrophic keys -------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("(.*)*!", "nests a repeat inside a repeat"),
        ("(a+)+", "nests a repeat inside a repeat"),
        ("(a|a)*", "repeats an alternation"),
        (r"(x)\1", "uses a backreference"),
        ("(?=q)q_proj", "uses a lookahead or lookbehind"),
        (r"\bq_proj", "uses a word boundary"),
    ],
)
def test_catastrophic_pattern_keys_are_refused_not_run(key: str, why: str, tmp_path: Path) -> None:
    """PEFT's own ``re.match`` spins at 100% CPU on ``(.*)*!`` against a long name; adapterctl
    refuses such a key (exit 3) before matching anything, naming it and saying why."""
    long_name = "model." + "a" * 60 + ".proj"  # backtracking on it takes longer than a day
    for field in ("rank_pattern", "alpha_pattern"):
        adapter = many_module_adapter(
            tmp_path / field, 3, name=long_name + "{i}", **{field: {key: 2}}
        )
        before = _digest(adapter)
        for command in (["validate", str(adapter)], ["inspect", str(adapter)]):
            result = CliRunner().invoke(cli, command)
            assert result.exit_code == 3, result.output
            message = result.stderr.strip()
            assert message.startswith(f"Error: {adapter}: {field} key {key!r} {why}"), message
            assert message.endswith("(a module's name, or a simpler regular expression)")
            assert len(message.splitlines()) == 1
        assert _digest(adapter) == before


# --- PEFT's semantics, linearly ----------------------------------------------------------------

KEYS = [
    "q_proj", r"layers\.[0-3]\.q_proj", r".*_proj", r"^model\.layers\.1\..*", "(q|k)_proj",
    "q_proj$", "x{0,2}y", r"\d+\.q_proj", "^layers", r"mlp\..*", "(?i:Q)_PROJ", "a)|(b",
    "[a-z]+_proj", r"layers\.\d+\.(self_attn|mlp)\.[qkv]_proj", "", "^$", r"\Aq_proj\Z",
    "^" + re.escape("model.layers.0.q_proj"), r"model\.layers\.0\.q_proj", "_proj", "o?_proj",
    r"(?:layers\.1\.)?q_proj", "b", r"\n", r"q_proj\n", r"^a\.b$", r"q_proj\$", r"1\.b$",
    ".*.*.*.*!", r"[^.]+\.q_proj",
]  # fmt: skip
SEGMENTS = ["model", "layers", "0", "1", "12", "q_proj", "k_proj", "mlp", "self_attn", "b", "a",
            "x", "xy", "Q_PROJ", "", "a$b", "q_proj$"]  # fmt: skip


@pytest.mark.timeout(120)
def test_pattern_keys_match_as_peft_and_in_linear_work() -> None:
    """The first matching key in the file's order, an exact name, a dotted suffix, a regular
    expression over the whole name (``$`` also before a final newline) — as PEFT's
    ``get_pattern_key``; and the work, counted in lookups and automaton steps, grows with
    keys + modules, not keys × modules (200k keys × 100k modules took 150 s before)."""
    from peft.utils.other import get_pattern_key

    rng = random.Random(0)
    for _ in range(3000):
        module = ".".join(rng.choice(SEGMENTS) for _ in range(rng.randint(1, 5)))
        module += "\n" if rng.random() < 0.05 else ""
        keys = rng.sample(KEYS, rng.randint(1, 8))
        compiled = PatternKeys(keys)
        assert compiled.all(module) == _peft_keys(keys, module), (module, keys)
        first = get_pattern_key(keys, module)
        assert compiled.first(module) == (first if first in _peft_keys(keys, module) else None)
    # The one documented difference: a dot in a key without regex syntax is a dot.
    assert _peft_keys(["a.b"], "x.a_b") == ["a.b"]
    assert PatternKeys(["a.b"]).all("x.a_b") == []
    # Work: n modules against 2n plain, 2n anchored (as adapterctl writes them) and a few
    # regular-expression keys, for n and 4n. Quadratic matching would be 16× the work.
    work = {}
    for n in (500, 2000):
        modules = [f"base.model.layers.{i}.mlp.proj" for i in range(n)]
        keys = {f"layers.{i}.mlp.proj": 2 for i in range(0, 4 * n, 2)}
        keys |= {"^" + re.escape(f"base.model.layers.{i}.mlp.proj"): 3 for i in range(1, 4 * n, 2)}
        keys |= {r"layers\.\d+\.mlp\..*": 4, ".*.*.*.*!": 5, r"(q|k|v)_proj": 6}
        compiled = PatternKeys(keys)
        hits = [compiled.first(m) for m in modules]
        assert hits[0] == "layers.0.mlp.proj" and hits[1] == "^" + re.escape(modules[1])
        work[n] = compiled.steps
    assert work[2000] <= 4 * 1.5 * work[500], work


@pytest.mark.timeout(60)
def test_matching_work_is_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Past MAX_STEPS counted operations, the keys are refused (exit 3) instead of spinning."""
    import adapterctl.patterns

    keys = {rf"layers\.{i}\..*proj": 1 for i in range(50)}
    adapter = many_module_adapter(tmp_path / "a", 400, rank_pattern=keys)
    assert CliRunner().invoke(cli, ["validate", str(adapter)]).exit_code == 0
    monkeypatch.setattr(adapterctl.patterns, "MAX_STEPS", 5000)
    result = CliRunner().invoke(cli, ["validate", str(adapter)])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith(
        f"Error: {adapter}: rank_pattern: matching its 50 key(s) against the module names "
        "takes more than 5,000 steps"
    ), result.stderr
    with pytest.raises(UnsupportedAdapter, match="takes more than 5,000 steps"):
        compiled = PatternKeys(keys, "rank_pattern")
        for i in range(400):
            compiled.first(f"model.layers.{i}.mlp.proj")


# --- many modules ------------------------------------------------------------------------------


def _cost(args: list[str]) -> tuple[Any, int, int]:
    """The CLI's result for ``args``, the Python and C function calls it made and its peak
    traced memory: counted, not timed."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    runner = CliRunner()
    tracemalloc.start()
    sys.setprofile(count)
    try:
        result = runner.invoke(cli, args)
    finally:
        sys.setprofile(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, calls, peak


@pytest.mark.timeout(120)
def test_many_modules_cost_linear_work_and_memory(tmp_path: Path) -> None:
    """``inspect`` and ``validate`` of an adapter with 4× the modules (and 4× the pattern keys)
    make at most ~4× the function calls and hold at most ~4× the memory (100k modules took 81 s
    and 0.9 GB before; a rich table row costs about a millisecond)."""
    warm = many_module_adapter(tmp_path / "warm", 2)
    for command in ("inspect", "validate"):  # imports and first-call caches: not counted
        assert CliRunner().invoke(cli, [command, str(warm)]).exit_code == 0
    costs: dict[int, list[tuple[int, int]]] = {}
    for n in (300, 1200):
        keys = {f"layers.{i}.mlp.proj": 1 for i in range(0, 2 * n, 2)}
        adapter = many_module_adapter(
            tmp_path / str(n), n, rank_pattern=keys, alpha_pattern={r"layers\.\d+\..*": 2}
        )
        costs[n] = []
        for command in ("inspect", "validate"):
            result, calls, peak = _cost([command, str(adapter)])
            assert result.exit_code == 0, result.output
            assert len(result.stdout.splitlines()) >= (n if command == "inspect" else 1)
            costs[n].append((calls, peak))
    for small, large in zip(costs[300], costs[1200], strict=True):
        assert large[0] <= 4 * 1.5 * small[0], (small, large)  # calls
        assert large[1] <= 4 * 1.5 * small[1], (small, large)  # peak memory


# --- output hygiene ----------------------------------------------------------------------------


def test_names_from_files_are_escaped_on_the_terminal(tmp_path: Path) -> None:
    """A tensor name holding a terminal-title escape, a right-to-left override or a C1 control
    prints escaped (``\\x1b]0;pwned\\x07``) in every text report, warning and error; JSON
    escapes them too and still round-trips the names."""
    name = "model.layers.{i}.q" + HOSTILE + "\u202e\x9b_proj"
    shown = "q\\x1b]0;pwned\\x07\\u202e\\x9b_proj"
    adapter = many_module_adapter(
        tmp_path / "a", 2, name=name, base_model_name_or_path="org/" + HOSTILE,
        alpha_pattern={"q" + HOSTILE + "\u202e\x9b_proj": 2, r"layers\.0\..*": 3},
    )  # fmt: skip
    before = _digest(adapter)
    for command in (
        ["inspect", str(adapter)],
        ["validate", str(adapter)],
        ["validate", str(adapter), "--format", "github"],
        ["diff", str(adapter), str(adapter)],
    ):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
        assert not any(c in result.output for c in RAW), (command, result.output)
        if command[0] == "inspect":
            assert shown in result.stdout and "org/\\x1b]0;pwned\\x07" in result.stdout
            assert "Warning: alpha_pattern keys" in result.stderr  # an overlap, escaped too
    for command in (["inspect", str(adapter), "--json"], ["validate", str(adapter), "--json"]):
        result = CliRunner().invoke(cli, command)
        assert not any(c in result.stdout for c in RAW), result.stdout
        data = json.loads(result.stdout)
        if command[0] == "inspect":
            assert data["modules"][0]["name"] == name.format(i=0)
            assert data["base_model"] == "org/" + HOSTILE
    assert _digest(adapter) == before
    # An error naming the module: factors of different ranks.
    from safetensors.numpy import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = f"base_model.model.{name.format(i=0)}.lora_B.weight"
    tensors[key] = tensors[key].repeat(2, axis=1)  # (out, 2): A is (1, in)
    save_file(tensors, str(weights))
    result = CliRunner().invoke(cli, ["inspect", str(adapter)])
    assert result.exit_code == 3, result.output
    assert not any(c in result.output for c in RAW)
    assert f"module model.layers.0.{shown} has lora_A [1, 4]" in result.stderr


def test_tests_that_could_hang_run_under_a_timeout(request: pytest.FixtureRequest) -> None:
    """pytest-timeout is loaded with a default per-test limit, and the tests that could hang
    (FIFO reads, catastrophic patterns) carry a short limit of their own."""
    assert request.config.pluginmanager.hasplugin("timeout")
    assert float(request.config.getini("timeout")) > 0
    here = Path(__file__).read_text()
    fifo = (Path(__file__).parent / "test_hardening.py").read_text()
    for source, test in ((here, "test_catastrophic_pattern_keys"), (fifo, "test_a_fifo_is")):
        decorators = source[: source.index(f"def {test}")].rsplit("\n\n\n", 1)[-1]
        assert "@pytest.mark.timeout(" in decorators, test
