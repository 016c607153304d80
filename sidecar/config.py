"""Sidecar configuration: defaults, an optional TOML file, environment, flags.

Precedence, lowest first: built-in defaults < config file (``--config`` or
``SPENDKEEPER_CONFIG``) < ``SPENDKEEPER_*`` environment variables < flags.
Defaults are safe: loopback only, private data files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Config", "ConfigError", "add_serve_arguments", "load_config"]


class ConfigError(ValueError):
    """A configuration value is invalid."""


@dataclass(frozen=True)
class Config:
    """Everything ``spendkeeper serve`` needs."""

    policy: Path = Path("examples")
    data_dir: Path = Path("data")
    listen: tuple[str, ...] = ("127.0.0.1:50051",)
    metrics_listen: str = "127.0.0.1:9464"  # "" or "off": no metrics listener
    workers: int = 1
    threads: int = 8
    #: sys.setswitchinterval for the serving process (seconds). CPython's 5 ms
    #: default lets one busy thread keep every thread that returns from LMDB or
    #: fsync (GIL released) waiting up to 5 ms; see docs/performance.md.
    switch_interval: float = 0.0002
    max_concurrent_rpcs: int = 512
    max_message_bytes: int = 64 * 1024
    reservation_ttl: float = 300.0
    map_size: int = 4 << 30
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    shadow: bool = False
    watch: bool = True
    shutdown_grace: float = 10.0
    decision_log: Path | None = None
    decision_log_all: bool = False
    decision_log_max_bytes: int = 64 << 20
    hash_user_ids: bool = False
    per_user_metrics: bool = False
    webhook_secret: str = field(default="", repr=False)
    notify: bool = True
    log_level: str = "info"

    @property
    def tls(self) -> bool:
        """Whether TLS is configured."""
        return self.tls_cert is not None


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _convert(name: str, value: Any) -> Any:
    """A file, env or flag value as the field's type."""
    default: Any = _FIELDS[name].default
    kind: Any = type(default) if default is not None else Path
    if name == "listen":
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        result = tuple(str(v).strip() for v in items if str(v).strip())
        if not result:
            raise ConfigError("listen needs at least one address")
        return result
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(text)
        if kind is Path:
            return Path(str(value)) if str(value) else None
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot use {value!r} (expected {kind.__name__})") from None


def load_config(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Merge defaults, the config file, ``SPENDKEEPER_*`` variables and flags."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = flags.get("config") or env.get("SPENDKEEPER_CONFIG")
    if config_file:
        try:
            data = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            values[name] = _convert(name, value)
    for name in _FIELDS:
        raw = env.get(f"SPENDKEEPER_{name.upper()}")
        if raw is not None:
            values[name] = _convert(name, raw)
    for name, value in flags.items():
        if name in _FIELDS and value is not None:
            values[name] = _convert(name, value)
    config = Config(**values)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if config.workers < 1 or config.workers > 64:
        raise ConfigError("workers must be between 1 and 64")
    if config.threads < 1:
        raise ConfigError("threads must be at least 1")
    if not 0.00001 <= config.switch_interval <= 0.1:
        raise ConfigError("switch_interval must be between 0.00001 and 0.1 seconds")
    if config.reservation_ttl <= 0:
        raise ConfigError("reservation_ttl must be positive (seconds)")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    if config.map_size < 1 << 20:
        raise ConfigError("map_size must be at least 1 MiB")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (each also settable as ``SPENDKEEPER_<NAME>``)."""
    add = parser.add_argument
    add("--config", help="TOML file with settings (keys as the flag names)")
    add("--policy", help="policy file or directory (default: examples)")
    add("--data-dir", help="LMDB data directory (default: ./data)")
    add("--listen", help="comma-separated host:port or unix:/path (default: 127.0.0.1:50051)")
    add("--metrics-listen", help="host:port for /metrics, or 'off' (default: 127.0.0.1:9464)")
    add("--workers", type=int, help="server processes sharing the port and the ledger")
    add("--threads", type=int, help="handler threads per process (default: 8)")
    add("--switch-interval", type=float,
        help="GIL switch interval in seconds for this process (default 0.0002)")
    add("--max-concurrent-rpcs", type=int, help="beyond this, RESOURCE_EXHAUSTED (default 512)")
    add("--reservation-ttl", type=float, help="seconds before a reservation expires (300)")
    add("--map-size", type=int, help="LMDB map size in bytes (default: 4 GiB)")
    add("--tls-cert", help="server certificate (PEM): enables TLS")
    add("--tls-key", help="server private key (PEM)")
    add("--tls-client-ca", help="CA for client certificates: enables mTLS")
    add("--shadow", action="store_const", const=True, help="allow everything; log would-be denials")
    add("--no-watch", dest="watch", action="store_const", const=False,
        help="do not watch the policy for changes (SIGHUP still reloads)")
    add("--shutdown-grace", type=float, help="seconds to drain calls on SIGTERM (10)")
    add("--decision-log", help="JSON-lines decision log file (denies; --decision-log-all: all)")
    add("--decision-log-all", action="store_const", const=True, help="log every decision")
    add("--decision-log-max-bytes", type=int,
        help="rotate the decision log at this size (default 64 MiB; 5 files kept)")
    add("--hash-user-ids", action="store_const", const=True, help="hash user ids in the log")
    add("--per-user-metrics", action="store_const", const=True, help="per-user metric series")
    add("--log-level", help="debug, info, warning, error (default: info)")
