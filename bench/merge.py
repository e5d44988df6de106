"""Benchmark: adapterctl merge vs PEFT merge_and_unload vs a plain `cp -r` (the floor).

Builds a bf16 checkpoint with Llama-7B layer shapes (hidden 4096, intermediate 11008, vocab
32000; 6 layers by default: about 2.5 GB, sharded) and an r=16 all-linear PEFT adapter, with
torch + safetensors only, then times whole processes (start-up included) and samples their
anonymous memory (RssAnon from /proc) every 5 ms. Rounds run in alternating order; the
median is reported. The page cache is warm (the machine has room for the checkpoint) and
holds no dirty pages when a run starts (`sync` before each, outside the timing). Plain
runs leave written data in the page cache (as `cp` and `save_pretrained` do); the `sync` /
`--fsync` pair measures the same with the data flushed to disk.

    python bench/merge.py --workdir /tmp/adapterctl-bench --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, RANK = 4096, 11008, 32000, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def build(workdir: Path, layers: int) -> tuple[Path, Path]:
    """Write the base checkpoint (2 shards + index) and the adapter, if not there yet."""
    import torch
    from safetensors.torch import save_file

    base, adapter = workdir / "base", workdir / "adapter"
    if (base / "config.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    shutil.rmtree(workdir, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shapes = {
        "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
        "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
        "down_proj": (HIDDEN, INTER),
    }  # fmt: skip
    weight_map: dict[str, str] = {}
    shard_of = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    tensors: list[dict[str, torch.Tensor]] = [{}, {}]
    tensors[0]["model.embed_tokens.weight"] = rand(VOCAB, HIDDEN)
    for i in range(layers):
        part = 0 if i < layers // 2 else 1
        for name, shape in shapes.items():
            group = (
                "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            tensors[part][f"model.layers.{i}.{group}.{name}.weight"] = rand(*shape)
        tensors[part][f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN).bfloat16()
        tensors[part][f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(
            HIDDEN
        ).bfloat16()
    tensors[1]["model.norm.weight"] = torch.ones(HIDDEN).bfloat16()
    tensors[1]["lm_head.weight"] = rand(VOCAB, HIDDEN)
    total = 0
    for part, shard in enumerate(shard_of):
        save_file(tensors[part], str(base / shard), metadata={"format": "pt"})
        for k, v in tensors[part].items():
            weight_map[k] = shard
            total += v.numel() * 2
    tensors = [{}, {}]
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
        "hidden_act": "silu", "rope_theta": 10000.0,
    }  # fmt: skip
    (base / "config.json").write_text(json.dumps(config, indent=2))
    lora: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, (out_f, in_f) in shapes.items():
            group = "self_attn" if name in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{i}.{group}.{name}"
            lora[f"{key}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=g) / 64).float()
            lora[f"{key}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=g) / 64).float()
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": RANK,
                "lora_alpha": 32,
                "target_modules": TARGETS,
                "base_model_name_or_path": str(base),
                "task_type": "CAUSAL_LM",
            }
        )
    )
    return base, adapter


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RssAnon (bytes) of one process tree's main process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        status = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(status) as fh:
                    for line in fh:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return elapsed, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adapterctl-bench"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    base, adapter = build(args.workdir, args.layers)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    peft_script = args.workdir / "peft_merge.py"
    peft_script.write_text(PEFT_SCRIPT)
    py = sys.executable
    runs = {
        "cp -r (floor)": ["cp", "-r", str(base), str(args.workdir / "out")],
        "adapterctl merge": [
            py, "-m", "adapterctl", "merge", str(base), str(adapter), "-o",
            str(args.workdir / "out"), "--device", args.device,
        ],
        "adapterctl merge, NumPy kernel": [
            "env", "ADAPTERCTL_FUSED=0", py, "-m", "adapterctl", "merge", str(base),
            str(adapter), "-o", str(args.workdir / "out"), "--device", args.device,
        ],
        "cp -r && sync": ["sh", "-c", f"cp -r {base} {args.workdir / 'out'} && sync"],
        "adapterctl merge --fsync": [
            py, "-m", "adapterctl", "merge", str(base), str(adapter), "-o",
            str(args.workdir / "out"), "--device", args.device, "--fsync",
        ],
        "PEFT merge_and_unload": [
            py, str(peft_script), str(base), str(adapter), str(args.workdir / "out"),
        ],
        "python -c 'import torch'": [py, "-c", "import torch"],
    }  # fmt: skip
    if args.skip_peft:
        del runs["PEFT merge_and_unload"]
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            shutil.rmtree(args.workdir / "out", ignore_errors=True)
            os.sync()  # start every run with no dirty pages left by the one before
            results[name].append(measure(runs[name]))
            print(f"round {r + 1} {name}: {results[name][-1][0]:.2f} s", file=sys.stderr)
    shutil.rmtree(args.workdir / "out", ignore_errors=True)
    med = {
        k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v))
        for k, v in results.items()
    }
    torch_anon = med["python -c 'import torch'"][1]
    cp_time = med["cp -r (floor)"][0]
    print(
        f"checkpoint: {size / 1e9:.2f} GB in 2 shards, {args.layers} layers; "
        f"adapter r={RANK} all-linear"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; page cache warm; "
        f"{args.rounds} rounds"
    )
    print()
    print(
        "| run | wall s (median) | × cp | × cp round by round | peak RssAnon | ÷ checkpoint "
        "| above `import torch` | ÷ checkpoint |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cp_rounds = [t for t, _ in results["cp -r (floor)"]]
    for name, (t, m) in med.items():
        above = m - torch_anon  # negative: less than a bare `import torch` holds
        # Each run against the copy of its round (next to it in time): machine drift cancels.
        pairs = zip(results[name], cp_rounds, strict=True)
        paired = statistics.median(r / c for (r, _), c in pairs)
        print(
            f"| {name} | {t:.2f} | {t / cp_time:.2f} | {paired:.2f} | {m / 2**20:.0f} MiB | "
            f"{m / size:.3f} | {above / 2**20:+.0f} MiB | {max(0, above) / size:.3f} |"
        )
    if "PEFT merge_and_unload" in med:
        ours, peft = med["adapterctl merge"][0], med["PEFT merge_and_unload"][0]
        print(f"\nadapterctl is {peft / ours:.1f}× faster than PEFT")


if __name__ == "__main__":
    main()
