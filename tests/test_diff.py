"""``diff`` against dense float64 computations; factorization invariance; the CLI verdict."""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import edit_config, llama_model, peft_adapter
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapterctl.cli import cli
from adapterctl.diff import diff
from adapterctl.formats import read
from adapterctl.lowrank import difference_norm, inner_product


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """x: r=4 on q,v; y: rsLoRA r=2 on q,o (q is common)."""
    root = tmp_path_factory.mktemp("diff")
    base = llama_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, x = peft_adapter(copy.deepcopy(base), root / "x", seed=1)
        _, y = peft_adapter(copy.deepcopy(base), root / "y", seed=2, r=2, use_rslora=True,
                            target_modules=["q_proj", "o_proj"])  # fmt: skip
    return {"x": x, "y": y, "root": root}


def _dense(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = scale·B·A per module in float64, straight from the file and config."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for k, a in t.items():
        if ".lora_A." not in k:
            continue
        name = k.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = t[k.replace(".lora_A.", ".lora_B.")].double()
        r = a.shape[0]
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
        out[name] = scale * (b @ a.double())  # (out, r) @ (r, in)
    return out


def _basis(x: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, : int((s > 1e-10 * s[0]).sum())]


def test_numbers_equal_dense_float64(pair: dict[str, Path]) -> None:
    report = diff(read(pair["x"]), read(pair["y"]))
    dx, dy = _dense(pair["x"]), _dense(pair["y"])
    common = sorted(set(dx) & set(dy))
    assert [m.name for m in report.modules] == common
    for m in report.modules:
        x, y = dx[m.name], dy[m.name]
        nx, ny = float(torch.linalg.matrix_norm(x)), float(torch.linalg.matrix_norm(y))
        d = float(torch.linalg.matrix_norm(x - y))
        assert m.norm_a == pytest.approx(nx, rel=1e-12)
        assert m.norm_b == pytest.approx(ny, rel=1e-12)
        assert m.difference == pytest.approx(d, rel=1e-10)
        assert m.relative_difference == pytest.approx(d / nx, rel=1e-10)
        assert m.cosine == pytest.approx(float((x * y).sum()) / (nx * ny), rel=1e-10, abs=1e-12)
        cos = torch.linalg.svdvals(_basis(x).T @ _basis(y)).clamp(max=1.0)
        want = sorted(math.degrees(math.acos(float(c))) for c in cos)
        assert m.principal_angles == pytest.approx(want, abs=1e-6)
        assert m.subspace_overlap == pytest.approx(float(cos.square().mean()), rel=1e-10)
    assert report.only_in_a == sorted(set(dx) - set(dy))
    assert report.only_in_b == sorted(set(dy) - set(dx))
    assert report.verdict == "different"
    fields = {c.field for c in report.config}
    assert {"ranks", "scaling_rule", "targets"} <= fields


def test_factorization_invariance(pair: dict[str, Path], tmp_path: Path) -> None:
    """(B·Q, Q⁻¹·A) and a zero-padded rank-6 factorization have the same ΔW: identical."""
    x = pair["x"]
    t = load_file(str(x / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    same, padded = {}, {}
    for k, a in t.items():
        if ".lora_A." not in k:
            continue
        kb = k.replace(".lora_A.", ".lora_B.")
        a64, b64 = a.double(), t[kb].double()
        q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
        q = q @ torch.diag(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64))
        same[k], same[kb] = (torch.linalg.inv(q) @ a64).float(), (b64 @ q).float()
        extra = torch.randn(2, a.shape[1], generator=g)
        padded[k] = torch.cat([a, extra])  # (6, in)
        padded[kb] = torch.cat([t[kb], torch.zeros(t[kb].shape[0], 2)], dim=1)  # (out, 6)
    for name, tensors, r in (("same", same, 4), ("padded", padded, 6)):
        d = shutil.copytree(x, tmp_path / name)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        edit_config(d, r=r, lora_alpha=8 * r / 4)  # alpha/r unchanged
        report = diff(read(x), read(d))
        assert report.verdict == "identical", report.max_relative_difference
        assert report.max_relative_difference is not None and report.max_relative_difference < 1e-6
        assert all(m.cosine == pytest.approx(1.0, abs=1e-9) for m in report.modules)
        assert all(m.subspace_overlap == pytest.approx(1.0, abs=1e-9) for m in report.modules)
    assert any(c.field == "ranks" for c in diff(read(x), read(tmp_path / "padded")).config)


def test_difference_through_stacked_factors_does_not_cancel() -> None:
    """X and Y = X + εE·A differ by ε‖E·A‖; the expanded ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ loses it."""
    g = torch.Generator().manual_seed(1)
    b = torch.randn(64, 4, generator=g, dtype=torch.float64)
    a = torch.randn(4, 48, generator=g, dtype=torch.float64)
    e = torch.randn(64, 4, generator=g, dtype=torch.float64)
    eps = 1e-9
    exact = eps * float(torch.linalg.matrix_norm(e @ a))
    got = difference_norm(b, a, b + eps * e, a)
    assert got == pytest.approx(exact, rel=1e-6)
    y = b + eps * e
    expanded = float(inner_product(b, a, b, a) + inner_product(y, a, y, a))
    expanded -= 2 * float(inner_product(b, a, y, a))
    naive = math.sqrt(max(expanded, 0.0))
    assert abs(naive - exact) > 0.1 * exact  # what the expansion would have reported


def test_cli_verdicts(pair: dict[str, Path]) -> None:
    x, y = str(pair["x"]), str(pair["y"])
    r = CliRunner().invoke(cli, ["diff", x, x])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("identical (max relative difference")
    r = CliRunner().invoke(cli, ["diff", x, y])
    assert r.exit_code == 0
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("different:") and "most different: model.layers." in last
    assert "only in A (" in r.output and "only in B (" in r.output
    r = CliRunner().invoke(cli, ["diff", x, y, "--json", "--tol", "1e3"])
    data: dict[str, Any] = json.loads(r.stdout)
    assert data["tol"] == 1000.0
    assert data["verdict"] == "different"  # modules only one side updates still differ
    assert data["most_different"] == data["only_in_a"] + data["only_in_b"]
    r = CliRunner().invoke(cli, ["diff", x, str(pair["root"] / "missing")])
    assert r.exit_code == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_refused_not_crashed_on(
    pair: dict[str, Path], tmp_path: Path, bad: float
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pair["x"], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key][0, 0] = bad
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    for args, side in (([pair["x"], broken], "B"), ([broken, pair["y"]], "A")):
        r = CliRunner().invoke(cli, ["diff", *map(str, args)])
        assert r.exit_code == 3, r.output
        assert r.stderr.strip().splitlines() == [
            "Error: model.layers.0.self_attn.q_proj: adapter "
            f"{side}'s factors hold NaN or Inf, so its update has no norm to compare; "
            "find the broken modules with: adapterctl validate SOURCE"
        ]
