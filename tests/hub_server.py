"""A small Hugging Face Hub compatible HTTP server for tests (Python standard library only).

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.4.0 uses for pulling and pushing
model / dataset repos, so that ``create_repo``, ``upload_folder``, ``create_commit``,
``hf_hub_download``, ``snapshot_download``, ``model_info``, ``list_repo_files`` / ``list_repo_tree``,
``create_branch``, ``create_tag`` and diffusers ``push_to_hub`` / ``from_pretrained`` run unmodified
against it (with ``HF_ENDPOINT`` pointing at :attr:`LocalHubServer.endpoint` and ``HF_HUB_DISABLE_XET=1``).

Endpoints (``{T}`` is ``model``, ``dataset`` or ``space``; ``{P}`` is ``""``, ``datasets/`` or ``spaces/``)::

    GET    /api/whoami-v2
    POST   /api/validate-yaml
    GET    /api/agent-harnesses                      (empty registry: huggingface_hub fetches it once)
    POST   /api/repos/create                         (409 + JSON {"url": ...} when the repo exists)
    DELETE /api/repos/delete
    GET    /api/{T}s/{repo_id}[/revision/{rev}]      (info: sha, siblings, private, ...)
    GET    /api/{T}s/{repo_id}/tree/{rev}[/{path}]   (?recursive=true&expand=true)
    POST   /api/{T}s/{repo_id}/paths-info/{rev}
    GET    /api/{T}s/{repo_id}/refs
    GET    /api/{T}s/{repo_id}/commits/{rev}
    POST   /api/{T}s/{repo_id}/preupload/{rev}       (decides "regular" vs "lfs")
    POST   /api/{T}s/{repo_id}/commit/{rev}          (NDJSON: header / file / lfsFile / deletedFile / deletedFolder)
    POST   /api/{T}s/{repo_id}/branch/{branch}       DELETE likewise
    POST   /api/{T}s/{repo_id}/tag/{rev}             DELETE /api/{T}s/{repo_id}/tag/{tag}
    PUT    /api/{T}s/{repo_id}/settings              ({"private": bool})
    POST   /{P}{repo_id}.git/info/lfs/objects/batch  (git-lfs batch API, "basic" transfer)
    PUT    /_lfs/upload/{key}                        (upload href handed out by the batch API)
    POST   /{P}{repo_id}.git/info/lfs/objects/verify
    HEAD   /{P}{repo_id}/resolve/{rev}/{path}        (X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size)
    GET    /{P}{repo_id}/resolve/{rev}/{path}        (same headers + body, Range supported)

Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers that
``huggingface_hub.utils.hf_raise_for_status`` maps to exceptions:
``RepoNotFound`` -> ``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``,
``EntryNotFound`` -> ``RemoteEntryNotFoundError`` (an ``EntryNotFoundError``).

Behaviour modelled on the Hub:

* A new repo gets an "initial commit" holding the Hub's default ``.gitattributes`` on ``main``.
* Upload mode (preupload): a file goes to LFS when it matches a ``filter=lfs`` pattern of the
  ``.gitattributes`` at that revision (default: ``*.safetensors``, ``*.bin``, ``*.pt``, ...), or when it is
  10 MiB or larger, or when its 512-byte sample contains a NUL byte (binary). Everything else is "regular".
* Every commit gets a new 40-hex sha; history is kept, so old commit shas (full, or a unique prefix of at
  least 7 hex digits), branches and tags all resolve as revisions.
* Private repos are visible only with ``Authorization: Bearer <token>`` of their owner; otherwise 401
  (no token) / 404 (other user), both with ``X-Error-Code: RepoNotFound``. An unknown token is answered
  with 401 ``Invalid credentials in Authorization header`` on every route, like the Hub.
* Writes need the owner's token. Repos live under the token user's namespace.

Content is stored on disk under ``root`` (content-addressed by sha256); repo metadata lives in memory.
Every Authorization token received is appended to :attr:`LocalHubServer.seen_tokens`, and every request
to :attr:`LocalHubServer.request_log` as ``(method, path, status, token_or_None)``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Mapping

__all__ = ["LocalHubServer", "HubError", "DEFAULT_GITATTRIBUTES", "LFS_SIZE_THRESHOLD"]

#: Files of this size or larger are always uploaded as LFS (the Hub's 10 MB rule).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

#: The ``.gitattributes`` the Hub commits into every new model repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"
_CHUNK = 1024 * 1024


class HubError(Exception):
    """An HTTP error answered by the server (status, optional X-Error-Code, message, extra headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.body = body


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _parse_gitattributes_lfs(text: str) -> list[str]:
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _match_git_pattern(path: str, pattern: str) -> bool:
    """Approximate gitattributes / gitignore matching (enough for the Hub's default patterns)."""
    pattern = pattern.strip()
    if pattern.endswith("/"):
        prefix = pattern.rstrip("/").lstrip("/")
        return path == prefix or path.startswith(prefix + "/") or f"/{prefix}/" in f"/{path}"
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    pattern = pattern.lstrip("/")
    if fnmatch.fnmatchcase(path, pattern):
        return True
    # "a/**/b" also matches "a/b"
    return "/**/" in pattern and fnmatch.fnmatchcase(path, pattern.replace("/**/", "/"))


def _validate_repo_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class _FileEntry:
    size: int
    sha256: str  # of the content (storage key)
    git_oid: str  # git blob oid: of the content (regular) or of the LFS pointer (LFS)
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    author: str
    files: dict[str, _FileEntry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


class LocalHubServer:
    """Hub-compatible HTTP server on ``127.0.0.1`` serving from a background thread.

    Args:
        root: directory where file contents are stored (created if needed). Defaults to a fresh
            temporary directory that is removed by :meth:`stop`.
        tokens: mapping ``token -> user name``. ``Authorization: Bearer <token>`` authenticates as that user.
        port: port to bind (0: a free port picked by the OS).

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``endpoint`` is ``http://127.0.0.1:PORT``
    and is known as soon as the object exists (the socket is bound in ``__init__``).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        tokens: Mapping[str, str] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self._owns_root = root is None
        self.root = os.fspath(root) if root is not None else tempfile.mkdtemp(prefix="local-hub-")
        self._objects_dir = os.path.join(self.root, "objects")
        self._incoming_dir = os.path.join(self.root, "incoming")
        os.makedirs(self._objects_dir, exist_ok=True)
        os.makedirs(self._incoming_dir, exist_ok=True)

        self.tokens: dict[str, str] = dict(tokens if tokens is not None else {"hf_test_token": "user"})
        self.seen_tokens: list[str] = []
        self.request_log: list[tuple[str, str, int, str | None]] = []

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._upload_keys: dict[str, tuple[str, int]] = {}
        self._commit_counter = 0

        handler = type("_BoundHubHandler", (_HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalHubServer":
        if self._closed:
            raise RuntimeError("LocalHubServer was stopped; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._closed

    def __enter__(self) -> "LocalHubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalHubServer(endpoint={self.endpoint!r}, root={self.root!r})"

    # ------------------------------------------------------------------ helpers for tests
    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def head_commit(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return self._resolve_revision(repo, revision).oid

    def file_entry(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> dict:
        """Storage facts about a file: ``{"size", "sha256", "git_oid", "lfs"}`` (for assertions)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            entry = self._resolve_revision(repo, revision).files[path]
            return {"size": entry.size, "sha256": entry.sha256, "git_oid": entry.git_oid, "lfs": entry.lfs}

    def clear_logs(self) -> None:
        with self._lock:
            self.seen_tokens.clear()
            self.request_log.clear()

    # ------------------------------------------------------------------ storage
    def _object_path(self, sha256: str) -> str:
        return os.path.join(self._objects_dir, sha256)

    def _has_object(self, sha256: str, size: int | None = None) -> bool:
        path = self._object_path(sha256)
        return os.path.isfile(path) and (size is None or os.path.getsize(path) == size)

    def _store_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha)
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=self._incoming_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def _read_object(self, sha256: str) -> bytes:
        with open(self._object_path(sha256), "rb") as f:
            return f.read()

    # ------------------------------------------------------------------ auth
    def _user_for(self, token: str | None) -> str | None:
        if token is None:
            return None
        user = self.tokens.get(token)
        if user is None:
            raise HubError(401, _INVALID_TOKEN_MESSAGE)
        return user

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None, *, write: bool = False) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            status = 401 if user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, "You must be authenticated to write to this repo")
            if user != repo.owner:
                raise HubError(403, f"You don't have the rights to write to {repo_type}s/{repo_id}")
        return repo

    # ------------------------------------------------------------------ revisions
    def _resolve_revision(self, repo: _Repo, revision: str) -> _Commit:
        rev = revision
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                rev = rev[len(prefix) :]
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev in repo.tags:
            return repo.commits[repo.tags[rev]]
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m and int(m.group(1)) in repo.pull_requests:
            return repo.commits[repo.pull_requests[int(m.group(1))]]
        if _HEX40.match(rev) and rev in repo.commits:
            return repo.commits[rev]
        if _HEX_PREFIX.match(rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(
        self, repo: _Repo, parent: _Commit | None, files: dict[str, _FileEntry], title: str, message: str, author: str
    ) -> _Commit:
        self._commit_counter += 1
        seed = json.dumps(
            [
                repo.repo_type,
                repo.repo_id,
                parent.oid if parent else None,
                sorted((p, e.git_oid) for p, e in files.items()),
                title,
                message,
                time.time_ns(),
                self._commit_counter,
                secrets.token_hex(8),
            ]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(
            oid=oid,
            parent=parent.oid if parent else None,
            title=title,
            message=message,
            date=_now_iso(),
            author=author,
            files=files,
        )
        repo.commits[oid] = commit
        return commit

    def _history(self, repo: _Repo, commit: _Commit) -> list[_Commit]:
        out = []
        current: _Commit | None = commit
        while current is not None:
            out.append(current)
            current = repo.commits.get(current.parent) if current.parent else None
        return out

    def _last_commit_for(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool) -> _Commit:
        def snapshot(c: _Commit):
            if not is_dir:
                e = c.files.get(path)
                return e.git_oid if e else None
            return sorted((p, e.git_oid) for p, e in c.files.items() if p.startswith(path + "/"))

        history = self._history(repo, commit)
        last = history[0]
        current = snapshot(last)
        for older in history[1:]:
            if snapshot(older) != current:
                break
            last = older
        return last

    # ------------------------------------------------------------------ serializers
    def _file_json(self, repo: _Repo, commit: _Commit, path: str, entry: _FileEntry, expand: bool) -> dict:
        data: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            last = self._last_commit_for(repo, commit, path, is_dir=False)
            data["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return data

    def _dir_json(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        members = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(path + "/"))
        data: dict[str, Any] = {
            "type": "directory",
            "oid": hashlib.sha1(json.dumps(members).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            last = self._last_commit_for(repo, commit, path, is_dir=True)
            data["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return data

    @staticmethod
    def _dirs_of(files: Iterable[str]) -> set[str]:
        dirs = set()
        for p in files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def _info_json(self, repo: _Repo, commit: _Commit, blobs: bool) -> dict:
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib["size"] = entry.size
                sib["blobId"] = entry.git_oid
                if entry.lfs:
                    sib["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
        if repo.repo_type == "space":
            info["sdk"] = "static"
        return info

    def _ref_json(self, name: str, ref: str, target: str) -> dict:
        return {"name": name, "ref": ref, "targetCommit": target}

    # ------------------------------------------------------------------ API operations
    def api_whoami(self, user: str | None) -> dict:
        if user is None:
            raise HubError(401, "Invalid user token.")
        return {
            "type": "user",
            "id": hashlib.md5(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user,
            "email": None,
            "emailVerified": False,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
        }

    def api_create_repo(self, user: str | None, body: dict) -> tuple[int, dict]:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        name = body.get("name")
        organization = body.get("organization") or user
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if organization != user:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace '{organization}'")
        visibility = body.get("visibility")
        private = bool(body.get("private", False)) if visibility is None else visibility == "private"
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(
                    409, "You already created this repo", body={"error": "You already created this repo", "url": url}
                )
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, owner=user, private=private, created_at=_now_iso())
            data = DEFAULT_GITATTRIBUTES.encode()
            files = {
                ".gitattributes": _FileEntry(
                    size=len(data), sha256=self._store_bytes(data), git_oid=_git_blob_oid(data), lfs=False
                )
            }
            commit = self._new_commit(repo, None, files, "initial commit", "", user)
            repo.branches["main"] = commit.oid
            self._repos[(repo_type, repo_id)] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def api_delete_repo(self, user: str | None, body: dict) -> dict:
        repo_type = body.get("type") or "model"
        organization = body.get("organization") or user
        repo_id = f"{organization}/{body.get('name')}"
        with self._lock:
            self._get_repo(repo_type, repo_id, user, write=True)
            del self._repos[(repo_type, repo_id)]
        return {}

    def api_update_settings(self, repo: _Repo, body: dict) -> dict:
        with self._lock:
            if "private" in body:
                repo.private = bool(body["private"])
            if "visibility" in body:
                repo.private = body["visibility"] == "private"
        return {"private": repo.private}

    def api_tree(self, repo: _Repo, revision: str, path: str, recursive: bool, expand: bool) -> list[dict]:
        with self._lock:
            commit = self._resolve_revision(repo, revision)
            path = path.strip("/")
            files = commit.files
            dirs = self._dirs_of(files)
            if path and path not in dirs:
                raise HubError(
                    404,
                    f"{path} does not exist on {revision!r}",
                    "EntryNotFound",
                    headers={"X-Repo-Commit": commit.oid},
                )
            prefix = path + "/" if path else ""
            out = []
            for d in sorted(dirs):
                if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                    out.append(self._dir_json(repo, commit, d, expand))
            for p in sorted(files):
                if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :]):
                    out.append(self._file_json(repo, commit, p, files[p], expand))
            return out

    def api_paths_info(self, repo: _Repo, revision: str, paths: list[str], expand: bool) -> list[dict]:
        with self._lock:
            commit = self._resolve_revision(repo, revision)
            dirs = self._dirs_of(commit.files)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    out.append(self._file_json(repo, commit, p, commit.files[p], expand))
                elif p in dirs:
                    out.append(self._dir_json(repo, commit, p, expand))
            return out

    def api_commits(self, repo: _Repo, revision: str) -> list[dict]:
        with self._lock:
            commit = self._resolve_revision(repo, revision)
            return [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author}],
                    "formatted": {"title": c.title, "message": c.message},
                }
                for c in self._history(repo, commit)
            ]

    def api_refs(self, repo: _Repo, include_prs: bool) -> dict:
        with self._lock:
            out = {
                "branches": [self._ref_json(b, f"refs/heads/{b}", oid) for b, oid in sorted(repo.branches.items())],
                "converts": [],
                "tags": [self._ref_json(t, f"refs/tags/{t}", oid) for t, oid in sorted(repo.tags.items())],
            }
            if include_prs:
                out["pullRequests"] = [
                    self._ref_json(str(n), f"refs/pr/{n}", oid) for n, oid in sorted(repo.pull_requests.items())
                ]
            return out

    def api_create_branch(self, repo: _Repo, branch: str, body: dict) -> dict:
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            if not branch or branch.startswith("refs/") or _HEX40.match(branch):
                raise HubError(400, f"Invalid branch name: {branch!r}")
            start = self._resolve_revision(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        return {}

    def api_delete_branch(self, repo: _Repo, branch: str) -> dict:
        with self._lock:
            if branch == "main":
                raise HubError(403, "Cannot delete the main branch")
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.branches[branch]
        return {}

    def api_create_tag(self, repo: _Repo, revision: str, body: dict) -> dict:
        tag = body.get("tag")
        if not isinstance(tag, str) or not tag:
            raise HubError(400, "Missing tag name")
        with self._lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve_revision(repo, revision).oid
        return {}

    def api_delete_tag(self, repo: _Repo, tag: str) -> dict:
        with self._lock:
            if tag not in repo.tags:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del repo.tags[tag]
        return {}

    def _gitignore_patterns(self, commit: _Commit, override: str | None) -> list[str]:
        text = override
        if text is None and ".gitignore" in commit.files:
            text = self._read_object(commit.files[".gitignore"].sha256).decode("utf-8", "replace")
        if not text:
            return []
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("#", "!"))]

    def api_preupload(self, repo: _Repo, revision: str, body: dict) -> dict:
        with self._lock:
            commit = self._resolve_revision(repo, revision)
            attrs = commit.files.get(".gitattributes")
            attrs_text = self._read_object(attrs.sha256).decode("utf-8", "replace") if attrs else ""
            lfs_patterns = _parse_gitattributes_lfs(attrs_text)
            ignore_patterns = self._gitignore_patterns(commit, body.get("gitIgnore"))
            out = []
            for item in body.get("files", []):
                path = _validate_repo_path(item.get("path"))
                size = int(item.get("size", 0))
                sample = base64.b64decode(item.get("sample", "") or "")
                is_lfs = (
                    any(_match_git_pattern(path, pat) for pat in lfs_patterns)
                    or size >= LFS_SIZE_THRESHOLD
                    or b"\x00" in sample
                )
                info: dict[str, Any] = {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": any(_match_git_pattern(path, pat) for pat in ignore_patterns),
                }
                existing = commit.files.get(path)
                if existing is not None:
                    info["oid"] = existing.sha256 if existing.lfs else existing.git_oid
                out.append(info)
            return {"files": out, "commitOid": commit.oid}

    def api_commit(self, repo: _Repo, user: str, revision: str, raw_body: bytes, create_pr: bool) -> dict:
        lines = [json.loads(line) for line in raw_body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First line of the commit payload must be the header")
        header = lines[0].get("value") or {}
        title = header.get("summary") or ""
        if not title:
            raise HubError(400, "Commit summary is required")
        # Decode regular files first (outside the lock), then apply everything atomically.
        decoded: list[tuple[str, str, Any]] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                path = _validate_repo_path(value.get("path"))
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                data = base64.b64decode(value.get("content", ""))
                decoded.append(("file", path, data))
            elif key == "lfsFile":
                path = _validate_repo_path(value.get("path"))
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, "Only sha256 LFS objects are supported")
                decoded.append(("lfsFile", path, (value.get("oid"), value.get("size"))))
            elif key in ("deletedFile", "deletedFolder"):
                decoded.append((key, str(value.get("path", "")).strip("/"), None))
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")

        with self._lock:
            if create_pr:
                base = self._resolve_revision(repo, revision)
            else:
                if revision not in repo.branches:
                    self._resolve_revision(repo, revision)  # raises RevisionNotFound for unknown revs
                    raise HubError(400, f"Can only commit to a branch, not to {revision!r}")
                base = repo.commits[repo.branches[revision]]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for key, path, payload in decoded:
                if key == "file":
                    sha = self._store_bytes(payload)
                    files[path] = _FileEntry(size=len(payload), sha256=sha, git_oid=_git_blob_oid(payload), lfs=False)
                elif key == "lfsFile":
                    oid, size = payload
                    if not isinstance(oid, str) or not self._has_object(oid):
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    real_size = os.path.getsize(self._object_path(oid))
                    if size is not None and int(size) != real_size:
                        raise HubError(422, f"LFS object {oid}: size mismatch")
                    files[path] = _FileEntry(
                        size=real_size, sha256=oid, git_oid=_git_blob_oid(_lfs_pointer(oid, real_size)), lfs=True
                    )
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                else:  # deletedFolder
                    victims = [p for p in files if p.startswith(path + "/")] if path else list(files)
                    if not victims:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in victims:
                        del files[p]
            commit = self._new_commit(repo, base, files, title, header.get("description") or "", user)
            result: dict[str, Any] = {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.endpoint}/{repo.url_path}/commit/{commit.oid}",
                "hookOutput": "",
            }
            if create_pr:
                num = max(repo.pull_requests, default=0) + 1
                repo.pull_requests[num] = commit.oid
                result["pullRequestUrl"] = f"{self.endpoint}/{repo.url_path}/discussions/{num}"
            else:
                repo.branches[revision] = commit.oid
            return result

    # ------------------------------------------------------------------ LFS
    def lfs_batch(self, repo: _Repo, body: dict) -> dict:
        operation = body.get("operation")
        objects = body.get("objects") or []
        out = []
        for obj in objects:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                out.append(
                    {"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid oid/size"}}
                )
                continue
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "upload":
                if not self._has_object(oid, size):
                    key = secrets.token_hex(16)
                    with self._lock:
                        self._upload_keys[key] = (oid, size)
                    item["actions"] = {
                        "upload": {"href": f"{self.endpoint}/_lfs/upload/{key}", "expires_in": 3600},
                        "verify": {
                            "href": f"{self.endpoint}/{repo.url_path}.git/info/lfs/objects/verify",
                            "expires_in": 3600,
                        },
                    }
            elif operation == "download":
                if self._has_object(oid, size):
                    item["actions"] = {"download": {"href": f"{self.endpoint}/_lfs/objects/{oid}", "expires_in": 3600}}
                else:
                    item = {"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}}
            else:
                raise HubError(400, f"Unsupported LFS operation {operation!r}")
            out.append(item)
        return {"transfer": "basic", "objects": out, "hash_algo": "sha256"}

    def lfs_verify(self, body: dict) -> dict:
        oid, size = body.get("oid"), body.get("size")
        if not isinstance(oid, str) or not self._has_object(oid, size if isinstance(size, int) else None):
            raise HubError(404, f"LFS object {oid} not found")
        return {}


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    hub: LocalHubServer  # set on the per-server subclass

    # ------------------------------------------------------------------ plumbing
    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms
        # to every keep-alive request.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 0
        with self.hub._lock:
            self.hub.request_log.append((self.command, self.path, status, getattr(self, "_token", None)))

    def _read_body(self) -> bytes:
        if getattr(self, "_body", None) is not None:
            return self._body
        chunks = []
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                chunks.append(self.rfile.read(length))
        self._body = b"".join(chunks)
        return self._body

    def _iter_body(self) -> Iterable[bytes]:
        """Stream the request body (used for LFS uploads)."""
        self._streaming = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, _CHUNK))
                    if not data:
                        raise HubError(400, "Truncated body")
                    remaining -= len(data)
                    yield data
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(remaining, _CHUNK))
                if not data:
                    raise HubError(400, "Truncated body")
                remaining -= len(data)
                yield data
        self._body = b""

    def _json_body(self) -> dict:
        raw = self._read_body()
        if not raw:
            return {}
        ctype = (self.headers.get("Content-Type") or "").lower()
        if "application/x-www-form-urlencoded" in ctype:
            parsed = urllib.parse.parse_qs(raw.decode(), keep_blank_values=True)
            return {k: v if len(v) > 1 or k == "paths" else v[0] for k, v in parsed.items()}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str | None = "application/json; charset=utf-8",
        content_length: int | None = None,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("X-Request-Id", secrets.token_hex(8))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _send_error(self, err: HubError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message.replace("\r", " ").replace("\n", " ")
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        if err.status == 401 and "WWW-Authenticate" not in headers:
            headers["WWW-Authenticate"] = 'Bearer realm="Authentication required", charset="UTF-8"'
        self._send_json(err.status, err.body or {"error": err.message}, headers=headers)

    def _dispatch(self) -> None:
        self._body = None
        self._streaming = False
        self._token = None
        try:
            auth = self.headers.get("Authorization")
            if auth:
                scheme, _, value = auth.partition(" ")
                self._token = value.strip() if scheme.lower() == "bearer" else auth
                with self.hub._lock:
                    self.hub.seen_tokens.append(self._token)
            user = self.hub._user_for(self._token)
            self._route(user)
        except HubError as err:
            if self._streaming and self._body is None:
                self.close_connection = True  # body partially consumed: cannot reuse the connection
            elif self.command in ("POST", "PUT", "DELETE", "PATCH"):
                try:
                    self._read_body()  # keep the connection usable
                except Exception:
                    self.close_connection = True
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # pragma: no cover - surfaced to the client as a 500
            self.close_connection = True
            self._send_error(HubError(500, f"LocalHubServer internal error: {type(exc).__name__}: {exc}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ routing
    def _route(self, user: str | None) -> None:
        hub = self.hub
        raw_path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        segs = [urllib.parse.unquote(s) for s in raw_path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        method = self.command

        if segs[:1] == ["api"]:
            return self._route_api(user, segs[1:], params)

        if segs[:2] == ["_lfs", "upload"] and len(segs) == 3 and method == "PUT":
            return self._lfs_upload(segs[2])
        if segs[:2] == ["_lfs", "objects"] and len(segs) == 3 and method == "GET":
            if not hub._has_object(segs[2]):
                raise HubError(404, "Object not found")
            return self._serve_bytes(hub._object_path(segs[2]), {})

        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces") and len(segs) > 1:
            repo_type = _REPO_TYPES[segs[0]]
            segs = segs[1:]

        # LFS batch / verify: /{ns}/{name}.git/info/lfs/objects/{batch,verify}
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{segs[0]}/{segs[1][:-4]}"
            with hub._lock:
                repo = hub._get_repo(repo_type, repo_id, user, write=True)
            body = self._json_body()
            lfs_type = "application/vnd.git-lfs+json"
            if segs[5] == "batch":
                return self._send(200, json.dumps(hub.lfs_batch(repo, body)).encode(), content_type=lfs_type)
            if segs[5] == "verify":
                return self._send(200, json.dumps(hub.lfs_verify(body)).encode(), content_type=lfs_type)

        # resolve: /{ns}/{name}/resolve/{rev}/{path...} (or a namespace-less /{name}/resolve/...)
        if method in ("GET", "HEAD"):
            if len(segs) >= 5 and segs[2] == "resolve":
                return self._resolve(user, repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
            if len(segs) >= 4 and segs[1] == "resolve":
                raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
            if len(segs) == 2 and segs[0] and segs[1]:
                with hub._lock:
                    repo = hub._get_repo(repo_type, f"{segs[0]}/{segs[1]}", user)
                return self._send(
                    200, f"<html><body>{repo.repo_id}</body></html>".encode(), content_type="text/html; charset=utf-8"
                )
        raise HubError(404, f"Unknown route {method} {raw_path}")

    def _route_api(self, user: str | None, segs: list[str], params: dict) -> None:
        hub = self.hub
        method = self.command
        if segs == ["whoami-v2"] and method == "GET":
            return self._send_json(200, hub.api_whoami(user))
        if segs == ["validate-yaml"] and method == "POST":
            self._read_body()
            return self._send_json(200, {"errors": [], "warnings": []})
        if segs == ["agent-harnesses"] and method == "GET":
            return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if segs == ["repos", "create"] and method == "POST":
            status, data = hub.api_create_repo(user, self._json_body())
            return self._send_json(status, data)
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._send_json(200, hub.api_delete_repo(user, self._json_body()))

        if len(segs) == 2 and segs[0] in _REPO_TYPES:  # namespace-less repo id: never created here
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        if len(segs) < 3 or segs[0] not in _REPO_TYPES:
            raise HubError(404, f"Unknown API route {method} /api/{'/'.join(segs)}")
        repo_type = _REPO_TYPES[segs[0]]
        repo_id = f"{segs[1]}/{segs[2]}"
        rest = segs[3:]
        is_write = method in ("POST", "PUT", "DELETE") and rest[:1] != ["paths-info"]
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, user, write=is_write)

        def flag(name: str) -> bool:
            return (params.get(name, ["false"])[-1] or "").lower() in ("1", "true", "yes")

        if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
            revision = rest[1] if rest else "main"
            with hub._lock:
                commit = hub._resolve_revision(repo, revision)
                return self._send_json(200, hub._info_json(repo, commit, blobs=flag("blobs")))
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            data = hub.api_tree(repo, rest[1], "/".join(rest[2:]), flag("recursive"), flag("expand"))
            return self._send_json(200, data)
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            body = self._json_body()
            paths = body.get("paths", [])
            paths = [paths] if isinstance(paths, str) else list(paths)
            expand = str(body.get("expand", "false")).lower() in ("1", "true")
            return self._send_json(200, hub.api_paths_info(repo, rest[1], paths, expand))
        if method == "GET" and rest == ["refs"]:
            return self._send_json(200, hub.api_refs(repo, flag("include_prs")))
        if method == "GET" and len(rest) == 2 and rest[0] == "commits":
            return self._send_json(200, hub.api_commits(repo, rest[1]))
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._send_json(200, hub.api_preupload(repo, rest[1], self._json_body()))
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            result = hub.api_commit(repo, user, rest[1], self._read_body(), create_pr=flag("create_pr"))
            return self._send_json(200, result)
        if len(rest) == 2 and rest[0] == "branch":
            if method == "POST":
                return self._send_json(200, hub.api_create_branch(repo, rest[1], self._json_body()))
            if method == "DELETE":
                return self._send_json(200, hub.api_delete_branch(repo, rest[1]))
        if len(rest) == 2 and rest[0] == "tag":
            if method == "POST":
                return self._send_json(200, hub.api_create_tag(repo, rest[1], self._json_body()))
            if method == "DELETE":
                return self._send_json(200, hub.api_delete_tag(repo, rest[1]))
        if rest == ["settings"] and method == "PUT":
            return self._send_json(200, hub.api_update_settings(repo, self._json_body()))
        raise HubError(404, f"Unknown API route {method} /api/{'/'.join(segs)}")

    # ------------------------------------------------------------------ file serving
    def _resolve(self, user: str | None, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, user)
            commit = hub._resolve_revision(repo, revision)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry.lfs:
            headers["ETag"] = f'"{entry.sha256}"'
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        else:
            headers["ETag"] = f'"{entry.git_oid}"'
        self._serve_bytes(hub._object_path(entry.sha256), headers)

    def _serve_bytes(self, file_path: str, headers: dict[str, str]) -> None:
        size = os.path.getsize(file_path)
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(size - int(m.group(2)), 0)
                if start >= size or start > end:
                    raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(file_path, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining:
                data = f.read(min(remaining, _CHUNK))
                if not data:
                    break
                self.wfile.write(data)
                remaining -= len(data)

    def _lfs_upload(self, key: str) -> None:
        hub = self.hub
        with hub._lock:
            expected = hub._upload_keys.get(key)
        if expected is None:
            raise HubError(403, "Invalid or expired upload URL")
        oid, size = expected
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=hub._incoming_dir)
        written = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for data in self._iter_body():
                    digest.update(data)
                    f.write(data)
                    written += len(data)
            if digest.hexdigest() != oid or written != size:
                raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
            os.replace(tmp, hub._object_path(oid))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        with hub._lock:
            hub._upload_keys.pop(key, None)
        self._send(200, b"", headers={"ETag": f'"{oid}"'}, content_type=None)
