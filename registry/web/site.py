"""Server-rendered web pages in front of the Hub API: one object the ASGI app serves.

:class:`WebSite` answers the page routes and hands every other request to
the :class:`~peftkit.registry.hub_api.HubApi` unchanged (it has the same
``dispatch``/``refuse_early``/``body_limit`` interface). Routes:

========================================  ===============================================
``GET /`` (browsers: ``Accept: text/html``)  search (``?q=&method=&...``); other clients keep the JSON
``GET /{ns}``                             a user's or organization's adapters (storage usage: to the user or members)
``GET /{ns}/{name}``                      an adapter page (main)
``GET /{ns}/{name}/tree/{rev}[/{dir}]``   the page at a branch, tag or commit (a composition member's folder)
``GET /{ns}/{name}/commit/{sha}``         the page at a commit (the ``commitUrl`` a commit returns)
``GET /{ns}/{name}/blob/{rev}/{path}``    the Hub's file link: redirected to ``/resolve/``
``GET, POST /login``, ``POST /logout``    sign-in with a token (session cookie), sign-out
``GET /static/style.css``                 the stylesheet
========================================  ===============================================

None of them collides with the API: ``/api/...`` and ``/{ns}/{name}/resolve/...``
stay the API's, and ``static``, ``login``, ``logout`` are reserved account names.
Pages answer with a strict Content-Security-Policy (no script at all, styles
from the stylesheet only), ``X-Frame-Options: DENY`` and no caching of
signed-in pages. A session cookie also lets its browser download files of the
private repos it shows (``GET``/``HEAD`` of ``/resolve/`` only); the API never
takes a cookie for anything else.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from peftkit.hub_rules.cards import CardError, split_front_matter
from peftkit.hub_rules.names import is_commit_sha
from peftkit.hub_rules.storage import storage_summary

from ..accounts import Principal
from ..errors import BadRequest, NotFound, RegistryError, RepoNotFound, Unauthorized
from ..http_headers import url_value
from ..hub_api import HubApi, Request, Response
from ..names import split_repo_id, validate_name, validate_path, validate_revision
from ..store import DEFAULT_BRANCH, FileEntry, RepoInfo
from .card_markdown import MAX_CARD_BYTES, MAX_CARD_MARKS, CardRenderer, marks_cut
from .facts import Facts, FactsReader, short_name
from .query import FILTERS, MAX_PAGE, MAX_VALUE_CHARS, PAGE_SIZE, SORTS, parse_query
from .sessions import (
    CSRF_COOKIE,
    SECRET_FILE,
    SESSION_COOKIE,
    CookieSettings,
    WebSessions,
    new_browser_id,
    parse_cookies,
    same_origin,
)
from .templates import Templates
from .usage import snippets

PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
MAX_FORM_BYTES = 16 * 1024
# Facet values are counted in this many most downloaded matches at most: bounded cost at any registry size.
FACET_SAMPLE = 1000
MAX_FILES_SHOWN = 300
MAX_COMMITS_SHOWN = 20
MAX_REFS_SHOWN = 50
MAX_CONTENT_KEPT = 256  # (commit, folder) pages whose facts are kept: bounded, ~70 KB each at most
_FACET_LIST = ("base_model", "method", "task", "dataset", "license", "author", "tag")
_FACET_LABELS = {**FILTERS, "tag": "Tags"}
# PEFT's task types, which the index keeps beside the pipeline tag they map to: not shown twice.
_HIDDEN_TASKS = frozenset({"causal_lm", "seq_2_seq_lm", "seq_cls", "token_cls", "question_ans", "feature_extraction"})
_LIBRARY_TAGS = frozenset({"peft", "peftkit", "transformers"})


@dataclass(frozen=True)
class WebOptions:
    session_ttl_s: float = 7 * 86400  # a sign-in lasts this long (or until sign-out or the token's revocation)


@dataclass
class _Visitor:
    """Who is looking, and the cookies the response must set."""

    principal: Principal | None
    browser: str  # the CSRF cookie's value (new when the browser had none)
    new_browser: bool
    session: str | None

    @property
    def namespaces(self) -> frozenset[str]:
        return self.principal.namespaces if self.principal else frozenset()


class WebSite:
    """The pages, plus :class:`HubApi` for everything else (see the module docstring)."""

    def __init__(self, api: HubApi, options: WebOptions | None = None) -> None:
        self.api = api
        self.store = api.store
        self.config = api.config
        self.options = options or WebOptions()
        self.sessions = WebSessions(
            self.store.db, self.store.accounts, self.store.blobs.shared_secret(SECRET_FILE),
            ttl_s=self.options.session_ttl_s,
        )
        self.templates = Templates()
        self.cards = CardRenderer()
        self.facts = FactsReader(self._read_head)
        self._content_cache: OrderedDict[tuple[str, str], tuple[Facts, str | None]] = OrderedDict()
        self._content_lock = threading.Lock()
        self.cards_read = 0  # README.md files read and parsed (a page's facts are kept by commit)
        self.root = urlsplit(self.config.public_url).path.rstrip("/") if self.config.public_url else ""

    # ------------------------------------------------------------- the HubApi interface
    def body_limit(self, method: str, path: str) -> int:
        if path.rstrip("/") in ("/login", "/logout"):
            return MAX_FORM_BYTES
        return self.api.body_limit(method, path)

    def refuse_early(self, req: Request) -> None:
        self.api.refuse_early(req)

    def dispatch(self, req: Request) -> Response:
        page = self._page(req)
        if page is None:
            if req.principal is None and req.method in ("GET", "HEAD") and self._is_resolve(req):
                req.principal = self.sessions.principal(parse_cookies(req.headers.get("Cookie")).get(SESSION_COOKIE))
            return self.api.dispatch(req)
        visitor = self._visitor(req)
        try:
            return page(req, visitor)
        except RegistryError as exc:
            return self._error(req, visitor, exc)

    # --------------------------------------------------------------------- routing
    @staticmethod
    def _is_resolve(req: Request) -> bool:
        s = req.segments
        return len(s) >= 5 and s[0] != "api" and s[2] == "resolve"

    def _page(self, req: Request) -> Callable[[Request, _Visitor], Response] | None:
        s, method = req.segments, req.method
        reading = method in ("GET", "HEAD")
        if not s:
            return self.search_page if reading and "text/html" in (req.headers.get("Accept") or "") else None
        if s[0] == "api":
            return None
        if s == ["login"]:
            return self.login_page if reading else self.sign_in if method == "POST" else None
        if s == ["logout"]:
            return self.sign_out if method == "POST" else None
        if not reading:
            return None
        if len(s) == 2 and s[0] == "static":
            return self.static
        if len(s) == 1:
            return self.account_page
        if len(s) == 2 or (len(s) >= 4 and s[2] == "tree") or (len(s) == 4 and s[2] == "commit"):
            return self.repo_page
        if len(s) >= 5 and s[2] == "blob":
            return self.blob
        return None

    # ------------------------------------------------------------------- responses
    def _visitor(self, req: Request) -> _Visitor:
        cookies = parse_cookies(req.headers.get("Cookie"))
        session = cookies.get(SESSION_COOKIE)
        principal = req.principal or self.sessions.principal(session)
        browser = cookies.get(CSRF_COOKIE)
        if browser and 16 <= len(browser) <= 64:
            return _Visitor(principal, browser, False, session)
        return _Visitor(principal, new_browser_id(), True, session)

    def _endpoint(self, req: Request) -> str:
        """The URL clients set as ``HF_ENDPOINT``: ``--public-url``, else the base URL the request reached
        (never a host the client made up: see registry/origin.py)."""
        return (self.config.public_url or req.base_url).rstrip("/")

    def _cookies(self, req: Request) -> CookieSettings:
        """Secure cookies when the site is served over HTTPS: a ``--public-url`` with https (the operator's word
        for it, whatever address a request came by), else the scheme the request reached."""
        return CookieSettings(secure=self._endpoint(req).startswith("https://"), path=self.root or "/")

    def _html(self, req: Request, visitor: _Visitor, template: str, status: int = 200, **context: Any) -> Response:
        body = self.templates.render(
            template,
            root=self.root,
            css=f"{self.root}/static/style.css?v={self.templates.stylesheet_version}",
            user=visitor.principal.user if visitor.principal else None,
            csrf=self.sessions.csrf_token(visitor.browser),
            here=self._here(req),
            endpoint=self._endpoint(req),
            **context,
        )
        headers = self._page_headers(visitor)
        if visitor.new_browser:
            headers.append(("Set-Cookie", self._cookies(req).set(CSRF_COOKIE, visitor.browser, None)))
        return Response(status, headers, body)

    @staticmethod
    def _page_headers(visitor: _Visitor | None) -> list[tuple[str, str]]:
        return [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Security-Policy", PAGE_CSP),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "same-origin"),
            ("Cache-Control", "no-store" if visitor is not None and visitor.principal else "no-cache"),
            ("Vary", "Cookie"),
        ]

    def _redirect(self, location: str, status: int = 303, cookies: tuple[str, ...] | list[str] = ()) -> Response:
        headers = [*self._page_headers(None), ("Location", location)]
        headers += [("Set-Cookie", c) for c in cookies]
        return Response(status, headers, b"")

    def _here(self, req: Request) -> str:
        """This page's path and query, for the sign-in form's return address."""
        query = "&".join(f"{quote(k)}={quote(v)}" for k, values in req.query.items() for v in values)
        return req.path + (f"?{query}" if query else "")

    def _error(self, req: Request, visitor: _Visitor, exc: RegistryError) -> Response:
        status = exc.status if 400 <= exc.status < 600 else 500
        titles = {404: "Not found", 400: "Bad request", 403: "Refused", 401: "Sign-in needed"}
        return self._html(req, visitor, "error.html", status, title=titles.get(status, "Error"),
                          message=" ".join(exc.message.split()))

    def static(self, req: Request, visitor: _Visitor) -> Response:
        if req.segments[1] not in self.templates.static_files:
            raise NotFound("no such file; the stylesheet is /static/style.css")
        content_type, body, version = self.templates.static_files[req.segments[1]]
        return Response(200, [
            ("Content-Type", content_type),
            ("Cache-Control", "public, max-age=86400"),
            ("ETag", f'"{version}"'),
            ("Content-Security-Policy", PAGE_CSP),
        ], body)

    # ---------------------------------------------------------------------- search
    def search_page(self, req: Request, visitor: _Visitor) -> Response:
        query = parse_query(req.query)
        filters = dict(query.filters)
        search_args = dict(
            base_model=filters.get("base_model"), method=filters.get("method"), task=filters.get("task"),
            tags=query.store_tags, author=filters.get("author"), visible_to=visitor.namespaces,
        )
        results = self.store.search(query.text or None, sort=query.sort, limit=PAGE_SIZE, offset=query.offset,
                                    **search_args)
        summary = self.store.search_facets(query.text or None, per_kind=10, sample=FACET_SAMPLE, **search_args)
        return self._html(req, visitor, "search.html", query=query, results=results, total=summary.total,
                          counted=summary.counted,
                          facets=self._facets(summary.counts), facet_labels=_FACET_LABELS, sorts=SORTS,
                          pages=min(MAX_PAGE, max(1, -(-summary.total // PAGE_SIZE))))

    @staticmethod
    def _facets(counts: dict[str, list[tuple[str, int]]]) -> list[tuple[str, list[tuple[str, int]]]]:
        # A value longer than a filter may be cannot be searched for (and a card may set one of 100 KB).
        counts = {kind: [(v, n) for v, n in values if len(v) <= MAX_VALUE_CHARS] for kind, values in counts.items()}
        hidden_tags = _LIBRARY_TAGS | {v.lower() for kind in ("method", "task") for v, _ in counts.get(kind, [])}
        shown = {
            **counts,
            "task": [(v, n) for v, n in counts.get("task", []) if v.lower() not in _HIDDEN_TASKS],
            "tag": [(v, n) for v, n in counts.get("tag", []) if v.lower() not in hidden_tags],
        }
        return [(kind, shown.get(kind, [])) for kind in _FACET_LIST]

    # --------------------------------------------------------------------- accounts
    def account_page(self, req: Request, visitor: _Visitor) -> Response:
        namespace = validate_name(unquote(req.segments[0]), "user or organization name")
        query = parse_query({k: v for k, v in req.query.items() if k in ("sort", "page")})
        kind = self.store.accounts.kind(namespace)
        visible = visitor.namespaces
        repos = self.store.search(author=namespace, sort=query.sort, limit=PAGE_SIZE, offset=query.offset,
                                  visible_to=visible)
        summary = self.store.search_facets(author=namespace, visible_to=visible, per_kind=1, sample=1)
        if kind is None and summary.total == 0:
            raise NotFound(f"no user or organization named '{namespace}' on this registry")
        members = self.store.accounts.members_of(namespace) if kind == "org" else []
        orgs = sorted(self.store.accounts.orgs_of(namespace)) if kind == "user" else []
        own = namespace.lower() in visible
        # Usage is private: only the user, or a member of the organization, gets it (and the query behind it).
        storage = storage_summary(self.store.quotas.usage([namespace])[0]) if own and kind is not None else None
        return self._html(req, visitor, "account.html", namespace=namespace, kind=kind or "namespace",
                          repos=repos, total=summary.total, members=members, orgs=orgs, query=query, sorts=SORTS,
                          pages=min(MAX_PAGE, max(1, -(-summary.total // PAGE_SIZE))),
                          own=own, storage=storage)

    # ----------------------------------------------------------------------- repos
    def _visible_repo(self, req: Request, visitor: _Visitor, repo_id: str) -> RepoInfo:
        try:
            info = self.store.repo_info(repo_id)
        except RepoNotFound:
            target = self.store.redirect_of(repo_id)
            if target is not None:
                try:
                    moved = self.store.repo_info(target)
                except RepoNotFound:
                    moved = None
                if moved is not None and (not moved.private or moved.namespace.lower() in visitor.namespaces):
                    raise _Moved(moved.repo_id) from None
            raise RepoNotFound(self._not_found(repo_id, visitor)) from None
        if info.private and info.namespace.lower() not in visitor.namespaces:
            raise RepoNotFound(self._not_found(repo_id, visitor))
        return info

    @staticmethod
    def _not_found(repo_id: str, visitor: _Visitor) -> str:
        hint = "" if visitor.principal else "; if it is private, sign in with a token of its namespace"
        return f"no adapter repo '{repo_id}' here{hint}"

    def repo_page(self, req: Request, visitor: _Visitor) -> Response:
        s = req.segments
        repo_id = f"{unquote(s[0])}/{unquote(s[1])}"
        split_repo_id(repo_id)
        revision = validate_revision(unquote(s[3])) if len(s) >= 4 else None
        folder = unquote("/".join(s[4:])).strip("/") if len(s) > 4 and s[2] == "tree" else ""
        if folder:
            validate_path(folder)
        if s[2:3] == ["commit"] and not is_commit_sha(revision or ""):
            raise BadRequest(f"'{s[3]}' is not a 40-hex commit id")
        try:
            info = self._visible_repo(req, visitor, repo_id)
        except _Moved as moved:
            rest = "/".join(s[2:])
            return self._redirect(f"{self.root}/{moved.repo_id}" + (f"/{rest}" if rest else ""), 307)
        sha, files = self.store.snapshot(info.repo_id, revision or DEFAULT_BRANCH)
        if folder and not any(p.startswith(folder + "/") for p in files):
            raise NotFound(f"no folder '{folder}' in '{info.repo_id}' at {revision}")
        files_base = f"{self.root}/{quote(info.repo_id)}/resolve/{sha}"
        facts, card_html, card_error = self._content(sha, files, folder, files_base)
        base_model = (short_name(info.base_models[0]) if info.base_models and not folder else None) or facts.base_model
        others = []
        if base_model:
            others = [r for r in self.store.search(base_model=base_model, limit=6, visible_to=visitor.namespaces)
                      if r.repo_id != info.repo_id][:5]
        shown = {p: e for p, e in files.items() if p.startswith(folder + "/")} if folder else files
        endpoint = self._endpoint(req)
        shown_revision = revision if revision not in (None, DEFAULT_BRANCH) else None
        return self._html(
            req, visitor, "repo.html",
            info=info, sha=sha, revision=revision or DEFAULT_BRANCH, folder=folder,
            files=list(shown.values())[:MAX_FILES_SHOWN], file_count=len(shown), files_base=files_base,
            card_html=card_html, card_error=card_error, facts=facts, base_model=base_model, others=others,
            commits=self.store.list_commits(info.repo_id, sha, limit=MAX_COMMITS_SHOWN),
            branches=sorted(self.store.list_branches(info.repo_id).items())[:MAX_REFS_SHOWN],
            tags=sorted(self.store.list_tags(info.repo_id).items())[:MAX_REFS_SHOWN],
            usage=snippets(info.repo_id, endpoint=endpoint, revision=shown_revision, base_model=base_model,
                           peft_loads=facts.peft_loads,
                           task_type=facts.task_type, private=info.private) if not folder else [],
        )

    def blob(self, req: Request, visitor: _Visitor) -> Response:
        """``/{ns}/{name}/blob/{rev}/{path}``, the Hugging Face Hub's file links: the file itself, at
        ``/resolve/`` (which checks who may read it and serves it inert)."""
        s = req.segments
        split_repo_id(f"{unquote(s[0])}/{unquote(s[1])}")
        rest = url_value("/".join(s[3:]))  # the request's own (still percent-encoded) path, kept a path
        return self._redirect(f"{self.root}/{s[0]}/{s[1]}/resolve/{rest}", 307)

    def _content(self, sha: str, files: dict[str, FileEntry], folder: str,
                 files_base: str) -> tuple[Facts, str, str | None]:
        """(facts, card HTML, a note about the card) of a commit's folder. Commits never change, so the facts
        and the note are kept by (commit, folder): the files behind them (a card's front matter, up to 128 KiB
        of YAML, and a 1 MiB adapter_config.json) are read and parsed once, not on every view."""
        readme = files.get("README.md") if not folder else None
        with self._content_lock:
            kept = self._content_cache.get((sha, folder))
        if kept is not None:
            card_html = self.cards.cached(readme.sha256, files_base) if readme is not None else ""
            if card_html is not None:
                return kept[0], card_html, kept[1]
        card, body, note = self._card(files.get("README.md"))
        facts = self.facts.facts(files, card, folder)
        card_html = self.cards.render(body, files_base=files_base, cache_key=readme.sha256) if readme else ""
        with self._content_lock:
            self._content_cache[(sha, folder)] = (facts, note)
            while len(self._content_cache) > MAX_CONTENT_KEPT:
                self._content_cache.popitem(last=False)
        return facts, card_html, note

    def _card(self, entry: FileEntry | None) -> tuple[dict[str, Any], str, str | None]:
        """(front matter, Markdown body, a problem to show) of README.md; at most MAX_CARD_BYTES are read."""
        if entry is None:
            return {}, "", None
        self.cards_read += 1
        raw = self._read_head(entry, MAX_CARD_BYTES)
        text = raw.decode("utf-8", errors="replace")
        note = None
        if entry.size > MAX_CARD_BYTES:
            note = f"The card is {entry.size:,} bytes; only the first {MAX_CARD_BYTES:,} are shown."
        try:
            meta, body = split_front_matter(text)
        except CardError as exc:
            meta, body, note = {}, text, str(exc)
        cut = marks_cut(body)
        if cut is not None:
            body = body[:cut]
            note = (f"{note} " if note else "") + (f"The card has more Markdown markup than a page renders "
                                                   f"(over {MAX_CARD_MARKS:,} marks); only its first "
                                                   f"{len(body):,} characters are shown.")
        return meta, body, note

    def _read_head(self, entry: FileEntry, size: int) -> bytes:
        with self.store.blobs.open(entry.sha256) as f:
            return f.read(size)

    # -------------------------------------------------------------------- sign-in
    def login_page(self, req: Request, visitor: _Visitor, status: int = 200, problem: str | None = None) -> Response:
        return self._html(req, visitor, "login.html", status, problem=problem,
                          next=self._next(req.arg("next")))

    def _next(self, target: str | None) -> str:
        """Where to go after signing in: a path on this site, never another host.

        The path is percent-encoded down to URL characters: a header carries ASCII only, and the server
        escapes anything else as ``\\xNN``, which a browser reads as ``//xNN...``, another host."""
        if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
            return f"{self.root}/"
        if any(ord(c) < 32 for c in target) or len(target) > 2000 or target.startswith(f"{self.root}/login"):
            return f"{self.root}/"
        return url_value(target)

    def _form(self, req: Request, visitor: _Visitor) -> dict[str, str]:
        """The POSTed form, after the CSRF and Origin checks (403 when either fails)."""
        if not same_origin(req.headers.get("Origin"), req.headers.get("Host"), self.config.public_url):
            raise _CsrfRefused("the form was sent from another site")
        raw = req.body.read(MAX_FORM_BYTES + 1) if req.body is not None else b""
        if len(raw) > MAX_FORM_BYTES:
            raise BadRequest("the form is too large")
        fields = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", errors="replace"), max_num_fields=10).items()}
        if visitor.new_browser or not self.sessions.csrf_ok(visitor.browser, fields.get("csrf")):
            raise _CsrfRefused("the form's security token is missing or does not match this browser's cookie")
        return fields

    def sign_in(self, req: Request, visitor: _Visitor) -> Response:
        try:
            fields = self._form(req, visitor)
        except _CsrfRefused as exc:
            return self.login_page(req, visitor, 403, f"Refused: {exc}. Reload this page and sign in again.")
        secret = (fields.get("token") or "").strip()
        if not secret:
            return self.login_page(req, visitor, 400, "Paste a token (it starts with pkr_).")
        try:
            principal = self.store.accounts.authenticate(secret)
        except Unauthorized:
            return self.login_page(req, visitor, 401, "This registry does not know that token, or it was "
                                   "revoked. Create one with: peftkit registry token create USER")
        cookies = self._cookies(req)
        self.sessions.end(visitor.session)
        session = self.sessions.start(principal)
        return self._redirect(self._next(fields.get("next")), cookies=[
            cookies.set(SESSION_COOKIE, session, int(self.options.session_ttl_s)),
            cookies.set(CSRF_COOKIE, new_browser_id(), None),  # a new token for the signed-in browser
        ])

    def sign_out(self, req: Request, visitor: _Visitor) -> Response:
        try:
            self._form(req, visitor)
        except _CsrfRefused as exc:
            return self._error(req, visitor, RegistryError(
                f"Refused: {exc}. Go back, reload the page and sign out again.", status=403, code="CsrfRefused"))
        self.sessions.end(visitor.session)
        cookies = self._cookies(req)
        return self._redirect(f"{self.root}/", cookies=[cookies.clear(SESSION_COOKIE)])


class _Moved(Exception):
    def __init__(self, repo_id: str) -> None:
        super().__init__(repo_id)
        self.repo_id = repo_id


class _CsrfRefused(Exception):
    pass
