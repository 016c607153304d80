"""Security defaults of ``spendkeeper serve``: loopback only, private files, TLS, signed webhooks.

Listeners are read from /proc/<pid>/net/tcp{,6} and matched to the server's
own socket inodes, so only what this process bound is judged.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from _rel_support import (
    Server,
    authorize_msg,
    health_status,
    record_msg,
    reported_port,
    serve_args,
    server_env,
    start_server,
    tcp_listeners,
    usd_tokens,
    wait_until,
)

from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

LOOPBACK = {"127.0.0.1", "::1"}


def _can_unshare_net() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def test_default_listeners_are_loopback_only(tmp_path: Path, policy_dir: Path,
                                             servers: list[Server]) -> None:
    """With no --listen / --metrics-listen, every socket the server listens on is 127.0.0.1
    or ::1 (gRPC and metrics), never 0.0.0.0 or [::]."""
    args = ["--policy", str(policy_dir), "--data-dir", str(tmp_path / "data"), "--no-watch"]
    # In a network namespace of its own the fixed default ports cannot collide with
    # anything else on this machine; without root, the host's namespace is used.
    prefix = (["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
              if _can_unshare_net() else [])
    server = start_server(tmp_path / "run", args, wait=False, prefix=prefix)
    servers.append(server)
    reported_port(server)  # "serving on ..." is printed once every listener is bound

    def both() -> list[tuple[str, int]] | None:
        found = tcp_listeners(server.pid)
        return found if len(found) >= 2 else None

    listeners = wait_until(both, "the gRPC and metrics listeners")
    assert listeners is not None
    assert {port for _, port in listeners} >= {50051, 9464}, listeners
    assert {address for address, _ in listeners} <= LOOPBACK, listeners
    assert server.stop() == 0, server.stderr()


def test_unix_socket_directory_and_data_files_are_private_even_with_umask_0(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """--listen unix:... only: no TCP listener; the socket's new directory is 0700, the new
    data directory 0700 and data.mdb / lock.mdb 0600, although the umask is 0."""
    sock = tmp_path / "run" / "sock" / "spendkeeper.sock"
    data = tmp_path / "fresh" / "data"
    server = start_server(tmp_path / "run", serve_args(policy_dir, data, listen=f"unix:{sock}"),
                          wait=False, preexec=lambda: os.umask(0))
    servers.append(server)
    reported_port(server)
    server.target = f"unix:{sock}"
    assert health_status(server.channel()) == "SERVING"
    assert tcp_listeners(server.pid) == []
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert server.stop() == 0, server.stderr()


@pytest.mark.parametrize("target", ["reliability.spend", "included.spend"])
def test_world_writable_policy_file_is_refused_at_start(tmp_path: Path, policy_dir: Path,
                                                        target: str) -> None:
    """A world-writable policy file (or included file): exit status non-zero and a message
    naming the file and the fix; nothing listens."""
    if target == "included.spend":
        (policy_dir / "sub").mkdir()
        (policy_dir / "sub" / target).write_text("# included\n")
        (policy_dir / "reliability.spend").write_text(
            'include "sub/included.spend"\n' + (policy_dir / "reliability.spend").read_text())
        path = policy_dir / "sub" / target
    else:
        path = policy_dir / target
    path.chmod(0o666)
    proc = subprocess.run(
        [*_command(), "serve", *serve_args(policy_dir, tmp_path / "data")],
        capture_output=True, text=True, timeout=120, env=server_env(), check=False)
    assert proc.returncode != 0
    assert "world-writable" in proc.stderr, proc.stderr
    assert target in proc.stderr, proc.stderr
    assert "chmod o-w" in proc.stderr, proc.stderr


def _command() -> list[str]:
    from _rel_support import spendkeeper_command

    return spendkeeper_command()


# ------------------------------------------------------------------ TLS
@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate (127.0.0.1), a client certificate, another CA's."""

    folder: Path

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def client(self, *, cert: str | None = "client", ca: str = "ca") -> grpc.ChannelCredentials:
        if cert is None:
            return grpc.ssl_channel_credentials(root_certificates=self.read(f"{ca}.pem"))
        return grpc.ssl_channel_credentials(root_certificates=self.read(f"{ca}.pem"),
                                            private_key=self.read(f"{cert}.key"),
                                            certificate_chain=self.read(f"{cert}.pem"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Made with the openssl CLI: EC P-256, valid for 2 days."""
    folder = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN={ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1\n"
                                           "extendedKeyUsage=serverAuth\n"),
                          ("client", "ca", "extendedKeyUsage=clientAuth\n"),
                          ("rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(ext)
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return Certs(folder)


def _authorize(server: Server, creds: grpc.ChannelCredentials | None) -> str:
    """"OK" or the status name of one Authorize over a fresh channel."""
    chan = (grpc.secure_channel(server.target, creds) if creds is not None
            else grpc.insecure_channel(server.target))
    try:
        pb_grpc.SpendKeeperStub(chan).Authorize(authorize_msg("tls", "open", "u", 10),
                                                timeout=10)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    finally:
        chan.close()
    return "OK"


def test_tls_serves_only_tls_clients(tmp_path: Path, policy_dir: Path, certs: Certs,
                                     servers: list[Server]) -> None:
    """--tls-cert/--tls-key: a client trusting the CA is served; plaintext and a client
    trusting another CA are refused."""
    server = start_server(
        tmp_path / "run",
        serve_args(policy_dir, tmp_path / "data", "--tls-cert", str(certs.folder / "server.pem"),
                   "--tls-key", str(certs.folder / "server.key")),
        credentials=certs.client(cert=None))
    servers.append(server)
    assert _authorize(server, certs.client(cert=None)) == "OK"
    assert _authorize(server, None) == "UNAVAILABLE"
    assert _authorize(server, certs.client(cert=None, ca="rogue-ca")) == "UNAVAILABLE"
    assert server.stop() == 0


def test_mtls_refuses_clients_without_a_trusted_certificate(tmp_path: Path, policy_dir: Path,
                                                            certs: Certs,
                                                            servers: list[Server]) -> None:
    """--tls-client-ca: a client with a CA-signed certificate is served; one with no
    certificate, or with a certificate from another CA, is refused."""
    folder = certs.folder
    server = start_server(
        tmp_path / "run",
        serve_args(policy_dir, tmp_path / "data", "--tls-cert", str(folder / "server.pem"),
                   "--tls-key", str(folder / "server.key"),
                   "--tls-client-ca", str(folder / "ca.pem")),
        credentials=certs.client())
    servers.append(server)
    assert _authorize(server, certs.client()) == "OK"
    assert _authorize(server, certs.client(cert=None)) == "UNAVAILABLE"
    assert _authorize(server, certs.client(cert="rogue")) == "UNAVAILABLE"
    assert _authorize(server, None) == "UNAVAILABLE"
    assert server.stop() == 0


# ------------------------------------------------------------------ webhooks
@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST (headers, raw body)."""

    server: http.server.HTTPServer
    posts: list[tuple[dict[str, str], bytes]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    posts: list[tuple[dict[str, str], bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Receiver(httpd, posts)
    httpd.shutdown()
    httpd.server_close()


def _hooked_policy(policy_dir: Path, url: str) -> None:
    (policy_dir / "hooked.spend").write_text(
        'org "hooked" {\n  plan "team"  rates "flat"  timezone "UTC"\n  limit $10 / month\n'
        f'  notify at 50% webhook "{url}"\n  default user_type chat\n}}\n')


def _cross_threshold(server: Server) -> None:
    server.stub().Record(record_msg("cross", "hooked", "u", usd_tokens("6")), timeout=30)


def test_webhook_payloads_are_signed(tmp_path: Path, policy_dir: Path, receiver: Receiver,
                                     servers: list[Server]) -> None:
    """SPENDKEEPER_WEBHOOK_SECRET set: the threshold POST carries X-Spendkeeper-Signature =
    sha256=HMAC-SHA256(secret, raw body), and an idempotency key."""
    _hooked_policy(policy_dir, receiver.url)
    secret = "s3cret-for-tests"
    server = start_server(tmp_path / "run", serve_args(policy_dir, tmp_path / "data"),
                          env={**server_env(), "SPENDKEEPER_WEBHOOK_SECRET": secret})
    servers.append(server)
    _cross_threshold(server)
    wait_until(lambda: receiver.posts, "the webhook POST")
    headers, body = receiver.posts[0]
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers.get("x-spendkeeper-signature", ""), expected), headers
    assert headers.get("x-spendkeeper-idempotency-key")
    assert server.stop() == 0


def test_webhooks_are_never_sent_unsigned(tmp_path: Path, policy_dir: Path, receiver: Receiver,
                                          servers: list[Server]) -> None:
    """No webhook secret configured but a policy with a webhook: the sidecar must not POST
    unsigned payloads (refusing to start, or logging instead of sending, are both fine)."""
    _hooked_policy(policy_dir, receiver.url)
    server = start_server(tmp_path / "run", serve_args(policy_dir, tmp_path / "data"),
                          wait=False)
    servers.append(server)
    try:
        server.target = f"127.0.0.1:{reported_port(server)}"
    except AssertionError:
        assert server.process.wait(30) != 0  # refused to start: acceptable
        return
    _cross_threshold(server)
    try:
        wait_until(lambda: receiver.posts, "a webhook POST", timeout=10)
    except AssertionError:
        return  # nothing was sent unsigned
    headers, _ = receiver.posts[0]
    assert "x-spendkeeper-signature" in headers, (
        "a webhook payload was POSTed without a signature (no SPENDKEEPER_WEBHOOK_SECRET)")


@pytest.mark.parametrize("kind", ["busy-port", "long-unix-path"])
def test_an_address_that_cannot_be_bound_is_refused_with_a_clear_message(
        tmp_path: Path, policy_dir: Path, kind: str) -> None:
    """A port already in use, or a Unix socket path over the 107-byte limit: exit status
    non-zero with a one-line ``spendkeeper serve: ...`` message naming the address, no
    Python traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = (f"127.0.0.1:{busy.getsockname()[1]}" if kind == "busy-port"
                   else f"unix:{tmp_path / ('x' * 120) / 's.sock'}")
        proc = subprocess.run(
            [*_command(), "serve", *serve_args(policy_dir, tmp_path / "data", listen=address)],
            capture_output=True, text=True, timeout=120, env=server_env(), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert "spendkeeper serve:" in proc.stderr, proc.stderr[-800:]
    assert address in proc.stderr, proc.stderr[-800:]
