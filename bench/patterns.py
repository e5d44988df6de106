"""Benchmark: rank/alpha pattern keys against many modules, and reading many modules.

Two parts:

1. ``PatternKeys`` (what reading an adapter uses to resolve each module's rank and alpha):
   100k module names against 200k plain keys, 200k ``^``-anchored escaped keys (as
   adapterctl's writers spell full names), and a few regular-expression keys; build and
   match time, and the counted operations. PEFT's rule (``re.match`` of every key on every
   module) is timed on a sample of pairs and extrapolated to all of them.
2. Whole processes (start-up included, peak RSS from ``wait4``): ``adapterctl inspect`` and
   ``validate`` of an adapter of 100k tiny modules (r=1 on 4×4 weights), without patterns and
   with 200k plain rank_pattern keys plus a regular-expression alpha_pattern key.

    python bench/patterns.py [--modules 100000] [--keys 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from startup import cli_command, cpu_model, run_process  # bench/ is on sys.path when run

from adapterctl.patterns import PatternKeys

NAME = "model.layers.{i}.mlp.proj"
TESTS = Path(__file__).resolve().parent.parent / "tests"
# Builds an adapter with the tests' builder (one copy of it) in a child process, so that this
# one stays small: a child's peak RSS counts the parent it was forked from.
BUILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from builders import many_module_adapter
many_module_adapter(Path(sys.argv[2]), int(sys.argv[3]), **json.load(sys.stdin))
"""


def build(path: Path, n: int, **config: object) -> Path:
    """``builders.many_module_adapter(path, n, **config)``, run in a child process."""
    cmd = [sys.executable, "-c", BUILD, str(TESTS), str(path), str(n)]
    subprocess.run(cmd, input=json.dumps(config), text=True, check=True)
    return path


def key_sets(n_keys: int) -> dict[str, dict[str, int]]:
    """The key sets of part 1: ``n_keys`` keys naming every other module index (half the
    modules have a key, the rest fall through all of them)."""
    return {
        "plain": {f"layers.{i}.mlp.proj": 2 for i in range(0, 2 * n_keys, 2)},
        "anchored": {"^" + re.escape(NAME.format(i=i)): 2 for i in range(0, 2 * n_keys, 2)},
        "regex": {r"layers\.\d+\.mlp\..*": 2, r"layers\.[0-3]\.q_proj": 3, "(q|k|v)_proj": 4},
    }


def _tries(n_modules: int, n_keys: int) -> float:
    """Keys PEFT's rule tries over all modules: module i (even, with a key) stops at key i/2,
    the others try every key."""
    even = (n_modules + 1) // 2
    hits = min(even, n_keys)
    return hits * (hits - 1) / 2 + hits + (n_modules - hits) * n_keys


def part1(n_modules: int, n_keys: int) -> None:
    modules = [NAME.format(i=i) for i in range(n_modules)]
    print(f"{'keys':<22} {'build s':>8} {'match s':>8} {'steps':>12} {'PEFT rule (est.) s':>19}")
    for label, keys in key_sets(n_keys).items():
        t0 = time.perf_counter()
        compiled = PatternKeys(keys, "rank_pattern")
        t1 = time.perf_counter()
        for m in modules:
            compiled.first(m)
        t2 = time.perf_counter()
        # PEFT's get_pattern_key on a sample: a miss tries every key, a hit stops at it.
        sample_keys = list(keys)[: min(len(keys), 2000)]
        pairs = 0
        t3 = time.perf_counter()
        for m in modules[:50]:
            for k in sample_keys:
                pairs += 1
                if re.match(rf"(.*\.)?({k})$", m):
                    break
        per_pair = (time.perf_counter() - t3) / max(pairs, 1)
        # A module with a key tries the keys before it, one without tries them all; each try
        # compiles its pattern again once there are more keys than re's cache holds (512).
        tries = n_modules if label == "regex" else _tries(n_modules, len(keys))  # regex: key 1
        peft = per_pair * tries
        name = f"{len(keys):,} {label}"
        print(f"{name:<22} {t1 - t0:>8.2f} {t2 - t1:>8.2f} {compiled.steps:>12,} {peft:>19,.0f}")


def part2(n_modules: int, n_keys: int, rounds: int, work: Path) -> None:
    plain = build(work / "plain", n_modules)
    patterned = build(
        work / "patterned",
        n_modules,
        rank_pattern={f"layers.{i}.mlp.proj": 1 for i in range(0, 2 * n_keys, 2)},
        alpha_pattern={r"layers\.\d+\.mlp\..*": 2},
    )
    cli = cli_command()
    runs = {
        "inspect": [*cli, "inspect", str(plain)],
        "validate": [*cli, "validate", str(plain)],
        "inspect, patterns": [*cli, "inspect", str(patterned)],
        "validate, patterns": [*cli, "validate", str(patterned)],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for r in range(rounds):
        for name in runs if r % 2 == 0 else reversed(list(runs)):
            wall, peak, rc = run_process(runs[name])
            if rc != 0:
                sys.exit(f"{name} exited {rc}: {' '.join(runs[name])}")
            results[name].append((wall, peak))
    title = f"command ({n_modules:,} modules)"
    print(f"{title:<28} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, got in results.items():
        wall = statistics.median(w for w, _ in got)
        peak = statistics.median(p for _, p in got)
        print(f"{name:<28} {wall:>8.2f} {peak:>13.0f}")
    sizes = {p.name: (p / "adapter_config.json").stat().st_size for p in (plain, patterned)}
    print(f"config sizes: {json.dumps(sizes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; Python {platform.python_version()}")
    part1(args.modules, args.keys)
    work = Path(tempfile.mkdtemp(prefix="adapterctl-bench-patterns-"))
    try:
        part2(args.modules, args.keys, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
