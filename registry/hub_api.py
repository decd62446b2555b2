"""The Hub HTTP API subset, as plain functions of a request (no sockets here).

``HubApi.dispatch(request) -> response`` routes one request, and
``HubApi.refuse_early(request)`` refuses a write from its headers alone before
the server reads its body. The HTTP side lives in :mod:`asgi_app` (served by
:mod:`server`); keeping the two apart lets tests drive the API in
process and keeps each module to one job. Who may do what:

* public repos: anyone reads, no token needed;
* private repos: only their namespace (the user, or members of the org) sees
  them; everyone else gets 404 ``RepoNotFound`` exactly as if they did not exist;
* writes (create, delete, commit, settings, branches): a write token of the
  namespace's user or of a member of the namespace's organization.
* a namespace's storage usage (``GET /api/namespaces/{namespace}/storage``, not
  part of the Hub's API): a token of that user or of a member of that
  organization; everyone else gets 404 ``NamespaceNotFound``, as for a namespace
  that does not exist.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import IO, Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlencode

from peftkit.hub_rules.cards import DOWNLOAD_COUNTING_FILES
from peftkit.hub_rules.names import is_commit_sha

from .accounts import Principal
from .blobs import StagedBlob
from .cards import validate_card
from .content_safety import file_headers
from .errors import (
    BadRequest,
    EntryNotFound,
    MalformedPayload,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    RegistryError,
    RepoExists,
    RepoNotFound,
    Unauthorized,
)
from .messages import check_description, check_summary
from .names import split_repo_id, validate_path, validate_revision
from .payloads import parse_commit, parse_json_object, parse_preupload
from .serialize import (
    commit_json,
    file_item,
    folder_item,
    json_array_within,
    model_json,
    refs_json,
    tree_json,
)
from .store import RegistryStore, RepoInfo

#: How a 401 names the token command: run on the server, on the data folder it serves (a client cannot know it).
_ON_THE_SERVER = "--data DIR` on the server (DIR: the data folder it serves)"

JSON_TYPE = "application/json"
_MAX_QUERY_INT = 2**31 - 1  # offsets and limits beyond this are nonsense (and overflow SQLite's integers)
#: What each write is called in its 401/403 messages ("committing needs a token with write access"), for the writes
#: under /api/models/{org}/{name}/<endpoint>/..., by endpoint, and for those naming their repo in the
#: body, by path. HubApi.refuse_early (before the body is read) and each endpoint's own check say the same.
REPO_WRITE_ACTIONS = {"commit": "committing", "preupload": "uploading", "branch": "changing branches",
                      "settings": "changing repo settings", "tag": "changing tags",
                      "super-squash": "squashing history"}
BODY_WRITE_ACTIONS = {"repos/create": "creating a repo", "repos/delete": "deleting a repo",
                      "repos/move": "moving a repo"}


@dataclass
class ApiConfig:
    max_upload_bytes: int = 512 * 1024 * 1024
    max_json_bytes: int = 16 * 1024 * 1024
    list_page_size: int = 100
    # A search page that carries each result's card (cardData=1) or card and file list (full=1) ends at the
    # result that takes it past this many bytes of JSON (a card's front matter alone may be 128 KiB, so 100
    # of them were ~12 MiB); the Link header gives the rest, and model_info still sends one repo in full.
    list_details_bytes: int = 1024 * 1024
    tree_page_size: int = 1000
    # Files (additions plus deletions) one commit may carry; more get a 413 saying how to split.
    max_commit_files: int = 20_000
    # The POSTs anyone may send without a token (paths-info, validate-yaml) are small: a parsed JSON body
    # takes ~30 times its size in memory, so their bodies are capped well below max_json_bytes.
    max_read_post_bytes: int = 2 * 1024 * 1024
    public_url: str | None = None  # e.g. https://hub.example.com when behind a proxy


@dataclass
class Request:
    method: str
    path: str  # raw (still percent-encoded), without the query string
    query: dict[str, list[str]]
    headers: Message
    base_url: str
    principal: Principal | None = None
    body: IO[bytes] | None = None
    # Why the Authorization header sent gave no principal (an unknown token, not a bearer token); None when
    # there was none or it was recognised.
    auth_error: str | None = None
    # The client's address as the server saw it (or as a trusted proxy said);
    # None where unknown (in-process tests). Used for per-client accounting.
    client_address: str | None = None

    @property
    def segments(self) -> list[str]:
        return self.path.strip("/").split("/") if self.path.strip("/") else []

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def json(self, what: str, *, allow_empty: bool = False) -> dict[str, Any]:
        raw = self.body.read() if self.body is not None else b""
        if allow_empty and not raw.strip():
            return {}
        return parse_json_object(raw, what)


@dataclass
class Response:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: Callable[[], BinaryIO] | None = None  # opens the content streamed instead of body
    file_range: tuple[int, int] | None = None  # inclusive byte range of ``file``
    close: bool = False

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> "Response":
        body = json.dumps(data, separators=(",", ":")).encode("utf-8")
        return cls(status, [("Content-Type", JSON_TYPE), *(headers or [])], body)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class RepoMoved(RegistryError):
    """The repo was moved: a redirect to ``location``, the same request under its new name."""

    status = 307

    def __init__(self, message: str, *, location: str) -> None:
        super().__init__(message)
        self.location = location


def error_response(exc: RegistryError, body_extra: dict[str, Any] | None = None) -> Response:
    message = " ".join(exc.message.split())  # one line: it travels in a header too
    headers = [("X-Error-Code", exc.code), ("X-Error-Message", message)]
    commit = getattr(exc, "commit", None)
    if commit:
        headers.append(("X-Repo-Commit", commit))
    if isinstance(exc, RangeNotSatisfiable):
        headers.append(("Content-Range", f"bytes */{exc.size}"))
    return Response.json({"error": message, **(body_extra or {})}, exc.status, headers)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` / ``a-`` / ``-n`` -> inclusive (start, end); None for the whole file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unsupported forms: serve the whole file (allowed by RFC 9110)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise RangeNotSatisfiable(f"range {header!r} is empty", size=size)
            return (max(0, size - n), size - 1) if size else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        if size == 0 and start == 0:
            return None
        raise RangeNotSatisfiable(f"range {header!r} is outside the file ({size} bytes)", size=size)
    return start, min(end, size - 1)


class HubApi:
    """Routes Hub API requests to a :class:`RegistryStore`."""

    def __init__(self, store: RegistryStore, config: ApiConfig | None = None) -> None:
        self.store = store
        self.config = config or ApiConfig()

    # ------------------------------------------------------------ routing
    def body_limit(self, method: str, path: str) -> int:
        """How many request-body bytes a route accepts (commits get the upload limit).

        Only the API's writes and read-only POSTs take a body: a GET or HEAD, and any request outside
        ``/api/`` (the root, ``/resolve/``, what no endpoint answers), take none, so a body sent there is
        refused from its headers instead of being read and spooled for nothing."""
        segs = path.strip("/").split("/")
        if method in ("GET", "HEAD") or segs[0] != "api":
            return 0
        if method == "POST" and len(segs) >= 6 and segs[:2] == ["api", "models"] and segs[4] == "commit":
            return self.config.max_upload_bytes
        if segs == ["api", "validate-yaml"] or (len(segs) >= 6 and segs[:2] == ["api", "models"]
                                                and segs[4] == "paths-info"):
            return min(self.config.max_read_post_bytes, self.config.max_upload_bytes)
        return min(self.config.max_json_bytes, self.config.max_upload_bytes)

    def refuse_early(self, req: Request) -> None:
        """Refuse a write from its method, path and principal alone, before any body byte is read.

        The server calls this first, so an unauthenticated or unauthorized
        upload costs nothing. It raises what :meth:`dispatch` would (401, 403,
        or 404 for a private repo the caller cannot see); dispatch still makes
        every check itself. Every method but GET/HEAD under ``/api/`` counts as
        a write except the read-only POSTs (``paths-info``, ``validate-yaml``). The 401 without a token
        names the action as the endpoint's own check does ("moving a repo", "changing tags", ...).
        """
        s = req.segments
        if req.method in ("GET", "HEAD") or not s or s[0] != "api" or s == ["api", "validate-yaml"]:
            return
        if len(s) >= 5 and s[1] == "models":
            if s[4] == "paths-info":
                return
            self._writable(req, self._repo_id(s[2], s[3]), REPO_WRITE_ACTIONS.get(s[4], "changing a repo"))
            return
        # The endpoints that name their repo in the body; only a path that is no endpoint is "this request".
        principal = self._require_principal(req, BODY_WRITE_ACTIONS.get("/".join(s[1:]), "this request"))
        principal.check_write(principal.user)  # a read-only token: 403 before the body

    def dispatch(self, req: Request) -> Response:
        try:
            return self._route(req)
        except RepoMoved as exc:
            response = error_response(exc)
            response.headers.append(("Location", exc.location))
            return response
        except RepoExists as exc:
            return error_response(exc, {"url": self._repo_url(req, exc.repo_id)})
        except RegistryError as exc:
            return error_response(exc)

    def _route(self, req: Request) -> Response:
        s = req.segments
        m = req.method
        if not s:
            return Response.json({"name": "peftkit registry", "api": "huggingface-hub-subset"})
        if s[0] == "api":
            rest = s[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self.whoami(req)
            if len(rest) == 3 and rest[0] == "namespaces" and rest[2] == "storage" and m == "GET":
                return self.namespace_storage(req, unquote(rest[1]))
            if rest == ["repos", "create"] and m == "POST":
                return self.create_repo(req)
            if rest == ["repos", "delete"] and m == "DELETE":
                return self.delete_repo(req)
            if rest == ["repos", "move"] and m == "POST":
                return self.move_repo(req)
            if rest == ["validate-yaml"] and m == "POST":
                return self.validate_yaml(req)
            if rest == ["health"] and m == "GET":
                return Response.json({"status": "ok"})
            if rest == ["agent-harnesses"] and m == "GET":
                # The `hf` CLI asks for the Hub's list of AI-agent harnesses on every run
                # (cached for a day once answered); this registry knows none.
                return Response.json({"standardEnvVars": [], "harnesses": {}})
            if rest == ["models"] and m == "GET":
                return self.list_models(req)
            if rest and rest[0] in ("datasets", "spaces", "kernels", "buckets"):
                raise NotFound(f"this registry serves model repos only, not {rest[0]}")
            if len(rest) >= 3 and rest[0] == "models":
                repo_id = self._repo_id(rest[1], rest[2])
                tail = rest[3:]
                if not tail and m == "GET":
                    return self.model_info(req, repo_id, None)
                if len(tail) == 2 and tail[0] == "revision" and m == "GET":
                    return self.model_info(req, repo_id, unquote(tail[1]))
                if len(tail) >= 2 and tail[0] == "tree" and m == "GET":
                    return self.tree(req, repo_id, unquote(tail[1]), unquote("/".join(tail[2:])))
                if len(tail) == 2 and tail[0] == "preupload" and m == "POST":
                    return self.preupload(req, repo_id, unquote(tail[1]))
                if len(tail) == 2 and tail[0] == "commit" and m == "POST":
                    return self.commit(req, repo_id, unquote(tail[1]))
                if len(tail) == 2 and tail[0] == "paths-info" and m == "POST":
                    return self.paths_info(req, repo_id, unquote(tail[1]))
                if tail == ["refs"] and m == "GET":
                    return self.refs(req, repo_id)
                if len(tail) == 2 and tail[0] == "commits" and m == "GET":
                    return self.commits(req, repo_id, unquote(tail[1]))
                if len(tail) >= 2 and tail[0] == "branch" and m in ("POST", "DELETE"):
                    return self.branch(req, repo_id, unquote("/".join(tail[1:])))
                if tail == ["settings"] and m == "PUT":
                    return self.settings(req, repo_id)
                if len(tail) >= 2 and tail[0] == "tag" and m in ("POST", "DELETE"):
                    return self.tag(req, repo_id, unquote("/".join(tail[1:])))
                if len(tail) >= 2 and tail[0] == "super-squash" and m == "POST":
                    return self.super_squash(req, repo_id, unquote("/".join(tail[1:])))
        elif len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve(req, self._repo_id(s[0], s[1]), unquote(s[3]), unquote("/".join(s[4:])))
        raise NotFound(f"no such endpoint: {m} /{'/'.join(s)}")

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _repo_id(namespace: str, name: str) -> str:
        repo_id = f"{unquote(namespace)}/{unquote(name)}"
        split_repo_id(repo_id)
        return repo_id

    @staticmethod
    def _base(req: Request) -> str:
        """Where links point: the public URL, or the address the client used where it is one the server
        vouches for (``registry/origin.py`` chose it for the request)."""
        return req.base_url.rstrip("/")

    def _located(self, req: Request, location: str) -> str:
        """A redirect's ``Location`` for a same-server path: absolute under the public URL (it may carry a
        path prefix the server never sees), relative for a client that came by another address."""
        public = (self.config.public_url or "").rstrip("/")
        return public + location if public and self._base(req) == public else location

    def _repo_url(self, req: Request, repo_id: str) -> str:
        return f"{self._base(req)}/{repo_id}"

    @staticmethod
    def _can_see(req: Request, info: RepoInfo) -> bool:
        return not info.private or (req.principal is not None and req.principal.can_read(info.namespace))

    def _visible_info(self, req: Request, repo_id: str, revision: str | None = None) -> RepoInfo:
        """Repo info, or 404 RepoNotFound when it is private and not the caller's (or 307 to a moved repo)."""
        try:
            info = self.store.repo_info(repo_id, None)
        except RepoNotFound:
            self._follow_move(req, repo_id)
            raise RepoNotFound(f"repository '{repo_id}' not found") from None
        if not self._can_see(req, info):
            raise RepoNotFound(f"repository '{repo_id}' not found")
        if revision is not None:
            info = self.store.repo_info(info.repo_id, revision)
        return info

    def _follow_move(self, req: Request, repo_id: str) -> None:
        """For a repo moved away from ``repo_id``: reads get a same-host 307 to the new name (clients follow
        it), writes a 404 naming the new name. Returns quietly when nothing visible to the caller moved."""
        target = self.store.redirect_of(repo_id)
        if target is None:
            return
        try:
            if not self._can_see(req, self.store.repo_info(target)):
                return
        except RepoNotFound:
            return
        if req.method not in ("GET", "HEAD"):
            raise RepoNotFound(f"repository '{repo_id}' was moved to '{target}'; use the new name")
        segs = list(req.segments)
        at = 2 if segs and segs[0] == "api" else 0
        segs[at : at + 2] = [quote(part, safe="") for part in target.split("/")]
        location = "/" + "/".join(segs)
        if req.query:
            location += "?" + urlencode([(k, v) for k, values in req.query.items() for v in values])
        raise RepoMoved(f"repository '{repo_id}' was moved to '{target}'", location=self._located(req, location))

    @staticmethod
    def _require_principal(req: Request, action: str, *, log_in_at: str | None = None) -> Principal:
        """The caller, else 401. A write asks for a write token; a read that needs an account (``log_in_at``:
        the registry's URL) says to log in there, with a token of any scope."""
        if req.principal is None and req.auth_error:
            raise Unauthorized(f"{req.auth_error}; create one with `peftkit registry token create USER --write "
                               f"{_ON_THE_SERVER}")
        if req.principal is None and log_in_at is not None:
            raise Unauthorized(
                f"{action} needs you to log in: run `peftkit hub login --hub {log_in_at}` with a token from "
                f"`peftkit registry token create USER {_ON_THE_SERVER}, or pass it as 'Authorization: Bearer <token>'"
            )
        if req.principal is None:
            raise Unauthorized(
                f"{action} needs a token with write access: create one with "
                f"`peftkit registry token create USER --write {_ON_THE_SERVER} and pass it as "
                "'Authorization: Bearer <token>'"
            )
        return req.principal

    def _writable(self, req: Request, repo_id: str, action: str) -> RepoInfo:
        principal = self._require_principal(req, action)
        info = self._visible_info(req, repo_id)
        principal.check_write(info.namespace, self.store.accounts.kind)
        return info

    def _paginate(self, req: Request, path: str, page: int, offset: int, has_more: bool) -> list[tuple[str, str]]:
        """A ``Link: <next>; rel=\"next\"`` header (the client follows it) when more results exist."""
        if not has_more:
            return []
        params = [(k, v) for k, values in req.query.items() if k != "offset" for v in values]
        params.append(("offset", str(offset + page)))
        return [("Link", f'<{self._base(req)}{path}?{urlencode(params)}>; rel="next"')]

    @staticmethod
    def _int_arg(req: Request, name: str, default: int | None) -> int | None:
        value = req.arg(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise BadRequest(f"query parameter '{name}' must be an integer, got {value!r}") from None
        if number < 0:
            raise BadRequest(f"query parameter '{name}' must not be negative, got {number}")
        if number > _MAX_QUERY_INT:
            raise BadRequest(f"query parameter '{name}' must be at most {_MAX_QUERY_INT}, got {value[:20]}...")
        return number

    # ---------------------------------------------------------- accounts
    def whoami(self, req: Request) -> Response:
        if req.principal is None:
            raise Unauthorized("Invalid credentials in Authorization header")  # the client's own wording
        p = req.principal
        return Response.json({
            "type": "user",
            "id": p.user,
            "name": p.user,
            "fullname": p.user,
            "orgs": [{"type": "org", "name": o, "roleInOrg": "write"} for o in sorted(p.orgs)],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": p.token_name or p.token_id, "role": "write" if p.write else "read"},
            },
        })

    def namespace_storage(self, req: Request, namespace: str) -> Response:
        """GET /api/namespaces/{namespace}/storage: what ``registry quota show --json`` prints for it.

        Private, as on the account pages: only the user, or a member of the organization, reads it. Both
        checks use the token alone, before any database work; anyone else gets the 404 a namespace that does
        not exist gets, so the answer tells nobody which namespaces exist. Costs one indexed sum."""
        principal = self._require_principal(req, "reading a namespace's storage usage", log_in_at=self._base(req))
        own = next((name for name in (principal.user, *sorted(principal.orgs)) if name.lower() == namespace.lower()),
                   None)
        if own is None:
            raise NotFound(
                f"namespace '{namespace}' not found: you can read the storage usage of your own namespace "
                f"('{principal.user}') and of the organizations you are a member of",
                code="NamespaceNotFound",
            )
        (usage,) = self.store.quotas.usage([own])
        return Response.json(usage.to_json())

    # ------------------------------------------------------------- repos
    def create_repo(self, req: Request) -> Response:
        principal = self._require_principal(req, BODY_WRITE_ACTIONS["repos/create"])
        data = req.json("create repo")
        name, org = data.get("name"), data.get("organization")
        repo_type = data.get("type") or "model"
        if repo_type != "model":
            raise BadRequest(f"this registry serves model repos only, not {repo_type!r}")
        if not isinstance(name, str) or (org is not None and not isinstance(org, str)):
            raise MalformedPayload("create repo: 'name' must be a string and 'organization' a string or null")
        if "/" in name and org is None:
            org, name = name.split("/", 1)
        namespace = org or principal.user
        repo_id = f"{namespace}/{name}"
        split_repo_id(repo_id)
        private = data.get("private")
        if private is not None and not isinstance(private, bool):
            raise MalformedPayload(f"create repo: 'private' must be true or false, got {private!r}")
        visibility = data.get("visibility")
        if visibility is not None:
            if visibility not in ("private", "public"):
                raise BadRequest(f"visibility must be 'private' or 'public', got {visibility!r}")
            private = visibility == "private"
        principal.check_write(namespace, self.store.accounts.kind)
        info = self.store.create_repo(repo_id, private=bool(private), owner=principal.user)
        return Response.json({"url": self._repo_url(req, info.repo_id), "name": info.repo_id, "id": info.repo_id})

    def delete_repo(self, req: Request) -> Response:
        principal = self._require_principal(req, BODY_WRITE_ACTIONS["repos/delete"])
        data = req.json("delete repo")
        name, org = data.get("name"), data.get("organization")
        if not isinstance(name, str) or (org is not None and not isinstance(org, str)):
            raise MalformedPayload("delete repo: 'name' must be a string and 'organization' a string or null")
        repo_id = f"{org or principal.user}/{name}"
        split_repo_id(repo_id)
        info = self._writable(req, repo_id, BODY_WRITE_ACTIONS["repos/delete"])
        self.store.delete_repo(info.repo_id)
        return Response.json({})

    def settings(self, req: Request, repo_id: str) -> Response:
        info = self._writable(req, repo_id, REPO_WRITE_ACTIONS["settings"])
        data = req.json("repo settings")
        private, visibility = data.get("private"), data.get("visibility")
        if private is not None and not isinstance(private, bool):
            raise MalformedPayload(f"repo settings: 'private' must be true or false, got {private!r}")
        if visibility is not None:
            if visibility not in ("private", "public"):
                raise BadRequest(f"visibility must be 'private' or 'public', got {visibility!r}")
            private = visibility == "private"
        if data.get("gated") not in (None, False):
            raise BadRequest("gated repos are not supported by this registry; use a private repo")
        if private is not None:
            self.store.set_private(info.repo_id, private)
        return Response.json({})

    def validate_yaml(self, req: Request) -> Response:
        data = req.json("validate-yaml")
        content = data.get("content")
        if not isinstance(content, str):
            raise MalformedPayload("validate-yaml: 'content' must be the README text")
        errors, warnings = validate_card(content)
        return Response.json({"errors": errors, "warnings": warnings}, 400 if errors else 200)

    # -------------------------------------------------------------- read
    def model_info(self, req: Request, repo_id: str, revision: str | None) -> Response:
        info = self._visible_info(req, repo_id, revision)
        _, files = self.store.snapshot(info.repo_id, info.sha)
        return Response.json(model_json(info, files=list(files.values())))

    def list_models(self, req: Request) -> Response:
        tags: list[str] = []
        facets: dict[str, str] = {}
        for value in req.query.get("filter", []):
            kind, _, rest = value.partition(":")
            if kind in ("method", "task", "library") and rest:
                facets[kind] = rest
            else:
                tags.append(value)
        for name in ("base_model", "method", "task", "library"):
            if req.arg(name):
                facets[name] = req.arg(name)  # type: ignore[assignment]
        if req.arg("pipeline_tag"):
            facets["task"] = req.arg("pipeline_tag")  # type: ignore[assignment]
        limit = self._int_arg(req, "limit", None)
        offset = self._int_arg(req, "offset", 0) or 0
        if limit == 0:
            return Response.json([])
        page = self.config.list_page_size
        if limit is not None:
            page = min(page, limit - offset)
        if page <= 0:
            return Response.json([])
        principal = req.principal
        results = self.store.search(
            req.arg("search"),
            base_model=facets.get("base_model"),
            method=facets.get("method"),
            task=facets.get("task"),
            library=facets.get("library"),
            tags=tags,
            author=req.arg("author"),
            sort=req.arg("sort") or "downloads",
            limit=page + 1,
            offset=offset,
            visible_to=principal.namespaces if principal else (),
        )
        has_more = len(results) > page
        results = results[:page]
        full = req.flag("full")
        if not (full or req.flag("cardData")):
            items = [model_json(info, card_data=False) for info in results]
            return Response.json(items, headers=self._paginate(req, "/api/models", page, offset, has_more))

        def detailed():
            for info in results:
                files = list(self.store.snapshot(info.repo_id, info.sha)[1].values()) if full else None
                yield model_json(info, files=files, card_data=True)

        body, count = json_array_within(detailed(), self.config.list_details_bytes)
        links = self._paginate(req, "/api/models", count, offset, has_more or count < len(results))
        return Response(200, [("Content-Type", JSON_TYPE), *links], body)

    def tree(self, req: Request, repo_id: str, revision: str, path: str) -> Response:
        info = self._visible_info(req, repo_id)
        if path:
            validate_path(path.rstrip("/"))
        sha, files = self.store.snapshot(info.repo_id, revision)
        entries = tree_json(files, path, req.flag("recursive"))
        if path and not entries:
            raise EntryNotFound(f"folder '{path}' not found in '{info.repo_id}' at revision '{revision}'", commit=sha)
        offset = self._int_arg(req, "offset", 0) or 0
        page = self.config.tree_page_size
        chunk = entries[offset : offset + page]
        path_url = f"/api/models/{info.repo_id}/tree/{quote(revision, safe='')}" + (f"/{quote(path, safe='')}" if path else "")
        return Response.json(
            chunk, headers=self._paginate(req, path_url, page, offset, offset + page < len(entries))
        )

    def paths_info(self, req: Request, repo_id: str, revision: str) -> Response:
        """Entries for the given paths (files or folders); paths that do not exist are left out."""
        info = self._visible_info(req, repo_id)
        raw = req.body.read() if req.body is not None else b""
        content_type = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type == "application/json":
            paths = parse_json_object(raw, "paths-info").get("paths")
        else:
            paths = parse_qs(raw.decode("utf-8", errors="replace")).get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise MalformedPayload("paths-info: send one or more 'paths' form fields")
        if len(paths) > self.config.max_commit_files:  # as many as one commit may carry
            raise PayloadTooLarge(
                f"paths-info asks about {len(paths)} paths; this registry answers at most "
                f"{self.config.max_commit_files} per request: split them into several requests"
            )
        _, files, folders = self.store.path_entries(info.repo_id, [p.strip("/") for p in paths], revision)
        out = [file_item(entry) for entry in files.values()]
        out += [folder_item(path, under) for path, under in folders.items()]
        return Response.json(out)

    def refs(self, req: Request, repo_id: str) -> Response:
        info = self._visible_info(req, repo_id)
        return Response.json(refs_json(self.store.list_branches(info.repo_id), self.store.list_tags(info.repo_id)))

    def commits(self, req: Request, repo_id: str, revision: str) -> Response:
        info = self._visible_info(req, repo_id)
        offset = self._int_arg(req, "offset", 0) or 0
        page = self.config.list_page_size
        history = self.store.list_commits(info.repo_id, revision, limit=page + 1, offset=offset)
        chunk = history[:page]
        has_more = len(history) > page
        path = f"/api/models/{info.repo_id}/commits/{quote(revision, safe='')}"
        return Response.json([commit_json(c) for c in chunk], headers=self._paginate(req, path, page, offset, has_more))

    def resolve(self, req: Request, repo_id: str, revision: str, path: str) -> Response:
        info = self._visible_info(req, repo_id)
        sha, entry = self.store.file_entry(info.repo_id, path, revision)
        blob = functools.partial(self.store.blobs.open, entry.sha256)
        if is_commit_sha(validate_revision(revision)) and not info.private:
            cache = "public, max-age=31536000, immutable"
        else:
            cache = "private, no-cache" if info.private else "no-cache"
        headers = [
            ("X-Repo-Commit", sha),
            ("ETag", f'"{entry.oid}"'),
            ("Accept-Ranges", "bytes"),
            *file_headers(path),  # active content (html, svg, js, ...) goes out inert
            ("Cache-Control", cache),
        ]
        if req.method == "HEAD" and not is_commit_sha(validate_revision(revision)):
            # Pin the branch to its commit. huggingface_hub follows this same-host
            # redirect and then GETs the pinned URL, so a push landing between its
            # HEAD and its GET cannot hand it another commit's bytes (the size and
            # etag it checks come from the HEAD).
            pinned = self._located(req, f"/{quote(info.repo_id)}/resolve/{sha}/{quote(path)}")
            return Response(307, [*headers, ("Location", pinned), ("X-Linked-Size", str(entry.size))])
        byte_range = parse_range(req.headers.get("Range"), entry.size)
        if req.method == "GET" and path in DOWNLOAD_COUNTING_FILES and (byte_range is None or byte_range[0] == 0):
            self.store.record_download(info.repo_id, client=req.client_address)  # once per client per day
        if byte_range is None:
            headers.append(("Content-Length", str(entry.size)))
            return Response(200, headers, file=blob, file_range=(0, entry.size - 1) if entry.size else None)
        start, end = byte_range
        headers += [("Content-Length", str(end - start + 1)), ("Content-Range", f"bytes {start}-{end}/{entry.size}")]
        return Response(206, headers, file=blob, file_range=(start, end))

    # ------------------------------------------------------------- write
    def preupload(self, req: Request, repo_id: str, revision: str) -> Response:
        info = self._writable(req, repo_id, REPO_WRITE_ACTIONS["preupload"])
        if req.flag("create_pr"):
            raise BadRequest("pull requests are not supported by this registry; commit to a branch instead")
        files = parse_preupload(req.json("preupload"), max_files=self.config.max_commit_files)
        _, current, _ = self.store.path_entries(info.repo_id, [entry["path"] for entry in files], revision)
        # An upload whose files cannot fit the namespace's quota is refused before the client sends a byte.
        self.store.quotas.check_announced(info.repo_id, [entry.get("size") or 0 for entry in files])
        out = []
        for entry in files:
            item: dict[str, Any] = {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False}
            existing = current.get(entry["path"])
            if existing is not None:
                item["oid"] = existing.oid
            out.append(item)
        return Response.json({"files": out, "commitOid": self.store.resolve_revision(info.repo_id, revision)})

    def commit(self, req: Request, repo_id: str, revision: str) -> Response:
        info = self._writable(req, repo_id, REPO_WRITE_ACTIONS["commit"])
        if req.flag("create_pr"):
            raise BadRequest("pull requests are not supported by this registry; commit to a branch instead")
        content_type = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in ("application/x-ndjson", "application/ndjson", ""):
            raise MalformedPayload(
                f"commit body must be NDJSON (Content-Type: application/x-ndjson), got {content_type!r}"
            )
        revision = validate_revision(revision)
        self.store.branch_head(info.repo_id, revision)  # unknown branch or a tag: refused before any staging
        if req.body is None:
            raise MalformedPayload("commit request has no body")
        payload = parse_commit(
            req.body, self._stage_unsynced, self.store.blobs.discard, max_files=self.config.max_commit_files
        )
        try:
            self.store.blobs.sync_staged(payload.files.values())  # one flush for all the files
        except BaseException:
            for blob in payload.files.values():
                self.store.blobs.discard(blob)
            raise
        sha = self.store.commit(
            info.repo_id,
            payload.files,
            payload.deletions,
            payload.summary or "Update files",
            revision=revision,
            parent=payload.parent,
            description=payload.description,
            author=req.principal.user if req.principal else "",
        )
        return Response.json({
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self._repo_url(req, info.repo_id)}/commit/{sha}",
            "hookOutput": "",
            "pullRequestUrl": None,
        })

    def tag(self, req: Request, repo_id: str, name: str) -> Response:
        """POST .../tag/<revision> {"tag", "message"} tags a revision; DELETE .../tag/<tag> removes a tag."""
        info = self._writable(req, repo_id, REPO_WRITE_ACTIONS["tag"])
        if req.method == "DELETE":
            self.store.delete_tag(info.repo_id, name)
            return Response.json({})
        data = req.json("create tag")
        tag, message = data.get("tag"), data.get("message") or ""
        if not isinstance(tag, str) or not isinstance(message, str):
            raise MalformedPayload("create tag: 'tag' must be the tag name and 'message' a string")
        check_description(message, "tag message")
        sha = self.store.create_tag(info.repo_id, tag, revision=name, message=message)
        return Response.json({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": sha})

    def super_squash(self, req: Request, repo_id: str, branch: str) -> Response:
        info = self._writable(req, repo_id, REPO_WRITE_ACTIONS["super-squash"])
        message = req.json("super-squash", allow_empty=True).get("message") or ""
        if not isinstance(message, str):
            raise MalformedPayload("super-squash: 'message' must be a string")
        check_summary(message, "super-squash message")
        sha = self.store.super_squash(info.repo_id, branch, message=message, author=req.principal.user if req.principal else "")
        return Response.json({"commitId": sha})

    def move_repo(self, req: Request) -> Response:
        """POST /api/repos/move {"fromRepo", "toRepo", "type"}: rename, or move to another namespace."""
        principal = self._require_principal(req, BODY_WRITE_ACTIONS["repos/move"])
        data = req.json("move repo")
        source, target, repo_type = data.get("fromRepo"), data.get("toRepo"), data.get("type") or "model"
        if not isinstance(source, str) or not isinstance(target, str):
            raise MalformedPayload("move repo: 'fromRepo' and 'toRepo' must be repo ids ('namespace/name')")
        if repo_type != "model":
            raise BadRequest(f"this registry serves model repos only, not {repo_type!r}")
        namespace, _ = split_repo_id(target)
        info = self._writable(req, source, BODY_WRITE_ACTIONS["repos/move"])
        principal.check_write(namespace, self.store.accounts.kind)
        moved = self.store.move_repo(info.repo_id, target)
        return Response.json({"url": self._repo_url(req, moved.repo_id), "name": moved.repo_id, "id": moved.repo_id})

    def _stage_unsynced(self, content: bytes) -> StagedBlob:
        return self.store.stage(content, sync=False)

    def branch(self, req: Request, repo_id: str, branch: str) -> Response:
        info = self._writable(req, repo_id, REPO_WRITE_ACTIONS["branch"])
        if req.method == "DELETE":
            self.store.delete_branch(info.repo_id, branch)
            return Response.json({})
        data = req.json("create branch", allow_empty=True)
        start = data.get("startingPoint") or "main"
        if not isinstance(start, str):
            raise MalformedPayload("create branch: 'startingPoint' must be a revision string")
        self.store.create_branch(info.repo_id, branch, revision=start)
        return Response.json({})

