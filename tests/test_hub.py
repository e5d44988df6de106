"""Hub sync (``adapterctl push``/``pull``, ``hf://`` sources and outputs) through the real
``huggingface_hub`` client against the local Hub in tests/hubserver.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import llama_model, peft_adapter, save_base
from click.testing import CliRunner
from hubserver import HubServer, hub_env

from adapterctl.cli import cli

TOKEN = "hf_test_token"
BASE_ID = "org/tiny-llama"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", {TOKEN}) as server:
        hub_env(server, monkeypatch)
        monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
        monkeypatch.chdir(tmp_path)
        yield server
    assert server.errors == []


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama base and a PEFT adapter for it (its config names a local base path)."""
    d = tmp_path_factory.mktemp("made")
    model = llama_model()
    base = save_base(model, d / "base")
    _, adapter = peft_adapter(model, d / "adapter")
    return {"model": model, "base": base, "adapter": adapter}


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def added(made: dict[str, Any]) -> str:
    code, _, err = run("add", str(made["adapter"]), "--name", "chat", "--base", str(made["base"]))
    assert code == 0, err
    return "chat@1"


def test_push_then_pull_round_trip(
    hub: HubServer, made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi, ModelCard

    ref = added(made)
    code, out, err = run("push", ref, "me/chat", "--base-id", BASE_ID, "--json")
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["tag"] == "v1" and not pushed["already"]
    api = HfApi()
    tags = {t.name: t.target_commit for t in api.list_repo_refs("me/chat").tags}
    assert tags == {"v1": pushed["commit"]}
    card = ModelCard.load("me/chat")
    assert card.data.base_model == BASE_ID and card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert 'PeftModel.from_pretrained(base, "me/chat", revision="v1")' in card.text
    meta = json.loads(Path(api.hf_hub_download("me/chat", "adapterctl.json")).read_text())
    assert meta["digest"] == pushed["digest"] and meta["base"]["name"] == BASE_ID
    # pushing again is a no-op that says so
    code, out, err = run("push", ref, "me/chat", "--base-id", BASE_ID)
    assert code == 0 and "is already at hf://me/chat as v1" in out, err
    assert len(api.list_repo_refs("me/chat").tags) == 1

    # another machine: a fresh registry
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home2"))
    code, out, err = run("pull", "me/chat@v1", "--json")
    assert code == 0, err
    pulled = json.loads(out)
    assert pulled["digest"] == pushed["digest"] and pulled["commit"] == pushed["commit"]
    assert pulled["pin"] == "fingerprint" and pulled["version"] == "chat@1"
    code, out, err = run("pull", "hf://me/chat@v1")
    assert code == 0 and "is already chat@1" in out, err
    code, out, _ = run("export", "chat@1", str(tmp_path / "pulled"))
    assert code == 0
    src, got = made["adapter"], tmp_path / "pulled"
    assert sorted(p.name for p in got.iterdir()) == sorted(
        p.name for p in src.iterdir() if p.name != "README.md"
    )
    weights = "adapter_model.safetensors"
    assert (got / weights).read_bytes() == (src / weights).read_bytes()
    cfg_src = json.loads((src / "adapter_config.json").read_text())
    cfg_got = json.loads((got / "adapter_config.json").read_text())
    assert cfg_got["base_model_name_or_path"] == BASE_ID
    changed = {k for k in cfg_src.keys() | cfg_got.keys() if cfg_src.get(k) != cfg_got.get(k)}
    assert changed <= {"base_model_name_or_path", "revision"}

    from peft import PeftModel

    loaded = PeftModel.from_pretrained(llama_model(), str(got))
    x = torch.arange(6).reshape(1, 6)
    assert torch.isfinite(loaded(x).logits).all()


def test_a_local_base_path_needs_a_hub_id(hub: HubServer, made: dict[str, Any]) -> None:
    ref = added(made)
    code, _, err = run("push", ref, "me/chat")
    assert code == 2 and "pass --base-id OWNER/MODEL" in err
    assert len(err.strip().splitlines()) == 1


def test_a_stale_parent_is_refused_and_changes_nothing(
    hub: HubServer, made: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    ref = added(made)
    api = HfApi()
    api.create_repo("me/chat")
    real = HfApi.create_commit

    def racing(self: Any, repo_id: str, operations: Any, **kw: Any) -> Any:
        # another machine commits between our read of the head and our commit
        hub.seed(repo_id, {"other.txt": b"someone else"})
        return real(self, repo_id, operations, **kw)

    monkeypatch.setattr(HfApi, "create_commit", racing)
    before = api.list_repo_commits("me/chat")
    code, _, err = run("push", ref, "me/chat", "--base-id", BASE_ID)
    assert code == 5, err
    assert "the repository changed during the push (HTTP 412)" in err
    after = api.list_repo_commits("me/chat")
    assert len(after) == len(before) + 1  # only the racing commit
    assert api.list_repo_refs("me/chat").tags == []


def test_faults_exit_6_register_nothing_and_a_retry_succeeds(
    hub: HubServer, made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = added(made)
    hub.fail_next(1, 500, match="preupload")  # transient: the client retries it
    code, _, err = run("push", ref, "me/chat", "--base-id", BASE_ID)
    assert code == 0, err
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home2"))
    hub.fail_every(500)
    code, _, err = run("pull", "me/chat")
    assert code == 6 and err.startswith("Error: hf://me/chat: pull failed (HTTP 500)"), err
    hub.clear_faults()
    hub.corrupt("me/chat", "adapter_model.safetensors")
    code, _, err = run("pull", "me/chat")
    assert code == 6 and "does not match the Hub's sha256" in err, err
    code, out, _ = run("list")
    assert "chat" not in out  # nothing registered
    hub._corrupt.clear()  # the fault is gone: the same pull succeeds
    code, out, err = run("pull", "me/chat")
    assert code == 0 and "as chat@1" in out, err
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home3"))
    hub.drop_connection_on("adapter_model.safetensors")  # one dropped download: fetched again
    code, out, err = run("pull", "me/chat")
    assert code == 0 and "as chat@1" in out, err
    assert all(remaining == 0 for remaining, _ in hub._drops)  # the drop did happen
    # a persistent fault during a push: exit 6, no tag, the version records no remote
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    hub.fail_every(500, match="/commit/")
    code, _, err = run("push", ref, "me/other", "--base-id", BASE_ID)
    assert code == 6, err
    hub.clear_faults()
    code, out, _ = run("show", ref, "--json")
    assert [r["url"] for r in json.loads(out)["remotes"]] == ["hf://me/chat"]
    assert not list(tmp_path.glob("hf:*")) and not list(Path.cwd().glob("hf:*"))


def test_outputs_publish_and_never_make_an_hf_folder(
    hub: HubServer, made: dict[str, Any], tmp_path: Path
) -> None:
    from huggingface_hub import HfApi, ModelCard

    ref = added(made)
    code, out, err = run("merge", str(made["base"]), ref, "-o", "hf://me/merged")
    assert code == 0 and "published as hf://me/merged@v1" in out, err
    card = ModelCard.load("me/merged")
    assert card.data.library_name == "transformers"
    files = set(HfApi().list_repo_files("me/merged"))
    assert {"model.safetensors", "config.json", "README.md"} <= files
    code, _, err = run("export", ref, "hf://me/exported")
    assert code == 2 and "--base-id" in err  # the pin knows its base only by a local path
    code, _, err = run("resize", ref, "-o", "hf://me/small", "--rank", "2")
    assert code == 2 and "not a Hub id" in err, err
    assert not list(tmp_path.glob("hf:*")) and not list(tmp_path.glob(".adapterctl-publish-*"))


def test_offline_and_unknown_repos_are_one_line_errors(
    hub: HubServer, made: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run("pull", "me/nothing")
    assert code == 4 and err.startswith("Error: hf://me/nothing: no such repository"), err
    code, _, err = run("pull", "not-a-repo")
    assert code == 2, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run("pull", "me/chat")
    assert code == 6 and "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1


def test_the_token_is_never_printed(
    hub: HubServer, made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = added(made)
    outputs = []
    for args in (
        ("push", ref, "me/chat", "--base-id", BASE_ID, "--token", TOKEN),
        ("push", ref, "me/private", "--base-id", BASE_ID, "--private", "--token", "hf_wrong"),
        ("pull", "me/chat", "--name", "again", "--json"),
    ):
        _, out, err = run(*args)
        outputs.append(out + err)
    assert outputs and not any(TOKEN in o or "hf_wrong" in o for o in outputs)
    home = Path(os.environ["ADAPTERCTL_HOME"])
    for f in home.rglob("*"):
        if f.is_file() and f.stat().st_size < 1 << 20:
            assert TOKEN.encode() not in f.read_bytes(), f


def test_a_foreign_adapter_is_pinned_to_its_hub_base(hub: HubServer, made: dict[str, Any]) -> None:
    """A repository pushed by other tools (no adapterctl.json): the config's base is resolved on
    the Hub to a commit and per-file sha256 (headers only), never kept as a bare name."""
    base_files = {p.name: p.read_bytes() for p in made["base"].iterdir() if p.is_file()}
    base_commit = hub.seed(BASE_ID, base_files)
    config = json.loads((made["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE_ID
    weights = (made["adapter"] / "adapter_model.safetensors").read_bytes()
    hub.seed(
        "other/lora",
        {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": weights},
    )
    hub.reset_counters()
    code, out, err = run("pull", "other/lora", "--json")
    assert code == 0, err
    assert json.loads(out)["pin"] == "content digest"
    code, out, _ = run("show", "lora@1", "--json")
    pin = json.loads(out)["base"]
    assert pin["name"] == BASE_ID and pin["revision"] == base_commit
    assert {f["path"] for f in pin["files"]} == {"model.safetensors"}
    assert hub.served("/cdn/") < 8 * 1024 + len(weights)  # the base's weights never came
    code, _, err = run("validate", "lora@1", "--base", str(made["base"]))
    assert code == 0, err


def test_adapters_published_from_outputs_and_export(
    hub: HubServer, made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resize, compose -o hf://… and export REF hf://… publish adapters whose base is a Hub
    id: one commit each, tagged v1, with the adapter card."""
    from huggingface_hub import HfApi, ModelCard

    ref = added(made)
    assert run("push", ref, "me/chat", "--base-id", BASE_ID)[0] == 0
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home2"))
    code, _, err = run("pull", "me/chat", "--name", "hubchat")  # its config names BASE_ID
    assert code == 0, err
    runs = {
        "me/small": ("resize", "hubchat@1", "-o", "hf://me/small", "--rank", "2"),
        "me/twice": ("compose", "hubchat@1", "hubchat@1", "-o", "hf://me/twice",
                     "--method", "linear"),
        "me/exported": ("export", "hubchat@1", "hf://me/exported"),
    }  # fmt: skip
    for repo, args in runs.items():
        code, out, err = run(*args)
        assert code == 0, (args, err)
        assert f"hf://{repo}" in out + err
        card = ModelCard.load(repo)
        assert card.data.base_model == BASE_ID and card.data.library_name == "peft"
        assert [t.name for t in HfApi().list_repo_refs(repo).tags] == ["v1"]
        files = set(HfApi().list_repo_files(repo))
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not list(tmp_path.glob("hf:*")) and not list(tmp_path.glob(".adapterctl-publish-*"))


def test_cards_parse_and_carry_the_lineage() -> None:
    from huggingface_hub import ModelCard

    from adapterctl.hub import card

    text = card.adapter_card(
        repo="me/mix", base_id=BASE_ID, base_revision="abc123", config={"r": 8, "use_dora": True},
        tag="v2", digest="sha256:00", source="mix@2", lineage=[("chat@1", 0.7), ("code@1", None)],
        method="ties",
    )  # fmt: skip
    parsed = ModelCard(text)
    assert parsed.data.base_model == BASE_ID and "dora" in parsed.data.tags
    assert "Combined by `ties` from:" in text and "- `chat@1` × 0.7" in text
    assert '"org/tiny-llama", revision="abc123"' in text
    merged = ModelCard(card.model_card(repo="me/m", base_id=None, tag="v1", digest="d", source="x"))
    assert merged.data.library_name == "transformers" and merged.data.base_model is None


def test_hf_sources_are_pulled_then_read(
    hub: HubServer, made: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = added(made)
    assert run("push", ref, "me/chat", "--base-id", BASE_ID)[0] == 0
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "ci"))
    code, out, err = run("validate", "hf://me/chat@v1", "--base", str(made["base"]))
    assert code == 0 and "ok: 0 error(s)" in out, err
    code, out, err = run("inspect", "hf://me/chat", "--json")
    assert code == 0 and json.loads(out)["base_model"] == BASE_ID, err
    code, out, _ = run("list", "--json")
    assert [a["name"] for a in json.loads(out)] == ["chat"]  # pulled once, into the registry
    hub.reset_counters()
    code, _, err = run("merge", str(made["base"]), "hf://me/chat@v1", "-o", str(tmp_path / "m"))
    assert code == 0, err
    asked = [r for r in hub.requests if r.path.startswith("/api/models/me/chat/revision/")]
    assert len(asked) == 1  # the source is resolved on the Hub once, then read from its checkout
