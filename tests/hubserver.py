"""A small Hugging Face Hub-compatible server, so tests push and pull with the real client over real HTTP.

It speaks exactly the calls huggingface_hub 2.4 makes for what paramdelta does (read from its source:
hf_api.py, _commit_api.py, lfs.py, file_download.py, _snapshot_download.py, utils/_http.py):

    POST /api/repos/create                          create_repo (409 when it exists: exist_ok)
    POST /api/validate-yaml                         README.md front matter, before any upload
    POST /api/models/{repo}/preupload/{rev}         uploadMode "lfs" or "regular" per file, plus its remote oid
    POST /{repo}.git/info/lfs/objects/batch         LFS batch: a "basic" upload href per new object
    PUT  /_lfs/{oid}                                the object's bytes (checked against its sha256)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), lfsFile, deletedFile
    POST /api/models/{repo}/branch/{branch}         create_branch
    GET  /api/models/{repo}[/revision/{rev}]        model_info / repo_info / resolve_revision (?blobs=true)
    GET  /api/models/{repo}/tree/{rev}              list_repo_tree (recursive; one page)
    HEAD|GET /{repo}/resolve/{rev}/{path}           X-Repo-Commit, ETag, X-Linked-Etag/-Size, Range -> 206

Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which the client maps to
its exception classes. Repos live in a folder: objects are content-addressed (git sha1 for regular files, sha256 for
LFS), a commit is a JSON snapshot {path: object} named by a 40-hex sha1, branches point at commits.

For the tests it counts every request and, for safetensors files, how many bytes past the header (weight bytes)
it served; `rate_limited`, `gated` and `token` switch on the 429/gated/auth behaviours.

>>> with HubServer(tmp_path) as hub:                                            # doctest: +SKIP
...     os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    status: int
    range: str | None
    sent: int  # body bytes sent
    weight_bytes: int  # bytes of a safetensors file past its header that this response carried
    authorized: bool  # whether the request carried the server's token


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)


class HubServer:
    """Start with `with HubServer(folder) as hub:`; `hub.url` is the endpoint, `hub.requests` the log."""

    def __init__(self, root: Path, token: str | None = None):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "commits").mkdir(exist_ok=True)
        self.token = token  # when set, writes and private/gated reads need `Authorization: Bearer <token>`
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.rate_limited = False
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, and drop kept-alive connections too: the client must find the server gone."""
        if self._thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread = None
            with self.lock:
                for conn in self.connections:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    # -- what tests look at --------------------------------------------------------------
    def weight_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.requests)

    def shard_gets(self) -> list[str]:
        """Paths of safetensors files fetched whole (not header range reads), in request order."""
        return [r.path for r in self.requests if r.method == "GET" and r.path.endswith(".safetensors")
                and r.range is None and r.status == 200]

    # -- storage ---------------------------------------------------------------------------
    def put_object(self, data: bytes, lfs: bool) -> str:
        oid = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
        path = self.root / "objects" / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def commit(self, repo: str, branch: str, changes: dict[str, dict | None], message: str) -> str:
        """A new commit on `branch`: `changes` maps path -> entry ({oid, size, lfs}) or None to delete."""
        parent = self.repos[repo].branches[branch]
        files = dict(self.snapshot(parent)) if parent else {}
        for path, entry in changes.items():
            if entry is None:
                files = {p: e for p, e in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            else:
                files[path] = entry
        doc = {"repo": repo, "parent": parent, "message": message, "files": files, "time": time.time_ns()}
        sha = hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        (self.root / "commits" / f"{sha}.json").write_text(json.dumps(doc))
        self.repos[repo].branches[branch] = sha
        return sha

    def snapshot(self, sha: str) -> dict[str, dict]:
        return json.loads((self.root / "commits" / f"{sha}.json").read_text())["files"]

    def resolve(self, repo: str, rev: str) -> str | None:
        """A branch name or a commit sha (full) of this repo -> commit sha."""
        branches = self.repos[repo].branches
        if rev in branches:
            return branches[rev] or None
        path = self.root / "commits" / f"{rev}.json"
        if re.fullmatch(r"[0-9a-f]{40}", rev) and path.exists() and json.loads(path.read_text())["repo"] == repo:
            return rev
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet: tests read `hub.requests` instead
        pass

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub.connections.append(self.connection)

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    # -- plumbing --------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._weight = 0
        self._status = 0
        self._sent = 0
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._read_body()
        try:
            if self.hub.rate_limited:
                self._error(429, "RateLimited", "You have been rate-limited", {"Retry-After": "60"})
            else:
                self._route(self.command, url.path, body)
        finally:
            with self.hub.lock:
                self.hub.requests.append(Request(self.command, unquote(url.path), self._status,
                                                 self.headers.get("Range"), self._sent, self._weight,
                                                 self._authorized()))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent = len(body)

    def _json(self, data, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._json({"error": message}, status, extra)

    def _authorized(self) -> bool:
        return self.hub.token is not None and self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _readable(self, repo: str) -> bool:
        """Whether `repo` may be read; answers the error (404/401/403) and returns False otherwise."""
        r = self.hub.repos.get(repo)
        if r is None or (r.private and not self._authorized()):
            self._error(404 if r is None else 401, "RepoNotFound", "Repository not found")
            return False
        if r.gated and not self._authorized():
            has_token = "Authorization" in self.headers
            self._error(403 if has_token else 401, "GatedRepo",
                        f"Access to model {repo} is restricted. You must have access to it and be authenticated.")
            return False
        return True

    def _writable(self) -> bool:
        if self.hub.token is not None and not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    # -- routes ----------------------------------------------------------------------------
    def _route(self, method: str, path: str, body: bytes) -> None:
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)", self.create_branch),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self.revision_info),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self.tree),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for verb, pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                return handler(body=body, **args)
        self._error(404, None, f"no route for {method} {path}")

    def create_repo(self, body: bytes) -> None:
        if not self._writable():
            return
        req = json.loads(body)
        repo = f"{req['organization']}/{req['name']}"
        with self.hub.lock:
            if repo in self.hub.repos:  # the Hub's 409 carries the url too: create_repo(exist_ok=True) reads it
                msg = "You already created this model repo"
                return self._json({"error": msg, "url": f"{self.hub.url}/{repo}"}, 409, {"X-Error-Message": msg})
            self.hub.repos[repo] = Repo(private=req.get("visibility") == "private", branches={"main": ""})
            self.hub.commit(repo, "main", {}, "initial commit")
        self._json({"url": f"{self.hub.url}/{repo}", "name": repo})

    def validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        m = re.match(r"---\n(.*?)\n---\n", content, re.S)
        errors = []
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            meta, errors = {}, [{"message": f"invalid YAML: {e}"}]
        for model in (meta or {}).get("base_model") or []:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
                errors.append({"message": f'"base_model" must be a Hub model id, got "{model}"'})
        self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _branch(self, repo: str, rev: str) -> str | None:
        if repo not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if rev not in self.hub.repos[repo].branches:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return rev

    def preupload(self, body: bytes, repo: str, rev: str) -> None:
        if not self._writable() or self._branch(repo, rev) is None:
            return
        head = self.hub.repos[repo].branches[rev]
        current = self.hub.snapshot(head)
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 5_000_000 or b"\0" in base64.b64decode(f["sample"])
            old = current.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": old["oid"] if old else None})
        self._json({"files": files, "commitOid": head})

    def lfs_batch(self, body: bytes, repo: str) -> None:
        if not self._writable():
            return
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.hub.root / "objects" / obj["oid"]).exists():
                item["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}"}}
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_put(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, "content does not match its oid")
        self.hub.put_object(body, lfs=True)
        self._send(200)

    def commit(self, body: bytes, repo: str, rev: str) -> None:
        if not self._writable() or self._branch(repo, rev) is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        message, changes = "", {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                data = base64.b64decode(value["content"])
                changes[value["path"]] = {"oid": self.hub.put_object(data, lfs=False), "size": len(data), "lfs": False}
            elif key == "lfsFile":
                obj = self.hub.root / "objects" / value["oid"]
                if not obj.exists():
                    return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = {"oid": value["oid"], "size": obj.stat().st_size, "lfs": True}
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        with self.hub.lock:
            sha = self.hub.commit(repo, rev, changes, message)
        self._json({"commitUrl": f"{self.hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})

    def create_branch(self, body: bytes, repo: str, rev: str) -> None:
        if not self._writable():
            return
        r = self.hub.repos.get(repo)
        if r is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if rev in r.branches:
            return self._error(409, None, f"Reference {rev} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        sha = self.hub.resolve(repo, start)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
        with self.hub.lock:
            r.branches[rev] = sha
        self._json({})

    def _commit_for(self, repo: str, rev: str | None) -> str | None:
        if not self._readable(repo):
            return None
        sha = self.hub.resolve(repo, rev or "main")
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def revision_info(self, body: bytes, repo: str, rev: str | None) -> None:
        sha = self._commit_for(repo, rev)
        if sha is None:
            return
        blobs = self.query.get("blobs") in ("true", "True", "1")
        siblings = []
        for path, e in sorted(self.hub.snapshot(sha).items()):
            s = {"rfilename": path}
            if blobs:
                s.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    s["lfs"] = {"sha256": e["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        r = self.hub.repos[repo]
        self._json({"id": repo, "modelId": repo, "sha": sha, "private": r.private, "disabled": False,
                    "gated": "auto" if r.gated else False, "tags": [], "siblings": siblings})

    def tree(self, body: bytes, repo: str, rev: str, sub: str | None) -> None:
        sha = self._commit_for(repo, rev)
        if sha is None:
            return
        prefix = f"{sub.strip('/')}/" if sub else ""
        recursive = self.query.get("recursive") in ("true", "True", "1")
        entries, folders = [], set()
        for path, e in sorted(self.hub.snapshot(sha).items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "path": path, "size": e["size"], "oid": git_sha1(e["oid"].encode())
                        if e["lfs"] else e["oid"]}
                if e["lfs"]:
                    item["lfs"] = {"oid": e["oid"], "size": e["size"], "pointerSize": 134}
                entries.append(item)
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in folders]
        self._json(entries)

    def resolve(self, body: bytes, repo: str, rev: str, file: str) -> None:
        sha = self._commit_for(repo, rev)
        if sha is None:
            return
        entry = self.hub.snapshot(sha).get(file)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist on {rev}", {"X-Repo-Commit": sha})
        data = (self.hub.root / "objects" / entry["oid"]).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["oid"]}"', "X-Linked-Size": str(len(data))})
        start, end, status = 0, len(data), 200
        wanted = self.headers.get("Range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if not m or int(m.group(1)) >= len(data):
                return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            start, end = int(m.group(1)), min(len(data), int(m.group(2)) + 1 if m.group(2) else len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if self.command == "GET" and file.endswith(".safetensors") and len(data) >= 8:
            data_start = 8 + struct.unpack("<Q", data[:8])[0]
            self._weight = max(0, end - max(start, data_start))
        self._send(status, data[start:end], headers, content_type="application/octet-stream")
