"""Registry inputs to compose: base pins must agree, and --register records lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import llama_model, peft_adapter, save_base
from click.testing import CliRunner

from adapterctl.cli import cli


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _add(runner: CliRunner, path: Path, name: str, base: Path) -> None:
    r = runner.invoke(cli, ["add", str(path), "--name", name, "--base", str(base)])
    assert r.exit_code == 0, r.output


def test_compose_register_records_parents(home: Path, tmp_path: Path) -> None:
    base = save_base(llama_model(), tmp_path / "base", torch.bfloat16)
    _, a1 = peft_adapter(llama_model(), tmp_path / "a1", seed=1)
    _, a2 = peft_adapter(llama_model(), tmp_path / "a2", seed=2)
    runner = CliRunner()
    _add(runner, a1, "chat", base)
    _add(runner, a2, "code", base)
    r = runner.invoke(
        cli,
        ["compose", "chat@1", "code@latest", "-w", "0.7", "-w", "0.3", "--method", "ties",
         "--density", "0.5", "-o", str(tmp_path / "mix"), "--register", "mix"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "registered as mix@1" in r.stderr
    shown = json.loads(runner.invoke(cli, ["show", "mix@1", "--json"]).stdout)
    assert [(p["ref"], p["weight"]) for p in shown["parents"]] == [("chat@1", 0.7), ("code@1", 0.3)]
    assert shown["method"] == "ties" and shown["options"]["density"] == 0.5
    # The composed adapter inherits the parents' shared base pin.
    assert shown["base"]["level"] == "fingerprint"
    r = runner.invoke(cli, ["compose", str(a1), "chat@1", "--method", "linear", "-o",
                            str(tmp_path / "x"), "--register", "x"])  # fmt: skip
    assert r.exit_code == 2 and "registry reference" in r.output


def test_compose_refuses_inputs_pinned_to_different_bases(home: Path, tmp_path: Path) -> None:
    base16 = save_base(llama_model(), tmp_path / "b16", torch.bfloat16)
    base32 = save_base(llama_model(), tmp_path / "b32")  # same shapes, other dtype
    _, a1 = peft_adapter(llama_model(), tmp_path / "a1", seed=1)
    _, a2 = peft_adapter(llama_model(), tmp_path / "a2", seed=2)
    runner = CliRunner()
    _add(runner, a1, "one", base16)
    _add(runner, a2, "two", base32)
    args = ["compose", "one@1", "two@1", "--method", "linear", "-o", str(tmp_path / "o")]
    r = runner.invoke(cli, args)
    assert r.exit_code == 5, r.output
    assert "pinned to different bases" in r.output and "--allow-base-mismatch" in r.output
    assert not (tmp_path / "o").exists()
    r = runner.invoke(cli, [*args, "--allow-base-mismatch"])
    assert r.exit_code == 0, r.output
    assert "pinned to different bases" in r.stderr
