"""A small Hugging Face Hub look-alike HTTP server for tests.

The real ``huggingface_hub`` client (2.x, on httpx) talks to it as it would to the real Hub:
point ``HfApi(endpoint=server.url)`` / ``HF_ENDPOINT`` at it, with ``HF_HUB_DISABLE_XET=1`` so
uploads use the legacy LFS protocol (or with Xet, see below). Standard library only, plus ``yaml``
to read model cards and ``hf_xet`` in Xet mode.

What it models: users, orgs and tokens; model/dataset/space repos with git-like commits,
branches and PR refs; regular and LFS files; private and gated repos; discussions and pull
requests; and the Hub's error conventions (``X-Error-Code`` / ``X-Error-Message`` headers plus a
JSON ``{"error": ...}`` body), which the client turns into ``RepositoryNotFoundError``,
``RevisionNotFoundError``, ``EntryNotFoundError``, ``GatedRepoError`` and friends.

Tests drive it through the Python API of :class:`HubServer` (seeding repos, granting access,
injecting faults) and inspect what the client did through ``commits()``, ``files()``,
``discussions()`` and ``requests_log``.

Variants. ``HubServer.variant`` is a set of flags (empty by default: the behaviour described above)
that switch on details in which the real Hub, or another Hub-compatible server, differs from the
defaults while staying within what ``huggingface_hub`` accepts. See ``VARIANTS`` for the list and
where each behaviour comes from. ``rate_limit()`` opens a window of 429 answers carrying the Hub's
``RateLimit`` / ``Retry-After`` headers, and ``add_user(..., fine_grained=True)`` gives a token the
shape the Hub reports for fine-grained tokens.

Xet. ``HubServer(xet=True)`` / ``enable_xet(folder)`` adds the Xet routes and headers, with a
``local://`` CAS folder that the ``hf_xet`` wheel serves itself (see ``enable_xet`` and ``XetCas``);
``cas_bytes()`` and ``xet_files()`` show what went into it. ``HubServer(bandwidth=N)`` /
``set_bandwidth(N)`` paces bodies to N bytes/s each way, shared by all connections (``Pacer``); Xet
transfers to a ``local://`` CAS never pass through the server and are not paced.
``python -m tests.hub_server --help`` runs it as a process of its own (benchmarks).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import html
import math
import json
import os
import re
import socket
import struct
import tempfile
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MiB
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".msgpack")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
DISCUSSIONS_PAGE_SIZE = 50

# Switchable behaviours (``HubServer.variant``); none is on by default.
VARIANTS = {
    # LFS files: /resolve answers 302 to a signed URL on another origin (the "CDN", a second listening
    # socket) with X-Repo-Commit / X-Linked-Etag / X-Linked-Size on the redirect itself, as the real Hub
    # does (cdn-lfs / cas-bridge hosts); the CDN refuses requests that carry an Authorization header (as
    # S3 pre-signed URLs do). Client side: _httpx2_follow_hub_redirects_with_backoff stops at other hosts.
    "cdn_redirect",
    # with cdn_redirect: no X-Linked-Size on the redirect (get_hf_file_metadata then has no size).
    "no_linked_size",
    # Regular files of public, ungated repos: /resolve/{rev}/{path} answers 307 with a relative Location
    # /api/resolve-cache/{type}s/{id}/{sha}/{path}?etag=..., as the real Hub has done since 2025
    # (huggingface/swift-transformers#209; huggingface_hub#4815).
    "resolve_cache_redirect",
    # LFS batch upload hrefs point at the CDN origin (pre-signed S3 URLs on the real Hub).
    "lfs_upload_elsewhere",
    # Tree listings paginate with a Link: <...>; rel="next" header 2 entries a page (the real Hub pages
    # tree listings; huggingface_hub.utils._pagination follows Link), discussions 1 a page (count/start).
    "paginate",
    # Response header names in lower case (HTTP/2 front ends such as the real Hub's send them so).
    "lowercase_headers",
    # GETs of regular files accepting gzip get Content-Encoding: gzip, chunked, no Content-Length, as
    # the real Hub serves compressible text (comment in file_download.http_get).
    "gzip_text",
    # Weak validators: ETag: W/"..." on regular files (file_download._normalize_etag accepts them).
    "weak_etag",
    # model_info(files_metadata=True): siblings carry only rfilename (no size, blobId, lfs), as when a
    # server ignores ?blobs=true; RepoSibling documents all three as optional.
    "no_file_metadata",
    # model_info without the "gated" and "private" fields (ModelInfo documents both as optional).
    "omit_gated_private",
    # Error answers without X-Error-Code / X-Error-Message (only the JSON body), like a proxy or mirror
    # that does not copy the Hub's custom headers; hf_raise_for_status then falls back on the status.
    "no_error_codes",
    # Repo ids are matched case-insensitively and answered under their canonical spelling, as on
    # the real Hub (huggingface_hub#1453, #2090: "repo ids are case insensitive across the Hub").
    "canonical_names",
    # The discussions listing ignores ?author= (an older or simpler server): the client must check
    # each pull request's author itself.
    "ignore_author_filter",
}
TREE_PAGE_SIZE_PAGINATED = 2
DISCUSSIONS_PAGE_SIZE_PAGINATED = 1

# Path patterns, matched against the raw (still percent-encoded) request path.
_REPO = r"(?P<t>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_WEB_REPO = r"(?:(?P<t>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"


def git_blob_sha1(data: bytes) -> str:
    """The object id git gives a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs_path(path: str, size: int) -> bool:
    """Whether the Hub would store this file with LFS (what the preupload endpoint answers)."""
    return size > LFS_THRESHOLD or path.lower().endswith(LFS_SUFFIXES)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_card_data(readme: bytes) -> dict | None:
    """The YAML front matter of a README.md, as the Hub exposes it in ``cardData``."""
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", readme.decode("utf-8", "replace"), re.S)
    if match is None:
        return None
    import yaml

    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else None


class HubError(Exception):
    """An error answer: status, message and the headers the client classifies errors by."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------
class Blob:
    """Immutable file content; LFS blobs are identified by the git oid of their pointer file.

    Regular blobs hold their bytes. LFS blobs may instead be given ``sha256``, ``size`` and ``load``
    (a callable returning the bytes): their content then lives only in the server's object store or
    its Xet CAS, and is read from there when someone asks for it. ``xet_hash`` is set once the
    content is in the Xet CAS (uploaded through Xet, or copied there when the server serves Xet).
    """

    def __init__(self, data: bytes | None, lfs: bool, *, sha256: str | None = None, size: int | None = None,
                 load=None, xet_hash: str | None = None):
        if data is not None:
            sha256, size = hashlib.sha256(data).hexdigest(), len(data)
        elif not (lfs and sha256 and size is not None and load is not None):
            raise ValueError("a blob without data must be an LFS blob with sha256, size and load")
        self._data, self._load, self.lfs, self.size, self.sha256 = data, load, lfs, size, sha256
        self.xet_hash = xet_hash
        pointer = lfs_pointer(self.sha256, self.size) if lfs else None
        self.pointer_size = len(pointer) if pointer else None
        self.oid = git_blob_sha1(pointer if pointer else data)

    @property
    def data(self) -> bytes:
        return self._data if self._data is not None else self._load()

    def lfs_json(self, sha_key: str) -> dict | None:
        return {sha_key: self.sha256, "size": self.size, "pointerSize": self.pointer_size} if self.lfs else None


class ObjectStore:
    """LFS object content by sha256: in memory, or one file per object under ``folder`` (benchmarks with
    multi-GB models keep it out of the server's memory, and range reads read only the range)."""

    def __init__(self, folder=None):
        self._memory: dict[str, bytes] = {}
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.folder / sha256

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._memory if self.folder is None else self._path(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        if sha256 not in self:
            return None
        return len(self._memory[sha256]) if self.folder is None else self._path(sha256).stat().st_size

    def put(self, sha256: str, data: bytes) -> None:
        if self.folder is None:
            self._memory[sha256] = data
        elif sha256 not in self:
            tmp = self._path(f"{sha256}.{uuid.uuid4().hex}.tmp")  # two uploads of one object may race
            tmp.write_bytes(data)
            os.replace(tmp, self._path(sha256))

    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a local file's content, streamed when the store is on disk; returns (sha256, size)."""
        if self.folder is None:
            data = Path(path).read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            self.put(sha256, data)
            return sha256, len(data)
        digest, tmp = hashlib.sha256(), self._path(f"incoming-{uuid.uuid4().hex}.tmp")
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for piece in iter(lambda: src.read(1 << 20), b""):
                digest.update(piece)
                dst.write(piece)
        sha256 = digest.hexdigest()
        os.replace(tmp, self._path(sha256))
        return sha256, self._path(sha256).stat().st_size

    def read(self, sha256: str, start: int = 0, stop: int | None = None) -> bytes:
        if self.folder is None:
            return self._memory[sha256][start:stop]
        with open(self._path(sha256), "rb") as f:
            f.seek(start)
            return f.read(-1 if stop is None else max(stop - start, 0))


def _xet_hex(raw: bytes) -> str:
    """Xet prints a 32-byte hash as four little-endian u64 words in hex (xet-core merklehash)."""
    return "".join("%016x" % word for word in struct.unpack("<4Q", raw))


_SHARD_BOOKEND = b"\xff" * 32
_SHARD_FLAG_VERIFICATION, _SHARD_FLAG_METADATA_EXT = 1 << 31, 1 << 30


def shard_files(data: bytes) -> list[tuple[str, str | None, int]]:
    """(xet file hash, sha256 or None, size) of every file a Xet shard describes.

    The shard layout (xet-core ``metadata_shard``): a 48-byte header, then the file info section,
    ended by a bookend entry whose hash is all 0xFF bytes. Each file is a 48-byte header (hash, flags
    u32, entry count u32, 8 unused bytes), its 48-byte segment entries (xorb hash, flags u32, unpacked
    bytes u32, chunk range 2 x u32), as many 48-byte verification entries when flagged, then one
    48-byte metadata extension (sha256 + 16 unused bytes) when flagged.
    """
    out, pos = [], 48
    while pos + 48 <= len(data):
        raw_hash, (flags, count) = data[pos:pos + 32], struct.unpack_from("<II", data, pos + 32)
        pos += 48
        if raw_hash == _SHARD_BOOKEND:
            break
        size = sum(struct.unpack_from("<I", data, pos + i * 48 + 36)[0] for i in range(count))
        pos += count * 48 * (2 if flags & _SHARD_FLAG_VERIFICATION else 1)
        sha256 = None
        if flags & _SHARD_FLAG_METADATA_EXT:
            sha256, pos = _xet_hex(data[pos:pos + 32]), pos + 48
        out.append((_xet_hex(raw_hash), sha256, size))
    return out


class XetCas:
    """The Xet storage a Xet-speaking HubServer hands out: a ``local://`` CAS folder.

    The released ``hf_xet`` wheel serves ``local://<folder>`` endpoints itself, disk-backed (xorbs,
    shards and a global dedup table under ``<folder>/xet``): clients upload and download there with no
    HTTP involved. The server only reads the shards clients leave there, to learn which sha256 (what a
    commit names) is which Xet file hash (what a download asks for), and uses ``hf_xet`` itself to put
    seeded files in the CAS and to read Xet files back for plain HTTP downloads.
    """

    def __init__(self, folder):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.url = f"local://{self.folder}"  # an absolute folder: local:///...
        self._by_sha256: dict[str, tuple[str, int]] = {}
        self._shards_read: set[tuple[str, int]] = set()
        self._session = None

    def bytes_used(self) -> int:
        """Bytes of every file under the CAS folder (xorbs, shards, dedup index)."""
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def lookup(self, sha256: str) -> tuple[str, int] | None:
        """(xet hash, size) of a file uploaded with this sha256, from the shards in the folder."""
        if sha256 not in self._by_sha256:
            for shard in self.folder.rglob("*.mdb"):
                key = (str(shard), shard.stat().st_size)
                if key in self._shards_read:
                    continue
                self._shards_read.add(key)
                try:
                    entries = shard_files(shard.read_bytes())
                except (struct.error, OSError):
                    continue
                for xet_hash, file_sha256, size in entries:
                    if file_sha256:
                        self._by_sha256.setdefault(file_sha256, (xet_hash, size))
        return self._by_sha256.get(sha256)

    def _hf_xet(self):
        import hf_xet

        if self._session is None:
            self._session = hf_xet.XetSession()
        return hf_xet, {"endpoint": self.url, "token": "test-server", "token_expiry_unix_secs": int(time.time()) + 3600}

    def store(self, content: bytes | Path, sha256: str) -> str:
        """Put ``content`` (bytes, or a file streamed from disk) in the CAS, deduplicated by hf_xet;
        returns its Xet file hash."""
        hf_xet, auth = self._hf_xet()
        with self._session.new_upload_commit(**auth) as commit:
            if isinstance(content, Path):
                handle = commit.start_upload_file(str(content), sha256=sha256)
            else:
                handle = commit.start_upload_bytes(content, sha256=sha256)
        info = handle.result().xet_info
        self._by_sha256[sha256] = (info.hash, info.file_size)
        return info.hash

    def load_to(self, xet_hash: str, size: int, target: Path) -> None:
        hf_xet, auth = self._hf_xet()
        with self._session.new_file_download_group(**auth) as group:
            group.start_download_file(hf_xet.XetFileInfo(xet_hash, size), str(target))

    def load(self, xet_hash: str, size: int) -> bytes:
        with tempfile.TemporaryDirectory(prefix="hub-server-xet-") as tmp:
            self.load_to(xet_hash, size, Path(tmp) / "file")
            return (Path(tmp) / "file").read_bytes()


def compile_routes(table: list[tuple[str, str, object]]) -> list[tuple[str, re.Pattern, object]]:
    """(method, path pattern, handler) rows with each pattern anchored and compiled: a route table."""
    return [(method, re.compile(f"^{pattern}$"), fn) for method, pattern, fn in table]


class Pacer:
    """One direction of a network link of ``rate`` bytes/s, shared by every connection.

    Each piece of a body reserves the next ``n / rate`` seconds of the link (first come, first
    served, under one lock) and its sender sleeps until the reservation ends: the total over all
    connections never exceeds ``rate``, however many there are, as on one real link.
    """

    PIECE = 64 * 1024

    def __init__(self, rate: float):
        if rate <= 0:
            raise ValueError("bandwidth must be positive (bytes/s)")
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._free_at = 0.0

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(now, self._free_at) + n / self.rate
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)


@dataclass
class User:
    name: str
    orgs: tuple[str, ...]
    role: str = "write"
    fine_grained: bool = False  # whoami reports role "fineGrained" with scoped permissions


@dataclass
class Commit:
    id: str
    parents: list[str]
    tree: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Discussion:
    num: int
    title: str
    author: str
    is_pull_request: bool
    status: str
    created_at: str
    events: list[dict] = field(default_factory=list)
    base_ref: str | None = None  # PRs: "refs/heads/<branch>" they target
    base_commit: str | None = None  # PRs: the commit they started from

    @property
    def git_reference(self) -> str | None:
        return f"refs/pr/{self.num}" if self.is_pull_request else None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    gated: str | bool
    card_data: dict | None
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main" / "refs/pr/1" / "refs/tags/v1" -> sha
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to (or committed in) this repo
    discussions: list[Discussion] = field(default_factory=list)
    granted: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, rev: str | None) -> tuple[str | None, str]:
        """(full ref name or None for a bare commit sha, commit sha) for a branch/tag/PR ref/sha."""
        rev = rev or "main"
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in self.refs:
                return ref, self.refs[ref]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return None, rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def history(self, sha: str) -> list[Commit]:
        """First-parent history, newest first."""
        out = []
        while sha:
            commit = self.commits[sha]
            out.append(commit)
            sha = commit.parents[0] if commit.parents else None
        return out

    def discussion(self, num: int) -> Discussion:
        for d in self.discussions:
            if d.num == num:
                return d
        raise HubError(404, "Discussion not found")


@dataclass
class Request:
    method: str
    path: str  # raw path, no query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    base_url: str  # "http://host:port" as the client addressed us

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true", "yes")

    def json(self) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None
        if not isinstance(data, dict):
            raise HubError(400, "Expected a JSON object")
        return data


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, obj, status: int = 200, headers: dict | None = None, content_type="application/json"):
        return cls(status, json.dumps(obj).encode(), {"Content-Type": content_type, **(headers or {})})


def user_id(name: str) -> str:
    """The stable 24-hex id the Hub gives an account (what webhook payloads carry as author.id)."""
    return hashlib.md5(name.encode()).hexdigest()[:24]


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern
    status: int
    remaining: int


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the client's pooled connections expect
    server_version = "hub-test-server/1.0"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr logging
        pass

    def setup(self):
        super().setup()
        self.server.hub._track_connection(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.hub._track_connection(self.connection, add=False)

    def do_GET(self):
        self._handle(self.command)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _read(self, n: int) -> bytes:
        """``n`` body bytes, paced when the server has a bandwidth (the upload direction)."""
        pacer = self.server.hub._pacers[0]
        if pacer is None:
            return self.rfile.read(n)
        out = bytearray()
        while len(out) < n:
            piece = self.rfile.read(min(Pacer.PIECE, n - len(out)))
            if not piece:
                break
            pacer.take(len(piece))
            out += piece
        return bytes(out)

    def _write(self, data: bytes) -> None:
        """Response body bytes, paced when the server has a bandwidth (the download direction)."""
        pacer = self.server.hub._pacers[1]
        if pacer is None:
            self.wfile.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), Pacer.PIECE):
            piece = view[start:start + Pacer.PIECE]
            pacer.take(len(piece))
            self.wfile.write(piece)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self._read(size)
                self.rfile.readline()
        return self._read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        hub = self.server.hub
        response = hub._handle(method, self.path, headers, body, cdn=getattr(self.server, "is_cdn", False))
        response.headers.setdefault("X-Request-Id", headers.get("x-amzn-trace-id") or str(uuid.uuid4()))
        chunked = response.headers.get("Transfer-Encoding") == "chunked"
        if not chunked and "Content-Length" not in response.headers:
            response.headers["Content-Length"] = str(len(response.body))
        lower = "lowercase_headers" in hub.variant
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name.lower() if lower else name, value)
        self.end_headers()
        if method != "HEAD":
            if chunked:
                for start in range(0, len(response.body), 4096):
                    piece = response.body[start:start + 4096]
                    self._write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self._write(response.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not keep the process alive
    block_on_close = False

    def handle_error(self, request, client_address):
        """Clients hanging up (or stop() closing their sockets) is normal; report anything else."""
        exc = traceback.format_exc()
        if not any(name in exc for name in ("ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError")):
            self.hub.server_errors.append(exc)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------
class HubServer:
    """In-process Hub. Binds at construction (so ``url`` is known), serves after ``start()``.

    ``xet``: also speak Xet (see ``enable_xet``): True for a CAS in a temporary folder, or the CAS
    folder. ``bandwidth``: pace request and response bodies to this many bytes/s each way (see
    ``set_bandwidth``). ``data``: keep LFS object content in files under this folder instead of memory.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, xet: bool | str | Path = False,
                 bandwidth: float | None = None, data: str | Path | None = None):
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("HubServer only listens on loopback")
        self._httpd = _Server((host, port), _Handler)
        self._httpd.hub = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        # A second origin standing for the CDN / object store the real Hub redirects LFS traffic to
        # (used only by the cdn_redirect and lfs_upload_elsewhere variants).
        self._cdn_httpd = _Server((host, 0), _Handler)
        self._cdn_httpd.hub = self
        self._cdn_httpd.is_cdn = True
        self.cdn_url = f"http://{host}:{self._cdn_httpd.server_address[1]}"
        self._cdn_thread: threading.Thread | None = None
        self._signing_key = uuid.uuid4().bytes
        self.variant: set[str] = set()  # see VARIANTS; empty = default behaviour
        self._rate_limit: list | None = None  # [method, pattern, seconds, window end or None]
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._users: dict[str, User] = {}  # by name
        self._tokens: dict[str, str] = {}  # token -> user name
        self._repos: dict[tuple[str, str], Repo] = {}
        self.lfs_bytes_received = 0  # bytes of every LFS upload (PUT) accepted, for re-upload counts
        self._lfs_store = ObjectStore(None if data is None else Path(data) / "lfs")  # every LFS object ever stored
        self._xet: XetCas | None = None  # the CAS offered to clients; None: no Xet routes (the default)
        self._cas_folders: dict[Path, XetCas] = {}  # every CAS ever offered: their files stay readable
        self._pacers: tuple[Pacer | None, Pacer | None] = (None, None)  # (upload, download)
        self.set_bandwidth(bandwidth)
        self._faults: list[_Fault] = []
        self._delays: list[list] = []  # [method, pattern, seconds, remaining]
        self._counter = 0
        self.requests_log: list[tuple[str, str]] = []  # (method, raw path without query)
        self.cdn_log: list[tuple[str, str]] = []  # the same, for requests that reached the CDN origin
        self.server_errors: list[str] = []  # tracebacks of handler crashes (answered with 500)
        self._routes = self._build_routes()
        if xet:
            self.enable_xet(None if xet is True else xet)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        self._cdn_thread = threading.Thread(target=self._cdn_httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="hub-server-cdn", daemon=True)
        self._cdn_thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        if self._cdn_thread is not None:
            self._cdn_httpd.shutdown()
            self._cdn_thread.join(5)
            self._cdn_thread = None
        with self._lock:
            for conn in list(self._connections):  # end keep-alive connections still held by clients
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._httpd.server_close()
        self._cdn_httpd.server_close()

    def __enter__(self) -> "HubServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    # ---- Xet and bandwidth -------------------------------------------------------------------
    def enable_xet(self, cas_folder: str | Path | None = None) -> Path:
        """Speak Xet from now on, with ``cas_folder`` (a new temporary folder if None) as its CAS.

        - ``GET /api/{type}s/{id}/xet-write-token/{rev}`` and ``.../xet-read-token/{rev}`` answer
          ``{"accessToken", "exp", "casUrl"}`` and the ``X-Xet-Cas-Url`` / ``X-Xet-Access-Token`` /
          ``X-Xet-Token-Expiration`` headers (what huggingface_hub.utils._xet and hf_xet read). The
          ``casUrl`` is ``local://<cas_folder>``, which the ``hf_xet`` wheel serves itself.
        - A commit's ``lfsFile`` may name a sha256 that was uploaded through Xet (found in the CAS's
          shards) instead of through the LFS batch API.
        - LFS files are Xet files: ``/resolve`` adds ``X-Xet-Hash`` and ``Link: <read token>; rel="xet-auth"``
          (files stored otherwise are copied into the CAS first), and tree / paths-info entries carry
          ``xetHash``, so a client with Xet on downloads through hf_xet. Plain HTTP downloads keep working.

        Caveat: ``local://`` traffic goes from hf_xet straight to the folder, not through this server,
        so ``bandwidth`` does not pace Xet uploads and downloads (only the API, LFS and /resolve bodies).
        Returns the CAS folder (see ``cas_bytes``).
        """
        folder = Path(tempfile.mkdtemp(prefix="hub-server-cas-")) if cas_folder is None else Path(cas_folder)
        with self._lock:
            cas = self._cas_folders.get(folder.resolve()) or XetCas(folder)
            self._cas_folders[cas.folder] = cas
            self._xet = cas
            return cas.folder

    def disable_xet(self) -> None:
        """Stop offering Xet (token routes 404, no Xet headers); files already in a CAS stay readable."""
        with self._lock:
            self._xet = None

    @property
    def xet(self) -> bool:
        return self._xet is not None

    def cas_bytes(self) -> int:
        """Bytes in the current Xet CAS folder: take it before and after an upload to see what it added."""
        if self._xet is None:
            raise RuntimeError("this server does not speak Xet (enable_xet)")
        return self._xet.bytes_used()

    def xet_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, str]:
        """{path: Xet file hash} of the files of ``revision`` that are stored in a Xet CAS."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            tree = repo.commits[repo.resolve(revision)[1]].tree
            return {path: blob.xet_hash for path, blob in tree.items() if blob.xet_hash}

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """Pace request bodies and response bodies to ``bytes_per_second`` each way, shared by all
        connections of both origins (API and CDN), as one network link; None: unpaced."""
        self._pacers = (None, None) if not bytes_per_second else (Pacer(bytes_per_second), Pacer(bytes_per_second))

    # ---- seeding and fault injection ----------------------------------------------------------
    def add_user(self, name: str, token: str, orgs: tuple[str, ...] = (), *, role: str = "write",
                 fine_grained: bool = False) -> None:
        """Register ``token`` for user ``name`` (member of ``orgs``). ``role="read"`` makes a read-only token.

        ``fine_grained=True``: whoami reports the token as the Hub reports fine-grained tokens
        (``role: "fineGrained"`` with per-namespace permissions, ``repo.write`` only when ``role="write"``).
        """
        with self._lock:
            self._users[name] = User(name, tuple(orgs), role, fine_grained)
            self._tokens[token] = name

    def create_repo(self, repo_id: str, *, owner_token: str | None = None, private: bool = False,
                    gated: bool | str = False, files: dict[str, bytes | Path] | None = None, repo_type: str = "model",
                    card_data: dict | None = None) -> str:
        """Create a repo whose ``main`` holds exactly ``files`` in one commit; returns that commit's sha.

        ``gated=True`` means ``"auto"``. ``card_data`` is served as ``cardData`` when no README.md front
        matter provides one. Files are stored as LFS by the same rule as uploads (``is_lfs_path``); a
        ``Path`` value is read from disk (streamed into the object store when it is on disk).
        """
        if repo_id.count("/") != 1:
            raise ValueError("repo_id must be 'namespace/name'")
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} {repo_id} already exists")
            author = self._tokens.get(owner_token or "", repo_id.split("/")[0])
            repo = self._new_repo(repo_type, repo_id, private, gated, card_data)
            tree = {path: self._stored_blob(repo, path, data) for path, data in (files or {}).items()}
            commit = self._add_commit(repo, [], tree, "initial commit", "", author)
            repo.refs["refs/heads/main"] = commit.id
            return commit.id

    def commit_files(self, repo_id: str, files: dict[str, bytes], *, message: str = "update",
                     revision: str = "main", delete: tuple[str, ...] = (), author: str | None = None,
                     repo_type: str = "model") -> str:
        """Commit directly to a branch or PR ref, bypassing HTTP (e.g. a concurrent push). Returns the sha."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            ref, sha = repo.resolve(revision)
            if ref is None:
                raise ValueError("revision must be a branch or a PR ref")
            tree = dict(repo.commits[sha].tree)
            for path in delete:
                tree.pop(path)
            for path, data in files.items():
                tree[path] = self._stored_blob(repo, path, data)
            commit = self._add_commit(repo, [sha], tree, message, "", author or repo.namespace)
            repo.refs[ref] = commit.id
            return commit.id

    def grant(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        """Give ``user`` access to the files of a gated repo."""
        with self._lock:
            self._repo(repo_type, repo_id).granted.add(user)

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """The next ``times`` requests whose method matches (``"*"`` = any) and whose path (raw or
        percent-decoded, without query string) matches ``path_regex`` (``re.search``) get ``status``."""
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, times))

    def delay_next(self, method: str, path_regex: str, seconds: float, times: int = 1) -> None:
        """The next ``times`` matching requests wait ``seconds`` before being handled (a slow Hub:
        the request still takes effect even if the client has gone away meanwhile)."""
        with self._lock:
            self._delays.append([method.upper(), re.compile(path_regex), seconds, times])

    def rate_limit(self, seconds: int, path_regex: str = r".*", method: str = "*") -> None:
        """Rate-limit the caller like the real Hub does: the next matching request opens a window of
        ``seconds`` during which every matching request gets 429 with ``RateLimit: "api";r=0;t=N``,
        ``RateLimit-Policy`` and ``Retry-After: N`` (the Hub's rate-limits documentation)."""
        with self._lock:
            self._rate_limit = [method.upper(), re.compile(path_regex), int(seconds), None]

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delays.clear()
            self._rate_limit = None

    # ---- introspection -----------------------------------------------------------------------
    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """First-parent history of ``revision``, newest first."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return [{"id": c.id, "title": c.title, "message": c.message, "parents": list(c.parents)}
                    for c in repo.history(repo.resolve(revision)[1])]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            return {path: blob.data for path, blob in repo.commits[repo.resolve(revision)[1]].tree.items()}

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._repo(repo_type, repo_id).resolve(revision)[1]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def discussions(self, repo_id: str, repo_type: str = "model") -> list[dict]:
        with self._lock:
            return [{"num": d.num, "title": d.title, "status": d.status, "is_pull_request": d.is_pull_request,
                     "author": d.author, "git_reference": d.git_reference,
                     "comments": [e["data"]["latest"]["raw"] for e in d.events if e["type"] == "comment"]}
                    for d in self._repo(repo_type, repo_id).discussions]

    # ---- internals shared by both APIs ---------------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r}") from None

    def _stored_blob(self, repo: Repo, path: str, data: bytes) -> Blob:
        """A blob for a file seeded from Python, registered in LFS storage when it is an LFS file."""
        if isinstance(data, Path):
            size = data.stat().st_size
            if not is_lfs_path(path, size):
                return Blob(data.read_bytes(), False)
            sha256, size = self._lfs_store.put_file(data)
        else:
            if not is_lfs_path(path, len(data)):
                return Blob(bytes(data), False)
            sha256, size = hashlib.sha256(data).hexdigest(), len(data)
            self._lfs_store.put(sha256, bytes(data))
        repo.lfs_oids.add(sha256)
        return self._lfs_blob(sha256, size)

    def _lfs_blob(self, sha256: str, size: int, xet_hash: str | None = None) -> Blob:
        """An LFS blob whose content is read from the object store (or a Xet CAS) when needed."""
        return Blob(None, True, sha256=sha256, size=size, xet_hash=xet_hash,
                    load=lambda: self._content(sha256, size))

    def _xet_lookup(self, sha256: str) -> tuple[XetCas, str, int] | None:
        for cas in ([self._xet] if self._xet else []) + [c for c in self._cas_folders.values() if c is not self._xet]:
            found = cas.lookup(sha256)
            if found is not None:
                return cas, *found
        return None

    @contextmanager
    def _outside_lock(self):
        """Let other requests run during heavy work on immutable content (hashing an upload, reading a
        stored object), as a real Hub's many workers do; one lock held over it would make every
        transfer wait for every other one."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def _content(self, sha256: str, size: int, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes of an LFS object; one known only to a Xet CAS is read back from it (once)."""
        if sha256 not in self._lfs_store:
            found = self._xet_lookup(sha256)
            if found is None:
                raise HubError(404, f"LFS object {sha256} not found")
            cas, xet_hash, _ = found
            if self._lfs_store.folder is None:
                self._lfs_store.put(sha256, cas.load(xet_hash, size))
            else:  # straight into the store's file, never whole in memory
                incoming = self._lfs_store.folder / f"incoming-{uuid.uuid4().hex}.tmp"
                cas.load_to(xet_hash, size, incoming)
                os.replace(incoming, self._lfs_store.folder / sha256)
        with self._outside_lock():
            return self._lfs_store.read(sha256, start, stop)

    def _in_xet(self, blob: Blob) -> str | None:
        """The Xet hash of an LFS blob, copying it into the offered CAS first if needed; None without Xet."""
        if self._xet is None or not blob.lfs:
            return None
        if blob.xet_hash is None or self._xet.lookup(blob.sha256) is None:
            found = self._xet.lookup(blob.sha256)
            if found is None and blob.sha256 in self._lfs_store and self._lfs_store.folder is not None:
                found = (self._xet.store(self._lfs_store.folder / blob.sha256, blob.sha256),)
            blob.xet_hash = found[0] if found else self._xet.store(blob.data, blob.sha256)
        return blob.xet_hash

    def _new_repo(self, repo_type, repo_id, private, gated, card_data=None) -> Repo:
        repo = Repo(repo_type, repo_id, bool(private), "auto" if gated is True else gated, card_data, now_iso())
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _add_commit(self, repo: Repo, parents: list[str], tree: dict[str, Blob], title: str, message: str,
                    author: str) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parents, sorted((p, b.oid) for p, b in tree.items()), title, self._counter])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parents, tree, title, message, author, now_iso())
        repo.commits[commit.id] = commit
        return commit

    def _repo_url(self, base_url: str, repo: Repo) -> str:
        return f"{base_url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ---- auth --------------------------------------------------------------------------------
    def _auth(self, req: Request) -> User | None:
        """The caller, None when anonymous; 401 for a token we don't know."""
        header = req.headers.get("authorization", "")
        if not header:
            return None
        token = header[7:] if header.lower().startswith("bearer ") else ""
        name = self._tokens.get(token)
        if name is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._users[name]

    def _is_member(self, user: User | None, repo: Repo) -> bool:
        return user is not None and (repo.namespace == user.name or repo.namespace in user.orgs)

    def _can_write(self, user: User | None, repo: Repo) -> bool:
        return self._is_member(user, repo) and user.role == "write"

    def _find_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        """The repo stored under this id; with ``canonical_names``, under any spelling of its case."""
        repo = self._repos.get((repo_type, repo_id))
        if repo is None and "canonical_names" in self.variant:
            wanted = (repo_type, repo_id.lower())
            repo = next((r for (t, i), r in self._repos.items() if (t, i.lower()) == wanted), None)
        return repo

    def _readable_repo(self, req: Request, t: str, ns: str, name: str) -> tuple[Repo, User | None]:
        """The repo if the caller may see it; hidden repos answer exactly like missing ones."""
        user = self._auth(req)
        repo = self._find_repo(PLURAL.get(t, t), f"{unquote(ns)}/{unquote(name)}")
        if repo is None or (repo.private and not self._is_member(user, repo)):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo, user

    def _writable_repo(self, req: Request, t: str, ns: str, name: str) -> tuple[Repo, User]:
        repo, user = self._readable_repo(req, t, ns, name)
        self._require_write(user, repo)
        return repo, user

    def _require_write(self, user: User | None, repo: Repo) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if not self._can_write(user, repo):
            raise HubError(403, f"You don't have the rights to write to {repo.repo_type} {repo.repo_id}. "
                                "Pass create_pr=1 to open a pull request instead.")

    def _check_gate(self, user: User | None, repo: Repo) -> None:
        if not repo.gated or self._is_member(user, repo) or (user is not None and user.name in repo.granted):
            return
        if user is None:
            raise HubError(401, f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.", "GatedRepo")
        raise HubError(403, f"Access to {repo.repo_type} {repo.repo_id} is restricted and you are not in the "
                            f"authorized list. Visit {self.url}/{repo.repo_id} to ask for access.", "GatedRepo")

    # ---- dispatch ----------------------------------------------------------------------------
    def _build_routes(self) -> list[tuple[str, re.Pattern, object]]:
        table = [
            ("GET", r"/_test/stats", self._stats),
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/{_REPO}/refs", self._refs),
            ("GET", rf"/api/{_REPO}/commits/(?P<rev>.+)", self._list_commits),
            ("GET", rf"/api/{_REPO}/tree/(?P<rest>.+)", self._tree),
            ("POST", rf"/api/{_REPO}/paths-info/(?P<rev>.+)", self._paths_info),
            ("POST", rf"/api/{_REPO}/preupload/(?P<rev>.+)", self._preupload),
            ("POST", rf"/api/{_REPO}/commit/(?P<rev>.+)", self._commit),
            ("GET", rf"/api/{_REPO}/xet-(?P<kind>read|write)-token/(?P<rev>.+)", self._xet_token),
            ("POST", rf"/api/{_REPO}/branch/(?P<branch>.+)", self._create_branch),
            ("DELETE", rf"/api/{_REPO}/branch/(?P<branch>.+)", self._delete_branch),
            ("GET", rf"/api/{_REPO}/discussions", self._list_discussions),
            ("POST", rf"/api/{_REPO}/discussions", self._create_discussion),
            ("GET", rf"/api/{_REPO}/discussions/(?P<num>\d+)", self._discussion_details),
            ("POST", rf"/api/{_REPO}/discussions/(?P<num>\d+)/(?P<action>comment|status)", self._discussion_action),
            ("PATCH", rf"/api/{_REPO}/discussions/(?P<num>\d+)/(?P<action>status)", self._discussion_action),
            ("GET", rf"/api/{_REPO}(?:/revision/(?P<rev>.+))?", self._repo_info),
            ("POST", rf"/{_WEB_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})", self._lfs_upload),
            ("POST", rf"/lfs-verify/{_REPO}", self._lfs_verify),
            ("GET", rf"/{_WEB_REPO}/resolve/(?P<rest>.+)", self._resolve),
            ("HEAD", rf"/{_WEB_REPO}/resolve/(?P<rest>.+)", self._resolve),
            ("GET", rf"/api/resolve-cache/{_REPO}/(?P<rest>[0-9a-f]{{40}}/.+)", self._resolve_cache),
            ("HEAD", rf"/api/resolve-cache/{_REPO}/(?P<rest>[0-9a-f]{{40}}/.+)", self._resolve_cache),
        ]
        return compile_routes(table)

    def _handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes, cdn: bool = False) -> Response:
        path, _, query = raw_path.partition("?")
        host = headers.get("host")
        req = Request(method, path, parse_qs(query, keep_blank_values=True), headers, body,
                      f"http://{host}" if host else self.url)
        with self._lock:
            self.requests_log.append((method, path))  # logged on arrival, before any injected delay
            if cdn:
                self.cdn_log.append((method, path))
        time.sleep(self._take_delay(method, path))
        with self._lock:
            try:
                if cdn:  # the CDN origin serves signed LFS downloads and uploads, nothing else
                    return self._cdn(req)
                limited = self._rate_limited(method, path)
                if limited is not None:
                    return limited
                fault = self._take_fault(method, path)
                if fault is not None:
                    raise HubError(fault.status, f"Injected fault ({fault.status}) for {method} {path}")
                for route_method, pattern, fn in self._routes:
                    match = pattern.match(path)
                    if match and route_method == method:
                        return fn(req, **{k: v for k, v in match.groupdict().items()})
                raise HubError(404, f"Not found: {method} {path}")
            except HubError as err:
                return self._error_response(err)
            except Exception:
                self.server_errors.append(traceback.format_exc())
                return self._error_response(HubError(500, "Internal error in the test Hub server"))

    def _take_delay(self, method: str, path: str) -> float:
        with self._lock:
            for delay in self._delays:
                if delay[0] in ("*", method) and (delay[1].search(path) or delay[1].search(unquote(path))):
                    delay[3] -= 1
                    if delay[3] <= 0:
                        self._delays.remove(delay)
                    return delay[2]
        return 0.0

    def _rate_limited(self, method: str, path: str) -> Response | None:
        limit = self._rate_limit
        if limit is None or limit[0] not in ("*", method) or not (limit[1].search(path) or limit[1].search(unquote(path))):
            return None
        now = time.monotonic()
        if limit[3] is None:
            limit[3] = now + limit[2]
        if now >= limit[3]:
            self._rate_limit = None
            return None
        left = max(1, math.ceil(limit[3] - now))
        err = HubError(429, "You have been rate-limited; you can retry this action in about 5 minutes.",
                       headers={"RateLimit": f'"api";r=0;t={left}',
                                "RateLimit-Policy": '"fixed window";"api";q=500;w=300', "Retry-After": str(left)})
        return self._error_response(err)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method in ("*", method) and (fault.pattern.search(path) or fault.pattern.search(unquote(path))):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _error_response(self, err: HubError) -> Response:
        headers = {"X-Error-Message": re.sub(r"[\r\n]+", " ", err.message).encode("latin-1", "replace").decode(
            "latin-1"), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        if "no_error_codes" in self.variant:
            headers.pop("X-Error-Code", None)
            headers.pop("X-Error-Message", None)
        return Response.of_json({"error": err.message, **err.extra}, err.status, headers)

    # ---- account and repo management -------------------------------------------------------------
    def _whoami(self, req: Request) -> Response:
        """GET /api/whoami-v2: the token's user, 401 without a valid token."""
        user = self._auth(req)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return Response.of_json({
            "type": "user", "id": user_id(user.name), "name": user.name,
            "fullname": user.name, "email": f"{user.name}@example.com", "emailVerified": True, "isPro": False,
            "avatarUrl": f"/avatars/{user.name}.svg",
            "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in user.orgs],
            "auth": {"type": "access_token", "accessToken": self._access_token_json(user)},
        })

    @staticmethod
    def _access_token_json(user: User) -> dict:
        if not user.fine_grained:
            return {"displayName": "test-token", "role": user.role}
        permissions = ["repo.content.read", "discussion.write"] + (["repo.write"] if user.role == "write" else [])
        scoped = [{"entity": {"type": "user", "name": user.name}, "permissions": permissions}]
        scoped += [{"entity": {"type": "org", "name": org}, "permissions": permissions} for org in user.orgs]
        return {"displayName": "test-token", "role": "fineGrained",
                "fineGrained": {"canReadGatedRepos": True, "global": [], "scoped": scoped}}

    def _create_repo(self, req: Request) -> Response:
        """POST /api/repos/create {name, organization, visibility|private, type}; 409 (with url) if taken."""
        user = self._auth(req)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        body = req.json()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX or not body.get("name"):
            raise HubError(400, "Invalid repo type or name")
        namespace = body.get("organization") or user.name
        repo_id = f"{namespace}/{body['name']}"
        if (namespace != user.name and namespace not in user.orgs) or user.role != "write":
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        url = f"{req.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
        existing = self._find_repo(repo_type, repo_id)
        if existing is not None:
            url = f"{req.base_url}/{URL_PREFIX[repo_type]}{existing.repo_id}"
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = self._new_repo(repo_type, repo_id, private, False)
        # like the Hub, a new repo starts with one commit holding a .gitattributes
        attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
        commit = self._add_commit(repo, [], {".gitattributes": Blob(attributes, False)}, "initial commit", "",
                                  user.name)
        repo.refs["refs/heads/main"] = commit.id
        return Response.of_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, req: Request) -> Response:
        """POST /api/validate-yaml: the client checks README.md metadata before committing it."""
        try:
            parse_card_data(req.json().get("content", "").encode())
        except Exception as exc:  # yaml.YAMLError
            return Response.of_json({"errors": [{"message": str(exc)}], "warnings": []}, 400)
        return Response.of_json({"errors": [], "warnings": []})

    # ---- repo metadata ---------------------------------------------------------------------------
    def _card_data(self, repo: Repo, commit: Commit) -> dict | None:
        readme = commit.tree.get("README.md")
        card = None
        if readme is not None:
            try:
                card = parse_card_data(readme.data)
            except Exception:
                card = None
        return card if card is not None else repo.card_data

    def _repo_info(self, req: Request, t, ns, name, rev=None) -> Response:
        """GET /api/{type}s/{id}[/revision/{rev}]: model/dataset/space info (``blobs=true`` adds sizes)."""
        repo, _ = self._readable_repo(req, t, ns, name)
        _, sha = repo.resolve(unquote(rev) if rev else "main")
        commit = repo.commits[sha]
        card = self._card_data(repo, commit)
        siblings = []
        for path in sorted(commit.tree):
            sibling = {"rfilename": path}
            if req.flag("blobs") and "no_file_metadata" not in self.variant:
                blob = commit.tree[path]
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = blob.lfs_json("sha256")
            siblings.append(sibling)
        tags = list((card or {}).get("tags") or [])
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.namespace, "sha": sha, "private": repo.private, "gated": repo.gated,
            "disabled": False, "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings,
            "lastModified": commit.date, "createdAt": repo.created_at, "usedStorage": sum(
                b.size for b in commit.tree.values()),
        }
        if card is not None:
            info["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if key in card:
                    info[key] = card[key]
        if repo.repo_type == "space":
            info["sdk"] = (card or {}).get("sdk", "static")
        if "omit_gated_private" in self.variant:
            info.pop("gated")
            info.pop("private")
        expand = req.query.get("expand") or req.query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in expand or k in ("_id", "id")}
        return Response.of_json(info)

    def _refs(self, req: Request, t, ns, name) -> Response:
        """GET /api/{type}s/{id}/refs[?include_prs=1]."""
        repo, _ = self._readable_repo(req, t, ns, name)

        def refs(prefix: str, strip: bool) -> list[dict]:
            return [{"name": ref[len(prefix):] if strip else ref, "ref": ref, "targetCommit": sha}
                    for ref, sha in sorted(repo.refs.items()) if ref.startswith(prefix)]

        data = {"branches": refs("refs/heads/", True), "converts": [], "tags": refs("refs/tags/", True)}
        if req.flag("include_prs"):
            data["pullRequests"] = refs("refs/pr/", False)
        return Response.of_json(data)

    def _list_commits(self, req: Request, t, ns, name, rev) -> Response:
        """GET /api/{type}s/{id}/commits/{rev}: first-parent history, newest first, one page."""
        repo, _ = self._readable_repo(req, t, ns, name)
        _, sha = repo.resolve(unquote(rev))
        formatted = "formatted" in (req.query.get("expand[]") or [])
        items = []
        for c in repo.history(sha):
            item = {"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                    "authors": [{"user": c.author, "avatar": None}]}
            if formatted:
                item["formatted"] = {"title": html.escape(c.title), "message": html.escape(c.message)}
            items.append(item)
        return Response.of_json(items)

    def _path_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        """One tree / paths-info entry for a file or directory of ``commit``."""
        blob = commit.tree.get(path)
        if blob is not None:
            entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = blob.lfs_json("oid")
            in_cas = self._xet.lookup(blob.sha256) if self._xet is not None and blob.lfs else None
            if in_cas is not None:  # only what the offered CAS holds (a CAS of earlier tests may not be it)
                entry["xetHash"] = in_cas[0]
        else:
            prefix = path + "/"
            content = sorted((p, b.oid) for p, b in commit.tree.items() if p.startswith(prefix))
            entry = {"type": "directory", "oid": hashlib.sha1(json.dumps(content).encode()).hexdigest(),
                     "size": 0, "path": path}
        if expand:
            last = self._last_commit_touching(repo, commit, path)
            entry["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _last_commit_touching(repo: Repo, commit: Commit, path: str) -> Commit:
        def state(c: Commit):
            return sorted((p, b.oid) for p, b in c.tree.items() if p == path or p.startswith(path + "/"))

        while commit.parents:
            parent = repo.commits[commit.parents[0]]
            if state(parent) != state(commit):
                return commit
            commit = parent
        return commit

    def _tree(self, req: Request, t, ns, name, rest) -> Response:
        """GET /api/{type}s/{id}/tree/{rev}[/{path}]?recursive=&expand=: directories first, one page."""
        repo, _ = self._readable_repo(req, t, ns, name)
        rev, path = _split_revision(rest)
        commit = repo.commits[repo.resolve(rev)[1]]
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        below = [p for p in sorted(commit.tree) if p.startswith(prefix)]
        if path and not below:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        recursive, dirs, files = req.flag("recursive"), set(), []
        for p in below:
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(p)
        expand = req.flag("expand")
        entries = [self._path_entry(repo, commit, p, expand) for p in sorted(dirs) + files]
        if "paginate" not in self.variant:
            return Response.of_json(entries)
        start = int(req.param("cursor", "0"))
        page, headers = entries[start:start + TREE_PAGE_SIZE_PAGINATED], {}
        if start + TREE_PAGE_SIZE_PAGINATED < len(entries):
            query = {k: v for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = [str(start + TREE_PAGE_SIZE_PAGINATED)]
            headers["Link"] = f'<{req.base_url}{req.path}?{urlencode(query, doseq=True)}>; rel="next"'
        return Response.of_json(page, headers=headers)

    def _paths_info(self, req: Request, t, ns, name, rev) -> Response:
        """POST /api/{type}s/{id}/paths-info/{rev} (form: paths=..., expand=...): entries that exist."""
        repo, _ = self._readable_repo(req, t, ns, name)
        commit = repo.commits[repo.resolve(unquote(rev))[1]]
        form = parse_qs(req.body.decode(), keep_blank_values=True)
        expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.tree or any(p.startswith(path + "/") for p in commit.tree):
                out.append(self._path_entry(repo, commit, path, expand))
        return Response.of_json(out)

    # ---- files ---------------------------------------------------------------------------------
    def _resolve(self, req: Request, t, ns, name, rest) -> Response:
        """HEAD/GET /[{type}s/]{id}/resolve/{rev}/{path}: file content and metadata headers (Range ok)."""
        repo, user = self._readable_repo(req, t or "models", ns, name)
        rev, path = _split_revision(rest)
        _, sha = repo.resolve(rev)
        self._check_gate(user, repo)
        blob = repo.commits[sha].tree.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        if blob.lfs and "cdn_redirect" in self.variant:
            headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"', "X-Linked-Etag": f'"{blob.sha256}"',
                       "X-Linked-Size": str(blob.size), "Location": self._cdn_location(blob, path),
                       "Content-Length": "0", **self._xet_headers(req, repo, blob, sha)}
            if "no_linked_size" in self.variant:
                del headers["X-Linked-Size"]
            return Response(302, b"", headers)
        if not blob.lfs and "resolve_cache_redirect" in self.variant and not repo.private and not repo.gated:
            location = (f"/api/resolve-cache/{repo.repo_type}s/{repo.repo_id}/{sha}/{quote(path)}"
                        f"?etag={quote(self._etag(blob))}")
            return Response(307, b"", {"Location": location, "Content-Length": "0"})
        return self._serve_blob(req, blob, path, sha, self._xet_headers(req, repo, blob, sha))

    def _xet_headers(self, req: Request, repo: Repo, blob: Blob, sha: str) -> dict[str, str]:
        """What the Hub adds to /resolve answers for a Xet file: its hash and where to get a read token."""
        xet_hash = self._in_xet(blob)
        if xet_hash is None:
            return {}
        token_url = f"{req.base_url}/api/{repo.repo_type}s/{repo.repo_id}/xet-read-token/{sha}"
        return {"X-Xet-Hash": xet_hash, "Link": f'<{token_url}>; rel="xet-auth"'}

    def _xet_token(self, req: Request, t, ns, name, kind, rev) -> Response:
        """GET /api/{type}s/{id}/xet-{read|write}-token/{rev}[?create_pr=1]: a CAS token, its expiry and
        the CAS url, as JSON (what hf_xet reads) and as X-Xet-* headers (what huggingface_hub reads).
        Writing needs write access, except for pull requests (``create_pr=1``, a PR ref, or the
        revision ``None`` huggingface_hub sends when it does not know the PR ref yet)."""
        if self._xet is None:
            raise HubError(404, f"Not found: {req.method} {req.path}")
        repo, user = self._readable_repo(req, t, ns, name)
        rev = unquote(rev)
        if kind == "write":
            if user is None:
                raise HubError(401, "You must be authenticated to upload files")
            if not (req.flag("create_pr") or rev == "None" or rev.startswith("refs/pr/")):
                self._require_write(user, repo)
        else:
            self._check_gate(user, repo)
        if rev != "None":
            repo.resolve(rev)
        token, exp = f"xet_{kind}_{uuid.uuid4().hex}", int(time.time()) + 3600
        return Response.of_json({"accessToken": token, "exp": exp, "casUrl": self._xet.url}, headers={
            "X-Xet-Cas-Url": self._xet.url, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(exp)})

    def _resolve_cache(self, req: Request, t, ns, name, rest) -> Response:
        """HEAD/GET /api/resolve-cache/{type}s/{id}/{sha}/{path}: a regular file at a commit (the target of
        the resolve_cache_redirect variant's redirects)."""
        repo, user = self._readable_repo(req, t, ns, name)
        sha, _, path = rest.partition("/")
        path = unquote(path)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {sha}", "RevisionNotFound")
        self._check_gate(user, repo)
        blob = repo.commits[sha].tree.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        return self._serve_blob(req, blob, path, sha)

    def _etag(self, blob: Blob) -> str:
        return f'"{blob.sha256}"' if blob.lfs else ('W/' if "weak_etag" in self.variant else '') + f'"{blob.oid}"'

    def _cdn_location(self, blob: Blob, path: str) -> str:
        expires = int(time.time()) + 3600
        sig = hmac.new(self._signing_key, f"{blob.sha256}:{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{self.cdn_url}/cdn-lfs/{blob.sha256}?response-content-disposition=" \
               f"{quote('attachment; filename=' + path.rsplit('/', 1)[-1])}&Expires={expires}&Signature={sig}"

    def _cdn(self, req: Request) -> Response:
        """The CDN origin: signed GET/HEAD of LFS objects, and (lfs_upload_elsewhere) pre-signed uploads."""
        match = re.fullmatch(r"/lfs-upload/" + _REPO + r"/(?P<oid>[0-9a-f]{64})", req.path)
        if req.method == "PUT" and match:
            try:
                return self._lfs_upload(req, **match.groupdict())
            except HubError as err:
                return Response(err.status, f"<Error><Message>{html.escape(err.message)}</Message></Error>".encode(),
                                {"Content-Type": "application/xml"})
        match = re.fullmatch(r"/cdn-lfs/(?P<sha>[0-9a-f]{64})", req.path)
        if req.method not in ("GET", "HEAD") or not match:
            return Response(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})
        if "authorization" in req.headers:  # like an S3 pre-signed URL: the signature is the only credential
            return Response(400, b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed"
                                 b"</Message></Error>", {"Content-Type": "application/xml"})
        sha256, expires = match.group("sha"), req.param("Expires", "0")
        expected = hmac.new(self._signing_key, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, req.param("Signature", "")) or int(expires) < time.time():
            return Response(403, b"<Error><Code>AccessDenied</Code></Error>", {"Content-Type": "application/xml"})
        size = self._lfs_store.size(sha256)
        if size is None:
            found = self._xet_lookup(sha256)
            if found is None:
                return Response(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})
            size = found[2]
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        disposition = req.param("response-content-disposition")
        if disposition:
            headers["Content-Disposition"] = disposition
        return self._ranged(req, size, lambda start, stop: self._content(sha256, size, start, stop), headers)

    def _serve_blob(self, req: Request, blob: Blob, path: str, sha: str, extra: dict | None = None) -> Response:
        filename = re.sub(r'[^\x20-\x7e]|"', "_", path.rsplit("/", 1)[-1])  # header-safe
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{filename}";', **(extra or {})}
        if blob.lfs:
            headers.update({"ETag": f'"{blob.sha256}"', "X-Linked-Etag": f'"{blob.sha256}"',
                            "X-Linked-Size": str(blob.size)})
        else:
            headers["ETag"] = self._etag(blob)
        if (not blob.lfs and "gzip_text" in self.variant and req.method == "GET" and not req.headers.get("range")
                and "gzip" in req.headers.get("accept-encoding", "")):
            headers.update({"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"})
            return Response(200, gzip.compress(blob.data), headers)
        if blob.lfs:
            return self._ranged(req, blob.size, lambda start, stop: self._content(blob.sha256, blob.size, start, stop),
                                headers)
        return self._ranged(req, blob.size, lambda start, stop: blob.data[start:stop], headers)

    def _ranged(self, req: Request, size: int, read, headers: dict[str, str]) -> Response:
        """The content whole (200) or the part a Range header asks for (206, 416 when unsatisfiable);
        ``read(start, stop)`` gives bytes, and is not called for a HEAD."""
        status, start, stop = 200, 0, size
        byte_range = req.headers.get("range")
        if byte_range:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
            start = int(match.group(1)) if match and match.group(1) else None
            end = int(match.group(2)) if match and match.group(2) else size - 1
            if match and start is None and match.group(2):  # suffix range: the last N bytes
                start, end = max(size - int(match.group(2)), 0), size - 1
            if start is None or start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{size}", **headers})
            end = min(end, size - 1)
            status, stop = 206, end + 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(stop - start)
        return Response(status, b"" if req.method == "HEAD" else read(start, stop), headers)

    # ---- uploads and commits ---------------------------------------------------------------------
    def _preupload(self, req: Request, t, ns, name, rev) -> Response:
        """POST /api/{type}s/{id}/preupload/{rev} {files:[{path,size,sample}]}: lfs or regular, remote oid."""
        repo, user = self._readable_repo(req, t, ns, name)
        if user is None:
            raise HubError(401, "You must be authenticated to upload files")
        commit = repo.commits[repo.resolve(unquote(rev))[1]]
        files = []
        for f in req.json().get("files", []):
            info = {"path": f["path"], "uploadMode": "lfs" if is_lfs_path(f["path"], int(f.get("size", 0)))
                    else "regular", "shouldIgnore": False}
            existing = commit.tree.get(f["path"])
            if existing is not None:  # lets the client skip unchanged files
                info["oid"] = existing.sha256 if existing.lfs else existing.oid
            files.append(info)
        return Response.of_json({"files": files, "commitOid": commit.id})

    def _lfs_batch(self, req: Request, t, ns, name) -> Response:
        """POST /[{type}s/]{id}.git/info/lfs/objects/batch: upload actions for objects not stored yet."""
        repo, user = self._readable_repo(req, t or "models", ns, name)
        if user is None:
            raise HubError(401, "You must be authenticated to upload files")
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported")
        ref = (body.get("ref") or {}).get("name")
        if ref and not ref.startswith("refs/pr/"):
            self._require_write(user, repo)
        base = f"{req.base_url}/lfs-%s/{repo.repo_type}s/{repo.repo_id}"
        upload_base = (f"{self.cdn_url}/lfs-upload/{repo.repo_type}s/{repo.repo_id}"
                       if "lfs_upload_elsewhere" in self.variant else base % "upload")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid)) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
            elif oid in repo.lfs_oids:
                objects.append({"oid": oid, "size": size, "authenticated": True})
            else:
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{upload_base}/{oid}?size={size}"},
                    "verify": {"href": base % "verify", "header": {}}}})
        return Response.of_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                                content_type="application/vnd.git-lfs+json")

    def _upload_target(self, t: str, ns: str, name: str) -> Repo:
        """Upload/verify hrefs work like pre-signed URLs: no auth, the repo is in the path."""
        repo = self._find_repo(PLURAL[t], f"{unquote(ns)}/{unquote(name)}")
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _stats(self, req: Request) -> Response:
        """GET /_test/stats: counters a benchmark reads from another process (not a Hub route)."""
        return Response.of_json({"lfs_bytes_received": self.lfs_bytes_received})

    def _lfs_upload(self, req: Request, t, ns, name, oid) -> Response:
        """PUT /lfs-upload/{type}s/{id}/{oid}?size=N: the object bytes (checked against oid and size)."""
        repo = self._upload_target(t, ns, name)
        if req.param("size") is not None and int(req.param("size")) != len(req.body):
            raise HubError(400, "Uploaded content does not match the announced size")
        with self._outside_lock():
            if hashlib.sha256(req.body).hexdigest() != oid:
                raise HubError(400, "Uploaded content does not match its sha256 oid")
            self._lfs_store.put(oid, req.body)  # content-addressed and written via a temporary file
        self.lfs_bytes_received += len(req.body)
        repo.lfs_oids.add(oid)
        return Response(200)

    def _lfs_verify(self, req: Request, t, ns, name) -> Response:
        """POST /lfs-verify/{type}s/{id} {oid, size}: 200 once the object is stored."""
        repo = self._upload_target(t, ns, name)
        body = req.json()
        size = self._lfs_store.size(str(body.get("oid", "")))
        if body.get("oid") not in repo.lfs_oids or size is None or size != body.get("size"):
            raise HubError(404, "LFS object not found")
        return Response.of_json({"success": True})

    def _commit(self, req: Request, t, ns, name, rev) -> Response:
        """POST /api/{type}s/{id}/commit/{rev}[?create_pr=1] with an NDJSON body; all or nothing."""
        repo, user = self._readable_repo(req, t, ns, name)
        if user is None:
            raise HubError(401, "You must be authenticated to commit")
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Invalid NDJSON commit payload") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = lines[0].get("value") or {}
        summary, description = header.get("summary") or "", header.get("description") or ""
        if not summary.strip():
            raise HubError(400, "Commit summary must not be empty")
        parent = header.get("parentCommit")
        create_pr = req.flag("create_pr")
        ref, head = repo.resolve(unquote(rev))
        pr: Discussion | None = None
        if create_pr:
            if ref is None or not ref.startswith("refs/heads/"):
                raise HubError(404, f"Invalid rev id: {unquote(rev)} (a pull request needs a branch)",
                               "RevisionNotFound")
            if parent:
                matches = [sha for sha in repo.commits if sha.startswith(parent.lower())]
                if len(matches) != 1:
                    raise HubError(412, f"Parent commit {parent} not found in this repository")
                head = matches[0]
        else:
            if ref is None or ref.startswith("refs/tags/"):
                raise HubError(400, f"Cannot commit to '{unquote(rev)}': use a branch or a pull request ref")
            if ref.startswith("refs/pr/"):
                pr = repo.discussion(int(ref.rsplit("/", 1)[1]))
                if pr.status not in ("open", "draft"):
                    raise HubError(403, f"Pull request #{pr.num} is {pr.status}")
                if not (self._can_write(user, repo) or user.name == pr.author):
                    raise HubError(403, "Only the author of a pull request or a repo writer can push to it")
            else:
                self._require_write(user, repo)
            if parent and not head.startswith(parent.lower()):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = self._apply_operations(repo, dict(repo.commits[head].tree), lines[1:])
        # everything is valid: only now change state
        commit = self._add_commit(repo, [head], tree, summary, description, user.name)
        result = {"success": True, "commitOid": commit.id, "hookOutput": "",
                  "commitUrl": f"{self._repo_url(req.base_url, repo)}/commit/{commit.id}"}
        if create_pr:
            pr = self._open_discussion(repo, user, summary, description, True, "open", ref, head)
            repo.refs[pr.git_reference] = commit.id
            pr.events.append(self._event("commit", user.name, {"subject": summary, "oid": commit.id}))
            result["pullRequestUrl"] = f"{self._repo_url(req.base_url, repo)}/discussions/{pr.num}"
        elif pr is not None:
            repo.refs[ref] = commit.id
            pr.status = "open"
            pr.events.append(self._event("commit", user.name, {"subject": summary, "oid": commit.id}))
        else:
            repo.refs[ref] = commit.id
        return Response.of_json(result)

    def _apply_operations(self, repo: Repo, tree: dict[str, Blob], operations: list[dict]) -> dict[str, Blob]:
        """Apply commit payload lines to a copy of a tree; raises before touching any shared state."""
        for op in operations:
            key, value = op.get("key"), op.get("value") or {}
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True) \
                        if value.get("encoding", "base64") == "base64" else value.get("content", "").encode()
                except ValueError:
                    raise HubError(400, f"Invalid base64 content for {path}") from None
                if len(data) > LFS_THRESHOLD:
                    raise HubError(400, "Your push was rejected because it contains files larger than 10 MiB. "
                                        f"Please use LFS to store large files ({path}).")
                tree[path] = Blob(data, lfs=False)
            elif key == "lfsFile":
                oid = value.get("oid", "")
                size = self._lfs_store.size(oid) if oid in repo.lfs_oids else None
                found = self._xet.lookup(oid) if size is None and self._xet is not None else None
                if size is None and found is None:  # never uploaded to this repo, nor through Xet
                    raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                        f"does not exist: {path} (oid {oid})")
                size = size if found is None else found[1]
                if value.get("size") is not None and value["size"] != size:
                    raise HubError(400, f"LFS object size mismatch for {path}")
                tree[path] = self._lfs_blob(oid, size, found[0] if found else None)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in tree if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        return tree

    def _create_branch(self, req: Request, t, ns, name, branch) -> Response:
        """POST /api/{type}s/{id}/branch/{branch} {startingPoint}; 409 if it exists."""
        repo, _ = self._writable_repo(req, t, ns, name)
        branch = unquote(branch)
        if branch.startswith("refs/") or not branch:
            raise HubError(400, f"Invalid branch name: {branch}")
        if f"refs/heads/{branch}" in repo.refs:
            raise HubError(409, f"Branch {branch} already exists")
        _, sha = repo.resolve((req.json() if req.body else {}).get("startingPoint") or "main")
        repo.refs[f"refs/heads/{branch}"] = sha
        return Response.of_json({})

    def _delete_branch(self, req: Request, t, ns, name, branch) -> Response:
        """DELETE /api/{type}s/{id}/branch/{branch}."""
        repo, _ = self._writable_repo(req, t, ns, name)
        ref = f"refs/heads/{unquote(branch)}"
        if ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {unquote(branch)}", "RevisionNotFound")
        if ref == "refs/heads/main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.refs[ref]
        return Response.of_json({})

    # ---- discussions and pull requests -----------------------------------------------------------
    def _event(self, kind: str, author: str, data: dict) -> dict:
        return {"id": uuid.uuid4().hex[:24], "type": kind, "createdAt": now_iso(),
                "author": {"name": author, "type": "user", "_id": user_id(author)}, "data": data}

    def _comment_event(self, author: str, text: str) -> dict:
        at = now_iso()
        return self._event("comment", author, {
            "edited": False, "hidden": False, "numEdits": 0, "editors": [author], "reactions": [],
            "latest": {"raw": text, "html": f"<p>{html.escape(text)}</p>", "updatedAt": at,
                       "author": {"name": author, "type": "user"}},
            "history": []})

    def _open_discussion(self, repo: Repo, user: User, title: str, description: str, is_pr: bool,
                         status: str, base_ref: str | None = None, base_commit: str | None = None) -> Discussion:
        num = max((d.num for d in repo.discussions), default=0) + 1
        d = Discussion(num, title, user.name, is_pr, status, now_iso(), base_ref=base_ref, base_commit=base_commit)
        d.events.append(self._comment_event(user.name, description or title))
        repo.discussions.append(d)
        return d

    def _discussion_json(self, repo: Repo, d: Discussion) -> dict:
        return {"num": d.num, "title": d.title, "status": d.status, "createdAt": d.created_at,
                "isPullRequest": d.is_pull_request, "author": {"name": d.author, "type": "user"},
                "repo": {"name": repo.repo_id, "type": repo.repo_type}, "pinned": False, "topReactions": [],
                "numComments": sum(e["type"] == "comment" for e in d.events)}

    def _list_discussions(self, req: Request, t, ns, name) -> Response:
        """GET /api/{type}s/{id}/discussions?p=&type=&status=&author=: newest first, 50 a page."""
        repo, _ = self._readable_repo(req, t, ns, name)
        kind, status, author = req.param("type", "all"), req.param("status", "all"), req.param("author")
        selected = [d for d in reversed(repo.discussions)
                    if (kind == "all" or (kind == "pull_request") == d.is_pull_request)
                    and (status == "all" or (d.status in ("open", "draft")) == (status == "open"))
                    and (author is None or "ignore_author_filter" in self.variant or d.author == author)]
        size = DISCUSSIONS_PAGE_SIZE_PAGINATED if "paginate" in self.variant else DISCUSSIONS_PAGE_SIZE
        start = int(req.param("p", "0")) * size
        return Response.of_json({
            "discussions": [self._discussion_json(repo, d) for d in selected[start:start + size]],
            "count": len(selected), "start": start,
            "numClosedDiscussions": sum(d.status in ("closed", "merged") for d in repo.discussions)})

    def _discussion_details(self, req: Request, t, ns, name, num) -> Response:
        """GET /api/{type}s/{id}/discussions/{num}: events, and for PRs base ref, conflicts and diff."""
        repo, _ = self._readable_repo(req, t, ns, name)
        d = repo.discussion(int(num))
        data = {**self._discussion_json(repo, d), "events": d.events}
        if d.is_pull_request:
            old, new = repo.commits[d.base_commit].tree, repo.commits[repo.refs[d.git_reference]].tree
            changed = sorted(p for p in set(old) | set(new) if _oid(old, p) != _oid(new, p))
            data.update(changes={"base": d.base_ref}, filesWithConflicts=[],
                        diff="".join(f"diff --git a/{p} b/{p}\n" for p in changed))
        return Response.of_json(data)

    def _create_discussion(self, req: Request, t, ns, name) -> Response:
        """POST /api/{type}s/{id}/discussions {title, description, pullRequest}; PRs start as drafts."""
        repo, user = self._readable_repo(req, t, ns, name)
        if user is None:
            raise HubError(401, "You must be authenticated to open a discussion")
        body = req.json()
        if not (body.get("title") or "").strip():
            raise HubError(400, "A discussion needs a title")
        is_pr = bool(body.get("pullRequest"))
        d = self._open_discussion(repo, user, body["title"].strip(), body.get("description") or "", is_pr,
                                  "draft" if is_pr else "open", "refs/heads/main" if is_pr else None,
                                  repo.refs["refs/heads/main"] if is_pr else None)
        if is_pr:
            repo.refs[d.git_reference] = d.base_commit
        return Response.of_json({"num": d.num, "pullRequest": is_pr,
                                 "url": f"{self._repo_url(req.base_url, repo)}/discussions/{d.num}"})

    def _discussion_action(self, req: Request, t, ns, name, num, action) -> Response:
        """POST .../discussions/{num}/comment {comment} | .../status {status, comment} (PATCH ok too)."""
        repo, user = self._readable_repo(req, t, ns, name)
        if user is None:
            raise HubError(401, "You must be authenticated to take part in discussions")
        d = repo.discussion(int(num))
        body = req.json() if req.body else {}
        if action == "comment":
            if not (body.get("comment") or "").strip():
                raise HubError(400, "A comment can't be empty")
            event = self._comment_event(user.name, body["comment"])
            d.events.append(event)
            return Response.of_json({"newMessage": event})
        if action == "status":
            if body.get("status") not in ("open", "closed"):
                raise HubError(400, "Status must be 'open' or 'closed'")
            if not (self._can_write(user, repo) or user.name == d.author):
                raise HubError(403, "Only the author or a repo writer can change the status")
            if d.status == "merged":
                raise HubError(400, "A merged pull request can't change status")
            if (body.get("comment") or "").strip():
                d.events.append(self._comment_event(user.name, body["comment"]))
            d.status = body["status"]
            event = self._event("status-change", user.name, {"status": d.status})
            d.events.append(event)
            return Response.of_json({"newStatus": event})


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _split_revision(rest: str) -> tuple[str, str]:
    """Split ``{rev}/{path}`` from a raw URL tail; the revision is one encoded segment, except that a
    literal ``refs/pr/N`` (or ``refs/heads/x``...) spelled with slashes is accepted too."""
    parts = rest.split("/")
    if unquote(parts[0]) == "refs" and len(parts) >= 3:
        return "/".join(unquote(p) for p in parts[:3]), unquote("/".join(parts[3:]))
    return unquote(parts[0]), unquote("/".join(parts[1:]))


def _oid(tree: dict[str, Blob], path: str) -> str | None:
    blob = tree.get(path)
    return blob.oid if blob is not None else None


# --------------------------------------------------------------------------------------------
# Standalone: python -m tests.hub_server (for benchmarks, in a process of its own)
# --------------------------------------------------------------------------------------------
def _parse_user(spec: str) -> tuple[str, str, tuple[str, ...]]:
    name, _, rest = spec.partition(":")
    token, _, orgs = rest.partition(":")
    if not name or not token:
        raise ValueError(f"--user wants NAME:TOKEN[:ORG,ORG], got {spec!r}")
    return name, token, tuple(o for o in orgs.split(",") if o)


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted; print one JSON line {"url", "cdn_url", "cas", "bandwidth"} once listening."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m tests.hub_server", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see the printed url)")
    parser.add_argument("--data", help="folder for LFS objects (DATA/lfs) and the Xet CAS (DATA/xet-cas); "
                                       "default: LFS objects in memory, CAS in a temporary folder")
    parser.add_argument("--bandwidth", type=float, help="bytes/s each way, shared by all connections (e.g. 2e8)")
    parser.add_argument("--xet", action="store_true", help="speak Xet (local:// CAS served by hf_xet)")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:TOKEN[:ORG,ORG]",
                        help="a user with a write token (repeatable)")
    parser.add_argument("--seed", action="append", default=[], metavar="REPO_ID=FOLDER",
                        help="create a model repo holding FOLDER's files in one commit (repeatable); "
                             "its namespace must be a --user")
    args = parser.parse_args(argv)
    data = Path(args.data) if args.data else None
    hub = HubServer(args.host, args.port, bandwidth=args.bandwidth, data=data,
                    xet=(data / "xet-cas" if data else True) if args.xet else False)
    for spec in args.user:
        name, token, orgs = _parse_user(spec)
        hub.add_user(name, token, orgs)
    for spec in args.seed:
        repo_id, _, folder = spec.partition("=")
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        hub.create_repo(repo_id, files=files)
        if hub.xet:  # into the CAS now, not on the first download the benchmark times
            with hub._lock:
                repo = hub._repo("model", repo_id)
                for blob in repo.commits[repo.refs["refs/heads/main"]].tree.values():
                    hub._in_xet(blob)
    hub.start()
    print(json.dumps({"url": hub.url, "cdn_url": hub.cdn_url, "cas": str(hub._xet.folder) if hub._xet else None,
                      "bandwidth": args.bandwidth}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    hub.stop()



# --------------------------------------------------------------------------------------------
# Jobs (switchable: ``enable_jobs(hub, root=...)``; off by default)
# --------------------------------------------------------------------------------------------
# The routes and JSON that ``huggingface_hub`` 2.x's ``HfApi.run_job`` / ``inspect_job`` /
# ``fetch_job_logs`` / ``cancel_job`` / ``list_jobs`` use (hf_api.py, _jobs_api.py):
#   POST /api/jobs/{ns}              body: _create_job_spec's {command, arguments, environment, flavor,
#                                    secrets?, timeoutSeconds?, labels?, dockerImage | spaceId}
#   GET  /api/jobs/{ns}              ?stage=RUNNING&label=k=v (repeatable); a JSON list of JobInfo
#   GET  /api/jobs/{ns}/{id}         JobInfo: {id, createdAt, ..., status: {stage, message}, owner: {...}}
#   GET  /api/jobs/{ns}/{id}/logs    Server-Sent Events, "data: {"data": line, "timestamp": iso}"
#   POST /api/jobs/{ns}/{id}/cancel
# Stages are JobStage's: SCHEDULING, RUNNING, COMPLETED, ERROR, CANCELED, DELETED. The image is
# ignored: each job runs here as a local subprocess (``python`` -> this interpreter) in ``root``,
# with only the job's environment and secrets, plus PATH, PYTHONPATH=root and HF_ENDPOINT=this
# server. The status messages for a failure or a timeout are this server's own wording.
JOB_TERMINAL = ("COMPLETED", "ERROR", "CANCELED", "DELETED")


@dataclass
class HubJob:
    id: str
    owner: str
    spec: dict
    created: str
    process: object = None
    stage: str = "SCHEDULING"
    message: str | None = None
    started: str | None = None
    finished: str | None = None
    logs: list = field(default_factory=list)  # (iso timestamp, line)
    timed_out: bool = False

    def info(self, hub: "HubServer") -> dict:
        spec = self.spec
        return {
            "id": self.id, "createdAt": self.created, "startedAt": self.started, "finishedAt": self.finished,
            "dockerImage": spec.get("dockerImage"), "spaceId": spec.get("spaceId"),
            "command": spec.get("command"), "arguments": spec.get("arguments") or [],
            "environment": spec.get("environment") or {},
            "secrets": {name: None for name in spec.get("secrets") or {}},  # names only, never values
            "flavor": spec.get("flavor"), "labels": spec.get("labels"),
            "status": {"stage": self.stage, "message": self.message},
            "owner": {"id": user_id(self.owner), "name": self.owner, "type": "user"},
        }


class HubJobs:
    """The Jobs API on a ``HubServer``: state, the routes, and the subprocesses that run jobs.

    ``no_credits``: run_job answers 402, as the Hub does for an account without credits.
    ``max_seconds``: a cap on every job's run time (besides its own timeoutSeconds).
    """

    def __init__(self, hub: "HubServer", root: Path, python: str):
        self.hub, self.root, self.python = hub, Path(root), python
        self.jobs: dict[str, HubJob] = {}
        self.no_credits = False
        self.created: list[str] = []  # ids in creation order, for "no duplicate Job" checks

    def routes(self) -> list[tuple[str, re.Pattern, object]]:
        table = [
            ("POST", r"/api/jobs/(?P<ns>[^/]+)", self._run),
            ("GET", r"/api/jobs/(?P<ns>[^/]+)", self._list),
            ("GET", r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[0-9a-f]{24})", self._inspect),
            ("GET", r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[0-9a-f]{24})/logs", self._logs),
            ("POST", r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[0-9a-f]{24})/cancel", self._cancel),
        ]
        return compile_routes(table)

    # ---- routes ------------------------------------------------------------------------------------
    def _caller(self, req: Request, ns: str) -> User:
        user = self.hub._auth(req)
        if user is None:
            raise HubError(401, "You must be authenticated to use Jobs")
        if ns != user.name and ns not in user.orgs:
            raise HubError(403, f"You cannot run or see jobs in namespace {ns}")
        return user

    def _job(self, req: Request, ns: str, job_id: str) -> HubJob:
        self._caller(req, ns)
        job = self.jobs.get(job_id)
        if job is None or job.owner != ns:
            raise HubError(404, "Job not found")
        return job

    def _run(self, req: Request, ns: str) -> Response:
        self._caller(req, ns)
        if self.no_credits:
            raise HubError(402, "You must have a positive credit balance to run Jobs. Add credits to your "
                                "account or organization.")
        spec = req.json()
        if not isinstance(spec.get("command"), list) or not spec["command"]:
            raise HubError(400, "command is required")
        if bool(spec.get("dockerImage")) == bool(spec.get("spaceId")):
            raise HubError(400, "exactly one of dockerImage and spaceId is required")
        job = HubJob(id=uuid.uuid4().hex[:24], owner=ns, spec=spec, created=now_iso())
        self.jobs[job.id] = job
        self.created.append(job.id)
        threading.Thread(target=self._execute, args=(job,), name=f"hub-job-{job.id}", daemon=True).start()
        return Response.of_json(job.info(self.hub))

    def _list(self, req: Request, ns: str) -> Response:
        self._caller(req, ns)
        stages = set(req.query.get("stage", []))
        labels = [tuple(item.split("=", 1)) for item in req.query.get("label", []) if "=" in item]
        found = [j.info(self.hub) for j in self.jobs.values() if j.owner == ns and (not stages or j.stage in stages)
                 and all((j.spec.get("labels") or {}).get(k) == v for k, v in labels)]
        return Response.of_json(found)

    def _inspect(self, req: Request, ns: str, job_id: str) -> Response:
        return Response.of_json(self._job(req, ns, job_id).info(self.hub))

    def _logs(self, req: Request, ns: str, job_id: str) -> Response:
        job = self._job(req, ns, job_id)
        body = "".join(f"data: {json.dumps({'data': line, 'timestamp': ts})}\n\n" for ts, line in list(job.logs))
        return Response(200, body.encode(), {"Content-Type": "text/event-stream"})

    def _cancel(self, req: Request, ns: str, job_id: str) -> Response:
        job = self._job(req, ns, job_id)
        if job.stage not in JOB_TERMINAL:
            self._finish(job, "CANCELED", None)
            self._kill(job)
        return Response.of_json({})

    # ---- running -----------------------------------------------------------------------------------
    def _execute(self, job: HubJob) -> None:
        import subprocess

        spec = job.spec
        command = [self.python if word == "python" else word for word in spec["command"]] + list(
            spec.get("arguments") or [])
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(self.root), "HF_ENDPOINT": self.hub.url,
               "HF_HUB_DISABLE_XET": os.environ.get("HF_HUB_DISABLE_XET", "1"),
               "HF_HOME": tempfile.mkdtemp(prefix="hub-job-home-"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               **{k: str(v) for k, v in (spec.get("environment") or {}).items()},
               **{k: str(v) for k, v in (spec.get("secrets") or {}).items()}}
        env["HF_ENDPOINT"] = self.hub.url
        with self.hub._lock:
            if job.stage != "SCHEDULING":  # cancelled before it started
                return
            job.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
            job.stage, job.started = "RUNNING", now_iso()
        deadline = spec.get("timeoutSeconds")

        def watch() -> None:
            try:
                job.process.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                with self.hub._lock:
                    if job.stage == "RUNNING":
                        job.timed_out = True
                        self._finish(job, "ERROR", f"Job timeout: ran for more than {deadline} seconds")
                self._kill(job)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for line in job.process.stdout:
            job.logs.append((now_iso(), line.rstrip("\n")))
        code = job.process.wait()
        watcher.join()
        with self.hub._lock:
            if job.stage == "RUNNING":
                if code == 0:
                    self._finish(job, "COMPLETED", None)
                else:
                    self._finish(job, "ERROR", f"Job failed with exit code: {code}")

    def _finish(self, job: HubJob, stage: str, message: str | None) -> None:
        job.stage, job.message, job.finished = stage, message, now_iso()

    @staticmethod
    def _kill(job: HubJob) -> None:
        import signal

        if job.process is not None and job.process.poll() is None:
            try:
                os.killpg(job.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for job in list(self.jobs.values()):
            self._kill(job)


def enable_jobs(hub: HubServer, *, root: str | Path, python: str | None = None) -> HubJobs:
    """Switch on the Jobs routes on ``hub`` (loopback only, like the server); returns their state."""
    import sys

    jobs = HubJobs(hub, Path(root), python or sys.executable)
    with hub._lock:
        disable_jobs(hub)
        hub.jobs_api = jobs
        hub._routes = jobs.routes() + hub._routes
    return jobs


def disable_jobs(hub: HubServer) -> None:
    """Remove the Jobs routes again, killing any job still running."""
    with hub._lock:
        jobs = getattr(hub, "jobs_api", None)
        if jobs is None:
            return
        jobs.stop_all()
        hub._routes = [r for r in hub._routes if getattr(r[2], "__self__", None) is not jobs]
        hub.jobs_api = None


if __name__ == "__main__":
    main()
