"""Threshold notifications reach a real webhook receiver: signed, retried, once per crossing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _obs_support import (
    ROOT,
    SECRET,
    Receiver,
    StartSidecar,
    request,
    scrape,
    value,
    wait_for,
    write_notify_policy,
)

from policy.compile import load
from policy.model import Policy
from sidecar.ledger import Ledger, outbox
from sidecar.notify import Notifier, verify

MAP_SIZE = 64 << 20
#: A notifier in a child process, sharing the parent's ledger (argv: data dir, owner).
_CHILD = """
import sys, threading
from sidecar.ledger import Ledger
from sidecar.notify import Notifier
ledger = Ledger(sys.argv[1], map_size=64 << 20)
notifier = Notifier(ledger, sys.argv[2], lease=1.0, poll_interval=0.02, timeout=30,
                    owner=sys.argv[3])
print("ready", flush=True)
notifier.run(threading.Event())
"""


def all_delivered(ledger: Ledger) -> bool:
    """Whether every outbox entry is marked delivered."""
    found = outbox.entries(ledger)
    return bool(found) and all(e["delivered"] for e in found)


def crossings(ledger: Ledger) -> Counter[tuple[str, str, str]]:
    """How many outbox entries each (level, scope, threshold) has."""
    return Counter((e["level"], e["scope"], e["threshold_percent"])
                   for e in outbox.entries(ledger))


def keys_acknowledged(receiver: Receiver) -> Counter[str]:
    """Idempotency key -> how many 2xx deliveries the receiver answered."""
    return Counter(d.key for d in receiver.acknowledged())


def assert_once_each(ledger: Ledger, receiver: Receiver) -> None:
    """Every outbox entry was acknowledged exactly once, and nothing else was."""
    expected = Counter({e["key"]: 1 for e in outbox.entries(ledger)})
    assert keys_acknowledged(receiver) == expected


@pytest.fixture
def notify_policy(tmp_path: Path, receiver: Receiver) -> Policy:
    """The notification policy aimed at ``receiver``."""
    return load(write_notify_policy(tmp_path / "policy", receiver.url))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A durable ledger on the real clocks in ``tmp_path/data``."""
    led = Ledger(tmp_path / "data", map_size=MAP_SIZE)
    yield led
    led.close()


def test_a_real_sidecar_sends_one_signed_notification_per_crossing(
        start_sidecar: StartSidecar, receiver: Receiver, tmp_path: Path) -> None:
    """Ten $0.10 records: u1 crosses 50/80/100 % of $0.10 at once, org and type one by one."""
    policy = write_notify_policy(tmp_path / "notify-policy", receiver.url)
    run = start_sidecar(policy=policy, webhook_secret=SECRET)
    with run.client() as c:
        for i in range(11):  # the 11th crosses nothing new
            c.record(f"r{i}", "pool", "u1", "chat", "m1", input_tokens=100_000)
    levels = [("user", "pool/u1"), ("user_type", "pool/chat"), ("org", "pool")]
    expected = Counter({(level, scope, pct): 1 for level, scope in levels
                        for pct in ("50", "80", "100")})
    wait_for(lambda: len(receiver.acknowledged()) >= 9)
    ledger = run.sidecar.ledger
    wait_for(lambda: all_delivered(ledger))
    assert crossings(ledger) == expected
    assert_once_each(ledger, receiver)
    for delivery in receiver.acknowledged():
        assert delivery.signature_ok()
        assert verify(SECRET, delivery.body, delivery.headers["X-Spendkeeper-Signature"])
        body = delivery.json
        assert body["idempotency_key"] == delivery.key
        assert str(body["sent_at"]) == delivery.headers["X-Spendkeeper-Timestamp"]
        assert body["org"] == "pool"
        assert body["type"] == "spend.threshold_crossed"
        assert delivery.headers["Content-Type"] == "application/json"
    org_80 = next(d.json for d in receiver.acknowledged()
                  if d.json["level"] == "org" and d.json["threshold_percent"] == "80")
    assert (org_80["spent_usd"], org_80["limit_usd"]) == ("0.8", "1")
    assert (org_80["spent_nanos"], org_80["limit_nanos"]) == (800_000_000, 1_000_000_000)
    s = scrape(run.metrics_port)
    assert value(s, "spendkeeper_notification_deliveries_total", result="delivered") == 9
    assert value(s, "spendkeeper_notification_deliveries_total", result="failed") == 0
    assert value(s, "spendkeeper_notifications_pending") == 0


def test_a_failing_receiver_gets_retries_until_it_acknowledges(
        ledger: Ledger, notify_policy: Policy, receiver: Receiver) -> None:
    """500 twice per notification, then 200: three attempts each, delivered once, backoff used."""
    receiver.fail_first = 2
    ledger.record(notify_policy, request("r1", user="u1", inp=100_000))  # u1: 50, 80, 100 %
    notifier = Notifier(ledger, SECRET, base_delay=0.05, max_delay=0.2, poll_interval=0.02)
    notifier.start()
    try:
        wait_for(lambda: all_delivered(ledger))
    finally:
        notifier.stop()
    entries = outbox.entries(ledger)
    assert len(entries) == 3
    assert_once_each(ledger, receiver)
    for entry in entries:
        assert receiver.attempts(entry["key"]) == 3
        assert entry["attempts"] == 2
        assert entry["last_error"] == "HTTP 500"
        assert entry["delivered_as"] == "webhook"
    assert (notifier.delivered, notifier.failed) == (3, 6)
    assert all(d.signature_ok() for d in receiver.deliveries)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    """Retry n waits between half and all of min(cap, base * 2**(n-1))."""
    notifier = Notifier.__new__(Notifier)
    notifier.base_delay, notifier.max_delay, notifier.rng = 2.0, 60.0, random.Random(7)
    for attempts, full in ((1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (40, 60.0)):
        delays = [notifier.backoff(attempts) for _ in range(200)]
        assert full / 2 <= min(delays) <= max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not fixed


def test_a_lease_makes_one_notifier_the_sender_until_it_expires(
        ledger: Ledger, notify_policy: Policy) -> None:
    """A claimed entry is not due for others; after the lease it is; delivered stays done."""
    ledger.record(notify_policy, request("r1", user="u1"))
    first = outbox.entries(ledger)[0]["seq"]
    now = 1_000_000
    assert outbox.claim(ledger, first, "a", now, lease_ms=500) is not None
    assert outbox.claim(ledger, first, "b", now + 100, lease_ms=500) is None
    assert first not in [e["seq"] for e in outbox.due(ledger, now + 100)]
    assert outbox.claim(ledger, first, "b", now + 600, lease_ms=500) is not None
    assert outbox.mark_delivered(ledger, first, "b", now + 700, "webhook")
    assert not outbox.mark_delivered(ledger, first, "a", now + 800, "webhook")
    assert outbox.claim(ledger, first, "c", now + 10_000, lease_ms=500) is None
    assert outbox.stats(ledger) == outbox.OutboxStats(pending=2, retrying=0)


def test_a_restart_neither_loses_nor_repeats_notifications(
        tmp_path: Path, notify_policy: Policy, receiver: Receiver) -> None:
    """Delivered before a clean restart: not sent again; crossed after it: sent once."""
    data = tmp_path / "data"
    ledger = Ledger(data, map_size=MAP_SIZE)
    for i in range(5):  # each user crosses 3 thresholds; org and type reach 50 %
        ledger.record(notify_policy, request(f"r{i}", user=f"u{i}"))
    notifier = Notifier(ledger, SECRET, poll_interval=0.02)
    notifier.start()
    wait_for(lambda: all_delivered(ledger))
    notifier.stop()
    ledger.close()
    before = keys_acknowledged(receiver)
    assert len(before) == 5 * 3 + 2
    ledger = Ledger(data, map_size=MAP_SIZE)
    try:
        for i in range(5, 10):  # u9 crosses 3; org and type reach 80 and 100 %
            ledger.record(notify_policy, request(f"r{i}", user="u9"))
        notifier = Notifier(ledger, SECRET, poll_interval=0.02)
        notifier.start()
        wait_for(lambda: all_delivered(ledger))
        notifier.stop()
        assert_once_each(ledger, receiver)
        assert len(keys_acknowledged(receiver)) == len(before) + 3 + 4
        assert len(receiver.deliveries) == len(before) + 3 + 4  # nothing sent twice
    finally:
        ledger.close()


def test_a_killed_notifier_loses_nothing_and_delivered_ones_are_not_repeated(
        ledger: Ledger, notify_policy: Policy, receiver: Receiver, tmp_path: Path) -> None:
    """kill -9 of a sender mid-delivery: its claim expires, another process delivers it once."""
    ledger.record(notify_policy, request("r0", user="u0"))  # u0: 3 crossings
    parent = Notifier(ledger, SECRET, poll_interval=0.02, lease=1.0)
    assert parent.run_once() == 3
    delivered_first = keys_acknowledged(receiver)
    receiver.holding = True
    ledger.record(notify_policy, request("r1", user="u1"))  # u1: 3 more
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "data"), SECRET,
                              "child"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        wait_for(lambda: receiver.held >= 1)  # the child is inside a delivery
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    receiver.holding = False
    receiver.release.set()
    held = [e for e in outbox.entries(ledger) if e.get("lease_owner") == "child"]
    assert len(held) == 1
    assert not held[0]["delivered"]
    stop = threading.Event()
    thread = threading.Thread(target=parent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: all_delivered(ledger))  # after the child's 1 s lease ran out
    finally:
        stop.set()
        thread.join(10)
    assert_once_each(ledger, receiver)
    assert receiver.attempts(held[0]["key"]) == 2  # the held one, then the redelivery
    for key in delivered_first:
        assert receiver.attempts(key) == 1


def test_two_processes_sharing_a_ledger_send_each_notification_once(
        ledger: Ledger, notify_policy: Policy, receiver: Receiver, tmp_path: Path) -> None:
    """Notifiers in two processes race for the same outbox: every entry is sent exactly once."""
    for i in range(12):
        ledger.record(notify_policy, request(f"r{i}", user=f"u{i}"))  # 3 per user + org/type
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "data"), SECRET,
                              "child"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    parent = Notifier(ledger, SECRET, poll_interval=0.01, owner="parent")
    stop = threading.Event()
    thread = threading.Thread(target=parent.run, args=(stop,), daemon=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        thread.start()
        wait_for(lambda: all_delivered(ledger))
    finally:
        stop.set()
        thread.join(10)
        child.terminate()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    entries = outbox.entries(ledger)
    assert len(entries) == 12 * 3 + 3 + 3  # each user 3; the org and type cross 50/80/100 %
    assert_once_each(ledger, receiver)
    assert len(receiver.deliveries) == len(entries)  # no second POST of anything
    senders = Counter(e["delivered_by"] for e in entries)
    print(f"\ndeliveries by process: {dict(senders)}")
    assert json.loads(receiver.deliveries[0].body)["org"] == "pool"
