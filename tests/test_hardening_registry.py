"""Hardening of the registry's trust, one test per class: a checkout whose bytes changed is
never used (made again from the blobs, and said so); ``gc`` judges checkouts by content;
``merge --hash-base`` enforces content pins and every merge report says which level was
checked; a name keeps to one base; an out-of-range version number is not found (exit 4); a
database with a deleted version row stops commands with a one-line exit 1, never 70."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from builders import gpt2_model, llama_model, peft_adapter, save_base
from click.testing import CliRunner, Result
from safetensors.numpy import load_file

from adapterctl.cli import cli
from adapterctl.registry import HOME_ENV, Registry


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama base, a same-shaped sibling with other weights, an adapter of the first; a
    GPT-2 base and an adapter of it."""
    root = tmp_path_factory.mktemp("tree")
    llama = llama_model()
    save_base(llama, root / "base")
    peft_adapter(llama, root / "adapter")
    save_base(llama_model(seed=5), root / "sibling")
    gpt2 = gpt2_model()
    save_base(gpt2, root / "gpt2")
    peft_adapter(gpt2, root / "gpt2-adapter", target_modules=["c_attn"])
    return root


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(h))
    return h


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def add(tree: Path, *extra: str) -> None:
    r = run("add", tree / "adapter", "--name", "chat", "--base", tree / "base", *extra)
    assert r.exit_code == 0, r.output


def flip_last_byte(path: Path) -> None:
    """Change a file's content, keeping its size."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(r: Result, code: int) -> str:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_a_changed_checkout_is_never_used(
    tree: Path, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(tree)
    reg = Registry()
    v = reg.resolve("chat@1")
    checkout = reg.checkout(v)
    weights = checkout / "adapter_model.safetensors"
    stored = {e.path: e.sha256 for e in v.files}

    # Same size, other bytes: merge name@1 uses the version's bytes, and says it re-made them.
    flip_last_byte(weights)
    r = run("merge", tree / "base", "chat@1", "-o", tmp_path / "from-registry")
    assert r.exit_code == 0, r.output
    assert sha256(weights) == stored["adapter_model.safetensors"]
    r = run("merge", tree / "base", tree / "adapter", "-o", tmp_path / "from-folder")
    assert r.exit_code == 0, r.output
    got = load_file(str(tmp_path / "from-registry" / "model.safetensors"))
    want = load_file(str(tmp_path / "from-folder" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)

    # The same with the file's mtime set back (its ctime still moves), through the real
    # stderr of the command line.
    st = weights.stat()
    flip_last_byte(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", "inspect", "chat@1", "--json"],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"registry checkout {checkout} of chat@1 no longer holds" in proc.stderr
    assert "made it again from the stored blobs" in proc.stderr
    assert sha256(weights) == stored["adapter_model.safetensors"]

    # A file added to the checkout (the merge would copy a stray tokenizer) is noticed too.
    checkout.chmod(0o755)
    (checkout / "tokenizer.json").write_text("{}")
    assert reg.checkout(v) == checkout
    assert not (checkout / "tokenizer.json").exists()

    # An untouched checkout costs stat calls, not a re-hash.
    import adapterctl.identity

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    with monkeypatch.context() as m:
        m.setattr(adapterctl.identity, "file_sha256", no_hashing)
        assert reg.checkout(v) == checkout

    # A blob altered in the store too: refused, naming verify (exit 1), nothing used.
    flip_last_byte(weights)
    flip_last_byte(reg.blob_path(stored["adapter_model.safetensors"]))
    line = one_error_line(run("inspect", "chat@1"), 1)
    assert "was altered on disk" in line and "adapterctl registry verify" in line


def test_gc_and_verify_judge_checkouts_by_content(tree: Path, home: Path) -> None:
    add(tree)
    reg = Registry()
    checkout = reg.checkout("chat@1")
    size = (checkout / "adapter_model.safetensors").stat().st_size
    flip_last_byte(checkout / "adapter_model.safetensors")
    assert (checkout / "adapter_model.safetensors").stat().st_size == size
    r = run("registry", "verify")
    assert (
        r.exit_code == 1
        and f"altered checkout (removed by adapterctl registry gc): {checkout}" in (r.stdout)
    ), r.output
    r = run("registry", "gc", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkouts_removed"] == 1
    assert not checkout.exists()
    assert run("registry", "verify").exit_code == 0


def test_merge_hash_base_enforces_content_pins(tree: Path, home: Path, tmp_path: Path) -> None:
    add(tree, "--hash-base")  # pinned to the base's content digest
    # A same-shaped base with other weights: only the fingerprint can be compared unless the
    # weights are hashed, and the report says so.
    r = run("merge", tree / "sibling", "chat@1", "-o", tmp_path / "a", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["base_check"] == "fingerprint"
    assert report["base_pin_checks"] == [
        "chat@1: base pin checked by fingerprint (the weights were not compared: pass "
        "--hash-base to compare its content)"
    ]
    # --hash-base: refused, both content digests named, nothing written.
    reg = Registry()
    pinned = reg.resolve("chat@1").base.content_digest
    assert pinned is not None
    line = one_error_line(
        run("merge", tree / "sibling", "chat@1", "-o", tmp_path / "b", "--hash-base"), 5
    )
    assert f"pinned to base content {pinned[:19]}" in line
    assert f"{tree / 'sibling'} has sha256:" in line and "--allow-base-mismatch" in line
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b")]
    # Let through: the report says a mismatch was allowed.
    r = run("merge", tree / "sibling", "chat@1", "-o", tmp_path / "c", "--hash-base",
            "--allow-base-mismatch", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base_check"] == "mismatch"
    assert "--allow-base-mismatch: chat@1 is pinned to base content" in r.stderr
    # The right base: compared by content, in text and JSON.
    r = run("merge", tree / "base", "chat@1", "-o", tmp_path / "d", "--hash-base")
    assert r.exit_code == 0, r.output
    assert "chat@1: base pin checked by content digest" in r.stdout
    r = run("merge", tree / "base", "chat@1", "-o", tmp_path / "e", "--dry-run", "--json")
    assert json.loads(r.stdout)["base_check"] == "content"  # the hashes are cached now
    # A local adapter has no pin: said so, and --hash-base says it had nothing to compare.
    r = run("merge", tree / "base", "chat@1", tree / "adapter", "-o", tmp_path / "f",
            "--dry-run", "--json", "--hash-base")  # fmt: skip
    assert json.loads(r.stdout)["base_check"] == "unpinned"
    r = run("merge", tree / "base", tree / "adapter", "-o", tmp_path / "g", "--dry-run",
            "--json", "--hash-base")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base_check"] == "unpinned"
    assert "--hash-base: no SOURCE is a registry version" in r.stderr
    # A fingerprint-only pin with --hash-base: compared by fingerprint, with a warning.
    r = run("add", tree / "gpt2-adapter", "--name", "fp", "--base", tree / "gpt2")  # not hashed
    assert r.exit_code == 0, r.output
    r = run("merge", tree / "gpt2", "fp@1", "-o", tmp_path / "h", "--dry-run", "--json",
            "--hash-base")  # fmt: skip
    assert json.loads(r.stdout)["base_check"] == "fingerprint"
    assert "--hash-base: fp@1 is pinned by fingerprint only" in r.stderr


def test_a_name_keeps_to_one_base(tree: Path, home: Path) -> None:
    add(tree)
    blobs = sorted(p for p in (home / "blobs").rglob("*") if p.is_file())
    gpt2 = ["add", tree / "gpt2-adapter", "--name", "chat", "--base", tree / "gpt2"]
    line = one_error_line(run(*gpt2), 5)
    assert "chat@1 is pinned to base sha256:" in line and "(LlamaForCausalLM," in line
    assert "(GPT2LMHeadModel," in line and "pass --allow-base-mismatch" in line
    assert [v.number for v in [Registry().resolve("chat")]] == [1]  # nothing added
    assert sorted(p for p in (home / "blobs").rglob("*") if p.is_file()) == blobs  # or stored
    r = run(*gpt2, "--allow-base-mismatch")
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("Warning: --allow-base-mismatch: chat's new version is pinned")
    assert Registry().resolve("chat").base.architecture == "GPT2LMHeadModel"
    # The same base again, and a new name: no question asked.
    r = run("add", tree / "gpt2-adapter", "--name", "chat", "--base", tree / "gpt2", "-m", "2")
    assert r.exit_code == 5 and "already holds this adapter" in r.stderr  # the usual duplicate
    r = run("add", tree / "gpt2-adapter", "--name", "gpt", "--base", tree / "gpt2")
    assert r.exit_code == 0 and r.stderr == "", r.output


@pytest.mark.parametrize("ref", ["chat@99999999999999999999999", "chat@0", "chat@2"])
def test_a_version_number_out_of_range_is_not_found(ref: str, tree: Path, home: Path) -> None:
    add(tree)
    for args in (["inspect", ref], ["show", ref], ["tag", ref, "prod"], ["rm", ref]):
        line = one_error_line(run(*args), 4)
        assert f"chat has no version {ref.split('@')[1]} (versions 1 to 1)" in line, args


def test_a_deleted_version_row_stops_commands_cleanly(
    tree: Path, home: Path, tmp_path: Path
) -> None:
    add(tree, "--tag", "prod")
    r = run("compose", "chat@1", "chat@1", "--method", "linear", "-o", tmp_path / "mix",
            "--register", "mix")  # fmt: skip
    assert r.exit_code == 0, r.output
    add(tree, "--hash-base")  # chat@2: the same files, pinned to the base's content too
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("DROP TRIGGER versions_no_delete")
    conn.execute("DELETE FROM versions WHERE name = 'chat' AND number = 1")
    conn.commit()
    conn.close()

    r = run("registry", "verify")
    assert r.exit_code == 1, r.output
    assert "dangling reference: 2 lineage row(s) refer by parent_id to versions.id" in r.stdout
    assert "dangling reference: 1 tag_events row(s) refer by version_id" in r.stdout
    assert "missing version: chat@1: no version row" in r.stdout

    for args in (
        ["show", "chat@1"],  # a hole in the numbering
        ["show", "chat@prod"],  # an alias pointing at the deleted row
        ["log", "chat"],
        ["show", "mix"],  # a lineage parent that is gone
        ["inspect", "mix@1"],
        ["rm", "mix@1"],  # refused before the tombstone is committed
        ["merge", str(tree / "base"), "mix", "-o", str(tmp_path / "m")],
    ):
        line = one_error_line(run(*args), 1)
        assert f"{home / 'registry.db'}: the registry database is damaged" in line, args
        assert "adapterctl registry verify" in line, args
    assert Registry().show("chat@2").removed is None  # the live version is still usable
    assert run("inspect", "chat@2").exit_code == 0
    conn = sqlite3.connect(home / "registry.db")
    assert conn.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0
    conn.close()
    assert not (tmp_path / "m").exists()
