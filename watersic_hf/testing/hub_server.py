"""A loopback fake of the Hugging Face Hub, for push/pull tests without the network.

:class:`FakeHubServer` listens on ``127.0.0.1`` only, on a free port, in a background thread, and
stops by itself after ``lifetime_s`` seconds (or on :meth:`FakeHubServer.stop` / leaving the
``with`` block). It implements the endpoints that ``huggingface_hub`` (2.x) calls for
``create_repo``, ``create_commit`` / ``upload_folder`` (and so ``PreTrainedModel.push_to_hub``) and
for ``hf_hub_download`` / ``from_pretrained``:

* ``POST /api/repos/create``: create a model repo (409 if it exists);
* ``GET /api/whoami-v2``: the fake user;
* ``GET /api/models/{repo}[/revision/{rev}]``: repo info with the file list;
* ``POST /api/validate-yaml``: parses a README's YAML front matter;
* ``POST /api/models/{repo}/preupload/{rev}``: "regular" or "lfs" upload mode per file;
* ``POST /{repo}.git/info/lfs/objects/batch``: LFS batch API, "basic" transfer only;
* ``PUT /_lfs/objects/{oid}`` and ``POST /_lfs/verify``: LFS upload (sha256 and size checked);
* ``POST /api/models/{repo}/commit/{rev}``: ndjson commit of base64 files, LFS files, deletions;
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: file download with the Hub's headers.

Only model repos and the ``main`` branch are supported (downloads also accept a commit id). Xet
storage is not implemented: clients must run with ``HF_HUB_DISABLE_XET=1`` (:func:`hub_env` sets
it), which makes ``huggingface_hub`` use the LFS protocol. Writes need ``Authorization: Bearer
<token>``. Unknown requests get a 404 and are recorded in :attr:`FakeHubServer.unhandled`, so a test
can assert that the client used no endpoint the fake does not know.

Example::

    with FakeHubServer() as hub:
        env = {**os.environ, **hub_env(hub, tmp_path / "hf_home")}
        subprocess.run([sys.executable, "push.py"], env=env, check=True)   # HF_ENDPOINT -> hub.url
        files = hub.files("watersic-tester/my-model")                      # {path: bytes}
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

__all__ = ["FakeHubServer", "hub_env"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._\-]*"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/_lfs/objects/(?P<oid>[0-9a-f]{64})"), "lfs_put"),
    ("POST", re.compile(r"/_lfs/verify"), "lfs_verify"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]

# Files the real Hub stores in LFS by default (its standard .gitattributes), plus anything >= 10
# MiB.
_LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".onnx",
    ".npy",
    ".npz",
    ".pkl",
    ".msgpack",
    ".model",
    ".zip",
    ".gz",
    ".tar",
    ".parquet",
    ".arrow",
)
_LFS_THRESHOLD = 10 * 1024 * 1024


def _git_sha1(data: bytes) -> str:
    """git's blob id, sha1 of ``b"blob <len>\\0" + data``: the oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One file in a commit: its bytes and whether it was committed through LFS."""

    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """The id huggingface_hub compares to skip unchanged files (LFS: sha256, else git sha1)."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else _git_sha1(self.data)


@dataclass
class _Repo:
    repo_id: str
    private: bool
    # (commit id, summary, files at that commit); the last entry is the head of ``main``.
    commits: list[tuple[str, str, dict[str, StoredFile]]] = field(default_factory=list)

    def snapshot(self, revision: str) -> tuple[str, dict[str, StoredFile]] | None:
        if revision == "main":
            oid, _, files = self.commits[-1]
            return oid, files
        for oid, _, files in self.commits:
            if oid == revision or (len(revision) >= 7 and oid.startswith(revision)):
                return oid, files
        return None


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        payload: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.payload = payload or {}


class FakeHubServer:
    """A bounded, loopback-only fake of the Hub's upload and download endpoints.

    Args:
        user (`str`, *optional*, defaults to ``"watersic-tester"``): the namespace of repos created
            without one, and the ``whoami`` name.
        token (`str`, *optional*, defaults to ``"hf_fake_watersic_token"``): the only bearer token
            accepted for writes and private reads.
        lifetime_s (`float`, *optional*, defaults to 300): the server stops by itself after this
            many seconds.
        max_body_bytes (`int`, *optional*, defaults to 512 MiB): larger requests get 413.
        lfs (`bool`, *optional*, defaults to True): answer "lfs" in preupload for weight files and
            large files, as the real Hub does; False uploads everything inline (base64 in the
            commit).
    """

    def __init__(
        self,
        *,
        user: str = "watersic-tester",
        token: str = "hf_fake_watersic_token",
        lifetime_s: float = 300.0,
        max_body_bytes: int = 512 * 1024 * 1024,
        lfs: bool = True,
    ) -> None:
        if lifetime_s <= 0:
            raise ValueError(f"lifetime_s must be > 0, got {lifetime_s}")
        self.user = user
        self.token = token
        self.lifetime_s = float(lifetime_s)
        self.max_body_bytes = int(max_body_bytes)
        self.lfs = lfs
        self.requests: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._lfs_store: dict[str, bytes] = {}
        self._lfs_expected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = threading.Event()

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the value for ``HF_ENDPOINT``."""
        if self._httpd is None:
            raise RuntimeError(
                "the server is not started; call start() or use it as a context manager"
            )
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHubServer:
        """Bind ``127.0.0.1:0``; serve in a daemon thread until :meth:`stop` or ``lifetime_s``."""
        if self._httpd is not None:
            raise RuntimeError("the server is already started")
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fake-hub",
            daemon=True,
        )
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        logger.info("fake Hub listening on %s for at most %.0f s", self.url, self.lifetime_s)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent; also called by the lifetime timer)."""
        with self._lock:
            if self._stopped.is_set() or self._httpd is None:
                return
            self._stopped.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._httpd is not None and not self._stopped.is_set()

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- inspection
    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path → bytes of every file of ``repo_id`` at ``revision``.

        Raises:
            KeyError: unknown repo or revision.
        """
        return {path: f.data for path, f in self.stored_files(repo_id, revision).items()}

    def stored_files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """Like :meth:`files` but with the LFS flag of each file."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise KeyError(f"no repo {repo_id!r}; repos: {sorted(self._repos)}")
            snap = repo.snapshot(revision)
            if snap is None:
                raise KeyError(f"repo {repo_id!r} has no revision {revision!r}")
            return dict(snap[1])

    def commits(self, repo_id: str) -> list[tuple[str, str]]:
        """``(commit id, summary)`` of every commit of ``repo_id``, oldest first."""
        with self._lock:
            return [(oid, summary) for oid, summary, _ in self._repos[repo_id].commits]

    # ----------------------------------------------------------------- request handling
    def _authorized(self, headers: Any) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def _require_auth(self, headers: Any) -> None:
        if not self._authorized(headers):
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, headers: Any) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(headers)):
            raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    @staticmethod
    def _check_main(rev: str) -> None:
        if unquote(rev) != "main":
            raise _HttpError(
                404,
                f"Invalid rev id: {unquote(rev)} (the fake Hub only has 'main')",
                "RevisionNotFound",
            )

    def _dispatch(
        self, name: str, match: re.Match[str], query: str, headers: Any, body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            return getattr(self, f"_do_{name}")(match, query, headers, body)

    def _do_create_repo(self, match, query, headers, body):
        self._require_auth(headers)
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") not in (None, "model"):
            raise _HttpError(400, "the fake Hub only supports model repos")
        name = payload.get("name")
        if not isinstance(name, str) or not re.fullmatch(_NAME, name):
            raise _HttpError(400, f"invalid repo name {name!r}")
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self._repos:
            # Like the real Hub, the 409 body carries the url: create_repo(exist_ok=True) reads it.
            raise _HttpError(409, "You already created this model repo", payload={"url": url})
        repo = _Repo(
            repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
        )
        # A new Hub repo starts with one commit holding .gitattributes.
        attrs = "".join(
            f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in _LFS_SUFFIXES
        ).encode()
        files = {".gitattributes": StoredFile(attrs, lfs=False)}
        repo.commits.append(
            (self._commit_id(repo_id, "", "initial commit", files), "initial commit", files)
        )
        self._repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _do_whoami(self, match, query, headers, body):
        self._require_auth(headers)
        return (
            200,
            {
                "type": "user",
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            },
            {},
        )

    def _do_validate_yaml(self, match, query, headers, body):
        import yaml

        content = json.loads(body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "YAML front matter is not closed by '---'"})
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "YAML front matter must be a mapping"})
                except yaml.YAMLError as err:
                    errors.append({"message": f"invalid YAML: {err}"})
        if errors:
            return 400, {"errors": errors, "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _do_repo_info(self, match, query, headers, body):
        repo = self._repo(match["repo"], headers)
        rev = unquote(match["rev"]) if match["rev"] else "main"
        snap = repo.snapshot(rev)
        if snap is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        oid, files = snap
        siblings = [{"rfilename": p, "size": len(f.data)} for p, f in sorted(files.items())]
        return (
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": oid,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            },
            {},
        )

    def _do_preupload(self, match, query, headers, body):
        self._require_auth(headers)
        repo = self._repo(match["repo"], headers)
        self._check_main(match["rev"])
        payload = json.loads(body or b"{}")
        head_oid, head_files = repo.snapshot("main")
        out = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = self.lfs and (path.endswith(_LFS_SUFFIXES) or size >= _LFS_THRESHOLD)
            existing = head_files.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing is not None else None,
                }
            )
        return 200, {"files": out, "commitOid": head_oid}, {}

    def _do_lfs_batch(self, match, query, headers, body):
        self._require_auth(headers)
        self._repo(match["repo"], headers)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise _HttpError(400, "the fake Hub's LFS batch API only supports uploads")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise _HttpError(400, "the fake Hub only offers the 'basic' LFS transfer")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if size > self.max_body_bytes:
                entry["error"] = {
                    "code": 413,
                    "message": f"object larger than {self.max_body_bytes} bytes",
                }
            elif oid not in self._lfs_store:
                self._lfs_expected[oid] = size
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/objects/{oid}"},
                    "verify": {"href": f"{self.url}/_lfs/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _do_lfs_put(self, match, query, headers, body):
        oid = match["oid"]
        expected = self._lfs_expected.get(oid)
        if expected is None:
            raise _HttpError(403, f"no pending LFS upload for {oid}")
        if len(body) != expected or hashlib.sha256(body).hexdigest() != oid:
            raise _HttpError(400, f"LFS object {oid}: content does not match its sha256/size")
        self._lfs_store[oid] = body
        del self._lfs_expected[oid]
        return 200, b"", {}

    def _do_lfs_verify(self, match, query, headers, body):
        self._require_auth(headers)
        payload = json.loads(body or b"{}")
        data = self._lfs_store.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise _HttpError(404, f"LFS object {payload.get('oid')} was not uploaded")
        return 200, {"success": True}, {}

    def _do_commit(self, match, query, headers, body):
        self._require_auth(headers)
        repo = self._repo(match["repo"], headers)
        self._check_main(match["rev"])
        if "create_pr=1" in query:
            raise _HttpError(400, "the fake Hub does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        head_oid, head_files = repo.snapshot("main")
        if header.get("parentCommit") not in (None, head_oid):
            raise _HttpError(412, "parentCommit is not the head of main")
        files = dict(head_files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise _HttpError(400, f"invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[path] = StoredFile(
                    base64.b64decode(value["content"], validate=True), lfs=False
                )
            elif key == "lfsFile":
                data = self._lfs_store.get(value.get("oid", ""))
                if data is None:
                    raise _HttpError(400, f"LFS object for {path} was never uploaded")
                if "size" in value and int(value["size"]) != len(data):
                    raise _HttpError(400, f"LFS object for {path}: size mismatch")
                files[path] = StoredFile(data, lfs=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _HttpError(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise _HttpError(400, f"unsupported commit operation {key!r}")
        summary = header.get("summary", "")
        oid = self._commit_id(repo.repo_id, head_oid, summary, files)
        repo.commits.append((oid, summary, files))
        return (
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
                "pullRequestUrl": None,
            },
            {},
        )

    def _do_resolve(self, match, query, headers, body):
        repo = self._repo(match["repo"], headers)
        rev, path = unquote(match["rev"]), unquote(match["path"])
        snap = repo.snapshot(rev)
        if snap is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        oid, files = snap
        stored = files.get(path)
        if stored is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        extra = {"X-Repo-Commit": oid, "ETag": f'"{stored.oid}"'}
        if stored.lfs:
            extra["X-Linked-Etag"] = f'"{stored.oid}"'
            extra["X-Linked-Size"] = str(len(stored.data))
        return 200, stored.data, extra

    @staticmethod
    def _commit_id(repo_id: str, parent: str, summary: str, files: dict[str, StoredFile]) -> str:
        h = hashlib.sha1(f"{repo_id}\0{parent}\0{summary}\0{time.time_ns()}".encode())
        for path in sorted(files):
            h.update(f"\0{path}\0{files[path].oid}".encode())
        return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Route a request to a ``FakeHubServer._do_*`` method; always answer with a Content-Length."""

    hub: FakeHubServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds of client silence before the connection is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
        logger.debug("fake hub: " + format, *args)

    def _read_body(self) -> bytes:
        limit = self.hub.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                total += size
                if total > limit:
                    raise _HttpError(413, f"request body larger than {limit} bytes")
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise _HttpError(413, f"request body larger than {limit} bytes")
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        split = urlsplit(self.path)
        path, query = split.path, split.query
        status, payload, extra = 404, {"error": f"unknown endpoint {self.command} {path}"}, {}
        try:
            body = self._read_body()
            for method, pattern, name in _ROUTES:
                match = pattern.fullmatch(path)
                if match and method == self.command:
                    status, payload, extra = self.hub._dispatch(
                        name, match, query, self.headers, body
                    )
                    break
            else:
                self.hub.unhandled.append((self.command, self.path))
                extra = {"X-Error-Message": payload["error"]}
        except _HttpError as err:
            status, payload = err.status, {"error": err.message, **err.payload}
            extra = {"X-Error-Message": err.message, **err.headers}
            if err.error_code:
                extra["X-Error-Code"] = err.error_code
            if err.status == 413:
                self.close_connection = True
        except Exception as err:  # a bug in the fake must reach the client as a 500, not a hang
            logger.exception("fake hub failed on %s %s", self.command, self.path)
            status, payload, extra = 500, {"error": repr(err)}, {}
        self.hub.requests.append((self.command, path, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(
            status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        )
        self.send_header(
            "Content-Type",
            "application/octet-stream" if isinstance(payload, bytes) else "application/json",
        )
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


def hub_env(server: FakeHubServer, hf_home: str | os.PathLike[str]) -> dict[str, str]:
    """Environment variables that point ``huggingface_hub`` (in a fresh process) at ``server``.

    ``huggingface_hub`` reads them at import time, so pass them to a subprocess rather than setting
    them in a process that already imported it. Xet is disabled (the fake speaks LFS only), offline
    mode is switched off, the token is the server's, and ``HF_HOME`` keeps downloads and the token
    cache away from the user's.
    """
    return {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": os.fspath(hf_home),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
