"""A loopback stand-in for the Hugging Face Hub's upload API, for the publishing tests.

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT``. It answers what the
client's ``create_repo`` and ``create_commit`` (and so ``upload_file``, and ``upload_folder``
without ``hf_xet``) send, as the Hub answers it:

- ``POST /api/repos/create``: the repo under ``organization``, or the token's user when there is
  none (the Hub fills in the namespace); 409 with the repo's URL when it exists already;
- ``GET /api/whoami-v2``: the token's user;
- ``POST /api/validate-yaml``: the card's front matter, parsed with PyYAML;
- ``POST /api/models/<repo>/preupload/<revision>``: ``lfs`` for binary files and LFS-tracked
  suffixes, ``regular`` for text (the Hub's own rule, roughly);
- ``POST /<repo>.git/info/lfs/objects/batch``: the basic transfer, an upload URL on this server
  for each object not stored yet, and a verify URL;
- ``PUT /lfs-storage/<oid>``: the object's bytes, refused unless their sha256 is the oid; no token
  is expected here, as on the Hub's presigned storage URLs;
- ``POST /<repo>.git/info/lfs/objects/verify``;
- ``POST /api/models/<repo>/commit/<revision>``: the ndjson commit (a header, ``file`` entries in
  base64, ``lfsFile`` entries naming stored objects).

Every request is recorded (method, path, headers, body) and every commit with its files. The client
sends LFS files through Xet whenever ``hf_xet`` is installed, whatever a server answers, unless
``HF_HUB_DISABLE_XET`` is set: the tests set it, so the basic LFS path above is the one taken.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".jpeg", ".webp")
STORAGE_PREFIX = "/lfs-storage/"
_REPO_API = "/api/models/"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # path in repo -> content


@dataclass
class Repo:
    repo_id: str
    visibility: str | None
    commits: list[Commit] = field(default_factory=list)

    def tree(self) -> dict[str, bytes]:
        """The main branch's files after every commit."""
        files: dict[str, bytes] = {}
        for commit in self.commits:
            files.update(commit.files)
        return files


class HubServer:
    """The server's state; ``refuse_commits`` makes every commit fail as the Hub refuses a write."""

    def __init__(self, *, tokens: dict[str, str]) -> None:
        self.tokens = dict(tokens)  # token -> user name
        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, Repo] = {}
        self.storage: dict[str, bytes] = {}  # LFS oid -> bytes
        self.refuse_commits = False
        # While set and not yet released, commits wait for it: shows an upload running in the background.
        self.commit_gate: threading.Event | None = None
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)

    def upload_api_requests(self) -> list[RecordedRequest]:
        """The requests to the upload API above (the client may also fetch public data of its own)."""
        return [
            request
            for request in self.requests
            if request.path in ("/api/repos/create", "/api/validate-yaml")
            or any(part in request.path for part in ("/preupload/", "/commit/", ".git/info/lfs/objects/"))
        ]

    def storage_requests(self) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path.startswith(STORAGE_PREFIX)]

    def uploaded_bytes(self) -> list[bytes]:
        """Everything that reached the server as file content: commit files and stored objects."""
        files = [
            content for repo in self.repos.values() for c in repo.commits for content in c.files.values()
        ]
        return files + list(self.storage.values())

    # ---- request handling (called from the handler's threads) --------------------------------

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def user_of(self, headers: dict[str, str]) -> str | None:
        value = headers.get("authorization", "")
        return self.tokens.get(value.removeprefix("Bearer ")) if value.startswith("Bearer ") else None

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "PUT" and path.startswith(STORAGE_PREFIX):
            return self._store(path.removeprefix(STORAGE_PREFIX), body)
        user = self.user_of(headers)
        if user is None:
            return HTTPStatus.UNAUTHORIZED, {"error": "Invalid credentials in Authorization header"}
        if method == "GET" and path == "/api/whoami-v2":
            return HTTPStatus.OK, {"type": "user", "name": user, "auth": {"type": "access_token"}}
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(user, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(path.removeprefix("/").removesuffix(".git/info/lfs/objects/batch"), body)
        if method == "POST" and path.endswith(".git/info/lfs/objects/verify"):
            oid = json.loads(body)["oid"]
            return (
                (HTTPStatus.OK, {})
                if oid in self.storage
                else (HTTPStatus.NOT_FOUND, {"error": "not stored"})
            )
        if method == "POST" and path.startswith(_REPO_API):
            repo_id, _, action = path.removeprefix(_REPO_API).rpartition("/")[0].rpartition("/")
            if repo_id not in self.repos:
                return HTTPStatus.NOT_FOUND, {"error": f"Repository {repo_id} not found"}
            if action == "preupload":
                return self._preupload(json.loads(body))
            if action == "commit":
                return self._commit(self.repos[repo_id], body, headers)
        return HTTPStatus.NOT_FOUND, {"error": f"no route for {method} {path}"}

    def _create_repo(self, user: str, payload: dict[str, Any]) -> tuple[int, Any]:
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return HTTPStatus.CONFLICT, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = Repo(repo_id=repo_id, visibility=payload.get("visibility"))
        return HTTPStatus.OK, {"url": url, "name": repo_id}

    @staticmethod
    def _validate_yaml(content: str) -> tuple[int, Any]:
        if content.startswith("---\n"):
            block = content.removeprefix("---\n").split("\n---", 1)[0]
            try:
                if not isinstance(yaml.safe_load(block), dict):
                    raise yaml.YAMLError("the front matter is not a mapping")
            except yaml.YAMLError as error:
                return HTTPStatus.BAD_REQUEST, {"errors": [{"message": str(error)}]}
        return HTTPStatus.OK, {"errors": [], "warnings": []}

    @staticmethod
    def _preupload(payload: dict[str, Any]) -> tuple[int, Any]:
        files = []
        for entry in payload["files"]:
            sample = base64.b64decode(entry["sample"])
            binary = entry["path"].lower().endswith(LFS_SUFFIXES) or b"\0" in sample
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False}
            )
        return HTTPStatus.OK, {"files": files, "commitOid": "0" * 40}

    def _lfs_batch(self, repo_id: str, body: bytes) -> tuple[int, Any]:
        if repo_id not in self.repos:
            return HTTPStatus.NOT_FOUND, {"message": f"Repository {repo_id} not found"}
        objects = []
        for item in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.storage:
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.url}{STORAGE_PREFIX}{item['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return HTTPStatus.OK, {"transfer": "basic", "objects": objects}

    def _store(self, oid: str, body: bytes) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return HTTPStatus.BAD_REQUEST, {"error": "content does not match its oid"}
        with self._lock:
            self.storage[oid] = body
        return HTTPStatus.OK, {}

    def _commit(self, repo: Repo, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        if self.commit_gate is not None and not self.commit_gate.wait(timeout=60):
            return HTTPStatus.LOCKED, {"error": "the test never released the commit gate"}
        if self.refuse_commits:
            # Echoes what it was sent, as an error message may: the client must not pass it on.
            return HTTPStatus.FORBIDDEN, {"error": f"write access refused for {headers.get('authorization')}"}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files: dict[str, bytes] = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.storage:
                    return HTTPStatus.BAD_REQUEST, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.storage[value["oid"]]
        with self._lock:
            parent = repo.commits[-1].oid if repo.commits else ""
            oid = hashlib.sha1((parent + json.dumps(header)).encode() + body).hexdigest()
            repo.commits.append(
                Commit(
                    oid=oid, summary=header["summary"], description=header.get("description", ""), files=files
                )
            )
        return HTTPStatus.OK, {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
        }


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            body = self._body()
            path = unquote(urlsplit(self.path).path)
            headers = {name.lower(): value for name, value in self.headers.items()}
            server.record(RecordedRequest(method=self.command, path=path, headers=headers, body=body))
            status, payload = server.handle(self.command, path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if status >= HTTPStatus.BAD_REQUEST and isinstance(payload.get("error"), str):
                self.send_header("X-Error-Message", payload["error"])  # as the Hub sends its errors
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test reads server.requests instead

    return Handler
