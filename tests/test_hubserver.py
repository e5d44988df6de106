"""The fake Hub (tests/hubserver.py) driven by the real huggingface_hub client.

Each test checks the server against what the client itself does with the answers: the upload
path it picks (regular vs LFS), the ETags it caches blobs under, its error classes, its retries
and resumes. See hubserver's docstring for the protocol notes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hubserver import HubServer, git_blob_id, hub_env
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    BadRequestError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import save

TOKEN = "hf_test_token"
READ_TOKEN = "hf_read_token"
REPO = "org/adapter"
CONFIG = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}).encode()


def tensors_file(seed: int, rows: int = 512, cols: int = 1024, name: str = "w") -> bytes:
    """A safetensors file of random float32 (512×1024: 2 MiB of data)."""
    rng = np.random.default_rng(seed)
    return save({name: rng.standard_normal((rows, cols)).astype(np.float32)})


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(tmp_path / "hub", {TOKEN}, read_tokens={READ_TOKEN}) as server:
        hub_env(server, monkeypatch)
        yield server
    assert server.errors == []  # no server-side exception was turned into a 500


@pytest.fixture
def repo(hub) -> dict:
    """REPO with config.json (regular) and adapter_model.safetensors (LFS), committed over HTTP."""
    weights = tensors_file(0)
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    info = api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("adapter_config.json", CONFIG),
            CommitOperationAdd("adapter_model.safetensors", weights),
        ],
        commit_message="add adapter",
    )
    hub.reset_counters()
    return {"commit": info.oid, "adapter_config.json": CONFIG, "adapter_model.safetensors": weights}


def test_commit_takes_the_regular_and_the_lfs_paths(hub):
    api = HfApi()
    url = api.create_repo(REPO, private=False, exist_ok=True)
    assert url.repo_id == REPO and url.endpoint == hub.url
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409, swallowed
    weights = tensors_file(1)
    readme = b"---\nlicense: apache-2.0\n---\n# adapter\n"
    head = api.model_info(REPO).sha
    info = api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("adapter_config.json", CONFIG),
            CommitOperationAdd("README.md", readme),
            CommitOperationAdd("adapter_model.safetensors", weights),
        ],
        commit_message="add adapter",
        commit_description="two files",
        parent_commit=head,
    )
    calls = [(r.method, r.path) for r in hub.requests[-6:]]
    sha = hashlib.sha256(weights).hexdigest()
    assert calls == [
        ("POST", "/api/validate-yaml"),  # README.md metadata check
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch"),
        ("PUT", f"/upload/models/{REPO}/{sha}"),  # on the "CDN" origin
        ("POST", f"/{REPO}.git/info/lfs/objects/verify"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]

    model = api.model_info(REPO, files_metadata=True)
    assert model.sha == info.oid and model.private is False
    files = {s.rfilename: s for s in model.siblings}
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    for name, data in (("adapter_config.json", CONFIG), ("README.md", readme)):
        assert files[name].lfs is None
        assert (files[name].size, files[name].blob_id) == (len(data), git_blob_id(data))
    lfs = files["adapter_model.safetensors"]
    assert lfs.size == len(weights) and lfs.blob_id == git_blob_id(lfs_pointer(weights))
    assert (lfs.lfs.sha256, lfs.lfs.size, lfs.lfs.pointer_size) == (
        sha,
        len(weights),
        len(lfs_pointer(weights)),
    )
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True, expand=True)}
    assert tree["adapter_model.safetensors"].lfs.sha256 == sha
    assert tree["adapter_config.json"].blob_id == git_blob_id(CONFIG)
    assert tree["adapter_config.json"].last_commit.oid == info.oid
    assert tree[".gitattributes"].last_commit.title == "initial commit"
    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits] == [info.oid, head]
    assert (commits[0].title, commits[0].message) == ("add adapter", "two files")

    # Same LFS content under another name: the batch answer has no actions, nothing is PUT.
    hub.reset_counters()
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("copy/adapter_model.safetensors", weights)],
        commit_message="copy",
    )
    assert [r.method for r in hub.requests if r.path.startswith("/upload/")] == []
    assert api.file_exists(REPO, "copy/adapter_model.safetensors")
    assert not api.file_exists(REPO, "nope.bin")


def test_downloads_are_byte_identical(hub, repo, tmp_path):
    cache = tmp_path / "cache"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = Path(hf_hub_download(REPO, name, cache_dir=cache))
        assert path.read_bytes() == repo[name]
        # The client names its cache blob after the ETag: git sha1, or sha256 for LFS files.
        blob = path.resolve().name
        sha256 = hashlib.sha256(repo[name]).hexdigest()
        assert blob == (sha256 if name.endswith(".safetensors") else git_blob_id(repo[name]))
        assert f"snapshots/{repo['commit']}/" in str(path)

    by_commit = hf_hub_download(
        REPO, "adapter_model.safetensors", revision=repo["commit"], local_dir=tmp_path / "ld"
    )
    assert Path(by_commit).read_bytes() == repo["adapter_model.safetensors"]

    only_json = Path(
        snapshot_download(REPO, allow_patterns=["*.json"], local_dir=tmp_path / "json")
    )
    assert sorted(p.name for p in only_json.iterdir() if p.is_file()) == ["adapter_config.json"]
    full = Path(snapshot_download(REPO, revision="main", cache_dir=cache))
    assert full.name == repo["commit"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (full / name).read_bytes() == repo[name]
    # LFS bytes come from the CDN origin (the 302 from /resolve has no body).
    assert hub.served("/resolve/main/adapter_model.safetensors") == 0
    assert hub.served("/cdn/models/org/adapter/") >= 2 * len(repo["adapter_model.safetensors"])


def test_stale_parent_commit_is_rejected_and_changes_nothing(hub, repo):
    api = HfApi()
    first = repo["commit"]
    second = api.create_commit(
        REPO,
        operations=[CommitOperationAdd("notes.txt", b"v2\n")],
        commit_message="second",
        parent_commit=first,
    ).oid
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            REPO,
            operations=[CommitOperationAdd("late.txt", b"late\n")],
            commit_message="stale",
            parent_commit=first,
        )
    assert err.value.response.status_code == 412
    assert "A commit has happened since" in str(err.value)
    model = api.model_info(REPO)
    assert model.sha == second
    assert "late.txt" not in {s.rfilename for s in model.siblings}
    assert [b.target_commit for b in api.list_repo_refs(REPO).branches] == [second]


def test_tags_branches_and_revisions(hub, repo, tmp_path):
    api = HfApi()
    first = repo["commit"]
    api.create_tag(REPO, tag="v1", revision=first)
    api.create_branch(REPO, branch="dev", revision="v1")
    second = api.create_commit(
        REPO,
        operations=[CommitOperationAdd("adapter_config.json", b'{"r": 16}')],
        commit_message="r=16",
    ).oid
    refs = api.list_repo_refs(REPO)
    assert {(t.name, t.ref, t.target_commit) for t in refs.tags} == {("v1", "refs/tags/v1", first)}
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": first}
    for revision in ("v1", "dev", first, first[:7], "refs/tags/v1"):
        assert api.model_info(REPO, revision=revision).sha == first
        path = hf_hub_download(
            REPO, "adapter_config.json", revision=revision, cache_dir=tmp_path / "c"
        )
        assert Path(path).read_bytes() == CONFIG
    assert Path(
        hf_hub_download(REPO, "adapter_config.json", cache_dir=tmp_path / "c")
    ).read_bytes() == (b'{"r": 16}')

    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(REPO, tag="v1", revision=second)
    assert err.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", revision=second, exist_ok=True)  # 409 swallowed, tag unmoved
    assert api.model_info(REPO, revision="v1").sha == first
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(REPO, tag="v2", revision="no-such-branch")
    with pytest.raises(BadRequestError):
        api.create_tag(REPO, tag="bad tag", revision=first)
    api.delete_tag(REPO, tag="v1")
    assert api.list_repo_refs(REPO).tags == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v1")
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(REPO, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", revision="0" * 40, cache_dir=tmp_path / "c")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", cache_dir=tmp_path / "c")


def test_private_repos_and_auth(hub, tmp_path):
    api, anon = HfApi(), HfApi(token=False)
    api.create_repo("org/secret", private=True)
    api.create_commit(
        "org/secret",
        operations=[
            CommitOperationAdd("adapter_config.json", CONFIG),
            CommitOperationAdd("adapter_model.safetensors", tensors_file(2, 64, 64)),
        ],
        commit_message="add",
    )
    assert api.model_info("org/secret").private is True
    assert api.repo_exists("org/secret") and not anon.repo_exists("org/secret")
    with pytest.raises(RepositoryNotFoundError) as err:
        anon.model_info("org/secret")
    assert err.value.response.status_code == 401
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("org/secret", name, token=False, cache_dir=tmp_path / "anon")
        assert Path(hf_hub_download("org/secret", name, cache_dir=tmp_path / "ok")).is_file()
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info("org/missing")
    assert err.value.response.status_code == 404

    bad = HfApi(token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as err:
        bad.model_info("org/secret")
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)

    api.create_repo("org/public")
    op = [CommitOperationAdd("a.txt", b"a")]
    with pytest.raises(RepositoryNotFoundError):  # as the client reports a 401 from the Hub
        anon.create_commit("org/public", operations=op, commit_message="x")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=READ_TOKEN).create_commit("org/public", operations=op, commit_message="x")
    assert err.value.response.status_code == 403
    assert HfApi(token=READ_TOKEN).model_info("org/secret").private is True

    api.update_repo_settings("org/public", gated="auto")
    assert anon.model_info("org/public").gated == "auto"
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/public", ".gitattributes", token=False, cache_dir=tmp_path / "anon")


def test_safetensors_metadata_reads_only_the_headers(hub):
    api = HfApi()
    shards = {
        "model-00001-of-00002.safetensors": save(
            {
                "a.lora_A": np.ones((256, 1024), np.float32),
                "a.lora_B": np.zeros((8, 16), np.float16),
            }
        ),
        "model-00002-of-00002.safetensors": tensors_file(3, 256, 1024, name="b.lora_A"),
    }
    index = {
        "metadata": {"total_size": sum(len(d) for d in shards.values())},
        "weight_map": {
            "a.lora_A": "model-00001-of-00002.safetensors",
            "a.lora_B": "model-00001-of-00002.safetensors",
            "b.lora_A": "model-00002-of-00002.safetensors",
        },
    }
    api.create_repo("org/sharded")
    api.create_commit(
        "org/sharded",
        operations=[CommitOperationAdd(k, v) for k, v in shards.items()]
        + [CommitOperationAdd("model.safetensors.index.json", json.dumps(index).encode())],
        commit_message="shards",
    )
    hub.reset_counters()
    meta = api.get_safetensors_metadata("org/sharded")
    assert meta.sharded and meta.metadata == index["metadata"]
    assert meta.weight_map == index["weight_map"]
    first = meta.files_metadata["model-00001-of-00002.safetensors"]
    assert (
        first.tensors["a.lora_A"].shape == [256, 1024] and first.tensors["a.lora_B"].dtype == "F16"
    )
    assert meta.parameter_count == {"F32": 2 * 256 * 1024, "F16": 8 * 16}
    for name, data in shards.items():
        served = hub.served(f"/{name}")
        # The client asks for "bytes=0-100000" (its guess at the header size) and nothing more.
        assert served == 100_001 < len(data) // 10
        assert [r.range for r in hub.requests if r.method == "GET" and r.path.endswith(name)] == [
            "bytes=0-100000",
            "bytes=0-100000",  # the 302 from /resolve, then the CDN
        ]


def test_server_errors_are_retried_where_the_client_retries(hub, repo, tmp_path):
    api = HfApi()
    # hf_hub_download: the first HEAD does not retry, but a 5xx with nothing cached makes it ask
    # again with retries.
    hub.fail_next(1, 500, match="/resolve/")
    path = hf_hub_download(REPO, "adapter_model.safetensors", cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == repo["adapter_model.safetensors"]
    heads = [r for r in hub.requests if r.method == "HEAD"]
    assert len(heads) == 2

    # preupload, LFS batch, PUT and verify go through http_backoff.
    for step in ("/preupload/", "/objects/batch", "/upload/", "/objects/verify"):
        hub.fail_next(2, 503, match=step)
    api.create_commit(
        REPO,
        operations=[CommitOperationAdd("more.safetensors", tensors_file(4, 32, 32))],
        commit_message="retried",
    )
    assert api.file_exists(REPO, "more.safetensors")

    hub.fail_next(1, 502, match="/tree/")  # paginated listings retry too
    assert len(list(api.list_repo_tree(REPO))) == 4

    # Not retried: model_info, the commit POST, the download GET.
    hub.fail_next(1, 500)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(REPO)
    assert err.value.response.status_code == 500
    hub.fail_next(1, 500, match="/commit/")
    with pytest.raises(HfHubHTTPError):
        api.create_commit(REPO, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="x")
    assert not api.file_exists(REPO, "x.txt")
    hub.fail_next(1, 500, match="/cdn/")
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(REPO, "adapter_model.safetensors", cache_dir=tmp_path / "fresh")
    # snapshot_download by branch: a 5xx on its repo_info is not retried.
    hub.fail_next(1, 500, match=f"/api/models/{REPO}")
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, cache_dir=tmp_path / "snap")


def test_dropped_connection_is_resumed(hub, repo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    data = repo["adapter_model.safetensors"]
    hub.drop_connection_on("adapter_model.safetensors", times=2)
    path = hf_hub_download(REPO, "adapter_model.safetensors", cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == data
    gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/cdn/")]
    # The client reads the body in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces and only what it has
    # written counts: a file under 10 MiB cut short is fetched again from byte 0, no Range.
    assert [r.range for r in gets] == [None, None, None]

    # With smaller pieces the retry is a ranged GET, answered 206 from where it stopped.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.reset_counters()
    hub.drop_connection_on("adapter_model.safetensors")
    path = hf_hub_download(REPO, "adapter_model.safetensors", cache_dir=tmp_path / "c2")
    assert Path(path).read_bytes() == data
    gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/cdn/")]
    assert len(gets) == 2 and gets[0].range is None
    start = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(data) // 2
    assert hub.served("/cdn/") == len(data) // 2 + len(data) - start

    hub.drop_connection_on("adapter_config.json")  # regular files come straight from /resolve
    path = hf_hub_download(REPO, "adapter_config.json", local_dir=tmp_path / "ld")
    assert Path(path).read_bytes() == CONFIG


def test_corrupted_blob_is_not_caught_by_the_client(hub, repo, tmp_path):
    hub.corrupt(REPO, "adapter_model.safetensors")
    local = tmp_path / "ld"
    path = Path(hf_hub_download(REPO, "adapter_model.safetensors", local_dir=local))
    data = path.read_bytes()
    # Same size, so the client's only check (the length) passes: it hands back bad bytes.
    assert (
        len(data) == len(repo["adapter_model.safetensors"])
        and data != repo["adapter_model.safetensors"]
    )
    hf_hub_download(REPO, "adapter_config.json", local_dir=local)
    check = HfApi().verify_repo_checksums(REPO, local_dir=local)
    assert [m["path"] for m in check.mismatches] == ["adapter_model.safetensors"]
    assert (
        check.mismatches[0]["expected"]
        == hashlib.sha256(repo["adapter_model.safetensors"]).hexdigest()
    )


def test_seed_and_restart_keep_the_repos(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    with HubServer(root) as server:
        commit = server.seed(
            "org/seeded", {"a.json": b"{}", "w.safetensors": tensors_file(5, 8, 8)}
        )
    with HubServer(root) as server:
        hub_env(server, monkeypatch)
        model = HfApi().model_info("org/seeded", files_metadata=True)
        assert model.sha == commit
        assert {s.rfilename: s.lfs is not None for s in model.siblings} == {
            ".gitattributes": False,
            "a.json": False,
            "w.safetensors": True,
        }
        assert Path(hf_hub_download("org/seeded", "w.safetensors")).read_bytes() == tensors_file(
            5, 8, 8
        )
