"""What the service benchmarks share: signals, the worker processes, the result reader, the
machine and git facts, log scanning, cleanup and JSON output.

Used by benchmarks/spine.py, benchmarks/semantic_service.py and benchmarks/hit_path.py. Every
wait has a deadline; processes run in their own session so a terminal Ctrl-C reaches only the
benchmark, which stops them itself (SIGTERM, SIGKILL after a bound).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from ops.embedded_servers import EmbeddedPostgres, EmbeddedValkey  # noqa: E402
from ops.progress import bar  # noqa: E402
from promptcache.keys import REQUESTS_GROUP, Keys  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# no DATABASE_URL on purpose in the spine and semantic benchmarks: their persister is off
EXPECTED_WORKER_WARNINGS = frozenset({"no_database_url"})


def say(text: str = "") -> None:
    print(text, flush=True)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- signals ----------------------------------------------------------------------------------

class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the run."""


class Stopper:
    """Ctrl-C / SIGTERM inside the event loop set a flag that every wait checks, instead of
    cancelling the task: cancelling redis-py (8.1) in the middle of a blocking XREAD can leave
    the task hanging forever. If the run has not stopped FORCE_AFTER_S after the signal (or on
    a second signal), the cleanup runs from the signal callback and the process exits."""

    FORCE_AFTER_S = 8.0

    def __init__(self) -> None:
        self.reason: str | None = None
        self.force: Any = None  # set by main: synchronous cleanup, then os._exit

    def check(self) -> None:
        if self.reason is not None:
            raise Interrupted(self.reason)

    def on_signal(self, sig: signal.Signals) -> None:
        loop = asyncio.get_running_loop()
        if self.reason is None:
            self.reason = sig.name
            say(f"\n{sig.name}: stopping (again to force) ...")
            loop.call_later(self.FORCE_AFTER_S, self._force, "the run did not stop in time")
        else:
            self._force("second signal")

    def _force(self, why: str) -> None:
        say(f"forced cleanup: {why}")
        if self.force is not None:
            self.force()
        os._exit(130)


STOP = Stopper()  # one per process: every benchmark's waits check it


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def install_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, STOP.on_signal, sig)


def remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    signal.signal(signal.SIGTERM, _sigterm)


def check_loopback(p: Any, url: str) -> None:
    """argparse error unless `url` is a Unix socket or a loopback address."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        p.error(f"--redis-url must point at a loopback address, not {host!r}")


# --- statistics and machine facts -------------------------------------------------------------

def percentiles(values: Iterable[float], qs: tuple[int, ...] = (50, 90, 99),
                minimum: bool = True) -> dict[str, float] | None:
    """n, (min), the percentiles `qs` (numpy's linear interpolation) and max; None if empty."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return None
    out: dict[str, float] = {"n": int(a.size)}
    if minimum:
        out["min"] = round(float(a.min()), 2)
    for q, v in zip(qs, np.percentile(a, list(qs)), strict=True):
        out[f"p{q}"] = round(float(v), 2)
    out["max"] = round(float(a.max()), 2)
    return out


def cpu_times(pids: Iterable[int]) -> float:
    """utime + stime in seconds of these processes (0 for any that is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (float(sum(values) - idle), float(sum(values)))


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_mb"] = int(fh.readline().split()[1]) // 1024
    except OSError:
        pass
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


# --- the results stream -----------------------------------------------------------------------

def report_head(name: str, argv: list[str] | None) -> dict[str, Any]:
    """The first fields of a benchmark's JSON: what ran, when, where, at which commit."""
    return {"benchmark": name,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(), "git": git_state(),
            "command": " ".join([f"benchmarks/{name}.py",
                                 *(sys.argv[1:] if argv is None else argv)])}


def config_footer(name: str, config: dict[str, Any], events: str = "unexpected_events",
                  label: str = "level:event, unexpected") -> list[str]:
    """A configuration's worker stderr findings and notes, under a benchmark's table."""
    lines = []
    logs = config.get("logs") or {}
    if logs.get(events):
        lines.append(f"{name} stderr ({label}): {logs[events]}")
    for site, count in list(logs.get("exceptions", {}).items())[:3]:
        lines.append(f"  {count} x {site}")
    lines += [f"{name} note: {note}" for note in config.get("notes", [])]
    return lines


class ResultReader:
    """One XREAD loop over the results stream from a cursor onwards, for the whole run.
    Subclasses keep what they need in `take(data, now)`; a request id seen twice is counted in
    `duplicates` and not passed on."""

    def __init__(self, url: str, stream: str) -> None:
        self.client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.stream = stream
        self.cursor = "0-0"
        self.seen: set[str] = set()
        self.duplicate_ids: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.error: BaseException | None = None

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_ids)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the current XREAD (BLOCK 200 ms) finish rather than cancel it (see Stopper)."""
        self._stopping = True
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=12)  # socket_timeout 10 s
            if not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1)
                return  # a connection stuck mid-read is not closed cleanly; the process exits
        await self.client.aclose()

    async def _run(self) -> None:
        try:
            while not self._stopping:
                reply = await self.client.xread({self.stream: self.cursor}, count=2000, block=200)
                now = time.monotonic()
                for _, entries in reply or []:
                    for mid, fields in entries:
                        self.cursor = mid.decode()
                        data = json.loads(fields[b"data"])
                        rid = data.get("request_id", "")
                        if rid in self.seen:
                            self.duplicate_ids.append(rid)
                            continue
                        self.seen.add(rid)
                        self.take(data, now)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by the waits, which then stop the run
            self.error = exc
            self.failed(exc)
            raise

    def take(self, data: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def failed(self, exc: BaseException) -> None:
        """Called once when the reader fails (after `error` is set)."""

    def answered(self, ids: list[str]) -> int:
        return sum(1 for rid in ids if rid in self.seen)

    async def wait(self, ids: list[str], deadline: float, desc: str = "answered") -> bool:
        """True when every id has a result before `deadline` (monotonic). A progress bar on a
        terminal (nothing when stderr is a file or a pipe)."""
        pending = [rid for rid in ids if rid not in self.seen]
        with bar(len(ids), desc, unit="result") as progress:
            progress.update(len(ids) - len(pending))
            while pending:
                STOP.check()
                if self.error is not None:
                    raise RuntimeError(f"result reader failed: {self.error!r}")
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.05)
                left = [rid for rid in pending if rid not in self.seen]
                progress.update(len(pending) - len(left))
                pending = left
        return True


# --- processes --------------------------------------------------------------------------------

def service_env(url: str, prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any PROMPTCACHE_*, DATABASE_URL, CACHE_REDIS_URL or
    REDIS_URL, then the given servers, JSON logs at WARNING, and `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROMPTCACHE_") and k not in ("DATABASE_URL", "CACHE_REDIS_URL",
                                                             "REDIS_URL")}
    env.update(REDIS_URL=url, PROMPTCACHE_PREFIX=prefix, PROMPTCACHE_DATA_DIR=str(data_dir),
               PROMPTCACHE_LOG_LEVEL="WARNING", PROMPTCACHE_LOG_FORMAT="json",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_processes(n: int, env: dict[str, str], log_dir: Path, command: str = "worker",
                    ) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """`python -m ops <command>` n times, stderr to `<log_dir>/<command>-<i>.stderr`."""
    procs, logs = [], []
    for i in range(n):
        log = log_dir / f"{command}-{i + 1}.stderr"
        with log.open("wb") as fh:
            # own session: a Ctrl-C in the terminal reaches only us; we SIGTERM them ourselves
            procs.append(subprocess.Popen([sys.executable, "-m", "ops", command], env=env,
                                          cwd=REPO, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=fh,
                                          start_new_session=True))
        logs.append(log)
    return procs, logs


def start_workers(n: int, env: dict[str, str], log_dir: Path
                  ) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    return start_processes(n, env, log_dir, "worker")


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 12.0) -> list[dict]:
    """SIGTERM every process, SIGKILL what is still running after `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    stopped = []
    for proc in procs:
        killed = False
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
        stopped.append({"pid": proc.pid, "returncode": proc.returncode, "killed": killed})
    return stopped


async def wait_for_workers(url: str, keys: Keys, procs: list[subprocess.Popen[bytes]],
                           logs: list[Path], timeout: float = 30.0, *,
                           semantic: bool = False, client: Any = None) -> float:
    """Every worker has joined the requests group of every shard (and, with `semantic`,
    published its semantic index stats: its model is loaded). Returns the seconds it took.
    `client`: the caller's (a cluster client, say), left open; default one to `url`."""
    own = client is None
    if own:
        client = aioredis.Redis.from_url(url, socket_timeout=5)
    pids = {str(p.pid) for p in procs}
    started = time.monotonic()
    deadline = started + timeout
    last_note = started
    try:
        while True:
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker pid {proc.pid} exited with {proc.returncode} "
                                       f"during start:\n{tail}")
            ready = set(pids)
            for shard in keys.all_shards():
                try:
                    consumers = await client.xinfo_consumers(shard.requests, REQUESTS_GROUP)
                    ready &= {c["name"].decode().rsplit("#", 1)[-1] for c in consumers}
                except redis.ResponseError:  # no stream/group yet
                    ready = set()
            loaded = pids
            if semantic:
                loaded = {k.decode().rsplit("#", 1)[-1] async for k in
                          client.scan_iter(match=keys.semantic_index_stats("*"), count=100)}
            if len(ready) == len(pids) and pids <= loaded:
                return time.monotonic() - started
            STOP.check()
            if semantic and time.monotonic() - last_note > 10:
                progress(f"  waiting for workers: {len(ready)}/{len(pids)} in the group, "
                         f"{len(pids & loaded)}/{len(pids)} semantic tiers ready "
                         f"({time.monotonic() - started:.0f} s)")
                last_note = time.monotonic()
            if time.monotonic() > deadline:
                what = "joined the group and loaded the model" if semantic else \
                    f"joined the group '{REQUESTS_GROUP}'"
                raise RuntimeError(f"only {len(ready)}/{len(pids)} workers {what} within "
                                   f"{timeout:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        if own:
            await client.aclose()


def worker_health(url: str, keys: Keys) -> list[dict[str, Any]]:
    """The counters each worker writes to its health key when it stops."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        rows = []
        for key in client.scan_iter(match=keys.health("*"), count=100):
            raw = client.get(key)
            if raw:
                rows.append(json.loads(raw))
        return sorted(rows, key=lambda r: r.get("consumer", ""))
    finally:
        client.close()


def delete_prefix(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        deleted = 0
        batch = []
        for key in client.scan_iter(match=f"{prefix}:*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
        return deleted
    finally:
        client.close()


def _exception_site(entry: dict[str, Any]) -> str | None:
    """`ExcType: message at file:line in fn` (innermost project frame) from a structlog
    dict_tracebacks `exception` field."""
    chain = entry.get("exception")
    if not isinstance(chain, list) or not chain:
        return None
    exc = chain[-1]
    frames = exc.get("frames") or []
    ours = [f for f in frames if str(f.get("filename", "")).startswith(str(REPO))
            and "/.venv/" not in str(f.get("filename", ""))]
    frame = (ours or frames or [{}])[-1]
    where = (f" at {Path(str(frame.get('filename', '?'))).relative_to(REPO)}:"
             f"{frame.get('lineno')} in {frame.get('name')}" if ours else "")
    return f"{exc.get('exc_type')}: {str(exc.get('exc_value'))[:120]}{where}"


def scan_worker_logs(logs: list[Path], expected: Iterable[str] = EXPECTED_WORKER_WARNINGS
                     ) -> dict[str, Any]:
    """level:event counts of the processes' JSON stderr, exception sites, and samples of what
    is not an `expected` event."""
    expected = frozenset(expected)
    events: collections.Counter[str] = collections.Counter()
    exceptions: collections.Counter[str] = collections.Counter()
    samples: list[str] = []
    unparsed = 0
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name = f"{entry.get('level', '?')}:{entry.get('event', '?')}"
            except (ValueError, AttributeError):
                unparsed += 1
                name = None
            if name is not None:
                events[name] += 1
                if (site := _exception_site(entry)) is not None:
                    exceptions[f"{entry.get('event')}: {site}"] += 1
                if name.split(":", 1)[1] in expected:
                    continue
            if len(samples) < 20:
                samples.append(f"{log.name}: {line[:500]}")
    unexpected = {k: v for k, v in events.items() if k.split(":", 1)[1] not in expected}
    return {"events": dict(events), "unexpected_events": unexpected,
            "exceptions": dict(exceptions.most_common()), "unparsed_lines": unparsed,
            "samples": samples}


def cleanup(args: Any, report: dict[str, Any], procs: list[Any], logs: list[Path],
            valkey: EmbeddedValkey | None, url: str | None, prefix: str, tmp: Path, *,
            postgres: EmbeddedPostgres | None = None,
            expected: Iterable[str] = EXPECTED_WORKER_WARNINGS) -> None:
    """Stop the workers (SIGTERM), read their counters, stop Valkey (or delete the prefix's keys
    on an external server) and PostgreSQL, remove the temp dir unless `args.keep_temp`.
    Idempotent; bounded (12 s for the workers, 10 s for Valkey)."""
    if report.get("cleaned_up"):
        return
    report["cleaned_up"] = True
    workers: dict[str, Any] = {"stopped": stop_workers(procs)}
    if url is not None:
        try:
            workers["health"] = worker_health(url, Keys(prefix))
        except redis.RedisError as exc:
            workers["health_error"] = repr(exc)
    workers["logs"] = scan_worker_logs(logs, expected)
    report["workers"] = workers
    if valkey is not None:
        valkey.stop()
    elif url is not None:
        try:
            report["deleted_keys"] = delete_prefix(url, prefix)
        except redis.RedisError as exc:
            report["delete_error"] = repr(exc)
    if postgres is not None:
        postgres.stop()
    if getattr(args, "keep_temp", False):
        say(f"temp dir kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# --- output -----------------------------------------------------------------------------------

def write_json(report: dict[str, Any], out_dir: Path, name: str, *, stamped: bool = True,
               indent: int = 2) -> Path:
    """`<name>-latest.json` (and, with `stamped`, `<name>-<UTC stamp>.json`, returned) in
    `out_dir`, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    latest = out_dir / f"{name}-latest.json"
    path = out_dir / f"{name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json" if stamped \
        else latest
    text = json.dumps(report, indent=indent, default=str) + "\n"
    for target in dict.fromkeys((path, latest)):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return path
