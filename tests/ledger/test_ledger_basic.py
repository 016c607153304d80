"""The ledger's single-process contract: reserve, deny, settle, release, expire, roll over.

Costs on model m1 are ``input * 1,000 + output * 2,000`` nano-USD. Org "acme"
(America/New_York) limits: org $1, chat $0.50, chat_code $0.80, default user
$0.20, alice $0.30, carol $0.20 and $0.10 a day.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import stat
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from _ledger_support import (
    T0,
    FakeClock,
    check_books,
    cost_of,
    counters,
    journal,
    make_req,
    requests,
    snapshot,
)

from policy.model import Policy
from sidecar.ledger import Conflict, Ledger
from sidecar.ledger.store import loads

NY = ZoneInfo("America/New_York")
P = "2026-03"  # the period of T0 in New York

ALICE = [(P, "user", "acme", "alice"), (P, "type", "acme", "chat_code"), (P, "org", "acme")]
CAROL = [("2026-03-10", "day", "acme", "carol"), (P, "user", "acme", "carol"),
         (P, "type", "acme", "chat_code"), (P, "org", "acme")]
STATE_DBS = ("counters", "expiry", "usage", "allowances", "journal", "unpriced", "outbox",
             "crossings")


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    """A New York wall-clock time as an aware datetime."""
    return dt.datetime(year, month, day, hour, minute, tzinfo=NY)


# ---------------------------------------------------------------- authorize
def test_allow_reserves_the_worst_case_at_every_level(ledger: Ledger, policy: Policy) -> None:
    """An allowed Authorize reserves its worst-case cost at day, user, type and org level."""
    result = ledger.authorize(policy, make_req("a1", "carol", inp=10_000, out=20_000))
    worst = cost_of(10_000, 20_000)
    assert result.allowed
    assert (result.reason, result.reserved, result.worst_case) == ("WITHIN_LIMITS", worst, worst)
    assert [v.level for v in result.levels] == ["user_day", "user", "user_type", "org"]
    assert all(v.reserved == worst and v.spent == 0 for v in result.levels)
    assert counters(ledger) == dict.fromkeys(CAROL, (0, worst, 0))
    assert ledger.outstanding() == 1
    assert requests(ledger)["a1"]["state"] == "reserved"


def test_deny_changes_no_counter_at_any_level(ledger: Ledger, policy: Policy) -> None:
    """A denied Authorize leaves counters, reservations, usage and journal byte for byte."""
    ledger.record(policy, make_req("r1", "alice", out=50_000))
    ledger.authorize(policy, make_req("a1", "alice", out=10_000))
    before = snapshot(ledger, *STATE_DBS)
    result = ledger.authorize(policy, make_req("a2", "alice", out=100_000))
    assert not result.allowed
    assert result.reason == "USER_LIMIT"
    assert result.reserved == 0
    assert snapshot(ledger, *STATE_DBS) == before
    assert requests(ledger)["a2"]["state"] == "denied"


@pytest.mark.parametrize(("user", "out", "reason"), [
    ("dave", 125_000, "USER_LIMIT"),       # $0.25: user, type and org all fail
    ("dave", 90_000, "USER_TYPE_LIMIT"),   # $0.18: type and org fail
    ("dave", 50_000, "ORG_LIMIT"),         # $0.10: only the org fails
    ("bob", 50_000, "USER_LIMIT"),         # bob is over his own limit, and the org fails
    ("carol", 60_000, "USER_LIMIT"),       # $0.12: carol's day ($0.10) and the org fail
])
def test_deny_names_the_narrowest_failing_level(ledger: Ledger, policy: Policy, user: str,
                                                out: int, reason: str) -> None:
    """When several levels fail, the reason names the narrowest of them."""
    ledger.record(policy, make_req("r-alice", "alice", out=300_000))  # chat_code, org: $0.60
    ledger.record(policy, make_req("r-bob", "bob", out=175_000))      # chat, org: +$0.35
    result = ledger.authorize(policy, make_req("a", user, inp=0, out=out))
    assert not result.allowed
    assert result.reason == reason
    assert "limit" in result.message
    assert "exceeded" in result.message


def test_retried_authorize_returns_the_stored_answer(ledger: Ledger, policy: Policy) -> None:
    """The same id and payload again: the first answer, replayed=True, counters unchanged."""
    req = make_req("a1", "alice", out=10_000)
    first = ledger.authorize(policy, req)
    ledger.record(policy, make_req("other", "alice", out=20_000))  # counters move meanwhile
    before = snapshot(ledger)
    again = ledger.authorize(policy, req)
    assert again.replayed
    assert not first.replayed
    assert again == dataclasses.replace(first, replayed=True)
    assert snapshot(ledger) == before


def test_retried_deny_returns_the_stored_deny(ledger: Ledger, policy: Policy) -> None:
    """A denied id stays denied on retry even after budget frees up (the answer is stored)."""
    ledger.authorize(policy, make_req("big", "alice", out=140_000))
    req = make_req("a1", "alice", out=20_000)
    assert ledger.authorize(policy, req).reason == "USER_LIMIT"
    assert ledger.release("big")
    again = ledger.authorize(policy, req)
    assert (again.allowed, again.reason, again.replayed) == (False, "USER_LIMIT", True)


def test_authorize_with_a_reused_id_and_another_payload_conflicts(ledger: Ledger,
                                                                  policy: Policy) -> None:
    """The same request id with a different payload raises Conflict and changes nothing."""
    ledger.authorize(policy, make_req("a1", "alice", out=10_000))
    before = snapshot(ledger)
    with pytest.raises(Conflict, match="different Authorize"):
        ledger.authorize(policy, make_req("a1", "alice", out=10_001))
    with pytest.raises(Conflict):
        ledger.authorize(policy, make_req("a1", "bob", out=10_000))
    assert snapshot(ledger) == before


# ---------------------------------------------------------------- record
@pytest.mark.parametrize("actual_out", [5_000, 10_000, 100_000],
                         ids=["below", "equal", "above-reservation"])
def test_record_settles_the_reservation(ledger: Ledger, policy: Policy, actual_out: int) -> None:
    """Record returns the reservation at every level and charges the actual cost, even above it."""
    ledger.authorize(policy, make_req("a1", "alice", out=10_000))
    result = ledger.record(policy, make_req("a1", "alice", out=actual_out))
    cost = cost_of(1000, actual_out)
    assert (result.cost, result.priced, result.duplicate, result.late) == (cost, True, False, False)
    assert counters(ledger) == dict.fromkeys(ALICE, (cost, 0, 1))
    assert [(v.spent, v.reserved) for v in result.levels] == [(cost, 0)] * 3
    assert ledger.outstanding() == 0
    assert requests(ledger)["a1"]["state"] == "settled"


def test_record_without_authorize_is_charged(ledger: Ledger, policy: Policy) -> None:
    """A Record with no Authorize is charged at every level and journaled."""
    result = ledger.record(policy, make_req("r1", "carol", out=10_000))
    cost = cost_of(1000, 10_000)
    assert result.cost == cost
    assert counters(ledger) == dict.fromkeys(CAROL, (cost, 0, 1))
    assert [e["id"] for _, e in journal(ledger)] == ["r1"]


def test_duplicate_record_answers_the_first_result_and_changes_nothing(ledger: Ledger,
                                                                      policy: Policy) -> None:
    """A repeated Record: duplicate=True, the first cost and levels, no database changes."""
    req = make_req("r1", "alice", out=10_000)
    first = ledger.record(policy, req)
    ledger.record(policy, make_req("r2", "alice", out=10_000))
    before = snapshot(ledger)
    again = ledger.record(policy, req)
    assert again.duplicate
    assert not first.duplicate
    assert (again.cost, again.levels, again.period) == (first.cost, first.levels, first.period)
    assert snapshot(ledger) == before


def test_record_with_a_reused_id_and_another_payload_conflicts(ledger: Ledger,
                                                               policy: Policy) -> None:
    """Recording an id again with different usage raises Conflict and changes nothing."""
    ledger.record(policy, make_req("r1", "alice", out=10_000))
    before = snapshot(ledger)
    with pytest.raises(Conflict, match="different payload"):
        ledger.record(policy, make_req("r1", "alice", out=10_500))
    assert snapshot(ledger) == before


def test_authorize_after_record_without_authorize_conflicts(ledger: Ledger,
                                                            policy: Policy) -> None:
    """An id already settled by a bare Record cannot be authorized afterwards."""
    ledger.record(policy, make_req("r1", "alice"))
    with pytest.raises(Conflict, match="already recorded"):
        ledger.authorize(policy, make_req("r1", "alice"))


# ---------------------------------------------------------------- release and expiry
def test_release_returns_true_once_then_false(ledger: Ledger, policy: Policy) -> None:
    """Release frees a live reservation once; later calls (and unknown ids) answer False."""
    ledger.authorize(policy, make_req("a1", "alice", out=10_000))
    assert ledger.release("a1") is True
    assert counters(ledger) == dict.fromkeys(ALICE, (0, 0, 0))
    assert ledger.release("a1") is False
    assert ledger.release("never-seen") is False
    assert ledger.outstanding() == 0


def test_release_after_record_is_false(ledger: Ledger, policy: Policy) -> None:
    """A settled reservation cannot be released (it was already returned)."""
    ledger.authorize(policy, make_req("a1", "alice"))
    ledger.record(policy, make_req("a1", "alice"))
    assert ledger.release("a1") is False
    assert counters(ledger) == {key: (cost_of(1000, 1000), 0, 1) for key in ALICE}


def test_reservation_expires_on_the_monotonic_clock_not_the_wall_clock(
        ledger: Ledger, policy: Policy, clock: FakeClock) -> None:
    """reap() returns a reservation after the monotonic TTL; wall clock jumps of ±1h do not."""
    ledger.authorize(policy, make_req("a1", "alice", out=10_000))
    worst = cost_of(1000, 10_000)
    clock.jump_wall(dt.timedelta(hours=1))
    assert ledger.reap() == 0
    clock.jump_wall(dt.timedelta(hours=-2))
    assert ledger.reap() == 0
    clock.advance_mono(59.999)
    assert ledger.reap() == 0
    assert counters(ledger) == dict.fromkeys(ALICE, (0, worst, 0))
    clock.advance_mono(0.001)
    assert ledger.reap() == 1
    assert counters(ledger) == dict.fromkeys(ALICE, (0, 0, 0))
    assert ledger.outstanding() == 0
    assert requests(ledger)["a1"]["state"] == "expired"
    assert ledger.release("a1") is False
    assert ledger.reap() == 0


def test_release_after_the_ttl_returns_false_but_frees_the_reservation(
        ledger: Ledger, policy: Policy, clock: FakeClock) -> None:
    """Releasing an expired (not yet reaped) reservation answers False and returns it once."""
    ledger.authorize(policy, make_req("a1", "alice"))
    clock.advance_mono(60)
    assert ledger.release("a1") is False
    assert counters(ledger) == dict.fromkeys(ALICE, (0, 0, 0))
    assert ledger.reap() == 0


@pytest.mark.parametrize("reap_first", [True, False], ids=["reaped", "not-reaped"])
def test_late_record_after_expiry_is_charged_once(ledger: Ledger, policy: Policy,
                                                  clock: FakeClock, reap_first: bool) -> None:
    """A Record after its reservation expired is charged once; reserved never goes negative."""
    ledger.authorize(policy, make_req("a1", "alice", out=10_000))
    clock.tick(61)
    if reap_first:
        assert ledger.reap() == 1
    result = ledger.record(policy, make_req("a1", "alice", out=20_000))
    cost = cost_of(1000, 20_000)
    assert result.cost == cost
    assert counters(ledger) == dict.fromkeys(ALICE, (cost, 0, 1))
    assert ledger.reap() == 0
    assert ledger.record(policy, make_req("a1", "alice", out=20_000)).duplicate
    assert counters(ledger) == dict.fromkeys(ALICE, (cost, 0, 1))
    assert check_books(ledger) == Counter({"a1": 1})


def test_reservations_survive_close_and_reopen(data_dir: Path, policy: Policy,
                                               clock: FakeClock) -> None:
    """A reservation made before a restart (same boot) is still held, then expires on time."""
    led = Ledger(data_dir, reservation_ttl=60, clock=clock)
    led.authorize(policy, make_req("a1", "alice"))
    led.close()
    led = Ledger(data_dir, reservation_ttl=60, clock=clock)
    try:
        assert led.outstanding() == 1
        clock.advance_mono(60)
        assert led.reap() == 1
        assert counters(led)[ALICE[0]] == (0, 0, 0)
    finally:
        led.close()


def test_reservations_of_a_previous_boot_are_returned_at_open(data_dir: Path, policy: Policy,
                                                              clock: FakeClock) -> None:
    """Monotonic deadlines mean nothing after a reboot: opening the ledger returns them all."""
    led = Ledger(data_dir, reservation_ttl=60, clock=clock)
    led.authorize(policy, make_req("a1", "alice"))
    led.authorize(policy, make_req("a2", "carol"))
    with led.env.begin(write=True) as txn:  # as if written before the machine restarted
        txn.put(b"boot", b"an-earlier-boot", db=led.dbs["meta"])
    led.close()
    led = Ledger(data_dir, reservation_ttl=60, clock=clock)
    try:
        assert led.outstanding() == 0
        assert all(reserved == 0 for _, reserved, _ in counters(led).values())
        assert {rid: e["state"] for rid, e in requests(led).items()} == {"a1": "expired",
                                                                         "a2": "expired"}
    finally:
        led.close()


# ---------------------------------------------------------------- periods
def test_month_rolls_over_at_local_midnight(ledger: Ledger, policy: Policy,
                                            clock: FakeClock) -> None:
    """23:30 on Apr 30 and 00:30 on May 1 in New York (both May in UTC) are different periods."""
    before = local(2026, 4, 30, 23, 30)
    after = local(2026, 5, 1, 0, 30)
    assert before.astimezone(dt.UTC).month == after.astimezone(dt.UTC).month == 5
    clock.wall = before
    ledger.record(policy, make_req("r-apr", "alice", out=145_000, at=before))  # $0.291
    denied = ledger.authorize(policy, make_req("a-apr", "alice", out=10_000, at=before))
    assert (denied.allowed, denied.reason, denied.period) == (False, "USER_LIMIT", "2026-04")
    assert denied.resets_at == local(2026, 5, 1).astimezone(dt.UTC)
    clock.wall = after
    allowed = ledger.authorize(policy, make_req("a-may", "alice", out=10_000, at=after))
    assert (allowed.allowed, allowed.period) == (True, "2026-05")
    recorded = ledger.record(policy, make_req("a-may", "alice", out=10_000, at=after))
    assert (recorded.period, recorded.late) == ("2026-05", False)
    got = counters(ledger)
    assert got[("2026-04", "user", "acme", "alice")] == (cost_of(1000, 145_000), 0, 1)
    assert got[("2026-05", "user", "acme", "alice")] == (cost_of(1000, 10_000), 0, 1)
    assert got[("2026-05", "org", "acme")] == (cost_of(1000, 10_000), 0, 1)


def test_late_usage_within_grace_is_charged_to_its_own_period(ledger: Ledger, policy: Policy,
                                                              clock: FakeClock) -> None:
    """April usage recorded on May 2 (grace 3 days) counts in April and is marked late."""
    clock.wall = local(2026, 5, 2, 12, 0)
    at = local(2026, 4, 30, 22, 0)
    result = ledger.record(policy, make_req("r1", "alice", out=10_000, at=at))
    cost = cost_of(1000, 10_000)
    assert (result.period, result.late, result.cost) == ("2026-04", True, cost)
    assert counters(ledger) == {(("2026-04", *k[1:])): (cost, 0, 1) for k in ALICE}
    [(period, entry)] = journal(ledger)
    assert (period, entry["late"], entry["at"]) == ("2026-04", True, at.isoformat())
    usage_keys = [k.decode() for k in snapshot(ledger, "usage")["usage"]]
    assert usage_keys
    assert all(k.startswith("2026-04") and k.endswith("late") for k in usage_keys)


def test_late_usage_after_grace_is_charged_to_the_current_period(ledger: Ledger, policy: Policy,
                                                                 clock: FakeClock) -> None:
    """April usage recorded after the grace window (May 4, 00:00 New York) counts in May."""
    clock.wall = local(2026, 5, 4, 0, 0)
    result = ledger.record(policy, make_req("r1", "alice", out=10_000,
                                            at=local(2026, 4, 30, 22, 0)))
    assert (result.period, result.late) == ("2026-05", True)
    assert set(counters(ledger)) == {("2026-05", *k[1:]) for k in ALICE}


# ---------------------------------------------------------------- pricing in the ledger
def test_free_allowance_is_used_before_charging(ledger: Ledger, policy: Policy) -> None:
    """Code execution: the org's free hour a month is consumed first, then charged per second."""
    def run(rid: str, seconds: int, user: str = "bob", at: dt.datetime = T0) -> int:
        req = make_req(rid, user, inp=0, out=0, product="code_execution", at=at,
                       code_execution_seconds=seconds)
        return ledger.record(policy, req).cost

    assert run("r1", 3000) == 0
    # 600 of 1,200 s are free; 600 s * $0.05 / 3600 s = $0.00833... rounded up to the nano.
    assert run("r2", 1200, "alice") == 8_333_334
    assert run("r3", 100) == 1_388_889
    with ledger.read() as txn:
        used = txn.get(b"2026-03\x1facme\x1fcode_execution", db=ledger.dbs["allowances"])
    assert used is not None
    assert int.from_bytes(used, "big") == 3600
    assert run("r4", 3600, at=dt.datetime(2026, 4, 10, tzinfo=dt.UTC)) == 0  # a new month


def test_unknown_model_is_recorded_unpriced_at_zero_cost(ledger: Ledger, policy: Policy) -> None:
    """Usage on a model the table lacks is kept (unpriced db, journal) and costs nothing."""
    assert ledger.authorize(policy, make_req("a1", model="mystery")).reason == "UNKNOWN_MODEL"
    result = ledger.record(policy, make_req("r1", "alice", model="mystery", out=7))
    assert (result.cost, result.priced) == (0, False)
    [(_, raw)] = ledger.scan("unpriced", ("2026-03", "acme"))
    entry = loads(raw)
    assert (entry["id"], entry["model"], entry["why"]) == ("r1", "mystery",
                                                           'unknown model "mystery"')
    assert entry["usage"]["output_tokens"] == 7
    assert counters(ledger) == dict.fromkeys(ALICE, (0, 0, 1))
    [(_, journaled)] = journal(ledger)
    assert (journaled["priced"], journaled["nanos"]) == (False, 0)


def test_unknown_org_is_recorded_unpriced(ledger: Ledger, policy: Policy) -> None:
    """Usage for an org the policy lacks is stored unpriced (UTC period); no counter moves."""
    result = ledger.record(policy, make_req("r1", "zed", org="nowhere"))
    assert (result.cost, result.priced, result.levels) == (0, False, ())
    [(_, raw)] = ledger.scan("unpriced", ("2026-03", "nowhere"))
    assert loads(raw)["why"] == "unknown org"
    assert list(ledger.scan("unpriced", ("2026-03", "acme"))) == []
    assert counters(ledger) == {}
    assert ledger.record(policy, make_req("r1", "zed", org="nowhere")).duplicate
    assert len(snapshot(ledger, "unpriced")["unpriced"]) == 1


# ---------------------------------------------------------------- notifications
def test_each_threshold_crossing_is_notified_once_per_period(data_dir: Path, policy: Policy,
                                                             clock: FakeClock) -> None:
    """Many records over 50/80/100 %, with a restart between: one outbox entry per crossing."""
    led = Ledger(data_dir, clock=clock)
    try:
        for i in range(30):  # $0.05 each, $1.50 in all: past every threshold of bob, chat, org
            if i == 15:
                led.close()
                led = Ledger(data_dir, clock=clock)
            led.record(policy, make_req(f"r{i}", "bob", inp=0, out=25_000))
        april = dt.datetime(2026, 4, 10, tzinfo=dt.UTC)
        clock.wall = april
        for i in range(3):  # $0.15 of bob's $0.20 in April: 50 % only
            led.record(policy, make_req(f"apr{i}", "bob", inp=0, out=25_000, at=april))
        notes = [loads(v) for v in snapshot(led, "outbox")["outbox"].values()]
    finally:
        led.close()
    seen = Counter((n["level"], n["scope"], n["threshold_percent"], n["period"]) for n in notes)
    expected = {(level, scope, pct, "2026-03")
                for level, scope in (("user", "acme/bob"), ("user_type", "acme/chat"),
                                     ("org", "acme"))
                for pct in ("50", "80", "100")}
    expected |= {("user", "acme/bob", "50", "2026-04")}
    assert set(seen) == expected
    assert all(n == 1 for n in seen.values())
    assert [n["seq"] for n in notes] == list(range(1, len(notes) + 1))
    assert len({n["key"] for n in notes}) == len(notes)


# ---------------------------------------------------------------- clamp
@pytest.mark.parametrize("spent_before", [0, 1_100], ids=["even-headroom", "odd-headroom"])
def test_clamp_allows_the_largest_output_that_fits(ledger: Ledger, policy: Policy,
                                                   spent_before: int) -> None:
    """allow_clamp: allowed with the most output tokens whose cost fits the tightest level."""
    if spent_before:
        ledger.record(policy, make_req("r0", "alice", inp=1, out=0, cache_read_tokens=1))
    req = make_req("a1", "alice", inp=1000, out=1_000_000)
    assert ledger.authorize(policy, req).reason == "USER_LIMIT"
    clamped = make_req("a2", "alice", inp=1000, out=1_000_000, allow_clamp=True)
    result = ledger.authorize(policy, clamped)
    headroom = 300_000_000 - spent_before
    tokens = result.max_output_tokens
    assert result.allowed
    assert tokens is not None
    assert cost_of(1000, tokens) == result.reserved <= headroom < cost_of(1000, tokens + 1)
    assert counters(ledger)[ALICE[0]][1] == result.reserved
    if not spent_before:
        assert result.reserved == headroom  # fits exactly: nothing left for alice
        assert result.levels[0].remaining == 0


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_data_files_are_private(tmp_path: Path, clock: FakeClock, umask: int) -> None:
    """The data directory is created 0700 and data.mdb / lock.mdb 0600, whatever the umask."""
    old = os.umask(umask)
    try:
        led = Ledger(tmp_path / "data", clock=clock)
    finally:
        os.umask(old)
    led.close()
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((tmp_path / "data" / name).stat().st_mode) == 0o600
