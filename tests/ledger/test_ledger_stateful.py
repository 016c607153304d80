"""A stateful model of the ledger: a plain dict that the real ledger must always agree with.

Hypothesis drives Authorize (fresh, retried, conflicting, clamped), Record (with
and without a prior Authorize, retried, conflicting, late), Release, reap,
monotonic and wall clock moves (into the next month) and close-and-reopen. The
model works out every counter by hand from the limits in policy.spend; after
each step the real counters must equal it, no level may exceed its limit except
by what records beyond their reservations added, spent must be the sum of
settled costs, and no id may be settled twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import hypothesis.strategies as st
from _ledger_support import FakeClock, counters, journal, load_policy, make_req, snapshot
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from policy.decide import Request
from sidecar.ledger import Conflict, Ledger

NY = ZoneInfo("America/New_York")
TTL = 30.0
POLICY = load_policy()
MONTH = 10**9 // 100  # one cent, in nano-USD, to write limits readably
#: Mirrors org "acme" in policy.spend: user -> (user type, month limit, day limit).
MEMBERS = {"alice": ("chat_code", 30 * MONTH, None), "bob": ("chat", 20 * MONTH, None),
           "carol": ("chat_code", 20 * MONTH, 10 * MONTH), "dave": ("chat", 20 * MONTH, None)}
TYPE_LIMITS = {"chat": 50 * MONTH, "chat_code": 80 * MONTH}
ORG_LIMIT = 100 * MONTH
GRACE = dt.timedelta(days=3)

Key = tuple[str, ...]
users = st.sampled_from(sorted(MEMBERS))
tokens_in = st.integers(0, 20_000)
tokens_out = st.integers(0, 60_000)  # up to $0.14 with input: budgets fill in a few steps
pick = st.integers(0, 10**6)


def cost(inp: int, out: int) -> int:
    return inp * 1_000 + out * 2_000


def month_of(when: dt.datetime) -> str:
    return when.astimezone(NY).strftime("%Y-%m")


def scopes(user: str, at: dt.datetime) -> list[tuple[Key, int | None]]:
    """The keys and limits a request of ``user`` at ``at`` counts against, narrowest first."""
    user_type, month_limit, day_limit = MEMBERS[user]
    local = at.astimezone(NY)
    period = local.strftime("%Y-%m")
    out: list[tuple[Key, int | None]] = []
    if day_limit is not None:
        out.append(((local.strftime("%Y-%m-%d"), "day", "acme", user), day_limit))
    out += [((period, "user", "acme", user), month_limit),
            ((period, "type", "acme", user_type), TYPE_LIMITS[user_type]),
            ((period, "org", "acme"), ORG_LIMIT)]
    return out


def month_start(when: dt.datetime) -> dt.datetime:
    """The start (UTC) of the New York month ``when`` falls in."""
    local = when.astimezone(NY)
    return dt.datetime(local.year, local.month, 1, tzinfo=NY).astimezone(dt.UTC)


def next_month_start(when: dt.datetime) -> dt.datetime:
    """The start (UTC) of the New York month after the one ``when`` falls in."""
    local = when.astimezone(NY)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return dt.datetime(year, month, 1, tzinfo=NY).astimezone(dt.UTC)


@dataclasses.dataclass
class Entry:
    """What the model knows about one request id."""

    auth: Request | None = None
    answer: Any = None  # the first AuthorizeResult
    state: str = "new"  # reserved, allowed, denied, released, expired, settled
    amount: int = 0
    keys: list[Key] = dataclasses.field(default_factory=list)
    deadline: int = 0
    rec: Request | None = None
    cost: int = 0


class LedgerMachine(RuleBasedStateMachine):
    """The real ledger next to a dict of what every counter must be."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-model-"))
        self.clock = FakeClock()
        self.ledger = self._open()
        self.counters: dict[Key, list[int]] = {}
        self.overrun: Counter[Key] = Counter()  # allowed excess over a limit, per key
        self.limits: dict[Key, int | None] = {}
        self.ids: dict[str, Entry] = {}
        self.settled: dict[str, tuple[int, list[Key]]] = {}  # id -> cost, keys charged
        self.next_id = 0

    def _open(self) -> Ledger:
        return Ledger(self.dir, map_size=64 << 20, reservation_ttl=TTL, clock=self.clock,
                      durable=False)

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ model helpers
    def _fresh_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def _counter(self, key: Key) -> list[int]:
        return self.counters.setdefault(key, [0, 0, 0])

    def _pick(self, index: int, want: Any) -> str | None:
        candidates = sorted(rid for rid, e in self.ids.items() if want(e))
        return candidates[index % len(candidates)] if candidates else None

    def _drop(self, entry: Entry, state: str) -> None:
        for key in entry.keys:
            self._counter(key)[1] -= entry.amount
        entry.state = state

    # ------------------------------------------------------------ authorize
    @rule(user=users, inp=tokens_in, out=tokens_out, clamp=st.booleans())
    def authorize(self, user: str, inp: int, out: int, clamp: bool) -> None:
        """A new Authorize: allowed and reserved iff every level has room (or it clamps)."""
        rid = self._fresh_id()
        req = make_req(rid, user, inp=inp, out=out, at=self.clock.now(), allow_clamp=clamp)
        levels = scopes(user, req.at)
        for key, limit in levels:
            self.limits[key] = limit
        before = snapshot(self.ledger, "counters", "expiry", "journal")
        result = self.ledger.authorize(POLICY, req)
        worst = cost(inp, out)
        fits = all(limit is None or sum(self._counter(k)[:2]) + worst <= limit
                   for k, limit in levels)
        amount, max_out = (worst, None) if fits else self._clamp(levels, inp, out, clamp)
        allowed = fits or max_out is not None
        assert result.allowed == allowed, (result, levels)
        assert result.max_output_tokens == max_out
        entry = Entry(auth=req, answer=result)
        self.ids[rid] = entry
        if not allowed:
            assert result.reserved == 0
            assert snapshot(self.ledger, "counters", "expiry", "journal") == before
            entry.state = "denied"
            return
        assert result.reserved == amount
        if amount == 0:
            entry.state = "allowed"
            return
        entry.state, entry.amount = "reserved", amount
        entry.keys = [k for k, _ in levels]
        entry.deadline = self.clock.mono + int(TTL * 1e9)
        for key in entry.keys:
            self._counter(key)[1] += amount

    def _clamp(self, levels: list[tuple[Key, int | None]], inp: int, out: int,
               clamp: bool) -> tuple[int, int | None]:
        """What allow_clamp admits: the most output tokens that fit every level."""
        if not clamp:
            return 0, None
        headroom = min(limit - sum(self._counter(k)[:2]) for k, limit in levels
                       if limit is not None)
        budget = headroom - inp * 1_000
        if headroom <= 0 or out <= 1 or budget < 2_000:
            return 0, None
        tokens = min(budget // 2_000, out - 1)
        return cost(inp, tokens), tokens

    @precondition(lambda self: self.ids)
    @rule(index=pick)
    def authorize_retry(self, index: int) -> None:
        """The same Authorize again: the stored answer, nothing changes."""
        rid = self._pick(index, lambda e: e.auth is not None)
        if rid is None:
            return
        entry = self.ids[rid]
        assert entry.auth is not None
        before = snapshot(self.ledger)
        again = self.ledger.authorize(POLICY, entry.auth)
        assert again == dataclasses.replace(entry.answer, replayed=True)
        assert snapshot(self.ledger) == before

    @precondition(lambda self: self.ids)
    @rule(index=pick, extra=st.integers(1, 5))
    def authorize_conflict(self, index: int, extra: int) -> None:
        """A used id with another payload: Conflict, nothing changes."""
        rid = self._pick(index, lambda e: True)
        assert rid is not None
        entry = self.ids[rid]
        base = entry.auth or entry.rec
        assert base is not None
        other = dataclasses.replace(base, usage=dataclasses.replace(
            base.usage, output_tokens=base.usage.output_tokens + extra))
        before = snapshot(self.ledger)
        try:
            self.ledger.authorize(POLICY, other)
        except Conflict:
            pass
        else:
            raise AssertionError(f"{rid} re-authorized with another payload")
        assert snapshot(self.ledger) == before

    # ------------------------------------------------------------ record
    @rule(index=pick, user=users, inp=tokens_in, out=tokens_out, fresh=st.booleans(),
          late=st.booleans())
    def record(self, index: int, user: str, inp: int, out: int, fresh: bool,
               late: bool) -> None:
        """Record actual usage: settles any reservation, charges the attributed period."""
        rid = None if fresh else self._pick(index, lambda e: e.rec is None)
        if rid is None:
            rid = self._fresh_id()
            self.ids[rid] = Entry()
        entry = self.ids[rid]
        if entry.auth is not None:
            user = entry.auth.user
        now = self.clock.now()
        # Late usage: the last minute of the month before the current one.
        at = month_start(now) - dt.timedelta(minutes=1) if late else now
        req = make_req(rid, user, inp=inp, out=out, at=at)
        result = self.ledger.record(POLICY, req)

        charged_at, is_late = at, month_of(at) < month_of(now)
        if is_late and now >= next_month_start(at) + GRACE:
            charged_at = now
        amount = cost(inp, out)
        assert (result.cost, result.late, result.duplicate) == (amount, is_late, False)
        assert result.period == month_of(charged_at)

        released = set(entry.keys) if entry.state == "reserved" else set()
        if entry.state == "reserved":
            self._drop(entry, "settled")
        keys = []
        for key, limit in scopes(user, charged_at):
            self.limits[key] = limit
            counter = self._counter(key)
            counter[0] += amount
            counter[2] += 1
            # Usage beyond what this id still held at a level may push it over its limit.
            self.overrun[key] += max(0, amount - (entry.amount if key in released else 0))
            keys.append(key)
        entry.state, entry.rec, entry.cost = "settled", req, amount
        self.settled[rid] = (amount, keys)

    @precondition(lambda self: self.settled)
    @rule(index=pick)
    def record_retry(self, index: int) -> None:
        """The same Record again: duplicate=True, the first cost, nothing changes."""
        rid = self._pick(index, lambda e: e.rec is not None)
        assert rid is not None
        entry = self.ids[rid]
        assert entry.rec is not None
        before = snapshot(self.ledger)
        again = self.ledger.record(POLICY, entry.rec)
        assert (again.duplicate, again.cost) == (True, entry.cost)
        assert snapshot(self.ledger) == before

    @precondition(lambda self: self.settled)
    @rule(index=pick)
    def record_conflict(self, index: int) -> None:
        """A settled id recorded with other usage: Conflict, nothing changes."""
        rid = self._pick(index, lambda e: e.rec is not None)
        assert rid is not None
        rec = self.ids[rid].rec
        assert rec is not None
        other = dataclasses.replace(rec, usage=dataclasses.replace(
            rec.usage, input_tokens=rec.usage.input_tokens + 1))
        before = snapshot(self.ledger)
        try:
            self.ledger.record(POLICY, other)
        except Conflict:
            pass
        else:
            raise AssertionError(f"{rid} re-recorded with another payload")
        assert snapshot(self.ledger) == before

    # ------------------------------------------------------------ release, expiry, time
    @precondition(lambda self: self.ids)
    @rule(index=pick)
    def release(self, index: int) -> None:
        """Release is True only for a live, unexpired reservation; either way it is returned."""
        rid = self._pick(index, lambda e: True)
        assert rid is not None
        entry = self.ids[rid]
        live = entry.state == "reserved"
        unexpired = live and self.clock.mono < entry.deadline
        assert self.ledger.release(rid) is unexpired
        if live:
            self._drop(entry, "released" if unexpired else "expired")

    @rule()
    def reap(self) -> None:
        """reap() returns exactly the reservations whose monotonic deadline has passed."""
        due = [e for e in self.ids.values()
               if e.state == "reserved" and e.deadline <= self.clock.mono]
        assert self.ledger.reap() == len(due)
        for entry in due:
            self._drop(entry, "expired")

    @rule(seconds=st.sampled_from([0.5, 10.0, TTL - 0.001, TTL, 2 * TTL]))
    def advance_monotonic(self, seconds: float) -> None:
        self.clock.advance_mono(seconds)

    @rule(hours=st.integers(-2, 30))
    def move_wall(self, hours: int) -> None:
        """The wall clock moves alone (NTP steps, or a long idle day)."""
        self.clock.jump_wall(dt.timedelta(hours=hours))

    @rule(minutes=st.integers(0, 6 * 24 * 60))
    def into_next_month(self, minutes: int) -> None:
        """Wall time jumps to some minute of the next month's first days (New York)."""
        self.clock.wall = next_month_start(self.clock.wall) + dt.timedelta(minutes=minutes)

    @rule()
    def reopen(self) -> None:
        """Close and reopen the environment: everything persists."""
        self.ledger.close()
        self.ledger = self._open()

    # ------------------------------------------------------------ invariants
    @invariant()
    def counters_match_the_model(self) -> None:
        real = counters(self.ledger)
        for key in set(real) | set(self.counters):
            assert real.get(key, (0, 0, 0)) == tuple(self.counters.get(key, (0, 0, 0))), key

    @invariant()
    def no_level_over_its_limit_beyond_recorded_overruns(self) -> None:
        for key, (spent, reserved, _) in self.counters.items():
            limit = self.limits.get(key)
            assert reserved >= 0, key
            if limit is not None:
                assert spent + reserved <= limit + self.overrun[key], key

    @invariant()
    def spent_is_the_sum_of_settled_costs_and_ids_settle_once(self) -> None:
        entries = [entry for _, entry in journal(self.ledger)]
        assert all(n == 1 for n in Counter(e["id"] for e in entries).values())
        assert {e["id"]: e["nanos"] for e in entries} == {
            rid: amount for rid, (amount, _) in self.settled.items()}
        spent: Counter[Key] = Counter()
        for amount, keys in self.settled.values():
            for key in keys:
                spent[key] += amount
        real = counters(self.ledger)
        for key in set(real) | set(spent):
            assert real.get(key, (0, 0, 0))[0] == spent[key], key

    @invariant()
    def outstanding_counts_live_reservations(self) -> None:
        live = sum(e.state == "reserved" for e in self.ids.values())
        assert self.ledger.outstanding() == live


LedgerMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLedgerModel = LedgerMachine.TestCase
