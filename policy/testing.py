"""Policy unit tests, the way ``opa test`` works: ``spendkeeper test``.

A test lives beside the policy it checks, in any ``.spend`` file::

    test "alice hits her monthly limit" {
      org "acme"  user "alice@acme.com"  product chat  model "claude-sonnet-4-5"
      at 2026-11-15T10:00:00Z
      usage input 1000 output 4,000 web_search 2
      given user spent $1,999 reserved $1
      expect deny USER_LIMIT cost $0.105
    }

Statements (one of each unless noted):

- ``org``, ``user``, ``product``, ``model``: the request. Required.
- ``at``: when the request is made. Required, so that a test means the same
  thing next month: ``2026-11-15`` (midnight UTC) or a time with a zone
  (``2026-11-15T10:00:00Z``, ``...+01:00``).
- ``usage KEY COUNT ...`` (any number of lines): ``input``, ``output``,
  ``cache_write_5m``, ``cache_write_1h``, ``cache_read`` (tokens),
  ``web_search``, ``web_fetch`` (requests), ``code_execution`` (seconds).
  Counts as in the language: ``1000``, ``4,000``, ``200k``. Default: none.
  As in Authorize, ``output`` is the call's max tokens.
- ``tier standard|batch|priority``, ``speed standard|fast``, ``geo "us"``,
  ``allow_clamp``: as in Authorize.
- ``given LEVEL spent $X [reserved $Y]`` (once per level): the counters of
  the request's own ``org``, ``user_type``, ``user`` or ``user_day`` scope in
  the period of ``at``. Counters not given are zero.
- ``expect allow|deny [REASON] [cost $X] [max_output N]``. Required. ``cost``
  is the worst-case enforcement cost, compared exactly in nano-USD; in a
  shadow-mode org a would-be deny is answered ``allow`` with its reason.

A malformed test (unknown org, missing ``expect``, bad usage key, inexact
money...) is a failing result naming the test and the place, never an
exception: one broken test does not hide the others.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from policy import syntax as s
from policy.decide import REASONS, Decision, Key, Request, decide, scopes_for
from policy.errors import Loc, closest
from policy.model import NANOS_PER_USD, Policy, format_usd
from policy.pricing import SERVICE_TIERS, SPEEDS, Usage

__all__ = [
    "USAGE_KEYS", "TestResult", "describe_decision", "format_usd", "parse_count", "parse_money",
    "parse_time", "run_test", "run_tests",
]

#: ``usage`` keys of a test and the :class:`~policy.pricing.Usage` field each sets.
USAGE_KEYS = {
    "input": "input_tokens", "output": "output_tokens",
    "cache_write_5m": "cache_write_5m_tokens", "cache_write_1h": "cache_write_1h_tokens",
    "cache_read": "cache_read_tokens", "web_search": "web_search_requests",
    "web_fetch": "web_fetch_requests", "code_execution": "code_execution_seconds",
}
_REQUIRED = ("org", "user", "product", "model", "at", "expect")
_REPEATABLE = frozenset({"usage", "given"})
_GIVEN_LEVELS = ("org", "user_type", "user", "user_day")
_SUFFIXES = {"k": 1000, "m": 1_000_000}


@dataclass(frozen=True, slots=True)
class TestResult:
    """The outcome of one policy test."""

    __test__ = False  # not a pytest test class

    name: str
    loc: Loc
    passed: bool
    message: str = ""  # why it failed; empty when it passed
    decision: Decision | None = None  # None when the test was malformed

    @property
    def location(self) -> str:
        """``file:line:col`` of the test."""
        return str(self.loc)


class _Malformed(Exception):
    """A test that cannot be run as written."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


# ---------------------------------------------------------------- values
def parse_count(text: str) -> int:
    """``1000``, ``4,000``, ``200k``, ``1.5m`` to a whole non-negative number."""
    raw = text.strip().replace(",", "")
    mult = _SUFFIXES.get(raw[-1:].lower(), 1)
    if mult != 1:
        raw = raw[:-1]
    try:
        value = Decimal(raw) * mult
    except InvalidOperation:
        raise ValueError(f"not a count: {text!r} (write e.g. 1000, 4,000 or 200k)") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of zero or more")
    return int(value)


def parse_money(text: str) -> int:
    """``$1,999.50`` to nano-USD; it must be a whole number of nano-USD."""
    raw = text.strip().removeprefix("$").replace(",", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r} (write e.g. $5 or $0.105)") from None
    nanos = value * NANOS_PER_USD
    if not value.is_finite() or value < 0 or nanos != nanos.to_integral_value():
        raise ValueError(f"{text} is not a whole number of nano-USD (at most 9 decimals)")
    return int(nanos)


def parse_time(text: str, *, naive_utc: bool = False) -> dt.datetime:
    """``2026-11-15`` (midnight UTC) or an ISO-8601 time to an aware datetime.

    A time without a zone is UTC if ``naive_utc``, else a ValueError: a policy
    test must not depend on where it runs.
    """
    raw = text.strip()
    try:
        if len(raw) == 10:
            day = dt.date.fromisoformat(raw)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"not a valid date or time: {text!r} (write e.g. 2026-11-15 or "
                         "2026-11-15T10:00:00Z)") from None
    if when.tzinfo is None:
        if not naive_utc:
            raise ValueError(f"time {text} has no zone: add Z (UTC) or an offset like +01:00")
        when = when.replace(tzinfo=dt.UTC)
    return when


# ---------------------------------------------------------------- building a case
@dataclass(frozen=True, slots=True)
class _Expect:
    allow: bool
    reason: str | None
    cost: int | None  # nano-USD
    max_output: int | None

    def describe(self) -> str:
        parts = ["allow" if self.allow else "deny"]
        if self.reason is not None:
            parts.append(self.reason)
        if self.cost is not None:
            parts.append(f"cost {format_usd(self.cost)}")
        if self.max_output is not None:
            parts.append(f"max_output {self.max_output:,}")
        return " ".join(parts)


@dataclass(slots=True)
class _Case:
    request: Request
    expect: _Expect
    counters: dict[Key, tuple[int, int]] = field(default_factory=dict)


def _value(fields: dict[str, s.TestField], kind: str) -> str:
    return fields[kind].values[0]


def _choice(fields: dict[str, s.TestField], kind: str, choices: Sequence[str]) -> str:
    if kind not in fields:
        return choices[0]
    value = _value(fields, kind)
    if value not in choices:
        raise _Malformed(fields[kind].loc, f"{kind} must be one of {', '.join(choices)}, "
                         f"not {value!r}")
    return value


def _usage(lines: list[s.TestField]) -> Usage:
    counts: dict[str, int] = {}
    for line in lines:
        pairs = zip(line.values[::2], line.values[1::2], strict=True)
        for key, count in pairs:
            if key not in USAGE_KEYS:
                hint = closest(key, USAGE_KEYS)
                raise _Malformed(line.loc, f"unknown usage key {key!r}" + (
                    f"; did you mean {hint}?" if hint else
                    f"; known: {', '.join(USAGE_KEYS)}"))
            if USAGE_KEYS[key] in counts:
                raise _Malformed(line.loc, f"usage {key} is given twice")
            try:
                counts[USAGE_KEYS[key]] = parse_count(count)
            except ValueError as exc:
                raise _Malformed(line.loc, f"usage {key}: {exc}") from None
    return Usage(**counts)


def _expect(line: s.TestField) -> _Expect:
    values = list(line.values)
    allow = values.pop(0) == "allow"
    reason = None
    if values and values[0] not in ("cost", "max_output"):
        reason = values.pop(0)
        if reason not in REASONS:
            hint = closest(reason, REASONS)
            raise _Malformed(line.loc, f"unknown reason {reason!r}" + (
                f"; did you mean {hint}?" if hint else f"; known: {', '.join(REASONS)}"))
    options = dict(zip(values[::2], values[1::2], strict=True))
    try:
        cost = parse_money(options["cost"]) if "cost" in options else None
        max_output = parse_count(options["max_output"]) if "max_output" in options else None
    except ValueError as exc:
        raise _Malformed(line.loc, f"expect: {exc}") from None
    return _Expect(allow, reason, cost, max_output)


def _fields(node: s.TestNode) -> tuple[dict[str, s.TestField], list[s.TestField],
                                         list[s.TestField]]:
    single: dict[str, s.TestField] = {}
    usage: list[s.TestField] = []
    given: list[s.TestField] = []
    for line in node.body:
        if line.kind == "usage":
            usage.append(line)
        elif line.kind == "given":
            given.append(line)
        elif line.kind in single:
            raise _Malformed(line.loc, f"{line.kind} is given twice (first at "
                             f"{single[line.kind].loc})")
        else:
            single[line.kind] = line
    for kind in _REQUIRED:
        if kind not in single:
            hint = " (e.g. at 2026-11-15T10:00:00Z: a test needs a fixed time)" \
                if kind == "at" else ""
            raise _Malformed(node.loc, f"missing {kind}{hint}")
    return single, usage, given


def _build(policy: Policy, node: s.TestNode) -> _Case:
    fields, usage_lines, given_lines = _fields(node)
    expect = _expect(fields["expect"])
    try:
        at = parse_time(_value(fields, "at"))
    except ValueError as exc:
        raise _Malformed(fields["at"].loc, str(exc)) from None
    org_name = _value(fields, "org")
    request = Request(
        request_id=f"test:{node.name}", org=org_name, user=_value(fields, "user"),
        product=_value(fields, "product"), model=_value(fields, "model"),
        usage=_usage(usage_lines), at=at,
        service_tier=_choice(fields, "tier", SERVICE_TIERS),
        speed=_choice(fields, "speed", SPEEDS),
        geo=_value(fields, "geo") if "geo" in fields else "",
        allow_clamp="allow_clamp" in fields)
    org = policy.orgs.get(org_name)
    if org is None:
        if expect.reason == "UNKNOWN_ORG" and not given_lines:
            return _Case(request, expect)  # a test of the UNKNOWN_ORG answer itself
        hint = closest(org_name, policy.orgs)
        raise _Malformed(fields["org"].loc, f'unknown org "{org_name}"' + (
            f"; did you mean {hint}?" if hint else
            f"; known: {', '.join(sorted(policy.orgs)) or 'none'}"))
    case = _Case(request, expect)
    if given_lines:
        member = org.member(request.user)
        if member is None:
            raise _Malformed(given_lines[0].loc, f'given needs a member: user "{request.user}" '
                             f'is not in org "{org_name}", which has no default user_type')
        scopes = {scope.level: scope for scope in scopes_for(org, member, at)}
        seen: set[str] = set()
        for line in given_lines:
            level = line.values[0]
            if level in seen:
                raise _Malformed(line.loc, f"given {level} appears twice")
            seen.add(level)
            if level not in scopes:
                raise _Malformed(line.loc, f'given user_day: user "{request.user}" has no daily '
                                 "limit, so there is no user_day counter")
            try:
                spent = parse_money(line.values[1])
                reserved = parse_money(line.values[2]) if len(line.values) > 2 else 0
            except ValueError as exc:
                raise _Malformed(line.loc, f"given {level}: {exc}") from None
            case.counters[scopes[level].key] = (spent, reserved)
    return case


# ---------------------------------------------------------------- running
def _cost(decision: Decision) -> int | None:
    """What ``expect ... cost`` compares: the worst case, or the clamped cost reserved."""
    if decision.max_output_tokens is not None:
        return decision.reserve
    return decision.cost.nanos if decision.cost is not None else None


def _got(decision: Decision) -> str:
    verdict = "allow" if decision.allowed else "deny"
    cost = _cost(decision)
    details = [f"cost {format_usd(cost)}" if cost is not None else "not priced"]
    if decision.max_output_tokens is not None:
        details.append(f"max_output {decision.max_output_tokens:,}")
    text = f"{verdict} {decision.reason} ({', '.join(details)})"
    if not decision.allowed or decision.shadow:
        text += f": {decision.message}"
    return text


def _matches(expect: _Expect, decision: Decision) -> bool:
    if decision.allowed != expect.allow:
        return False
    if expect.reason is not None and decision.reason != expect.reason:
        return False
    if expect.cost is not None and _cost(decision) != expect.cost:
        return False
    return expect.max_output is None or decision.max_output_tokens == expect.max_output


def run_test(policy: Policy, node: s.TestNode) -> TestResult:
    """Run one test; every failure, malformed test included, is a result."""
    try:
        case = _build(policy, node)
    except _Malformed as exc:
        return TestResult(node.name, node.loc, False,
                          f'test "{node.name}" at {exc.loc}: {exc.message}')
    counters = case.counters
    try:
        decision = decide(policy, case.request, lambda key: counters.get(key, (0, 0)))
    except Exception as exc:
        return TestResult(node.name, node.loc, False, f'test "{node.name}" at {node.loc}: '
                          f"deciding raised {type(exc).__name__}: {exc}")
    if _matches(case.expect, decision):
        return TestResult(node.name, node.loc, True, "", decision)
    return TestResult(node.name, node.loc, False,
                      f"expected {case.expect.describe()}, got {_got(decision)}", decision)


def run_tests(policy: Policy) -> list[TestResult]:
    """Run every test of ``policy`` in source order."""
    return [run_test(policy, node) for node in policy.tests if isinstance(node, s.TestNode)]


def describe_decision(decision: Decision) -> str:
    """One line for verbose output: ``allow WITHIN_LIMITS (cost $0.105)``."""
    return _got(decision)

