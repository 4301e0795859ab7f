"""The `promptcache` command: the composition root. Only this module reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import re
import signal
import sys
import uuid
from collections.abc import Sequence

import structlog
from pydantic import ValidationError

from promptcache import logs
from promptcache.config import Settings
from promptcache.errors import ConfigError

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_NOT_ANSWERED = 3

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptcache",
        description="An image-generation cache on Redis Streams. Configuration comes from the "
                    "environment (REDIS_URL, DATABASE_URL, PROMPTCACHE_*); see the README. "
                    "Without REDIS_URL / DATABASE_URL, commands use the servers of a running "
                    "`promptcache up` (its <data dir>/up.json).")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (any position on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run everything in the foreground (embedded servers where "
                                   "no URL is given)")
    up.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    up.add_argument("--demo", type=int, default=0, metavar="N",
                    help="once ready, send N real prompts twice and print a table of results")

    worker = sub.add_parser("worker", help="consume promptcache:requests (group 'workers')")
    worker.add_argument("--burst", action="store_true", help="exit once the stream is drained")
    janitor = sub.add_parser("janitor", help="stream trimming and storage accounting")
    janitor.add_argument("--burst", action="store_true", help="one pass, then exit")
    sub.add_parser("web", help="serve images, thumbnails and health endpoints")
    sub.add_parser("migrate", help="apply the SQL migrations in migrations/")

    submit = sub.add_parser("submit", help="publish one request and wait for its result")
    submit.add_argument("prompt")
    submit.add_argument("--negative", default=None)
    submit.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a generation param, e.g. --param width=512 --param seed=7")
    submit.add_argument("--cache", choices=["use", "refresh", "bypass"], default="use")
    submit.add_argument("--no-optimize", action="store_true")
    submit.add_argument("--id", default=None, help="request id (default: a new random one)")
    submit.add_argument("--scope", default=None, help="the cache scope (tenant); default shared")
    submit.add_argument("--timeout", type=float, default=120.0)

    stats = sub.add_parser("stats", help="streams, workers and cache statistics")
    stats.add_argument("--scope", default=None,
                       help="the cache figures of one scope (tenant) only")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--since", default="24h", metavar="DURATION",
                       help="how far back the hourly rollups go (default 24h; e.g. 7d, 30d)")

    purge = sub.add_parser("purge", help="evict cache entries")
    purge.add_argument("--entry", action="append", default=None, metavar="ENTRY_ID")
    purge.add_argument("--prompt", default=None, help="entries whose prompt contains this text")
    purge.add_argument("--older-than", default=None, metavar="DURATION",
                       help="entries created longer ago than this (e.g. 7d, 12h)")
    purge.add_argument("--all", action="store_true")
    purge.add_argument("--scope", default=None,
                       help="only this scope's (tenant's) entries: the others keep theirs")

    flag = sub.add_parser("flag", help="flag a cached image as bad: evicted and never served "
                                       "again")
    flag.add_argument("entry_id", metavar="ENTRY_ID")
    flag.add_argument("--reason", default=None, help="why (recorded with the flag)")
    served = sub.add_parser("served", help="the requests a cache entry was served to")
    served.add_argument("entry_id", metavar="ENTRY_ID")
    served.add_argument("--json", action="store_true")

    from ops.ab import add_arguments as ab_arguments

    ab_arguments(sub.add_parser("ab", help="measure the optimizer: a prompt set generated raw "
                                           "and optimised, BRISQUE / CLIP, mean difference "
                                           "with a 95%% CI"))

    sub.add_parser("reindex", help="re-embed the semantic index's entries that another "
                                   "embedding model made (after changing the model or runtime)")

    check = sub.add_parser("check", help="measure the service's five promises and print a "
                                         "table (against the running stack, else a stack it "
                                         "starts)")
    check.add_argument("--count", type=int, default=100, metavar="N",
                       help="generations of promise 1, 30%% of them rewrites (default 100)")
    check.add_argument("--seed", type=int, default=17)

    dead = sub.add_parser("dead-letter", help="list or replay dead letters")
    dead.add_argument("action", choices=["list", "replay"])
    dead.add_argument("ids", nargs="*", help="dead-letter entry ids to replay (default: all)")
    dead.add_argument("--count", type=int, default=20)
    return parser


# the commands that talk to the servers: they find a running `promptcache up` when REDIS_URL /
# DATABASE_URL are unset (ops/stack_state.py)
SERVER_COMMANDS = frozenset({"worker", "janitor", "web", "migrate", "submit", "stats", "purge",
                             "flag", "served", "dead-letter", "reindex", "check"})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: `promptcache stats --debug` too
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"promptcache: {_bad_settings(exc)}", file=sys.stderr)
        return RET_USAGE
    logs.configure(settings.log_level, settings.log_format)
    try:
        if args.command in SERVER_COMMANDS:
            settings = _with_running_stack(settings)
            _check_urls(settings)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"promptcache: {exc}", file=sys.stderr)
        return RET_USAGE
    except KeyboardInterrupt:
        return RET_OK
    except BaseException as exc:  # noqa: BLE001 - one line for people, the traceback on --debug
        if debug or isinstance(exc, SystemExit | GeneratorExit):
            raise
        if (line := unreachable(exc, settings)) is not None:
            print(f"promptcache: {line}", file=sys.stderr)
            return RET_USAGE
        print(f"promptcache {args.command}: {type(exc).__name__}: {_first_line(exc)} "
              "(--debug shows the traceback)", file=sys.stderr)
        return RET_ERROR


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _redact(url: str | None) -> str:
    """A URL or a libpq conninfo without its password: the userinfo's (up to the last "@"
    before the host), a `password=` query parameter, and a conninfo's `password=` field."""
    text = url or ""
    text = re.sub(r"(//[^:/@]*:)\S*@", r"\1***@", text)  # greedy: a password may hold "@" or "/"
    text = re.sub(r"([?&;]password=)[^&;]*", r"\1***", text, flags=re.IGNORECASE)
    return re.sub(r"(\bpassword\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)


def _bad_settings(exc: ValidationError) -> str:
    """One line: each bad setting by field and environment variable, its value, what is wrong."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(x) for x in error["loc"]) or "?"
        env = {"redis_url": "REDIS_URL", "cache_redis_url": "CACHE_REDIS_URL",
               "database_url": "DATABASE_URL"}.get(field, f"PROMPTCACHE_{field.upper()}")
        value = error.get("input")
        secret = field.endswith(("url", "key", "token")) or "password" in field
        shown = "" if isinstance(value, dict) else (
            f"={_redact(str(value))!r}" if secret and "url" in field
            else "=<hidden>" if secret else f"={value!r}")
        parts.append(f"{field} ({env}{shown}): {error['msg']}")
    return "bad setting " + "; ".join(parts)


def _with_running_stack(settings: Settings) -> Settings:
    """REDIS_URL and DATABASE_URL from the state file of a running `promptcache up`, when none
    of REDIS_URL, CACHE_REDIS_URL and DATABASE_URL is set."""
    from ops.stack_state import StaleState, read_state

    if settings.redis_url or settings.database_url or settings.cache_redis_url:
        # any server given explicitly: never mix it with a local stack's other servers
        return settings
    try:
        state = read_state(settings.data_dir)
    except StaleState as exc:
        raise ConfigError(str(exc)) from None
    if state is None:
        return settings
    return settings.model_copy(update={"redis_url": settings.redis_url or state.redis_url,
                                       "database_url": settings.database_url
                                       or state.database_url})


def _check_urls(settings: Settings) -> None:
    """A wrong URL is a usage error, said before anything connects."""
    for name, url in (("REDIS_URL", settings.redis_url),
                      ("CACHE_REDIS_URL", settings.cache_redis_url)):
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"bad setting {name}={_redact(url)!r}: a Redis URL starts with "
                              "redis://, rediss:// or unix://")
    if settings.database_url:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(settings.database_url)
        except ProgrammingError as exc:
            raise ConfigError(f"bad setting DATABASE_URL={_redact(settings.database_url)!r}: "
                              f"{_first_line(exc)}") from None


def unreachable(exc: BaseException, settings: Settings) -> str | None:
    """One line naming the server that could not be reached and where, or None when `exc` is
    not about reaching a server."""
    import psycopg
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (line := unreachable(inner, settings)) is not None:
                return line
        return None
    redis_where = _redact(settings.redis_url)
    if settings.effective_cache_redis_url != settings.redis_url:
        redis_where += f" or the cache store {_redact(settings.effective_cache_redis_url)}"
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return f"cannot reach Redis ({redis_where}): {_first_line(exc)}"
    if isinstance(exc, psycopg.OperationalError):
        return (f"cannot reach PostgreSQL ({_redact(settings.database_url)}): "
                f"{_first_line(exc)}")
    try:
        from psycopg_pool import PoolTimeout
    except ImportError:  # pragma: no cover - the pool extra is a dependency
        PoolTimeout = ()  # type: ignore[assignment,misc]  # noqa: N806
    if PoolTimeout and isinstance(exc, PoolTimeout):
        return (f"cannot reach PostgreSQL ({_redact(settings.database_url)}): "
                f"{_first_line(exc)}")
    if isinstance(exc, ConnectionError | TimeoutError):  # the builtins: a socket somewhere
        return f"cannot reach a server ({redis_where or 'no REDIS_URL'}): {_first_line(exc)}"
    return None


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from consumers import wiring

    match args.command:
        case "up":
            from ops.up import up

            return up(settings, workers=args.workers, demo_count=args.demo)
        case "worker":
            # `kill -USR1 <pid>` prints every thread's stack to stderr (a stuck worker)
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            asyncio.run(wiring.run_worker(settings, burst=args.burst))
        case "janitor":
            asyncio.run(wiring.run_janitor(settings, burst=args.burst))
        case "web":
            _web(settings)
        case "migrate":
            from promptcache.storage.migrate import apply

            if not settings.database_url:
                raise ConfigError("DATABASE_URL is not set")
            applied = apply(settings.database_url, settings.migrations_dir)
            print(f"applied {', '.join(applied)}" if applied else "schema up to date")
        case "submit":
            return asyncio.run(_submit(args, settings))
        case "stats":
            return asyncio.run(_stats(args, settings))
        case "purge":
            return asyncio.run(_purge(args, settings))
        case "dead-letter":
            return asyncio.run(_dead_letter(args, settings))
        case "flag":
            return asyncio.run(_flag(args, settings))
        case "served":
            return asyncio.run(_served(args, settings))
        case "ab":
            return _ab(args, settings)
        case "reindex":
            return asyncio.run(_reindex(settings))
        case "check":
            from ops.check import check

            if args.count < 10:
                raise ConfigError("--count must be at least 10")
            outcome = check(settings, count=args.count, seed=args.seed,
                            say=lambda text: print(text, file=sys.stderr, flush=True))
            print(outcome.render())
            return RET_OK if all(line.ok for line in outcome.lines) else RET_ERROR
    return RET_OK


def _ab(args: argparse.Namespace, settings: Settings) -> int:
    from ops.ab import INSTALL_HINT, missing_extra

    if missing := missing_extra():
        print(f"promptcache: {INSTALL_HINT} (missing: {', '.join(missing)})", file=sys.stderr)
        return RET_USAGE
    from ops.ab.command import main as ab_main

    return ab_main(args, settings)


def _web(settings: Settings) -> None:
    import uvicorn

    from consumers.wiring import blob_store, clients, reachable_keys, registry, sync_client
    from ops.web import build_app

    from prometheus_client import CollectorRegistry

    from ops.metrics import RedisCollector

    # a web process started before its Redis waits for it (the names depend on its answer)
    keys = asyncio.run(reachable_keys(settings)) if settings.redis_url else settings.keys()
    redis = None
    metrics = None
    blobs = blob_store(settings)
    entry_registry = None
    if settings.redis_url:
        redis, cache_redis = clients(settings, keys, fail_fast=False)
        metrics = CollectorRegistry()
        cache_url = settings.effective_cache_redis_url or settings.redis_url
        metrics.register(RedisCollector(
            sync_client(settings.redis_url, cluster=keys.cluster, socket_timeout=2), keys,
            int(settings.storage_limit),
            cache=sync_client(cache_url, cluster=keys.cache_is_cluster, socket_timeout=2)))
        entry_registry = registry(cache_redis, keys, blobs, settings)
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    app = build_app(blobs=blobs, redis=redis, keys=keys, metrics=metrics,
                    registry=entry_registry, database_url=settings.database_url,
                    admin_token=token, storage_limit=int(settings.storage_limit),
                    generator=settings.generator, signer=settings.url_signer())
    uvicorn.run(app, host=settings.web_host, port=settings.web_port, log_level="warning",
                timeout_graceful_shutdown=5)


async def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from promptcache.client import parse_param, submit
    from consumers.wiring import streams_client_for
    from schemas.events import Request

    try:
        request = Request.model_validate({
            "request_id": args.id or f"cli-{uuid.uuid4().hex[:12]}", "prompt": args.prompt,
            "negative_prompt": args.negative, "params": dict(map(parse_param, args.param)),
            "options": {"cache": args.cache, "optimize": not args.no_optimize},
            "scope": args.scope})
    except ValidationError as exc:
        print(f"promptcache: invalid request:\n{exc}", file=sys.stderr)
        return RET_USAGE
    redis = streams_client_for(settings)
    try:
        result = await submit(redis, settings.keys(), request, timeout=args.timeout)
    finally:
        await redis.aclose()
    if result is None:
        print(f"no result for {request.request_id} within {args.timeout:.0f}s "
              "(is a worker running? `promptcache stats` shows the streams)", file=sys.stderr)
        return RET_NOT_ANSWERED
    print(result.model_dump_json(indent=2))
    # a one-line summary for people (stderr: stdout stays JSON); nothing is opened
    print(f"{result.status}" + (f" ({result.cache})" if result.cache else "")
          + (f" in {result.latency_ms:.0f} ms" if result.latency_ms is not None else "")
          + (f"  image {result.image_url}" if result.image_url else "")
          + (f"  error {result.error.code}: {result.error.message}" if result.error else ""),
          file=sys.stderr)
    if result.status == "ok" and result.entry_id:
        from consumers.wiring import blob_store

        ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[
            result.content_type or "image/png"]
        sha = (result.image_url or "").rsplit("/", 1)[-1].split(".")[0]
        where = blob_store(settings).image_location(f"{sha}.{ext}")
        if isinstance(where, str):
            print(f"image object (presigned): {where}", file=sys.stderr)
        elif where is not None and where.exists():
            print(f"image file: {where}", file=sys.stderr)
    return RET_OK if result.status == "ok" else RET_ERROR


async def _stats(args: argparse.Namespace, settings: Settings) -> int:
    from ops.status import database_stats, render_stats, stream_stats
    from promptcache.config import parse_duration
    from consumers.wiring import streams_client_for

    redis = streams_client_for(settings)
    try:
        streams = await stream_stats(redis, settings.keys())
    finally:
        await redis.aclose()
    since = parse_duration(args.since)
    if not hasattr(since, "total_seconds"):
        raise ConfigError(f"--since {args.since!r}: use e.g. 24h, 7d")
    db = None
    if settings.database_url:
        try:
            db = await asyncio.to_thread(database_stats, settings.database_url, since,  # type: ignore[arg-type]
                                         args.scope)
            if db is not None and args.scope is not None:
                db["scope"] = args.scope
        except Exception as exc:  # noqa: BLE001 - the report shows what it could read
            print(f"promptcache: cannot reach PostgreSQL ({_redact(settings.database_url)}): "
                  f"{_first_line(exc)}; Redis figures only", file=sys.stderr)
    if args.json:
        print(json.dumps({"redis": streams, "database": db}, default=str, indent=2))
    else:
        print(render_stats(streams, db))
    return RET_OK


async def _reindex(settings: Settings) -> int:
    from consumers.wiring import build_semantic, require_redis_url, streams_client
    from promptcache.semantic.reindex import ReindexReport, reindex
    from promptcache.storage.db import MetadataStore

    require_redis_url(settings)
    cache = streams_client(settings.effective_cache_redis_url or "",
                           cluster=settings.keys().cache_is_cluster)
    tier = build_semantic(settings, cache)
    if tier is None:
        raise ConfigError("PROMPTCACHE_EMBEDDINGS=off: there is no model to re-embed with")

    from ops.progress import bar

    print(f"re-embedding with {tier.embedder.model} (loading the model) ...", file=sys.stderr,
          flush=True)
    try:
        total = await cache.hlen(tier.store.keys.semantic_vectors)
        with bar(total, "records read", unit="rec") as progress:

            def step(report: ReindexReport) -> None:
                progress.n = report.seen
                progress.set_postfix(reembedded=len(report.reembedded), refresh=False)
                progress.refresh()

            report = await reindex(tier, progress=step)
    finally:
        await tier.embedder.aclose()
        await cache.aclose()
    found = ", ".join(f"{model}: {n}" for model, n in report.by_model.items()) or "none"
    print(f"{report.seen} records ({found}); {report.current} already {tier.embedder.model}; "
          f"{len(report.reembedded)} re-embedded in {report.seconds:.1f} s"
          + (f"; not re-embedded: {dict(report.skipped)}" if report.skipped else "")
          + (f"; {report.deferred} entries stored while a model loaded indexed now"
             if report.deferred else ""))
    if report.reembedded and settings.database_url:
        store = MetadataStore(settings.database_url)
        try:
            await store.replace_embeddings(tier.embedder.model, [
                (r.entry_id, r.cache_key, r.params_key, r.canonical, r.vector.tolist())
                for r in report.reembedded])
        finally:
            await store.aclose()
        print(f"PostgreSQL's copy (semantic_entries) updated: {len(report.reembedded)} rows")
    return RET_OK


async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    from promptcache.invalidation import purge
    from promptcache.config import parse_duration
    from consumers.wiring import blob_store, clients, registry

    if not settings.database_url:
        raise ConfigError("purge needs DATABASE_URL (entries are found in PostgreSQL)")
    older = None
    if args.older_than:
        parsed = parse_duration(args.older_than)
        if not hasattr(parsed, "total_seconds"):
            raise ConfigError(f"--older-than {args.older_than!r}: use e.g. 7d, 12h, 30m")
        older = parsed.total_seconds()  # type: ignore[union-attr]
    redis, cache_redis = clients(settings, settings.keys(), fail_fast=False)
    keys = settings.keys()
    from ops.progress import bar

    try:
        with bar(None, "evicting", unit="entry") as progress:

            def step(done: int, total: int) -> None:
                progress.total = total
                progress.update(done - progress.n)

            count = await purge(redis, keys, settings.database_url,
                                registry(cache_redis, keys, blob_store(settings), settings),
                                entry_ids=args.entry, prompt_like=args.prompt,
                                older_than_s=older, everything=args.all,
                                scope=args.scope, progress=step)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        await redis.aclose()
        if cache_redis is not redis:
            await cache_redis.aclose()
    print(f"purged {count} entries")
    return RET_OK


async def _dead_letter(args: argparse.Namespace, settings: Settings) -> int:
    from ops.dead_letters import dead_letters, replay
    from consumers.wiring import streams_client_for

    redis = streams_client_for(settings)
    keys = settings.keys()
    try:
        if args.action == "list":
            for mid, letter in await dead_letters(redis, keys, args.count):
                print(f"{mid}  {letter.error.code:<24} deliveries {letter.delivery_count}  "
                      f"request {letter.request_id or '-'}  {letter.error.message}")
        else:
            print(f"replayed {await replay(redis, keys, args.ids or None)} entries")
    finally:
        await redis.aclose()
    return RET_OK


async def _flag(args: argparse.Namespace, settings: Settings) -> int:
    from promptcache.invalidation import UnknownEntry, flag
    from consumers.wiring import blob_store, clients, registry

    if not settings.database_url:
        raise ConfigError("flag needs DATABASE_URL (the flag is recorded in PostgreSQL)")
    redis, cache_redis = clients(settings, settings.keys(), fail_fast=False)
    keys = settings.keys()
    try:
        flagged = await flag(redis, keys, registry(cache_redis, keys, blob_store(settings),
                                                   settings),
                             settings.database_url, args.entry_id, reason=args.reason)
    except UnknownEntry as exc:
        print(f"promptcache: {exc}", file=sys.stderr)
        return RET_ERROR
    finally:
        await redis.aclose()
        if cache_redis is not redis:
            await cache_redis.aclose()
    print(f"flagged {flagged.entry_id}{' (again)' if flagged.already else ''}: image "
          f"{flagged.blob_sha256[:16]}… will not be served again; evicted "
          f"{', '.join(flagged.evicted)}")
    print(f"requests it was served to: promptcache served {flagged.entry_id}")
    return RET_OK


async def _served(args: argparse.Namespace, settings: Settings) -> int:
    from promptcache.invalidation import served

    if not settings.database_url:
        raise ConfigError("served needs DATABASE_URL (requests are recorded in PostgreSQL)")
    rows = await served(settings.database_url, args.entry_id)
    if args.json:
        print(json.dumps(rows, indent=2))
        return RET_OK
    if not rows:
        print(f"no requests recorded for {args.entry_id}", file=sys.stderr)
        return RET_OK
    import datetime as dt

    for row in rows:
        when = dt.datetime.fromtimestamp(row["at"], tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        latency = f"{row['latency_ms']:.1f} ms" if row["latency_ms"] is not None else "-"
        print(f"{when}  {row['tier']:<10} {latency:>12}  {row['request_id']}"
              f"{'  (generated it)' if row['generated'] else ''}")
    return RET_OK
