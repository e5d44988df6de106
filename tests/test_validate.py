"""``validate``: every rule fires on an adapter built to break it and stays quiet on a good one;
the CLI's exit codes, text, JSON, GitHub annotations and JUnit XML."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import cli
from adapterctl.formats import read
from adapterctl.validate import RULES, VLLM_MAX_LORA_RANKS, ValidationReport, validate
from tests.builders import edit_config, gpt2_model, llama_model, peft_adapter, save_base

WEIGHTS = "adapter_model.safetensors"


# --- helpers --------------------------------------------------------------------------------


def rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load an adapter's safetensors, let ``change`` edit the dict in place, save it back."""
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS)
    return path


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    """A hand-made PEFT folder (for layouts the tiny transformers models do not have)."""
    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": None} | config
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / WEIGHTS)
    return path


def copy_of(src: Path, tmp_path: Path, **config: Any) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return edit_config(dst, **config) if config else dst


def run_validate(
    adapter: Path, base: Path | None = None, target: str = "peft", max_rank: int = 16
) -> ValidationReport:
    ckpt = open_checkpoint(base) if base is not None else None
    return validate(read(adapter), base=ckpt, target=target, max_rank=max_rank)


def codes(report: ValidationReport) -> set[str]:
    return {f.code for f in report.findings}


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(cli, ["validate", *map(str, args)])


# --- fixtures: tiny models and adapters, built once per module --------------------------------


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("validate")
    out: dict[str, Path] = {}
    out["llama_base"] = save_base(llama_model(), d / "Llama-Tiny")
    out["llama_base_v80"] = save_base(llama_model(vocab=80), d / "Llama-Tiny-v80")
    out["gpt2_base"] = save_base(gpt2_model(), d / "gpt2-tiny")
    _, out["good"] = peft_adapter(llama_model(), d / "good")
    _, out["four_layers"] = peft_adapter(llama_model(layers=4), d / "four_layers")
    _, out["gpt2"] = peft_adapter(gpt2_model(), d / "gpt2", target_modules=["c_attn"])
    _, out["gpt2_wte"] = peft_adapter(gpt2_model(), d / "gpt2_wte", target_modules=["wte"])
    _, out["embed"] = peft_adapter(
        llama_model(), d / "embed", target_modules=["q_proj", "embed_tokens"]
    )
    _, out["dora"] = peft_adapter(llama_model(), d / "dora", use_dora=True)
    _, out["lora_bias"] = peft_adapter(llama_model(), d / "lora_bias", lora_bias=True)
    return out


@pytest.fixture(scope="module")
def nf4_base(w: dict[str, Path]) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        w["llama_base"], quantization_config=qc, device_map="cpu"
    )
    out = w["llama_base"].parent / "Llama-Tiny-bnb-4bit"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base that stores its experts fused (3-D) and an adapter with per-expert modules."""
    d = tmp_path_factory.mktemp("moe")
    base = d / "moe-base"
    base.mkdir()
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16),
            "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 64, 16),
        },
        base / "model.safetensors",
    )
    (base / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 1}))
    p = "base_model.model.model.layers.0."
    adapter = write_adapter(
        d / "moe-adapter",
        {
            p + "self_attn.q_proj.lora_A.weight": torch.randn(4, 16),
            p + "self_attn.q_proj.lora_B.weight": torch.randn(16, 4),
            p + "mlp.experts.0.gate_proj.lora_A.weight": torch.randn(4, 16),
            p + "mlp.experts.0.gate_proj.lora_B.weight": torch.randn(32, 4),
        },
    )
    return adapter, base


# --- every rule fires on a broken case ------------------------------------------------------

Case = Callable[[dict[str, Path], Path], tuple[Path, "Path | None", str, int]]
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _drop_b(t: dict[str, torch.Tensor]) -> None:
    del t[f"{Q0}.lora_B.weight"]


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_A.weight"][0, 0] = float("nan")


def _zero_b(t: dict[str, torch.Tensor]) -> None:
    for k in t:
        if ".lora_B." in k:
            t[k] = torch.zeros_like(t[k])


def _only_unknown(t: dict[str, torch.Tensor]) -> None:
    t.clear()
    t["something_else"] = torch.ones(2)


def _unknown(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_C.weight"] = torch.ones(2, 2)


def _undeclared_copy(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(64, 16)


def _rename_q0(t: dict[str, torch.Tensor]) -> None:
    for part in ("lora_A", "lora_B"):
        t[f"{Q0.replace('q_proj', 'x_proj')}.{part}.weight"] = t.pop(f"{Q0}.{part}.weight")


def _narrow_a(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q0}.lora_A.weight"] = torch.randn(4, 12)


def _score_head(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.score.modules_to_save.default.weight"] = torch.randn(3, 16)


def _bigger_embed(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.embed_tokens.modules_to_save.default.weight"] = torch.randn(80, 16)


def _conv_adapter(tmp: Path) -> Path:
    return write_adapter(
        tmp / "conv",
        {
            "base_model.model.conv.lora_A.weight": torch.randn(4, 3, 3, 3),
            "base_model.model.conv.lora_B.weight": torch.randn(8, 4, 1, 1),
        },
    )


def case(
    adapter: Path, base: Path | None = None, target: str = "peft", max_rank: int = 16
) -> tuple[Path, Path | None, str, int]:
    return adapter, base, target, max_rank


def good(w: dict[str, Path], tmp: Path, change: Any = None, **config: Any) -> Path:
    """A copy of the good adapter with config keys changed and tensors edited by ``change``."""
    path = copy_of(w["good"], tmp, **config)
    return rewrite_tensors(path, change) if change else path


# case id ("CODE" or "CODE-variant") -> (adapter, base, target, max_rank)
FIRES: dict[str, Case] = {
    "AC101-bias": lambda w, t: case(good(w, t, bias="weird")),
    "AC101-dora": lambda w, t: case(good(w, t, use_dora=True)),
    "AC102": lambda w, t: case(good(w, t, _drop_b)),
    "AC103": lambda w, t: case(good(w, t, r=8)),
    "AC104": lambda w, t: case(good(w, t, _nan)),
    "AC105": lambda w, t: case(good(w, t, _zero_b)),
    "AC106": lambda w, t: case(good(w, t, _only_unknown)),
    "AC107": lambda w, t: case(good(w, t, _unknown)),
    "AC108-declared": lambda w, t: case(good(w, t, modules_to_save=["lm_head"])),
    "AC108-saved": lambda w, t: case(good(w, t, _undeclared_copy)),
    "AC201": lambda w, t: case(good(w, t, _rename_q0), w["llama_base"]),
    "AC202": lambda w, t: case(good(w, t, _narrow_a), w["llama_base"]),
    "AC203": lambda w, t: case(w["four_layers"], w["llama_base"]),
    "AC204": lambda w, t: case(w["gpt2"], w["llama_base"]),
    "AC205": lambda w, t: case(w["embed"], w["llama_base_v80"]),
    "AC206": lambda w, t: case(w["gpt2_wte"], w["gpt2_base"]),
    "AC207": lambda w, t: case(good(w, t, init_lora_weights="pissa_niter_4"), w["llama_base"]),
    "AC208": lambda w, t: case(good(w, t, layer_replication=[[0, 2], [1, 2]]), w["llama_base"]),
    "AC209": lambda w, t: case(
        good(w, t, base_model_name_or_path="meta-llama/Llama-3.2-1B"), w["llama_base"]
    ),
    "AC210": lambda w, t: case(good(w, t, _score_head, modules_to_save=["score"]), w["llama_base"]),
    "AC301": lambda w, t: case(w["good"], None, "vllm", max_rank=1),
    "AC302": lambda w, t: case(w["dora"], None, "vllm"),
    "AC303-lora-bias": lambda w, t: case(w["lora_bias"], None, "vllm"),
    "AC303-bias-all": lambda w, t: case(good(w, t, bias="all"), None, "vllm"),
    "AC304": lambda w, t: case(good(w, t, modules_to_save=["lm_head"]), None, "vllm"),
    "AC305": lambda w, t: case(_conv_adapter(t), None, "vllm"),
    "AC306": lambda w, t: case(w["embed"], None, "vllm"),
    "AC311": lambda w, t: case(good(w, t, use_rslora=True), None, "llama.cpp"),
    "AC312": lambda w, t: case(good(w, t, alpha_pattern={"q_proj": 16}), None, "llama.cpp"),
    "AC313": lambda w, t: case(w["dora"], None, "llama.cpp"),
    "AC314-copy": lambda w, t: case(good(w, t, _undeclared_copy), None, "llama.cpp"),
    "AC314-bias": lambda w, t: case(w["lora_bias"], None, "llama.cpp"),
    "AC315": lambda w, t: case(
        good(w, t, _bigger_embed, modules_to_save=["embed_tokens"]), w["llama_base"], "llama.cpp"
    ),
}


@pytest.mark.parametrize("case", sorted(FIRES))
def test_rule_fires(case: str, w: dict[str, Path], tmp_path: Path) -> None:
    code = case.split("-")[0]
    adapter, base, target, max_rank = FIRES[case](w, tmp_path)
    report = run_validate(adapter, base, target, max_rank)
    assert code in report.rules_checked
    assert code in codes(report), report.findings
    f = report.findings_for(code)[0]
    assert f.severity == RULES[code].severity
    if f.severity == "error":
        assert not report.ok


def test_fused_experts_fire(moe: tuple[Path, Path]) -> None:
    report = run_validate(*moe)
    assert [f.module for f in report.findings_for("AC211")] == [
        "model.layers.0.mlp.experts.0.gate_proj"
    ]
    assert "AC201" not in codes(report)  # said once, by AC211


def test_nf4_base_is_info_only(w: dict[str, Path], nf4_base: Path) -> None:
    report = run_validate(w["good"], nf4_base)
    assert [f.code for f in report.findings] == ["AC212"]
    assert report.ok and report.matched_modules == 4
    assert "nf4" in report.findings[0].message


def test_every_rule_has_a_firing_case() -> None:
    # AC213 (a broken 4-bit base) fires in test_hardening_headers.py.
    fired = {c.split("-")[0] for c in FIRES} | {"AC211", "AC212", "AC213"}
    assert fired == set(RULES)


# --- … and stays quiet on a good adapter ----------------------------------------------------


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_quiet_on_matching_adapter(code: str, w: dict[str, Path]) -> None:
    scope = RULES[code].scope
    target = scope if scope in ("vllm", "llama.cpp") else "peft"
    report = run_validate(w["good"], w["llama_base"], target)
    assert code in report.rules_checked
    assert report.findings == []


@pytest.mark.parametrize(
    ("b", "a", "codes"),
    [
        # B·A = 1·1 + 1·(−1) = 0 although neither factor is zero: the update is zero.
        ([[1.0, 1.0]], [[1.0], [-1.0]], ["AC105"]),
        # Squares of 1e-30 underflow in float32: tiny, yet not zero.
        ([[1e-30, 0.0]], [[1e-30], [0.0]], []),
        # Squares of 1e20 overflow float32: large, yet finite.
        ([[1e20, 0.0]], [[1.0], [0.0]], []),
        ([[float("inf"), 0.0]], [[1.0], [0.0]], ["AC104"]),
        ([[1.0, 0.0]], [[float("nan")], [0.0]], ["AC104"]),
    ],
    ids=["cancelling", "tiny", "huge", "inf", "nan"],
)
def test_zero_and_non_finite_updates_are_decided_exactly(
    b: list[list[float]], a: list[list[float]], codes: list[str], tmp_path: Path
) -> None:
    """The factors' checks take a float32 shortcut through their Gram matrices; the cases at
    its edges (cancellation, underflow, overflow, Inf and NaN) are decided exactly."""
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{m}.lora_B.weight": torch.tensor(b), f"{m}.lora_A.weight": torch.tensor(a)}
    adapter = write_adapter(tmp_path / "a", tensors, r=2, lora_alpha=2)
    report = run_validate(adapter)
    assert sorted({f.code for f in report.findings if f.severity == "error"}) == codes


def test_good_adapter_without_base_checks_structure_only(w: dict[str, Path]) -> None:
    report = run_validate(w["good"])
    assert report.findings == [] and report.ok
    assert all(RULES[c].scope == "structure" for c in report.rules_checked)


@pytest.mark.parametrize(
    "named",
    [
        "unsloth/Llama-Tiny-bnb-4bit",
        "my-org/llama-tiny",
        "/data/models/Llama-Tiny/",
        "/root/.cache/huggingface/hub/models--org--Llama-Tiny-4bit/snapshots/0123abcd",
    ],
)
def test_base_name_compared_loosely(named: str, w: dict[str, Path], tmp_path: Path) -> None:
    adapter = copy_of(w["good"], tmp_path, base_model_name_or_path=named)
    assert "AC209" not in codes(run_validate(adapter, w["llama_base"]))


def test_rank_pattern_is_fine_for_llama_cpp(w: dict[str, Path], tmp_path: Path) -> None:
    # llama.cpp reads each tensor's rank, so a rank_pattern alone keeps the right scale.
    _, adapter = peft_adapter(llama_model(), tmp_path / "rp", rank_pattern={"v_proj": 2})
    report = run_validate(adapter, None, "llama.cpp")
    assert report.findings == []


def test_vllm_rank_hint_names_the_next_allowed_rank(w: dict[str, Path]) -> None:
    (f,) = run_validate(w["good"], None, "vllm", max_rank=1).findings
    assert "--max-lora-rank 8" in f.message
    assert VLLM_MAX_LORA_RANKS[0] == 1


def test_gpt2_adapter_against_llama_base(w: dict[str, Path]) -> None:
    report = run_validate(w["gpt2"], w["llama_base"])
    assert codes(report) == {"AC204"}
    assert report.matched_modules == 0
    assert "GPT2LMHeadModel" in report.findings[0].message
    assert "LlamaForCausalLM" in report.findings[0].message


def test_extra_layers_are_not_also_missing_targets(w: dict[str, Path]) -> None:
    report = run_validate(w["four_layers"], w["llama_base"])
    assert codes(report) == {"AC203"}
    assert "layer(s) 2–3" in report.findings[0].message


def test_gpt2_adapter_fits_gpt2_base(w: dict[str, Path]) -> None:
    report = run_validate(w["gpt2"], w["gpt2_base"])
    assert report.findings == [] and report.matched_modules == 2


# --- CLI ------------------------------------------------------------------------------------


def test_cli_matching_adapter_passes(w: dict[str, Path]) -> None:
    result = invoke(w["good"], "--base", w["llama_base"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: 0 error(s), 0 warning(s), 0 info")


def test_cli_text_lines_and_exit_3(w: dict[str, Path]) -> None:
    result = invoke(w["four_layers"], "--base", w["llama_base"])
    assert result.exit_code == 3
    first, last = result.output.strip().splitlines()
    assert first.startswith("ERROR AC203: 4 module(s) target layer(s) 2–3")
    assert last.startswith("FAILED: 1 error(s)")


def test_cli_nf4_base(w: dict[str, Path], nf4_base: Path) -> None:
    result = invoke(w["good"], "--base", nf4_base)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("INFO AC212: the base is bitsandbytes 4-bit (nf4")


def test_cli_strict_turns_warning_into_failure(w: dict[str, Path], tmp_path: Path) -> None:
    adapter = copy_of(w["good"], tmp_path, base_model_name_or_path="someone/Other-Model")
    lenient = invoke(adapter, "--base", w["llama_base"])
    strict = invoke(adapter, "--base", w["llama_base"], "--strict")
    assert lenient.exit_code == 0 and "WARNING AC209: " in lenient.output
    assert strict.exit_code == 3
    assert "FAILED (--strict: warnings count as errors)" in strict.output


@pytest.mark.parametrize("flag", [["--json"], ["--format", "json"]])
def test_cli_json(flag: list[str], w: dict[str, Path]) -> None:
    result = invoke(w["gpt2"], "--base", w["llama_base"], *flag)
    assert result.exit_code == 3
    data = json.loads(result.output)
    assert data["ok"] is False and data["errors"] == 1
    assert data["findings"][0]["code"] == "AC204"
    assert data["findings"][0]["severity"] == "error"
    assert len(data["rules_checked"]) == sum(
        1 for r in RULES.values() if r.scope in ("structure", "base")
    )


def test_cli_junit(w: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "reports" / "ci" / "validate.xml"  # the writer makes the folders
    result = invoke(w["gpt2"], "--base", w["llama_base"], "--target", "vllm", "--junit", out)
    assert result.exit_code == 3
    root = ET.parse(out).getroot()
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == len(RULES)
    by_code = {c.get("name", "").split()[0]: c for c in cases}
    assert set(by_code) == set(RULES)
    assert by_code["AC204"].find("failure") is not None
    assert by_code["AC101"].find("failure") is None and by_code["AC101"].find("skipped") is None
    assert by_code["AC311"].find("skipped").get("message") == "only with --target llama.cpp"
    assert root.get("failures") == "1"
    assert [p.name for p in out.parent.iterdir()] == ["validate.xml"]  # no temp file left


def test_several_targets_run_all_their_rules(w: dict[str, Path], tmp_path: Path) -> None:
    """``--target`` repeated: each target's rules run, in one report; peft adds nothing."""
    result = invoke(
        w["good"], "--target", "vllm", "--target", "llama.cpp", "--target", "peft",
        "--max-rank", "1", "--json", "--junit", tmp_path / "v.xml",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout)
    assert data["targets"] == ["vllm", "llama.cpp"] and data["target"] == "vllm, llama.cpp"
    checked = set(data["rules_checked"])
    serving = {c for c, r in RULES.items() if r.scope in ("vllm", "llama.cpp")}
    assert {c for c in serving if not RULES[c].needs_base} <= checked
    assert [f["code"] for f in data["findings"]] == ["AC301"]  # vLLM's rank: r 8 > 1
    skipped = ET.parse(tmp_path / "v.xml").getroot().findall(".//testcase/skipped")
    assert {s.get("message") for s in skipped} == {"only with --base"}
    one = invoke(w["good"], "--target", "llama.cpp", "--json")
    assert json.loads(one.stdout)["targets"] == ["llama.cpp"]


def test_cli_junit_without_base_skips_base_rules(w: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "v.xml"
    assert invoke(w["good"], "--junit", out).exit_code == 0
    skipped = ET.parse(out).getroot().findall(".//testcase/skipped")
    assert {s.get("message") for s in skipped} == {
        "only with --base",
        "only with --target vllm",
        "only with --target llama.cpp",
    }


def test_cli_github_annotations(w: dict[str, Path], tmp_path: Path) -> None:
    adapter = copy_of(w["good"], tmp_path, base_model_name_or_path="someone/Other-Model")
    result = invoke(adapter, "--base", w["gpt2_base"], "--format", "github")
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("::error title=AC204::none of the 4 adapter modules")
    assert lines[1].startswith(
        "::warning title=AC209::the adapter names base 'someone/Other-Model'"
    )
    assert lines[-1].startswith("::notice title=adapterctl validate::FAILED")


def test_cli_vllm_max_rank_must_be_a_vllm_choice(w: dict[str, Path]) -> None:
    result = invoke(w["good"], "--target", "vllm", "--max-rank", "20")
    assert result.exit_code == 2
    assert "not a max_lora_rank vLLM accepts" in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n", "Git LFS pointer"),
    ],
)
def test_cli_broken_weights_exit_3(
    content: bytes, message: str, w: dict[str, Path], tmp_path: Path
) -> None:
    adapter = copy_of(w["good"], tmp_path)
    (adapter / WEIGHTS).write_bytes(content)
    result = invoke(adapter, "--junit", tmp_path / "v.xml")
    assert result.exit_code == 3
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "v.xml").exists()


def test_cli_missing_base_is_not_found(w: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(w["good"], "--base", tmp_path / "nope")
    assert result.exit_code == 4


def test_repeated_findings_are_grouped_in_text(tmp_path: Path) -> None:
    """Twelve modules with NaN: one text line with the count and the first three (in natural
    order), every one with --verbose, and in JSON always."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for i in range(12):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = np.ones((2, 8), np.float32)
        tensors[f"{key}.lora_B.weight"] = np.full((8, 2), np.nan, np.float32)
    src = tmp_path / "nan.safetensors"
    save_file(tensors, str(src))
    grouped = invoke(src, "--alpha", "2")
    assert grouped.exit_code == 3
    lines = grouped.output.strip().splitlines()
    (ac104,) = [line for line in lines if "AC104" in line]
    assert ac104.startswith("ERROR AC104 in 12 modules (model.layers.0.self_attn.q_proj, ")
    assert "model.layers.2.self_attn.q_proj, …); the first: " in ac104
    assert ac104.endswith("(--verbose lists all)")
    every = invoke(src, "--alpha", "2", "--verbose").output.splitlines()
    assert len([line for line in every if "AC104" in line]) == 12
    data = json.loads(invoke(src, "--alpha", "2", "--json").stdout)
    assert len([f for f in data["findings"] if f["code"] == "AC104"]) == 12
