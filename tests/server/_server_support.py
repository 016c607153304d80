"""Run the real ``spendkeeper serve`` as a child process and talk to it over gRPC.

Imported by name from the test modules (pytest puts this directory on
``sys.path``; a conftest cannot be imported). Every server gets a temporary
copy of ``policy/`` and a temporary LMDB directory; its stdout and stderr go to
files so that a chatty server can never block on a full pipe.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
POLICY = HERE / "policy"
SERVICE = "spendkeeper.v1.SpendKeeper"
#: Every price of the test policy: $10 per million tokens, so 100,000 tokens = $1.
MODEL = "flat-10"
TOKENS_PER_USD = 100_000
#: A fixed instant (and its period) so the tests mean the same next month.
AT = dt.datetime(2031, 3, 10, 12, 0, tzinfo=dt.UTC)
PERIOD = "2031-03"
#: How long a server may take to become ready (generous: CI machines are slow).
START_TIMEOUT = 30.0


def copy_policy(target: Path) -> Path:
    """A private copy of the test policy directory (servers watch and tests edit it)."""
    shutil.copytree(POLICY, target)
    return target


def new_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def usd(money: pb.Money) -> Decimal:
    """A Money message as exact USD."""
    return Decimal(money.units) + Decimal(money.nanos) / 10**9


def tokens(amount: str) -> int:
    """How many flat-10 tokens cost ``amount`` USD."""
    return int(Decimal(amount) * TOKENS_PER_USD)


def stamp(when: dt.datetime) -> Any:
    """A Timestamp message for ``when``."""
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def authorize_request(org: str, user: str, cost: str, *, product: str = "chat",
                      model: str = MODEL, request_id: str | None = None,
                      at: dt.datetime | None = AT, **fields: Any) -> pb.AuthorizeRequest:
    """An Authorize whose worst case is ``cost`` USD (all of it as max output tokens)."""
    rid = new_id() if request_id is None else request_id
    msg = pb.AuthorizeRequest(request_id=rid, org=org, user=user, product=product, model=model,
                              estimate=pb.Usage(output_tokens=tokens(cost)), **fields)
    if at is not None:
        msg.at.CopyFrom(stamp(at))
    return msg


def record_request(org: str, user: str, cost: str, *, product: str = "chat",
                   model: str = MODEL, request_id: str | None = None,
                   at: dt.datetime | None = AT) -> pb.RecordRequest:
    """A Record whose actual usage costs ``cost`` USD (all of it as output tokens)."""
    rid = new_id() if request_id is None else request_id
    msg = pb.RecordRequest(request_id=rid, org=org, user=user, product=product, model=model,
                           usage=pb.Usage(output_tokens=tokens(cost)))
    if at is not None:
        msg.at.CopyFrom(stamp(at))
    return msg


def user_line(resp: pb.GetUsageResponse, user: str) -> pb.UsageLine | None:
    """The GetUsage line of ``user``, if the ledger has one."""
    return next((line for line in resp.users if line.scope == user), None)


@dataclass
class Server:
    """A ``spendkeeper serve`` child process and the target it answers on."""

    process: subprocess.Popen[bytes]
    target: str
    workdir: Path
    credentials: grpc.ChannelCredentials | None = None
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The process id of the server (the parent, with ``--workers``)."""
        return self.process.pid

    def stdout(self) -> str:
        """Everything the server printed on stdout so far."""
        return (self.workdir / "stdout.txt").read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        """Everything the server logged on stderr so far."""
        return (self.workdir / "stderr.txt").read_text(encoding="utf-8", errors="replace")

    def channel(self, options: Sequence[tuple[str, Any]] = (),
                credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A new channel to the server (closed when the server is stopped)."""
        creds = credentials or self.credentials
        chan = (grpc.secure_channel(self.target, creds, list(options)) if creds is not None
                else grpc.insecure_channel(self.target, list(options)))
        self._channels.append(chan)
        return chan

    def stub(self) -> pb_grpc.SpendKeeperStub:
        """A SpendKeeper stub on a new channel."""
        return pb_grpc.SpendKeeperStub(self.channel())

    def send(self, sig: int) -> None:
        """Send ``sig`` to the server process."""
        os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit and return its status (kill -9 if it hangs)."""
        for chan in self._channels:
            chan.close()
        self._channels.clear()
        if self.process.poll() is None:
            self.send(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not exit within {timeout} s of SIGTERM:\n"
                                 + self.stderr()) from None


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SPENDKEEPER_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDKEEPER_")}
    return {**env, **extra}


def start_server(workdir: Path, args: Sequence[str], *, target: str | None = None,
                 command: Sequence[str] | None = None, env: dict[str, str] | None = None,
                 cwd: Path = ROOT, credentials: grpc.ChannelCredentials | None = None,
                 new_session: bool = False) -> Server:
    """Start ``spendkeeper serve ARGS`` and wait until its health check answers SERVING.

    ``target`` defaults to 127.0.0.1 and the port the server reports on stdout
    (so ``--listen 127.0.0.1:0`` needs no port guessing). ``command`` replaces
    the ``python -m sidecar.cli serve`` prefix (``make serve``, say). ``env``
    defaults to this environment without any ``SPENDKEEPER_*`` variable, so the
    settings of whoever runs the tests cannot leak into the server.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [*(command or [sys.executable, "-m", "sidecar.cli", "serve"]), *args]
    with (workdir / "stdout.txt").open("wb") as out, (workdir / "stderr.txt").open("wb") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd,
                                   env=env if env is not None else clean_env())
    server = Server(process, target or "", workdir, credentials)
    try:
        if not target:
            server.target = f"127.0.0.1:{_reported_port(server)}"
        wait_serving(server)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return server


def _reported_port(server: Server) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"\(port (\d+)\)|workers on [^\s,]*:(\d+)")
    while time.monotonic() < deadline:
        match = pattern.search(server.stdout())
        if match:
            return int(match.group(1) or match.group(2))
        if server.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"server did not report its port (exit {server.process.poll()}):\n"
                         f"{server.stdout()}\n{server.stderr()}")


def wait_serving(server: Server, service: str = "") -> None:
    """Poll the health service until ``service`` is SERVING (fail if the server exits)."""
    deadline = time.monotonic() + START_TIMEOUT
    chan = server.channel()
    stub = health_pb2_grpc.HealthStub(chan)
    last = ""
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.05)
    finally:
        chan.close()
        server._channels.remove(chan)
    raise AssertionError(f"server at {server.target} never became SERVING (last: {last}, "
                         f"exit {server.process.poll()}):\n{server.stderr()}")


def health_status(chan: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """The health status name of ``service`` over ``chan``."""
    resp = health_pb2_grpc.HealthStub(chan).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_until(predicate: Any, what: str, timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def serve_args(policy: Path, data_dir: Path, *extra: str,
               listen: str = "127.0.0.1:0") -> list[str]:
    """The usual flags: a policy, a data dir, one listener, no metrics, quiet logs."""
    return ["--policy", str(policy), "--data-dir", str(data_dir), "--listen", listen,
            "--metrics-listen", "off", "--log-level", "warning", *extra]


# ------------------------------------------------------------------ /proc
def tcp_sockets(pid: int | str = "self") -> list[tuple[str, int, str, int]]:
    """(local address, local port, state hex, inode) of every TCP socket in ``pid``'s netns."""
    rows = []
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            addr_hex, port_hex = parts[1].split(":")
            rows.append((_address(addr_hex), int(port_hex, 16), parts[3], int(parts[9])))
    return rows


def _address(hex_addr: str) -> str:
    if len(hex_addr) == 8:
        return ".".join(str(b) for b in bytes.fromhex(hex_addr)[::-1])
    words = [bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, 32, 8)]
    address = ipaddress.IPv6Address(b"".join(words))
    # gRPC binds 127.0.0.1 with a dual-stack socket: ::ffff:127.0.0.1 is the same address.
    return str(address.ipv4_mapped or address)


TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


# ------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class Certs:
    """PEM files of a test CA, a server certificate and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: A client certificate issued by another CA, which the server must not accept.
    stranger_cert: Path
    stranger_key: Path

    def client_credentials(self, *, with_cert: bool = True,
                           stranger: bool = False) -> grpc.ChannelCredentials:
        """TLS credentials trusting the test CA, with our client certificate, none, or the
        stranger's."""
        if not with_cert:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        cert, key = ((self.stranger_cert, self.stranger_key) if stranger
                     else (self.client_cert, self.client_key))
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                            private_key=key.read_bytes(),
                                            certificate_chain=cert.read_bytes())


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate (SAN 127.0.0.1 and localhost), a client certificate,
    and a client certificate from another CA.

    Made with the ``openssl`` command (the ``cryptography`` package is not a
    dependency); EC P-256 keys keep it fast.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "3",
            "-subj", f"/CN=spendkeeper test {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                           "extendedKeyUsage=serverAuth\n"),
                          ("client", "ca", "extendedKeyUsage=clientAuth\n"),
                          ("stranger", "other-ca", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(ext)
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "3", "-extfile", f"{name}.ext")
    return Certs(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                 folder / "client.pem", folder / "client.key", folder / "stranger.pem",
                 folder / "stranger.key")
