"""Helpers of the reliability tests: real ``spendkeeper serve`` processes and their ledgers.

A module (not conftest fixtures) so the test modules import it by name; its
name is unique across ``tests/`` because pytest puts each test directory on
``sys.path``. Every server is the installed CLI in a child process serving a
temporary copy of ``policy/`` with a temporary LMDB; its output goes to files
so a chatty server never blocks on a full pipe. Nothing here mocks anything:
the ledger is read back from the LMDB files the server wrote.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.procfs import descendants_of, socket_inodes
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc
from sidecar.ledger.store import COUNTER, decode_key, loads, open_env, unpack_entry

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
POLICY = HERE / "policy"
EXAMPLES = ROOT / "examples"
SERVICE = "spendkeeper.v1.SpendKeeper"
MODEL = "flat-10"
#: $10 / MTok: every token costs 10,000 nano-USD.
NANOS_PER_TOKEN = 10_000
NANOS_PER_USD = 10**9
#: A fixed instant far from any month boundary, and its period (org tz UTC).
AT = dt.datetime(2031, 3, 10, 12, 0, tzinfo=dt.UTC)
PERIOD = "2031-03"
START_TIMEOUT = 60.0
#: Figures the tests report (printed by conftest's terminal summary).
FIGURES: list[str] = []
#: Worst policy parse time seen per kind of input, in ms per KB (also summarised).
PARSE_WORST: dict[str, float] = {}

T = TypeVar("T")


def report(line: str) -> None:
    """Keep a figure for the end-of-run summary (and print it for ``-s`` runs)."""
    FIGURES.append(line)
    print(line)


def new_id(prefix: str = "") -> str:
    """A fresh request id."""
    return prefix + uuid.uuid4().hex


def stamp(when: dt.datetime) -> Timestamp:
    """A Timestamp message for an aware datetime."""
    ts = Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts


def nanos(money: pb.Money) -> int:
    """A Money message as integer nano-USD."""
    return money.units * NANOS_PER_USD + money.nanos


def usd_tokens(usd: str) -> int:
    """How many flat-10 tokens cost ``usd`` dollars (exact)."""
    from decimal import Decimal

    tokens = Decimal(usd) * NANOS_PER_USD / NANOS_PER_TOKEN
    assert tokens == tokens.to_integral_value(), usd
    return int(tokens)


def authorize_msg(request_id: str, org: str, user: str, out_tokens: int, *,
                  at: dt.datetime | None = AT, product: str = "chat",
                  model: str = MODEL) -> pb.AuthorizeRequest:
    """An Authorize whose worst case is ``out_tokens`` flat-10 tokens."""
    msg = pb.AuthorizeRequest(request_id=request_id, org=org, user=user, product=product,
                              model=model, estimate=pb.Usage(output_tokens=out_tokens))
    if at is not None:
        msg.at.CopyFrom(stamp(at))
    return msg


def record_msg(request_id: str, org: str, user: str, out_tokens: int, *,
               at: dt.datetime | None = AT, product: str = "chat",
               model: str = MODEL) -> pb.RecordRequest:
    """A Record of ``out_tokens`` flat-10 output tokens."""
    msg = pb.RecordRequest(request_id=request_id, org=org, user=user, product=product,
                           model=model, usage=pb.Usage(output_tokens=out_tokens))
    if at is not None:
        msg.at.CopyFrom(stamp(at))
    return msg


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def copy_policy(target: Path) -> Path:
    """A private copy of the test policy directory; returns the directory."""
    shutil.copytree(POLICY, target)
    return target


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30.0,
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (a watchdog, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def spendkeeper_command() -> list[str]:
    """The installed console script next to this interpreter (else ``python -m sidecar.cli``)."""
    script = Path(sys.executable).parent / "spendkeeper"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sidecar.cli"]


# ------------------------------------------------------------------ servers
@dataclass
class Server:
    """One ``spendkeeper serve`` child process."""

    process: subprocess.Popen[bytes]
    workdir: Path
    data_dir: Path
    target: str = ""
    credentials: grpc.ChannelCredentials | None = None
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The server's process id (the parent with ``--workers``)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def stdout(self) -> str:
        """What the server printed on stdout so far."""
        return (self.workdir / "stdout.txt").read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        """What the server logged on stderr so far."""
        return (self.workdir / "stderr.txt").read_text(encoding="utf-8", errors="replace")

    def channel(self, options: Sequence[tuple[str, Any]] = (),
                credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A new channel to the server (closed when the server stops)."""
        creds = credentials or self.credentials
        # A local subchannel pool: each channel its own TCP connection (gRPC shares one
        # connection between identical channels), so load spreads over --workers.
        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500), *options]
        chan = (grpc.secure_channel(self.target, creds, opts) if creds is not None
                else grpc.insecure_channel(self.target, opts))
        self._channels.append(chan)
        return chan

    def stub(self, options: Sequence[tuple[str, Any]] = ()) -> pb_grpc.SpendKeeperStub:
        """A SpendKeeper stub on a new channel."""
        return pb_grpc.SpendKeeperStub(self.channel(options))

    def send(self, sig: int) -> None:
        """Send ``sig`` to the server process."""
        os.kill(self.process.pid, sig)

    def close_channels(self) -> None:
        """Close every channel opened through this object."""
        for chan in self._channels:
            chan.close()
        self._channels.clear()

    def kill(self) -> None:
        """kill -9 (the process and, with workers, its children) and reap it."""
        kids = descendants_of(self.pid)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.close_channels()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGCONT + SIGTERM, wait for the exit and return its status (kill -9 if it hangs)."""
        self.close_channels()
        if self.alive():
            self.send(signal.SIGCONT)
            self.send(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout} s of SIGTERM:\n"
                                 + self.stderr()) from None


def serve_args(policy: Path, data_dir: Path, *extra: str, listen: str = "127.0.0.1:0",
               metrics: str = "off") -> list[str]:
    """The usual flags: a policy, a data dir, one loopback listener, no watcher."""
    return ["--policy", str(policy), "--data-dir", str(data_dir), "--listen", listen,
            "--metrics-listen", metrics, "--log-level", "warning", "--no-watch", *extra]


def start_server(workdir: Path, args: Sequence[str], *, data_dir: Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 env: dict[str, str] | None = None, wait: bool = True,
                 preexec: Callable[[], object] | None = None,
                 prefix: Sequence[str] = ()) -> Server:
    """Start ``spendkeeper serve ARGS``; with ``wait``, return once health says SERVING."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [*prefix, *spendkeeper_command(), "serve", *args]
    if data_dir is None:
        data_dir = Path(args[list(args).index("--data-dir") + 1])
    with (workdir / "stdout.txt").open("wb") as out, (workdir / "stderr.txt").open("wb") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT,
                                   env=env if env is not None else server_env(),
                                   preexec_fn=preexec)  # noqa: PLW1509 - only os.umask
    server = Server(process, workdir, data_dir, credentials=credentials)
    if not wait:
        return server
    try:
        server.target = f"127.0.0.1:{reported_port(server)}"
        wait_serving(server)
    except BaseException:
        server.kill()
        raise
    return server


def server_env() -> dict[str, str]:
    """This environment without SPENDKEEPER_* settings (so only the flags configure)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPENDKEEPER_")}


def reported_port(server: Server) -> int:
    """The port the server printed (``(port N)``, or ``N workers on host:N``)."""
    pattern = re.compile(r"\(port (\d+)\)|workers on [^\s,]*:(\d+)")

    def found() -> str | None:
        match = pattern.search(server.stdout())
        if match:
            return match.group(1) or match.group(2)  # a string: "0" (Unix socket) is truthy
        if not server.alive():
            raise AssertionError(f"server exited ({server.process.returncode}):\n"
                                 f"{server.stdout()}\n{server.stderr()}")
        return None

    return int(str(wait_until(found, "the server to report its port", START_TIMEOUT)))


def health_status(chan: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """The health status name of ``service`` over ``chan``."""
    resp = health_pb2_grpc.HealthStub(chan).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def wait_serving(server: Server) -> None:
    """Poll health until SERVING (fail at once if the server exits)."""
    chan = server.channel()
    last = [""]

    def serving() -> bool:
        if not server.alive():
            raise AssertionError(f"server exited ({server.process.returncode}):\n"
                                 + server.stderr())
        try:
            last[0] = health_status(chan, timeout=1.0)
        except grpc.RpcError as exc:
            last[0] = f"{exc.code().name}: {exc.details()}"
        return last[0] == "SERVING"

    try:
        wait_until(serving, f"SERVING at {server.target} (last: {last[0]})", START_TIMEOUT)
    finally:
        chan.close()
        server._channels.remove(chan)


# ------------------------------------------------------------------ reading figures
def usage_figures(stub: pb_grpc.SpendKeeperStub, org: str, period: str = PERIOD,
                  timeout: float = 10.0) -> dict[str, tuple[int, int, int]]:
    """Every line of GetUsage for ``org`` as scope -> (spent, reserved, requests) in nano-USD."""
    out: dict[str, tuple[int, int, int]] = {}
    token = ""
    while True:
        resp = stub.GetUsage(pb.GetUsageRequest(org=org, period=period, page_size=1000,
                                                page_token=token), timeout=timeout)
        lines = [("org:" + resp.org.scope, resp.org)]
        lines += [("type:" + t.scope, t) for t in resp.user_types]
        lines += [("user:" + u.scope, u) for u in resp.users]
        for name, line in lines:
            out[name] = (nanos(line.spent), nanos(line.reserved), line.requests)
        token = resp.next_page_token
        if not token:
            return out


def org_totals(stub: pb_grpc.SpendKeeperStub, org: str,
               period: str = PERIOD) -> tuple[int, int, int]:
    """(spent, reserved, requests) of the org line."""
    resp = stub.GetUsage(pb.GetUsageRequest(org=org, period=period, page_size=1), timeout=10)
    return nanos(resp.org.spent), nanos(resp.org.reserved), resp.org.requests


@dataclass
class LedgerFile:
    """What the LMDB files on disk say (read with the server stopped or running)."""

    journal_ids: Counter[str]
    journal_nanos: int
    states: dict[str, str]
    counters: dict[tuple[str, ...], tuple[int, int, int]]


def read_ledger(data_dir: Path, map_size: int = 256 << 20) -> LedgerFile:
    """Read the journal, request states and counters straight from the LMDB environment."""
    env = open_env(data_dir, map_size, readonly=True)
    try:
        ids: Counter[str] = Counter()
        total = 0
        states: dict[str, str] = {}
        counters: dict[tuple[str, ...], tuple[int, int, int]] = {}
        with env.begin() as txn:
            for key, value in txn.cursor(db=env.open_db(b"journal", txn=txn, create=False)):
                entry = loads(value)
                ids[entry["id"]] += 1
                total += entry["nanos"]
                del key
            for key, value in txn.cursor(db=env.open_db(b"requests", txn=txn, create=False)):
                states[bytes(key).decode()] = str(unpack_entry(value).get("state"))
            for key, value in txn.cursor(db=env.open_db(b"counters", txn=txn, create=False)):
                raw = bytes(value)
                counters[decode_key(bytes(key), raw[COUNTER.size:])] = COUNTER.unpack_from(raw)
        return LedgerFile(ids, total, states, counters)
    finally:
        env.close()


def readers_table(data_dir: Path) -> list[int]:
    """Process ids holding reader slots in the environment's lock file."""
    env = open_env(data_dir, 256 << 20, readonly=True)
    try:
        text = env.readers()
    finally:
        env.close()
    pids = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0].isdigit():
            pids.append(int(parts[0]))
    return pids


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ------------------------------------------------------------------ /proc
def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket (v4 and v6) that process ``pid`` owns."""
    import ipaddress

    mine = socket_inodes(pid)
    rows = []
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            addr_hex, port_hex = parts[1].split(":")
            if parts[3] != "0A" or int(parts[9]) not in mine:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr_hex)
            if len(raw) == 4:
                address = str(ipaddress.IPv4Address(raw[::-1]))
            else:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                v6 = ipaddress.IPv6Address(words)
                # A dual-stack socket bound to 127.0.0.1 shows as ::ffff:127.0.0.1.
                address = str(v6.ipv4_mapped or v6)
            rows.append((address, int(port_hex, 16)))
    return rows


# ------------------------------------------------------------------ metrics
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics from 127.0.0.1:``port`` and parse every sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


class Workers:
    """Threads whose exceptions fail the test (re-raised by :meth:`join`)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.failures: list[BaseException] = []

    def spawn(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in a daemon thread."""
        def body() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # handed to the main thread by join()
                self.failures.append(exc)

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float = 120.0) -> None:
        """Wait for every thread (a watchdog timeout) and re-raise the first failure."""
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a load thread hung"
        if self.failures:
            raise self.failures[0]


def dump(obj: Any) -> str:
    """Compact JSON for failure messages."""
    return json.dumps(obj, default=str, sort_keys=True)[:2000]
