"""SPEC §1 and §4 end to end: the business rules through a real sidecar over gRPC.

Policy: ``policy/limits.spend`` (flat-10 costs $10 / MTok, so 100,000 tokens
= $1). Requests carry a fixed ``at`` in March 2031 so periods and days do not
depend on today. Each test uses users (or an org) no other test charges.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from _server_support import (
    AT,
    PERIOD,
    Server,
    authorize_request,
    copy_policy,
    new_id,
    record_request,
    serve_args,
    start_server,
    tokens,
    usd,
    user_line,
    wait_until,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

Stub = pb_grpc.SpendKeeperStub


def usage(stub: Stub, org: str, user: str = "") -> pb.GetUsageResponse:
    return stub.GetUsage(pb.GetUsageRequest(org=org, period=PERIOD, user=user), timeout=10)


def snapshot(stub: Stub, org: str) -> bytes:
    """Every figure GetUsage reports for ``org`` in the test period, as comparable bytes."""
    return usage(stub, org).SerializeToString(deterministic=True)


def levels(resp: pb.AuthorizeResponse | pb.RecordResponse) -> dict[str, pb.Level]:
    return {lv.level: lv for lv in resp.levels}


def fresh_user() -> str:
    """An id the policy does not list: acme makes it a chat member with the $10 default."""
    return f"u-{new_id()[:12]}@acme.com"


# ------------------------------------------------------------------ allow and deny
def test_request_within_every_limit_is_allowed_and_reserves_its_worst_case(stub: Stub) -> None:
    """ALLOW/WITHIN_LIMITS; the worst case is reserved at user, type and org level."""
    before = usage(stub, "acme")
    resp = stub.Authorize(authorize_request("acme", "alice", "1.50", product="claude_code"),
                          timeout=10)
    assert (resp.decision, resp.reason) == (pb.ALLOW, pb.WITHIN_LIMITS)
    assert usd(resp.reserved) == usd(resp.worst_case_cost) == Decimal("1.50")
    assert resp.period == PERIOD
    assert resp.resets_at.ToDatetime(dt.UTC) == dt.datetime(2031, 4, 1, tzinfo=dt.UTC)
    assert resp.HasField("reservation_expires_at")
    lv = levels(resp)
    assert list(lv) == ["user", "user_type", "org"]
    assert (lv["user"].scope, usd(lv["user"].limit)) == ("acme/alice", Decimal(20))
    assert usd(lv["user"].reserved) == Decimal("1.50")
    assert usd(lv["user"].remaining) == Decimal("18.50")
    after = usage(stub, "acme")
    assert usd(after.org.reserved) - usd(before.org.reserved) == Decimal("1.50")
    alice = user_line(after, "alice")
    assert alice is not None
    assert usd(alice.reserved) == Decimal("1.50")
    assert alice.user_type == "chat_code"


@pytest.mark.parametrize(("user", "reason", "failing"), [
    pytest.param("ann", pb.USER_LIMIT, "user", id="user-type-and-org-all-fail"),
    pytest.param("ben", pb.USER_TYPE_LIMIT, "user_type", id="type-and-org-fail"),
    pytest.param("cal", pb.ORG_LIMIT, "org", id="only-org-fails"),
])
def test_deny_names_the_narrowest_failing_level_and_changes_nothing(
        stub: Stub, user: str, reason: int, failing: str) -> None:
    """$9 against user $3 / chat type $5 / org $8: the narrowest failing level is the reason."""
    before = snapshot(stub, "tiers")
    resp = stub.Authorize(authorize_request("tiers", user, "9", product="chat"), timeout=10)
    assert (resp.decision, resp.reason) == (pb.DENY, reason)
    assert resp.message.startswith(f"{failing} limit of ")
    assert "this request $9.00" in resp.message
    assert usd(resp.reserved) == 0
    assert usd(resp.worst_case_cost) == 9
    assert snapshot(stub, "tiers") == before


def test_reservations_count_against_the_limit(stub: Stub) -> None:
    """$6 reserved of a $10 user limit: a further $5 is USER_LIMIT, a further $4 fits."""
    user = fresh_user()
    first = stub.Authorize(authorize_request("acme", user, "6"), timeout=10)
    assert first.decision == pb.ALLOW
    over = stub.Authorize(authorize_request("acme", user, "5"), timeout=10)
    assert (over.decision, over.reason) == (pb.DENY, pb.USER_LIMIT)
    assert "reserved $6.00" in over.message
    exact = stub.Authorize(authorize_request("acme", user, "4"), timeout=10)
    assert (exact.decision, exact.reason) == (pb.ALLOW, pb.WITHIN_LIMITS)
    assert usd(levels(exact)["user"].remaining) == 0


def test_unlisted_user_gets_the_default_type_and_default_limit(stub: Stub) -> None:
    """acme's default user_type chat and default user limit $10 apply to unlisted users."""
    user = fresh_user()
    allowed = stub.Authorize(authorize_request("acme", user, "1", product="chat"), timeout=10)
    assert allowed.decision == pb.ALLOW
    assert usd(levels(allowed)["user"].limit) == 10
    assert levels(allowed)["user_type"].scope == "acme/chat"
    line = user_line(usage(stub, "acme", user), user)
    assert line is not None
    assert (line.user_type, usd(line.limit), usd(line.reserved)) == ("chat", 10, 1)


def test_daily_limit_is_a_window_on_top_of_the_monthly_one(stub: Stub) -> None:
    """carol ($100 / month, $2 / day): $3 is USER_LIMIT (user_day); $1.50 fits today, and
    a second $1.50 only tomorrow."""
    big = stub.Authorize(authorize_request("acme", "carol", "3", product="claude_code"),
                         timeout=10)
    assert (big.decision, big.reason) == (pb.DENY, pb.USER_LIMIT)
    assert big.message.startswith("user_day limit of acme/carol 2031-03-10 exceeded")
    assert [lv.level for lv in big.levels] == ["user_day", "user", "user_type", "org"]
    today = stub.Authorize(authorize_request("acme", "carol", "1.50", product="claude_code"),
                           timeout=10)
    assert today.decision == pb.ALLOW
    again = stub.Authorize(authorize_request("acme", "carol", "1.50", product="claude_code"),
                           timeout=10)
    assert (again.decision, again.reason) == (pb.DENY, pb.USER_LIMIT)
    tomorrow = stub.Authorize(authorize_request("acme", "carol", "1.50", product="claude_code",
                                                at=AT + dt.timedelta(days=1)), timeout=10)
    assert tomorrow.decision == pb.ALLOW


# ------------------------------------------------------------------ decision paths
@pytest.mark.parametrize(("org", "user", "product", "model", "reason", "message"), [
    pytest.param("acme", "bob", "claude_code", "flat-10", pb.PRODUCT_NOT_ENTITLED,
                 'user type "chat" does not include product "claude_code"',
                 id="chat-member-asks-claude-code"),
    pytest.param("acme", "alice", "image_generation", "flat-10", pb.PRODUCT_NOT_ENTITLED,
                 'does not include product "image_generation"', id="product-no-type-lists"),
    pytest.param("nosuch", "alice", "chat", "flat-10", pb.UNKNOWN_ORG, 'unknown org "nosuch"',
                 id="unknown-org"),
    pytest.param("closed", "stranger", "chat", "flat-10", pb.UNKNOWN_USER,
                 'user "stranger" is not a member of org "closed"',
                 id="unlisted-user-without-default-type"),
    pytest.param("acme", "alice", "chat", "gpt-9", pb.UNKNOWN_MODEL,
                 'model "gpt-9" is not in rate table "flat"', id="unknown-model"),
])
def test_each_decision_path_denies_with_its_reason_and_changes_nothing(
        stub: Stub, org: str, user: str, product: str, model: str, reason: int,
        message: str) -> None:
    """SPEC §1/§4 deny reasons: an OK answer with DENY and the reason, no counter moved."""
    before = snapshot(stub, "acme"), snapshot(stub, "closed")
    resp = stub.Authorize(authorize_request(org, user, "1", product=product, model=model),
                          timeout=10)
    assert (resp.decision, resp.reason) == (pb.DENY, reason)
    assert message in resp.message
    assert usd(resp.reserved) == 0
    assert (snapshot(stub, "acme"), snapshot(stub, "closed")) == before


def test_chat_code_member_may_use_claude_code(stub: Stub) -> None:
    """The same product bob (chat) is refused is allowed to alice (chat_code)."""
    resp = stub.Authorize(authorize_request("acme", "alice", "0.01", product="claude_code"),
                          timeout=10)
    assert (resp.decision, resp.reason) == (pb.ALLOW, pb.WITHIN_LIMITS)


def test_retired_model_is_model_not_allowed_from_its_retirement_date(stub: Stub) -> None:
    """sunset-10 retires 2040-01-01: denied at 00:00 UTC that day, allowed a second before."""
    user = fresh_user()
    retired = stub.Authorize(authorize_request(
        "acme", user, "1", model="sunset-10", at=dt.datetime(2040, 1, 1, tzinfo=dt.UTC)),
        timeout=10)
    assert (retired.decision, retired.reason) == (pb.DENY, pb.MODEL_NOT_ALLOWED)
    assert retired.message == 'model "sunset-10" was retired on 2040-01-01'
    before = stub.Authorize(authorize_request(
        "acme", user, "1", model="sunset-10",
        at=dt.datetime(2039, 12, 31, 23, 59, 59, tzinfo=dt.UTC)), timeout=10)
    assert (before.decision, before.reason) == (pb.ALLOW, pb.WITHIN_LIMITS)


# ------------------------------------------------------------------ idempotency
def test_repeated_authorize_returns_the_first_answer_and_reserves_once(stub: Stub) -> None:
    """The same request_id and payload twice: identical answers, $2 reserved (not $4)."""
    user = fresh_user()
    request = authorize_request("acme", user, "2")
    first = stub.Authorize(request, timeout=10)
    second = stub.Authorize(request, timeout=10)
    assert first.decision == pb.ALLOW
    assert second == first
    line = user_line(usage(stub, "acme", user), user)
    assert line is not None
    assert usd(line.reserved) == 2


def test_record_settles_the_reservation_and_a_repeat_is_a_duplicate(stub: Stub) -> None:
    """Record charges the actual cost, frees the reservation; a repeat answers duplicate=true."""
    user = fresh_user()
    rid = new_id()
    auth = stub.Authorize(authorize_request("acme", user, "2", request_id=rid), timeout=10)
    assert auth.decision == pb.ALLOW
    record = record_request("acme", user, "0.40", request_id=rid)
    first = stub.Record(record, timeout=10)
    assert (usd(first.cost), first.duplicate, first.priced) == (Decimal("0.40"), False, True)
    assert usd(levels(first)["user"].spent) == Decimal("0.40")
    assert usd(levels(first)["user"].reserved) == 0
    after_first = snapshot(stub, "acme")
    again = stub.Record(record, timeout=10)
    assert again.duplicate is True
    assert usd(again.cost) == Decimal("0.40")
    assert list(again.levels) == list(first.levels)
    assert snapshot(stub, "acme") == after_first
    line = user_line(usage(stub, "acme", user), user)
    assert line is not None
    assert (usd(line.spent), usd(line.reserved), line.requests) == (Decimal("0.40"), 0, 1)


def test_record_without_authorize_is_charged(stub: Stub) -> None:
    """Usage that happened is recorded even when no Authorize preceded it."""
    user = fresh_user()
    resp = stub.Record(record_request("acme", user, "0.25"), timeout=10)
    assert (usd(resp.cost), resp.duplicate) == (Decimal("0.25"), False)
    line = user_line(usage(stub, "acme", user), user)
    assert line is not None
    assert usd(line.spent) == Decimal("0.25")


def test_record_of_an_unknown_model_is_stored_unpriced(stub: Stub) -> None:
    """Usage of a model the table lacks is kept (priced=false, $0) and counted as a request."""
    user = fresh_user()
    resp = stub.Record(record_request("acme", user, "1", model="gpt-9"), timeout=10)
    assert (resp.priced, usd(resp.cost), resp.duplicate) == (False, 0, False)
    line = user_line(usage(stub, "acme", user), user)
    assert line is not None
    assert line.requests == 1


def test_same_request_id_with_another_payload_is_failed_precondition(stub: Stub) -> None:
    """Authorize and Record: a reused id with a different payload is refused, nothing changes."""
    user = fresh_user()
    rid = new_id()
    stub.Authorize(authorize_request("acme", user, "1", request_id=rid), timeout=10)
    rec = new_id()
    stub.Record(record_request("acme", user, "0.10", request_id=rec), timeout=10)
    before = snapshot(stub, "acme")
    with pytest.raises(grpc.RpcError) as auth_err:
        stub.Authorize(authorize_request("acme", user, "2", request_id=rid), timeout=10)
    assert auth_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rid in auth_err.value.details()
    with pytest.raises(grpc.RpcError) as rec_err:
        stub.Record(record_request("acme", user, "0.20", request_id=rec), timeout=10)
    assert rec_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rec in rec_err.value.details()
    assert snapshot(stub, "acme") == before


def test_release_returns_the_reservation_once(stub: Stub) -> None:
    """Release drops a live reservation (released=true) once; then and for unknown ids: false."""
    user = fresh_user()
    rid = new_id()
    stub.Authorize(authorize_request("acme", user, "3", request_id=rid), timeout=10)
    held = user_line(usage(stub, "acme", user), user)
    assert held is not None
    assert usd(held.reserved) == 3
    assert stub.Release(pb.ReleaseRequest(request_id=rid), timeout=10).released is True
    freed = user_line(usage(stub, "acme", user), user)
    assert freed is not None
    assert (usd(freed.reserved), usd(freed.spent)) == (0, 0)
    assert stub.Release(pb.ReleaseRequest(request_id=rid), timeout=10).released is False
    assert stub.Release(pb.ReleaseRequest(request_id=new_id()), timeout=10).released is False


def test_allow_clamp_shrinks_max_output_to_fit_the_headroom(stub: Stub) -> None:
    """$5 input + $10 output against a $10 limit: denied, or with allow_clamp 500,000 tokens."""
    user = fresh_user()

    def request(clamp: bool) -> pb.AuthorizeRequest:
        msg = authorize_request("acme", user, "0", allow_clamp=clamp)
        msg.estimate.input_tokens = tokens("5")
        msg.estimate.output_tokens = tokens("10")
        return msg

    denied = stub.Authorize(request(False), timeout=10)
    assert (denied.decision, denied.reason, denied.max_output_tokens) == (pb.DENY,
                                                                         pb.USER_LIMIT, 0)
    clamped = stub.Authorize(request(True), timeout=10)
    assert (clamped.decision, clamped.reason) == (pb.ALLOW, pb.WITHIN_LIMITS)
    assert clamped.max_output_tokens == tokens("5")
    assert usd(clamped.reserved) == 10


def test_clamped_authorize_reports_the_unclamped_worst_case_cost(stub: Stub) -> None:
    """worst_case_cost is "the estimate priced with its maximum output (before any clamp)"."""
    msg = authorize_request("acme", fresh_user(), "0", allow_clamp=True)
    msg.estimate.input_tokens = tokens("5")
    msg.estimate.output_tokens = tokens("10")
    clamped = stub.Authorize(msg, timeout=10)
    assert clamped.max_output_tokens == tokens("5")
    assert usd(clamped.worst_case_cost) == 15


# ------------------------------------------------------------------ expiry
@pytest.fixture
def short_ttl_server(tmp_path: Path) -> Iterator[Server]:
    """A sidecar of its own whose reservations lapse after one second."""
    server = start_server(tmp_path / "run", serve_args(copy_policy(tmp_path / "policy"),
                                                       tmp_path / "data",
                                                       "--reservation-ttl", "1"))
    yield server
    assert server.stop() == 0, server.stderr()


def test_unrecorded_reservation_expires_after_the_ttl_and_a_late_record_is_charged(
        short_ttl_server: Server) -> None:
    """--reservation-ttl 1: the $2 hold returns by itself; Release then finds nothing."""
    stub = short_ttl_server.stub()
    user = fresh_user()
    rid = new_id()
    auth = stub.Authorize(authorize_request("acme", user, "2", request_id=rid), timeout=10)
    assert auth.decision == pb.ALLOW
    assert usd(levels(auth)["org"].reserved) == 2

    def reserved() -> Decimal:
        resp = stub.GetUsage(pb.GetUsageRequest(org="acme", period=PERIOD), timeout=10)
        return usd(resp.org.reserved)

    wait_until(lambda: reserved() == 0, "the reservation to expire")
    assert stub.Release(pb.ReleaseRequest(request_id=rid), timeout=10).released is False
    late = stub.Record(record_request("acme", user, "0.50", request_id=rid), timeout=10)
    assert (usd(late.cost), late.duplicate) == (Decimal("0.50"), False)
    line = user_line(stub.GetUsage(pb.GetUsageRequest(org="acme", period=PERIOD, user=user),
                                   timeout=10), user)
    assert line is not None
    assert (usd(line.spent), usd(line.reserved)) == (Decimal("0.50"), 0)
