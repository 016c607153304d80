"""The syntax tree of a ``.spend`` file: one frozen dataclass per statement.

The parser's transformer builds these and nothing else; meaning (defaults,
references, money scaling) is given to them by :mod:`policy.compile`, and the
formatter prints them back. Every node carries its location.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal

from policy.errors import Loc

__all__ = [
    "AddonFor", "AddonNode", "Allowance", "Amount", "AnyStmt", "Batch", "BlockEnd",
    "Comment", "DatedNode", "DefaultLimit", "DefaultType", "Fallback", "FileNode",
    "ForModels", "ForReleased", "Geo", "Grace", "Include", "Member", "ModelNode",
    "Modifier", "Notify", "OrgLimit", "OrgNode", "OrgPlan", "OrgRates", "PlanNode",
    "Price", "Products", "RatesNode", "Released", "Retires", "Seat", "Shadow",
    "SpeedMod", "TestField", "TestNode", "TierNode", "Timezone", "Tool", "TypeLimit",
    "UserMetrics", "UserTypeNode",
]


@dataclass(frozen=True, slots=True)
class Comment:
    """A ``#`` comment, kept so the formatter can put it back."""

    loc: Loc
    text: str


@dataclass(frozen=True, slots=True)
class BlockEnd:
    """Where a block's closing brace is: comments before it stay inside."""

    line: int


# ------------------------------------------------------------------ rate tables
@dataclass(frozen=True, slots=True)
class Price:
    """``input $5 / MTok``: USD per million tokens of one meter."""

    loc: Loc
    meter: str
    usd: Decimal
    text: str


@dataclass(frozen=True, slots=True)
class TierNode:
    """``prompt over 200k tokens { ... }``: the whole request at these prices."""

    loc: Loc
    threshold: Decimal
    threshold_text: str
    prices: tuple[Price, ...]
    end: BlockEnd


@dataclass(frozen=True, slots=True)
class DatedNode:
    """``from 2026-10-07 { ... }``: prices in force from a date (UTC)."""

    loc: Loc
    date: dt.date
    body: tuple[Price | TierNode, ...]
    end: BlockEnd


@dataclass(frozen=True, slots=True)
class Released:
    """``released 2026-02-05``: the model's release date."""

    loc: Loc
    date: dt.date


@dataclass(frozen=True, slots=True)
class Retires:
    """``retires 2026-11-30``: from this date (UTC) the model is not allowed."""

    loc: Loc
    date: dt.date


ModelStmt = Price | TierNode | DatedNode | Released | Retires


@dataclass(frozen=True, slots=True)
class ModelNode:
    """``model "name" alias "other" { ... }``."""

    loc: Loc
    name: str
    aliases: tuple[tuple[str, Loc], ...]
    body: tuple[ModelStmt, ...]
    end: BlockEnd


@dataclass(frozen=True, slots=True)
class ForModels:
    """``for "model-a", "model-b"``."""

    loc: Loc
    names: tuple[tuple[str, Loc], ...]


@dataclass(frozen=True, slots=True)
class ForReleased:
    """``for models released >= 2026-02-05``."""

    loc: Loc
    since: dt.date


@dataclass(frozen=True, slots=True)
class Batch:
    """``batch 50% off``: the batch service tier's discount."""

    loc: Loc
    percent: Decimal
    text: str
    models: ForModels | ForReleased | None


@dataclass(frozen=True, slots=True)
class SpeedMod:
    """``fast 2x`` or ``priority 1.5x``: a multiplier on every token meter."""

    loc: Loc
    kind: str  # "fast" or "priority"
    factor: Decimal
    text: str
    models: ForModels | ForReleased | None


@dataclass(frozen=True, slots=True)
class Geo:
    """``geo "us" 1.1x for models released >= ...``: data-residency multiplier."""

    loc: Loc
    region: str
    factor: Decimal
    text: str
    models: ForModels | ForReleased | None


Modifier = Batch | SpeedMod | Geo


@dataclass(frozen=True, slots=True)
class Allowance:
    """``1550 hours free / month per org``."""

    loc: Loc
    quantity: Decimal
    quantity_text: str
    unit: str


@dataclass(frozen=True, slots=True)
class Tool:
    """``tool web_search $10 / 1000 requests``: a per-use tool fee."""

    loc: Loc
    name: str
    usd: Decimal
    price_text: str
    per: Decimal
    per_text: str | None
    unit: str
    allowance: Allowance | None


@dataclass(frozen=True, slots=True)
class Fallback:
    """``fallback "model"``: unknown models are priced as this one."""

    loc: Loc
    model: str


RatesStmt = ModelNode | Batch | SpeedMod | Geo | Tool | Fallback


@dataclass(frozen=True, slots=True)
class RatesNode:
    """``rates "name" { ... }``: a rate table."""

    loc: Loc
    name: str
    body: tuple[RatesStmt, ...]
    end: BlockEnd


# ------------------------------------------------------------------ plans
@dataclass(frozen=True, slots=True)
class Seat:
    """``seat $20 / month``."""

    loc: Loc
    usd: Decimal
    text: str


@dataclass(frozen=True, slots=True)
class Products:
    """``products chat, file_creation``."""

    loc: Loc
    names: tuple[tuple[str, Loc], ...]


@dataclass(frozen=True, slots=True)
class UserTypeNode:
    """``user_type chat { seat ... products ... }``."""

    loc: Loc
    name: str
    body: tuple[Seat | Products, ...]
    end: BlockEnd


@dataclass(frozen=True, slots=True)
class AddonFor:
    """``for chat, chat_code``: the user types an add-on may attach to."""

    loc: Loc
    names: tuple[tuple[str, Loc], ...]


@dataclass(frozen=True, slots=True)
class AddonNode:
    """``addon hipaa { seat $5 / month  for chat }``."""

    loc: Loc
    name: str
    body: tuple[Seat | AddonFor, ...]
    end: BlockEnd


@dataclass(frozen=True, slots=True)
class PlanNode:
    """``plan "name" { user_type ... addon ... }``."""

    loc: Loc
    name: str
    body: tuple[UserTypeNode | AddonNode, ...]
    end: BlockEnd


# ------------------------------------------------------------------ orgs
@dataclass(frozen=True, slots=True)
class Amount:
    """``$500 / month`` or ``unlimited`` (``usd`` is None)."""

    loc: Loc
    usd: Decimal | None
    text: str
    window: str  # "month" or "day"; "month" for unlimited


@dataclass(frozen=True, slots=True)
class OrgPlan:
    """``plan "enterprise"`` inside an org."""

    loc: Loc
    name: str


@dataclass(frozen=True, slots=True)
class OrgRates:
    """``rates "anthropic"`` inside an org."""

    loc: Loc
    name: str


@dataclass(frozen=True, slots=True)
class Timezone:
    """``timezone "Europe/Berlin"``."""

    loc: Loc
    name: str


@dataclass(frozen=True, slots=True)
class OrgLimit:
    """``limit $50,000 / month``: the org's limit."""

    loc: Loc
    amount: Amount


@dataclass(frozen=True, slots=True)
class Notify:
    """``notify at 50%, 80% webhook "https://..."``."""

    loc: Loc
    percents: tuple[tuple[Decimal, str, Loc], ...]
    webhook: str | None


@dataclass(frozen=True, slots=True)
class TypeLimit:
    """``user_type chat limit $10,000 / month``."""

    loc: Loc
    user_type: str
    amount: Amount


@dataclass(frozen=True, slots=True)
class DefaultLimit:
    """``default user limit $500 / month``."""

    loc: Loc
    amount: Amount


@dataclass(frozen=True, slots=True)
class DefaultType:
    """``default user_type chat``: the type of users the policy does not list."""

    loc: Loc
    user_type: str


@dataclass(frozen=True, slots=True)
class Member:
    """``member "alice@acme.com" chat_code hipaa limit $2,000 / month``."""

    loc: Loc
    user: str
    user_type: str
    type_loc: Loc
    addons: tuple[tuple[str, Loc], ...]
    limits: tuple[Amount, ...]


@dataclass(frozen=True, slots=True)
class Shadow:
    """``shadow``: decide and count, but allow every request."""

    loc: Loc


@dataclass(frozen=True, slots=True)
class UserMetrics:
    """``per_user_metrics``: export per-user series for this org."""

    loc: Loc


@dataclass(frozen=True, slots=True)
class Grace:
    """``late_usage grace 5 days``: late usage accepted for a closed period."""

    loc: Loc
    days: Decimal
    text: str


OrgStmt = (
    OrgPlan | OrgRates | Timezone | OrgLimit | Notify | TypeLimit | DefaultLimit
    | DefaultType | Member | Shadow | UserMetrics | Grace
)


@dataclass(frozen=True, slots=True)
class OrgNode:
    """``org "acme" { ... }``: an organisation's policy."""

    loc: Loc
    name: str
    body: tuple[OrgStmt, ...]
    end: BlockEnd


# ------------------------------------------------------------------ tests
@dataclass(frozen=True, slots=True)
class TestField:
    """One statement of a policy test: ``kind`` and its raw values."""

    loc: Loc
    kind: str  # org user product model at usage tier speed geo given expect allow_clamp
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TestNode:
    """``test "name" { ... }``: a policy unit test."""

    __test__ = False  # not a pytest test class

    loc: Loc
    name: str
    body: tuple[TestField, ...]
    end: BlockEnd


@dataclass(frozen=True, slots=True)
class Include:
    """``include "rates/anthropic.spend"``."""

    loc: Loc
    path: str


TopStmt = Include | RatesNode | PlanNode | OrgNode | TestNode
AnyStmt = TopStmt | RatesStmt | ModelStmt | OrgStmt | Seat | Products | UserTypeNode | AddonNode


@dataclass(frozen=True, slots=True)
class FileNode:
    """A whole parsed file: its statements and comments in source order."""

    path: str
    body: tuple[TopStmt, ...]
    comments: tuple[Comment, ...] = field(default=())
