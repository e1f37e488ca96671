"""Hub pull/push through the real, unmodified huggingface_hub (and diffusers) against tests/hub_server.py.

No network is used: ``tests.hub_fixtures`` starts a local Hub-compatible server and points ``HF_ENDPOINT``
at it before huggingface_hub is imported (HF_HUB_DISABLE_XET=1, HF_HUB_DISABLE_TELEMETRY=1).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import textwrap
import urllib.error
import urllib.request

# Must come before anything imports huggingface_hub: importing tests.hub_fixtures starts the local hub and
# sets HF_ENDPOINT / HF_HUB_DISABLE_XET / HF_HUB_DISABLE_TELEMETRY / HF_HOME.
from . import hub_fixtures as _hub
from .hub_fixtures import HUB_TOKEN, HUB_USER, OTHER_TOKEN, run_python

# Make the fixtures available here even when conftest.py does not load ``tests.hub_fixtures`` as a plugin
# (when it does, these are the very same fixture objects).
local_hub = _hub.local_hub
hub_api = _hub.hub_api
unique_repo_id = _hub.unique_repo_id

import pytest  # noqa: E402

import huggingface_hub  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    constants,
    create_branch,
    create_commit,
    create_repo,
    create_tag,
    hf_hub_download,
    list_repo_files,
    list_repo_refs,
    list_repo_tree,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


# ------------------------------------------------------------------------------------------------ helpers
def _safetensors_bytes(values: list[float]) -> bytes:
    """A valid single-tensor safetensors file (F32), written by hand to stay dependency-free."""
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"weight": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}})
    header_bytes = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def _write(folder, rel: str, data: bytes | str) -> bytes:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(raw)
    return raw


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def pushed_repo(tmp_path, unique_repo_id):
    """A public repo with a regular JSON file, an LFS safetensors file (2 commits) and a binary .dat file."""
    create_repo(unique_repo_id, token=HUB_TOKEN)
    folder = tmp_path / "upload"
    v1 = {
        "config.json": _write(folder, "config.json", json.dumps({"rank": 4, "version": 1})),
        "weights.safetensors": _write(folder, "weights.safetensors", _safetensors_bytes([0.5] * 700)),
    }
    c1 = upload_folder(repo_id=unique_repo_id, folder_path=folder, commit_message="v1", token=HUB_TOKEN)
    v2 = {
        "config.json": _write(folder, "config.json", json.dumps({"rank": 4, "version": 2})),
        "weights.safetensors": _write(folder, "weights.safetensors", _safetensors_bytes([1.5] * 700)),
        "sub/blob.dat": _write(folder, "sub/blob.dat", b"\x00\x01binary" * 10),
    }
    c2 = upload_folder(repo_id=unique_repo_id, folder_path=folder, commit_message="v2", token=HUB_TOKEN)
    return {"repo_id": unique_repo_id, "c1": c1.oid, "c2": c2.oid, "v1": v1, "v2": v2}


# ------------------------------------------------------------------------------------------------ tests
def test_huggingface_hub_points_at_local_server(local_hub):
    assert os.environ["HF_ENDPOINT"] == local_hub.endpoint
    assert constants.ENDPOINT == local_hub.endpoint
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(local_hub.endpoint + "/")
    # module-level create_repo/upload_folder/model_info are bound to this import-time HfApi instance
    assert huggingface_hub.hf_api.api.endpoint == local_hub.endpoint
    assert constants.HF_HUB_DISABLE_XET is True
    assert not constants.HF_HUB_OFFLINE


def test_create_repo_public_private_and_whoami(local_hub, hub_api, unique_repo_id):
    url = create_repo(unique_repo_id, token=HUB_TOKEN)
    assert url == f"{local_hub.endpoint}/{unique_repo_id}"
    assert url.repo_id == unique_repo_id
    # exist_ok: the server answers 409 with a JSON body carrying "url"
    assert create_repo(unique_repo_id, token=HUB_TOKEN, exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as excinfo:
        create_repo(unique_repo_id, token=HUB_TOKEN)
    assert excinfo.value.response.status_code == 409
    # a new repo holds the Hub's initial commit with a default .gitattributes
    info = model_info(unique_repo_id)
    assert info.private is False and len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]

    private_id = unique_repo_id + "-private"
    create_repo(private_id, token=HUB_TOKEN, private=True)
    assert model_info(private_id, token=HUB_TOKEN).private is True
    with pytest.raises(RepositoryNotFoundError):
        model_info(private_id, token=False)
    with pytest.raises(RepositoryNotFoundError):
        model_info(private_id, token=OTHER_TOKEN)  # another user's token: 404 like the Hub
    # namespace-less repo id -> created under the token's user
    short = create_repo(unique_repo_id.split("/")[1] + "-short", token=HUB_TOKEN)
    assert short.repo_id.startswith(HUB_USER + "/")

    assert hub_api.whoami()["name"] == HUB_USER
    with pytest.raises(HfHubHTTPError):
        hub_api.whoami(token="hf_not_a_valid_token")
    with pytest.raises(HfHubHTTPError) as excinfo:  # writing needs a token
        create_repo(unique_repo_id + "-anon", token=False)
    assert excinfo.value.response.status_code == 401


def test_upload_folder_regular_and_lfs_then_download(local_hub, pushed_repo, tmp_path):
    repo_id, v2 = pushed_repo["repo_id"], pushed_repo["v2"]
    # upload modes decided by the server's preupload: *.safetensors via .gitattributes, NUL bytes -> LFS
    assert local_hub.file_entry(repo_id, "config.json")["lfs"] is False
    assert local_hub.file_entry(repo_id, "weights.safetensors")["lfs"] is True
    assert local_hub.file_entry(repo_id, "sub/blob.dat")["lfs"] is True
    assert sorted(list_repo_files(repo_id)) == [".gitattributes", "config.json", "sub/blob.dat", "weights.safetensors"]

    tree = {f.path: f for f in list_repo_tree(repo_id, recursive=True)}
    assert tree["sub"].__class__.__name__ == "RepoFolder"
    assert tree["weights.safetensors"].lfs.sha256 == hashlib.sha256(v2["weights.safetensors"]).hexdigest()
    assert tree["weights.safetensors"].size == len(v2["weights.safetensors"])
    assert tree["config.json"].lfs is None
    assert tree["config.json"].blob_id == _git_blob_oid(v2["config.json"])
    assert {f.path for f in list_repo_tree(repo_id)} == {".gitattributes", "config.json", "weights.safetensors", "sub"}
    assert [f.path for f in list_repo_tree(repo_id, path_in_repo="sub")] == ["sub/blob.dat"]

    info = model_info(repo_id, files_metadata=True)
    assert info.sha == pushed_repo["c2"]
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["weights.safetensors"].lfs.size == len(v2["weights.safetensors"])

    cache = tmp_path / "cache"
    for name in ("config.json", "weights.safetensors", "sub/blob.dat"):
        path = hf_hub_download(repo_id, name, cache_dir=cache)
        assert _read(path) == v2[name]
        assert f"snapshots/{pushed_repo['c2']}/" in path.replace(os.sep, "/")
    # cache blobs are keyed like the Hub's: sha256 for LFS files, git blob sha1 for regular files
    blobs = set(os.listdir(cache / f"models--{repo_id.replace('/', '--')}" / "blobs"))
    assert hashlib.sha256(v2["weights.safetensors"]).hexdigest() in blobs
    assert _git_blob_oid(v2["config.json"]) in blobs


def test_revision_pinned_to_older_commit_branch_and_tag(pushed_repo, tmp_path):
    repo_id, c1, c2 = pushed_repo["repo_id"], pushed_repo["c1"], pushed_repo["c2"]
    assert c1 != c2
    cache = tmp_path / "cache"
    old = hf_hub_download(repo_id, "weights.safetensors", revision=c1, cache_dir=cache)
    new = hf_hub_download(repo_id, "weights.safetensors", cache_dir=cache)
    assert _read(old) == pushed_repo["v1"]["weights.safetensors"]
    assert _read(new) == pushed_repo["v2"]["weights.safetensors"]
    assert (
        _read(hf_hub_download(repo_id, "config.json", revision=c1[:12], cache_dir=cache))
        == pushed_repo["v1"]["config.json"]
    )

    create_branch(repo_id, branch="v1-branch", revision=c1, token=HUB_TOKEN)
    create_tag(repo_id, tag="v1.0", revision=c1, token=HUB_TOKEN)
    for rev in ("v1-branch", "v1.0"):
        path = hf_hub_download(repo_id, "config.json", revision=rev, cache_dir=tmp_path / f"cache-{rev}")
        assert _read(path) == pushed_repo["v1"]["config.json"]
        assert model_info(repo_id, revision=rev).sha == c1
    refs = list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2, "v1-branch": c1}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": c1}

    # committing to a branch moves only that branch
    create_commit(
        repo_id,
        [CommitOperationAdd("extra.txt", b"on the branch")],
        commit_message="branch commit",
        revision="v1-branch",
        token=HUB_TOKEN,
    )
    assert "extra.txt" in list_repo_files(repo_id, revision="v1-branch")
    assert "extra.txt" not in list_repo_files(repo_id)

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        model_info(repo_id, revision="0" * 40)


def test_snapshot_download_latest_and_old_revision(pushed_repo, tmp_path):
    repo_id = pushed_repo["repo_id"]
    folder = snapshot_download(repo_id, cache_dir=tmp_path / "cache")
    for name, data in pushed_repo["v2"].items():
        assert _read(os.path.join(folder, name)) == data
    assert os.path.basename(folder) == pushed_repo["c2"]

    old = snapshot_download(repo_id, revision=pushed_repo["c1"], cache_dir=tmp_path / "cache")
    assert not os.path.exists(os.path.join(old, "sub", "blob.dat"))
    assert _read(os.path.join(old, "weights.safetensors")) == pushed_repo["v1"]["weights.safetensors"]

    only = snapshot_download(repo_id, allow_patterns=["*.json"], local_dir=tmp_path / "local")
    assert sorted(p for p in os.listdir(only) if not p.startswith(".")) == ["config.json"]


def test_private_repo_needs_token(local_hub, unique_repo_id, tmp_path):
    create_repo(unique_repo_id, token=HUB_TOKEN, private=True)
    payload = _safetensors_bytes([2.0] * 64)
    create_commit(
        unique_repo_id, [CommitOperationAdd("adapter.safetensors", payload)], commit_message="add", token=HUB_TOKEN
    )

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(unique_repo_id, "adapter.safetensors", token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(unique_repo_id, token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(unique_repo_id, "adapter.safetensors", token=OTHER_TOKEN, cache_dir=tmp_path / "other")

    local_hub.clear_logs()
    path = hf_hub_download(unique_repo_id, "adapter.safetensors", token=HUB_TOKEN, cache_dir=tmp_path / "auth")
    assert _read(path) == payload
    assert local_hub.seen_tokens and set(local_hub.seen_tokens) == {HUB_TOKEN}
    resolve_calls = [entry for entry in local_hub.request_log if "/resolve/" in entry[1]]
    assert {(method, token) for method, _, _, token in resolve_calls} == {("HEAD", HUB_TOKEN), ("GET", HUB_TOKEN)}


def test_missing_file_repo_and_revision_errors(pushed_repo, tmp_path):
    repo_id = pushed_repo["repo_id"]
    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(repo_id, "does-not-exist.bin", cache_dir=tmp_path)
    assert isinstance(excinfo.value, RemoteEntryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{HUB_USER}/no-such-repo", "config.json", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        model_info(f"{HUB_USER}/no-such-repo")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("no-namespace-repo", "config.json", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        list(list_repo_tree(repo_id, path_in_repo="no/such/dir"))


def test_delete_file_and_history(pushed_repo):
    repo_id = pushed_repo["repo_id"]
    info = create_commit(repo_id, [CommitOperationDelete("sub/")], commit_message="drop sub", token=HUB_TOKEN)
    assert "sub/blob.dat" not in list_repo_files(repo_id)
    commits = huggingface_hub.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits][:3] == [info.oid, pushed_repo["c2"], pushed_repo["c1"]]
    assert [c.title for c in commits] == ["drop sub", "v2", "v1", "initial commit"]
    # stale parent_commit is rejected like on the Hub (412)
    with pytest.raises(HfHubHTTPError) as excinfo:
        create_commit(
            repo_id,
            [CommitOperationAdd("x.txt", b"x")],
            commit_message="stale",
            parent_commit=pushed_repo["c1"],
            token=HUB_TOKEN,
        )
    assert excinfo.value.response.status_code == 412
    with pytest.raises(HfHubHTTPError) as excinfo:  # other user cannot push
        create_commit(repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="nope", token=OTHER_TOKEN)
    assert excinfo.value.response.status_code == 403


def test_raw_http_protocol_details(local_hub, pushed_repo):
    """HEAD sends no body, headers huggingface_hub relies on, Range requests, error codes."""
    repo_id = pushed_repo["repo_id"]
    weights = pushed_repo["v2"]["weights.safetensors"]
    base = f"{local_hub.endpoint}/{repo_id}/resolve/main"

    head = urllib.request.urlopen(urllib.request.Request(f"{base}/weights.safetensors", method="HEAD"))
    assert head.status == 200 and head.read() == b""
    assert head.headers["X-Repo-Commit"] == pushed_repo["c2"]
    sha = hashlib.sha256(weights).hexdigest()
    assert head.headers["X-Linked-Etag"] == f'"{sha}"' and head.headers["X-Linked-Size"] == str(len(weights))
    assert head.headers["Content-Length"] == str(len(weights))
    regular = urllib.request.urlopen(urllib.request.Request(f"{base}/config.json", method="HEAD"))
    assert regular.headers["ETag"] == f'"{_git_blob_oid(pushed_repo["v2"]["config.json"])}"'
    assert regular.headers.get("X-Linked-Etag") is None

    ranged = urllib.request.urlopen(
        urllib.request.Request(f"{base}/weights.safetensors", headers={"Range": "bytes=8-15"})
    )
    assert ranged.status == 206 and ranged.read() == weights[8:16]
    assert ranged.headers["Content-Range"] == f"bytes 8-15/{len(weights)}"
    tail = urllib.request.urlopen(urllib.request.Request(f"{base}/weights.safetensors", headers={"Range": "bytes=-4"}))
    assert tail.read() == weights[-4:]

    def error_of(url: str, headers: dict | None = None) -> tuple[int, str | None]:
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}))
        return excinfo.value.code, excinfo.value.headers.get("X-Error-Code")

    assert error_of(f"{base}/missing.txt") == (404, "EntryNotFound")
    assert error_of(f"{local_hub.endpoint}/{repo_id}/resolve/nope/config.json") == (404, "RevisionNotFound")
    assert error_of(f"{local_hub.endpoint}/{HUB_USER}/nope/resolve/main/config.json") == (401, "RepoNotFound")
    assert error_of(
        f"{local_hub.endpoint}/{HUB_USER}/nope/resolve/main/config.json", {"Authorization": f"Bearer {HUB_TOKEN}"}
    ) == (404, "RepoNotFound")
    assert error_of(f"{base}/config.json", {"Authorization": "Bearer hf_bogus"}) == (401, None)


@pytest.mark.slow
def test_offline_mode_reuses_filled_cache_in_subprocess(local_hub, pushed_repo, tmp_path):
    repo_id = pushed_repo["repo_id"]
    cache = tmp_path / "hub-cache"
    online = hf_hub_download(repo_id, "weights.safetensors", cache_dir=cache)
    hf_hub_download(repo_id, "config.json", cache_dir=cache)

    n_requests = len(local_hub.request_log)
    code = textwrap.dedent(
        f"""
        import json, os
        from huggingface_hub import constants, hf_hub_download, snapshot_download, try_to_load_from_cache
        from huggingface_hub.errors import LocalEntryNotFoundError
        assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == {str(cache)!r}
        out = {{"path": hf_hub_download({repo_id!r}, "weights.safetensors")}}
        out["cached"] = try_to_load_from_cache({repo_id!r}, "config.json")
        try:
            hf_hub_download({repo_id!r}, "sub/blob.dat")  # exists remotely, never downloaded
        except LocalEntryNotFoundError as exc:
            out["missing"] = type(exc).__name__
        try:
            hf_hub_download("{HUB_USER}/never-seen", "config.json")
        except LocalEntryNotFoundError as exc:
            out["missing_repo"] = type(exc).__name__
        print(json.dumps(out))
        """
    )
    proc = run_python(code, extra_env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["path"] == online
    assert _read(out["path"]) == pushed_repo["v2"]["weights.safetensors"]
    assert out["cached"] and _read(out["cached"]) == pushed_repo["v2"]["config.json"]
    assert out["missing"] == "LocalEntryNotFoundError"
    assert out["missing_repo"] == "LocalEntryNotFoundError"
    assert len(local_hub.request_log) == n_requests  # offline: the server saw nothing


@pytest.mark.slow
def test_retarget_after_import_fallback_in_subprocess(tmp_path):
    """If huggingface_hub is imported before the plugin, the plugin patches it; pull/push still work."""
    code = textwrap.dedent(
        f"""
        import os, warnings
        os.environ.pop("HF_ENDPOINT", None)
        os.environ.pop("HF_HUB_DISABLE_XET", None)
        import huggingface_hub
        from huggingface_hub import constants
        assert constants.ENDPOINT == "https://huggingface.co" and not constants.HF_HUB_DISABLE_XET
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from tests.hub_fixtures import get_session_hub, HUB_TOKEN
        assert any("patching huggingface_hub" in str(w.message) for w in caught), caught
        endpoint = get_session_hub().server.endpoint
        assert constants.ENDPOINT == endpoint
        from huggingface_hub import create_repo, upload_file, hf_hub_download
        repo = create_repo("user/retarget", token=HUB_TOKEN).repo_id
        upload_file(path_or_fileobj=b"\\x00lfs-ish", path_in_repo="w.safetensors", repo_id=repo, token=HUB_TOKEN)
        path = hf_hub_download(repo, "w.safetensors", cache_dir={str(tmp_path)!r})
        assert open(path, "rb").read() == b"\\x00lfs-ish"
        print("OK", endpoint)
        """
    )
    proc = run_python(code)
    assert proc.stdout.startswith("OK http://127.0.0.1:")


@pytest.fixture(scope="module")
def diffusers_unet_on_hub(local_hub, tmp_path_factory):
    """A tiny UNet2DConditionModel pushed twice (upload_folder of save_pretrained, and push_to_hub)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    tmp = tmp_path_factory.mktemp("diffusers-unet")
    unet.save_pretrained(tmp / "unet")
    repo_id = f"{HUB_USER}/tiny-unet-{os.urandom(4).hex()}"
    create_repo(repo_id, token=HUB_TOKEN)
    upload_folder(repo_id=repo_id, folder_path=tmp / "unet", token=HUB_TOKEN)
    unet.push_to_hub(repo_id + "-pushed", token=HUB_TOKEN)  # create_repo(exist_ok) + upload_folder + README
    return {"unet": unet, "repo_id": repo_id, "cache": tmp / "cache"}


def test_diffusers_push_to_hub_and_from_pretrained(diffusers_unet_on_hub, local_hub):
    import torch  # noqa: PLC0415
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    repo_id, unet = diffusers_unet_on_hub["repo_id"], diffusers_unet_on_hub["unet"]
    pushed = repo_id + "-pushed"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(list_repo_files(pushed))
    assert local_hub.file_entry(pushed, "diffusion_pytorch_model.safetensors")["lfs"] is True
    for rid in (repo_id, pushed):
        loaded = UNet2DConditionModel.from_pretrained(rid, cache_dir=diffusers_unet_on_hub["cache"])
        ref, got = unet.state_dict(), loaded.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_diffusers_from_pretrained_offline_in_subprocess(diffusers_unet_on_hub):
    """HF_HUB_OFFLINE must be set before diffusers is imported => subprocess; the server is made unreachable."""
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    repo_id, cache = diffusers_unet_on_hub["repo_id"], diffusers_unet_on_hub["cache"]
    UNet2DConditionModel.from_pretrained(repo_id, cache_dir=cache)  # make sure the cache is filled
    code = textwrap.dedent(
        f"""
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained({repo_id!r}, cache_dir={str(cache)!r})
        print("OFFLINE_OK", sum(p.numel() for p in unet.parameters()))
        """
    )
    proc = run_python(code, extra_env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=300)
    n_params = sum(p.numel() for p in diffusers_unet_on_hub["unet"].parameters())
    assert f"OFFLINE_OK {n_params}" in proc.stdout
