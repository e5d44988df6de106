"""The plugin system: built-ins register through the same hooks; name clashes are errors."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapterctl import hookspecs, plugins
from adapterctl.cli import cli
from adapterctl.errors import Conflict
from adapterctl.hookspecs import hookimpl


class _Plugin:
    """A third-party plugin registering one format called ``name``."""

    def __init__(self, name: str) -> None:
        self.format_name = name

    @hookimpl
    def register_formats(self, register: Any) -> None:
        class Fmt:
            name = self.format_name
            description = "test format"

            def detect(self, path: Path) -> bool:
                return False

            def read(self, path: Path, options: Any) -> Any:
                raise AssertionError("never detected")

        register(Fmt())


@pytest.fixture
def extra_plugin() -> Iterator[list[object]]:
    added: list[object] = []
    yield added
    for p in added:
        plugins.manager().unregister(p)


def test_plugins_come_first_then_builtins(extra_plugin: list[object]) -> None:
    """Entry points, then ADAPTERCTL_PLUGINS_DIR (this one, registered last), then the
    built-ins, the bare reader last of all (it takes any .safetensors the others do not)."""
    plugin = _Plugin("testfmt")
    plugins.manager().register(plugin, name="test-fmt")
    extra_plugin.append(plugin)
    names = [f.name for f in plugins.collect("register_formats")]
    assert names[-4:] == ["testfmt", "peft", "mlx", "safetensors"]
    data = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).stdout)
    listed = {p["name"]: p for p in data["plugins"]}
    assert listed["test-fmt"]["registers"] == {"formats": ["testfmt"]}
    assert [f["name"] for f in data["formats"]] == names


def test_name_clash_is_an_error(extra_plugin: list[object]) -> None:
    plugin = _Plugin("peft")
    plugins.manager().register(plugin, name="test-clash")
    extra_plugin.append(plugin)
    with pytest.raises(
        Conflict,
        match=re.escape(
            "two plugins register formats 'peft': test-clash and adapterctl.formats.peft"
        ),
    ):
        plugins.collect("register_formats")
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 5
    assert "uninstall one of them" in result.output


# --- plugins from ADAPTERCTL_PLUGINS_DIR, through the command line -----------------------------

TOY = Path(__file__).parent / "plugin_files" / "toyplug.py"
REPO = Path(__file__).resolve().parents[1]


def _adapterctl(
    *args: str, plugins_dir: Path | None = None, load: str | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERCTL_")}
    if plugins_dir is not None:
        env["ADAPTERCTL_PLUGINS_DIR"] = str(plugins_dir)
    if load is not None:
        env["ADAPTERCTL_LOAD_PLUGINS"] = load
    if home is not None:
        env["ADAPTERCTL_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "adapterctl", *args], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toyplug.py").write_text(TOY.read_text())
    return folder


def test_a_plugin_adds_a_format_a_writer_a_method_and_a_command(
    toy_dir: Path, tmp_path: Path, peft_cases: Any
) -> None:
    """The test plugin's four registrations, each used through the command line."""
    src = peft_cases("llama_plain").path
    listed = json.loads(_adapterctl("plugins", "--json", plugins_dir=toy_dir).stdout)
    toy = {p["name"]: p for p in listed["plugins"]}["toyplug"]
    assert toy["source"] == str(toy_dir / "toyplug.py") and toy["version"] == "1.2.3"
    assert toy["registers"] == {
        "formats": ["toy"], "writers": ["toy"], "methods": ["first"], "commands": ["toy-hello"]
    }  # fmt: skip
    assert toy["error"] is None
    # the writer, then the format reading what it wrote: the same ΔW
    out = tmp_path / "x.toy"
    made = _adapterctl("convert", str(src), "--to", "toy", "-o", str(out), plugins_dir=toy_dir)
    assert made.returncode == 0, made.stderr
    assert "peft -> toy" in made.stdout
    shown = json.loads(_adapterctl("inspect", str(out), "--json", plugins_dir=toy_dir).stdout)
    assert shown["format"] == "toy"
    same = _adapterctl("diff", str(src), str(out), "--json", plugins_dir=toy_dir)
    assert json.loads(same.stdout)["verdict"] == "identical", same.stderr
    # the method
    other = peft_cases("llama_rslora").path
    composed = tmp_path / "first"
    run = _adapterctl(
        "compose", str(src), str(other), "--method", "first", "-o", str(composed),
        plugins_dir=toy_dir,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    same = _adapterctl("diff", str(src), str(composed), "--tol", "1e-4", "--json")
    assert json.loads(same.stdout)["verdict"] == "identical"
    # the command, and its error as one line with the documented code
    hello = _adapterctl("toy-hello", plugins_dir=toy_dir)
    assert (hello.returncode, hello.stdout) == (0, "hello from toy\n")
    failed = _adapterctl("toy-hello", "--fail", plugins_dir=toy_dir)
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == ["Error: --fail: asked to fail"]
    assert "toy-hello" in _adapterctl("--help", plugins_dir=toy_dir).stdout
    # without the plugin: the writer is unknown (exit 2, naming the ones there are)
    gone = _adapterctl("convert", str(src), "--to", "toy", "-o", str(tmp_path / "y.toy"), load="")
    assert gone.returncode == 2
    assert "--to 'toy': no such writer (there are: peft)" in gone.stderr


def test_convert_writes_peft_from_a_bare_file(peft_cases: Any, tmp_path: Path) -> None:
    """The built-in writer: a bare .safetensors (alpha given) becomes a PEFT folder with the
    same ΔW; OUT inside the input is refused."""
    src = peft_cases("llama_plain").path
    bare = tmp_path / "lora.safetensors"
    bare.write_bytes((src / "adapter_model.safetensors").read_bytes())
    out = tmp_path / "peft"
    run = CliRunner().invoke(
        cli, ["convert", str(bare), "--alpha", "8", "--to", "peft", "-o", str(out), "--json"]
    )
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert (report["source_format"], report["to"], report["out"]) == (
        "safetensors",
        "peft",
        str(out),
    )
    same = CliRunner().invoke(cli, ["diff", str(src), str(out), "--json"])
    assert json.loads(same.stdout)["verdict"] == "identical"
    inside = CliRunner().invoke(cli, ["convert", str(src), "--to", "peft", "-o", str(src / "x")])
    assert inside.exit_code == 5 and "destroy the input" in inside.output


def test_a_broken_plugin_is_named_and_other_commands_run(toy_dir: Path) -> None:
    """A plugin that fails to import, and one whose hook does not match its spec: each is left
    out with a one-line warning naming it; the commands still run; ``plugins`` lists why."""
    (toy_dir / "crash.py").write_text("raise ImportError('no module named torchvision')\n")
    (toy_dir / "wrongsig.py").write_text(
        "from adapterctl.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_formats(register, extra):\n    pass\n"
    )
    (toy_dir / "exiter.py").write_text("import sys\nsys.exit(3)\n")
    (toy_dir / "raiser.py").write_text(
        "from adapterctl.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_methods(register):\n    raise RuntimeError('boom')\n"
    )
    run = _adapterctl("methods", plugins_dir=toy_dir)
    assert run.returncode == 0 and "first" in run.stdout  # toyplug still loads
    warnings = run.stderr.splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: plugin ") for w in warnings)
    for why in (
        "plugin crash not loaded (ImportError: no module named torchvision)",
        "plugin exiter not loaded (SystemExit: 3)",
        "plugin wrongsig not loaded (PluginValidationError",
        "plugin raiser not loaded (its register_methods raised RuntimeError: boom)",
    ):
        assert sum(why in w for w in warnings) == 1, (why, warnings)
    listed = json.loads(_adapterctl("plugins", "--json", plugins_dir=toy_dir).stdout)
    errors = {p["name"]: p["error"] for p in listed["plugins"]}
    assert errors["crash"] == "ImportError: no module named torchvision"
    assert errors["toyplug"] is None
    text = _adapterctl("plugins", plugins_dir=toy_dir).stdout
    assert "plugin crash (" in text and "NOT LOADED: ImportError" in text
    missing = _adapterctl("methods", plugins_dir=toy_dir / "nowhere")
    assert missing.returncode == 0
    assert "nowhere: no such folder" in missing.stderr


def test_load_plugins_selects(toy_dir: Path) -> None:
    """ADAPTERCTL_LOAD_PLUGINS: empty, built-ins only; a list of names, those only."""
    none = json.loads(_adapterctl("plugins", "--json", plugins_dir=toy_dir, load="").stdout)
    assert all(p["source"] == "built-in" for p in none["plugins"])
    only = json.loads(_adapterctl("plugins", "--json", plugins_dir=toy_dir, load="toyplug").stdout)
    names = {p["name"] for p in only["plugins"] if p["source"] != "built-in"}
    assert names == {"toyplug"}  # the installed kernel plugin (fused) is not selected


def test_a_plugin_command_may_not_take_a_builtin_name(toy_dir: Path) -> None:
    (toy_dir / "takeover.py").write_text(
        "import click\nfrom adapterctl.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_commands(cli):\n"
        "    @cli.command('merge')\n    def merge():\n        click.echo('mine')\n"
    )
    run = _adapterctl("plugins", plugins_dir=toy_dir)
    assert run.returncode == 5
    assert run.stderr.splitlines()[-1] == (
        "Error: plugin takeover adds command 'merge', which adapterctl has; uninstall one of them"
    )
    help_ = _adapterctl("--help", plugins_dir=toy_dir)  # --help still lists the built-ins
    assert help_.returncode == 0 and "merge" in help_.stdout and "takeover" in help_.stderr


def test_the_authors_guide_matches_the_hookspecs() -> None:
    """plugins/README.md gives every hook with its exact signature."""
    guide = (REPO / "plugins" / "README.md").read_text()
    documented = dict(re.findall(r"^def (register_\w+)(\(.*\) -> None): \.\.\.$", guide, re.M))
    specs = {
        name: f"{sig}"
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("register_")
        for sig in [inspect.signature(fn)]
    }
    assert set(documented) == set(specs)
    for name, sig in specs.items():
        assert documented[name] == str(sig).replace("'", ""), name
