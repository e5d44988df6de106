"""``hf://OWNER/NAME[@REV]`` as a BASE: read from its headers over HTTP, never downloaded.

The real ``huggingface_hub`` client talks to tests/hubserver.py. The base is a Llama-shaped
model with a 131072-token vocabulary, so its two shards hold 16 MiB embedding and head
matrices: ``validate``/``inspect``/``add`` against it must be served a few kilobytes (the
model info, config, index and each shard's header by range requests), and agree with the
same files on disk: the same findings, the same fingerprint, and a pin (commit and the Hub's
LFS sha256s) that a downloaded copy of the files matches by content digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import builders
import pytest
from click.testing import CliRunner, Result
from hubserver import HubServer, hub_env
from safetensors.torch import save_file

from adapterctl.checkpoint import INDEX_NAME, open_base, open_checkpoint
from adapterctl.cli import cli
from adapterctl.errors import Conflict, UsageError
from adapterctl.nf4 import layout as nf4_layout
from adapterctl.registry import Registry

REPO = "org/tiny-llama"
PRIVATE = "org/private-llama"
NF4_REPO = "org/tiny-llama-nf4"
TOKEN = "hf_test_token"
VOCAB, HIDDEN = 131072, 32  # embed_tokens and lm_head: 16 MiB each in float32


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def _save_sharded(model: Any, folder: Path) -> Path:
    """The model's float32 state dict as two shards (embeddings and layers; the rest and the
    head) with their index, and its config.json."""
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    first = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens", "model.layers"))}
    groups = [first, {k: v for k, v in state.items() if k not in first}]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base on disk (in a folder named as the repository, so the name hint agrees), an
    adapter that fits it, one that does not, and a bitsandbytes-NF4 base."""
    root = tmp_path_factory.mktemp("hubbase")
    model = builders.llama_model(vocab=VOCAB, hidden=HIDDEN)
    base = _save_sharded(model, root / "local" / "tiny-llama")
    _, good = builders.peft_adapter(model, root / "good")
    builders.edit_config(good, base_model_name_or_path=REPO)
    _, bad = builders.peft_adapter(builders.llama_model(hidden=16), root / "bad")
    builders.edit_config(bad, base_model_name_or_path=REPO)

    small = builders.llama_model(vocab=64, hidden=64)
    small_base = builders.save_base(small, root / "small")
    _, small_adapter = builders.peft_adapter(small, root / "small-adapter")
    nf4 = root / "local" / "tiny-llama-nf4"
    result = CliRunner().invoke(
        cli, ["merge", str(small_base), str(small_adapter), "-o", str(nf4), "--quantize", "nf4"]
    )
    assert result.exit_code == 0, result.output
    return {"base": base, "good": good, "bad": bad, "nf4": nf4, "small_adapter": small_adapter}


@pytest.fixture(scope="module")
def server(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The Hub, holding the base (public and private), the NF4 base and a few broken repos."""
    with HubServer(tmp_path_factory.mktemp("hub"), {TOKEN}) as hub:
        files = _files(built["base"])
        hub.seed(REPO, files)
        hub.seed(PRIVATE, files, private=True)
        hub.seed(NF4_REPO, _files(built["nf4"]))
        config = files["config.json"]
        hub.seed("org/pickle-only", {"config.json": config, "pytorch_model.bin": b"\x80\x02}q."})
        hub.seed("org/no-weights", {"config.json": config, "README.md": b"# nothing\n"})
        index = json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
        hub.seed("org/missing-shard", {"config.json": config, INDEX_NAME: index.encode()})
        yield hub
        assert hub.errors == []


@pytest.fixture
def hub(server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """The client pointed at the server, counters cleared, the registry and the working
    folder in ``tmp_path``; afterwards, nothing named ``hf:…`` was created there."""
    hub_env(server, monkeypatch, home=tmp_path / "hf-home")
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAPTERCTL_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    server.reset_counters()
    yield server
    server.clear_faults()
    strays = [p for p in tmp_path.rglob("*") if p.name.startswith("hf:")]
    assert strays == [], strays


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result: Result, code: int, *says: str) -> str:
    """Exit ``code``, one ``Error:`` line on stderr containing each of ``says``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def commit_of(server: HubServer, repo: str) -> str:
    from huggingface_hub import HfApi

    return str(HfApi().model_info(repo).sha)


# -- validate / inspect: headers only, the same answers as on disk -----------------------------


def test_the_base_is_sharded_and_large(built: dict[str, Path]) -> None:
    shards = sorted(built["base"].glob("*.safetensors"))
    assert len(shards) == 2
    assert all(s.stat().st_size >= 16 * 2**20 for s in shards)


@pytest.mark.parametrize("adapter", ["good", "bad"])
def test_validate_reads_headers_only_and_finds_what_it_finds_on_disk(
    hub: HubServer, built: dict[str, Path], adapter: str
) -> None:
    local = run("validate", built[adapter], "--base", built["base"], "--json")
    remote = run("validate", built[adapter], "--base", f"hf://{REPO}", "--json")
    assert remote.exit_code == local.exit_code == (0 if adapter == "good" else 3), remote.output
    got, want = json.loads(remote.stdout), json.loads(local.stdout)
    for key in ("findings", "rules_checked", "matched_modules", "target"):
        assert got[key] == want[key], key
    if adapter == "bad":
        assert any(f["code"] == "AC202" for f in got["findings"])  # shape mismatches

    served = hub.bytes_served.total()
    assert served < 0.01 * weights_size(built["base"]), served
    shard_reads = [r for r in hub.requests if r.path.endswith(".safetensors")]
    assert shard_reads and all(r.range is not None for r in shard_reads), shard_reads
    assert got["base"] == f"hf://{REPO}@{commit_of(hub, REPO)}"


def test_inspect_with_a_hub_base(hub: HubServer, built: dict[str, Path]) -> None:
    local = run("inspect", built["good"], "--base", built["base"], "--json")
    remote = run("inspect", built["good"], "--base", f"hf://{REPO}@main", "--json")
    assert local.exit_code == remote.exit_code == 0, remote.output
    got, want = json.loads(remote.stdout)["base"], json.loads(local.stdout)["base"]
    assert got["fingerprint"] == want["fingerprint"]
    assert got["matched_modules"] == want["matched_modules"] > 0
    assert got["path"] == f"hf://{REPO}@{commit_of(hub, REPO)}"
    assert hub.bytes_served.total() < 0.01 * weights_size(built["base"])


def test_a_tensor_of_a_hub_base_is_read_by_one_range_request(
    hub: HubServer, built: dict[str, Path]
) -> None:
    ckpt = open_base(f"hf://{REPO}")
    local = open_checkpoint(built["base"])
    assert ckpt.path is None and ckpt.origin is not None and ckpt.origin.revision == "main"
    assert [f.path for f in ckpt.origin.files] == [p.name for p in local.local_shards]
    assert ckpt.size_bytes == local.size_bytes
    name = "model.layers.1.input_layernorm.weight"
    assert (ckpt.tensors[name].start, ckpt.tensors[name].end) == (
        local.tensors[name].start,
        local.tensors[name].end,
    )
    hub.reset_counters()
    assert (ckpt.tensors[name].array() == local.tensors[name].array()).all()
    info = ckpt.tensors[name]
    ranges = {r.range for r in hub.requests}
    assert ranges == {f"bytes={info.start}-{info.end - 1}"}, hub.requests


def test_an_nf4_base_reads_its_quant_states_by_range(
    hub: HubServer, built: dict[str, Path]
) -> None:
    local = run("inspect", built["small_adapter"], "--base", built["nf4"], "--json")
    remote = run("inspect", built["small_adapter"], "--base", f"hf://{NF4_REPO}", "--json")
    assert local.exit_code == remote.exit_code == 0, remote.output
    got, want = json.loads(remote.stdout)["base"], json.loads(local.stdout)["base"]
    assert got["quantization"] == want["quantization"] == "nf4"
    assert got["fingerprint"] == want["fingerprint"]
    # Each request reads the header (its length, then its JSON) or one quant state.
    ckpt = open_checkpoint(built["nf4"])
    states = [ckpt.tensors[g.state] for g in nf4_layout.groups(ckpt.tensors).values()]
    header_end = min(info.start for info in ckpt.tensors.values())
    allowed = {"bytes=0-7", f"bytes=8-{header_end - 1}"}
    allowed |= {f"bytes={info.start}-{info.end - 1}" for info in states}
    shard_reads = [r.range for r in hub.requests if r.path.endswith(".safetensors")]
    assert states and set(shard_reads) == allowed, shard_reads
    ok = run("validate", built["small_adapter"], "--base", f"hf://{NF4_REPO}")
    assert ok.exit_code == 0, ok.output


def test_a_transient_server_error_is_retried(hub: HubServer, built: dict[str, Path]) -> None:
    hub.fail_next(2, status=503, match="-of-00002.safetensors")
    result = run("validate", built["good"], "--base", f"hf://{REPO}")
    assert result.exit_code == 0, result.output
    assert sum(1 for r in hub.requests if r.path.endswith(".safetensors")) > 4


def test_validate_in_a_fresh_process_follows_the_client_environment(
    hub: HubServer, built: dict[str, Path]
) -> None:
    """HF_ENDPOINT and HF_TOKEN from the environment (a private base needs the token). Its
    repository's name is not the one the adapter names: the name hint says so (a warning)."""
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERCTL_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "adapterctl", "validate", str(built["good"]), "--base",
         f"hf://{PRIVATE}", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    assert [(f["code"], f["severity"]) for f in findings] == [("AC209", "warning")]
    assert f"the base given is hf://{PRIVATE}@{commit_of(hub, PRIVATE)}" in findings[0]["message"]


# -- add: pinned by commit and the Hub's sha256s; a local copy matches ------------------------


def test_add_pins_a_hub_base_by_commit_and_lfs_sha256(
    hub: HubServer, built: dict[str, Path], tmp_path: Path
) -> None:
    result = run("add", built["good"], "--name", "chat", "--base", f"hf://{REPO}")
    assert result.exit_code == 0, result.output
    assert hub.bytes_served.total() < 0.01 * weights_size(built["base"])
    commit = commit_of(hub, REPO)
    with Registry() as reg:
        pin = reg.show("chat@1").base
    assert pin.level == "content digest"
    assert (pin.name, pin.revision, pin.path) == (REPO, commit, None)
    shards = sorted(built["base"].glob("*.safetensors"))
    assert [(f.path, f.size, f.sha256) for f in pin.files] == [
        (s.name, s.stat().st_size, hashlib.sha256(s.read_bytes()).hexdigest()) for s in shards
    ]

    # The Hub base itself is checked by content digest, from the Hub's sha256s.
    with Registry() as reg:
        assert reg.check_base_pin("chat@1", open_base(f"hf://{REPO}")) == "content digest"

    # The same files, downloaded later, match the pin by content digest.
    from huggingface_hub import snapshot_download

    copy = Path(snapshot_download(REPO, revision=commit, local_dir=tmp_path / "copy"))
    with Registry() as reg:
        assert reg.check_base_pin("chat@1", open_checkpoint(copy), hash_base=True) == (
            "content digest"
        )
    dry = run("merge", copy, "chat@1", "-o", tmp_path / "merged", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["base_pin_checks"] == [
        "chat@1: base pin checked by content digest"
    ]

    # Other weights with the same tensor names and shapes: the content digest tells them apart.
    other = tmp_path / "other" / "tiny-llama"
    shutil.copytree(copy, other, ignore=shutil.ignore_patterns(".cache"))
    shard = other / shards[-1].name
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with Registry() as reg, pytest.raises(Conflict, match="base content"):
        reg.check_base_pin("chat@1", open_checkpoint(other), hash_base=True)


def test_the_registry_pins_a_hub_base_as_pin_hub_base_does(hub: HubServer) -> None:
    from adapterctl.hub.base import pin_hub_base

    with Registry() as reg:
        pin = reg.pin_base(f"hf://{REPO}@main")
    assert pin == pin_hub_base(REPO, "main")
    assert pin.revision == commit_of(hub, REPO)


def test_add_refuses_an_adapter_that_does_not_fit_the_hub_base(
    hub: HubServer, built: dict[str, Path]
) -> None:
    result = run("add", built["bad"], "--name", "bad", "--base", f"hf://{REPO}")
    one_line_error(result, 3, f"hf://{REPO}@", "AC202")


# -- errors --------------------------------------------------------------------------------


def test_unknown_repo_and_revision_are_not_found(hub: HubServer, built: dict[str, Path]) -> None:
    one_line_error(run("validate", built["good"], "--base", "hf://org/nope"), 4, "hf://org/nope")
    one_line_error(
        run("inspect", built["good"], "--base", f"hf://{REPO}@nope"), 4, "no such revision"
    )


def test_private_repo_without_token(
    hub: HubServer, built: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub answers a private repo without a token as a missing one (401 RepoNotFound):
    not found (4), naming the token as a fix; a bad token is an auth failure (6)."""
    monkeypatch.delenv("HF_TOKEN")
    one_line_error(run("validate", built["good"], "--base", f"hf://{PRIVATE}"), 4, "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    one_line_error(run("validate", built["good"], "--base", f"hf://{PRIVATE}"), 6, "HTTP 401")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert run("validate", built["good"], "--base", f"hf://{PRIVATE}").exit_code == 0


def test_offline_is_a_remote_error_before_any_request(
    hub: HubServer, built: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command in ("validate", "inspect"):
        one_line_error(run(command, built["good"], "--base", f"hf://{REPO}"), 6, "HF_HUB_OFFLINE")
    assert hub.requests == []


def test_hub_down_is_a_remote_error(hub: HubServer, built: dict[str, Path]) -> None:
    hub.fail_every(status=500)
    one_line_error(run("validate", built["good"], "--base", f"hf://{REPO}"), 6, f"hf://{REPO}")


@pytest.mark.parametrize(
    ("repo", "code", "says"),
    [
        ("org/pickle-only", 3, "pickle-only checkpoint"),
        ("org/no-weights", 4, "no model.safetensors or sharded safetensors found"),
        ("org/missing-shard", 4, "named by model.safetensors.index.json is missing; the repo"),
    ],
)
def test_a_repo_without_safetensors_weights(
    hub: HubServer, built: dict[str, Path], repo: str, code: int, says: str
) -> None:
    one_line_error(run("validate", built["good"], "--base", f"hf://{repo}"), code, repo, says)


def test_merge_into_a_hub_base_is_refused_before_any_request(
    hub: HubServer, built: dict[str, Path], tmp_path: Path
) -> None:
    """Merging needs the weights: a usage error (2) naming the download, nothing fetched."""
    out = tmp_path / "merged"
    result = run("merge", f"hf://{REPO}@main", built["good"], "-o", out)
    one_line_error(result, 2, f"hf download {REPO} --revision main --local-dir DIR")
    assert hub.requests == [] and not out.exists()

    from adapterctl.merge import merge

    with pytest.raises(UsageError, match="hf download"):
        merge(open_base(f"hf://{REPO}"), [built["good"]], out)
    assert not out.exists()
