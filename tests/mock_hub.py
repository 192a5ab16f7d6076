"""A minimal Hugging Face hub on 127.0.0.1 that serves model repos from local folders.

It handles the requests that huggingface_hub 2.4 and transformers 5.25 send while
they download and load a model:

- HEAD and GET /{repo_id}/resolve/{revision}/{path}: the file, with ETag (its sha256),
  X-Repo-Commit and Content-Length. The hub's redirect to a CDN is left out.
- GET /api/models/{repo_id}/tree/{revision}[/{path}]: the files and folders under a path.
- GET /api/models/{repo_id} and /api/models/{repo_id}/revision/{revision}: the repo's
  commit and file list.

A revision is a branch name of the repo or the 40-digit commit hash of that branch.
Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo), so huggingface_hub raises the same exception types as for
the real hub. A gated repo serves its info, as the hub does, and returns 401 to file
and tree requests, as the hub does for a user who has not accepted its licence.
Every request is recorded in `MockHub.requests` with the status it received.
"""

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class HubRequest:
    """A request that the server received, with the HTTP status it sent back.

    repo_id, revision and path are None where the route has none.
    """

    method: str
    url: str
    route: str  # "resolve", "tree", "info" or "unknown"
    status: int
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None


def commit_hash(repo_id: str, branch: str) -> str:
    """Return the fake commit hash that the server reports for `branch` of `repo_id`."""
    return hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()


class MockHub:
    """Serve `repos` ({repo_id: {branch: folder}}) on 127.0.0.1 at a free port, in a daemon thread.

    Repos named in `gated` reject file and tree requests. Use it as a context manager,
    or call `start` and `stop`.
    """

    def __init__(self, repos: dict[str, dict[str, Path]], gated: tuple[str, ...] = ()):
        self.repos = {repo_id: {branch: Path(folder) for branch, folder in branches.items()}
                      for repo_id, branches in repos.items()}
        self.gated = set(gated)
        self.requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "MockHub":
        hub = self

        class Handler(_HubHandler):
            mock = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "MockHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def requests_for(self, repo_id: str) -> list[HubRequest]:
        """Return the recorded requests for `repo_id`, in the order they arrived."""
        with self._lock:
            return [request for request in self.requests if request.repo_id == repo_id]

    def _record(self, request: HubRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _branch(self, repo_id: str, revision: str) -> str | None:
        """Return the branch that `revision` (a branch name or its commit hash) refers to, or None."""
        for branch in self.repos[repo_id]:
            if revision in (branch, commit_hash(repo_id, branch)):
                return branch
        return None


class _HubHandler(BaseHTTPRequestHandler):
    mock: MockHub
    server_version = "MockHub/1.0"
    # (route, repo_id, revision, path) of the current request, set by _handle
    route: tuple = ("unknown", None, None, None)

    def log_message(self, format, *args):
        # Every request is recorded in MockHub.requests, so nothing is written to stderr.
        pass

    def send_response(self, code, message=None):
        # Recorded before the body is sent, so a client that has its response finds its request in the list.
        route, repo_id, revision, path = self.route
        self.mock._record(HubRequest(self.command, self.path, route, code, repo_id, revision, path))
        super().send_response(code, message)

    def do_HEAD(self):
        self._handle(send_body=False)

    def do_GET(self):
        self._handle(send_body=True)

    # --- routing ------------------------------------------------------------------------

    def _handle(self, send_body: bool) -> None:
        self.send_body = send_body
        # Segments are split before unquoting, so an encoded "/" in a revision stays inside its segment.
        segments = [unquote(part) for part in urlsplit(self.path).path.split("/")[1:]]
        is_api = segments[:2] == ["api", "models"]

        if len(segments) >= 5 and segments[2] == "resolve":
            self.route = ("resolve", "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
            self._resolve(*self.route[1:])
        elif len(segments) >= 6 and is_api and segments[4] == "tree":
            self.route = ("tree", "/".join(segments[2:4]), segments[5], "/".join(segments[6:]))
            self._tree(*self.route[1:])
        elif len(segments) == 4 and is_api:
            self.route = ("info", "/".join(segments[2:4]), "main", None)
            self._info(*self.route[1:3])
        elif len(segments) == 6 and is_api and segments[4] == "revision":
            self.route = ("info", "/".join(segments[2:4]), segments[5], None)
            self._info(*self.route[1:3])
        else:
            self.route = ("unknown", None, None, None)
            self._error(404, None, "Not Found")

    def _folder(self, repo_id: str, revision: str, files: bool = True) -> tuple[Path, str] | None:
        """Return the folder and commit of `revision`, or send the hub's error and return None.

        `files` is False for the info route, which a gated repo serves.
        """
        if repo_id not in self.mock.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        branch = self.mock._branch(repo_id, revision)
        if branch is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return None
        if files and repo_id in self.mock.gated:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                          "and be authenticated to access it. Please log in.")
            return None
        return self.mock.repos[repo_id][branch], commit_hash(repo_id, branch)

    # --- routes -------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        found = self._folder(repo_id, revision)
        if found is None:
            return
        folder, commit = found
        file = folder / path
        if not path or not file.is_file():
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit=commit)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.send_body:
            self.wfile.write(data)

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        found = self._folder(repo_id, revision)
        if found is None:
            return
        folder, commit = found
        base = folder / path if path else folder
        if not base.is_dir():
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit=commit)
            return
        recursive = self._query_flag("recursive")
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        self._json([_tree_entry(child, folder) for child in children], commit)

    def _info(self, repo_id: str, revision: str) -> None:
        found = self._folder(repo_id, revision, files=False)
        if found is None:
            return
        folder, commit = found
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self._json({
            "id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "disabled": False,
            "gated": "manual" if repo_id in self.mock.gated else False, "tags": [],
            "siblings": [{"rfilename": name} for name in files],
        }, commit)

    # --- responses ----------------------------------------------------------------------

    def _query_flag(self, name: str) -> bool:
        query = urlsplit(self.path).query
        pairs = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        return pairs.get(name, "").lower() in ("1", "true")

    def _json(self, payload, commit: str) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.send_body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.send_body:
            self.wfile.write(body)


def _tree_entry(path: Path, root: Path) -> dict:
    relative = path.relative_to(root).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(relative.encode()).hexdigest(), "size": 0, "path": relative}
    data = path.read_bytes()
    # The git blob id, as the hub reports it for a file outside LFS.
    blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return {"type": "file", "oid": blob_id, "size": len(data), "path": relative}
