import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    ALLOW: _ClassVar[Decision]
    DENY: _ClassVar[Decision]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    WITHIN_LIMITS: _ClassVar[Reason]
    ORG_LIMIT: _ClassVar[Reason]
    USER_TYPE_LIMIT: _ClassVar[Reason]
    USER_LIMIT: _ClassVar[Reason]
    PRODUCT_NOT_ENTITLED: _ClassVar[Reason]
    MODEL_NOT_ALLOWED: _ClassVar[Reason]
    UNKNOWN_MODEL: _ClassVar[Reason]
    UNKNOWN_ORG: _ClassVar[Reason]
    UNKNOWN_USER: _ClassVar[Reason]

class ServiceTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_TIER_UNSPECIFIED: _ClassVar[ServiceTier]
    STANDARD: _ClassVar[ServiceTier]
    BATCH: _ClassVar[ServiceTier]
    PRIORITY: _ClassVar[ServiceTier]

class Speed(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEED_UNSPECIFIED: _ClassVar[Speed]
    SPEED_STANDARD: _ClassVar[Speed]
    FAST: _ClassVar[Speed]
DECISION_UNSPECIFIED: Decision
ALLOW: Decision
DENY: Decision
REASON_UNSPECIFIED: Reason
WITHIN_LIMITS: Reason
ORG_LIMIT: Reason
USER_TYPE_LIMIT: Reason
USER_LIMIT: Reason
PRODUCT_NOT_ENTITLED: Reason
MODEL_NOT_ALLOWED: Reason
UNKNOWN_MODEL: Reason
UNKNOWN_ORG: Reason
UNKNOWN_USER: Reason
SERVICE_TIER_UNSPECIFIED: ServiceTier
STANDARD: ServiceTier
BATCH: ServiceTier
PRIORITY: ServiceTier
SPEED_UNSPECIFIED: Speed
SPEED_STANDARD: Speed
FAST: Speed

class Money(_message.Message):
    __slots__ = ("currency_code", "units", "nanos")
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    NANOS_FIELD_NUMBER: _ClassVar[int]
    currency_code: str
    units: int
    nanos: int
    def __init__(self, currency_code: _Optional[str] = ..., units: _Optional[int] = ..., nanos: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_read_tokens", "web_search_requests", "web_fetch_requests", "code_execution_seconds")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_5M_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WEB_FETCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CODE_EXECUTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    cache_read_tokens: int
    web_search_requests: int
    web_fetch_requests: int
    code_execution_seconds: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_write_5m_tokens: _Optional[int] = ..., cache_write_1h_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., web_search_requests: _Optional[int] = ..., web_fetch_requests: _Optional[int] = ..., code_execution_seconds: _Optional[int] = ...) -> None: ...

class Level(_message.Message):
    __slots__ = ("level", "scope", "limit", "unlimited", "spent", "reserved", "remaining")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    level: str
    scope: str
    limit: Money
    unlimited: bool
    spent: Money
    reserved: Money
    remaining: Money
    def __init__(self, level: _Optional[str] = ..., scope: _Optional[str] = ..., limit: _Optional[_Union[Money, _Mapping]] = ..., unlimited: _Optional[bool] = ..., spent: _Optional[_Union[Money, _Mapping]] = ..., reserved: _Optional[_Union[Money, _Mapping]] = ..., remaining: _Optional[_Union[Money, _Mapping]] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("request_id", "org", "user", "product", "model", "estimate", "service_tier", "speed", "inference_geo", "at", "allow_clamp")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_GEO_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_CLAMP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    org: str
    user: str
    product: str
    model: str
    estimate: Usage
    service_tier: ServiceTier
    speed: Speed
    inference_geo: str
    at: _timestamp_pb2.Timestamp
    allow_clamp: bool
    def __init__(self, request_id: _Optional[str] = ..., org: _Optional[str] = ..., user: _Optional[str] = ..., product: _Optional[str] = ..., model: _Optional[str] = ..., estimate: _Optional[_Union[Usage, _Mapping]] = ..., service_tier: _Optional[_Union[ServiceTier, str]] = ..., speed: _Optional[_Union[Speed, str]] = ..., inference_geo: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allow_clamp: _Optional[bool] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("decision", "reason", "message", "reserved", "levels", "max_output_tokens", "policy_version", "reservation_expires_at", "resets_at", "shadow", "shadow_decision", "shadow_reason", "worst_case_cost", "period")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DECISION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_REASON_FIELD_NUMBER: _ClassVar[int]
    WORST_CASE_COST_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    message: str
    reserved: Money
    levels: _containers.RepeatedCompositeFieldContainer[Level]
    max_output_tokens: int
    policy_version: str
    reservation_expires_at: _timestamp_pb2.Timestamp
    resets_at: _timestamp_pb2.Timestamp
    shadow: bool
    shadow_decision: Decision
    shadow_reason: Reason
    worst_case_cost: Money
    period: str
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., message: _Optional[str] = ..., reserved: _Optional[_Union[Money, _Mapping]] = ..., levels: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., max_output_tokens: _Optional[int] = ..., policy_version: _Optional[str] = ..., reservation_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shadow: _Optional[bool] = ..., shadow_decision: _Optional[_Union[Decision, str]] = ..., shadow_reason: _Optional[_Union[Reason, str]] = ..., worst_case_cost: _Optional[_Union[Money, _Mapping]] = ..., period: _Optional[str] = ...) -> None: ...

class RecordRequest(_message.Message):
    __slots__ = ("request_id", "org", "user", "product", "model", "usage", "service_tier", "speed", "inference_geo", "at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_GEO_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    org: str
    user: str
    product: str
    model: str
    usage: Usage
    service_tier: ServiceTier
    speed: Speed
    inference_geo: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., org: _Optional[str] = ..., user: _Optional[str] = ..., product: _Optional[str] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., service_tier: _Optional[_Union[ServiceTier, str]] = ..., speed: _Optional[_Union[Speed, str]] = ..., inference_geo: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RecordResponse(_message.Message):
    __slots__ = ("cost", "duplicate", "levels", "policy_version", "priced", "period", "late")
    COST_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICED_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    cost: Money
    duplicate: bool
    levels: _containers.RepeatedCompositeFieldContainer[Level]
    policy_version: str
    priced: bool
    period: str
    late: bool
    def __init__(self, cost: _Optional[_Union[Money, _Mapping]] = ..., duplicate: _Optional[bool] = ..., levels: _Optional[_Iterable[_Union[Level, _Mapping]]] = ..., policy_version: _Optional[str] = ..., priced: _Optional[bool] = ..., period: _Optional[str] = ..., late: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("org", "period", "user", "page_size", "page_token")
    ORG_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org: str
    period: str
    user: str
    page_size: int
    page_token: str
    def __init__(self, org: _Optional[str] = ..., period: _Optional[str] = ..., user: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class UsageLine(_message.Message):
    __slots__ = ("scope", "user_type", "spent", "reserved", "limit", "unlimited", "remaining", "requests")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    USER_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    scope: str
    user_type: str
    spent: Money
    reserved: Money
    limit: Money
    unlimited: bool
    remaining: Money
    requests: int
    def __init__(self, scope: _Optional[str] = ..., user_type: _Optional[str] = ..., spent: _Optional[_Union[Money, _Mapping]] = ..., reserved: _Optional[_Union[Money, _Mapping]] = ..., limit: _Optional[_Union[Money, _Mapping]] = ..., unlimited: _Optional[bool] = ..., remaining: _Optional[_Union[Money, _Mapping]] = ..., requests: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("period", "org", "user_types", "users", "next_page_token", "policy_version", "resets_at")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    USER_TYPES_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    period: str
    org: UsageLine
    user_types: _containers.RepeatedCompositeFieldContainer[UsageLine]
    users: _containers.RepeatedCompositeFieldContainer[UsageLine]
    next_page_token: str
    policy_version: str
    resets_at: _timestamp_pb2.Timestamp
    def __init__(self, period: _Optional[str] = ..., org: _Optional[_Union[UsageLine, _Mapping]] = ..., user_types: _Optional[_Iterable[_Union[UsageLine, _Mapping]]] = ..., users: _Optional[_Iterable[_Union[UsageLine, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., policy_version: _Optional[str] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
