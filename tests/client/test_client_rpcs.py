"""SpendKeeperClient against a real in-process sidecar: decisions, record, release, guard."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest
from _client_support import MODEL, WORST_1K_1K

from sidecar.client import (
    Denied,
    GuardedCall,
    InvalidRequest,
    RequestConflict,
    SpendKeeperClient,
    SpendKeeperError,
    decimal_to_money,
    money_to_decimal,
)


def _org_figures(client: SpendKeeperClient) -> tuple[Decimal, Decimal]:
    org = client.usage("acme").org
    return money_to_decimal(org.spent), money_to_decimal(org.reserved)


def test_allow_reserves_the_worst_case(client: SpendKeeperClient) -> None:
    """An allowed Authorize reserves the estimate priced with its max output."""
    auth = client.authorize("r1", "acme", "alice@acme.com", "chat", MODEL,
                            input_tokens=1000, max_output_tokens=1000)
    assert auth.allowed
    assert auth.reason == "WITHIN_LIMITS"
    assert auth.reserved == WORST_1K_1K
    assert isinstance(auth.reserved, Decimal)
    assert auth.max_output_tokens is None
    assert not auth.fail_open
    assert auth.policy_version
    assert auth.raw is not None
    assert _org_figures(client) == (Decimal(0), WORST_1K_1K)


def test_deny_names_the_reason_and_reserves_nothing(client: SpendKeeperClient) -> None:
    """A denied Authorize is a decision (no exception) and changes no counter."""
    auth = client.authorize("r1", "acme", "carol@acme.com", "chat", MODEL,
                            input_tokens=1000, max_output_tokens=100_000)
    assert not auth.allowed
    assert auth.reason == "USER_LIMIT"
    assert auth.message
    assert auth.reserved == 0
    assert _org_figures(client) == (Decimal(0), Decimal(0))
    unknown = client.authorize("r2", "nope", "x", "chat", MODEL, max_output_tokens=10)
    assert (unknown.allowed, unknown.reason) == (False, "UNKNOWN_ORG")


def test_clamp_returns_a_smaller_output_cap(client: SpendKeeperClient) -> None:
    """With allow_clamp a request that does not fit is allowed with fewer output tokens."""
    auth = client.authorize("r1", "acme", "carol@acme.com", "chat", MODEL,
                            input_tokens=1000, max_output_tokens=100_000, allow_clamp=True)
    assert auth.allowed
    assert auth.max_output_tokens is not None
    assert 0 < auth.max_output_tokens < 100_000
    assert auth.reserved <= Decimal(1)


def test_record_settles_and_a_duplicate_changes_nothing(client: SpendKeeperClient) -> None:
    """Record charges the actual cost; the same Record again answers duplicate=True."""
    client.authorize("r1", "acme", "alice@acme.com", "chat", MODEL,
                     input_tokens=1000, max_output_tokens=1000)
    first = client.record("r1", "acme", "alice@acme.com", "chat", MODEL,
                          input_tokens=1000, output_tokens=100)
    assert (first.cost, first.duplicate, first.priced) == (Decimal("0.0045"), False, True)
    again = client.record("r1", "acme", "alice@acme.com", "chat", MODEL,
                          input_tokens=1000, output_tokens=100)
    assert (again.cost, again.duplicate) == (Decimal("0.0045"), True)
    assert _org_figures(client) == (Decimal("0.0045"), Decimal(0))


def test_release_drops_the_reservation_once(client: SpendKeeperClient) -> None:
    """Release returns the reservation; a second Release finds nothing to drop."""
    client.authorize("r1", "acme", "bob", "chat", MODEL, input_tokens=1000,
                     max_output_tokens=1000)
    assert client.release("r1") is True
    assert client.release("r1") is False
    assert _org_figures(client) == (Decimal(0), Decimal(0))


def test_usage_lines_per_user(client: SpendKeeperClient) -> None:
    """usage() returns the raw GetUsageResponse, optionally for one user."""
    client.record("r1", "acme", "bob", "chat", MODEL, input_tokens=1_000_000)
    report = client.usage("acme", user="bob")
    assert [u.scope for u in report.users] == ["bob"]
    assert money_to_decimal(report.users[0].spent) == Decimal(3)
    assert report.period


def test_invalid_argument_is_raised(client: SpendKeeperClient) -> None:
    """INVALID_ARGUMENT raises InvalidRequest (a ValueError) with the server's message."""
    with pytest.raises(InvalidRequest, match="negative") as info:
        client.authorize("r1", "acme", "bob", "chat", MODEL, input_tokens=-1,
                         max_output_tokens=10)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidRequest, match="service_tier"):
        client.authorize("r1", "acme", "bob", "chat", MODEL, max_output_tokens=1,
                         service_tier="cheap")


def test_reused_id_with_another_payload_conflicts(client: SpendKeeperClient) -> None:
    """The same request_id with a different payload raises RequestConflict."""
    client.authorize("r1", "acme", "bob", "chat", MODEL, max_output_tokens=10)
    with pytest.raises(RequestConflict):
        client.authorize("r1", "acme", "bob", "chat", MODEL, max_output_tokens=11)


def test_other_status_codes_raise_spendkeeper_error(client: SpendKeeperClient) -> None:
    """A status that is neither retryable nor mapped (NOT_FOUND) raises SpendKeeperError."""
    with pytest.raises(SpendKeeperError) as info:
        client.usage("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_guard_records_the_usage_set_in_the_body(client: SpendKeeperClient) -> None:
    """guard() authorizes, yields, then records the usage the body reported."""
    with client.guard("g1", "acme", "alice@acme.com", "chat", MODEL, input_tokens=1000,
                      max_output_tokens=1000) as call:
        assert call.authorization.allowed
        assert call.max_output_tokens == 1000
        call.set_usage(input_tokens=1000, output_tokens=100)
    assert call.recorded is not None
    assert call.recorded.cost == Decimal("0.0045")
    assert _org_figures(client) == (Decimal("0.0045"), Decimal(0))


def test_guard_without_usage_records_the_worst_case(client: SpendKeeperClient) -> None:
    """A body that reports no usage is charged the worst case, never nothing."""
    with client.guard("g1", "acme", "bob", "chat", MODEL, input_tokens=1000,
                      max_output_tokens=1000):
        pass
    assert _org_figures(client) == (WORST_1K_1K, Decimal(0))


def test_guard_releases_when_the_body_raises(client: SpendKeeperClient) -> None:
    """A body that fails before any usage releases the reservation and re-raises."""
    with pytest.raises(RuntimeError, match="model down"), \
            client.guard("g1", "acme", "bob", "chat", MODEL, max_output_tokens=1000):
        raise RuntimeError("model down")
    assert _org_figures(client) == (Decimal(0), Decimal(0))


def test_guard_records_partial_usage_when_the_body_raises(client: SpendKeeperClient) -> None:
    """Usage reported before a failure (e.g. a broken stream) is still charged."""
    def broken_stream(call: GuardedCall) -> None:
        call.set_usage(input_tokens=1_000_000)
        raise RuntimeError("stream cut")

    with pytest.raises(RuntimeError), \
            client.guard("g1", "acme", "bob", "chat", MODEL, max_output_tokens=1000) as call:
        broken_stream(call)
    assert _org_figures(client) == (Decimal(3), Decimal(0))


def test_guard_raises_denied_before_the_body(client: SpendKeeperClient) -> None:
    """A denied guard() never runs its body."""
    ran = False
    with pytest.raises(Denied) as info, \
            client.guard("g1", "acme", "carol@acme.com", "chat", MODEL,
                         max_output_tokens=100_000):
        ran = True
    assert not ran
    assert info.value.authorization.reason == "USER_LIMIT"


@pytest.mark.parametrize("amount", ["0", "0.000000001", "-1.5", "12345.678901234", "-0.25"])
def test_money_round_trip(amount: str) -> None:
    """Decimal <-> Money conversion is exact to the nano and keeps the sign on both parts."""
    money = decimal_to_money(Decimal(amount))
    assert money_to_decimal(money) == Decimal(amount)
    assert money.units * money.nanos >= 0
    assert money.currency_code == "USD"
