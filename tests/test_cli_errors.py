"""What a person sees when something is wrong: a server down, a wrong URL, a bad setting, a
stale `promptcache up` state file. One line naming what and where, exit status 2, no traceback
unless `--debug`. And the log format: console lines on a terminal, JSON otherwise.

Real processes (`python -m ops ...`), real servers where one is needed."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ops.embedded_servers import free_port
from ops.stack_state import StackState
from tests.helpers import process_env

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return process_env(PROMPTCACHE_DATA_DIR=str(tmp_path / "data"),
                       PROMPTCACHE_EMBEDDINGS="off", **extra)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops", *args], env=env, text=True,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_redis_server_that_is_down_is_one_line_and_exit_2(tmp_path):
    port = free_port()
    env = _env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    for args in (["stats"], ["submit", "a red fox in the snow", "--timeout", "5"],
                 ["dead-letter", "list"]):
        done = _cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        line = _one_line(done)
        assert line.startswith("promptcache: cannot reach Redis") and str(port) in line, line


def test_a_postgresql_server_that_is_down_is_one_line_and_exit_2(tmp_path):
    port = free_port()
    env = _env(tmp_path, DATABASE_URL=f"postgresql://someone:secret@127.0.0.1:{port}/cache")
    done = _cli("served", "e_0123", env=env)
    assert done.returncode == 2
    line = _one_line(done)
    assert line.startswith("promptcache: cannot reach PostgreSQL") and str(port) in line, line
    assert "secret" not in line  # the password is not printed


def test_debug_shows_the_traceback(tmp_path):
    env = _env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    done = _cli("stats", "--debug", env=env)
    assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr


def test_a_wrong_url_and_a_bad_setting_are_one_line_and_exit_2(tmp_path):
    wrong = _cli("stats", env=_env(tmp_path, REDIS_URL="http://localhost:8751"))
    assert wrong.returncode == 2 and "REDIS_URL" in _one_line(wrong)
    wrong_db = _cli("served", "e_1", env=_env(tmp_path, DATABASE_URL="host=x port"))
    assert wrong_db.returncode == 2 and "DATABASE_URL" in _one_line(wrong_db)
    bad = _cli("stats", env=_env(tmp_path, PROMPTCACHE_BATCH_SIZE="lots"))
    line = _one_line(bad)
    assert bad.returncode == 2 and "batch_size" in line and "PROMPTCACHE_BATCH_SIZE" in line


def test_a_stale_state_file_is_one_line_and_exit_2(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    data = tmp_path / "data"
    StackState(pid=gone.pid, redis_url=f"redis://127.0.0.1:{free_port()}/0",
               database_url="postgresql://127.0.0.1:1/x", web_url="http://127.0.0.1:1",
               started_at=0).write(data)
    for args in (["stats"], ["submit", "a fox"], ["purge", "--all"]):
        done = _cli(*args, env=_env(tmp_path))
        assert done.returncode == 2, done.stderr
        line = _one_line(done)
        assert "no longer running" in line and str(gone.pid) in line, line


def _under_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal; returns the exit status and what it printed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "ops", *args], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    printed = b"".join(chunks).decode(errors="replace")
    return process.wait(60), re.sub(r"\x1b\[[0-9;]*m", "", printed)  # without the colours


def test_logs_are_console_lines_on_a_terminal_and_json_otherwise(tmp_path, redis_url, keys):
    env = _env(tmp_path, REDIS_URL=redis_url, PROMPTCACHE_PREFIX=keys.prefix)
    code, printed = _under_a_terminal(["janitor", "--burst"], env)
    assert code == 0, printed
    lines = [ln for ln in printed.splitlines() if "janitor_started" in ln]
    assert len(lines) == 1 and not lines[0].lstrip().startswith("{"), printed
    assert "[info" in lines[0] and "consumer=" in lines[0], lines[0]

    piped = _cli("janitor", "--burst", env=env)
    assert piped.returncode == 0, piped.stderr
    events = [json.loads(ln) for ln in piped.stderr.splitlines() if ln.startswith("{")]
    assert "janitor_started" in [e["event"] for e in events], piped.stderr

    code, forced = _under_a_terminal(["janitor", "--burst"],
                                     {**env, "PROMPTCACHE_LOG_FORMAT": "json"})
    assert code == 0
    started = [ln for ln in forced.splitlines() if "janitor_started" in ln]
    assert len(started) == 1 and json.loads(started[0])["event"] == "janitor_started", forced


def test_a_state_file_naming_a_live_process_that_is_no_up_is_stale(tmp_path):
    """After a reboot the recorded process id can belong to anything: only an `up` counts."""
    import os

    from ops.stack_state import StackState, StaleState, read_state

    StackState(pid=os.getpid(), redis_url="redis://127.0.0.1:1/0", database_url="",
               web_url="", started_at=0.0).write(tmp_path)
    try:
        read_state(tmp_path)
    except StaleState as exc:
        assert "no longer running" in str(exc)
    else:
        raise AssertionError("a test process was taken for a running `promptcache up`")


def test_two_checks_on_one_data_dir_do_not_run_at_once(tmp_path, keys):
    """A second `promptcache check` would delete the first one's stack under it: refused."""
    import fcntl

    import pytest

    from ops import check
    from promptcache.errors import ConfigError
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, "redis://127.0.0.1:1/0", keys)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.data_dir / "check.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another `promptcache check`"):
            check._own_stack(settings, 10, 1, print, check.Outcome())
