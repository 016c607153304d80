"""Time through the server: reservation expiry, late Records, month rollover, clock jumps.

The reservation TTL runs on the monotonic clock; ``at`` (the request's wall
time) only picks the period. Requests carry explicit ``at`` values, so a
wall-clock jump is simply an ``at`` an hour off the server's clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import grpc
import pytest
from _rel_support import (
    AT,
    Server,
    authorize_msg,
    copy_policy,
    nanos,
    record_msg,
    report,
    serve_args,
    start_server,
    usage_figures,
    usd_tokens,
    wait_until,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

TTL = 4.0
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def short_ttl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sidecar whose reservations lapse after 4 s (monotonic)."""
    root = tmp_path_factory.mktemp("ttl")
    server = start_server(root / "run", serve_args(copy_policy(root / "policy"), root / "data",
                                                   "--reservation-ttl", str(TTL)))
    yield server
    assert server.stop() == 0, server.stderr()


def _expires(resp: pb.AuthorizeResponse) -> dt.datetime:
    return resp.reservation_expires_at.ToDatetime(tzinfo=dt.UTC)


def _reserved(stub: pb_grpc.SpendKeeperStub, org: str, scope: str, period: str) -> int:
    return usage_figures(stub, org, period).get(scope, (0, 0, 0))[1]


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["wall-1h", "wall+1h"])
def test_clock_jumps_neither_expire_reservations_early_nor_late(short_ttl: Server,
                                                                offset: dt.timedelta) -> None:
    """``at`` an hour off the server's clock: the hold lapses TTL after the call (monotonic),
    not TTL after ``at`` — still live right after the call, gone once the TTL has run."""
    stub = short_ttl.stub()
    user = f"jump{int(offset.total_seconds())}"
    before = dt.datetime.now(dt.UTC)
    held = stub.Authorize(authorize_msg(f"{user}-held", "open", user, 1000,
                                        at=before + offset), timeout=10)
    after = dt.datetime.now(dt.UTC)
    assert held.decision == pb.ALLOW
    ttl = dt.timedelta(seconds=TTL)
    # The deadline is the server's now + TTL, whatever ``at`` says (1 s slack for rounding).
    assert before + ttl - dt.timedelta(seconds=1) <= _expires(held) <= after + ttl + \
        dt.timedelta(seconds=1), (before, _expires(held), after)
    assert stub.Authorize(authorize_msg(f"{user}-rel", "open", user, 1000,
                                        at=before + offset), timeout=10).decision == pb.ALLOW
    # Not expired early: a Release right away finds the hold live.
    assert stub.Release(pb.ReleaseRequest(request_id=f"{user}-rel"), timeout=10).released
    period = held.period
    scope = f"user:{user}"
    assert _reserved(stub, "open", scope, period) == nanos(held.reserved)
    # Not kept late: the reaper returns it once the TTL has run (an hour early for +1h).
    wait_until(lambda: _reserved(stub, "open", scope, period) == 0, "the hold to lapse",
               timeout=60)
    assert not stub.Release(pb.ReleaseRequest(request_id=f"{user}-held"), timeout=10).released
    # A Record arriving after its reservation expired is still charged, once.
    rec = stub.Record(record_msg(f"{user}-held", "open", user, 700, at=before + offset),
                      timeout=10)
    again = stub.Record(record_msg(f"{user}-held", "open", user, 700, at=before + offset),
                        timeout=10)
    assert (nanos(rec.cost), rec.duplicate, again.duplicate) == (7_000_000, False, True)
    line = usage_figures(stub, "open", rec.period)[scope]
    assert line == (7_000_000, 0, 1), line


def test_clock_jumps_do_not_reopen_a_budget(short_ttl: Server) -> None:
    """$6 held of a $10 user budget: $6 more is denied at ``at`` -1 h and +1 h alike; once
    recorded at +1 h the spend still counts at -1 h; only the TTL returns a hold."""
    stub = short_ttl.stub()
    six = usd_tokens("6")
    first = stub.Authorize(authorize_msg("b-1", "kolkata", "budget", six), timeout=10)
    assert first.decision == pb.ALLOW
    for shift in (-HOUR, HOUR, -2 * HOUR, 3 * HOUR):
        resp = stub.Authorize(authorize_msg(f"b-{shift}", "kolkata", "budget", six,
                                            at=AT + shift), timeout=10)
        assert (resp.decision, pb.Reason.Name(resp.reason)) == (pb.DENY, "USER_LIMIT"), shift
    stub.Record(record_msg("b-1", "kolkata", "budget", six, at=AT + HOUR), timeout=10)
    resp = stub.Authorize(authorize_msg("b-after", "kolkata", "budget", six, at=AT - HOUR),
                          timeout=10)
    assert (resp.decision, pb.Reason.Name(resp.reason)) == (pb.DENY, "USER_LIMIT")
    line = usage_figures(stub, "kolkata", first.period)["user:budget"]
    assert line == (6 * 10**9, 0, 1), line


# ------------------------------------------------------------------ month rollover
@pytest.mark.parametrize(("org", "zone"), [("kolkata", "Asia/Kolkata"),
                                      ("la", "America/Los_Angeles")])
def test_month_rolls_over_at_local_midnight_for_requests_spanning_it(
        short_ttl: Server, org: str, zone: str) -> None:
    """Around local midnight Jan 31 -> Feb 1 2031: each side has its own $10 budget; a call
    authorized at 23:59:59 and recorded after midnight leaves nothing held in January and is
    charged once, in February; resets_at is local midnight."""
    stub = short_ttl.stub()
    tz = ZoneInfo(zone)
    midnight = dt.datetime(2031, 2, 1, tzinfo=tz)
    last = midnight - dt.timedelta(microseconds=1)
    user = f"night-{org}"

    def auth(rid: str, usd: str, at: dt.datetime) -> pb.AuthorizeResponse:
        resp: pb.AuthorizeResponse = stub.Authorize(
            authorize_msg(f"{org}-{rid}", org, user, usd_tokens(usd), at=at), timeout=10)
        return resp

    jan = auth("jan", "8", midnight - dt.timedelta(seconds=1))
    feb = auth("feb", "8", midnight + dt.timedelta(seconds=1))
    assert (jan.decision, jan.period, feb.decision, feb.period) == (
        pb.ALLOW, "2031-01", pb.ALLOW, "2031-02")
    assert jan.resets_at.ToDatetime(tzinfo=dt.UTC) == midnight.astimezone(dt.UTC)
    assert auth("jan-late", "3", last).decision == pb.DENY  # 8 + 3 > 10 in January
    assert auth("feb-first", "3", midnight).decision == pb.DENY  # 8 + 3 > 10 in February
    edge = auth("feb-edge", "2", midnight)
    assert (edge.decision, edge.period) == (pb.ALLOW, "2031-02")  # 8 + 2 == 10 fits
    # The January call finishes five seconds into February.
    rec = stub.Record(record_msg(f"{org}-jan", org, user, usd_tokens("8"),
                                 at=midnight + dt.timedelta(seconds=5)), timeout=10)
    assert (rec.period, nanos(rec.cost), rec.late) == ("2031-02", 8 * 10**9, False)
    scope = f"user:{user}"
    assert usage_figures(stub, org, "2031-01")[scope] == (0, 0, 0)  # nothing stuck in January
    assert usage_figures(stub, org, "2031-02")[scope] == (8 * 10**9, 10 * 10**9, 1)
    report(f"rollover {zone}: 23:59:59.999999 -> 2031-01, 00:00:00 -> 2031-02, "
           f"a call spanning midnight charged once to 2031-02")


def test_at_outside_the_accepted_range_is_rejected(short_ttl: Server) -> None:
    """``at`` before 2000 or from 2100 is INVALID_ARGUMENT and changes nothing."""
    stub = short_ttl.stub()
    before = usage_figures(stub, "open")
    for at in (dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
               dt.datetime(2100, 1, 1, tzinfo=dt.UTC)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Authorize(authorize_msg("range", "open", "u", 10, at=at), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert usage_figures(stub, "open") == before

