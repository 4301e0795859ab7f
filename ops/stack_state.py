"""Where a running `promptcache up` is: `<data dir>/up.json`, written once the stack is ready and
removed when it stops.

Every other command reads it when `REDIS_URL` / `DATABASE_URL` are unset, so a second terminal
reaches the embedded servers with no variables. The file names the `up` process; when that
process is gone (killed, machine rebooted) the file is stale and the command says so in one line
instead of trying servers that are not there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_NAME = "up.json"


class StaleState(Exception):
    """The state file names an `up` process that is no longer running."""


@dataclass(frozen=True, slots=True)
class StackState:
    pid: int
    redis_url: str
    database_url: str
    web_url: str
    started_at: float

    def write(self, data_dir: Path) -> Path:
        """Atomically, readable by this user only (the URLs may carry a password)."""
        path = state_path(data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out, indent=2)
        tmp.replace(path)
        return path


def state_path(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def _alive(pid: int) -> bool:
    """The `promptcache up` that wrote the file still runs: a process with that id, of this
    user, whose command line says `up` (after a reboot the id may name another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not the `up` this user started
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc here: the process id is all there is to go on
    return b"up" in args


def read_state(data_dir: Path) -> StackState | None:
    """The running stack's state, None when there is no file (or an unreadable one), or
    StaleState when its `up` process is gone."""
    path = state_path(data_dir)
    try:
        data = json.loads(path.read_text())
        state = StackState(pid=int(data["pid"]), redis_url=str(data["redis_url"]),
                           database_url=str(data["database_url"]),
                           web_url=str(data.get("web_url", "")),
                           started_at=float(data.get("started_at", 0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # half-written or foreign: as if absent
    if not _alive(state.pid):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(state.started_at))
        raise StaleState(f"{path} names a `promptcache up` (pid {state.pid}, started "
                         f"{started}) that is no longer running: start it again, set REDIS_URL "
                         "/ DATABASE_URL, or delete the file")
    return state


def remove_state(data_dir: Path, pid: int | None = None) -> None:
    """Remove the file if it is ours (`pid`), or in any case when `pid` is None."""
    path = state_path(data_dir)
    try:
        if pid is not None and json.loads(path.read_text()).get("pid") != pid:
            return
        path.unlink()
    except (FileNotFoundError, ValueError):
        pass
