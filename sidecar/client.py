"""A small client for gateways: authorize before a model call, record or release after it.

:class:`SpendKeeperClient` wraps the ``spendkeeper.v1.SpendKeeper`` stub with
what every gateway would otherwise write by hand: a short per-attempt
deadline, bounded retries with jittered backoff that always resend the *same*
``request_id`` (the server is idempotent, so a retry never charges twice), a
fail mode for when the sidecar cannot be reached, ``Decimal`` money and a
:meth:`SpendKeeperClient.guard` context manager (authorize, run the body,
record the usage it reports or release the reservation).

Only transport trouble is retried: ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
``RESOURCE_EXHAUSTED`` and ``CANCELLED`` (what a call gets when the sidecar
shuts down under it; every call is idempotent by request id, so resending is
safe). Bad input (``INVALID_ARGUMENT``, :class:`InvalidRequest`)
and a reused id with another payload (``FAILED_PRECONDITION``,
:class:`RequestConflict`) are raised at once; any other status is raised as
:class:`SpendKeeperError`. Decisions are never exceptions.

A Record must never be dropped: usage that happened has to be charged. When
:meth:`~SpendKeeperClient.record` still cannot reach the sidecar after its
retries it raises :class:`SidecarUnavailable` carrying the request; the caller
must keep it (memory, a queue, a file) and send it again later with
:meth:`~SpendKeeperClient.resend_record`. Sending it again is safe: a repeated
Record answers ``duplicate=True`` and changes nothing.

This module needs only grpc and the generated messages (no policy or ledger
code), so a gateway can vendor it on its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from policy.model import nanos_to_usd
from policy.pricing import Usage
from sidecar.api.v1 import spendkeeper_pb2 as pb

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "REASON_SIDECAR_UNAVAILABLE",
    "Authorization",
    "Denied",
    "GuardedCall",
    "InvalidRequest",
    "Recorded",
    "RequestConflict",
    "SidecarUnavailable",
    "SpendKeeperClient",
    "SpendKeeperError",
    "Usage",
    "decimal_to_money",
    "money_to_decimal",
    "new_request_id",
    "usage_pb",
]

_log = logging.getLogger("spendkeeper.client")
_SERVICE: Final = "/spendkeeper.v1.SpendKeeper/"
_NANO: Final = Decimal("1e-9")
#: ``Authorization.reason`` when no answer came from the sidecar.
REASON_SIDECAR_UNAVAILABLE: Final = "SIDECAR_UNAVAILABLE"
_RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
_TIERS: Final = {"standard": pb.STANDARD, "batch": pb.BATCH, "priority": pb.PRIORITY}
_SPEEDS: Final = {"standard": pb.SPEED_STANDARD, "fast": pb.FAST}
#: The sidecar is local: reconnect quickly after it restarts instead of
#: gRPC's default backoff of up to two minutes.
DEFAULT_CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
)
FailMode = Literal["closed", "open"]
Resp = TypeVar("Resp", bound=Message)


# ------------------------------------------------------------------ errors
class SpendKeeperError(Exception):
    """The sidecar answered with an error status (or could not be reached)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(SpendKeeperError, ValueError):
    """INVALID_ARGUMENT: the request is malformed; retrying it cannot help."""


class RequestConflict(SpendKeeperError):
    """FAILED_PRECONDITION: the request_id was used before with another payload."""


class SidecarUnavailable(SpendKeeperError):
    """No answer after every retry. ``request`` is what was sent (keep a Record's and resend it)."""

    def __init__(self, message: str, code: grpc.StatusCode | None,
                 request: Message, attempts: int) -> None:
        super().__init__(message, code)
        self.request = request
        self.attempts = attempts


class Denied(SpendKeeperError):
    """Raised by :meth:`SpendKeeperClient.guard` when the policy denies the call."""

    def __init__(self, authorization: Authorization) -> None:
        super().__init__(f"{authorization.reason}: {authorization.message}")
        self.authorization = authorization


# ------------------------------------------------------------------ values
def money_to_decimal(money: pb.Money) -> Decimal:
    """A Money message as exact USD (units plus billionths), without trailing zeros."""
    return nanos_to_usd(money.units * 1_000_000_000 + money.nanos)


def decimal_to_money(amount: Decimal) -> pb.Money:
    """Exact USD as a Money message (rounded half-even to a billionth)."""
    nanos = int((amount / _NANO).to_integral_value(rounding=ROUND_HALF_EVEN))
    units, frac = divmod(abs(nanos), 1_000_000_000)
    sign = -1 if nanos < 0 else 1
    return pb.Money(currency_code="USD", units=sign * units, nanos=sign * frac)


def new_request_id() -> str:
    """A fresh random request id (32 hex digits)."""
    return uuid.uuid4().hex


def usage_pb(usage: Usage) -> pb.Usage:
    """A usage record (the same :class:`policy.pricing.Usage` the sidecar prices) as proto."""
    return pb.Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                    cache_write_5m_tokens=usage.cache_write_5m_tokens,
                    cache_write_1h_tokens=usage.cache_write_1h_tokens,
                    cache_read_tokens=usage.cache_read_tokens,
                    web_search_requests=usage.web_search_requests,
                    web_fetch_requests=usage.web_fetch_requests,
                    code_execution_seconds=usage.code_execution_seconds)


@dataclass(frozen=True)
class Authorization:
    """The answer to :meth:`SpendKeeperClient.authorize`."""

    request_id: str
    allowed: bool
    #: A ``Reason`` name (``WITHIN_LIMITS``, ``USER_LIMIT``, ...) or ``SIDECAR_UNAVAILABLE``.
    reason: str
    message: str
    #: USD held for this request until it is recorded or released.
    reserved: Decimal = Decimal(0)
    #: The output cap to call the model with when the server clamped it; else None.
    max_output_tokens: int | None = None
    policy_version: str = ""
    #: True when allowed only because the sidecar was unreachable and fail_mode is "open".
    fail_open: bool = False
    attempts: int = 1
    raw: pb.AuthorizeResponse | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Recorded:
    """The answer to :meth:`SpendKeeperClient.record`."""

    cost: Decimal
    #: True when this request_id was already recorded (the first result is returned).
    duplicate: bool
    #: False when the rate table had no price for the model (the usage is still recorded).
    priced: bool
    attempts: int = 1
    raw: pb.RecordResponse | None = field(default=None, repr=False, compare=False)


# ------------------------------------------------------------------ client
class SpendKeeperClient:
    """A thread-safe client of one sidecar; share one per process and ``close()`` it."""

    def __init__(self, target: str, *, timeout: float = 0.05, retries: int = 2,
                 backoff: float = 0.01, fail_mode: FailMode = "closed",
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS,
                 interceptors: Sequence[grpc.UnaryUnaryClientInterceptor[Any, Any]] = (),
                 rng: random.Random | None = None) -> None:
        """Connect lazily to ``target`` (``host:port`` or ``unix:/path``).

        ``timeout`` is each attempt's deadline in seconds; ``retries`` the extra
        attempts after the first; ``backoff`` the base delay, doubled each
        retry and jittered by +-50%. ``credentials`` enables TLS/mTLS.
        """
        if fail_mode not in ("closed", "open"):
            raise ValueError(f'fail_mode must be "closed" or "open", not {fail_mode!r}')
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be positive, retries and backoff not negative")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.fail_mode: FailMode = fail_mode
        self._rng = rng or random.Random()
        options = list(channel_options)
        channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
                   else grpc.insecure_channel(target, options))
        self._channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._authorize = _method(channel, "Authorize", pb.AuthorizeRequest, pb.AuthorizeResponse)
        self._record = _method(channel, "Record", pb.RecordRequest, pb.RecordResponse)
        self._release = _method(channel, "Release", pb.ReleaseRequest, pb.ReleaseResponse)
        self._usage = _method(channel, "GetUsage", pb.GetUsageRequest, pb.GetUsageResponse)

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> SpendKeeperClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------- transport
    def _invoke(self, method: Callable[..., Resp], request: Message,
                timeout: float | None = None) -> tuple[Resp, int]:
        """Call with retries on transport trouble; the same message (same id) every time."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return method(request, timeout=timeout or self.timeout), attempt
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                details = exc.details() or code.name
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(details, code) from None
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    raise RequestConflict(details, code) from None
                if code not in _RETRYABLE:
                    raise SpendKeeperError(f"{code.name}: {details}", code) from None
                if attempt == attempts:
                    raise SidecarUnavailable(
                        f"sidecar {self.target} did not answer after {attempts} attempts "
                        f"(last: {code.name}: {details})", code, request, attempts) from None
                delay = self.backoff * 2 ** (attempt - 1) * self._rng.uniform(0.5, 1.5)
                _log.debug("attempt %d of %d failed with %s; retrying in %.3f s",
                           attempt, attempts, code.name, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    # -------------------------------------------------------------- rpcs
    def authorize(self, request_id: str, org: str, user: str, product: str, model: str, *,
                  max_output_tokens: int, input_tokens: int = 0,
                  cache_write_5m_tokens: int = 0, cache_write_1h_tokens: int = 0,
                  cache_read_tokens: int = 0, web_search_requests: int = 0,
                  web_fetch_requests: int = 0, code_execution_seconds: int = 0,
                  service_tier: str = "standard", speed: str = "standard",
                  inference_geo: str = "", at: dt.datetime | None = None,
                  allow_clamp: bool = False) -> Authorization:
        """Reserve the worst case (the estimate with ``max_output_tokens`` of output).

        Unreachable sidecar: fail_mode "closed" denies (reason
        ``SIDECAR_UNAVAILABLE``), "open" allows with ``fail_open=True``.
        """
        estimate = Usage(input_tokens, max_output_tokens, cache_write_5m_tokens,
                         cache_write_1h_tokens, cache_read_tokens, web_search_requests,
                         web_fetch_requests, code_execution_seconds)
        msg = pb.AuthorizeRequest(
            request_id=request_id, org=org, user=user, product=product, model=model,
            estimate=usage_pb(estimate), service_tier=_tier(service_tier), speed=_speed(speed),
            inference_geo=inference_geo, allow_clamp=allow_clamp)
        if at is not None:
            msg.at.CopyFrom(_timestamp(at))
        try:
            resp, attempts = self._invoke(self._authorize, msg)
        except SidecarUnavailable as exc:
            return self._unreachable(request_id, exc)
        return Authorization(
            request_id=request_id, allowed=resp.decision == pb.ALLOW,
            reason=pb.Reason.Name(resp.reason), message=resp.message,
            reserved=money_to_decimal(resp.reserved),
            max_output_tokens=resp.max_output_tokens or None,
            policy_version=resp.policy_version, attempts=attempts, raw=resp)

    def _unreachable(self, request_id: str, exc: SidecarUnavailable) -> Authorization:
        if self.fail_mode == "open":
            _log.warning("allowing %s unchecked (fail open): %s", request_id, exc)
            return Authorization(request_id, True, REASON_SIDECAR_UNAVAILABLE,
                                 f"spend sidecar unreachable; allowed unchecked: {exc}",
                                 fail_open=True, attempts=exc.attempts)
        _log.warning("denying %s (fail closed): %s", request_id, exc)
        return Authorization(request_id, False, REASON_SIDECAR_UNAVAILABLE,
                             "spend limits cannot be checked right now; try again shortly",
                             attempts=exc.attempts)

    def record(self, request_id: str, org: str, user: str, product: str, model: str, *,
               input_tokens: int = 0, output_tokens: int = 0, cache_write_5m_tokens: int = 0,
               cache_write_1h_tokens: int = 0, cache_read_tokens: int = 0,
               web_search_requests: int = 0, web_fetch_requests: int = 0,
               code_execution_seconds: int = 0, service_tier: str = "standard",
               speed: str = "standard", inference_geo: str = "",
               at: dt.datetime | None = None) -> Recorded:
        """Charge the actual usage, settling ``request_id``'s reservation.

        Raises :class:`SidecarUnavailable` when the sidecar cannot be reached:
        the caller MUST keep ``exc.request`` and :meth:`resend_record` it later.
        """
        usage = Usage(input_tokens, output_tokens, cache_write_5m_tokens, cache_write_1h_tokens,
                      cache_read_tokens, web_search_requests, web_fetch_requests,
                      code_execution_seconds)
        return self._record_usage(request_id, org, user, product, model, usage,
                                  service_tier, speed, inference_geo, at)

    def _record_usage(self, request_id: str, org: str, user: str, product: str, model: str,
                      usage: Usage, service_tier: str, speed: str, inference_geo: str,
                      at: dt.datetime | None) -> Recorded:
        msg = pb.RecordRequest(
            request_id=request_id, org=org, user=user, product=product, model=model,
            usage=usage_pb(usage), service_tier=_tier(service_tier), speed=_speed(speed),
            inference_geo=inference_geo)
        if at is not None:
            msg.at.CopyFrom(_timestamp(at))
        return self.resend_record(msg)

    def resend_record(self, request: pb.RecordRequest) -> Recorded:
        """Send a RecordRequest (e.g. one kept from a :class:`SidecarUnavailable`)."""
        resp, attempts = self._invoke(self._record, request)
        return Recorded(cost=money_to_decimal(resp.cost), duplicate=resp.duplicate,
                        priced=resp.priced, attempts=attempts, raw=resp)

    def release(self, request_id: str) -> bool:
        """Drop ``request_id``'s reservation; False when none was held."""
        resp, _ = self._invoke(self._release, pb.ReleaseRequest(request_id=request_id))
        return resp.released

    def usage(self, org: str, period: str | None = None, user: str | None = None, *,
              page_size: int = 0, page_token: str = "",
              timeout: float | None = None) -> pb.GetUsageResponse:
        """One page of an org's usage; ``timeout`` defaults to max(client timeout, 1 s)."""
        msg = pb.GetUsageRequest(org=org, period=period or "", user=user or "",
                                 page_size=page_size, page_token=page_token)
        resp, _ = self._invoke(self._usage, msg, timeout or max(self.timeout, 1.0))
        return resp

    @contextmanager
    def guard(self, request_id: str, org: str, user: str, product: str, model: str, *,
              max_output_tokens: int, input_tokens: int = 0, cache_write_5m_tokens: int = 0,
              cache_write_1h_tokens: int = 0, cache_read_tokens: int = 0,
              web_search_requests: int = 0, web_fetch_requests: int = 0,
              code_execution_seconds: int = 0, service_tier: str = "standard",
              speed: str = "standard", inference_geo: str = "",
              at: dt.datetime | None = None, allow_clamp: bool = False,
              ) -> Iterator[GuardedCall]:
        """Authorize, run the body, then record or release.

        Raises :class:`Denied` before the body when the call is not allowed.
        The body reports what the call used with ``call.set_usage(...)``. On a
        normal exit that usage is recorded (the worst-case estimate when none
        was set, so spend is never lost). If the body raises, the usage is
        recorded when it was set (tokens were consumed) and the reservation is
        released otherwise. A failed Record raises :class:`SidecarUnavailable`.
        """
        auth = self.authorize(
            request_id, org, user, product, model, max_output_tokens=max_output_tokens,
            input_tokens=input_tokens, cache_write_5m_tokens=cache_write_5m_tokens,
            cache_write_1h_tokens=cache_write_1h_tokens, cache_read_tokens=cache_read_tokens,
            web_search_requests=web_search_requests, web_fetch_requests=web_fetch_requests,
            code_execution_seconds=code_execution_seconds, service_tier=service_tier,
            speed=speed, inference_geo=inference_geo, at=at, allow_clamp=allow_clamp)
        if not auth.allowed:
            raise Denied(auth)
        call = GuardedCall(auth, auth.max_output_tokens or max_output_tokens)
        estimate = Usage(input_tokens, call.max_output_tokens, cache_write_5m_tokens,
                         cache_write_1h_tokens, cache_read_tokens, web_search_requests,
                         web_fetch_requests, code_execution_seconds)

        def settle(usage: Usage) -> None:
            call.recorded = self._record_usage(request_id, org, user, product, model, usage,
                                               service_tier, speed, inference_geo, at)

        try:
            yield call
        except BaseException:
            if call.usage is not None:
                settle(call.usage)
            elif not auth.fail_open:
                try:
                    self.release(request_id)
                except SpendKeeperError as exc:  # the reservation lapses at its TTL
                    _log.warning("release of %s failed: %s", request_id, exc)
            raise
        if call.usage is None:
            _log.warning("%s: no usage set in guard(); recording the worst case", request_id)
        settle(call.usage or estimate)


class GuardedCall:
    """What :meth:`SpendKeeperClient.guard` yields: the decision and the usage slot."""

    def __init__(self, authorization: Authorization, max_output_tokens: int) -> None:
        self.authorization = authorization
        #: The output cap to call the model with (the clamped one when clamped).
        self.max_output_tokens = max_output_tokens
        self.usage: Usage | None = None
        self.recorded: Recorded | None = None

    def set_usage(self, **fields: int) -> Usage:
        """Report the call's actual usage (``input_tokens=..., output_tokens=...``)."""
        self.usage = Usage(**fields)
        return self.usage


def _method(channel: grpc.Channel, name: str, request: type[Message],
            response: type[Resp]) -> Callable[..., Resp]:
    call: Callable[..., Resp] = channel.unary_unary(
        _SERVICE + name, request_serializer=request.SerializeToString,
        response_deserializer=response.FromString)
    return call


def _tier(name: str) -> pb.ServiceTier:
    try:
        return _TIERS[name]
    except KeyError:
        raise InvalidRequest(f"service_tier must be one of {sorted(_TIERS)}, not {name!r}",
                             ) from None


def _speed(name: str) -> pb.Speed:
    try:
        return _SPEEDS[name]
    except KeyError:
        raise InvalidRequest(f"speed must be one of {sorted(_SPEEDS)}, not {name!r}") from None


def _timestamp(when: dt.datetime) -> Timestamp:
    if when.tzinfo is None:
        raise InvalidRequest("at must be timezone-aware")
    ts = Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts
