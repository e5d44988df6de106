"""Tiny seeded models and adapters built with transformers + PEFT inside the tests (no downloads).

Every builder takes a target folder and returns it. Adapters are made with
``init_lora_weights=False`` so both factors are random (a fresh PEFT adapter has B = 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _save(model: Any, path: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


def llama_model(
    layers: int = 2, vocab: int = 64, hidden: int = 16, seed: int = 0, heads: int = 2
) -> Any:
    """A tiny LlamaForCausalLM (untied embeddings, one key/value head of hidden/heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def gpt2_model(layers: int = 2, vocab: int = 50, hidden: int = 16, seed: int = 0) -> Any:
    """A tiny GPT2LMHeadModel (Conv1D layers, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=2, vocab_size=vocab, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def t5_model(seed: int = 0) -> Any:
    """A tiny T5ForConditionalGeneration (seq2seq)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
        num_heads=2, decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def bert_classifier(seed: int = 0, labels: int = 3) -> Any:
    """A tiny BertForSequenceClassification (a classifier head PEFT saves as modules_to_save)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=labels,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def save_base(model: Any, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Save a model as a base checkpoint folder (safetensors + config.json)."""
    return _save(model, path, dtype)


def peft_adapter(
    model: Any, path: Path, seed: int = 1, dtype: torch.dtype | None = None, **lora: Any
) -> tuple[Any, Path]:
    """Wrap ``model`` with a random LoRA (A and B non-zero); save it; return (peft model, path).

    ``lora`` are ``peft.LoraConfig`` arguments; ``r``, ``lora_alpha`` and ``target_modules``
    default to 4, 8 and ["q_proj", "v_proj"].
    """
    from peft import LoraConfig, get_peft_model

    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    lora.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(**lora))
    # Random DoRA magnitudes too, so a wrong norm formula cannot hide behind m = ‖W‖.
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
    if dtype is not None:
        pm = pm.to(dtype)
    pm.save_pretrained(path)
    return pm, path


def edit_config(path: Path, **changes: Any) -> Path:
    """Change keys of an adapter's ``adapter_config.json`` (None deletes a key)."""
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def many_module_adapter(
    path: Path, n: int, *, name: str = "model.layers.{i}.mlp.proj", **config: Any
) -> Path:
    """A PEFT folder of ``n`` tiny modules (r=1 on a 4×4 weight) named ``name.format(i=i)``,
    written with NumPy alone (no model): for scaling tests and benchmarks. ``config`` keys
    go into ``adapter_config.json``."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(n):
        key = "base_model.model." + name.format(i=i)
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((1, 4), dtype=np.float32)  # (r, in)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((4, 1), dtype=np.float32)  # (out, r)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path
