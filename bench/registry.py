"""Benchmark: the registry's ``list`` and ``show`` with 10,000 versions, and hashing speed.

1. Fills a fresh registry (in ``--workdir``) with ``--names`` × ``--per-name`` versions
   (1,000 × 10 by default) through the same insert path ``add`` uses, one transaction per
   name, with aliases on every tenth name and a lineage record on every hundredth; a
   hundred real ``add``s (hashing, blobs, fsync, transaction) are timed on top.
2. Times ``Registry.list()``, ``Registry.show(ref)`` (random refs, every form) and the CLI
   ``list --json`` and ``show --json`` in process: the median of ``--rounds`` runs.
3. Hashes a ``--hash-mb`` MB file (1 GB by default) with ``adapterctl.identity.file_sha256``
   and with ``sha256sum``, page cache warm, alternating, median of ``--rounds`` runs.

Goals (issue 5, not test gates): list and show under 100 ms; hashing within 1.3× of
``sha256sum``.

    python bench/registry.py --workdir /tmp/adapterctl-bench-registry --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _median_ms(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def fill(home: Path, names: int, per_name: int) -> None:
    """Insert names × per_name versions through ``Registry._insert_version``."""
    from adapterctl.identity import version_digest
    from adapterctl.registry import BasePin, FileEntry, Registry

    reg = Registry(home)
    pin = BasePin(
        level="fingerprint",
        fingerprint="sha256:" + "ab" * 32,
        name="org/base-7b",
        path="/models/base-7b",
        architecture="LlamaForCausalLM",
    )
    rng = random.Random(0)
    for n in range(names):
        name = f"adapter-{n:04d}"
        with reg._write() as conn:
            for k in range(per_name):
                entries = [
                    FileEntry(
                        path="adapter_config.json", size=700, sha256=f"{rng.getrandbits(256):064x}"
                    ),
                    FileEntry(
                        path="adapter_model.safetensors",
                        size=50_000_000,
                        sha256=f"{rng.getrandbits(256):064x}",
                    ),
                ]
                raw: list[dict[str, object]] = [e.model_dump() for e in entries]
                lineage = None
                if n % 100 == 99 and k == 0:
                    lineage = (
                        [(f"adapter-{n - 1:04d}@1", 0.5), (f"adapter-{n - 2:04d}@2", 0.5)],
                        "ties",
                        {"density": 0.5},
                    )
                reg._insert_version(
                    conn,
                    name=name,
                    entries=entries,
                    files_digest="sha256:" + f"{rng.getrandbits(256):064x}",
                    digest=version_digest(raw, pin.identity()),
                    fmt="peft",
                    size=50_000_700,
                    pin=pin,
                    message=None,
                    source="/data/runs",
                    tags=("prod",) if n % 10 == 0 and k == per_name - 2 else (),
                    lineage=lineage,
                )
    reg.close()


def bench_registry(workdir: Path, names: int, per_name: int, rounds: int) -> dict[str, object]:
    home = workdir / "home"
    if home.exists():
        shutil.rmtree(home)
    os.environ["ADAPTERCTL_HOME"] = str(home)
    t0 = time.perf_counter()
    fill(home, names, per_name)
    fill_s = time.perf_counter() - t0

    import numpy as np
    from click.testing import CliRunner
    from safetensors.numpy import save_file

    from adapterctl.cli import cli
    from adapterctl.registry import Registry

    # Real adds: 100 tiny PEFT folders (numpy + safetensors), hashed, stored and committed.
    src = workdir / "adapters"
    shutil.rmtree(src, ignore_errors=True)
    for i in range(100):
        d = src / f"a{i}"
        d.mkdir(parents=True)
        rng = np.random.default_rng(i)
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        tensors = {
            f"{key}.lora_A.weight": rng.standard_normal((8, 256)).astype(np.float32),
            f"{key}.lora_B.weight": rng.standard_normal((256, 8)).astype(np.float32),
        }
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16})
        )
    reg = Registry(home)
    add_ms = []
    for i in range(100):
        t = time.perf_counter()
        reg.add(src / f"a{i}", "real")
        add_ms.append((time.perf_counter() - t) * 1000)

    refs = []
    rng = random.Random(1)
    for _ in range(rounds):
        n = rng.randrange(names)
        refs.append(
            rng.choice([f"adapter-{n:04d}", f"adapter-{n:04d}@{rng.randrange(1, per_name + 1)}"])
        )
    refs += ["adapter-0000@prod", "adapter-0099"]  # an alias; a version with lineage
    digest = reg.show("adapter-0500@3").digest[:16]
    refs.append(digest)

    reg.list()  # warm the connection and the page cache once
    list_ms = _median_ms(lambda: reg.list(), rounds)
    show_times = []
    for ref in refs:
        show_times.append(_median_ms(lambda ref=ref: reg.show(ref), rounds))
    fresh_ms = _median_ms(lambda: Registry(home).list(), rounds)
    runner = CliRunner()
    cli_list_ms = _median_ms(lambda: runner.invoke(cli, ["list", "--json"]), rounds)
    cli_show_ms = _median_ms(lambda: runner.invoke(cli, ["show", "adapter-0099", "--json"]), rounds)
    total = reg.info()
    return {
        "versions": total.versions,
        "names": total.adapters,
        "fill_s": round(fill_s, 2),
        "add_ms_median": round(statistics.median(add_ms), 2),
        "list_ms": round(list_ms, 2),
        "list_new_connection_ms": round(fresh_ms, 2),
        "show_ms_median": round(statistics.median(show_times), 2),
        "show_ms_max": round(max(show_times), 2),
        "cli_list_json_ms": round(cli_list_ms, 2),
        "cli_show_json_ms": round(cli_show_ms, 2),
    }


def bench_hash(workdir: Path, size_mb: int, rounds: int) -> dict[str, object]:
    from adapterctl.identity import file_sha256

    path = workdir / "blob.bin"
    if not path.exists() or path.stat().st_size != size_mb << 20:
        with open(path, "wb") as fh:
            chunk = os.urandom(1 << 20)
            for i in range(size_mb):
                fh.write(chunk[i % 256 :] + chunk[: i % 256])
    ours_s, theirs_s = [], []
    expected = None
    file_sha256(path)  # warm the page cache
    for _ in range(rounds):
        t0 = time.perf_counter()
        got = file_sha256(path)
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
        theirs_s.append(time.perf_counter() - t0)
        expected = out.stdout.split()[0]
        assert got == expected, (got, expected)
    ours, theirs = statistics.median(ours_s), statistics.median(theirs_s)
    mb = size_mb * 1.048576
    return {
        "file_mb": round(mb),
        "adapterctl_s": round(ours, 3),
        "sha256sum_s": round(theirs, 3),
        "adapterctl_mb_s": round(mb / ours),
        "sha256sum_mb_s": round(mb / theirs),
        "ratio": round(ours / theirs, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench/out/registry"))
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--per-name", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hash-mb", type=int, default=1000)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    result = {
        "machine": f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "registry": bench_registry(args.workdir, args.names, args.per_name, args.rounds),
        "hash": bench_hash(args.workdir, args.hash_mb, args.rounds),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
