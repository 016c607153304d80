"""Servers under test, each in its own process: the real sidecar and the bare echo server.

The sidecar is started exactly as an operator would (``python -m sidecar.cli
serve ...``); stdout and stderr go to files so a chatty server never blocks on
a pipe. ``cpus`` pins a server (and every thread it will ever start) by
setting the affinity before ``exec``. CPU time is read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procfs import children_of

__all__ = ["ServerProc", "cpu_seconds", "launch_aio", "launch_echo", "launch_sidecar", "ready",
           "system_cpu"]

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PIN = "import os, sys; os.sched_setaffinity(0, {%s}); os.execv(sys.argv[1], sys.argv[1:])"
START_TIMEOUT = 60.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, summed over CPUs (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    total = sum(fields[:8])  # guest time is already counted in user
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (total - idle) / _TICK, total / _TICK


@dataclass
class ServerProc:
    """A server child process and the port it answers on."""

    name: str
    process: subprocess.Popen[bytes]
    workdir: Path
    port: int = 0
    workers: int = 1

    @property
    def target(self) -> str:
        """host:port for a channel."""
        return f"127.0.0.1:{self.port}"

    def serving_pids(self) -> list[int]:
        """The processes that answer calls (the workers, with ``--workers``)."""
        return children_of(self.process.pid) if self.workers > 1 else [self.process.pid]

    def cpu(self) -> list[float]:
        """CPU seconds so far of each serving process."""
        return [cpu_seconds(pid) for pid in self.serving_pids()]

    def stdout(self) -> str:
        """What the server printed so far."""
        return (self.workdir / "stdout.txt").read_text(errors="replace")

    def stderr(self) -> str:
        """What the server logged so far."""
        return (self.workdir / "stderr.txt").read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server (the parent forwards it to its workers)."""
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                for pid in self.serving_pids():
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


def _launch(name: str, workdir: Path, argv: Sequence[str],
            cpus: Sequence[int] | None) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    if cpus is not None:
        argv = [sys.executable, "-c", _PIN % ", ".join(str(c) for c in cpus), *argv]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with (workdir / "stdout.txt").open("wb") as out, (workdir / "stderr.txt").open("wb") as err:
        return subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL)


def _wait_for(server: ServerProc, pattern: str, count: int = 1) -> re.Match[str]:
    regex = re.compile(pattern)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        matches = list(regex.finditer(server.stdout()))
        if len(matches) >= count:
            return matches[0]
        if server.process.poll() is not None:
            break
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{server.name} did not start (exit {server.process.poll()}):\n"
                       f"{server.stdout()}\n{server.stderr()[-3000:]}")


def launch_sidecar(workdir: Path, policy: Path, *, threads: int = 8, workers: int = 1,
                   cpus: Sequence[int] | None = None, name: str = "sidecar",
                   extra: Sequence[str] = ()) -> ServerProc:
    """Start ``spendkeeper serve`` (ephemeral loopback port, fresh ledger); see ``ready``."""
    argv = [sys.executable, "-m", "sidecar.cli", "serve", "--policy", str(policy),
            "--data-dir", str(workdir / "data"), "--listen", "127.0.0.1:0",
            "--metrics-listen", "off", "--no-watch", "--threads", str(threads),
            "--workers", str(workers), "--log-level", "info", *extra]
    return ServerProc(name, _launch(name, workdir, argv, cpus), workdir, workers=workers)


def launch_aio(workdir: Path, policy: Path, *, cpus: Sequence[int] | None = None) -> ServerProc:
    """Start the grpc.aio variant of the servicer (bench.aio_server); see ``ready``."""
    argv = [sys.executable, "-m", "bench.aio_server", "--policy", str(policy),
            "--data-dir", str(workdir / "data")]
    return ServerProc("aio", _launch("aio", workdir, argv, cpus), workdir)


def launch_echo(workdir: Path, size: int, *, threads: int = 8,
                cpus: Sequence[int] | None = None) -> ServerProc:
    """Start the bare grpcio server (bench.echo_server) with ``size``-byte responses."""
    argv = [sys.executable, "-m", "bench.echo_server", "--port", "0", "--threads", str(threads),
            "--size", str(size)]
    return ServerProc("echo", _launch("echo", workdir, argv, cpus), workdir)


def ready(server: ServerProc) -> ServerProc:
    """Wait until ``server`` listens (every worker, with ``--workers``); sets its port."""
    if server.workers > 1:
        match = _wait_for(server, r"workers on [^\s,]*:(\d+)")
        _wait_for(server, r"serving on .*\(port \d+\)", count=server.workers)
    else:
        match = _wait_for(server, r"\(port (\d+)\)|echo: port (\d+)")
    server.port = int(match.group(1) or match.group(2))
    return server
