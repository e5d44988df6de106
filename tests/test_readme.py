"""The README's Python section runs: its code block, in the folder the demo writes, with the
registry in a temporary ``ADAPTERCTL_HOME``, must finish and print what it says it does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from adapterctl import demo

README = Path(__file__).resolve().parent.parent / "README.md"


def library_block() -> str:
    """The first ```python block of the README's "## Library" section."""
    text = README.read_text()
    section = text[text.index("\n## Library\n") :]
    section = section[: section.index("\n## ", 1)]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Library section has no python block"
    return match.group(1)


def test_the_library_section_runs(tmp_path: Path) -> None:
    demo.build(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERCTL_DEBUG"}
    env["ADAPTERCTL_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-c", library_block()], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "chat-code@1" and last[2] == "chat-merged@1" and last[3] == "numpy"
    assert 0.0 < float(last[1]) <= 1.0
    for out in ("chat-code", "chat-r4", "merged"):
        assert (tmp_path / out).is_dir()
