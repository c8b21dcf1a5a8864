"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests: stdlib only, model repos only, read-only.

    with serve({"lmsys/vicuna-tiny": "/tmp/vicuna"}) as hub:   # repo id -> local directory (its files, recursively)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": "/tmp/hf"}   # in a subprocess: huggingface_hub
        ...                                                        # reads HF_ENDPOINT / HF_HUB_OFFLINE at import
        assert "training_args.bin" not in hub.downloaded("lmsys/vicuna-tiny")

It answers what unmodified huggingface_hub (checked against 2.4.0: `hf_hub_download`, `get_hf_file_metadata`,
`_get_metadata_or_catch_error`, `snapshot_download`, `HfApi.repo_info`/`model_info`/`list_repo_tree`/
`list_repo_files`/`resolve_revision`, `utils._http.hf_raise_for_status`) and transformers' `from_pretrained` send:

  HEAD/GET /{repo}/resolve/{rev}/{path}     the file: ETag "sha256", X-Repo-Commit, Content-Length (GET: Range)
  GET /api/models/{repo}[/revision/{rev}]   repo info: id, sha (the commit), siblings [{rfilename, size, blobId}]
  GET /api/models/{repo}/tree/{rev}[/{dir}] [{type, path, oid, size}], direct children or all (?recursive=true)

Errors carry the X-Error-Code the client maps to its exceptions: RepoNotFound -> RepositoryNotFoundError,
RevisionNotFound -> RevisionNotFoundError, EntryNotFound (with X-Repo-Commit, so the client caches the absence)
-> RemoteEntryNotFoundError; any other path is a plain 404 (HfHubHTTPError). Each repo has two revisions, "main"
and a fixed commit, commit_sha(repo_id). No redirects and no X-Xet-* headers, so the client takes the plain HTTP
download path. Files are read on each request, so keep repos tiny.
"""

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [  # matched against the raw (still quoted) path: a revision like refs/pr/1 arrives as refs%2Fpr%2F1
    ("resolve", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
    ("info", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")),
    ("tree", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")),
]


def commit_sha(repo_id):
    """The commit every revision of `repo_id` resolves to (40 hex digits, as on the Hub)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def _files(root):
    """The repo's files: paths relative to `root`, with "/", sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for f in names)


def _read(root, path):
    with open(os.path.join(root, path), "rb") as f:
        return f.read()


def _git_oid(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # silence the per-request log on stderr
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _send(self, status, data, headers, body):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, obj, body):
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, code, message, body, status=404, **headers):
        headers.update({"Content-Type": "application/json", "X-Error-Message": message})
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, body)

    def _answer(self, body):
        hub, url = self.server.hub, urlsplit(self.path)
        hub.requests.append((self.command, unquote(url.path)))
        for kind, pattern in _ROUTES:
            match = pattern.fullmatch(url.path)
            if match:
                break
        else:
            return self._error(None, "Not Found", body)
        repo, rev, path = (unquote(match.groupdict().get(k) or "") for k in ("repo", "rev", "path"))
        root, sha = hub.repos.get(repo), commit_sha(repo)
        if root is None:
            return self._error("RepoNotFound", "Repository not found", body)
        if rev not in ("", "main", sha):
            return self._error("RevisionNotFound", f"Invalid rev id: {rev}", body)
        files = _files(root)

        if kind == "resolve":
            if path not in files:
                return self._error("EntryNotFound", "Entry not found", body, **{"X-Repo-Commit": sha})
            data = _read(root, path)
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": sha}
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if wanted is None:  # http_get only sends Range to resume an interrupted download
                return self._send(200, data, headers, body)
            start, end = int(wanted[1]), min(int(wanted[2] or len(data) - 1), len(data) - 1)
            if start >= len(data):
                return self._error(None, "Range Not Satisfiable", body, status=416)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, body)

        if kind == "info":
            blobs = {f: _read(root, f) for f in files}
            siblings = [{"rfilename": f, "size": len(d), "blobId": _git_oid(d)} for f, d in blobs.items()]
            return self._json({"id": repo, "modelId": repo, "sha": sha, "private": False, "gated": False,
                               "disabled": False, "siblings": siblings}, body)

        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("true", "1")
        inside = [f[len(prefix):].split("/") for f in files if f.startswith(prefix)]
        if not inside:
            return self._error("EntryNotFound", f"{path} does not exist on {rev or 'main'}", body)
        entries, folders = [], set()
        for parts in inside:
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": _git_oid(folder.encode()),
                                     "size": 0})
            if recursive or len(parts) == 1:
                data = _read(root, prefix + "/".join(parts))
                entries.append({"type": "file", "path": prefix + "/".join(parts), "oid": _git_oid(data),
                                "size": len(data)})
        return self._json(entries, body)


class FakeHub:
    """A running fake Hub: `url` (for HF_ENDPOINT), `requests` ((method, unquoted path) of each request, in order)."""

    def __init__(self, repos):
        self.repos = {repo_id: os.fspath(root) for repo_id, root in repos.items()}
        self.requests = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self._server.shutdown()
        self._server.server_close()

    def downloaded(self, repo_id):
        """The files of `repo_id` whose content was fetched (GET), in order."""
        start = f"/{repo_id}/resolve/"
        return [p[len(start):].split("/", 1)[1] for m, p in self.requests if m == "GET" and p.startswith(start)]


def serve(repos):
    """`with serve({"owner/name": local_dir, ...}) as hub:` serves those repos at `hub.url` until the block ends."""
    return FakeHub(repos)
