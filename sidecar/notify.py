"""Threshold notifications: deliver outbox entries to webhooks, signed, with retries.

The ledger stores one outbox entry per threshold crossing (see
:mod:`sidecar.ledger.outbox`). A :class:`Notifier` thread in each sidecar
process polls for due entries, claims one (a lease, so that of several
workers sharing the ledger only one sends it), POSTs it as JSON to the
entry's webhook and marks it delivered on a 2xx answer. Any other outcome is
a failed attempt, retried with capped exponential backoff and jitter until a
2xx arrives. Entries of orgs without a webhook are logged and marked
delivered as "logged".

Delivery is at-least-once: a process that dies between the receiver's 2xx
and the mark lets the entry be sent again (same ``X-Spendkeeper-Idempotency-Key``)
once its lease expires. Receivers deduplicate on that key.

Headers: ``X-Spendkeeper-Signature: sha256=<hex HMAC-SHA256 of the raw body
keyed with the webhook secret>``, ``X-Spendkeeper-Idempotency-Key`` and
``X-Spendkeeper-Timestamp`` (Unix seconds; the body's ``sent_at`` carries the
same instant under the signature). All of this runs off the request path.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from policy.model import usd_text
from sidecar.config import Config
from sidecar.ledger import Ledger, outbox

__all__ = ["SIGNATURE_HEADER", "Notifier", "payload", "sign", "verify"]

_log = logging.getLogger("spendkeeper.notify")
SIGNATURE_HEADER = "X-Spendkeeper-Signature"
KEY_HEADER = "X-Spendkeeper-Idempotency-Key"
TIMESTAMP_HEADER = "X-Spendkeeper-Timestamp"



def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, body), header)


def payload(entry: dict[str, Any], sent_at: int) -> bytes:
    """The JSON body sent for an outbox entry (money as exact decimal strings too)."""
    body = {
        "type": "spend.threshold_crossed",
        "idempotency_key": entry["key"],
        "seq": entry["seq"],
        "org": entry["org"],
        "level": entry["level"],
        "scope": entry["scope"],
        "period": entry["period"],
        "threshold_percent": entry["threshold_percent"],
        "spent_usd": usd_text(entry["spent_nanos"]),
        "limit_usd": usd_text(entry["limit_nanos"]),
        "spent_nanos": entry["spent_nanos"],
        "limit_nanos": entry["limit_nanos"],
        "crossed_at": entry["at"],
        "sent_at": sent_at,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: urllib would turn the POST into a bodiless GET."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


class Notifier:
    """Delivers due outbox entries; run it in a thread with :meth:`run` (or :meth:`start`)."""

    def __init__(self, ledger: Ledger, secret: str = "", *, timeout: float = 3.0,
                 base_delay: float = 2.0, max_delay: float = 900.0, lease: float = 30.0,
                 poll_interval: float = 0.5, batch: int = 50, owner: str | None = None,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.ledger = ledger
        self.secret = secret
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lease_ms = int(lease * 1000)
        self.poll_interval = poll_interval
        self.batch = batch
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.clock = clock
        self.rng = rng or random.Random()
        self._opener = urllib.request.build_opener(_NoRedirect())
        #: Outcomes in this process (exported as spendkeeper_notification_deliveries_total).
        self.delivered = 0
        self.logged = 0
        self.failed = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_config(cls, config: Config, ledger: Ledger) -> Notifier:
        """A notifier with the configured webhook secret."""
        return cls(ledger, config.webhook_secret)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ------------------------------------------------------------- running
    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set (the sidecar's background-thread loop)."""
        while not stop.is_set():
            try:
                busy = self.run_once(stop) >= self.batch
            except Exception:
                _log.exception("notification pass failed; retrying")
                busy = False
            if not busy:
                stop.wait(self.poll_interval)

    def start(self) -> None:
        """Run in an own daemon thread (for use outside :class:`~sidecar.server.Sidecar`)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,),
                                        name="notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread started by :meth:`start`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Claim and deliver every entry due now (up to ``batch``); how many were tried."""
        tried = 0
        for entry in outbox.due(self.ledger, self._now_ms(), self.batch):
            if stop is not None and stop.is_set():
                break
            claimed = outbox.claim(self.ledger, entry["seq"], self.owner, self._now_ms(),
                                   self.lease_ms)
            if claimed is not None:  # else another process has it, or it is done
                self.deliver(claimed)
                tried += 1
        return tried

    # ------------------------------------------------------------- one entry
    def deliver(self, entry: dict[str, Any]) -> bool:
        """Send one claimed entry and settle it in the outbox; True when delivered."""
        what = (f"{entry['org']} {entry['level']} {entry['scope']!r} crossed "
                f"{entry['threshold_percent']}% in {entry['period']} "
                f"(spent {usd_text(entry['spent_nanos'])} of {usd_text(entry['limit_nanos'])} USD)")
        url = entry.get("webhook")
        if not url:
            outbox.mark_delivered(self.ledger, entry["seq"], self.owner, self._now_ms(), "logged")
            self.logged += 1
            _log.info("notification %s (no webhook, logged): %s", entry["key"], what)
            return True
        error = self._post(url, entry)
        if error is None:
            outbox.mark_delivered(self.ledger, entry["seq"], self.owner, self._now_ms(),
                                  "webhook")
            self.delivered += 1
            _log.info("notification %s delivered to %s: %s", entry["key"], url, what)
            return True
        attempts = entry.get("attempts", 0) + 1
        delay = self.backoff(attempts)
        outbox.record_failure(self.ledger, entry["seq"], self.owner, error, self._now_ms(),
                              self._now_ms() + int(delay * 1000))
        self.failed += 1
        _log.warning("notification %s to %s failed (attempt %d: %s); retrying in %.1f s: %s",
                     entry["key"], url, attempts, error, delay, what)
        return False

    def backoff(self, attempts: int) -> float:
        """Seconds before retry ``attempts + 1``: doubling, capped, half of it jittered."""
        delay = min(self.max_delay, self.base_delay * float(2 ** min(attempts - 1, 30)))
        return delay / 2 + self.rng.uniform(0, delay / 2)

    def _post(self, url: str, entry: dict[str, Any]) -> str | None:
        """POST the entry; None on a 2xx answer, else what went wrong."""
        if not url.startswith(("https://", "http://")):
            return f"not an http(s) URL: {url!r}"
        if not self.secret:
            # Never send unsigned: the entry stays in the outbox (retried with
            # backoff) until a secret is configured and the sidecar restarted.
            return "no webhook secret configured (SPENDKEEPER_WEBHOOK_SECRET); not sending unsigned"
        sent_at = int(self.clock())
        body = payload(entry, sent_at)
        headers = {"Content-Type": "application/json", "User-Agent": "spendkeeper-notifier",
                   KEY_HEADER: entry["key"], TIMESTAMP_HEADER: str(sent_at)}
        headers[SIGNATURE_HEADER] = sign(self.secret, body)
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(65536)
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        return None if 200 <= status < 300 else f"HTTP {status}"
