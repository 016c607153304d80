"""The gRPC servicer: proto in, domain call, proto out, errors to status codes.

Thin on purpose: validation and conversion live in :mod:`sidecar.convert`,
decisions in :mod:`policy.decide`, money in :mod:`sidecar.ledger`. Decisions
are OK responses; only malformed input, conflicts and storage trouble are
gRPC errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from policy.model import Policy
from policy.periods import parse_period
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.convert import (
    BadRequest,
    check_id,
    invalid_utf8_field,
    level_pb,
    money,
    request_from,
    timestamp,
)
from sidecar.ledger import Conflict, Ledger, LedgerFull, LedgerUnavailable
from sidecar.ledger.views import UsageLine, usage_report
from sidecar.observe import NullObserver, Observer

__all__ = ["SERVICE_NAME", "PolicyHolder", "SpendKeeperService", "generic_handler"]

SERVICE_NAME = "spendkeeper.v1.SpendKeeper"
_log = logging.getLogger("spendkeeper.service")
_MAX_PAGE = 1000
M = TypeVar("M", bound=Message)


class PolicyHolder:
    """The policy in force; swapped atomically (one reference assignment) on reload."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class _Malformed:
    """Stands in for a request that failed to parse (answered INVALID_ARGUMENT)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(kind: type[M]) -> Callable[[bytes], M | _Malformed]:
    def deserialize(data: bytes) -> M | _Malformed:
        try:
            return kind.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            field = invalid_utf8_field(kind.DESCRIPTOR, data)
            if field is not None:
                return _Malformed(f"{field} is not valid UTF-8")
            return _Malformed(f"malformed request: {exc or 'cannot parse'} (invalid UTF-8 in a "
                              "string field or bad protobuf encoding)")
    return deserialize


class SpendKeeperService:
    """Authorize / Record / Release / GetUsage over a ledger and the current policy."""

    def __init__(self, holder: PolicyHolder, ledger: Ledger, observer: Observer | None = None,
                 *, shadow: bool = False,
                 on_storage_failure: Callable[[], None] | None = None) -> None:
        self.holder = holder
        self.ledger = ledger
        self.observer: Observer = observer or NullObserver()
        self.shadow = shadow
        #: Called when the ledger becomes unusable (e.g. fsync failed): the server
        #: turns health NOT_SERVING so load balancers stop sending traffic here.
        self.on_storage_failure = on_storage_failure

    # -------------------------------------------------------------- plumbing
    def _fail(self, context: grpc.ServicerContext, rpc: str, code: grpc.StatusCode,
              message: str, started: float) -> NoReturn:
        self.observer.failed(rpc, code.name, time.perf_counter() - started)
        context.abort(code, message)

    def _guard(self, rpc: str, context: grpc.ServicerContext, started: float,
               fn: Callable[[], M]) -> M:
        try:
            return fn()
        except BadRequest as exc:
            self._fail(context, rpc, grpc.StatusCode.INVALID_ARGUMENT, str(exc), started)
        except Conflict as exc:
            self._fail(context, rpc, grpc.StatusCode.FAILED_PRECONDITION, str(exc),
                              started)
        except LedgerFull as exc:
            _log.error("ledger full: %s", exc)
            self._fail(context, rpc, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), started)
        except LedgerUnavailable as exc:
            _log.error("ledger unavailable: %s", exc)
            if self.on_storage_failure is not None:
                self.on_storage_failure()
            self._fail(context, rpc, grpc.StatusCode.UNAVAILABLE, str(exc), started)

    @staticmethod
    def _check_parsed(request: object) -> None:
        if isinstance(request, _Malformed):
            raise BadRequest(request.error)

    # -------------------------------------------------------------- rpcs
    def Authorize(self, request: pb.AuthorizeRequest,
                  context: grpc.ServicerContext) -> pb.AuthorizeResponse:
        """Decide and reserve the worst case."""
        started = time.perf_counter()

        def run() -> pb.AuthorizeResponse:
            self._check_parsed(request)
            req, at_given = request_from(request, request.estimate, "estimate",
                                         self.ledger.clock.now(), request.allow_clamp)
            result = self.ledger.authorize(self.holder.policy, req, at_given=at_given,
                                           shadow=self.shadow)
            self.observer.authorized(req, result, time.perf_counter() - started)
            resp = pb.AuthorizeResponse(
                decision=pb.ALLOW if result.allowed else pb.DENY,
                reason=result.reason, message=result.message,
                reserved=money(result.reserved), worst_case_cost=money(result.worst_case),
                levels=[level_pb(v) for v in result.levels],
                max_output_tokens=result.max_output_tokens or 0,
                policy_version=result.policy_version, shadow=result.shadow,
                period=result.period)
            if result.shadow:
                resp.shadow_decision = pb.DENY if result.verdict != "WITHIN_LIMITS" else pb.ALLOW
                resp.shadow_reason = pb.Reason.Value(result.verdict)  # type: ignore[assignment]
            if result.resets_at is not None:
                resp.resets_at.CopyFrom(timestamp(result.resets_at))
            if result.expires_at is not None:
                resp.reservation_expires_at.CopyFrom(timestamp(result.expires_at))
            return resp

        return self._guard("Authorize", context, started, run)

    def Record(self, request: pb.RecordRequest, context: grpc.ServicerContext) -> pb.RecordResponse:
        """Settle with the actual usage (durable before the answer)."""
        started = time.perf_counter()

        def run() -> pb.RecordResponse:
            self._check_parsed(request)
            req, at_given = request_from(request, request.usage, "usage", self.ledger.clock.now())
            result = self.ledger.record(self.holder.policy, req, at_given=at_given)
            self.observer.recorded(req, result, time.perf_counter() - started)
            return pb.RecordResponse(cost=money(result.cost), duplicate=result.duplicate,
                                     levels=[level_pb(v) for v in result.levels],
                                     policy_version=result.policy_version, priced=result.priced,
                                     period=result.period, late=result.late)

        return self._guard("Record", context, started, run)

    def Release(self, request: pb.ReleaseRequest,
                context: grpc.ServicerContext) -> pb.ReleaseResponse:
        """Drop a reservation."""
        started = time.perf_counter()

        def run() -> pb.ReleaseResponse:
            self._check_parsed(request)
            check_id("request_id", request.request_id)
            released = self.ledger.release(request.request_id)
            self.observer.released(released, time.perf_counter() - started)
            return pb.ReleaseResponse(released=released)

        return self._guard("Release", context, started, run)

    def GetUsage(self, request: pb.GetUsageRequest,
                 context: grpc.ServicerContext) -> pb.GetUsageResponse:
        """An org's month: org, user types and users (paged)."""
        started = time.perf_counter()

        def run() -> pb.GetUsageResponse:
            self._check_parsed(request)
            check_id("org", request.org)
            check_id("user", request.user, required=False)
            if request.period:
                try:
                    parse_period(request.period)
                except ValueError as exc:
                    raise BadRequest(f"period: {exc}") from None
            if request.page_size < 0:
                raise BadRequest("page_size is negative")
            policy = self.holder.policy
            org = policy.orgs.get(request.org)
            if org is None:
                raise _NotFound(f'unknown org "{request.org}"')
            report = usage_report(self.ledger, policy, org, request.period or None)
            users = [u for u in report.users if not request.user or u.scope == request.user]
            start = _page_start(request.page_token)
            size = min(request.page_size or 100, _MAX_PAGE)
            page = users[start:start + size]
            resp = pb.GetUsageResponse(period=report.period, org=_line(report.org_line),
                                       user_types=[_line(t) for t in report.types],
                                       users=[_line(u) for u in page],
                                       policy_version=report.policy_version,
                                       resets_at=timestamp(report.resets_at))
            if start + size < len(users):
                resp.next_page_token = str(start + size)
            self.observer.usage_read(time.perf_counter() - started)
            return resp

        try:
            return self._guard("GetUsage", context, started, run)
        except _NotFound as exc:
            self._fail(context, "GetUsage", grpc.StatusCode.NOT_FOUND, str(exc), started)


class _NotFound(Exception):
    pass


def _page_start(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit() or len(token) > 9:
        raise BadRequest("page_token is not one this server issued")
    return int(token)


def _line(line: UsageLine) -> pb.UsageLine:
    msg = pb.UsageLine(scope=line.scope, user_type=line.user_type, spent=money(line.spent),
                       reserved=money(line.reserved), unlimited=line.limit is None,
                       requests=line.requests)
    if line.limit is not None:
        msg.limit.CopyFrom(money(line.limit))
        msg.remaining.CopyFrom(money(line.remaining or 0))
    return msg


def generic_handler(service: SpendKeeperService) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The service's handlers, with deserializers that turn bad bytes into INVALID_ARGUMENT."""
    def unary(fn: Callable[..., Any], req: type[Message], resp: type[Message]) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_safe(req),
            response_serializer=resp.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Authorize": unary(service.Authorize, pb.AuthorizeRequest, pb.AuthorizeResponse),
        "Record": unary(service.Record, pb.RecordRequest, pb.RecordResponse),
        "Release": unary(service.Release, pb.ReleaseRequest, pb.ReleaseResponse),
        "GetUsage": unary(service.GetUsage, pb.GetUsageRequest, pb.GetUsageResponse),
    })
