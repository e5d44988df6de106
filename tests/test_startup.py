"""The reporting commands start light: ``inspect``, ``validate``, ``diff``, ``list`` and
``show`` import neither torch nor bitsandbytes (torch alone costs about a second and 200 MB),
nor does a plain CPU merge, and loading the plugins imports none of them. Nor is ml_dtypes
(half a second) ever imported: bfloat16 and float8 are bit arithmetic (``adapterctl.floats``),
and it is no longer a dependency. Nor is huggingface_hub (and its HTTP stack) unless the
command names the Hub (an ``hf://`` SOURCE or BASE, push, pull).

Each command runs in a fresh interpreter (this test process has long imported torch) that
writes, at exit, which of those modules it holds. The inputs are the demo's: a sharded bf16
base and bf16 and float32 adapters, so reading bfloat16 factors is covered, plus an NF4
base (merged and quantised by adapterctl) whose quant states ``inspect``/``validate`` read.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapterctl import demo
from adapterctl.tensorfile import read_header

HEAVY = ("torch", "bitsandbytes", "ml_dtypes", "huggingface_hub")

# Runs the CLI's entry point on argv[2:] and writes the heavy modules it imported to argv[1].
CLI_SCRIPT = f"""
import atexit, json, sys
out = sys.argv[1]
def report():
    with open(out, "w") as fh:
        json.dump([m for m in {HEAVY!r} if m in sys.modules], fh)
atexit.register(report)
sys.argv = ["adapterctl", *sys.argv[2:]]
from adapterctl.cli import main
main()
"""

# Loads every plugin and calls every registration hook, then reports the same way.
PLUGINS_SCRIPT = f"""
import json, sys
import click
from adapterctl import hookspecs
from adapterctl.plugins import REGISTER_HOOKS, add_commands, collect, plugin_names
hooks = [n for n in vars(hookspecs) if n.startswith("register_")]
assert set(hooks) == {{*REGISTER_HOOKS, "register_commands"}} and plugin_names()
for hook in REGISTER_HOOKS:
    collect(hook)
add_commands(click.Group(), set())
with open(sys.argv[1], "w") as fh:
    json.dump([m for m in {HEAVY!r} if m in sys.modules], fh)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The demo's base and adapters, an NF4 base, and a registry holding ``chat@1`` and
    ``code@1``."""
    root = tmp_path_factory.mktemp("startup")
    built = demo.build(root)
    home = root / "home"
    paths = {
        "base": str(root / built.base),
        "chat": str(root / built.adapters["chat-lora"]),
        "code": str(root / built.adapters["code-rslora"]),  # bf16 factors
        "nf4": str(root / "nf4"),
        "home": str(home),
    }
    adapterctl = [sys.executable, "-m", "adapterctl"]
    for name in ("chat", "code"):
        _run([*adapterctl, "add", paths[name], "--name", name, "--base", paths["base"]], home)
    _run([*adapterctl, "merge", paths["base"], paths["chat"], "-o", paths["nf4"],
          "--quantize", "nf4"], home)  # fmt: skip
    return paths


def _run(cmd: list[str], home: Path | str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERCTL_DEBUG"}
    env["ADAPTERCTL_HOME"] = str(home)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd[3:]} exited {proc.returncode}: {proc.stderr}"
    return proc


COMMANDS = {
    "inspect": ["inspect", "{code}", "--base", "{base}", "--spectrum"],
    "inspect --json": ["inspect", "{chat}", "--json"],
    "validate": ["validate", "{code}", "--base", "{base}"],
    "validate --json": ["validate", "{chat}", "--base", "{base}", "--json"],
    "inspect nf4 base": ["inspect", "{code}", "--base", "{nf4}"],
    "validate nf4 base": ["validate", "{code}", "--base", "{nf4}"],
    "diff": ["diff", "{chat}", "{code}"],
    "list": ["list"],
    "show": ["show", "code@1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_reporting_commands_import_no_heavy_module(
    command: str, files: dict[str, str], tmp_path: Path
) -> None:
    args = [a.format(**files) for a in COMMANDS[command]]
    out = tmp_path / "imported.json"
    proc = _run([sys.executable, "-c", CLI_SCRIPT, str(out), *args], files["home"])
    assert proc.stdout.strip()  # it did report something
    assert json.loads(out.read_text()) == [], f"adapterctl {' '.join(args)} imported them"


def test_loading_plugins_imports_no_heavy_module(files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "imported.json"
    _run([sys.executable, "-c", PLUGINS_SCRIPT, str(out)], files["home"])
    assert json.loads(out.read_text()) == []


def test_plain_cpu_merge_imports_no_heavy_module(files: dict[str, str], tmp_path: Path) -> None:
    """The NumPy engine merges the bf16 base (rounding by bit arithmetic) and ``--verify``
    re-reads it, with none of torch, bitsandbytes, ml_dtypes."""
    out = tmp_path / "imported.json"
    args = ["merge", files["base"], files["code"], "-o", str(tmp_path / "merged"), "--device",
            "cpu", "--verify"]  # fmt: skip
    _run([sys.executable, "-c", CLI_SCRIPT, str(out), *args], files["home"])
    assert json.loads(out.read_text()) == []


def test_bf16_and_float8_tensors_read_as_float32(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t[0, 0], t[1, 1] = float("inf"), float("nan")
    e4m3, e5m2 = t.to(torch.float8_e4m3fn), t.to(torch.float8_e5m2)
    save_file({"w": t, "e4m3": e4m3, "e5m2": e5m2}, str(tmp_path / "x.safetensors"))
    tensors = read_header(tmp_path / "x.safetensors").tensors
    for name, want in (("w", t), ("e4m3", e4m3), ("e5m2", e5m2)):
        got = tensors[name].array()
        assert got.dtype == np.float32 and got.shape == (3, 5), name
        assert np.array_equal(got, want.float().numpy(), equal_nan=True), name
    got = tensors["w"].array()
    assert struct.pack("<f", got[0, 0]) == struct.pack("<f", float("inf"))


# Without torch and bitsandbytes (as after `pip install adapterctl`): the core works, and what
# needs an extra says which one. The modules are blocked in a fresh interpreter, which is what
# a virtualenv without them looks like to Python.
NO_TORCH_SCRIPT = """
import sys
sys.modules["torch"] = None
sys.modules["bitsandbytes"] = None
sys.argv = ["adapterctl", *sys.argv[1:]]
from adapterctl.cli import main
main()
"""

CORE = {
    "inspect": ["inspect", "{code}", "--base", "{base}"],
    "validate": ["validate", "{chat}", "--base", "{base}"],
    "diff": ["diff", "{chat}", "{code}"],
    "add": ["add", "{chat}", "--name", "light", "--base", "{base}"],
    "list": ["list"],
    "merge": ["merge", "{base}", "{chat}", "-o", "{tmp}/merged", "--verify"],
}
NEED_EXTRA = {
    "merge --quantize nf4": (
        ["merge", "{base}", "{chat}", "-o", "{tmp}/q", "--quantize", "nf4"],
        "nf4",
    ),
    "merge from nf4": (["merge", "{nf4}", "{chat}", "-o", "{tmp}/q"], "nf4"),
    "merge --method": (
        [
            "merge",
            "{base}",
            "{chat}",
            "{code}",
            "-o",
            "{tmp}/m",
            "--method",
            "ties",
            "--density",
            "0.5",
        ],
        "torch",
    ),
    "compose": (["compose", "{chat}", "{code}", "-o", "{tmp}/c", "--method", "linear"], "torch"),
    "resize": (["resize", "{chat}", "-o", "{tmp}/r", "--rank", "2"], "torch"),
    "demo": (["demo"], "torch"),
}


def _no_torch(
    args: list[str], files: dict[str, str], tmp: Path
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERCTL_DEBUG"}
    env["ADAPTERCTL_HOME"] = str(tmp / "home")
    argv = [a.format(**files, tmp=tmp) for a in args]
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, *argv], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("command", list(CORE))
def test_the_core_works_without_torch(command: str, files: dict[str, str], tmp_path: Path) -> None:
    proc = _no_torch(CORE[command], files, tmp_path)
    assert proc.returncode == 0, proc.stderr
    if command == "merge":
        assert (tmp_path / "merged" / "model-00001-of-00002.safetensors").exists()


@pytest.mark.parametrize("command", list(NEED_EXTRA))
def test_what_needs_torch_names_the_extra(
    command: str, files: dict[str, str], tmp_path: Path
) -> None:
    args, extra = NEED_EXTRA[command]
    proc = _no_torch(args, files, tmp_path)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("Error: ") and f"pip install 'adapterctl[{extra}]'" in lines[0]
    assert not list(tmp_path.glob("[qmcr]")) and not list(tmp_path.glob(".*partial*"))
