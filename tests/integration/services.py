"""Real services for integration tests: any background command, a Prefect server, a PostgreSQL cluster.

Each helper is a context manager that owns the processes it starts and ends them on exit, even when the test
body raised: a failed run must not leave a server holding ports and CPU on a shared machine.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

_INSTALL = "bash .ci/install-services"
_REQUIRE_ENV = "LORA_REQUIRE_SERVICES"

# Inherited settings that would point the throw-away server or its clients at another server, database or profile.
_FOREIGN_PREFECT = (
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_PROFILE",  # also PREFECT_PROFILES_PATH
    "PREFECT_API_DATABASE_",
    "PREFECT_SERVER_DATABASE_",
    "PREFECT_UI_",
    "PREFECT_SERVER_UI_",
)
# A proxy must not see requests to the local services (urllib, httpx and requests all honour these variables).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, chosen by the OS (another process could still take it first)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Process(NamedTuple):
    pid: int
    ppid: int
    pgrp: int
    started: int  # clock ticks after boot: with pid, tells a process from a later one that reuses its pid
    zombie: bool


def _processes() -> list[_Process]:
    """Every process in /proc, zombies included (reported so that callers can wait until they are reaped)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, (ppid, pgrp, started) = int(stat.parent.name), map(int, (fields[1], fields[2], fields[19]))
        found.append(_Process(pid, ppid, pgrp, started, fields[0] in ("Z", "X")))
    return found


def _wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after 15 s; members that outlive the leader count too."""
    pgid = proc.pid

    def group(live: bool) -> list[_Process]:
        proc.poll()  # reap the leader, or its zombie would keep the group alive
        return [p for p in _processes() if p.pgrp == pgid and not (live and p.zombie)]

    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if _wait_until(lambda: not group(live=True), grace):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    # Orphaned members are reaped by PID 1, which in a container may poll every few seconds: wait, so ps is clean.
    _wait_until(lambda: not group(live=False), 5)


@contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run cmd in its own process group, output to log, so that its children (uvicorn, workers) end with it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    try:
        yield proc
    finally:
        _stop_group(proc)


def _get(url: str, timeout: float = 5) -> tuple[int, str, bytes]:
    with _DIRECT.open(url, timeout=timeout) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


@dataclass
class PrefectServer:
    """A running Prefect server; env is the complete environment a client, worker or CLI call needs to use it."""

    api_url: str
    ui_url: str
    env: dict[str, str]
    log: Path


@contextmanager
def prefect_server(home: Path, database_url: str | None = None, timeout: float = 180) -> Iterator[PrefectServer]:
    """A Prefect server on a free port with its own PREFECT_HOME (SQLite there unless database_url is given).

    Yields once /api/health answers and the UI serves HTML; the server's process group is stopped on exit.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui_url = f"http://127.0.0.1:{port}/"
    api_url = f"{ui_url}api"
    env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN_PREFECT)}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_UI_URL=ui_url,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        OMP_NUM_THREADS="1",
    )
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1", "localhost"]))
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(cmd, env, log, cwd=home) as proc:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Prefect server exited with {proc.returncode}; {log}:\n{log_tail(log)}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if _get(f"{api_url}/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server not healthy after {timeout:.0f} s; {log}:\n{log_tail(log)}")
            time.sleep(0.5)
        status, content_type, body = _get(ui_url)
        if status != 200 or "html" not in content_type or b"<html" not in body[:2000].lower():
            raise RuntimeError(f"Prefect UI at {ui_url} answered {status} {content_type!r}, not HTML")
        yield PrefectServer(api_url=api_url, ui_url=ui_url, env=env, log=log)


def _version(bindir: str) -> tuple[int, ...]:
    name = Path(bindir).parent.name
    return tuple(int(part) for part in name.split(".")) if name.replace(".", "").isdigit() else (0,)


def _pg_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None.

    Debian keeps them off PATH in /usr/lib/postgresql/<major>/bin, and `pg_config --bindir` may describe
    libpq-dev's client rather than the installed server, so look there first, newest major first.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in map(Path, candidates):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def _remaining(family: set[tuple[int, int]], live: bool = True) -> set[tuple[int, int]]:
    """Those of family (pid, start time) still in /proc; the start time guards against a reused pid."""
    return family & {(p.pid, p.started) for p in _processes() if not (live and p.zombie)}


@contextmanager
def postgres(base: Path, timeout: float = 60) -> Iterator[str]:
    """A throw-away PostgreSQL cluster under base with an empty database `prefect`; yields its asyncpg URL.

    PostgreSQL refuses to run as root, so as root the cluster belongs to Debian's `postgres` user. Trust
    authentication and fsync off: it is local to 127.0.0.1, lives for one test and holds nothing worth keeping.
    """
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError(f"PostgreSQL's initdb and pg_ctl not found: install Debian's postgresql: {_INSTALL}")
    base.mkdir(parents=True, exist_ok=True)
    cluster, scratch, as_user = base, None, []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(f"running as root without a `postgres` user to run PostgreSQL: {_INSTALL}") from None
        owner = (user.pw_uid, user.pw_gid)
        as_user = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]
        os.chown(base, *owner)
        if subprocess.run([*as_user, "test", "-w", str(base)], check=False, timeout=30).returncode != 0:
            # A parent of base is private to root (pytest's /tmp/pytest-of-root is 0700): use a directory in /tmp.
            cluster = scratch = Path(tempfile.mkdtemp(prefix="lora-pg-"))
            os.chown(cluster, *owner)
    data, log, sock = cluster / "data", cluster / "postgres.log", cluster / "sock"
    sock.mkdir(exist_ok=True)
    if owner:
        os.chown(sock, *owner)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}

    def run(*args: str) -> None:
        done = subprocess.run(
            [*as_user, *args], cwd=cluster, env=env, capture_output=True, text=True, timeout=timeout + 30, check=False
        )
        if done.returncode != 0:
            output = f"{done.stdout}{done.stderr}\n{log_tail(log)}"
            raise RuntimeError(f"{' '.join(args)} failed with {done.returncode}:\n{output}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "prefect", "--no-locale", "-E", "UTF8", "-N")
        # A unix socket path is limited to ~107 bytes; past that, TCP only ('' turns the sockets off).
        sockets = str(sock) if len(str(sock)) < 90 else ""
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sockets}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout)), "start")
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        _stop_postgres(bindir, data, as_user, env)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _stop_postgres(bindir: Path, data: Path, as_user: list[str], env: dict[str, str]) -> None:
    """pg_ctl -m immediate stop, then SIGKILL whatever of the postmaster and its children is still there."""
    try:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return  # never started, or already stopped
    family = {(p.pid, p.started) for p in _processes() if postmaster in (p.pid, p.ppid) and not p.zombie}
    stop = [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"]
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(stop, cwd="/", env=env, capture_output=True, timeout=60, check=False)
    if not _wait_until(lambda: not _remaining(family), 10):
        for pid, _ in _remaining(family):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not _remaining(family), 10)
    # pg_ctl daemonizes the postmaster, so PID 1 reaps it, possibly seconds later (see _stop_group).
    _wait_until(lambda: not _remaining(family, live=False), 5)


def require_binaries(*names: str) -> None:
    """Skip the test when a service binary is missing, or fail it when LORA_REQUIRE_SERVICES=1 (as CI sets).

    initdb, pg_ctl and the other PostgreSQL server tools count as present when _pg_bindir() holds them.
    """
    bindir = _pg_bindir()
    missing = [name for name in names if not shutil.which(name) and not (bindir and (bindir / name).is_file())]
    if not missing:
        return
    reason = f"missing {', '.join(missing)}: install with `{_INSTALL}`"
    if os.environ.get(_REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({_REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)
