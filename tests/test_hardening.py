"""Hardening, one test per class: never destroy an input (an OUT that is, contains or lies
inside an input is refused by merge, compose and resize, ``--force`` or not, however the path is
spelled: exit 5); ``add`` keeps to the adapter's folder and its permissions; ``gc`` trusts no
damaged database; index shard names stay in the folder; names and aliases are whole strings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from builders import llama_model, peft_adapter, save_base
from click.testing import CliRunner

from adapterctl.cli import cli
from adapterctl.files import replace_dir


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    model = llama_model()
    save_base(model, root / "work" / "base")
    peft_adapter(model, root / "work" / "adapter")
    (root / "work" / "notes.txt").write_text("keep me")
    return root


@pytest.fixture
def work(tree: Path, tmp_path: Path) -> Path:
    shutil.copytree(tree / "work", tmp_path / "work")
    os.symlink(tmp_path / "work" / "base", tmp_path / "link-to-base")
    return tmp_path / "work"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cases(work: Path) -> list[list[str]]:
    base, adapter = str(work / "base"), str(work / "adapter")
    link = str(work.parent / "link-to-base")
    merge = ["merge", base, adapter, "--force", "-o"]
    return [
        [*merge, base],  # OUT is the base
        [*merge, link],  # ... spelled through a symlink
        [*merge, str(work / "adapter" / ".." / "base")],  # ... or with ..
        [*merge, str(work)],  # OUT contains the base and the adapter
        [*merge, str(work / "base" / "merged")],  # OUT lies inside the base
        ["compose", adapter, adapter, "--method", "linear", "--force", "-o", adapter],
        ["compose", adapter, adapter, "--method", "linear", "-o", str(work / "adapter" / "x")],
        ["resize", adapter, "--rank", "2", "--force", "-o", str(work)],
    ]


@pytest.mark.parametrize("case", range(8))
def test_an_out_overlapping_an_input_is_refused(case: int, work: Path) -> None:
    args = _cases(work)[case]
    before = _snapshot(work)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 5, (args, r.output)
    assert "would destroy the input (--force never does)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _snapshot(work) == before  # nothing touched
    assert not [p for p in work.parent.rglob(".*") if "partial" in p.name or "old" in p.name]


def test_a_sibling_out_is_fine(work: Path) -> None:
    r = CliRunner().invoke(
        cli, ["merge", str(work / "base"), str(work / "adapter"), "-o", str(work / "merged")]
    )
    assert r.exit_code == 0, r.output


def test_force_over_a_file_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_text("old")
    new = tmp_path / ".new"
    new.write_text("new")
    replace_dir(new, out)
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_add_refuses_links_out_of_the_folder_and_keeps_permissions(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    secret = tmp_path / "secret.safetensors"
    shutil.copy(tree / "work" / "adapter" / "adapter_model.safetensors", secret)
    secret.chmod(0o600)
    linked = tmp_path / "linked"
    shutil.copytree(tree / "work" / "adapter", linked)
    (linked / "adapter_model.safetensors").unlink()
    os.symlink(secret, linked / "adapter_model.safetensors")
    r = CliRunner().invoke(cli, ["add", str(linked), "--name", "leak"])
    assert r.exit_code == 3 and "outside the adapter folder" in r.stderr, r.output
    stored = tmp_path / "home" / "blobs"
    assert not stored.exists() or not [p for p in stored.rglob("*") if p.is_file()]
    private = tmp_path / "private"
    shutil.copytree(tree / "work" / "adapter", private)
    for f in private.iterdir():
        f.chmod(0o600)
    r = CliRunner().invoke(cli, ["add", str(private), "--name", "mine"])
    assert r.exit_code == 0, r.output
    blobs = [p for p in (tmp_path / "home" / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(p.stat().st_mode & 0o077 == 0 for p in blobs)  # not world-readable
    r = CliRunner().invoke(cli, ["export", "mine@1", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "out").iterdir())


def test_gc_deletes_nothing_from_a_damaged_registry(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(cli, ["add", str(tree / "work" / "adapter"), "--name", "chat"])
    assert r.exit_code == 0, r.output
    blobs = sorted(p for p in (tmp_path / "home" / "blobs").rglob("*") if p.is_file())
    conn = sqlite3.connect(tmp_path / "home" / "registry.db")
    conn.execute("DROP TRIGGER files_no_delete")
    conn.execute("DELETE FROM files WHERE path = 'adapter_model.safetensors'")
    conn.commit()
    conn.close()
    r = CliRunner().invoke(cli, ["registry", "verify"])
    assert r.exit_code == 1
    assert "append-only trigger dropped: files_no_delete" in r.stdout
    assert "digest does not match the recorded files: chat@1" in r.stdout
    r = CliRunner().invoke(cli, ["registry", "gc"])
    assert r.exit_code == 1 and "gc deleted nothing" in r.stderr, r.output
    assert "1 append-only trigger(s) dropped; files of chat@1 do not match" in r.stderr
    assert sorted(p for p in (tmp_path / "home" / "blobs").rglob("*") if p.is_file()) == blobs


@pytest.mark.parametrize("shard", ["../secret.safetensors", "/etc/secret.safetensors"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(
    shard: str, tree: Path, tmp_path: Path
) -> None:
    import json

    base = tmp_path / "base"
    shutil.copytree(tree / "work" / "base", base)
    shutil.copy(base / "model.safetensors", tmp_path / "secret.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": shard}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    r = CliRunner().invoke(cli, ["validate", str(tree / "work" / "adapter"), "--base", str(base)])
    assert r.exit_code == 3 and "outside the checkpoint's folder" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["chat\n", "chat\nx"])
def test_names_and_aliases_are_whole_strings(
    name: str, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    adapter = str(tree / "work" / "adapter")
    assert CliRunner().invoke(cli, ["add", adapter, "--name", name]).exit_code == 2
    assert CliRunner().invoke(cli, ["add", adapter, "--name", "ok", "--tag", name]).exit_code == 2


@pytest.mark.parametrize(
    "fifo",
    [
        "base/config.json",
        "base/model.safetensors.index.json",
        "base/model.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ],
)
@pytest.mark.timeout(90)  # past the subprocess's own 60 s: a hang fails, never stalls
def test_a_fifo_is_refused_not_waited_on(fifo: str, tree: Path, tmp_path: Path) -> None:
    """Run in a subprocess with a timeout: a regression fails the test instead of hanging CI."""
    import subprocess
    import sys

    shutil.copytree(tree / "work", tmp_path / "work")
    target = tmp_path / "work" / fifo
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    args = [
        "validate",
        str(tmp_path / "work" / "adapter"),
        "--base",
        str(tmp_path / "work" / "base"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert (
        proc.stderr.strip() == f"Error: {target}: not a regular file; replace it with the real file"
    )


@pytest.mark.parametrize("method", ["linear", "ties", "svd"])
def test_compose_output_is_byte_reproducible(method: str, tree: Path, tmp_path: Path) -> None:
    """Composing the same inputs twice writes the same bytes (weights, config, metadata order),
    so the two results have the same digest. (linear's second run leaves --method out: it is
    the default, as in merge.)"""
    model = llama_model()
    peft_adapter(model, tmp_path / "other", seed=7)
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        args = ["compose", str(tree / "work" / "adapter"), str(tmp_path / "other"), "-o", str(out),
                "-w", "0.7", "-w", "0.3"]  # fmt: skip
        if method != "linear" or out == first:
            args += ["--method", method]
        if method == "ties":
            args += ["--density", "0.5"]
        if method == "svd":
            args += ["--rank", "4"]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    names = sorted(p.name for p in first.iterdir() if p.is_file())
    assert "adapter_model.safetensors" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
