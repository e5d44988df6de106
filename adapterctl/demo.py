"""The demo: a tiny Llama-shaped base and a few PEFT adapters, and the commands to try on them.

Everything is written with torch, safetensors and json only (no transformers, no PEFT), from
fixed seeds, so the files and what the commands print about them are the same on every run.
The library only builds files and lists steps; ``adapterctl demo`` runs the steps through the
CLI and prints what each one shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
BASE_NAME = "demo/tiny-llama"


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-architecture model."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear(self, module: str) -> tuple[int, int]:
        """(out, in) of one of a decoder layer's linear modules (``q_proj``, ``down_proj``…)."""
        kv = self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }
        return shapes[module]

    def config(self) -> dict[str, Any]:
        """A ``config.json`` as transformers writes it for ``LlamaForCausalLM``."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 512,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "dtype": "bfloat16",
        }


def _generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed)


def base_tensors(shape: LlamaShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights under ``LlamaForCausalLM``'s tensor names (norms are ones)."""
    import torch

    g = _generator(seed)

    def normal(*dims: int) -> torch.Tensor:
        return (0.02 * torch.randn(*dims, generator=g)).to(torch.bfloat16)

    out = {"model.embed_tokens.weight": normal(shape.vocab, shape.hidden)}
    for i in range(shape.layers):
        pre = f"model.layers.{i}"
        for mod in ATTENTION:
            out[f"{pre}.self_attn.{mod}.weight"] = normal(*shape.linear(mod))
        for mod in MLP:
            out[f"{pre}.mlp.{mod}.weight"] = normal(*shape.linear(mod))
        out[f"{pre}.input_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
        out[f"{pre}.post_attention_layernorm.weight"] = torch.ones(
            shape.hidden, dtype=torch.bfloat16
        )
    out["model.norm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
    out["lm_head.weight"] = normal(shape.vocab, shape.hidden)
    return out


def write_base(
    path: Path, shape: LlamaShape | None = None, *, shards: int = 2, seed: int = 0
) -> Path:
    """Write a Llama-shaped base checkpoint folder: ``config.json`` and bf16 safetensors.

    Args:
        path: the folder to create.
        shape: the model's dimensions (a two-layer, 64-wide model by default).
        shards: how many ``model-0000X-of-0000N.safetensors`` files to split the tensors
            into, with a ``model.safetensors.index.json``; 1 writes a single
            ``model.safetensors``.
        seed: the weights' seed.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    shape = shape or LlamaShape()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    tensors = base_tensors(shape, seed)
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(shards):
        chunk = names[k * per : (k + 1) * per]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in chunk}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def write_adapter(
    path: Path,
    shape: LlamaShape | None = None,
    *,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16,
    use_rslora: bool = False,
    layers: int | None = None,
    dtype: str = "float32",
    seed: int = 1,
    base_model: str = BASE_NAME,
) -> Path:
    """Write a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Both factors are random (a freshly initialised PEFT adapter has B = 0, which would make
    every norm zero), with B small so ΔW is a plausible fine-tuning update.

    Args:
        path: the folder to create.
        shape: the base model's dimensions the adapter is trained for.
        targets: module names to adapt in every layer (``q_proj``, ``gate_proj``…).
        r: LoRA rank.
        alpha: LoRA alpha.
        use_rslora: scale by alpha/sqrt(r) instead of alpha/r.
        layers: how many decoder layers the adapter covers (default: the model's); more than
            the base has makes an adapter that does not fit it.
        dtype: the tensors' torch dtype name (``float32``, ``bfloat16``).
        seed: the factors' seed.
        base_model: ``base_model_name_or_path`` written to the config.

    Returns:
        ``path``.
    """
    import torch
    from safetensors.torch import save_file

    shape = shape or LlamaShape()
    g = _generator(seed)
    tdtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(shape.layers if layers is None else layers):
        for mod in targets:
            block = "self_attn" if mod in ATTENTION else "mlp"
            out_f, in_f = shape.linear(mod)
            key = f"base_model.model.model.layers.{i}.{block}.{mod}"
            a = torch.randn(r, in_f, generator=g) / in_f**0.5  # (r, in)
            b = 0.01 * torch.randn(out_f, r, generator=g)  # (out, r)
            tensors[f"{key}.lora_A.weight"] = a.to(tdtype)
            tensors[f"{key}.lora_B.weight"] = b.to(tdtype)
    config: dict[str, Any] = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


@dataclass
class DemoFiles:
    """Where the demo wrote its files; ``adapters`` maps a short name to its folder."""

    root: Path
    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


def build(root: str | os.PathLike[str]) -> DemoFiles:
    """Write the demo base and adapters under ``root`` (reproducible: fixed seeds).

    The adapters: ``chat-lora`` (r=8 on q/k/v/o, float32), ``code-rslora`` (rsLoRA r=16 on
    every linear layer, bf16) and ``broken-lora`` (trained on a deeper sibling: it targets
    four layers of a two-layer base).

    Args:
        root: an existing (usually empty) folder.

    Returns:
        The paths, relative to ``root``.

    Example:
        >>> files = build(tmp)
        >>> sorted(files.adapters)
        ['broken-lora', 'chat-lora', 'code-rslora']
    """
    root = Path(root)
    shape = LlamaShape()
    files = DemoFiles(root=root, base=Path("base") / "tiny-llama")
    write_base(root / files.base, shape, shards=2, seed=0)
    specs: dict[str, dict[str, Any]] = {
        "chat-lora": {"targets": ATTENTION, "r": 8, "alpha": 16, "seed": 1},
        "code-rslora": {
            "targets": ATTENTION + MLP, "r": 16, "alpha": 32, "use_rslora": True,
            "dtype": "bfloat16", "seed": 2,
        },
        "broken-lora": {"targets": ("q_proj", "v_proj"), "r": 8, "alpha": 16, "layers": 4,
                        "seed": 3},
    }  # fmt: skip
    for name, spec in specs.items():
        rel = Path("adapters") / name
        write_adapter(root / rel, shape, **spec)
        files.adapters[name] = rel
    return files


@dataclass(frozen=True)
class Step:
    """One command of the walk-through.

    ``args`` are the CLI arguments (without ``adapterctl``); ``note`` is printed before the
    command; ``expect_exit`` is the exit code the step is meant to end with (the broken
    adapter's validation is meant to fail).
    """

    args: list[str]
    note: str
    expect_exit: int = 0

    @property
    def command(self) -> str:
        return "adapterctl " + " ".join(self.args)


# A step is shown only when the module behind its command exists, so the walk-through grows
# as commands are added: append (module, factory) pairs here.
StepFactory = Callable[[DemoFiles], list[Step]]


def _inspect_steps(f: DemoFiles) -> list[Step]:
    chat, code, broken = (str(f.adapters[n]) for n in ("chat-lora", "code-rslora", "broken-lora"))
    base = str(f.base)
    return [
        Step(["inspect", chat], "What is this adapter? Read from its config and headers."),
        Step(
            ["inspect", code, "--spectrum"],
            "rsLoRA scales by alpha/sqrt(r); --spectrum adds each update's singular values.",
        ),
        Step(
            ["inspect", chat, "--base", base],
            "With --base: the base's fingerprint and the base tensor each module updates.",
        ),
        Step(
            ["inspect", broken, "--base", base],
            "An adapter trained on a deeper sibling: only some of its modules land on this base.",
        ),
    ]


def _validate_steps(f: DemoFiles) -> list[Step]:
    base = str(f.base)
    return [
        Step(
            ["validate", str(f.adapters["chat-lora"]), "--base", base],
            "Does it fit the base? Checked from headers only, before any GPU time is spent.",
        ),
        Step(
            ["validate", str(f.adapters["broken-lora"]), "--base", base],
            "The broken adapter fails validation (exit 3) and says why.",
            expect_exit=3,
        ),
    ]


def _merge_steps(f: DemoFiles) -> list[Step]:
    chat, code = (str(f.adapters[n]) for n in ("chat-lora", "code-rslora"))
    return [
        Step(
            ["merge", str(f.base), chat, code, "-w", "1", "-w", "0.5", "-o", "merged/tiny-llama",
             "--verify"],
            "Merge two adapters (weights 1 and 0.5) into the base, one tensor at a time.",
        ),
    ]  # fmt: skip


def _registry_steps(f: DemoFiles) -> list[Step]:
    chat, code = (str(f.adapters[n]) for n in ("chat-lora", "code-rslora"))
    base = str(f.base)
    return [
        Step(
            ["add", chat, "--name", "chat", "--base", base, "--tag", "prod", "-m", "baseline"],
            "Register an adapter: validated against the base first (a misfit is refused, exit 3), "
            "then pinned to its fingerprint.",
        ),
        Step(
            ["add", code, "--name", "code", "--base", base, "--hash-base"],
            "--hash-base also pins the base's content digest (sha256 of each weight file).",
        ),
        Step(["list"], "What the registry holds: latest version, base, pin, size, aliases."),
        Step(["tag", "code@1", "stable"], "Aliases move; their history is kept (adapterctl log)."),
        Step(["show", "chat@prod"], "Everything about a version: digests, base pin, files."),
        Step(
            ["inspect", "chat@prod"],
            "Every command takes a registry reference: name, name@3, name@alias, sha256:<prefix>.",
        ),
        Step(
            ["merge", base, "chat@prod", "code@stable", "-w", "0.6", "-w", "0.4", "--method",
             "ties", "--density", "0.5", "-o", "merged/ties", "--register", "chat-code-merged"],
            "Merge registry versions with TIES at full rank: each input's base pin is checked "
            "first, and --register records the result with its lineage.",
        ),
        Step(["show", "chat-code-merged@1"], "The lineage: parents, weights, method, options."),
        Step(["registry", "verify"], "Re-hash every stored file and check the database."),
    ]  # fmt: skip


def _compose_steps(f: DemoFiles) -> list[Step]:
    chat, code = (str(f.adapters[n]) for n in ("chat-lora", "code-rslora"))
    return [
        Step(
            ["compose", chat, code, "-w", "0.7", "-w", "0.3", "--method", "svd", "--rank", "8",
             "-o", "composed/chat-code"],
            "Compose two adapters (r=8 and rsLoRA r=16, different targets) into one r=8 "
            "adapter: the best rank-8 approximation of 0.7·ΔW₁ + 0.3·ΔW₂, from the small core.",
        ),
    ]  # fmt: skip


def _diff_steps(f: DemoFiles) -> list[Step]:
    return [
        Step(
            ["diff", str(f.adapters["chat-lora"]), "composed/chat-code"],
            "How does the composition differ from chat-lora? Norms, cosines, subspace overlap.",
        ),
    ]


STEPS: list[tuple[str, StepFactory]] = [
    ("adapterctl.introspect", _inspect_steps),
    ("adapterctl.validate", _validate_steps),
    ("adapterctl.merge", _merge_steps),
    ("adapterctl.compose", _compose_steps),
    ("adapterctl.diff", _diff_steps),
    ("adapterctl.registry", _registry_steps),
]


def steps(files: DemoFiles) -> list[Step]:
    """The walk-through's steps for the commands this installation has.

    Args:
        files: what ``build`` wrote.

    Returns:
        The steps in order; a command whose module is missing is left out.
    """
    out: list[Step] = []
    for module, factory in STEPS:
        if importlib.util.find_spec(module) is not None:
            out.extend(factory(files))
    return out
