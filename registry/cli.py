"""``peftkit registry ...``: run a registry server and manage its users and tokens.

The lead attaches :data:`registry_group` to the main CLI with
``cli.add_command(registry_group)``; ``python -m peftkit.registry`` runs it
standalone. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from .errors import NotFound, RegistryError
from .paths import default_data_dir
from .quantities import parse_duration, parse_size

if TYPE_CHECKING:  # pragma: no cover
    from .accounts import Accounts
    from .quotas import Quotas
    from .store import RegistryStore

F = TypeVar("F", bound=Callable[..., Any])


def _data_option(func: F) -> F:
    return click.option(
        "--data",
        "data_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Registry data folder [default: $PEFTKIT_HOME/registry or ~/.cache/peftkit/registry].",
    )(func)


def _database_option(func: F) -> F:
    """--database: where the metadata (repos, users, tokens) lives when not in the data folder."""
    return click.option(
        "--database", default=None, envvar="PEFTKIT_REGISTRY_DATABASE", metavar="URL",
        help="Keep the metadata in PostgreSQL (postgresql://user@host:5432/db; or set "
        "PEFTKIT_REGISTRY_DATABASE, which keeps a password off the command line) instead of the data "
        "folder's registry.db. Several servers, on several hosts, may share one.",
    )(func)


def _database_options(func: F) -> F:
    """--database and --blobs: where the metadata and the blobs live when not in the data folder."""
    func = _database_option(func)
    return _blobs_option(
        "Where the file contents live [default: the data folder]: a folder (its blobs/ and tmp/), or "
        "S3-compatible object storage as s3://BUCKET/PREFIX (credentials and endpoint from the standard "
        "AWS_* settings). Servers sharing a --database must share it (a shared filesystem path or one bucket)."
    )(func)


def _blobs_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--blobs", "blobs_dir", default=None, metavar="DIR|URL", callback=_checked_blobs,
        help=help_text,
    )


def _checked_blobs(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from .blob_location import check_blob_location

    if value is None:
        return None
    try:
        return check_blob_location(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _checked_database(database: str | None) -> str | None:
    from .database_url import check_database_url

    if database is None:
        return None
    try:
        return check_database_url(database)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--database") from None


def _checked_registry_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from .identity import is_registry_id, UNMARKED

    value = value.strip().lower()
    if value != UNMARKED and not is_registry_id(value):
        raise click.BadParameter(f"{value!r} is not a registry id: pass the 32 hex digits the refusal named, "
                                 f"or '{UNMARKED}' for a store without a marker")
    return value


def _friendly_errors(func: F) -> F:
    """Turn store errors into a clear message and a non-zero exit; the commands they suggest act on the
    same registry (:func:`_hint`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RegistryError as exc:
            raise click.ClickException(_hint(exc.message)) from None
        except click.ClickException as exc:
            exc.message = _hint(exc.message)
            raise

    return wrapper  # type: ignore[return-value]


def _hint(text: str) -> str:
    """``text`` with each `peftkit registry ...` command it suggests given the --data, --database and
    --blobs this command was run with, so that a copied hint acts on the same registry."""
    from .cli_hints import with_registry_location

    return with_registry_location(text, registry_group)


def _open_store(data_dir: Path | None, database: str | None = None, blobs_dir: str | None = None, *,
                clean_staging: bool = True):
    from .store import RegistryStore

    try:
        return RegistryStore(data_dir or default_data_dir(), database=_checked_database(database), blobs=blobs_dir,
                             clean_staging=clean_staging)
    except RuntimeError as exc:  # an unreachable or newer database, an unusable bucket
        raise click.ClickException(str(exc)) from None


def _with_store(func: Callable[..., Any], *, clean_staging: bool = True) -> Callable[..., Any]:
    """A command that works on the store: it takes --data, gets the open store as its first
    argument (closed when it returns) and reports store errors as a clear message."""

    @_data_option
    @_database_options
    @_friendly_errors
    @functools.wraps(func)
    def wrapper(*args: Any, data_dir: Path | None, database: str | None, blobs_dir: str | None,
                **kwargs: Any) -> Any:
        with _open_store(data_dir, database, blobs_dir, clean_staging=clean_staging) as store:
            return func(store, *args, **kwargs)

    return wrapper


def _on_database(build: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A command on what lives in the database alone (accounts, tokens, quotas): it takes --data and
    --database and gets ``build(database)`` as its first argument. The blob store is never opened
    (nor, with --database, the data folder created)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @_data_option
        @_database_option
        @_friendly_errors
        @functools.wraps(func)
        def wrapper(*args: Any, data_dir: Path | None, database: str | None, **kwargs: Any) -> Any:
            from .database_url import open_database

            checked = _checked_database(database)
            root = data_dir or default_data_dir()
            if checked is None:  # SQLite in the data folder, created as `serve` creates it
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                db = open_database(checked, root)
            except RuntimeError as exc:  # an unreachable or newer database
                raise click.ClickException(str(exc)) from None
            try:
                return func(build(db), *args, **kwargs)
            finally:
                db.close()

        return wrapper

    return decorate


def _accounts_of(db: Any) -> Accounts:
    from .accounts import Accounts

    return Accounts(db)


def _quotas_of(db: Any, default_bytes: int | None = None) -> Quotas:
    from .quotas import Quotas

    return Quotas(db, default_bytes)


#: A command on users, organizations or tokens: gets the registry's accounts first.
_with_accounts = _on_database(_accounts_of)
#: A command on storage quotas: gets the registry's quotas first.
_with_quotas = _on_database(_quotas_of)


def _read_with(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, str], Any]:
    """A click callback reading its value with ``parse`` (a size, a duration: registry/quantities.py); a
    value it cannot read is a usage error (exit 2) naming the forms it takes."""
    def callback(ctx: click.Context, param: click.Parameter, value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return callback


def _gigabytes(value: float | None) -> int | None:
    """--namespace-quota-gb's GB (10**9 bytes) as bytes, exactly as written."""
    from decimal import Decimal

    return None if value is None else int(Decimal(str(value)) * 10**9)


def _namespace_quota_option(help_text: str) -> Callable[[F], F]:
    return click.option("--namespace-quota-gb", "namespace_quota_gb", default=None, metavar="GB",
                        type=click.FloatRange(0, None), help=help_text)


# The same help options as the peftkit command's: click keeps a command's help option once made, so a
# registry_group run on its own first (python -m peftkit.registry, tests) must not make a different one.
@click.group("registry", context_settings={"help_option_names": ["-h", "--help"]})
def registry_group() -> None:
    """Self-hosted adapter registry: a Hugging Face Hub-compatible server.

    Point huggingface_hub, PEFT and peftkit at it with HF_ENDPOINT=<url> (or
    HfApi(endpoint=<url>)) and a token from `peftkit registry token create`.
    """


@registry_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port).")
@_data_option
@click.option(
    "--max-upload-mb", default=512, show_default=True, type=click.IntRange(1, None),
    help="Largest commit request accepted; bigger ones get HTTP 413.",
)
@click.option(
    "--public-url", default=None, callback=lambda _ctx, _param, value: checked_public_url(value),
    help="URL clients reach the server at; links in replies use it. Set it behind a proxy or when clients "
    "use a host name (else links use the address the client connected to). A client that comes by the "
    "server's own address or an --allowed-host name gets links to that address.",
)
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 64),
    help="Server processes sharing the port and the data folder (more serve more reads at once).",
)
@click.option(
    "--trusted-proxy", "trusted_proxies", multiple=True, metavar="IP[/BITS]",
    help="A reverse proxy whose X-Forwarded-For/-Proto headers are believed (repeatable); "
    "without it those headers are ignored.",
)
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
    help="A host name clients reach the server by, besides --public-url's (repeatable; .example.com for a "
    "domain and its subdomains). Clients read and push through an exact NAME (links name it). Requests "
    "naming another host get 421 (DNS rebinding) when this or --public-url is given, or on loopback.",
)
@click.option("--header-timeout", default=20.0, show_default=True, type=click.FloatRange(0.1, None),
              help="Seconds a client has, from connecting, to send a request's headers.")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, None),
              help="Longest pause, in seconds, while a request body arrives or a client reads a reply.")
@click.option("--request-timeout", default=900.0, show_default=True, type=click.FloatRange(0.1, None),
              help="Seconds a client has to send a whole request body.")
@click.option("--keep-alive-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1, None),
              help="Idle keep-alive connections are closed after this many seconds.")
@click.option("--quiet", is_flag=True, help="Do not log each request to stderr.")
@_namespace_quota_option(
    "Storage each user or organization may hold, in GB (10^9 bytes; 0.5 for 500 MB), unless `peftkit "
    "registry quota set` gave it its own limit. Commits that would go over it get HTTP 413. [default: no limit]"
)
@_database_options
@_friendly_errors
def serve_command(
    host: str, port: int, data_dir: Path | None, max_upload_mb: int, public_url: str | None, workers: int,
    trusted_proxies: tuple[str, ...], allowed_hosts: tuple[str, ...], header_timeout: float, body_timeout: float,
    request_timeout: float, keep_alive_timeout: float, quiet: bool, namespace_quota_gb: float | None,
    database: str | None, blobs_dir: str | None,
) -> None:
    """Serve the registry over HTTP until Ctrl-C (needs `pip install 'peftkit[registry]'`)."""
    from .host_allowlist import allowed_host_problem
    from .hub_api import ApiConfig
    from .origin import ProxyTrust
    from .server import MissingServerDependencies, ServerOptions, serve

    from .pg_db import redact

    data = data_dir or default_data_dir()
    database = _checked_database(database)
    config = ApiConfig(max_upload_bytes=max_upload_mb * 1024 * 1024, public_url=public_url)
    try:
        ProxyTrust.parse(trusted_proxies)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trusted-proxy") from None
    for name in allowed_hosts:
        if problem := allowed_host_problem(name):
            raise click.BadParameter(problem, param_hint="--allowed-host")
    options = ServerOptions(
        header_timeout_s=header_timeout, body_read_timeout_s=body_timeout, request_timeout_s=request_timeout,
        keep_alive_s=keep_alive_timeout, trusted_proxies=trusted_proxies, allowed_hosts=allowed_hosts,
    )

    def ready(url: str) -> None:
        if database is None and blobs_dir is None:
            where = str(data)
        else:
            where = f"{redact(database) if database else data} with blobs in {blobs_dir or data}"
        click.echo(ready_line(where, url, public_url))
        sys.stdout.flush()

    def log(line: str) -> None:
        sys.stderr.write(line + "\n")

    try:
        serve(data, host=host, port=port, config=config, log=None if quiet else log, ready=ready,
              options=options, workers=workers, database=database, blobs=blobs_dir,
              namespace_quota=_gigabytes(namespace_quota_gb))
    except (OSError, MissingServerDependencies, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None


def checked_public_url(value: str | None) -> str | None:
    """``--public-url`` as given, or a usage error (exit 2) saying what is wrong. Links in replies start with
    it and its host is the one name the server answers besides IPs and localhost, so ``hub.lan:8080`` (no
    scheme) made every redirect ``Location: hub.lan:8080/...`` and refused clients using hub.lan with 421."""
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a URL ({exc}); write http(s)://HOST[:PORT][/PATH]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(
            f"{value!r} is not an http(s) URL: write the URL clients use, with its scheme, such as "
            "http://hub.lan:8080 or https://hub.example.com (or https://example.com/hub behind a path)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise click.BadParameter(f"{value!r} has a user, query or fragment: write http(s)://HOST[:PORT][/PATH]")
    return value


def ready_line(where: str, url: str, public_url: str | None) -> str:
    """The line ``serve`` prints once it listens. With ``--public-url`` it also names the URL the team uses
    (the listening address serves the server machine: links name whichever address a client came by where
    the server vouches for it, registry/origin.py)."""
    clients = public_url.rstrip("/") if public_url else None
    note = f"clients use {clients}; " if clients and clients != url.rstrip("/") else ""
    return f"peftkit registry serving {where} at {url} ({note}Ctrl-C to stop)"


# ---------------------------------------------------------------- tokens
@registry_group.group("token")
def token_group() -> None:
    """Create, list and revoke bearer tokens."""


@token_group.command("create")
@click.argument("user")
@click.option("--write/--read-only", default=False, show_default=True, help="Allow pushes and repo changes.")
@click.option("--name", default="", help="A label to recognise the token by in `token list`.")
@_with_accounts
def token_create(accounts: Accounts, user: str, write: bool, name: str) -> None:
    """Create a token for USER and print its secret (shown only this once)."""
    info, secret = accounts.create_token(user, write=write, name=name)
    click.echo(
        f"created {'write' if write else 'read-only'} token {info.id} for {info.user}; "
        "store the secret now, it is not shown again:",
        err=True,
    )
    click.echo(secret)


@token_group.command("list")
@click.option("--user", default=None, help="Only this user's tokens.")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_with_accounts
def token_list(accounts: Accounts, user: str | None, include_revoked: bool, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    if user is not None and accounts.kind(user) != "user":
        raise NotFound(f"no user named '{user}'; `peftkit registry user list` shows the users")
    tokens = accounts.list_tokens(user, include_revoked=include_revoked)
    if as_json:
        click.echo(json.dumps([t.to_json() for t in tokens], indent=2))
        return
    if not tokens:
        click.echo("no tokens")
        return
    for t in tokens:
        state = " (revoked)" if t.revoked else ""
        used = t.last_used.strftime("%Y-%m-%d %H:%M") if t.last_used else "never"
        click.echo(
            f"{t.id}  {t.user:<20} {'write' if t.write else 'read':<5}  {t.name or '-':<20} "
            f"created {t.created_at:%Y-%m-%d}  last used {used}{state}"
        )


@token_group.command("revoke")
@click.argument("token_id")
@_with_accounts
def token_revoke(accounts: Accounts, token_id: str) -> None:
    """Revoke the token with id TOKEN_ID (see `token list`)."""
    accounts.revoke_token(token_id)
    click.echo(f"revoked token {token_id}")


# ------------------------------------------------------------ users, orgs
@registry_group.group("user")
def user_group() -> None:
    """Manage users."""


@user_group.command("add")
@click.argument("name")
@_with_accounts
def user_add(accounts: Accounts, name: str) -> None:
    """Create user NAME (their namespace is NAME/...)."""
    accounts.add_user(name)
    click.echo(_hint(f"created user {name}; give them a token with `peftkit registry token create {name} --write`"))


@user_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_with_accounts
def user_list(accounts: Accounts, as_json: bool) -> None:
    """List users and organizations."""
    listed = accounts.list_accounts()
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    if not listed:
        click.echo(_hint("no users yet; create one with `peftkit registry user add NAME`"), err=True)
        return
    for a in listed:
        members = f"  members: {', '.join(a['members']) or '-'}" if a["kind"] == "org" else ""
        click.echo(f"{a['kind']:<4}  {a['name']}{members}")


@registry_group.group("org")
def org_group() -> None:
    """Manage organizations (shared namespaces)."""


@org_group.command("add")
@click.argument("name")
@click.option("--member", "members", multiple=True, help="A user to add (repeat for several).")
@_with_accounts
def org_add(accounts: Accounts, name: str, members: tuple[str, ...]) -> None:
    """Create organization NAME, or add members to it if it exists."""
    accounts.add_org(name, list(members))
    suffix = f" with members {', '.join(members)}" if members else ""
    click.echo(f"organization {name} ready{suffix}")


# ------------------------------------------------------------ quotas
@registry_group.group("quota")
def quota_group() -> None:
    """Storage quotas of users and organizations: usage, limits.

    A namespace's usage is the sum of its repos' sizes; a repo's size is the sum of the distinct
    files its commits hold (all branches, tags and history) plus its metadata (each commit, the file
    paths of each distinct tree, each branch and tag: see docs/registry.md). A namespace's own limit (`quota set`)
    beats the server's default (`serve --namespace-quota-gb`). Exit status: 0 on success, 1 for a
    namespace the registry does not know, 2 on a usage error such as a size it cannot read.
    """


def _known_namespace(quotas: Quotas, namespace: str) -> str:
    known = quotas.known(namespace)
    if known is None:
        raise NotFound(f"no user, organization or repo namespace named '{namespace}'; "
                       "`peftkit registry quota show` lists them")
    return known


@quota_group.command("set")
@click.argument("namespace")
@click.argument("size", callback=_read_with(parse_size))
@_with_quotas
def quota_set(quotas: Quotas, namespace: str, size: int) -> None:
    """Limit what NAMESPACE stores to SIZE (such as 500MB, 2GB or 1.5GiB), over the server's default.

    Applies at once, on every server sharing the database. A limit below the current usage refuses
    every commit that adds files until enough is deleted.
    """
    from .quotas import format_size

    namespace = _known_namespace(quotas, namespace)
    quotas.set(namespace, size)
    (usage,) = quotas.usage([namespace])
    click.echo(f"quota of {namespace}: {format_size(size)} ({size} bytes); it stores {format_size(usage.used_bytes)}")


@quota_group.command("clear")
@click.argument("namespace")
@_with_quotas
def quota_clear(quotas: Quotas, namespace: str) -> None:
    """Remove NAMESPACE's own limit: the server's default (--namespace-quota-gb) applies again."""
    namespace = _known_namespace(quotas, namespace)
    if quotas.clear(namespace):
        click.echo(f"cleared the quota of {namespace}; the server's default applies")
    else:
        click.echo(f"{namespace} had no quota of its own; nothing to clear")


@quota_group.command("show")
@click.argument("namespace", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_namespace_quota_option(
    "The server's --namespace-quota-gb, to show the limit that applies where a namespace has none of its own."
)
@_with_quotas
def quota_show(quotas: Quotas, namespace: str | None, as_json: bool, namespace_quota_gb: float | None) -> None:
    """Usage and limit of NAMESPACE, or of every user, organization and namespace with repos.

    JSON: a list of {namespace, used_bytes (what counts against the limit: file_bytes + metadata_bytes),
    quota_bytes (null: no limit), source ("namespace": its own, "default": --namespace-quota-gb, "none"),
    file_bytes, metadata_bytes}.
    """
    from peftkit.hub_rules.storage import format_size, storage_summary

    quotas.default_bytes = _gigabytes(namespace_quota_gb)
    usages = quotas.usage(None if namespace is None else [_known_namespace(quotas, namespace)])
    if as_json:
        click.echo(json.dumps([u.to_json() for u in usages], indent=2))
        return
    if not usages:
        click.echo("no users or repos yet", err=True)
        return
    for u in usages:
        if u.quota_bytes is None:
            limit = "no limit of its own (the server's --namespace-quota-gb applies, if it has one)"
        else:
            share = f"{storage_summary(u).percent}%" if u.quota_bytes else "-"  # as the account page and hub storage
            over = ", over quota" if u.used_bytes > u.quota_bytes else ""
            whose = "its own" if u.source == "namespace" else "the server's default"
            limit = f"of {format_size(u.quota_bytes)} ({share}{over}; {whose})"
        split = f"; files {format_size(u.file_bytes or 0)}, metadata {format_size(u.metadata_bytes or 0)}"
        click.echo(f"{u.namespace:<24} {format_size(u.used_bytes):>12}  {limit}{split}")


# ------------------------------------------------------------ maintenance
@registry_group.command("gc")
@click.option("--min-age", "min_age_s", default="0", metavar="DURATION", callback=_read_with(parse_duration),
              help="Spare blobs written less than this long before gc started: seconds (600) or a number with "
              "s, m, h, d or w (30m, 2h, 1d). [default: 0, every blob written before gc started]")
@click.option("--dry-run", is_flag=True,
              help="List the blobs gc would delete and count the staging files; delete nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary: each blob deleted (or, with --dry-run, to delete) with its bytes, "
              "and the stale staging files removed.")
@functools.partial(_with_store, clean_staging=False)  # gc removes (or, dry, counts) them itself
def gc_command(store: RegistryStore, min_age_s: float, dry_run: bool, as_json: bool) -> None:
    """Delete blobs no commit references (left by interrupted uploads) and stale staging files.

    Safe while servers run: the blob store is listed without holding the write lock, and only blobs
    written before the listing started are judged. A blob store that is not this registry's (its
    marker names another registry, or it lacks files the database refers to) is refused and nothing
    is deleted. Exit status: 0 on success, 1 when refused, 2 on a usage error such as a bad --min-age.
    """
    from .identity import BlobStoreMismatch

    try:
        report = store.gc_report(min_age_s=min_age_s, dry_run=dry_run)
    except BlobStoreMismatch as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    if dry_run:
        for sha, size in report.blobs:
            click.echo(f"{sha}  {size}")
    click.echo(
        f"{'would remove' if dry_run else 'removed'} {len(report.blobs)} unreferenced blob(s) "
        f"({report.bytes / 1e6:.1f} MB) and {report.staging_files} stale staging file(s)"
        + (" (dry run: nothing was deleted)" if dry_run else "")
    )


@registry_group.command("adopt-blobs")
@click.option("--replacing", required=True, metavar="ID|unmarked", callback=_checked_registry_id,
              help="The registry id the store's marker names now (the refusal names it), or 'unmarked' for a "
              "store without a marker. Required, so that no store is taken by accident.")
@_data_option
@_database_options
@_friendly_errors
def adopt_blobs_command(data_dir: Path | None, database: str | None, blobs_dir: str | None, replacing: str) -> None:
    """Make a blob store this registry's on purpose: its marker then names this registry.

    For a deliberate move onto a store that another registry's marker names (or an unmarked store
    holding others' files). From then on that other registry is refused on the store, and gc of this
    one deletes every file there that this registry does not refer to. Exit status: 0 when adopted
    (or already this registry's), 1 when the store's marker does not name --replacing, 2 on a usage error.
    """
    from .blob_location import open_blob_storage, refuse_blob_folder_without_blobs
    from .database_url import open_database
    from .identity import adopt_blob_store

    root = data_dir or default_data_dir()
    checked = _checked_database(database)
    if checked is None and not (root / "registry.db").is_file():
        raise click.UsageError(f"{root} holds no registry (no registry.db); pass the data folder with --data DIR")
    try:
        db = open_database(checked, root)
        try:
            refuse_blob_folder_without_blobs(blobs_dir, root, db, shared_database=checked is not None)
            blobs = open_blob_storage(blobs_dir, root)
            before = adopt_blob_store(blobs, db, replacing)
        finally:
            db.close()
    except RuntimeError as exc:  # the marker names another registry; an unreachable database or bucket
        raise click.ClickException(str(exc)) from None
    if before is None:
        click.echo(f"{blobs.describe()} already belongs to registry {db.registry_id}; nothing changed")
    else:
        click.echo(f"{blobs.describe()} now belongs to registry {db.registry_id} (its marker named {before})")


@registry_group.command("reindex")
@_with_store
def reindex_command(store: RegistryStore) -> None:
    """Rebuild the search index from every repo's files (after an upgrade changes what is indexed)."""
    try:
        count = store.reindex()
    except FileNotFoundError as exc:
        raise click.ClickException(
            f"{exc}. Repos before it were reindexed. Pass the --blobs the servers use (the shared folder or "
            "s3://BUCKET/PREFIX); `peftkit registry fsck` lists every missing file"
        ) from None
    click.echo(f"reindexed {count} repo(s)")


@registry_group.command("fsck")
@_data_option
@_database_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fsck_command(data_dir: Path | None, database: str | None, blobs_dir: str | None, as_json: bool) -> None:
    """Verify the registry: database integrity, every branch, tag and commit, and every blob re-hashed.

    Read-only and safe while the server runs. Exit status: 0 when everything
    is intact, 1 when problems were found (each is listed), 2 on a usage
    error such as a folder that holds no registry.
    """
    from .fsck import fsck, fsck_database

    root = data_dir or default_data_dir()
    if database is not None:
        with _open_store(root, database, blobs_dir) as store:
            report = fsck_database(store.db, store.blobs)
    else:
        if not (root / "registry.db").is_file():
            raise click.UsageError(f"{root} holds no registry (no registry.db); pass the data folder with --data DIR")
        report = fsck(root) if blobs_dir is None else _fsck_sqlite_with_blobs(root, blobs_dir)
    _print_fsck(report, as_json)
    _exit_unless(report.ok)


def _exit_unless(ok: bool) -> None:
    """Exit with status 1 unless ``ok``.

    ``sys.exit``, not ``ctx.exit``: the ``peftkit`` command runs click with ``standalone_mode=False``, where
    click hands ``ctx.exit``'s status back as a return value, which the entry point dropped (exit 0).
    """
    if not ok:
        sys.exit(1)


def _fsck_sqlite_with_blobs(root: Path, blobs_dir: Path):
    from .fsck import fsck_database

    with _open_store(root, None, blobs_dir) as store:
        return fsck_database(store.db, store.blobs)


def _print_fsck(report: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            click.echo(problem)
        if report.problem_count > len(report.problems):
            click.echo(f"... and {report.problem_count - len(report.problems)} more")
        mb = report.bytes_hashed / 1e6
        click.echo(
            f"checked {report.repos} repo(s), {report.commits} commit(s), {report.trees} tree(s), "
            f"{report.blobs} blob(s) ({mb:.1f} MB re-hashed); {report.orphan_blobs} unreferenced blob(s)"
            + (" (`peftkit registry gc` removes them)" if report.orphan_blobs else "")
        )
        click.echo("ok: the registry is intact" if report.ok else f"{report.problem_count} problem(s) found",
                   err=not report.ok)


@registry_group.command("migrate")
@_data_option
@click.option("--to", "target", required=True, envvar="PEFTKIT_REGISTRY_DATABASE", metavar="URL",
              help="The new, empty PostgreSQL database (postgresql://user@host:5432/db).")
@_blobs_option(
    "Also copy the data folder's blobs into this store (a shared folder, or s3://BUCKET/PREFIX with the "
    "standard AWS_* settings), skipping those already there, before the metadata; fsck then checks it. "
    "[default: the blobs stay in the data folder]"
)
@click.option("--json", "as_json", is_flag=True, help="Print what was copied, and fsck's report, as JSON.")
def migrate_command(data_dir: Path | None, target: str, blobs_dir: str | None, as_json: bool) -> None:
    """Copy the data folder's SQLite metadata to PostgreSQL, then check the copy with fsck.

    Every row is copied in one transaction and compared with the original before it commits.
    The blobs stay in the data folder (serve with --blobs DIR, or move that folder to the shared
    path), or with --blobs are copied first to that folder or S3 bucket (re-running finishes an
    interrupted copy). Exit status: 0 when copied and fsck finds the PostgreSQL registry intact,
    1 otherwise. Stop writing to the registry while it runs: commits made meanwhile are not copied.
    """
    from .blob_copy import BlobCopyError
    from .fsck import fsck_database
    from .migrate import MigrationError, migrate_to_postgres
    from .pg_db import redact

    root = data_dir or default_data_dir()
    target = _checked_database(target) or target
    blobs_copied = None
    try:
        if blobs_dir is not None and (root / "registry.db").is_file():  # else migrate_to_postgres says so
            blobs_copied = _copy_blobs_with_marker(root, blobs_dir)
        copied = migrate_to_postgres(root, target)
    except (MigrationError, BlobCopyError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    with _open_store(root, target, blobs_dir) as store:
        report = fsck_database(store.db, store.blobs)
        blobs_where = store.blobs.describe()
    if as_json:
        out: dict[str, Any] = {"rows": copied.rows, "fsck": report.to_json()}
        if blobs_copied is not None:
            out["blobs"] = {"copied": blobs_copied.copied, "already_there": blobs_copied.already_there,
                            "bytes_copied": blobs_copied.bytes_copied}
        click.echo(json.dumps(out, indent=2))
    else:
        if blobs_copied is not None:
            click.echo(f"copied {blobs_copied.copied} blob(s) ({blobs_copied.bytes_copied / 1e6:.1f} MB) to "
                       f"{blobs_where}; {blobs_copied.already_there} were already there")
        click.echo(f"copied {copied.total} row(s) to {redact(target)}: "
                   + ", ".join(f"{n} {table}" for table, n in copied.rows.items() if n))
        _print_fsck(report, False)
        if report.ok:
            click.echo(f"serve it with: {serve_after_migrate(target, blobs_where)}")
    _exit_unless(report.ok)


def serve_after_migrate(target: str, blobs_where: str) -> str:
    """The ``serve`` command for a registry ``migrate`` copied to ``target``, ready to paste: the database
    as typed (its password as ``***``), left out when it came from ``PEFTKIT_REGISTRY_DATABASE``, which
    ``serve`` reads too."""
    from .pg_db import redact

    ctx = click.get_current_context(silent=True)
    typed = ctx is not None and ctx.get_parameter_source("target") is ParameterSource.COMMANDLINE
    database = f" --database {shlex.quote(redact(target))}" if typed else ""
    return f"peftkit registry serve{database} --blobs {shlex.quote(blobs_where)}"


def _copy_blobs_with_marker(root: Path, blobs_dir: str) -> Any:
    """Copy the data folder's blobs into ``blobs_dir``, whose marker must then name this registry (it is
    written first where the store has none; a store of another registry is refused before any copy)."""
    from .blob_copy import copy_blobs
    from .blob_location import open_blob_storage
    from .blobs import BlobStore
    from .db import Database
    from .identity import check_blob_store

    target = open_blob_storage(blobs_dir, root)
    source = Database(root / "registry.db")
    try:
        check_blob_store(target, source)
    finally:
        source.close()
    return copy_blobs(BlobStore(root, create=False), target)


#: Picked up by peftkit's main CLI (peftkit/cli.py COMMAND_MODULES).
commands = [registry_group]
