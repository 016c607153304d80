"""The sidecar process: wiring the policy, ledger, servicer and listeners together.

``create_server(config)`` builds a ready :class:`Sidecar` (policy loaded,
ledger open, ports bound); ``serve(config)`` runs it until SIGTERM/SIGINT and
``serve_workers`` forks several of them onto one port (SO_REUSEPORT) sharing
one LMDB environment. Behaviour lives elsewhere; this module only wires.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from policy.compile import load
from policy.errors import PolicyError
from sidecar._compile_child import compile_in_child
from sidecar.config import Config
from sidecar.ledger import Ledger
from sidecar.metrics import LedgerCollector, Metrics, serve_metrics
from sidecar.notify import Notifier
from sidecar.observe import Observer, Observers
from sidecar.service import SERVICE_NAME, PolicyHolder, SpendKeeperService, generic_handler

__all__ = ["Sidecar", "create_server", "main_loop", "serve", "serve_workers"]

_log = logging.getLogger("spendkeeper.server")


class Sidecar:
    """One serving process: gRPC server, health, reload watcher, reaper, metrics."""

    def __init__(self, config: Config, *, reuse_port: bool = False,
                 extra_observers: tuple[Observer, ...] = ()) -> None:
        self.config = config
        self.policy_path = config.policy
        self.holder = PolicyHolder(load(config.policy))  # raises PolicyError: refuse to start
        self.ledger = Ledger(config.data_dir, map_size=config.map_size,
                             reservation_ttl=config.reservation_ttl)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.reloads = {"ok": 0, "error": 0}
        self.notifier = Notifier.from_config(config, self.ledger) if config.notify else None
        self.registry.register(LedgerCollector(self.ledger, self.holder, reloads=self.reloads,
                                               per_user=config.per_user_metrics,
                                               notifier=self.notifier))
        observers: tuple[Observer, ...] = (self.metrics, *extra_observers)
        self.decision_log: Any = None
        if config.decision_log is not None:
            from sidecar.decision_log import DecisionLog

            self.decision_log = DecisionLog.from_config(config, self.registry)
            observers = (*observers, self.decision_log)
        observer = Observers(*observers) if len(observers) > 1 else self.metrics
        self.service = SpendKeeperService(self.holder, self.ledger, observer,
                                          shadow=config.shadow,
                                          on_storage_failure=self._storage_failed)
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", 4 << 20),
                   ("grpc.so_reuseport", 1 if reuse_port else 0)]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="rpc"),
            handlers=[generic_handler(self.service)], options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.ports = [self._bind(addr) for addr in config.listen]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: Any = None
        self._reload_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The first TCP port bound (0 when only Unix sockets are used)."""
        return next((p for p in self.ports if p > 0), 0)

    def _bind(self, address: str) -> int:
        if address.startswith("unix:"):
            path = Path(address.removeprefix("unix:").removeprefix("//"))
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True)
            if path.exists():
                path.unlink()
        creds = self._credentials()
        try:
            port = (self.server.add_secure_port(address, creds) if creds is not None
                    else self.server.add_insecure_port(address))
        except RuntimeError as exc:  # grpc's way of saying the address cannot be bound
            raise OSError(f"cannot listen on {address}: {exc} (in use, not a local address, "
                          "or a Unix socket path over 107 bytes?)") from None
        if port == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address}")
        return port if not address.startswith("unix:") else -1

    def _credentials(self) -> grpc.ServerCredentials | None:
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca is not None else None
        return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                                           root_certificates=ca,
                                           require_client_auth=ca is not None)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start serving; health turns SERVING (a policy is loaded by now)."""
        sys.setswitchinterval(self.config.switch_interval)
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._spawn("reaper", self._reap_loop)
        notifier = self.notifier
        if notifier is not None:  # stopped with the others by self._stop, before the ledger
            self._spawn("notifier", lambda: notifier.run(self._stop))
        if self.config.watch:
            self._spawn("policy-watch", self._watch_loop)
        if self.config.metrics_listen and self.config.metrics_listen != "off":
            self._metrics_server, _ = serve_metrics(self.registry, self.config.metrics_listen)
        _log.info("serving policy %s (version %s) on %s", self.policy_path,
                  self.holder.policy.version, ", ".join(self.config.listen))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, drain in-flight calls, then close the ledger."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.health.enter_graceful_shutdown()
        self._stop.set()
        self.server.stop(grace).wait(grace + 5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()  # shutdown() leaves the socket open
        for thread in self._threads:
            thread.join(timeout=5)
        if self.decision_log is not None:
            self.decision_log.close()
        self.ledger.close()
        _log.info("stopped")

    def _storage_failed(self) -> None:
        """The ledger refuses writes: stop attracting traffic until an operator restarts us."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def wait(self) -> None:
        """Block until the server terminates."""
        self.server.wait_for_termination()

    # -------------------------------------------------------------- background work
    def _reap_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.ledger.reap()
            except Exception:
                _log.exception("reaping reservations failed")

    def _watch_loop(self) -> None:
        from watchfiles import watch

        target = self.policy_path if self.policy_path.is_dir() else self.policy_path.parent
        try:
            for _changes in watch(target, stop_event=self._stop, debounce=300,
                                  raise_interrupt=False, rust_timeout=500):
                self.reload()
        except Exception:
            _log.exception("policy watcher stopped; SIGHUP still reloads")

    def reload(self) -> bool:
        """Load, check and compile the policy off the request path, then swap it in.

        The compiling happens in a child process (:mod:`sidecar._compile_child`),
        so request threads keep the GIL; only the swap happens here.
        """
        with self._reload_lock:
            started = time.perf_counter()
            try:
                policy = compile_in_child(self.policy_path)
            except PolicyError as exc:
                self.reloads["error"] += 1
                _log.error("policy reload rejected; still serving version %s:\n%s",
                           self.holder.policy.version, exc.render())
                return False
            except Exception:
                self.reloads["error"] += 1
                _log.exception("policy reload failed; keeping the last good policy")
                return False
            old = self.holder.policy.version
            self.holder.policy = policy
            self.reloads["ok"] += 1
            _log.info("policy reloaded: version %s -> %s in %.1f ms", old, policy.version,
                      (time.perf_counter() - started) * 1000)
            return True


def create_server(config: Config, *, reuse_port: bool = False) -> tuple[Sidecar, int]:
    """A bound, not yet started sidecar and its first TCP port."""
    sidecar = Sidecar(config, reuse_port=reuse_port)
    return sidecar, sidecar.port


def main_loop(sidecar: Sidecar) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the policy."""
    done = threading.Event()
    hup = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        done.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        hup.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    sidecar.start()
    print(f"spendkeeper: serving on {', '.join(sidecar.config.listen)} "
          f"(port {sidecar.port}), policy {sidecar.holder.policy.version}", flush=True)
    while not done.wait(0.2):
        if hup.is_set():
            hup.clear()
            sidecar.reload()
    _log.info("shutting down: draining for up to %.0f s", sidecar.config.shutdown_grace)
    sidecar.stop()
    return 0


def serve(config: Config) -> int:
    """Run one sidecar process (or several with ``config.workers``)."""
    if config.workers > 1:
        return serve_workers(config)
    try:
        sidecar, _ = create_server(config)
    except PolicyError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    return main_loop(sidecar)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_workers(config: Config) -> int:
    """Fork ``config.workers`` processes on one port (SO_REUSEPORT), one shared ledger.

    The fork happens before any gRPC object exists in this process (gRPC's
    threads do not survive a fork). A worker that dies is restarted.
    """
    import dataclasses

    listen = []
    for address in config.listen:
        host, _, port = address.rpartition(":")
        bound = address
        if not address.startswith("unix:") and port == "0":
            bound = f"{host}:{_free_port(host.strip('[]'))}"
        listen.append(bound)
    config = dataclasses.replace(config, listen=tuple(listen))
    try:
        load(config.policy)
    except PolicyError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    children: dict[int, int] = {}
    started_at: dict[int, float] = {}
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                worker = dataclasses.replace(
                    config, metrics_listen=_worker_metrics(config.metrics_listen, index))
                sidecar = Sidecar(worker, reuse_port=True)
                code = main_loop(sidecar)
            finally:
                os._exit(code)
        children[pid] = index
        started_at[pid] = time.monotonic()

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for index in range(config.workers):
        spawn(index)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    failed = False
    print(f"spendkeeper: {config.workers} workers on {', '.join(config.listen)}", flush=True)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries wait()
            continue
        index = children.pop(pid, -1)
        lived = time.monotonic() - started_at.pop(pid, 0.0)
        if index >= 0 and not stopping:
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0 and lived < 5.0:
                # It gave up while starting (cannot bind, bad data dir): restarting would
                # loop. A worker killed by a signal is always restarted.
                _log.error("worker %d (pid %d) failed while starting (status %d); stopping",
                           index, pid, status)
                stopping = failed = True
                forward(signal.SIGTERM, None)
                continue
            _log.error("worker %d (pid %d) exited with status %d; restarting", index, pid, status)
            time.sleep(0.5)
            spawn(index)
        elif index >= 0 and status != 0:
            failed = True
    return 1 if failed else 0


def _worker_metrics(address: str, index: int) -> str:
    """Worker ``i`` serves metrics on the configured port + i (each its own process)."""
    if not address or address == "off":
        return address
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + index}" if int(port) else address
