"""Benchmark: how fast the reporting commands start, against a bare ``import numpy``.

Builds the demo's files once (``adapterctl demo --keep``: a tiny sharded bf16 base and a few
small adapters, and a registry), then times whole processes, start-up included, in paired
rounds: each round runs ``adapterctl validate <small adapter> --base <sharded base>``,
``python -c "import numpy"`` and the other reporting commands (``inspect``, ``diff``,
``list``, ``show``), the order rotating from round to round so the machine's drift spreads
over all of them. Reports the median wall time and peak RSS of each, and each command's
ratio to ``import numpy`` (the median of the per-round ratios).

Goal (not a test gate): ``validate`` within 2.5× of ``python -c "import numpy"``.

    python bench/startup.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 2.5


def cli_command() -> list[str]:
    """The installed ``adapterctl`` script next to this interpreter (what a user runs)."""
    script = Path(sys.executable).with_name("adapterctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "adapterctl"]


def run_process(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) and exit code of one process (``env``: its environment,
    default this one's). bench/patterns.py measures with it too."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def cpu_model() -> str:
    """The CPU's model name, for the results' machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compile_bytecode() -> None:
    """Compile adapterctl's and its installed plugins' modules to bytecode, as ``pip install``
    does for a regular install: an editable install (``make install``) run with
    ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module on every start
    (0.1 s here), which no user's install does."""
    import compileall
    from importlib import import_module
    from importlib.metadata import entry_points

    names = ["adapterctl"] + [ep.module.split(".")[0] for ep in entry_points(group="adapterctl")]
    for name in dict.fromkeys(names):
        try:
            folder = Path(import_module(name).__file__ or "").parent
        except ImportError:
            continue
        compileall.compile_dir(folder, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="adapterctl-bench-startup-"))
    demo = work / "demo"
    env = dict(os.environ, ADAPTERCTL_HOME=str(work / "home"))
    env.pop("ADAPTERCTL_DEBUG", None)
    cli = cli_command()
    if not (demo / "base").is_dir():
        shutil.rmtree(demo, ignore_errors=True)
        null = subprocess.DEVNULL
        subprocess.run(
            [*cli, "demo", "--keep", str(demo)], env=env, check=True, stdout=null, stderr=null
        )
    adapter = demo / "adapters" / "code-rslora"  # bf16 factors, 2 layers
    other = demo / "adapters" / "chat-lora"
    base = demo / "base" / "tiny-llama"  # sharded: 2 safetensors files + index
    env["ADAPTERCTL_HOME"] = str(demo / "registry")  # the demo's registry: chat@1, code@1…
    commands = {
        "import numpy": [sys.executable, "-c", "import numpy"],
        "validate": [*cli, "validate", str(adapter), "--base", str(base)],
        "inspect": [*cli, "inspect", str(adapter)],
        "inspect --base": [*cli, "inspect", str(adapter), "--base", str(base)],
        "diff": [*cli, "diff", str(other), str(adapter)],
        "list": [*cli, "list"],
        "show": [*cli, "show", "chat@1"],
    }
    compile_bytecode()
    for name, cmd in commands.items():  # warm the page cache and check each one works
        _, _, rc = run_process(cmd, env)
        if rc != 0:
            sys.exit(f"{name} exited {rc}: {' '.join(cmd)}")

    names = list(commands)
    walls: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        got = {}
        for name in order:
            wall, peak, _ = run_process(commands[name], env)
            got[name] = wall
            walls[name].append(wall)
            rss[name].append(peak)
        for name in names:
            ratios[name].append(got[name] / got["import numpy"])

    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; Python {platform.python_version()}")
    print(f"rounds: {args.rounds}; adapter {adapter.name}, base {base.name} (sharded)")
    print(f"validate: {' '.join(commands['validate'])}")
    print(f"{'command':<16} {'wall s':>8} {'× numpy':>8} {'peak RSS MiB':>13}")
    for name in names:
        print(
            f"{name:<16} {statistics.median(walls[name]):>8.3f} "
            f"{statistics.median(ratios[name]):>8.2f} {statistics.median(rss[name]):>13.0f}"
        )
    ratio = statistics.median(ratios["validate"])
    verdict = "meets" if ratio <= GOAL else "misses"
    print(f"validate / import numpy = {ratio:.2f}× ({verdict} the {GOAL}× goal)")


if __name__ == "__main__":
    main()
