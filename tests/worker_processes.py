"""Real ``flask tenant-jobs ...`` subprocesses for the tests (and ``python -m bench stress``).

Every process runs in its own session (``start_new_session=True``), so stopping
it kills its whole process group (prefork children included); processes still
running when the interpreter exits are killed too, so an interrupted run leaves
no orphans. A worker is ready once it answers a ping.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
import uuid
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent

#: Processes started and not stopped yet: killed at exit if a run is interrupted.
_RUNNING: set[FlaskProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_RUNNING):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def subprocess_env(*prefixes: str, **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess of the project.

    Variables starting with ``FLASK_`` or one of ``prefixes`` (an app's own
    switches) are left out, the project root is put on ``PYTHONPATH``, output
    is unbuffered, and ``extra`` is added.
    """
    drop = ("FLASK_", *prefixes)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class FlaskProcess:
    """A ``flask --app APP tenant-jobs ...`` subprocess in its own session, output in a file."""

    def __init__(self, app: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", app, "tenant-jobs", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self, tail: int = 6000) -> str:
        """The end of what the process printed so far."""
        text = self.log_path.read_text(errors="replace")
        return text[-tail:]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL for whatever is left of its process group."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: nothing gets to clean up)."""
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        _RUNNING.discard(self)
        if not self._log.closed:
            self._log.close()


class Worker(FlaskProcess):
    """A worker subprocess with a unique node name, ready once it answers a ping."""

    def __init__(
        self,
        app: str,
        pool: str,
        concurrency: int,
        env: dict[str, str],
        log_path: Path,
        extra: t.Sequence[str] = (),
    ) -> None:
        self.pool = pool
        self.concurrency = concurrency
        self.hostname = f"ftj-{pool}-{uuid.uuid4().hex[:8]}@localhost"
        args = [
            "worker", "-P", pool, "-c", str(concurrency), "-l", "info", "-n", self.hostname,
            "--without-mingle", "--without-gossip", "--without-heartbeat", *extra,
        ]  # fmt: skip
        super().__init__(app, args, env, log_path)

    def wait_ready(self, control_app: Celery, timeout: float = 30.0) -> None:
        """Ping the worker (1 s per ping) until it answers; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                pytest.fail(
                    f"the {self.pool} worker exited ({self.popen.returncode}) before it was "
                    f"ready:\n{self.log()}"
                )
            if control_app.control.ping(destination=[self.hostname], timeout=1.0):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the {self.pool} worker did not answer within {timeout}s:\n{self.log()}"
                )

    def task_log_lines(self, task_id: str) -> list[str]:
        """The worker's log lines about one task."""
        return [line for line in self.log(tail=10**7).splitlines() if task_id in line]

    def pool_pids(self) -> list[int]:
        """The process ids of the worker's process group other than the main process
        (prefork pool children), read from ``/proc``."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            with suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[2]) == self.pid:  # the process group id
                    found.append(int(entry.name))
        return sorted(found)


class RedisServer:
    """A ``redis-server`` of the test's own, on a free port, persisting to an append-only
    file in ``folder`` (every write synced): it can be killed and started again on it."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it on the append-only file (if any) and wait until it answers."""
        import redis

        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _answers(client), 10.0, f"redis-server on port {self.port}")
        client.close()

    def kill(self) -> None:
        """SIGKILL it, as a crash would."""
        if self.popen is not None:
            self.popen.kill()
            self.popen.wait()
            self.popen = None


def _answers(client: t.Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def redis_db_url(redis_url: str, number: int) -> str:
    """``redis_url`` pointing at database ``number``."""
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{number}", "", ""))


@contextmanager
def flushed_redis_db(redis_url: str, number: int) -> t.Iterator[str]:
    """The URL of database ``number`` of ``redis_url``'s server, flushed before and after."""
    import redis

    url = redis_db_url(redis_url, number)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    details: Callable[[], str] = str,
    interval: float = 0.2,
) -> float:
    """Poll ``condition`` until it holds; return the seconds it took, fail after ``timeout``.

    The failure message names ``what`` and adds ``details()`` (e.g. a process log).
    """
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s\n{details()}")
        time.sleep(interval)
    return time.monotonic() - start
