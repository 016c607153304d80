"""SPEC §6 secure defaults and transports: loopback, Unix socket, TLS, mTLS, env and TOML config."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from _server_support import (
    POLICY,
    TCP_LISTEN,
    Certs,
    authorize_request,
    clean_env,
    copy_policy,
    health_status,
    serve_args,
    start_server,
    tcp_sockets,
    wait_until,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc
from sidecar.config import Config, ConfigError, load_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private_ledger(data_dir: Path) -> None:
    """The LMDB folder is 0700 and every file in it 0600."""
    assert mode(data_dir) == 0o700
    files = sorted(p.name for p in data_dir.iterdir())
    assert {"data.mdb", "lock.mdb"} <= set(files)
    assert {p.name: oct(mode(p)) for p in data_dir.iterdir()} == dict.fromkeys(files, "0o600")


def authorize(chan: grpc.Channel) -> pb.AuthorizeResponse:
    """One small Authorize over ``chan`` (allowed under the test policy)."""
    return pb_grpc.SpendKeeperStub(chan).Authorize(
        authorize_request("acme", "transport@acme.com", "0.10"), timeout=10)


# ------------------------------------------------------------------ defaults
def test_built_in_defaults_listen_on_loopback_only() -> None:
    """Without flags, env or file: gRPC and metrics on 127.0.0.1, no TLS, 5 min reservations."""
    config = load_config({}, env={})
    assert config == Config()
    assert config.listen == ("127.0.0.1:50051",)
    assert config.metrics_listen == "127.0.0.1:9464"
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (None, None, None)
    assert (config.policy, config.data_dir) == (Path("examples"), Path("data"))


def test_precedence_is_file_then_env_then_flags(tmp_path: Path) -> None:
    """A TOML file is overridden by SPENDKEEPER_* variables, which flags override in turn;
    an unknown key in the file is an error naming it."""
    toml = tmp_path / "spendkeeper.toml"
    toml.write_text('listen = "unix:/file.sock"\nthreads = 3\nworkers = 2\n'
                    'reservation-ttl = 7.5\n', encoding="utf-8")
    env = {"SPENDKEEPER_CONFIG": str(toml), "SPENDKEEPER_THREADS": "5",
           "SPENDKEEPER_WORKERS": "3"}
    config = load_config({"workers": 4}, env=env)
    assert (config.listen, config.reservation_ttl) == (("unix:/file.sock",), 7.5)
    assert (config.threads, config.workers) == (5, 4)
    toml.write_text('listne = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown setting 'listne'"):
        load_config({"config": str(toml)}, env={})


def test_serve_without_flags_listens_on_127_0_0_1_and_keeps_data_private(
        tmp_path: Path) -> None:
    """`spendkeeper serve` with no flags in a fresh folder (its own network namespace, so
    port 50051 cannot be taken): the only listeners are 127.0.0.1:50051 (gRPC) and
    127.0.0.1:9464 (metrics); ./data is created 0700 with 0600 files."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux unshare is needed for this test"
    cwd = tmp_path / "fresh"
    shutil.copytree(POLICY, cwd / "examples")  # the default --policy is ./examples
    script = (f"ip link set lo up && exec {sys.executable} -m sidecar.cli serve "
              "--log-level warning")
    argv = [unshare, "--user", "--map-root-user", "--net", "sh", "-c", script]
    with (tmp_path / "out.txt").open("wb") as out, (tmp_path / "err.txt").open("wb") as err:
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, env=clean_env())
    try:
        wait_until(lambda: "serving on" in (tmp_path / "out.txt").read_text()
                   or process.poll() is not None, "the server to start", timeout=30)
        assert process.poll() is None, (tmp_path / "err.txt").read_text()
        assert "serving on 127.0.0.1:50051 (port 50051)" in (tmp_path / "out.txt").read_text()
        listeners = {(addr, port) for addr, port, state, _ in tcp_sockets(process.pid)
                     if state == TCP_LISTEN}
        assert listeners == {("127.0.0.1", 50051), ("127.0.0.1", 9464)}
        assert_private_ledger(cwd / "data")
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, (tmp_path / "err.txt").read_text()


# ------------------------------------------------------------------ Unix socket, env, file
def test_unix_socket_listener_lives_in_a_new_0700_folder(tmp_path: Path) -> None:
    """--listen unix:DIR/sock creates DIR 0700; a client over the socket is served."""
    sock = tmp_path / "s" / "sock"
    server = start_server(tmp_path / "run", serve_args(copy_policy(tmp_path / "policy"),
                                                       tmp_path / "data",
                                                       listen=f"unix:{sock}"),
                          target=f"unix:{sock}")
    try:
        assert mode(sock.parent) == 0o700
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert authorize(server.channel()).decision == pb.ALLOW
        assert_private_ledger(tmp_path / "data")
    finally:
        assert server.stop() == 0, server.stderr()


def test_environment_variables_alone_configure_serve(tmp_path: Path) -> None:
    """SPENDKEEPER_POLICY/_DATA_DIR/_LISTEN/_METRICS_LISTEN/_LOG_LEVEL with no flags at all."""
    sock = tmp_path / "env" / "sock"
    env = clean_env(SPENDKEEPER_POLICY=str(copy_policy(tmp_path / "policy")),
                    SPENDKEEPER_DATA_DIR=str(tmp_path / "data"),
                    SPENDKEEPER_LISTEN=f"unix:{sock}", SPENDKEEPER_METRICS_LISTEN="off",
                    SPENDKEEPER_LOG_LEVEL="warning")
    server = start_server(tmp_path / "run", [], env=env, target=f"unix:{sock}",
                          cwd=tmp_path)
    try:
        assert authorize(server.channel()).decision == pb.ALLOW
        assert_private_ledger(tmp_path / "data")
    finally:
        assert server.stop() == 0, server.stderr()


def test_config_file_alone_configures_serve(tmp_path: Path) -> None:
    """--config file.toml (and nothing else) sets policy, data dir, a Unix listener given as a
    TOML list, metrics off and the log level (precedence over env/flags: the test above)."""
    toml = tmp_path / "spendkeeper.toml"
    sock = tmp_path / "file" / "sock"
    toml.write_text(f'policy = "{copy_policy(tmp_path / "policy")}"\n'
                    f'data-dir = "{tmp_path / "data"}"\n'
                    f'listen = ["unix:{sock}"]\nmetrics_listen = "off"\n'
                    'log_level = "warning"\n', encoding="utf-8")
    server = start_server(tmp_path / "run", ["--config", str(toml)], target=f"unix:{sock}",
                          cwd=tmp_path)
    try:
        assert authorize(server.channel()).decision == pb.ALLOW
        assert_private_ledger(tmp_path / "data")
    finally:
        assert server.stop() == 0, server.stderr()


def test_invalid_configuration_exits_2_naming_the_setting(tmp_path: Path) -> None:
    """A bad value (SPENDKEEPER_WORKERS=many) stops serve before it binds: exit 2, message."""
    env = clean_env(SPENDKEEPER_WORKERS="many")
    done = subprocess.run([sys.executable, "-m", "sidecar.cli", "serve", "--policy",
                           str(POLICY), "--data-dir", str(tmp_path / "data")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "workers: cannot use 'many' (expected int)" in done.stderr
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ TLS and mTLS
def test_tls_server_serves_tls_clients_and_refuses_plaintext(tmp_path: Path,
                                                             certs: Certs) -> None:
    """--tls-cert/--tls-key: a client trusting the CA is served; a plaintext client is not."""
    tls = certs.client_credentials(with_cert=False)
    server = start_server(tmp_path / "run", serve_args(
        copy_policy(tmp_path / "policy"), tmp_path / "data", "--tls-cert",
        str(certs.server_cert), "--tls-key", str(certs.server_key),
        listen="127.0.0.1:0"), credentials=tls)
    try:
        assert authorize(server.channel()).decision == pb.ALLOW
        with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError) as err:
            health_status(plain, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0, server.stderr()


def test_mtls_server_requires_a_client_certificate_from_its_ca(tmp_path: Path,
                                                               certs: Certs) -> None:
    """--tls-client-ca: a client with a certificate from that CA is served; one without a
    certificate, or with a certificate from another CA, is refused."""
    mtls = certs.client_credentials()
    server = start_server(tmp_path / "run", serve_args(
        copy_policy(tmp_path / "policy"), tmp_path / "data", "--tls-cert",
        str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-client-ca",
        str(certs.ca)), credentials=mtls)
    try:
        assert authorize(server.channel()).decision == pb.ALLOW
        no_cert = server.channel(credentials=certs.client_credentials(with_cert=False))
        with pytest.raises(grpc.RpcError) as err:
            health_status(no_cert, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = server.channel(credentials=certs.client_credentials(stranger=True))
        with pytest.raises(grpc.RpcError) as err:
            health_status(stranger, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0, server.stderr()
