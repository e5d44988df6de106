"""``resize``: Eckart–Young from the small core, energy-chosen ranks as rank_pattern, PEFT loads."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import llama_model, peft_adapter
from click.testing import CliRunner

from adapterctl.cli import cli
from adapterctl.diff import diff
from adapterctl.formats import read


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An rsLoRA r=8 adapter on every linear layer of a tiny Llama (float32)."""
    root = tmp_path_factory.mktemp("resize")
    base = llama_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, path = peft_adapter(copy.deepcopy(base), root / "src", r=8, use_rslora=True,
                                target_modules="all-linear")  # fmt: skip
    return {"base": base, "pm": pm, "path": path, "root": root}


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {n: m.delta(torch.float64) for n, m in read(path).modules.items()}


def _resize(*args: str) -> Any:
    return CliRunner().invoke(cli, ["resize", *args])


def test_rank_is_the_best_approximation_and_loads(source: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "r3"
    r = _resize(str(source["path"]), "-o", str(out), "--rank", "3", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    before, after = _deltas(source["path"]), _deltas(out)
    kept = total = 0.0
    for name, x in before.items():
        s, s_new = torch.linalg.svdvals(x), torch.linalg.svdvals(after[name])
        torch.testing.assert_close(s_new[:3], s[:3], rtol=0, atol=1e-5 * float(s[0]))
        assert float(s_new[3:].abs().sum()) <= 1e-5 * float(s[0])
        kept += float(s[:3].square().sum())
        total += float(s.square().sum())
    assert report["ranks"] == [3]
    assert report["energy_kept"] == pytest.approx(kept / total, rel=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (3, 3, False)
    base = source["base"]
    ref = copy.deepcopy(base)
    state = ref.state_dict()
    ref.load_state_dict({k: v + after[k[: -len(".weight")]].float() if k[: -len(".weight")]
                         in after else v for k, v in state.items()})  # fmt: skip
    model = PeftModel.from_pretrained(copy.deepcopy(base), out)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_energy_picks_the_smallest_rank_per_module(source: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    out = tmp_path / "e"
    r = _resize(str(source["path"]), "-o", str(out), "--energy", "0.9", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    before = _deltas(source["path"])
    ranks = {}
    for m in report["modules"]:
        e = torch.linalg.svdvals(before[m["name"]]).square()
        cum = e.cumsum(0) / e.sum()
        k = m["rank"]
        assert float(cum[k - 1]) >= 0.9 and (k == 1 or float(cum[k - 2]) < 0.9), m
        assert m["energy_kept"] == pytest.approx(float(cum[k - 1]), rel=1e-9)
        ranks[m["name"]] = k
    assert len(set(ranks.values())) > 1
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    model = PeftModel.from_pretrained(copy.deepcopy(source["base"]), out)
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            assert layer.r["default"] == ranks[name], name
            assert layer.scaling["default"] == 1.0


def test_rank_at_or_above_the_source_is_exact(source: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "same"
    assert _resize(str(source["path"]), "-o", str(out), "--rank", "8").exit_code == 0
    assert diff(read(source["path"]), read(out)).verdict == "identical"
    r = _resize(str(source["path"]), "-o", str(tmp_path / "big"), "--rank", "64")
    assert r.exit_code == 0 and "energy kept 100%" in r.output


def test_bad_arguments(source: dict[str, Any], tmp_path: Path) -> None:
    src, out = str(source["path"]), str(tmp_path / "o")
    r = _resize(src, "-o", out)
    assert r.exit_code == 2 and "exactly one of --rank R or --energy E" in r.output
    r = _resize(src, "-o", out, "--rank", "2", "--energy", "0.5")
    assert r.exit_code == 2
    r = _resize(src, "-o", out, "--energy", "1.5")
    assert r.exit_code == 2 and "(0, 1]" in r.output
    r = _resize(src, "-o", out, "--rank", "0")
    assert r.exit_code == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, dora = peft_adapter(copy.deepcopy(source["base"]), tmp_path / "dora", use_dora=True)
    r = _resize(str(dora), "-o", out, "--rank", "2")
    assert r.exit_code == 3 and "DoRA" in r.output
    r = _resize(src, "-o", str(source["path"]), "--rank", "2")
    assert r.exit_code == 5
