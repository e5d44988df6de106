"""The registry: add → list → show → tag → refs → export, immutability at the SQL level,
tombstones, lineage, base pins, concurrent adds, kill -9 mid-add, and the schema contract.

Adapters and bases here are a few KB, written with numpy + safetensors only, so the
processes of the concurrency and crash tests never need torch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import cli
from adapterctl.errors import Conflict, NotFound, VersionRemoved
from adapterctl.migrations import schema_sql
from adapterctl.refs import resolve
from adapterctl.registry import HOME_ENV, Registry

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 16


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own registry: ADAPTERCTL_HOME in a temporary folder."""
    h = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(h))
    return h


def write_adapter(path: Path, seed: int, *, layers: int = 2, r: int = 2,
                  base_name: str = "tiny/base") -> Path:  # fmt: skip
    """A PEFT folder: LoRA on q_proj and v_proj of ``layers`` layers, float32."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for mod in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, HIDDEN)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((HIDDEN, r)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base_name, "revision": None, "task_type": "CAUSAL_LM",
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def write_base(path: Path, *, layers: int = 2, seed: int = 0, dtype: type = np.float16) -> Path:
    """A Llama-shaped base with just the attention projections (a few KB)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for mod in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = rng.standard_normal((HIDDEN, HIDDEN)).astype(dtype)
            tensors[f"model.layers.{i}.self_attn.{mod}.weight"] = w
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "num_hidden_layers": layers, "hidden_size": HIDDEN}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "a1": write_adapter(tmp_path / "a1", 1),
        "a2": write_adapter(tmp_path / "a2", 2),
        "base": write_base(tmp_path / "base"),
    }


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_add_list_show_tag_refs_export(files: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run("add", str(files["a1"]), "--name", "chat", "--base", str(files["base"]),
                         "--tag", "prod", "-m", "first")  # fmt: skip
    assert code == 0, err
    assert out.startswith("added chat@1 sha256:")
    assert "base pin: fingerprint" in out
    code, out, err = run("add", str(files["a2"]), "--name", "chat", "--json")
    assert code == 0, err
    v2 = json.loads(out)
    assert (v2["ref"], v2["base"]["label"]) == ("chat@2", "name only (unverified)")
    assert v2["base"]["name"] == "tiny/base"

    code, out, _ = run("list", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert (row["name"], row["latest"], row["versions"], row["tags"]) == ("chat", 2, 2, {"prod": 1})
    code, out, _ = run("list")
    assert out.splitlines()[0].split() == ["NAME", "LATEST", "VERSIONS", "BASE", "PIN", "SIZE",
                                           "TAGS"]  # fmt: skip

    code, out, _ = run("show", "chat@prod", "--json")
    v1 = json.loads(out)
    assert v1["ref"] == "chat@1" and v1["tags"] == ["prod"] and v1["message"] == "first"
    assert v1["base"]["level"] == "fingerprint"
    assert v1["base"]["fingerprint"].startswith("sha256:")
    assert {f["path"] for f in v1["files"]} == {"adapter_config.json", "adapter_model.safetensors"}
    code, out, _ = run("show", "chat@1")
    assert re.search(r"^base pin +fingerprint$", out, re.M)

    code, out, _ = run("tag", "chat@2", "prod")
    assert (code, out) == (0, "chat@prod → chat@2 (was chat@1)\n")

    reg = Registry()
    forms = {
        "chat": 2, "chat@latest": 2, "chat@1": 1, "chat@2": 2, "chat@prod": 2,
        v1["digest"][:14]: 1, v2["digest"][:14]: 2, v1["files_digest"][:20]: 1,
    }  # fmt: skip
    for ref, number in forms.items():
        assert reg.resolve(ref).number == number, ref
        folder = resolve(ref)
        src = files["a1"] if number == 1 else files["a2"]
        for f in src.iterdir():
            assert (folder / f.name).read_bytes() == f.read_bytes(), ref
    # Every SOURCE-taking command accepts a reference.
    code, out, err = run("inspect", "chat@1", "--json")
    assert code == 0, err
    assert json.loads(out)["digest"] == v1["files_digest"]
    code, out, err = run("validate", "chat@prod", "--base", str(files["base"]))
    assert code == 0, err

    code, out, err = run("export", "chat@1", str(tmp_path / "out"))
    assert code == 0, err
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert exported == ["adapter_config.json", "adapter_model.safetensors"]
    for name in exported:
        assert (tmp_path / "out" / name).read_bytes() == (files["a1"] / name).read_bytes()
    code, _, err = run("export", "chat@1", str(tmp_path / "out"))
    assert code == 5 and "not empty" in err
    code, out, err = run("export", "chat@1", str(tmp_path / "out2"), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["ref"], shown["out"]) == ("chat@1", str(tmp_path / "out2"))
    assert sorted(f["path"] for f in shown["files"]) == exported

    code, out, _ = run("log", "chat", "--json")
    events = [(e["event"], e["ref"], e["alias"]) for e in json.loads(out)]
    assert events == [("tagged", "chat@2", "prod"), ("added", "chat@2", None),
                      ("tagged", "chat@1", "prod"), ("added", "chat@1", None)]  # fmt: skip


def test_identical_files_are_stored_once(files: dict[str, Path], home: Path) -> None:
    reg = Registry()
    reg.add(files["a1"], "one")
    reg.add(files["a1"], "two")
    reg.add(files["a1"], "one", base=files["base"])  # another pin: a new version, same blobs
    blobs = [p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(blobs) == 2
    with pytest.raises(Conflict, match=r"one@1 already holds this adapter"):
        reg.add(files["a1"], "one")


def test_version_rows_are_immutable_in_sql(files: dict[str, Path], home: Path) -> None:
    reg = Registry()
    reg.add(files["a1"], "chat", tags=["prod"])
    reg.rm("chat@1")
    reg.close()
    conn = sqlite3.connect(home / "registry.db")
    statements = [
        "UPDATE versions SET digest = 'sha256:00'",
        "UPDATE versions SET number = 7",
        "DELETE FROM versions",
        "UPDATE files SET sha256 = 'x'",
        "DELETE FROM files",
        "DELETE FROM tombstones",
        "UPDATE tag_events SET version_id = 2",
        "DELETE FROM tag_events",
        "INSERT OR REPLACE INTO versions SELECT * FROM versions",
        "INSERT OR REPLACE INTO versions (name, number, digest, files_digest, format, size, "
        "pin_level, created_at) VALUES ('chat', 1, 'd', 'f', 'peft', 1, 'none', 't')",
        "INSERT OR REPLACE INTO tombstones (version_id, removed_at) VALUES (1, 't')",
    ]
    for sql in statements:
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            conn.execute(sql)
    conn.rollback()
    assert conn.execute("SELECT count(*), min(number) FROM versions").fetchone() == (1, 1)
    conn.close()


def test_rm_leaves_a_tombstone(files: dict[str, Path]) -> None:
    reg = Registry()
    reg.add(files["a1"], "chat", tags=["prod"])
    reg.add(files["a2"], "chat")
    code, out, err = run("rm", "chat@1")
    assert code == 0, err
    assert out.startswith("removed chat@1 (tombstone)")
    for ref in ("chat@1", "chat@prod", reg.show("chat@1").digest[:20]):
        code, _, err = run("inspect", ref)
        assert code == 4, ref
        assert "removed at" in err and "tombstone" in err, err
    with pytest.raises(VersionRemoved, match=r"chat@prod points at chat@1, which was removed"):
        reg.resolve("chat@prod")
    assert reg.resolve("chat").number == 2
    assert reg.show("chat@1").removed is not None  # show still describes it
    write_adapter(Path(files["a1"].parent / "a3"), 3)
    assert reg.add(files["a1"].parent / "a3", "chat").number == 3  # never reused
    reg.rm("chat@2")
    reg.rm("chat@3")
    with pytest.raises(VersionRemoved, match="every version of chat was removed"):
        reg.resolve("chat")
    events = [e.event for e in reg.log("chat")]
    assert events.count("removed") == 3
    # Re-adding removed content makes a new version.
    assert reg.add(files["a1"], "chat").number == 4


def test_unknown_and_ambiguous_refs(files: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("inspect", "chat")
    assert code == 4 and "registry is empty" in err
    reg = Registry()
    reg.add(files["a1"], "chat", tags=["prod"])
    code, _, err = run("show", "nope")
    assert code == 4
    assert "no registry adapter named 'nope' (registry has: chat)" in err
    code, _, err = run("inspect", "chat@7")
    assert (code, err) == (4, "Error: chat has no version 7 (versions 1 to 1); list them with: "
                               "adapterctl log chat\n")  # fmt: skip
    code, _, err = run("inspect", "chat@staging")
    assert code == 4 and "(aliases: prod)" in err
    code, _, err = run("inspect", "hf://owner/repo")  # the test Hub endpoint is closed
    assert code == 6 and err.startswith("Error: hf://owner/repo: pull failed: cannot reach")
    code, _, err = run("inspect", str(tmp_path / "missing"))
    assert code == 4 and "no such adapter file or folder" in err
    # Add until two version digests share a first hex digit (pigeonhole: at most 17).
    seen: dict[str, str] = {reg.resolve("chat").digest[7]: "chat@1"}
    for seed in range(10, 40):
        v = reg.add(write_adapter(tmp_path / f"s{seed}", seed), f"n{seed}")
        if v.digest[7] in seen:
            break
        seen[v.digest[7]] = v.ref
    with pytest.raises(NotFound, match=rf"sha256:{v.digest[7]} is ambiguous: it matches"):
        reg.resolve(f"sha256:{v.digest[7]}")
    code, _, err = run("show", f"sha256:{v.digest[7]}")
    assert code == 4 and "use a longer prefix" in err


def test_aliases_are_checked(files: dict[str, Path]) -> None:
    Registry().add(files["a1"], "chat")
    for alias in ("latest", "3", "-x"):
        code, _, err = run("tag", "chat@1", alias)
        assert code == 2, alias
    code, _, err = run("add", str(files["a2"]), "--name", "bad/name")
    assert code == 2 and "not a valid adapter name" in err


def test_add_validates_against_the_base(files: dict[str, Path], tmp_path: Path) -> None:
    deep = write_adapter(tmp_path / "deep", 5, layers=4)
    code, _, err = run("add", str(deep), "--name", "deep", "--base", str(files["base"]))
    assert code == 3
    assert err.startswith(f"Error: {deep} does not fit {files['base']}: AC203")
    assert Registry().list() == []
    code, _, err = run("add", str(files["a1"]), "--name", "x", "--hash-base")
    assert code == 2 and "--hash-base needs a local base" in err


def test_base_pins_and_hash_cache(files: dict[str, Path], tmp_path: Path) -> None:
    reg = Registry()
    base = files["base"]
    v1 = reg.add(files["a1"], "chat", base=base, hash_base=True)
    assert v1.base.level == "content digest"
    assert [f.path for f in v1.base.files] == ["model.safetensors"]
    # The next add against the same base reuses the cached hash: no --hash-base needed.
    v2 = reg.add(files["a2"], "chat", base=base)
    assert v2.base.content_digest == v1.base.content_digest
    # A changed mtime invalidates the cache entry.
    st = (base / "model.safetensors").stat()
    os.utime(base / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    v3 = reg.add(write_adapter(tmp_path / "a3", 3), "chat", base=base)
    assert v3.base.level == "fingerprint"
    _code, out, _ = run("show", "chat@1")
    assert re.search(r"^base pin +content digest$", out, re.M)
    # list --base: a folder (its fingerprint), a digest prefix, or a base name.
    reg.add(files["a1"], "unpinned")
    fp = v1.base.fingerprint
    assert fp is not None
    for key in (str(base), fp[:12], "tiny/base"):
        names = [s.name for s in reg.list(base=key)]
        assert names == (["chat", "unpinned"] if key == "tiny/base" else ["chat"]), key
    assert reg.list(base="sha256:0000") == []


def test_check_base_pin(files: dict[str, Path], tmp_path: Path) -> None:
    reg = Registry()
    reg.add(files["a1"], "fp", base=files["base"])
    reg.add(files["a1"], "cd", base=files["base"], hash_base=True)
    reg.add(files["a1"], "named")
    same = open_checkpoint(files["base"])
    assert reg.check_base_pin("fp", same) == "fingerprint"
    assert reg.check_base_pin("cd", same) == "content digest"
    assert reg.check_base_pin(reg.resolve("named"), same) == "name only (unverified)"
    # Same names and shapes, other weights: the fingerprint agrees, the content does not.
    sibling = open_checkpoint(write_base(tmp_path / "sibling", seed=9))
    assert reg.check_base_pin("fp", sibling) == "fingerprint"
    assert reg.check_base_pin("cd", sibling) == "fingerprint"  # its files are not hashed yet
    with pytest.raises(Conflict, match=r"cd@1 is pinned to base content .*--allow-base-mismatch"):
        reg.check_base_pin("cd", sibling, hash_base=True)
    other = open_checkpoint(write_base(tmp_path / "fp32", dtype=np.float32))
    with pytest.raises(Conflict, match=r"fp@1 is pinned to base fingerprint") as info:
        reg.check_base_pin("fp", other)
    assert info.value.exit_code == 5


def test_record_lineage(files: dict[str, Path], tmp_path: Path) -> None:
    from adapterctl.registry import record_lineage

    reg = Registry()
    reg.add(files["a1"], "chat", base=files["base"])
    reg.add(files["a2"], "code", base=files["base"])
    mix = record_lineage("mix", [("chat@1", 0.7), ("code", 0.3)], "ties", {"density": 0.5},
                         write_adapter(tmp_path / "mix", 7))  # fmt: skip
    assert mix.ref == "mix@1"
    assert [(p.ref, p.weight) for p in mix.parents] == [("chat@1", 0.7), ("code@1", 0.3)]
    assert (mix.method, mix.options) == ("ties", {"density": 0.5})
    assert mix.base.level == "fingerprint"  # inherited: both parents share it
    assert mix.base.fingerprint == reg.resolve("chat").base.fingerprint
    final = reg.record_lineage("final", [(mix, 1.0)], "merge:linear", {"dtype": "bf16"},
                               write_adapter(tmp_path / "final", 8))  # fmt: skip
    assert final.parents[0].parents[1].ref == "code@1"  # the tree, two levels deep
    assert reg.show("chat@1").children == ["mix@1"]
    code, out, _ = run("show", "final")
    assert "lineage\n  final@1  (merge:linear)\n  └─ mix@1 ×1  (ties)\n" in out
    assert "     ├─ chat@1 ×0.7\n     └─ code@1 ×0.3\n" in out
    # A parent with live children needs --force.
    code, _, err = run("rm", "code@1")
    assert code == 5 and "is a lineage parent of mix@1; pass --force" in err
    code, _, err = run("rm", "code@1", "--force")
    assert code == 0, err
    assert reg.show("mix").parents[1].removed
    with pytest.raises(NotFound, match="no registry adapter named 'ghost'"):
        reg.record_lineage("x", [("ghost", 1.0)], "linear", {}, files["a1"])


def test_record_lineage_of_a_merged_checkpoint(files: dict[str, Path], home: Path) -> None:
    reg = Registry()
    reg.add(files["a1"], "chat", base=files["base"])
    merged = reg.record_lineage("chat-merged", [("chat", 1.0)], "merge:linear", {},
                                files["base"])  # fmt: skip
    assert (merged.format, merged.parents[0].ref) == ("checkpoint", "chat@1")
    assert reg.verify().ok


def test_verify_and_gc(files: dict[str, Path], home: Path) -> None:
    reg = Registry()
    reg.add(files["a1"], "chat")
    reg.add(files["a2"], "chat")
    resolve("chat@2")  # a checkout
    code, out, _ = run("registry", "verify")
    assert code == 0 and out.endswith("ok\n")
    reg.rm("chat@2")
    report = reg.gc()
    # a2's weights and its checkout; its config is byte-identical to a1's, so it stays.
    assert (report.blobs_removed, report.checkouts_removed) == (1, 1)
    assert reg.verify().ok
    blob = reg.blob_path(reg.resolve("chat@1").files[1].sha256)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01")
    code, out, _ = run("registry", "verify")
    assert code == 1
    assert "sha256 is" in out and "chat@1" in out and out.endswith("FAILED\n")
    blob.unlink()
    report = reg.verify()
    assert [p.problem for p in report.missing] == ["missing"]


def test_registry_path_creates_nothing(home: Path) -> None:
    code, out, _ = run("registry", "path")
    assert (code, out) == (0, f"{home}\n")
    code, out, _ = run("registry", "path", "--json")
    assert json.loads(out)["exists"] is False
    assert not home.exists()
    code, _, err = run("list")
    assert code == 0 and "no adapters" in err


def test_add_without_a_base_does_not_import_torch(files: dict[str, Path]) -> None:
    code = textwrap.dedent(f"""
        import sys
        from adapterctl.registry import Registry
        v = Registry().add({str(files["a1"])!r}, "chat")
        Registry().checkout(v.ref)
        assert "torch" not in sys.modules, "torch imported"
        print(v.ref)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "chat@1"


_WORKER = """
import sys
from adapterctl.registry import Registry
worker, root = int(sys.argv[1]), sys.argv[2]
reg = Registry()
for i in range(25):
    reg.add(f"{root}/w{worker}-{i}", f"w{worker}")
print("done")
"""


def test_concurrent_adds(tmp_path: Path) -> None:
    for w in range(4):
        for i in range(25):
            write_adapter(tmp_path / f"w{w}-{i}", 1000 * w + i, layers=1)
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(w), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        assert "locked" not in err
        assert out.strip() == "done"
    reg = Registry()
    summaries = {s.name: s for s in reg.list()}
    assert {n: (s.latest, s.versions) for n, s in summaries.items()} == {
        f"w{w}": (25, 25) for w in range(4)
    }
    assert reg.info().versions == 100
    report = reg.verify()
    assert report.ok, report
    assert report.blobs_checked == 100 + 1  # distinct weights; the four configs are identical


# Faults injected from outside the library: the add runs in a child process with one registry
# method wrapped to announce itself (a marker file) and wait to be killed there.
_PAUSES = {
    # after every blob is written, before the transaction begins
    "blobs": """
stored = []
real_store, real_write = Registry._store_blob, Registry._write
def _store_blob(self, *a, **kw):
    stored.append(1)
    return real_store(self, *a, **kw)
def _write(self):
    if stored:
        wait()
    return real_write(self)
Registry._store_blob, Registry._write = _store_blob, _write
""",
    # inside the transaction, every row inserted, before COMMIT
    "commit": """
real_insert = Registry._insert_version
def _insert_version(self, *a, **kw):
    vid = real_insert(self, *a, **kw)
    wait()
    return vid
Registry._insert_version = _insert_version
""",
}


def _start_paused_add(adapter: Path, name: str, point: str, marker: Path) -> subprocess.Popen:
    code = (
        "import pathlib, threading\n"
        "from adapterctl.registry import Registry\n"
        "def wait():\n"
        f"    pathlib.Path({str(marker)!r}).write_text('')\n"
        "    threading.Event().wait(600)\n"
        f"{_PAUSES[point]}\n"
        f"Registry().add({str(adapter)!r}, {name!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the add never reached its pause point"
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(os.name != "posix", reason="kill -9")
def test_kill_during_add(files: dict[str, Path], tmp_path: Path, home: Path) -> None:
    reg = Registry()
    reg.add(files["a2"], "other")
    # Killed after writing the blobs, before the transaction: orphan blobs only.
    proc = _start_paused_add(files["a1"], "chat", "blobs", tmp_path / "m1")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert reg.verify().ok
    assert [s.name for s in reg.list()] == ["other"]
    gc = reg.gc()
    assert gc.blobs_removed == 1  # a1's weights (its config is byte-identical to a2's)
    assert reg.verify().ok
    # Killed inside the transaction, before COMMIT: SQLite rolls it back.
    proc = _start_paused_add(files["a1"], "chat", "commit", tmp_path / "m2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert reg.verify().ok
    assert [s.name for s in reg.list()] == ["other"]
    v = reg.add(files["a1"], "chat")  # the re-run works
    assert v.ref == "chat@1"
    assert reg.gc().blobs_removed == 0
    assert reg.verify().ok


def test_migrated_schema_matches_schema_sql() -> None:
    from sqlite_utils import Database

    from adapterctl import migrations

    text = (REPO / "registry" / "schema.sql").read_text()
    assert text == schema_sql(), "regenerate: python -m adapterctl.migrations --schema"
    blank = Database(memory=True, execute_plugins=False)
    migrations.apply(blank)
    from_file = Database(memory=True, execute_plugins=False)
    from_file.executescript(text)

    def columns(db: Database) -> dict[str, list[tuple[str, str, int, int]]]:
        out = {}
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE '\\_sqlite%' ESCAPE '\\' AND name NOT LIKE 'sqlite%'"
        ).fetchall():
            out[name] = [(r[1], r[2], r[3], r[5]) for r in db.execute(f"PRAGMA table_info({name})")]
        return out

    assert columns(blank) == columns(from_file)
    assert "versions" in columns(blank)
    assert [m.name for m in migrations.migrations.pending(blank)] == []


def test_demo_has_registry_steps(tmp_path: Path) -> None:
    from adapterctl.demo import build, steps

    commands = [s.args[0] for s in steps(build(tmp_path))]
    for name in ("add", "list", "tag", "show", "registry"):
        assert name in commands
    assert ["inspect", "chat@prod"] in [s.args for s in steps(build(tmp_path / "again"))]
