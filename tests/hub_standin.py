"""A STAND-IN for the Hugging Face Hub: a local HTTP server with the part of the Hub API that
``huggingface_hub`` (2.x) calls for ``dspec push``. It is not the Hub and only mimics it.

Tests point ``HF_ENDPOINT`` (or ``HfApi(endpoint=...)``) at :attr:`HubStandIn.url`. It runs
``http.server.ThreadingHTTPServer`` in a thread on 127.0.0.1 with a free port and keeps every
repo, branch, commit and file in memory.

Routes, with the shapes ``huggingface_hub`` parses (read from ``hf_api.py`` and ``_commit_api.py``
of huggingface_hub 2.4):

- ``POST /api/repos/create`` (``create_repo``): JSON ``{name, organization, visibility}``; answers
  ``{"url": ...}``, or 409 when the repo exists (``exist_ok=True`` accepts the 409). A new repo
  gets a first commit holding ``.gitattributes``, as on the Hub.
- ``POST /api/models/{repo}/branch/{branch}`` (``create_branch``): 409 when it exists.
- ``POST /api/validate-yaml`` (``create_commit`` sends README.md's metadata here first): 400 with
  ``errors`` when the front matter is not a YAML mapping.
- ``POST /api/models/{repo}/preupload/{revision}`` (``create_commit`` asks how to send each file):
  answers ``uploadMode: "regular"`` for EVERY file, with ``oid`` (the git blob sha1) of the file
  already at that path, so unchanged files are skipped as on the Hub. This is a deliberate
  simplification: the real Hub answers ``"lfs"`` for binary and large files (``*.safetensors``),
  which huggingface_hub then uploads through Xet (``hf_xet`` installed) or the LFS batch API
  before the commit. With ``"regular"`` the content travels base64-encoded inside the commit's
  NDJSON body instead, and huggingface_hub makes no Xet or LFS call at all, so the stand-in needs
  no storage protocol. The push code is the same either way: huggingface_hub picks the path from
  the server's answer, and ``dspec`` passes files by path.
- ``POST /api/models/{repo}/commit/{revision}`` (``create_commit``): NDJSON, a ``header`` line then
  one ``file`` line per file (``deletedFile`` and ``deletedFolder`` too; ``lfsFile`` is refused, see
  above); answers ``{"commitOid", "commitUrl", "success"}``.
- ``GET /api/models/{repo}`` and ``.../revision/{rev}`` (``repo_info``: create_repo calls it after a
  401/403 with ``exist_ok``; create_commit calls it when nothing changed), ``GET .../refs``
  (``list_repo_refs``: create_branch calls it after a 403 with ``exist_ok``), ``GET
  /api/whoami-v2``.

Auth: a request must carry ``Authorization: Bearer <token>`` with a token in ``tokens``
({token: (user, role)}, role ``"write"`` or ``"read"``); else 401 with the Hub's message
``Invalid credentials in Authorization header``. Writing needs role ``write`` and a namespace in
``{user} | orgs``; else 403. Private repos are invisible (404 RepoNotFound) to others.

Failures on demand: :meth:`HubStandIn.fail` makes the next ``times`` requests of a route answer a
status (429 with ``Retry-After``, 5xx, ...). Note that huggingface_hub retries 408/429/5xx on
preupload (``http_backoff``: up to 5 retries with sleeps), but not on create_repo, create_branch or
commit; tests inject failures there to stay fast.

Everything the server saw is kept for assertions: ``requests`` (method, path, route),
``commit_payloads`` (each commit's parsed NDJSON), ``auth_headers``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

GITATTRIBUTES = (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                 b"*.bin filter=lfs diff=lfs merge=lfs -text\n")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha1(data: bytes) -> str:
    """The oid git (and the Hub) gives a regular file; huggingface_hub compares it to skip
    unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, bytes]
    summary: str
    description: str = ""
    changed: list[str] = field(default_factory=list)  # paths this commit added or replaced
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created: str = field(  # the Hub's format, which huggingface_hub parses strictly
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        + "Z")

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An error answer: status, the message the Hub would send, and its X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body if body is not None else {"error": message}


class HubStandIn:
    """Start with ``with HubStandIn(tokens={...}) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None,
                 orgs: set[str] | frozenset[str] = frozenset()):
        self.tokens = dict(tokens or {})
        self.orgs = set(orgs)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.commit_payloads: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self._failures: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> HubStandIn:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True,
                                        name="hub-standin")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls and views ---------------------------------------------------------------
    def fail(self, route: str, status: int, *, times: int = 1, retry_after: int | None = None,
             message: str | None = None) -> None:
        """The next ``times`` requests to ``route`` ("create_repo", "branch", "validate_yaml",
        "preupload", "commit", "repo_info", "refs", "whoami" or "*") answer ``status``."""
        with self._lock:
            self._failures.append({"route": route, "status": status, "times": times,
                                   "retry_after": retry_after, "message": message})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision} in {repo_id}"
        return dict(commit.tree)

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision} in {repo_id}"
        return commit

    def routes(self) -> list[str]:
        return [route for _, _, route in self.requests]

    # -- request handling (called by the handler thread) ---------------------------------------
    def _injected_failure(self, route: str) -> HubError | None:
        with self._lock:
            for f in self._failures:
                if f["times"] > 0 and f["route"] in (route, "*"):
                    f["times"] -= 1
                    status = f["status"]
                    headers = {}
                    if f["retry_after"] is not None:
                        headers["Retry-After"] = str(f["retry_after"])
                    default = {429: "You have been rate-limited; you can retry later.",
                               500: "Internal Error - We're working hard to fix this as soon as "
                                    "possible!",
                               502: "Bad Gateway", 503: "Service Unavailable"}
                    msg = f["message"] or default.get(status, f"Error {status}")
                    return HubError(status, msg, headers=headers)
        return None

    def _user(self, authorization: str | None, required: bool = True) -> tuple[str, str] | None:
        """(user, role) of the bearer token; 401 when missing or unknown (if ``required``)."""
        token = None
        if authorization and authorization.startswith("Bearer "):
            token = authorization[len("Bearer "):]
        if token is None:
            if required:
                raise HubError(401, INVALID_CREDENTIALS)
            return None
        if token not in self.tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return self.tokens[token]

    def _can_write(self, user: tuple[str, str] | None, namespace: str) -> bool:
        return (user is not None and user[1] == "write"
                and namespace in ({user[0]} | self.orgs))

    def _repo(self, repo_id: str, user: tuple[str, str] | None) -> Repo:
        repo = self.repos.get(repo_id)
        visible = repo is not None and (not repo.private or (
            user is not None and repo.repo_id.split("/")[0] in ({user[0]} | self.orgs)))
        if not visible:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, bytes], summary: str,
                    description: str = "", changed=(), deleted=()) -> Commit:
        seed = f"{repo.repo_id}\0{parent}\0{summary}\0{uuid.uuid4()}".encode()
        oid = hashlib.sha1(seed).hexdigest()
        commit = Commit(oid, parent, tree, summary, description, list(changed), list(deleted))
        repo.commits[oid] = commit
        return commit

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        route, args = _route(method, path)
        with self._lock:
            self.requests.append((method, path, route))
            self.auth_headers.append(headers.get("authorization"))
        try:
            failure = self._injected_failure(route)
            if failure:
                raise failure
            with self._lock:  # one request changes the in-memory hub at a time, as in a database
                payload = getattr(self, f"_do_{route}")(headers, body, **args)
            return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()
        except HubError as e:
            out_headers = {"Content-Type": "application/json", "X-Error-Message": e.message,
                           **e.headers}
            if e.code:
                out_headers["X-Error-Code"] = e.code
            return e.status, out_headers, json.dumps(e.body).encode()

    def _do_not_found(self, headers, body):
        raise HubError(404, "Sorry, we can't find the page you are looking for.")

    def _do_whoami(self, headers, body):
        user, role = self._user(headers.get("authorization"))
        return {"type": "user", "name": user, "orgs": [{"name": o} for o in sorted(self.orgs)],
                "auth": {"type": "access_token", "accessToken": {"role": role}}}

    def _do_create_repo(self, headers, body):
        user = self._user(headers.get("authorization"))
        data = json.loads(body or b"{}")
        name, namespace = data.get("name"), data.get("organization") or user[0]
        if data.get("type") not in (None, "model"):
            raise HubError(400, "The stand-in only hosts model repos")
        if not self._can_write(user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace '
                                f'"{namespace}"')
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo",
                           body={"error": "You already created this model repo", "url": url})
        private = data.get("visibility") == "private" or bool(data.get("private"))
        repo = Repo(repo_id, private=private, owner=user[0])
        first = self._new_commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit",
                                 changed=[".gitattributes"])
        repo.branches["main"] = first.oid
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]}

    def _do_branch(self, headers, body, repo_id, branch):
        user = self._user(headers.get("authorization"))
        repo = self._repo(repo_id, user)
        if not self._can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have write access to {repo_id}")
        if branch.startswith("refs/") or not branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        commit = repo.resolve(start)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {start}", code="RevisionNotFound")
        repo.branches[branch] = commit.oid
        return {}

    def _do_validate_yaml(self, headers, body):
        content = json.loads(body).get("content", "")
        errors = []
        if content.startswith("---\n"):
            end = content.find("\n---", 4)
            if end < 0:
                errors.append("YAML front matter is not closed by ---")
            else:
                try:
                    import yaml

                    meta = yaml.safe_load(content[4:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append("YAML metadata is not a mapping")
                    elif meta and not isinstance(meta.get("tags", []), list):
                        errors.append('"tags" must be an array')
                except Exception as e:  # a YAML error: the Hub answers 400 with the message
                    errors.append(f"YAML could not be parsed: {e}")
        if errors:
            raise HubError(400, "Invalid metadata in README.md", body={
                "error": "Invalid metadata in README.md",
                "errors": [{"message": m} for m in errors], "warnings": []})
        return {"errors": [], "warnings": []}

    def _do_preupload(self, headers, body, repo_id, revision):
        user = self._user(headers.get("authorization"))
        repo = self._repo(repo_id, user)
        if not self._can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have write access to {repo_id}")
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        files = []
        for f in json.loads(body).get("files", []):
            existing = commit.tree.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha1(existing) if existing is not None else None})
        return {"files": files, "commitOid": commit.oid}

    def _do_commit(self, headers, body, repo_id, revision):
        user = self._user(headers.get("authorization"))
        repo = self._repo(repo_id, user)
        if not self._can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have write access to {repo_id}")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        parent = repo.commits[repo.branches[revision]]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree, changed, deleted = dict(parent.tree), [], []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "file content must be base64-encoded")
                tree[value["path"]] = base64.b64decode(value["content"])
                changed.append(value["path"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
                deleted.append(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(prefix)]:
                    tree.pop(p)
                    deleted.append(p)
            elif key == "lfsFile":
                raise HubError(400, "the stand-in answers uploadMode=regular: no LFS files")
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._new_commit(repo, parent.oid, tree, header.get("summary", ""),
                                  header.get("description", ""), changed, deleted)
        repo.branches[revision] = commit.oid
        self.commit_payloads.append({"repo_id": repo_id, "revision": revision,
                                     "header": header, "operations": lines[1:],
                                     "oid": commit.oid})
        return {"success": True, "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "hookOutput": ""}

    def _do_repo_info(self, headers, body, repo_id, revision=None):
        user = self._user(headers.get("authorization"), required=False)
        repo = self._repo(repo_id, user)
        commit = repo.resolve(revision or "main")
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                "author": repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "createdAt": repo.created, "lastModified": repo.created,
                "siblings": [{"rfilename": p} for p in sorted(commit.tree)]}

    def _do_refs(self, headers, body, repo_id):
        user = self._user(headers.get("authorization"), required=False)
        repo = self._repo(repo_id, user)
        return {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                             for b, oid in sorted(repo.branches.items())],
                "converts": [], "tags": [], "pullRequests": []}


def _route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """(route name, arguments) of a request path; segments are URL-decoded after splitting, so a
    branch quoted as ``feature%2Fx`` stays one segment."""
    parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
    if method == "POST" and parts == ["api", "repos", "create"]:
        return "create_repo", {}
    if method == "POST" and parts == ["api", "validate-yaml"]:
        return "validate_yaml", {}
    if method == "GET" and parts == ["api", "whoami-v2"]:
        return "whoami", {}
    if len(parts) >= 4 and parts[:2] == ["api", "models"]:
        repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
        if method == "POST" and len(rest) == 2 and rest[0] in ("branch", "preupload", "commit"):
            key = "branch" if rest[0] == "branch" else "revision"
            return rest[0], {"repo_id": repo_id, key: rest[1]}
        if method == "GET" and not rest:
            return "repo_info", {"repo_id": repo_id}
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return "repo_info", {"repo_id": repo_id, "revision": rest[1]}
        if method == "GET" and rest == ["refs"]:
            return "refs", {"repo_id": repo_id}
    return "not_found", {}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's shared client expects
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, payload = self.hub.handle(self.command, self.path, headers, body)
        self.send_response(status)
        for k, v in out_headers.items():
            self.send_header(k, v)
        self.send_header("X-Request-Id", uuid.uuid4().hex)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args):  # quiet: pytest captures enough
        pass
