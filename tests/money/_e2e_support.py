"""The acceptance test's world: a real sidecar, a month of traffic, and arithmetic of our own.

The expected figures here are computed from :data:`PRICES` (USD per MTok)
with plain ``Fraction``/``Decimal`` arithmetic. Nothing here calls
``policy.pricing``, the ledger or the invoice code: the point is to check them.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import socket
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from sidecar.client import SpendKeeperClient
from sidecar.server import Sidecar

ORG = "acme"
TYPES = {"u1": "chat", "u2": "chat_code", "u3": "chat", "u4": "chat_code",
         "guest-1": "chat", "guest-2": "chat"}
SEATS = {"chat": Decimal(20), "chat_code": Decimal(30)}
HIPAA = Decimal(5)  # u1 only
METERS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
FIELDS = {"input": "input_tokens", "output": "output_tokens",
          "cache_write_5m": "cache_write_5m_tokens", "cache_write_1h": "cache_write_1h_tokens",
          "cache_read": "cache_read_tokens"}
#: USD per MTok: alpha before and after its mid-month change (cache_write_1h unchanged),
#: and beta, whose prices are not whole nano-USD per token.
PRICES: dict[tuple[str, str], dict[str, Decimal]] = {
    ("alpha", "before"): {"input": Decimal("3"), "output": Decimal("15"),
                          "cache_write_5m": Decimal("3.75"), "cache_write_1h": Decimal("6"),
                          "cache_read": Decimal("0.30")},
    ("alpha", "after"): {"input": Decimal("2.50"), "output": Decimal("12.50"),
                         "cache_write_5m": Decimal("3.125"), "cache_write_1h": Decimal("6"),
                         "cache_read": Decimal("0.25")},
    ("beta", "always"): {"input": Decimal("1.234567891"), "output": Decimal("6.172839455"),
                         "cache_write_5m": Decimal("1.54320986375"),
                         "cache_write_1h": Decimal("2.469135782"),
                         "cache_read": Decimal("0.1234567891")},
}
WEB_SEARCH_USD = Decimal("0.01")  # $10 per 1000 requests, never discounted

POLICY = """\
rates "t" {{
  model "alpha" {{
    input $3 / MTok  output $15 / MTok  cache_write_5m $3.75 / MTok
    cache_write_1h $6 / MTok  cache_read $0.30 / MTok
    from {mid} {{
      input $2.50 / MTok  output $12.50 / MTok  cache_write_5m $3.125 / MTok
      cache_write_1h $6 / MTok  cache_read $0.25 / MTok
    }}
  }}
  model "beta" {{
    input $1.234567891 / MTok  output $6.172839455 / MTok
    cache_write_5m $1.54320986375 / MTok  cache_write_1h $2.469135782 / MTok
    cache_read $0.1234567891 / MTok
  }}
  batch 50% off
  tool web_search $10 / 1000 requests
}}
plan "p" {{
  user_type chat      {{ seat $20 / month  products chat }}
  user_type chat_code {{ seat $30 / month  products chat, claude_code }}
  addon hipaa         {{ seat $5 / month  for chat }}
}}
org "acme" {{
  plan "p"  rates "t"  timezone "UTC"
  limit $1,000,000 / month
  default user_type chat
  member "u1" chat hipaa
  member "u2" chat_code
  member "u3" chat
  member "u4" chat_code
}}
"""


@dataclass(frozen=True)
class Sent:
    """One request as the gateway sent it."""

    request_id: str
    user: str
    model: str
    tier: str
    at: dt.datetime
    usage: dict[str, int]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def month_of(now: dt.datetime) -> tuple[str, dt.datetime, dt.datetime, dt.datetime]:
    """(period, start, end, the 15th) of ``now``'s UTC month."""
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return f"{start:%Y-%m}", start, end, start.replace(day=15)


def traffic(count: int, start: dt.datetime, end: dt.datetime, seed: int,
            prefix: str = "req") -> list[Sent]:
    """``count`` requests spread over [start, end): users, models, tiers and meters mixed."""
    rng = random.Random(seed)
    seconds = int((end - start).total_seconds())
    sent = []
    for i in range(count):
        usage = {"input_tokens": rng.randint(1, 60_000), "output_tokens": rng.randint(1, 4000)}
        if rng.random() < 0.5:
            usage["cache_read_tokens"] = rng.randint(1, 100_000)
        if rng.random() < 0.2:
            usage["cache_write_5m_tokens"] = rng.randint(1, 20_000)
        if rng.random() < 0.1:
            usage["cache_write_1h_tokens"] = rng.randint(1, 20_000)
        if rng.random() < 0.05:
            usage["web_search_requests"] = rng.randint(1, 5)
        sent.append(Sent(f"{prefix}-{i:05d}", rng.choice(sorted(TYPES)),
                         rng.choice(("alpha", "beta")),
                         "batch" if rng.random() < 0.3 else "standard",
                         start + dt.timedelta(seconds=rng.randrange(seconds)), usage))
    return sent


def send(target: str, requests: list[Sent], threads: int = 8) -> list[Decimal]:
    """Authorize (every third request) and Record each over gRPC; the recorded costs."""
    with SpendKeeperClient(target, timeout=10.0) as client:
        def one(s: Sent) -> Decimal:
            product = "claude_code" if TYPES[s.user] == "chat_code" else "chat"
            if int(s.request_id[-5:]) % 3 == 0:
                auth = client.authorize(s.request_id, ORG, s.user, product, s.model,
                                        max_output_tokens=s.usage["output_tokens"] + 100,
                                        input_tokens=s.usage["input_tokens"],
                                        service_tier=s.tier, at=s.at)
                assert auth.allowed, auth
            done = client.record(s.request_id, ORG, s.user, product, s.model,
                                 service_tier=s.tier, at=s.at, **s.usage)
            assert not done.duplicate
            assert done.priced
            return done.cost

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, requests))


# ---------------------------------------------------------------- our own arithmetic
def _sheet(s: Sent, mid: dt.datetime) -> dict[str, Decimal]:
    if s.model == "beta":
        return PRICES[("beta", "always")]
    return PRICES[("alpha", "after" if s.at >= mid else "before")]


def _factor(s: Sent) -> Decimal:
    return Decimal("0.5") if s.tier == "batch" else Decimal(1)


def request_nanos(s: Sent, mid: dt.datetime) -> int:
    """The enforcement cost: the exact price rounded up to the nano-USD."""
    sheet, factor = _sheet(s, mid), _factor(s)
    exact = sum((Fraction(s.usage.get(FIELDS[m], 0)) * Fraction(sheet[m] * factor) / 10**6
                 for m in METERS), Fraction(0))
    exact += Fraction(s.usage.get("web_search_requests", 0)) * Fraction(WEB_SEARCH_USD)
    nanos = exact * 10**9
    return -(-nanos.numerator // nanos.denominator)


def expected_spend(sent: list[Sent], mid: dt.datetime) -> dict[tuple[str, str], int]:
    """Nano-USD per (level, scope): org, each user type, each user."""
    spend: dict[tuple[str, str], int] = defaultdict(int)
    for s in sent:
        nanos = request_nanos(s, mid)
        for key in (("org", ORG), ("user_type", TYPES[s.user]), ("user", s.user)):
            spend[key] += nanos
    return dict(spend)


def _cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def expected_lines(sent: list[Sent], mid: dt.datetime,
                   ) -> dict[tuple[str, str, str, Decimal, str], tuple[int, Decimal]]:
    """(user, model, meter, unit price, label) -> (quantity, amount rounded once, half-up)."""
    totals: dict[tuple[str, str, str, Decimal, str], int] = defaultdict(int)
    for s in sent:
        sheet, factor = _sheet(s, mid), _factor(s)
        label = "batch 50% off" if s.tier == "batch" else "standard"
        for meter in METERS:
            if s.usage.get(FIELDS[meter]):
                key = (s.user, s.model, meter, (sheet[meter] * factor).normalize(), label)
                totals[key] += s.usage[FIELDS[meter]]
        if s.usage.get("web_search_requests"):
            # Tool fees are never discounted: their line is labelled "tool fee".
            totals[(s.user, s.model, "tool:web_search", Decimal(10), "tool fee")] += \
                s.usage["web_search_requests"]
    lines = {}
    for key, quantity in totals.items():
        per = Decimal(1000) if key[2] == "tool:web_search" else Decimal(10**6)
        lines[key] = (quantity, _cents(quantity * key[3] / per))  # exact: per is 10**k
    return lines


def expected_invoice_total(sent: list[Sent], mid: dt.datetime) -> tuple[Decimal, Decimal]:
    """(usage subtotal, total with seats and HIPAA) for everyone who sent traffic."""
    usage = sum((amount for _, amount in expected_lines(sent, mid).values()), Decimal(0))
    users = set(TYPES) if {s.user for s in sent} >= set(TYPES) else None
    assert users is not None, "the traffic should reach every user"
    seats = sum((SEATS[TYPES[u]] for u in users), Decimal(0)) + HIPAA
    return usage, usage + seats


# ---------------------------------------------------------------- scraping
_SAMPLE = re.compile(r'^spendkeeper_spend_usd\{([^}]*)\} (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape_spend(metrics_url: str) -> dict[tuple[str, str], str]:
    """``spendkeeper_spend_usd`` samples of org acme as (level, scope) -> value text."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group(1)))
            if labels.get("org") == ORG:
                found[(labels["level"], labels["scope"])] = match.group(2)
    return found


@dataclass
class World:
    """The running sidecar and everything sent to it so far."""

    sidecar: Sidecar
    target: str
    metrics_url: str
    policy_path: Path
    data_dir: Path
    period: str
    mid: dt.datetime
    sent: list[Sent] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def send(self, requests: list[Sent]) -> list[Decimal]:
        """Send and remember ``requests``."""
        costs = send(self.target, requests)
        self.sent.extend(requests)
        return costs
