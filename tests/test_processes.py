"""The real processes: `promptcache worker` under SIGTERM, `promptcache up` end to end, the CLI.

Killed processes and servers: tests/test_chaos.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis as syncredis

from ops.embedded_servers import free_port
from tests.helpers import held, process_env, send_request
from tests.helpers import stream_results as _results
from tests.helpers import wait_for as _wait

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return process_env(PROMPTCACHE_DATA_DIR=str(tmp_path / "data"), PROMPTCACHE_LOG_FORMAT="json",
                       PROMPTCACHE_EMBEDDINGS="off",  # the semantic tier: tests/test_semantic.py
                       **extra)


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_sigterm_finishes_in_flight_generation_and_exits_cleanly(redis_url, keys, tmp_path):
    env = _env(tmp_path, REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix,
               PROMPTCACHE_GENERATOR_LATENCY_MS="1500")
    r = syncredis.Redis.from_url(redis_url)
    worker = subprocess.Popen([sys.executable, "-m", "ops", "worker"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        send_request(r, keys, "term-1", "a lantern in the rain")
        _wait(lambda: held(r, keys) == 1, 20, "the worker to take the request")
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    finally:
        worker.kill()
        worker.wait(10)
    assert worker.returncode == 0, err[-2000:]
    assert [x.request_id for x in _results(r, keys)] == ["term-1"]
    assert held(r, keys) == 0
    assert '"worker_stopped"' in err


def test_commands_without_their_server_say_so(tmp_path):
    env = _env(tmp_path)
    for args, needle in ((["worker"], "REDIS_URL"), (["migrate"], "DATABASE_URL"),
                         (["submit", "x"], "REDIS_URL")):
        done = _cli(*args, env=env)
        assert done.returncode == 2 and needle in done.stderr, (args, done.stderr)
    bad = _cli("worker", env={**env, "PROMPTCACHE_GENERATION_CONCURRENCY": "zero"})
    assert bad.returncode == 2 and "generation_concurrency" in bad.stderr


def test_dead_letter_list_and_replay(redis_url, keys, tmp_path):
    env = _env(tmp_path, REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix,
               PROMPTCACHE_GENERATOR_LATENCY_MS="0")
    r = syncredis.Redis.from_url(redis_url)
    r.xadd(keys.requests, {"data": b"{broken"})
    assert _cli("worker", "--burst", env=env).returncode == 0
    listed = _cli("dead-letter", "list", env=env)
    assert listed.returncode == 0 and "invalid_request" in listed.stdout
    [(mid, _)] = r.xrange(keys.dead_letter)
    replayed = _cli("dead-letter", "replay", mid.decode(), env=env)
    assert "replayed 1" in replayed.stdout and r.xlen(keys.dead_letter) == 0
    assert r.xrange(keys.requests)[-1][1] == {b"data": b"{broken"}


def test_up_serves_the_demo_submit_stats_and_purge_then_stops_cleanly(tmp_path):
    port = free_port()
    env = _env(tmp_path, PROMPTCACHE_WEB_PORT=str(port), PROMPTCACHE_GENERATOR_LATENCY_MS="200",
               PROMPTCACHE_EMBEDDED_REDIS_PORT="0",
               PROMPTCACHE_HEALTH_INTERVAL="1s")
    up = subprocess.Popen([sys.executable, "-m", "ops", "up", "--workers", "2", "--demo", "3"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "still serving" in line:
                break
        out = "".join(lines)
        assert "still serving" in out, out + (up.stderr.read() if up.poll() is not None else "")
        rows = [ln for ln in lines if re.match(r"^[12]\s+(miss|exact|coalesced)\s", ln)]
        assert [ln.split()[1] for ln in rows] == ["miss"] * 3 + ["exact"] * 3, out
        image_url = re.search(r"(http://\S+\.png)", rows[0]).group(1)
        with urllib.request.urlopen(image_url, timeout=5) as response:
            assert response.headers["content-type"] == "image/png"
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"

        redis_url = re.search(r"redis\s+(redis://\S+)", out).group(1)
        database_url = re.search(r"postgresql\s+(postgresql://\S+)", out).group(1)
        env_client = {**env, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
        state = json.loads((tmp_path / "data" / "up.json").read_text())
        assert (state["redis_url"], state["database_url"]) == (redis_url, database_url)
        # a second terminal with no variables: the state file of `up` says where the servers are
        submitted = _cli("submit", "a fox made of origami", "--param", "seed=3", env=env)
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["cache"] == "miss"
        again = _cli("submit", "A fox made of origami.", "--param", "seed=3", env=env_client)
        assert json.loads(again.stdout)["cache"] == "exact"

        def stats() -> dict:
            done = _cli("stats", "--json", env=env)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        _wait(lambda: (stats()["database"] or {}).get("entries") == 4, 20,
              "the persister to write four entries")
        figures = stats()["database"]
        assert figures["by_tier"]["exact"]["requests"] == 4 and figures["by_tier"]["miss"][
            "requests"] == 4 and figures["hit_rate"] == 0.5 and figures["generator_calls"] == 4
        assert figures["generator_calls_avoided"] == 4 and figures["bytes_stored"] > 0
        table = _cli("stats", env=env_client).stdout
        assert "workers (last health report)" in table and "hit rate 50.0%" in table, table
        purged = _cli("purge", "--prompt", "origami", env=env_client)
        assert purged.stdout.strip() == "purged 1 entries", purged.stderr
        _wait(lambda: stats()["database"]["entries"] == 3, 20, "the purge to reach the database")
        third = _cli("submit", "a fox made of origami", "--param", "seed=3", env=env_client)
        assert json.loads(third.stdout)["cache"] == "miss"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            _, err = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0, err[-3000:]
    assert not (tmp_path / "data" / "up.json").exists()  # removed when `up` stopped
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "processes left running after up stopped"
