"""Helpers shared by the observability tests (a module so child processes can import it).

A real webhook receiver on loopback, Prometheus text scraping and parsing,
free ports, and the policies the tests use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.server
import json
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from policy.decide import Request
from policy.pricing import Usage
from sidecar.client import SpendKeeperClient
from sidecar.server import Sidecar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXAMPLES = ROOT / "examples"
SECRET = "test-webhook-secret"
USD = 10**9

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: A policy whose org "pool" notifies ``{url}`` at 50/80/100 %: the org and user
#: type "chat" are limited to $1, every user to $0.10 (one $0.10 record crosses
#: all three of a user's thresholds at once).
NOTIFY_POLICY = """
rates "test" {{
  model "m1" {{ input $1 / MTok  output $2 / MTok }}
}}
plan "basic" {{
  user_type chat {{ seat $20 / month  products chat }}
}}
org "pool" {{
  plan "basic"  rates "test"  timezone "UTC"
  limit $1 / month
  notify at 50%, 80%, 100% webhook "{url}"
  user_type chat limit $1 / month
  default user limit $0.10 / month
  default user_type chat
}}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def copy_policy(target: Path) -> Path:
    """A private copy of ``policy.spend`` in ``target`` (a directory); returns the file."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "policy.spend", target / "policy.spend")
    return target / "policy.spend"


def write_notify_policy(target: Path, url: str) -> Path:
    """The notification policy pointing at ``url``, written into directory ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    path = target / "notify.spend"
    path.write_text(NOTIFY_POLICY.format(url=url), encoding="utf-8")
    return path


def request(request_id: str, org: str = "pool", user: str = "u1", inp: int = 100_000,
            out: int = 0) -> Request:
    """A Record-shaped request on model m1 at the current time (1,000 nano-USD per input token)."""
    return Request(request_id, org, user, "chat", "m1", Usage(input_tokens=inp, output_tokens=out),
                   dt.datetime.now(dt.UTC))


# ------------------------------------------------------------------ sidecars
@dataclass
class Running:
    """A started sidecar and where to reach it."""

    sidecar: Sidecar
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        """``host:port`` of the gRPC listener."""
        return f"127.0.0.1:{self.port}"

    def client(self) -> SpendKeeperClient:
        """A client with a generous deadline (these tests are not about timing)."""
        return SpendKeeperClient(self.target, timeout=5.0)

    def stop(self) -> None:
        """Drain and close (idempotent)."""
        if not getattr(self, "_stopped", False):
            self._stopped = True
            self.sidecar.stop(0.5)


StartSidecar = Callable[..., Running]


# ------------------------------------------------------------------ Prometheus text
def scrape_text(port: int) -> str:
    """GET /metrics from 127.0.0.1:``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(port: int) -> Samples:
    """Scrape and parse."""
    return parse(scrape_text(port))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` (exact label set), or None."""
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in samples.items() if n == name and want <= lab}


def wait_for(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        time.sleep(interval)


# ------------------------------------------------------------------ webhook receiver
@dataclass
class Delivery:
    """One POST the receiver got."""

    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        """The parsed body."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def key(self) -> str:
        """The idempotency key header."""
        return self.headers["X-Spendkeeper-Idempotency-Key"]

    def signature_ok(self, secret: str = SECRET) -> bool:
        """Whether the signature header is HMAC-SHA256(secret, body), computed independently."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("X-Spendkeeper-Signature", ""))


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records webhook POSTs.

    ``fail_first`` answers 500 to the first N attempts of each idempotency key.
    While ``holding`` is true, requests wait for ``release`` and then get 503
    (so a test can kill the sender mid-delivery).
    """

    fail_first: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    holding: bool = False
    held: int = 0
    _attempts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        """Listen on an ephemeral loopback port in a daemon thread."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = owner.answer(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: pytest shows stderr of failing tests only anyway."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        """The webhook URL."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        """The status for one POST (recording it)."""
        key = headers.get("X-Spendkeeper-Idempotency-Key", "")
        with self._lock:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            hold = self.holding
            if hold:
                self.held += 1
        if hold:
            self.release.wait(60)
        with self._lock:
            status = 503 if hold else 500 if self._attempts[key] <= self.fail_first else 200
            self.deliveries.append(Delivery(headers, body, status))
        return status

    def acknowledged(self) -> list[Delivery]:
        """The deliveries answered 2xx."""
        with self._lock:
            return [d for d in self.deliveries if d.status == 200]

    def attempts(self, key: str) -> int:
        """How many POSTs arrived for ``key`` (including held ones)."""
        with self._lock:
            return self._attempts.get(key, 0)

    def stop(self) -> None:
        """Shut the server down."""
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
