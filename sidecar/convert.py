"""Proto <-> domain conversion and request validation for the servicer.

Validation errors are :class:`BadRequest` with a message naming the field;
the servicer turns them into ``INVALID_ARGUMENT`` before anything is changed.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Protocol

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from policy.decide import Request
from policy.pricing import Usage
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.ledger import LevelView

__all__ = [
    "MAX_ID_BYTES", "MAX_TOKENS", "BadRequest", "invalid_utf8_field", "level_pb", "money",
    "request_from", "timestamp",
]

MAX_ID_BYTES = 256
#: A single call never uses more than this many tokens of one meter.
MAX_TOKENS = 100_000_000
MAX_TOOL_USES = 1_000_000
MAX_SECONDS = 31 * 24 * 3600
_EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
_TIERS: dict[int, str] = {pb.SERVICE_TIER_UNSPECIFIED: "standard", pb.STANDARD: "standard",
                          pb.BATCH: "batch", pb.PRIORITY: "priority"}
_SPEEDS: dict[int, str] = {pb.SPEED_UNSPECIFIED: "standard", pb.SPEED_STANDARD: "standard",
                           pb.FAST: "fast"}
_LIMITS = {"input_tokens": MAX_TOKENS, "output_tokens": MAX_TOKENS,
           "cache_write_5m_tokens": MAX_TOKENS, "cache_write_1h_tokens": MAX_TOKENS,
           "cache_read_tokens": MAX_TOKENS, "web_search_requests": MAX_TOOL_USES,
           "web_fetch_requests": MAX_TOOL_USES, "code_execution_seconds": MAX_SECONDS}


#: Control characters, and lone surrogates (what undecodable bytes become).
_BAD_CHARS = re.compile("[\x00-\x1f\ud800-\udfff]")


class BadRequest(ValueError):
    """A request field is invalid; the message names it."""


class _Common(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def org(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def product(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def service_tier(self) -> int: ...
    @property
    def speed(self) -> int: ...
    @property
    def inference_geo(self) -> str: ...

    def HasField(self, name: str) -> bool: ...  # noqa: N802 - protobuf's name

    @property
    def at(self) -> Timestamp: ...


def check_id(name: str, value: str, *, required: bool = True) -> None:
    """Ids are 1 to 256 bytes of UTF-8 without control characters."""
    if not value:
        if required:
            raise BadRequest(f"{name} is required")
        return
    # UTF-8 takes at most 4 bytes a character: short ids need no encoding to check.
    if len(value) * 4 > MAX_ID_BYTES and len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise BadRequest(f"{name} is longer than {MAX_ID_BYTES} bytes")
    if _BAD_CHARS.search(value):
        raise BadRequest(f"{name} contains control characters or invalid UTF-8")


def _usage(name: str, msg: pb.Usage) -> Usage:
    usage = Usage(msg.input_tokens, msg.output_tokens, msg.cache_write_5m_tokens,
                  msg.cache_write_1h_tokens, msg.cache_read_tokens, msg.web_search_requests,
                  msg.web_fetch_requests, msg.code_execution_seconds)
    if max(usage.tokens()) <= MAX_TOKENS and min(usage.tokens()) >= 0 and \
            0 <= usage.web_search_requests <= MAX_TOOL_USES and \
            0 <= usage.web_fetch_requests <= MAX_TOOL_USES and \
            0 <= usage.code_execution_seconds <= MAX_SECONDS:
        return usage
    for field, limit in _LIMITS.items():  # the slow path: name the offending field
        value = getattr(msg, field)
        if value < 0:
            raise BadRequest(f"{name}.{field} is negative ({value})")
        if value > limit:
            raise BadRequest(f"{name}.{field} is absurdly large ({value} > {limit})")
    return usage


def request_from(msg: _Common, usage: pb.Usage, usage_name: str, now: dt.datetime,
                 allow_clamp: bool = False) -> tuple[Request, bool]:
    """A validated domain request and whether ``at`` was given by the caller."""
    for name in ("request_id", "org", "user", "product", "model"):
        check_id(name, getattr(msg, name))
    check_id("inference_geo", msg.inference_geo, required=False)
    if msg.service_tier not in _TIERS:
        raise BadRequest(f"service_tier has unknown value {msg.service_tier}")
    if msg.speed not in _SPEEDS:
        raise BadRequest(f"speed has unknown value {msg.speed}")
    at_given = msg.HasField("at")
    at = now
    if at_given:
        if not 0 <= msg.at.nanos < 1_000_000_000:
            raise BadRequest("at.nanos is out of range")
        try:
            at = msg.at.ToDatetime(tzinfo=dt.UTC)
        except (ValueError, OverflowError):
            raise BadRequest("at is not a valid timestamp") from None
        if not _EARLIEST <= at < _LATEST:
            raise BadRequest("at must be between 2000 and 2100")
    req = Request(msg.request_id, msg.org, msg.user, msg.product, msg.model,
                  _usage(usage_name, usage), at, _TIERS[msg.service_tier], _SPEEDS[msg.speed],
                  msg.inference_geo, allow_clamp)
    return req, at_given


def money(nanos: int) -> pb.Money:
    """Integer nano-USD as a google.type.Money-shaped message."""
    units, frac = divmod(abs(nanos), 1_000_000_000)
    sign = -1 if nanos < 0 else 1
    return pb.Money(currency_code="USD", units=sign * units, nanos=sign * frac)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def timestamp(when: dt.datetime) -> Timestamp:
    """An aware datetime as a Timestamp (integer arithmetic: 7x faster than FromDatetime)."""
    delta = when - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


_limits: dict[int, pb.Money] = {}


def _limit_money(nanos: int) -> pb.Money:
    """Limits repeat in every response: build each one's message once (copied on use)."""
    found = _limits.get(nanos)
    if found is None:
        if len(_limits) > 100_000:
            _limits.clear()
        found = _limits[nanos] = money(nanos)
    return found


def level_pb(view: LevelView) -> pb.Level:
    """A ledger level view as a proto Level (one constructor call: nested messages copied)."""
    if view.limit is None:
        return pb.Level(level=view.level, scope=view.scope, unlimited=True,
                        spent=money(view.spent), reserved=money(view.reserved))
    return pb.Level(level=view.level, scope=view.scope, unlimited=False,
                    spent=money(view.spent), reserved=money(view.reserved),
                    limit=_limit_money(view.limit), remaining=money(view.remaining or 0))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError on truncated input: the caller gives up
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def invalid_utf8_field(descriptor: Any, data: bytes, prefix: str = "") -> str | None:
    """The dotted name of the first string field in ``data`` that is not valid UTF-8.

    The protobuf runtime rejects such a message without naming the field, so a
    request that fails to parse is walked once more, here, for a clear
    INVALID_ARGUMENT message. None when no such field is found (or the bytes are
    not a well-formed message at all). ``descriptor`` is a message Descriptor
    (typed Any: the pure-Python and upb runtimes have distinct Descriptor types).
    """
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = f"{prefix}{field.name}"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return name
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found: str | None = invalid_utf8_field(field.message_type, chunk,
                                                           name + ".")
                    if found is not None:
                        return found
            else:  # groups (3, 4) are not used by this API; 6 and 7 are invalid
                return None
    except (IndexError, ValueError):
        return None
    return None
