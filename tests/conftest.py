"""Session-scoped fixtures shared by test files: tiny PEFT adapters and bases, built once.

``peft_cases`` builds a named PEFT adapter on first use and caches it for the session, so
several test files can compare adapterctl against the same PEFT model (the oracle) without
rebuilding it. Each case is a ``PeftCase``: the saved folder and the PEFT model, cast to
float64 after saving so its ``get_delta_weight`` is exact.
"""

from __future__ import annotations

import os

# No test may reach the real Hub: the client's endpoint is a closed local port unless a test
# points it at tests/hubserver.py (set before anything imports huggingface_hub, which reads
# these at import). Xet is off: the local server speaks the plain LFS protocol.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import builders
import pytest
import torch

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TwoProj(torch.nn.Module):
    """A block with ``q_proj`` and ``xq_proj``: a pattern "q_proj" must match only the first."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(dim, dim)
        self.xq_proj = torch.nn.Linear(dim, 2 * dim)


class TwoProjModel(torch.nn.Module):
    """Two ``TwoProj`` blocks under ``layers``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([TwoProj(), TwoProj()])


class ConvModel(torch.nn.Module):
    """A 3×3 and a 1×1 Conv2d: LoRA's ``conv`` layout (A is r×in×k×k, B is out×r×1×1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.pointwise = torch.nn.Conv2d(8, 8, 1)


@dataclass
class PeftCase:
    """A saved PEFT adapter and its (float64) PEFT model."""

    name: str
    path: Path
    model: Any
    trainable: int  # peft_model.get_nb_trainable_parameters()[0], taken before the cast
    extra: dict[str, Any] = field(default_factory=dict)

    def lora_layers(self) -> dict[str, Any]:
        """Module name (as the adapter file names it) -> PEFT LoRA layer."""
        from peft.tuners.lora import LoraLayer

        inner = self.model.base_model.model
        return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}

    def oracle(self) -> dict[str, dict[str, Any]]:
        """PEFT's own per-module r, scale and dense float64 ΔW."""
        out = {}
        for name, layer in self.lora_layers().items():
            with torch.no_grad():
                delta = layer.get_delta_weight("default").double()
            out[name] = {
                "r": int(layer.r["default"]),
                "scale": float(layer.scaling["default"]),
                "delta": delta,
            }
        return out


def _build(name: str, root: Path) -> PeftCase:
    path = root / name
    kw: dict[str, Any] = {}
    if name == "llama_plain":
        model = builders.llama_model()
    elif name == "llama_rslora":
        model, kw = builders.llama_model(), {"use_rslora": True, "target_modules": LLAMA_ALL}
    elif name == "llama_dora":
        model, kw = builders.llama_model(), {"use_dora": True, "target_modules": LLAMA_ALL}
    elif name == "llama_patterns":
        model = builders.llama_model()
        kw = {
            "target_modules": LLAMA_ALL,
            "use_rslora": True,
            # "proj" must not match "q_proj" (dot boundary); a regex key; the first key wins.
            # PEFT saves the patterns with sorted keys, so keys are given in sorted order
            # here and the trained model agrees with the saved file (test_formats checks
            # the case where it does not).
            "rank_pattern": {r"model\.layers\.0\.self_attn\.q_proj": 2, "proj": 3, "v_proj": 6},
            "alpha_pattern": {"k_proj": 5, r"model\.layers\.1\..*_proj": 32, "proj": 1},
        }
    elif name == "twoproj_patterns":
        model = TwoProjModel()
        kw = {
            "target_modules": ["q_proj", "xq_proj"],
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"q_proj": 3},
        }
    elif name == "conv":
        model, kw = ConvModel(), {"target_modules": ["conv", "pointwise"]}
    elif name == "llama_embedding":
        model, kw = builders.llama_model(), {"target_modules": ["embed_tokens", "q_proj"]}
    elif name == "llama_init":
        # PEFT's default init: lora_B = 0 for linear layers, lora_embedding_A = 0 for embeddings.
        model = builders.llama_model()
        kw = {"target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": True}
    elif name in ("llama_fp16", "llama_bf16"):
        model = builders.llama_model()
        kw = {"target_modules": LLAMA_ALL}
        kw["dtype"] = torch.float16 if name == "llama_fp16" else torch.bfloat16
    elif name == "bert_cls":
        model, kw = builders.bert_classifier(), {"target_modules": ["query", "value"]}
        kw["task_type"] = "SEQ_CLS"
    elif name == "gpt2":
        model = builders.gpt2_model()
        kw = {"target_modules": ["c_attn", "c_proj", "c_fc"], "lora_bias": True}
    elif name == "gpt2_bias_all":
        model, kw = builders.gpt2_model(), {"target_modules": ["c_attn"], "bias": "all"}
        kw["modules_to_save"] = ["ln_f"]  # bias="all" saves its bias under three names
    elif name == "t5":
        model = builders.t5_model()
        kw = {"target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"}
    else:
        raise KeyError(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, path = builders.peft_adapter(model, path, **kw)
    trainable = int(pm.get_nb_trainable_parameters()[0])
    pm = pm.double()
    return PeftCase(name=name, path=path, model=pm, trainable=trainable)


@pytest.fixture(scope="session")
def peft_cases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], PeftCase]:
    """``peft_cases(name)`` -> the named PEFT adapter, built once per session.

    Names: llama_plain, llama_rslora, llama_dora, llama_patterns, twoproj_patterns,
    llama_embedding, llama_init, llama_fp16, llama_bf16, bert_cls, gpt2 (fan_in_fan_out,
    lora_bias), gpt2_bias_all (and modules_to_save), t5, conv.
    """
    root = tmp_path_factory.mktemp("peft_cases")
    cache: dict[str, PeftCase] = {}

    def get(name: str) -> PeftCase:
        if name not in cache:
            cache[name] = _build(name, root)
        return cache[name]

    return get
