"""A small, in-memory Hugging Face Hub look-alike for tests (standard library only).

It speaks enough of the Hub's HTTP API for the *real* ``huggingface_hub`` client to push a folder
(``create_repo`` + ``upload_folder`` / ``create_commit`` / ``ModelHubMixin.push_to_hub``) and to read it
back by repo id (``snapshot_download``, ``hf_hub_download``, ``model_info`` / ``repo_info``,
``list_repo_files`` / ``list_repo_tree``, ``get_paths_info``, ``file_exists``, ``list_repo_refs``,
``list_repo_commits``, ``create_branch``, ``create_tag``, ``delete_repo``, ``whoami``), for any branch,
tag or commit sha.

Every upload is answered with the "regular" upload mode, so file contents arrive base64-encoded inside the
NDJSON commit payload: the client never goes down the Git-LFS or Xet path (this holds for files of any size,
also when ``hf_xet`` is installed). Blobs, commits and refs live in memory; each commit is an immutable
snapshot, so an old commit sha keeps serving the old content.

Auth mimics the Hub: reads of public repos need no token; every write (create/delete repo, preupload,
commit, branch, tag) without an ``Authorization: Bearer ...`` header gets ``401``. Any token is accepted
unless ``LocalHub(tokens={...})`` restricts them. Missing repos answer ``X-Error-Code: RepoNotFound`` (401
without a token, 404 with one, like the Hub), missing files ``EntryNotFound`` and unknown revisions
``RevisionNotFound``, so the client raises ``RepositoryNotFoundError`` / ``EntryNotFoundError`` /
``RevisionNotFoundError``. URLs inside JSON answers (``create_repo``'s ``url``, a commit's ``commitUrl``) use
the canonical ``https://huggingface.co`` host, exactly as the real Hub does behind a mirror; the client
rewrites them to its endpoint (needed by huggingface_hub 0.x, whose ``CommitInfo`` parses that URL).

Pointing the client at the server
---------------------------------
``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_CACHE`` / ``HF_HOME`` **once, at import time**, into
``huggingface_hub.constants`` (and the module-level ``huggingface_hub.upload_folder`` & co. are bound to an
``HfApi`` instance created at import). Setting the environment variables inside an already running pytest
process therefore has no effect. Three ways that work:

1. Explicit arguments (no global state): ``HfApi(endpoint=hub.endpoint, token=...)`` and
   ``snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=...)`` /
   ``hf_hub_download(..., endpoint=hub.endpoint)``.
2. In-process, for code that relies on the client's own configuration (``HfApi()``,
   ``snapshot_download(repo_id)``, ``ModelHubMixin.push_to_hub`` / ``from_pretrained``)::

       with LocalHub() as hub, use_local_hub(hub, hf_home=tmp_path / "hf"):
           pipeline.push_to_hub("test-user/tiny", token=hub.token)
           loaded = VQPipeline.from_pretrained("test-user/tiny")

   ``use_local_hub`` sets ``HF_ENDPOINT`` / ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_TOKEN`` in ``os.environ``
   (for subprocesses and libraries that read them late) *and* patches the values ``huggingface_hub``
   already derived from them at import (``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
   ``constants.HF_HUB_CACHE``, token paths, ``huggingface_hub.hf_api.api.endpoint``); everything is
   restored on exit. As a pytest fixture::

       @pytest.fixture
       def local_hub(tmp_path):
           with LocalHub() as hub, use_local_hub(hub, hf_home=tmp_path / "hf"):
               yield hub

3. A subprocess started with ``env={**os.environ, **hub_env(hub, hf_home=...)}``: there the real
   ``HF_ENDPOINT`` mechanism is used unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import itertools
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "LocalHub", "git_blob_sha1", "hub_env", "use_local_hub"]

DEFAULT_TOKEN = "hf_localhub_test_token"
DEFAULT_USER = "test-user"

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Path segment that follows "<namespace>/<name>" in /api/<type>s/... routes.
_ACTIONS = {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "tag"}
_DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob: what the Hub uses as ETag / ``oid`` of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path in repo -> blob oid (git sha1)
    changed: list[str]  # paths added, modified or deleted by this commit


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Branch, tag or full commit sha -> commit sha (None when unknown)."""
        for name in (revision, revision.removeprefix("refs/heads/"), revision.removeprefix("refs/tags/")):
            if name in self.branches:
                return self.branches[name]
            if name in self.tags:
                return self.tags[name]
        return revision if revision in self.commits else None


class LocalHub:
    """In-memory Hub-compatible HTTP server on ``127.0.0.1`` in a background thread.

    Use as a context manager (``with LocalHub() as hub: ...``) or call :meth:`start` / :meth:`stop`.

    Args:
        user: namespace used when a repo is created without one, and the name returned by ``whoami``.
        token: the token tests are expected to use (``hub.token``); any token is accepted unless
            ``tokens`` is given.
        tokens: if given, only these tokens are valid; other tokens get 401 "Invalid credentials".
        host, port: where to listen (``port=0`` picks a free port).
        initial_gitattributes: like the Hub, new repos start with a commit holding a ``.gitattributes``
            file; if False, ``main`` points to an empty initial commit instead.
    """

    def __init__(
        self,
        *,
        user: str = DEFAULT_USER,
        token: str = DEFAULT_TOKEN,
        tokens: set[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        initial_gitattributes: bool = True,
    ) -> None:
        self.user = user
        self.token = token
        self.tokens = set(tokens) if tokens is not None else None
        self.initial_gitattributes = initial_gitattributes
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._counter = itertools.count()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        #: ``(method, path)`` of every request received (path without query string).
        self.requests: list[tuple[str, str]] = []
        #: ``(method, path)`` of requests no route matched (answered 404): handy to spot missing endpoints.
        self.unhandled: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (what ``HF_ENDPOINT`` / ``endpoint=`` expect)."""
        return f"http://{self._host}:{self.port}"

    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        server = http.server.ThreadingHTTPServer((self._host, self._port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Close idle keep-alive connections so their handler threads end now.
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ direct (non-HTTP) access for tests

    def url_for(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> None:
        """Create a repo directly (no HTTP); raises ``ValueError`` if it exists."""
        if "/" not in repo_id:
            repo_id = f"{self.user}/{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = _Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now())
            self._repos[(repo_type, repo_id)] = repo
            files = {".gitattributes": _DEFAULT_GITATTRIBUTES} if self.initial_gitattributes else {}
            repo.branches["main"] = self._new_commit(repo, None, files, [], "initial commit", "")

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        deletions: tuple[str, ...] = (),
        message: str = "Commit from LocalHub.commit_files",
        revision: str = "main",
        repo_type: str = "model",
        create: bool = True,
    ) -> str:
        """Commit files directly (no HTTP), creating the repo if needed; returns the new commit sha."""
        with self._lock:
            if create and (repo_type, repo_id) not in self._repos:
                self.create_repo(repo_id, repo_type=repo_type)
            repo = self._get_repo(repo_type, repo_id, authenticated=True)
            return self._apply_commit(repo, revision, files, list(deletions), [], message, "", None)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` points to."""
        with self._lock:
            return self._resolve(self._get_repo(repo_type, repo_id, authenticated=True), revision)

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, authenticated=True)
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, authenticated=True)
            return self._blobs[repo.commits[self._resolve(repo, revision)].files[path]]

    def commit_log(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """Commits reachable from ``revision``, newest first: ``{"oid", "title", "changed"}``."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, authenticated=True)
            return [
                {"oid": c.oid, "title": c.title, "changed": list(c.changed)}
                for c in self._history(repo, self._resolve(repo, revision))
            ]

    # ------------------------------------------------------------------ model helpers

    def _get_repo(self, repo_type: str, repo_id: str, *, authenticated: bool) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authenticated):
            # The Hub answers 401 to anonymous requests and 404 to authenticated ones.
            raise _HubError(
                404 if authenticated else 401,
                f"Repository Not Found: {repo_type} {repo_id}",
                "RepoNotFound",
            )
        return repo

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    @staticmethod
    def _history(repo: _Repo, sha: str | None) -> Iterator[_Commit]:
        while sha is not None:
            commit = repo.commits[sha]
            yield commit
            sha = commit.parent

    def _new_commit(
        self, repo: _Repo, parent: str | None, added: dict[str, bytes], deleted: list[str], title: str, message: str
    ) -> str:
        files = dict(repo.commits[parent].files) if parent is not None else {}
        changed = []
        for path in deleted:
            files.pop(path, None)
            changed.append(path)
        for path, data in added.items():
            oid = git_blob_sha1(data)
            self._blobs[oid] = data
            if files.get(path) != oid:
                changed.append(path)
            files[path] = oid
        seed = json.dumps([repo.repo_id, parent, sorted(files.items()), title, next(self._counter), _now()])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, parent, title, message, _now(), files, changed)
        return sha

    def _apply_commit(
        self,
        repo: _Repo,
        revision: str,
        added: dict[str, bytes],
        deleted_files: list[str],
        deleted_folders: list[str],
        title: str,
        message: str,
        parent_commit: str | None,
    ) -> str:
        branch = revision.removeprefix("refs/heads/")
        if branch not in repo.branches:
            if repo.resolve(revision) is not None:
                raise _HubError(400, f"Can only commit to a branch, not to {revision!r}")
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = repo.branches[branch]
        if parent_commit is not None and parent_commit != head:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        current = repo.commits[head].files
        deleted: list[str] = []
        for path in deleted_files:
            if path not in current:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            deleted.append(path)
        for folder in deleted_folders:
            prefix = folder.strip("/") + "/"
            matched = [p for p in current if p.startswith(prefix)]
            if not matched:
                raise _HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            deleted.extend(matched)
        for path in [*added, *deleted]:
            _check_path(path)
        sha = self._new_commit(repo, head, added, deleted, title, message)
        repo.branches[branch] = sha
        return sha

    # ------------------------------------------------------------------ JSON views

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any] | None:
        files = commit.files
        if path in files:
            oid = files[path]
            entry: dict[str, Any] = {"type": "file", "oid": oid, "size": len(self._blobs[oid]), "path": path}
            if expand:
                last = commit
                for older in self._history(repo, commit.parent):
                    if older.files.get(path) != oid:
                        break
                    last = older
                entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
            return entry
        prefix = path + "/"
        inside = sorted((p, o) for p, o in files.items() if p.startswith(prefix))
        if not inside:
            return None
        tree_oid = hashlib.sha1(json.dumps(inside).encode()).hexdigest()
        return {"type": "directory", "oid": tree_oid, "size": 0, "path": path}

    def _tree(self, repo: _Repo, commit: _Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        path = path.strip("/")
        if path and path in commit.files:
            return [self._entry(repo, commit, path, expand)]  # type: ignore[list-item]
        prefix = path + "/" if path else ""
        names: set[str] = set()
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                names.add(prefix + "/".join(parts[:i]))
        if path and not names:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return [self._entry(repo, commit, name, expand) for name in sorted(names)]  # type: ignore[misc]

    def _repo_info(self, repo: _Repo, sha: str, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[sha]
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(self._blobs[commit.files[path]]), blobId=commit.files[path])
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self._blobs[o]) for o in set(commit.files.values())),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    # ------------------------------------------------------------------ HTTP routing

    def _route(self, method: str, path: str, query: dict[str, list[str]], token: str | None, body: bytes):
        """Returns ``(status, headers, payload)``; payload is bytes or a JSON-able object."""
        if self.tokens is not None and token is not None and token not in self.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        segments = path.split("/")[1:]  # still percent-encoded
        if segments and segments[0] == "api":
            return self._route_api(method, segments[1:], query, token, body)
        if method in ("GET", "HEAD"):
            return self._route_resolve(method, segments, token)
        raise _NoRoute()

    def _route_api(self, method, segments, query, token, body):
        authenticated = token is not None
        head = "/".join(segments)
        if head == "whoami-v2" and method == "GET":
            _require_token(token)
            return 200, {}, {
                "type": "user",
                "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                "name": self.user,
                "fullname": self.user,
                "email": None,
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
            }
        if head == "validate-yaml" and method == "POST":
            return 200, {}, {"errors": [], "warnings": []}
        if head == "agent-harnesses" and method == "GET":  # fetched once per process by the client
            return 200, {}, {"standardEnvVars": [], "harnesses": {}}
        if segments and segments[0] == "telemetry":
            return 200, {}, {}
        if head in ("repos/create", "repos/delete") and method in ("POST", "DELETE"):
            _require_token(token)
            payload = _json(body)
            name, org = payload.get("name"), payload.get("organization")
            if not name or "/" in name:
                raise _HubError(400, f"Invalid repo name: {name!r}")
            repo_type = payload.get("type") or "model"
            if repo_type not in _URL_PREFIX:
                raise _HubError(400, f"Invalid repo type: {repo_type!r}")
            repo_id = f"{org or self.user}/{name}"
            url = _canonical_url(repo_id, repo_type)
            with self._lock:
                if head == "repos/delete":
                    if method != "DELETE":
                        raise _NoRoute()
                    self._get_repo(repo_type, repo_id, authenticated=True)
                    del self._repos[(repo_type, repo_id)]
                    return 200, {}, {}
                if method != "POST":
                    raise _NoRoute()
                if (repo_type, repo_id) in self._repos:
                    raise _HubError(409, f"You already created this {repo_type} repo", headers={"_url": url})
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                self.create_repo(repo_id, private=private, repo_type=repo_type)
            return 200, {}, {"url": url, "name": repo_id, "id": self._repos[(repo_type, repo_id)].repo_id}
        if not segments or segments[0] not in _API_TYPES:
            raise _NoRoute()
        repo_type = _API_TYPES[segments[0]]
        rest = segments[1:]
        if len(rest) >= 3 and rest[2] in _ACTIONS:
            repo_id, action, args = f"{rest[0]}/{rest[1]}", rest[2], rest[3:]
        elif len(rest) >= 2 and rest[1] in _ACTIONS:
            repo_id, action, args = rest[0], rest[1], rest[2:]
        elif 1 <= len(rest) <= 2:
            repo_id, action, args = "/".join(rest), None, []
        else:
            raise _NoRoute()
        repo_id = unquote(repo_id)
        args = [unquote(a) for a in args]
        write = action in ("preupload", "commit", "branch", "tag")
        if write:
            _require_token(token)

        with self._lock:
            repo = self._get_repo(repo_type, repo_id, authenticated=authenticated)
            if action is None and method == "GET":
                return 200, {}, self._repo_info(repo, self._resolve(repo, "main"), _flag(query, "blobs"))
            if action == "revision" and method == "GET" and args:
                revision = "/".join(args)
                return 200, {}, self._repo_info(repo, self._resolve(repo, revision), _flag(query, "blobs"))
            if action == "tree" and method == "GET" and args:
                commit = repo.commits[self._resolve(repo, args[0])]
                tree = self._tree(repo, commit, "/".join(args[1:]), _flag(query, "recursive"), _flag(query, "expand"))
                return 200, {}, tree
            if action == "paths-info" and method == "POST" and args:
                commit = repo.commits[self._resolve(repo, "/".join(args))]
                paths, expand = _paths_info_request(body)
                entries = [self._entry(repo, commit, p.strip("/"), expand) for p in paths]
                return 200, {}, [e for e in entries if e is not None]
            if action == "preupload" and method == "POST" and args:
                sha = self._resolve(repo, "/".join(args))
                files = repo.commits[sha].files
                response_files = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": files.get(f["path"].lstrip("/")),
                    }
                    for f in _json(body).get("files", [])
                ]
                return 200, {}, {"files": response_files, "commitOid": sha}
            if action == "commit" and method == "POST" and args:
                if _flag(query, "create_pr"):
                    raise _HubError(400, "LocalHub does not support pull requests (create_pr=True)")
                return self._commit_request(repo, "/".join(args), body)
            if action == "commits" and method == "GET" and args:
                sha = self._resolve(repo, "/".join(args))
                return 200, {}, [
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "date": c.date,
                        "authors": [{"user": self.user}],
                    }
                    for c in self._history(repo, sha)
                ]
            if action == "refs" and method == "GET":
                return 200, {}, {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()
                    ],
                    "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()],
                    "converts": [],
                    "pullRequests": [],
                }
            if action == "branch" and args:
                branch = "/".join(args)
                if method == "POST":
                    if branch in repo.branches:
                        raise _HubError(409, f"Branch {branch} already exists")
                    start = _json(body).get("startingPoint") or "main"
                    repo.branches[branch] = self._resolve(repo, start)
                    return 200, {}, {}
                if method == "DELETE":
                    if branch not in repo.branches or branch == "main":
                        raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                    del repo.branches[branch]
                    return 200, {}, {}
            if action == "tag" and args:
                if method == "POST":
                    tag = _json(body).get("tag")
                    if not tag:
                        raise _HubError(400, "Missing tag name")
                    if tag in repo.tags:
                        raise _HubError(409, f"Tag {tag} already exists")
                    repo.tags[tag] = self._resolve(repo, "/".join(args))
                    return 200, {}, {}
                if method == "DELETE":
                    tag = "/".join(args)
                    if tag not in repo.tags:
                        raise _HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
                    del repo.tags[tag]
                    return 200, {}, {}
        raise _NoRoute()

    def _commit_request(self, repo: _Repo, revision: str, body: bytes):
        header: dict[str, Any] | None = None
        added: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as err:
                raise _HubError(400, f"Malformed NDJSON commit payload: {err}") from None
            if key == "header":
                header = value
            elif key == "file":
                path = value["path"].lstrip("/")
                if value.get("encoding") == "base64":
                    added[path] = base64.b64decode(value["content"])
                else:
                    added[path] = value["content"].encode("utf-8")
            elif key == "deletedFile":
                deleted_files.append(value["path"].lstrip("/"))
            elif key == "deletedFolder":
                deleted_folders.append(value["path"].lstrip("/"))
            elif key == "lfsFile":
                raise _HubError(
                    400, "LocalHub only supports regular uploads (its preupload never answers 'lfs')"
                )
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        if header is None:
            raise _HubError(400, "Missing commit header")
        title = header.get("summary") or "Update"
        sha = self._apply_commit(
            repo,
            revision,
            added,
            deleted_files,
            deleted_folders,
            title,
            header.get("description") or "",
            header.get("parentCommit"),
        )
        return 200, {}, {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{_canonical_url(repo.repo_id, repo.repo_type)}/commit/{sha}",
            "hookOutput": "",
            "pullRequestUrl": None,
        }

    def _route_resolve(self, method: str, segments: list[str], token: str | None):
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type = _API_TYPES[segments[0]]
            segments = segments[1:]
        if len(segments) >= 4 and segments[2] == "resolve":
            repo_id, revision, file_segments = f"{segments[0]}/{segments[1]}", segments[3], segments[4:]
        elif len(segments) >= 3 and segments[1] == "resolve":
            repo_id, revision, file_segments = segments[0], segments[2], segments[3:]
        else:
            raise _NoRoute()
        repo_id, revision = unquote(repo_id), unquote(revision)
        filename = "/".join(unquote(s) for s in file_segments)
        with self._lock:
            repo = self._get_repo(repo_type, repo_id, authenticated=token is not None)
            sha = self._resolve(repo, revision)
            oid = repo.commits[sha].files.get(filename)
            if oid is None:
                raise _HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
            data = self._blobs[oid]
        basename = filename.rsplit("/", 1)[-1]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(basename)}; filename=\"{basename}\"",
        }
        return 200, headers, data


class _NoRoute(Exception):
    pass


def _canonical_url(repo_id: str, repo_type: str) -> str:
    # Like the real Hub (also behind a mirror), URLs in JSON answers use the canonical https://huggingface.co
    # host; the client rewrites it to its configured endpoint. Answering with the LocalHub address instead
    # breaks huggingface_hub 0.x, whose CommitInfo parses the commit URL against HF_ENDPOINT only.
    return f"https://huggingface.co/{_URL_PREFIX[repo_type]}{repo_id}"


def _require_token(token: str | None) -> None:
    if token is None:
        raise _HubError(401, "Unauthorized: a token is required for this operation (write access)")


def _check_path(path: str) -> None:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise _HubError(400, f"Invalid path in repo: {path!r}")


def _flag(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _json(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise _HubError(400, "Request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _HubError(400, "Request body must be a JSON object")
    return value


def _paths_info_request(body: bytes) -> tuple[list[str], bool]:
    """``paths-info`` is sent form-encoded (``paths=a&paths=b&expand=False``); accept JSON too."""
    text = body.decode("utf-8")
    if text.lstrip().startswith("{"):
        payload = _json(body)
        paths = payload.get("paths", [])
        return ([paths] if isinstance(paths, str) else list(paths)), bool(payload.get("expand"))
    form = parse_qs(text)
    return form.get("paths", []), _flag(form, "expand")


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: LocalHub  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60  # idle keep-alive connections are dropped after this many seconds
    server_version = "LocalHub/1.0"

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._sockets.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.hub._lock:
            self.hub._sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path = split.path
        with hub._lock:
            hub.requests.append((method, path))
        try:
            body = self._read_body()
            status, headers, payload = hub._route(method, path, parse_qs(split.query), self._token(), body)
        except _NoRoute:
            with hub._lock:
                hub.unhandled.append((method, path))
            status, headers = 404, {}
            payload = {"error": f"LocalHub does not implement {method} {path}"}
        except _HubError as err:
            status, headers = err.status, dict(err.headers)
            payload = {"error": err.message}
            if "_url" in headers:
                payload["url"] = headers.pop("_url")
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
        except Exception as err:  # pragma: no cover - surfaces server bugs to the client
            status, headers, payload = 500, {}, {"error": f"LocalHub internal error: {err!r}"}
        self._send(method, status, headers, payload)

    def _send(self, method: str, status: int, headers: dict[str, str], payload: Any) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode("utf-8")
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        start, end = 0, len(data)
        range_header = self.headers.get("Range")
        if range_header and status == 200 and isinstance(payload, bytes):
            parsed = _parse_range(range_header, len(data))
            if parsed is None:
                status, data = 416, b""
                headers["Content-Range"] = f"bytes */{len(payload)}"
            else:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if method != "HEAD":
                view = memoryview(data)[start:end]
                for offset in range(0, len(view), 1 << 20):
                    self.wfile.write(view[offset : offset + (1 << 20)])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """Single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range -> half-open ``(start, end)``."""
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            start, end = max(size - int(last), 0), size
        else:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    return (start, end) if 0 <= start < end or (start == end == size == 0) else None


# ---------------------------------------------------------------------- pointing the client at a LocalHub


def hub_env(hub: LocalHub, hf_home: str | os.PathLike, token: str | None = DEFAULT_TOKEN) -> dict[str, str]:
    """Environment variables that point a *fresh* process's ``huggingface_hub`` at ``hub``.

    Use for subprocesses: ``subprocess.run(..., env={**os.environ, **hub_env(hub, tmp_path / "hf")})``.
    ``HF_HOME`` is ``hf_home`` and the download cache (``HF_HUB_CACHE``) is ``hf_home/hub``. With
    ``token=None`` no ``HF_TOKEN`` is set (and none is read from the real ``~/.cache/huggingface``, since
    ``HF_HOME`` is moved). Setting these in ``os.environ`` of the *current* process is not enough, as
    ``huggingface_hub`` reads them at import: use :func:`use_local_hub` in-process.
    """
    home = Path(hf_home)
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@contextlib.contextmanager
def use_local_hub(
    hub: LocalHub, hf_home: str | os.PathLike, token: str | None = DEFAULT_TOKEN
) -> Iterator[LocalHub]:
    """Point the already-imported ``huggingface_hub`` of this process at ``hub``; restore everything on exit.

    Inside the block, code that calls ``HfApi()``, ``huggingface_hub.upload_folder`` / ``create_repo``,
    ``snapshot_download(repo_id)`` or ``hf_hub_download(repo_id, filename)`` without ``endpoint=`` /
    ``cache_dir=`` talks to ``hub`` and caches under ``hf_home/hub``. The token is taken from
    ``HF_TOKEN`` (= ``token``; ``None`` means anonymous: ``HF_TOKEN`` is removed and the token files are
    moved under ``hf_home``). ``os.environ`` gets :func:`hub_env` so subprocesses inherit it too.

    This patches the values ``huggingface_hub`` computed from the environment at import time, because it
    never re-reads ``HF_ENDPOINT``: ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``
    (used by ``hf_hub_url``), ``constants.HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_TOKEN_PATH`` /
    ``HF_STORED_TOKENS_PATH`` and every other ``constants`` path under the old ``HF_HOME`` (re-rooted under
    ``hf_home``), the copies of those values other ``huggingface_hub.*`` modules imported by name,
    ``constants.HF_HUB_OFFLINE`` (forced off) and the endpoint of the module-level ``HfApi`` behind
    ``huggingface_hub.upload_folder`` & co. Works with huggingface_hub 0.3x and 1.x/2.x.
    Not thread-safe with respect to other tests running concurrently in the same process.
    """
    from huggingface_hub import constants, hf_api

    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    env = hub_env(hub, home, token)
    new_values: dict[str, Any] = {}
    # Re-root every path derived from HF_HOME at import (token files, xet cache, agent registry, ...), so
    # nothing is read from or written to the real ~/.cache/huggingface.
    old_home = str(getattr(constants, "HF_HOME", "") or "")
    if old_home:
        for name, value in vars(constants).items():
            if name.isupper() and isinstance(value, str) and (value + os.sep).startswith(old_home + os.sep):
                new_values[name] = str(home) + value[len(old_home) :]
    new_values.update(
        ENDPOINT=hub.endpoint,
        HUGGINGFACE_CO_URL_TEMPLATE=hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HUGGINGFACE_HUB_CACHE=str(home / "hub"),  # old alias
        HF_TOKEN_PATH=str(home / "token"),
        HF_STORED_TOKENS_PATH=str(home / "stored_tokens"),
    )
    attrs: dict[tuple[Any, str], Any] = {(constants, name): value for name, value in new_values.items()}
    attrs[(constants, "HF_HUB_OFFLINE")] = False
    attrs[(hf_api.api, "endpoint")] = hub.endpoint
    # Some modules copied constants at import (`from .constants import ENDPOINT`; in huggingface_hub 0.x
    # `file_download.HUGGINGFACE_CO_URL_TEMPLATE` is what `hf_hub_url` uses): patch those copies too.
    for module_name, module in list(sys.modules.items()):
        if module is None or module is constants or not module_name.startswith("huggingface_hub"):
            continue
        namespace = vars(module)  # not getattr: the package's lazy __getattr__ would import submodules
        for name, value in new_values.items():
            old = getattr(constants, name, None)
            if isinstance(old, str) and namespace.get(name) == old:
                attrs[(module, name)] = value
    missing = object()
    saved_attrs = {key: getattr(key[0], key[1], missing) for key in attrs}
    env_keys = [*env, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
    saved_env = {key: os.environ.get(key) for key in env_keys}
    try:
        for (obj, name), value in attrs.items():
            if saved_attrs[(obj, name)] is not missing:
                setattr(obj, name, value)
        os.environ.pop("HF_TOKEN", None)
        os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
        os.environ.update(env)
        yield hub
    finally:
        for (obj, name), value in saved_attrs.items():
            if value is not missing:
                setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
