"""``adapterctl demo``: runs end to end, exits 0, shows each step, needs no transformers/PEFT."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import COMMAND_MODULES, cli
from adapterctl.demo import build, steps
from adapterctl.formats import read

HAS_VALIDATE = "validate" in COMMAND_MODULES


@pytest.fixture(scope="module")
def demo_output() -> str:
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    return result.output


def test_demo_walks_through_the_commands(demo_output: str) -> None:
    out = demo_output
    for line in (
        "$ adapterctl inspect adapters/chat-lora",
        "$ adapterctl inspect adapters/code-rslora --spectrum",
        "$ adapterctl inspect adapters/chat-lora --base base/tiny-llama",
        "$ adapterctl inspect adapters/broken-lora --base base/tiny-llama",
    ):
        assert f"\n{line}\n" in out
    assert re.search(r"^scaling\s+alpha/sqrt\(r\)$", out, re.M)  # rsLoRA
    assert re.search(r"^base\s+base/tiny-llama \(LlamaForCausalLM\)$", out, re.M)
    assert "base/tiny-llama/model-00002-of-00002.safetensors" in out  # sharded
    assert "model.layers.3.self_attn.q_proj" in out  # the broken adapter's extra layers
    assert "Demo files removed" in out
    folder = re.search(r"files in (\S+)", out)
    assert folder and not Path(folder.group(1)).exists()


@pytest.mark.skipif(not HAS_VALIDATE, reason="no validate command yet")
def test_demo_validates_and_survives_the_broken_adapter(demo_output: str) -> None:
    good = "$ adapterctl validate adapters/chat-lora --base base/tiny-llama\nok: "
    assert good in demo_output
    broken = demo_output.split("$ adapterctl validate adapters/broken-lora --base base/tiny-llama")
    assert len(broken) == 2
    after = broken[1]
    assert "ERROR " in after
    assert "FAILED" in after
    assert "[exit 3 (expected)]" in after


@pytest.mark.skipif("merge" not in COMMAND_MODULES, reason="no merge command yet")
def test_demo_merges(demo_output: str) -> None:
    steps = demo_output.split("\n$ adapterctl ")
    merges = [s for s in steps if s.startswith("merge ")]
    assert len(merges) == 2
    assert "wrote merged/tiny-llama" in merges[0]
    assert "wrote merged/ties" in merges[1]
    assert "base pin checked by fingerprint" in merges[1]
    assert "registered as chat-code-merged@1" in merges[1]
    assert not any("[exit" in m for m in merges)


def test_demo_keep(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--keep", str(keep)])
    assert result.exit_code == 0, result.output
    assert f"Demo files kept in {keep}" in result.output
    ckpt = open_checkpoint(keep / "base" / "tiny-llama")
    assert len(ckpt.shards) == 2
    assert ckpt.architecture == "LlamaForCausalLM"
    assert {info.dtype for info in ckpt.tensors.values()} == {"BF16"}
    for name in ("chat-lora", "code-rslora", "broken-lora"):
        adapter = read(keep / "adapters" / name)
        assert adapter.format == "peft"
        assert adapter.modules


def test_demo_keep_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "--keep", str(tmp_path)])
    assert result.exit_code == 5
    assert result.stderr.startswith(f"Error: {tmp_path}: not empty")
    assert (tmp_path / "something").read_text() == "mine"


def _digests(root: Path) -> dict[str, str]:
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


def test_demo_files_are_reproducible(tmp_path: Path) -> None:
    build(tmp_path / "one")
    build(tmp_path / "two")
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


def test_step_list_follows_the_commands_present(tmp_path: Path) -> None:
    files = build(tmp_path)
    commands = [s.args[0] for s in steps(files)]
    assert commands[:4] == ["inspect"] * 4
    assert ("validate" in commands) == HAS_VALIDATE
    assert ("merge" in commands) == ("merge" in COMMAND_MODULES)
    assert all(s.command.startswith("adapterctl ") for s in steps(files))


def test_demo_needs_neither_transformers_nor_peft() -> None:
    code = (
        "import sys\n"
        "from adapterctl.cli import cli\n"
        "cli.main(['demo'], prog_name='adapterctl', standalone_mode=False)\n"
        "bad = sorted(m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("ok")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # importing transformers + PEFT dominates: deselect with -m 'not slow'
def test_demo_files_load_in_transformers_and_peft(tmp_path: Path) -> None:
    """The oracle: the demo writes what transformers and PEFT write, so they load it, and
    PEFT's ΔW equals ours."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    files = build(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path / files.base, dtype=torch.float32)
    name = "model.layers.1.self_attn.v_proj"
    for adapter_name in ("chat-lora", "code-rslora"):
        path = tmp_path / files.adapters[adapter_name]
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name)
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            expected = layer.get_delta_weight(adapter_name).double()
        ours = read(path).modules[name].delta(torch.float64)
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)
        model = peft_model.unload()


def test_demo_json_reports_every_step(tmp_path: Path, demo_output: str) -> None:
    """--json prints one JSON document: the files and, per step, its command, exit code (the
    expected one) and captured output, the same steps the text walk-through shows."""
    import json

    result = CliRunner().invoke(cli, ["demo", "--keep", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kept"] and report["root"] == str(tmp_path / "d")
    assert {f["path"] for f in report["files"]} >= {"base/tiny-llama/config.json"}
    assert [s["exit_code"] for s in report["steps"]] == [
        s["expected_exit"] for s in report["steps"]
    ]
    for step in report["steps"]:
        assert f"$ {step['command']}" in demo_output
        assert step["stdout"].startswith(f"\n# {step['note']}\n$ {step['command']}\n")
