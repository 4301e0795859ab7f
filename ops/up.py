"""`promptcache up`: the whole service in the foreground.

Starts embedded Valkey / PostgreSQL where REDIS_URL / DATABASE_URL are unset, migrates, runs
N workers, the janitor and the web process as child processes, restarts a child that dies, and
on Ctrl-C / SIGTERM stops the children (they finish or leave pending what they hold) and then
the embedded servers.

Once ready it writes where everything is to `<data dir>/up.json` (ops/stack_state.py), which
every other command reads when REDIS_URL / DATABASE_URL are unset, and removes it when it stops.
The children get no third-party progress bars (promptcache/logs.py CHILD_QUIET_ENV).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import structlog

from promptcache.config import Settings
from promptcache.logs import CHILD_QUIET_ENV
from ops.embedded_servers import EmbeddedPostgres, EmbeddedValkey
from ops.stack_state import StackState, StaleState, read_state, remove_state
from consumers.wiring import blob_store, streams_client
from promptcache.topology import is_cluster
from promptcache.storage.migrate import apply

log = structlog.get_logger(__name__)


@dataclass
class Child:
    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "ops", *self.args], env=env,
                                        stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()


@dataclass
class Stack:
    settings: Settings
    workers: int = 1
    say: object = print
    valkey: EmbeddedValkey | None = None
    postgres: EmbeddedPostgres | None = None
    children: list[Child] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # for the children (`check`)
    _stop: bool = False

    def _print(self, text: str) -> None:
        self.say(text)  # type: ignore[operator]

    def start(self) -> dict[str, str]:
        s = self.settings
        blob_store(s)  # a refused PROMPTCACHE_BLOBS* combination stops here, before any child
        s.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            running = read_state(s.data_dir)
        except StaleState:
            running = None  # a previous `up` that did not stop cleanly: replaced below
        if running is not None and running.pid != os.getpid():
            raise RuntimeError(f"another `promptcache up` (pid {running.pid}) is running with "
                               f"this data directory ({s.data_dir}); stop it first, or set "
                               "PROMPTCACHE_DATA_DIR to another directory")
        redis_url, database_url = s.redis_url, s.database_url
        if not redis_url:
            self._print(f"starting embedded Valkey (data in {s.data_dir / 'valkey'}) ...")
            self.valkey = EmbeddedValkey(s.data_dir / "valkey",
                                         port=s.embedded_redis_port).start()
            redis_url = self.valkey.url
        if not database_url:
            self._print(f"starting embedded PostgreSQL (data in {s.data_dir / 'postgres'}) ...")
            self.postgres = EmbeddedPostgres(s.data_dir / "postgres").start()
            database_url = self.postgres.url
        self._print("applying migrations ...")
        applied = apply(database_url, s.migrations_dir)
        self._print(f"  {len(applied)} applied now" if applied else "  schema up to date")
        env = {**CHILD_QUIET_ENV, **os.environ, "REDIS_URL": redis_url,
               **self.extra_env, "DATABASE_URL": database_url,
               "PROMPTCACHE_DATA_DIR": str(s.data_dir)}
        self.children = [Child(f"worker-{i + 1}", ["worker"]) for i in range(self.workers)]
        self.children += [Child("janitor", ["janitor"]), Child("web", ["web"])]
        started = time.monotonic()
        for child in self.children:
            child.start(env)
            pid = child.process.pid if child.process is not None else "?"
            self._print(f"  started {child.name} (pid {pid})")
        self._wait_ready(redis_url)
        self._print(f"  ready in {time.monotonic() - started:.1f}s")
        StackState(pid=os.getpid(), redis_url=redis_url, database_url=database_url,
                   web_url=s.effective_public_url, started_at=time.time()).write(s.data_dir)
        self._print(self.where(redis_url, database_url))
        return env

    def _wait_ready(self, redis_url: str, timeout: float = 60.0) -> None:
        url = f"http://{self.settings.web_host}:{self.settings.web_port}/readyz"
        deadline = time.monotonic() + timeout
        self._print("waiting for the workers and the web process ...")
        while time.monotonic() < deadline:
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.process.returncode} "
                                       "during start; see the log lines above")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready within {timeout:.0f}s ({url})")

    def where(self, redis_url: str, database_url: str) -> str:
        s = self.settings
        keys = s.keys()
        return "\n".join([
            "",
            "promptcache is up",
            *([f"  requests stream  {keys.requests}   (XADD data=<json>, see schemas/json/)",
               f"  results stream   {keys.results}"] if keys.shards == 1 else [
                f"  requests streams {keys.requests} … {keys.for_shard(keys.shards - 1).requests}"
                f"  (shard = crc32(request_id) mod {keys.shards})",
                f"  results streams  {keys.results} … {keys.for_shard(keys.shards - 1).results}"]),
            f"  redis            {redis_url}{'  (embedded)' if self.valkey else ''}",
            f"  postgresql       {database_url}{'  (embedded)' if self.postgres else ''}",
            f"  dashboard        {s.effective_public_url}/"
            + ("" if s.admin_token else "   (flagging over HTTP: set PROMPTCACHE_ADMIN_TOKEN)"),
            f"  images           {s.effective_public_url}/images/…  (files in {s.images_dir})",
            f"  metrics          {s.effective_public_url}/metrics  (Prometheus)",
            f"  health           {s.effective_public_url}/readyz",
            f"  generator        {s.generator}"
            + (f" (simulated {s.generator_latency_ms} ms per image)"
               if s.generator == "procedural" else ""),
            f"  processes        {', '.join(c.name for c in self.children)}",
            "  try              promptcache submit 'a red fox in the snow'   (any terminal: "
            f"{s.data_dir / 'up.json'} says where)",
            "  stop             Ctrl-C",
            "",
        ])

    def supervise(self, env: dict[str, str]) -> None:
        """Restart children that die, until stop()."""
        while not self._stop:
            for child in self.children:
                if child.process is not None and child.process.poll() is not None and not self._stop:
                    delay = min(2 ** child.restarts, 30)
                    log.warning("child_exited_restarting", child=child.name,
                                code=child.process.returncode, restart_in=delay)
                    time.sleep(delay)
                    if time.monotonic() - child.started_at > 60:
                        child.restarts = 0
                    child.restarts += 1
                    child.start(env)
            time.sleep(0.5)

    def stop(self, *_: object) -> None:
        self._stop = True

    def shutdown(self, grace: float = 40.0) -> None:
        remove_state(self.settings.data_dir, os.getpid())
        self._print("stopping: workers finish what they hold ...")
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if self.valkey is not None:
            self._print("stopping embedded Valkey ...")
            self.valkey.stop()
        if self.postgres is not None:
            self._print("stopping embedded PostgreSQL ...")
            self.postgres.stop()
        self._print("stopped.")


def demo(redis_url: str, settings: Settings, count: int, say: object = print) -> None:
    from ops.demo import render_table, run_demo

    async def go() -> None:
        redis = streams_client(redis_url, cluster=is_cluster(redis_url, settings.cluster))
        try:
            semantic = settings.embeddings != "off"
            say(f"demo: sending {count} real prompts, then the same prompts retyped"  # type: ignore[operator]
                + (", then asked for in other words" if semantic else "") + " ...")
            rows = await run_demo(redis, settings.keys(), count, semantic=semantic,
                                  say=say)  # type: ignore[arg-type]
            say(render_table(rows))  # type: ignore[operator]
        finally:
            await redis.aclose()

    asyncio.run(go())


def up(settings: Settings, *, workers: int, demo_count: int = 0) -> int:
    stack = Stack(settings, workers=workers)
    previous = {sig: signal.signal(sig, stack.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            env = stack.start()
        except (RuntimeError, OSError) as exc:
            print(f"promptcache up: {exc}", file=sys.stderr)
            return 1
        if demo_count and not stack._stop:
            demo(env["REDIS_URL"], settings, demo_count)
            print("still serving; Ctrl-C stops everything.")
        stack.supervise(env)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stack.shutdown()

