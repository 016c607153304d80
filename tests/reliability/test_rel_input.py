"""Bad input never crashes the server, never changes state, and gets the right status.

Hypothesis builds requests with one to three bad fields (empty, huge,
negative, control characters, invalid UTF-8 as raw bytes, unknown enum
values, impossible timestamps) among otherwise valid ones, and raw random
bytes for every method. "No state change" is checked two ways: GetUsage
figures are byte-identical, and LMDB's last committed transaction id (read
from the data file) has not moved — no write happened at all.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from _rel_support import (
    AT,
    MODEL,
    PERIOD,
    SERVICE,
    Server,
    authorize_msg,
    copy_policy,
    health_status,
    nanos,
    read_ledger,
    report,
    serve_args,
    start_server,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.convert import MAX_ID_BYTES, MAX_SECONDS, MAX_TOKENS, MAX_TOOL_USES
from sidecar.ledger.store import open_env

ID_FIELDS = ("request_id", "org", "user", "product", "model")
USAGE_LIMITS = {"input_tokens": MAX_TOKENS, "output_tokens": MAX_TOKENS,
                "cache_write_5m_tokens": MAX_TOKENS, "cache_write_1h_tokens": MAX_TOKENS,
                "cache_read_tokens": MAX_TOKENS, "web_search_requests": MAX_TOOL_USES,
                "web_fetch_requests": MAX_TOOL_USES, "code_execution_seconds": MAX_SECONDS}
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
FIELD_NUMBERS = {"request_id": 1, "org": 2, "user": 3, "product": 4, "model": 5,
                 "inference_geo": 9}
METHODS = ("Authorize", "Record", "Release", "GetUsage")
FUZZ_ORGS = ("open", "solo")
#: Examples per hypothesis test in the default run and in the soak.
QUICK, SOAK = 150, 3000


@dataclass
class Watched:
    """The bad-input server and what "no state change" is measured by."""

    server: Server
    env: Any
    stub: Any

    def state(self) -> tuple[int, tuple[bytes, ...]]:
        """(LMDB last txn id, GetUsage bytes of the watched orgs this period and the test's)."""
        pages = []
        for org in FUZZ_ORGS:
            for period in (PERIOD, ""):
                resp = self.stub.GetUsage(pb.GetUsageRequest(org=org, period=period),
                                          timeout=30)
                pages.append(resp.SerializeToString(deterministic=True))
        return int(self.env.info()["last_txnid"]), tuple(pages)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """One sidecar (default limits: 64 KiB messages) and a read-only handle on its LMDB."""
    root = tmp_path_factory.mktemp("input")
    server = start_server(root / "run", serve_args(copy_policy(root / "policy"), root / "data"))
    env = open_env(root / "data", 256 << 20, readonly=True)
    try:
        yield Watched(server, env, server.stub())
    finally:
        env.close()
        assert server.stop() == 0, server.stderr()


# ------------------------------------------------------------------ strategies
_chars = st.characters(min_codepoint=0x20, codec="utf-8")  # no surrogates
valid_id = st.one_of(
    st.text(_chars, min_size=1, max_size=40),
    st.sampled_from(["open", "solo", "u", "chat", MODEL, "é" * (MAX_ID_BYTES // 2)]),
).filter(lambda s: 0 < len(s.encode()) <= MAX_ID_BYTES)


@dataclass(frozen=True)
class Raw:
    """A string field sent as these raw bytes (not valid UTF-8)."""

    data: bytes


invalid_utf8 = st.sampled_from([b"\xff", b"\xc3", b"a\x80b", b"\xed\xa0\x80", b"\xf8\x88\x80",
                                b"\xc0\xaf", b"ok\xfe"]).map(Raw)
bad_id = st.one_of(
    st.just(""),
    st.text(_chars, min_size=MAX_ID_BYTES + 1, max_size=MAX_ID_BYTES + 300),
    st.integers(MAX_ID_BYTES // 2 + 1, 4_000).map(lambda n: "é" * n),  # repr < 30 kB
    st.tuples(st.text(_chars, max_size=5), st.characters(max_codepoint=0x1F),
              st.text(_chars, max_size=5)).map("".join),
    invalid_utf8,
)
bad_geo = bad_id.filter(lambda v: v != "")  # empty is the default geography


def bad_count(limit: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-(2**63), -1), st.integers(limit + 1, INT64_MAX),
                     st.sampled_from([-1, limit + 1, INT64_MAX, -(2**63)]))


bad_enum = st.one_of(st.integers(4, INT32_MAX), st.integers(-(2**31), -1))
bad_speed = st.one_of(st.integers(3, INT32_MAX), st.integers(-(2**31), -1))
# (seconds, nanos) of a Timestamp that is impossible or outside [2000, 2100).
bad_at = st.one_of(
    st.tuples(st.integers(946_684_800, 4_102_444_799), st.integers(10**9, INT32_MAX)),
    st.tuples(st.integers(946_684_800, 4_102_444_799), st.integers(-(2**31), -1)),
    st.tuples(st.integers(-(2**63), 946_684_799), st.integers(0, 10**9 - 1)),
    st.tuples(st.integers(4_102_444_800, INT64_MAX), st.integers(0, 10**9 - 1)),
)


@dataclass(frozen=True)
class Case:
    """A request with some bad fields, and the names the error may give."""

    method: str
    values: dict[str, Any]
    bad: frozenset[str]


@st.composite
def bad_requests(draw: st.DrawFn, method: str) -> Case:
    """An Authorize or Record with 1 to 3 bad fields, the others valid."""
    usage = "estimate" if method == "Authorize" else "usage"
    fields = [*ID_FIELDS, "inference_geo", "service_tier", "speed", "at",
              *(f"{usage}.{name}" for name in USAGE_LIMITS)]
    bad = draw(st.sets(st.sampled_from(fields), min_size=1, max_size=3))
    values: dict[str, Any] = {}
    for name in fields:
        broken = name in bad
        if name in ID_FIELDS:
            values[name] = draw(bad_id if broken else valid_id)
        elif name == "inference_geo":
            values[name] = draw(bad_geo) if broken else ""
        elif name == "service_tier":
            values[name] = draw(bad_enum if broken else st.integers(0, 3))
        elif name == "speed":
            values[name] = draw(bad_speed if broken else st.integers(0, 2))
        elif name == "at":
            values[name] = draw(bad_at) if broken else draw(
                st.sampled_from([None, (int(AT.timestamp()), 0)]))
        else:
            limit = USAGE_LIMITS[name.split(".")[1]]
            values[name] = draw(bad_count(limit) if broken else st.integers(0, limit))
    return Case(method, values, frozenset(bad))


def encode(case: Case) -> bytes:
    """The request's wire bytes; invalid UTF-8 strings are appended as raw fields."""
    kind = pb.AuthorizeRequest if case.method == "Authorize" else pb.RecordRequest
    msg = kind()
    raw = b""
    for name, value in case.values.items():
        if isinstance(value, Raw):
            raw += _field(FIELD_NUMBERS[name], value.data)
        elif name == "at":
            if value is not None:
                msg.at.seconds, msg.at.nanos = value
        elif "." in name:
            part, sub = name.split(".")
            setattr(getattr(msg, part), sub, value)
        else:
            setattr(msg, name, value)
    return msg.SerializeToString() + raw


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def raw_call(server: Server, method: str) -> Callable[..., bytes]:
    """``method`` with identity serializers: bytes in, bytes out."""
    chan = server.channel()
    call: Callable[..., bytes] = chan.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
    return call


def call_code(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _check_alive(watched: Watched) -> None:
    assert watched.server.alive(), watched.server.stderr()
    chan = watched.server.channel()
    assert health_status(chan) == "SERVING"
    chan.close()


# ------------------------------------------------------------------ the tests
def fuzz_fields(watched: Watched, method: str, examples: int) -> None:
    seen = {"n": 0}
    call = raw_call(watched.server, method)

    @settings(max_examples=examples, suppress_health_check=[HealthCheck.too_slow])
    @given(case=bad_requests(method))
    def check(case: Case) -> None:
        before = watched.state()
        code, details = call_code(lambda: call(encode(case), timeout=30))
        assert code == "INVALID_ARGUMENT", (code, details, case)
        assert any(name in details for name in case.bad), (details, case.bad)
        assert watched.state() == before, f"state changed: {case}"
        seen["n"] += 1

    check()
    _check_alive(watched)
    report(f"bad fields, {method}: {seen['n']} requests, all INVALID_ARGUMENT naming a bad "
           f"field, no write, server alive")


@pytest.mark.parametrize("method", ["Authorize", "Record"])
def test_bad_fields_are_invalid_argument_and_change_nothing(watched: Watched,
                                                            method: str) -> None:
    """Every request field broken in every way: INVALID_ARGUMENT naming a bad field, no write."""
    fuzz_fields(watched, method, QUICK)


@pytest.mark.soak
@pytest.mark.parametrize("method", ["Authorize", "Record"])
def test_bad_fields_soak(watched: Watched, method: str) -> None:
    """The same with 3,000 examples per method."""
    fuzz_fields(watched, method, SOAK)


def fuzz_release(watched: Watched, examples: int) -> None:
    call = raw_call(watched.server, "Release")

    @settings(max_examples=examples, suppress_health_check=[HealthCheck.too_slow])
    @given(request_id=bad_id)
    def check(request_id: str | Raw) -> None:
        before = watched.state()
        body = (_field(1, request_id.data) if isinstance(request_id, Raw)
                else pb.ReleaseRequest(request_id=request_id).SerializeToString())
        code, details = call_code(lambda: call(body, timeout=30))
        assert code == "INVALID_ARGUMENT", (code, details)
        assert "request_id" in details, details
        assert watched.state() == before

    check()
    _check_alive(watched)


def test_release_with_a_bad_id_is_invalid_argument(watched: Watched) -> None:
    """Release with an empty, over-long, control-character or non-UTF-8 id: INVALID_ARGUMENT
    naming request_id, no write."""
    fuzz_release(watched, QUICK // 3)


_period_junk = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.sampled_from([" 2031-03", "+2031-03", "2_031-03", "\uff12\uff10\uff13\uff11-03",
                     "2031-3", "2031-13", "2031-00", "31-03", "2031-03-01", "1969-12",
                     "2031-03 ", "2031-\uff103"]),
)


def fuzz_usage(watched: Watched, examples: int) -> None:
    call = raw_call(watched.server, "GetUsage")

    @settings(max_examples=examples, suppress_health_check=[HealthCheck.too_slow])
    @given(org=st.one_of(st.sampled_from(FUZZ_ORGS), bad_id), period=_period_junk,
           user=st.one_of(st.just(""), valid_id, bad_id),
           page_size=st.one_of(st.integers(0, 2000), st.integers(-(2**31), INT32_MAX)),
           page_token=st.one_of(st.just(""), st.integers(0, 10**10).map(str),
                                st.text(max_size=12)))
    def check(org: Any, period: str, user: Any, page_size: int, page_token: str) -> None:
        before = watched.state()
        msg = pb.GetUsageRequest(period=period, page_size=page_size, page_token=page_token)
        raw = b""
        for name, number, value in (("org", 1, org), ("user", 3, user)):
            if isinstance(value, Raw):
                raw += _field(number, value.data)
            else:
                setattr(msg, name, value)
        code, details = call_code(lambda: call(msg.SerializeToString() + raw, timeout=30))
        canonical = (len(period) == 7 and period[4] == "-" and period.replace("-", "").isascii()
                     and period.replace("-", "").isdigit() and int(period[:4]) >= 1970
                     and 1 <= int(period[5:]) <= 12)
        if code == "OK":  # then every field was acceptable, the period in its one spelling
            assert period == "" or canonical, f"period {period!r} was accepted"
        else:
            assert code in ("INVALID_ARGUMENT", "NOT_FOUND"), (code, details)
        assert watched.state() == before

    check()
    _check_alive(watched)


def test_get_usage_rejects_malformed_fields(watched: Watched) -> None:
    """GetUsage: bad org/user/page fields are INVALID_ARGUMENT (unknown org NOT_FOUND), an
    accepted period is YYYY-MM in ASCII; no write, no crash."""
    fuzz_usage(watched, QUICK)


@pytest.mark.parametrize("period", [" 2031-03", "\t2031-03", "+2031-03", "2_031-03",
                                    "\uff12\uff10\uff13\uff11-03", "2031-\uff103"])
def test_get_usage_refuses_a_non_canonical_period(watched: Watched, period: str) -> None:
    """A period that is not exactly YYYY-MM (ASCII) is INVALID_ARGUMENT: it must not silently
    read an empty month ($0) that a dashboard would take for the real one."""
    code, _ = call_code(lambda: watched.stub.GetUsage(
        pb.GetUsageRequest(org="open", period=period), timeout=30))
    assert code == "INVALID_ARGUMENT", f"period {period!r} answered {code}"


@pytest.mark.soak
def test_get_usage_soak(watched: Watched) -> None:
    """The same with 3,000 examples."""
    fuzz_usage(watched, SOAK)


def fuzz_raw(watched: Watched, examples: int) -> None:
    codes: dict[str, int] = {}
    calls = {method: raw_call(watched.server, method) for method in METHODS}

    @settings(max_examples=examples, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(METHODS), data=st.binary(max_size=2048))
    def check(method: str, data: bytes) -> None:
        before = watched.state()
        code, details = call_code(lambda: calls[method](data, timeout=30))
        codes[code] = codes.get(code, 0) + 1
        assert code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND"), (method, code, details)
        assert watched.state() == before, (method, data)

    check()
    _check_alive(watched)
    report(f"raw bytes: {sum(codes.values())} calls over 4 methods, codes {codes}, no write")


def test_raw_random_bytes_to_every_method(watched: Watched) -> None:
    """Random bytes as a request body: never UNKNOWN/INTERNAL, never a write, never a crash."""
    fuzz_raw(watched, QUICK * 2)


@pytest.mark.soak
def test_raw_random_bytes_soak(watched: Watched) -> None:
    """The same with 6,000 calls."""
    fuzz_raw(watched, SOAK * 2)


@pytest.mark.parametrize("size", [65 * 1024, 4 << 20])
def test_oversized_messages_are_refused(watched: Watched, size: int) -> None:
    """A request over the 64 KiB limit (to every method): RESOURCE_EXHAUSTED or
    INVALID_ARGUMENT, no write, the server still serving."""
    before = watched.state()
    for method in METHODS:
        call = raw_call(watched.server, method)
        huge = _field(1, b"r" * size)  # field 1 is a string on every request type
        code, details = call_code(lambda c=call, h=huge: c(h, timeout=60))  # type: ignore[misc]
        assert code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"), (method, code, details)
        valid = authorize_msg("x" * size, "open", "u", 10).SerializeToString()
        code, details = call_code(lambda c=call, v=valid: c(v, timeout=60))  # type: ignore[misc]
        assert code in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"), (method, code, details)
    assert watched.state() == before
    _check_alive(watched)


# ------------------------------------------------------------------ overload
def test_overload_past_the_concurrency_limit_is_resource_exhausted_and_changes_nothing(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """--max-concurrent-rpcs 4, 64 calls released at once (the server was SIGSTOPped while
    they queued): some are RESOURCE_EXHAUSTED, the rest OK; a refused call left no trace;
    retried with the same id each is charged once; the server lives."""
    data = tmp_path / "data"
    server = start_server(tmp_path / "run", serve_args(policy_dir, data,
                                                       "--max-concurrent-rpcs", "4"))
    servers.append(server)
    stubs = [server.stub() for _ in range(8)]
    for stub in stubs:  # connect every channel before the stall
        stub.GetUsage(pb.GetUsageRequest(org="open"), timeout=30)
    msgs = [authorize_msg(f"burst-{i}", "open", "u", 1000) for i in range(64)]
    server.send(signal.SIGSTOP)
    try:
        futures = [stubs[i % 8].Authorize.future(m, timeout=60) for i, m in enumerate(msgs)]
    finally:
        server.send(signal.SIGCONT)
    codes = [call_code(f.result)[0] for f in futures]
    refused = [m for m, c in zip(msgs, codes, strict=True) if c == "RESOURCE_EXHAUSTED"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert refused, "the burst never exceeded 4 concurrent calls: nothing was tested"
    stub = server.stub()
    ok = codes.count("OK")
    assert _org(stub) == (0, ok * 10_000_000, 0)
    assert server.alive()
    # A refused call never reached the ledger: retried, each is a first Authorize.
    states = read_ledger(data).states
    assert [m.request_id for m in refused if m.request_id in states] == []
    for m in refused:
        assert stub.Authorize(m, timeout=30).decision == pb.ALLOW
    assert _org(stub) == (0, 64 * 10_000_000, 0)
    assert server.stop() == 0
    report(f"overload: 64 concurrent Authorizes at --max-concurrent-rpcs 4: {ok} OK, "
           f"{len(refused)} RESOURCE_EXHAUSTED (no trace; retried once each), server alive")


def _org(stub: Any) -> tuple[int, int, int]:
    resp = stub.GetUsage(pb.GetUsageRequest(org="open", period=PERIOD), timeout=30)
    return nanos(resp.org.spent), nanos(resp.org.reserved), resp.org.requests

