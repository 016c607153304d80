"""Text to syntax tree: the Lark parser and the transformer into :mod:`policy.syntax`.

One cached LALR parser (``strict=True``: grammar conflicts fail when it is
built) and a non-recursive transformer that only builds typed nodes. Parse
errors become :class:`~policy.errors.Diagnostic` s naming what was expected.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)
from lark.tree import Meta

from policy import syntax as s
from policy.errors import Diagnostic, Loc, PolicyError

__all__ = ["MAX_FILE_BYTES", "grammar_text", "parse_text", "parser", "source_lines"]

#: A policy file larger than this is refused before parsing (10,000 members
#: with limits is about 0.6 MB).
MAX_FILE_BYTES = 8 * 1024 * 1024

_MULTIPLIERS = {"k": 1000, "m": 1_000_000}


def grammar_text() -> str:
    """The grammar, from the installed ``spendkeeper_grammar`` package or the checkout."""
    try:
        ref = importlib.resources.files("spendkeeper_grammar").joinpath("spend.lark")
        return ref.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        here = Path(__file__).resolve().parent.parent / "grammar" / "spend.lark"
        return here.read_text(encoding="utf-8")


@functools.cache
def parser() -> Lark:
    """The LALR parser, built once per process."""
    return Lark(grammar_text(), parser="lalr", strict=True, propagate_positions=True,
                maybe_placeholders=False)


def parse_text(text: str, path: str = "<string>") -> s.FileNode:
    """Parse one file's text; raise :class:`PolicyError` on a syntax error."""
    if len(text) > MAX_FILE_BYTES:
        raise PolicyError([Diagnostic(
            "file-too-large",
            f"policy file is {len(text):,} characters; the limit is {MAX_FILE_BYTES:,}",
            Loc(path))])
    lines = source_lines(text)
    try:
        tree = parser().parse(text)
    except UnexpectedInput as exc:
        raise PolicyError([_syntax_diagnostic(exc, path, lines)]) from None
    builder = _Build(path)
    try:
        node = builder.transform(tree)
    except VisitError as exc:
        orig = exc.orig_exc
        if isinstance(orig, PolicyError):
            builder.errors.extend(orig.diagnostics)
        else:
            raise
    if builder.errors:
        raise PolicyError([_with_source(d, lines) for d in builder.errors])
    assert isinstance(node, s.FileNode)
    return s.FileNode(path=path, body=node.body, comments=tuple(_comments(lines, path)))


def source_lines(text: str) -> list[str]:
    """Lines as the lexer counts them: split on newlines only (not on \\f or U+2028)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _comments(lines: list[str], path: str) -> Iterator[s.Comment]:
    """Comments are ``#`` to end of line outside a string (strings are one line)."""
    for number, line in enumerate(lines, start=1):
        in_string = escaped = False
        for col, ch in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "#":
                yield s.Comment(Loc(path, number, col + 1), line[col:].rstrip())
                break


# Readable names for the grammar's terminals in "expected ..." notes.
_TERMINAL_NAMES = {
    "STRING": 'a "quoted string"', "NAME": "a name", "MONEY": "an amount like $5 or $0.50",
    "PERCENT": "a percentage like 80%", "FACTOR": "a multiplier like 2x",
    "COUNT": "a number like 1000 or 200k", "DATE": "a date like 2026-10-07",
    "DATETIME": "a time like 2026-11-15T10:00:00Z", "METER": "a meter (input, output, "
    "cache_write_5m, cache_write_1h, cache_read)", "WINDOW": "month or day",
    "UNIT": "a unit (request, requests, hour, hours, second, seconds, minute, minutes)",
    "LEVEL": "a level (org, user_type, user, user_day)", "DECISION": "allow or deny",
    "_NL": "end of line", "$END": "end of file",
}


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[terminal]
    try:
        pattern = parser().get_terminal(terminal).pattern
    except KeyError:
        return terminal
    if pattern.type == "str":
        return f'"{pattern.value}"'
    return terminal


def _syntax_diagnostic(exc: UnexpectedInput, path: str, lines: list[str]) -> Diagnostic:
    line = max(getattr(exc, "line", 0) or 0, 0)
    column = max(getattr(exc, "column", 0) or 0, 0)
    expected: set[str] = set()
    if isinstance(exc, UnexpectedToken):
        expected = set(exc.accepts or exc.expected)
        token = exc.token
        if token.type == "$END":
            message = "unexpected end of file"
            line = len(lines)
            column = len(lines[-1]) + 1 if lines else 1
        elif token.type == "_NL":
            message = "unexpected end of line"
        else:
            message = f"unexpected {token.value!r}"
    elif isinstance(exc, UnexpectedCharacters):
        expected = set(exc.allowed or ())
        message = f"unexpected character {exc.char!r}"
    elif isinstance(exc, UnexpectedEOF):
        expected = set(exc.expected)
        message = "unexpected end of file"
        line = len(lines)
        column = len(lines[-1]) + 1 if lines else 1
    else:  # pragma: no cover - lark raises only the three above
        message = str(exc)
    names = sorted({_describe(t) for t in expected if t not in {"SEMICOLON"}})
    notes: tuple[str, ...] = ()
    if names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        notes = (f"expected one of: {shown}",)
    source = lines[line - 1] if 0 < line <= len(lines) else None
    return Diagnostic("syntax", message, Loc(path, line, column), source, notes)


def _with_source(diag: Diagnostic, lines: list[str]) -> Diagnostic:
    if diag.source_line is None and 0 < diag.loc.line <= len(lines):
        return Diagnostic(diag.code, diag.message, diag.loc, lines[diag.loc.line - 1], diag.notes)
    return diag


def _loc_error(path: str, meta: Meta | Token, code: str, message: str) -> PolicyError:
    line = getattr(meta, "line", 0)
    column = getattr(meta, "column", 0)
    return PolicyError([Diagnostic(code, message, Loc(path, line, column))])


class _Build(Transformer_NonRecursive):  # type: ignore[type-arg]
    """Tree to :mod:`policy.syntax` nodes. Values are checked by the compiler."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.errors: list[Diagnostic] = []

    # -- helpers
    def _loc(self, meta: Meta | Token) -> Loc:
        return Loc(self.path, getattr(meta, "line", 0), getattr(meta, "column", 0))

    def _end(self, meta: Meta) -> s.BlockEnd:
        return s.BlockEnd(getattr(meta, "end_line", 0))

    def _decimal(self, tok: Token, text: str) -> Decimal:
        try:
            return Decimal(text)
        except InvalidOperation:  # pragma: no cover - the lexer admits only digits
            raise _loc_error(self.path, tok, "number", f"not a number: {tok}") from None

    def _money(self, tok: Token) -> Decimal:
        return self._decimal(tok, str(tok)[1:].replace(",", ""))

    def _count(self, tok: Token) -> Decimal:
        text = str(tok).replace(",", "")
        mult = _MULTIPLIERS.get(text[-1].lower(), 1) if text[-1].isalpha() else 1
        if mult != 1:
            text = text[:-1]
        return self._decimal(tok, text) * mult

    def _date(self, tok: Token) -> dt.date:
        try:
            return dt.date.fromisoformat(str(tok))
        except ValueError:
            self.errors.append(Diagnostic("date", f"not a valid date: {tok}", self._loc(tok)))
            return dt.date(1970, 1, 1)

    @staticmethod
    def _str(tok: Token) -> str:
        return str(tok)[1:-1].replace('\\"', '"').replace("\\\\", "\\")

    def _strs(self, toks: list[Token]) -> tuple[tuple[str, Loc], ...]:
        return tuple((self._str(t), self._loc(t)) for t in toks)

    def _names(self, toks: list[Token]) -> tuple[tuple[str, Loc], ...]:
        return tuple((str(t), self._loc(t)) for t in toks)

    # -- top level
    def start(self, items: list[Any]) -> s.FileNode:
        return s.FileNode(self.path, tuple(items))

    @v_args(meta=True)
    def include(self, meta: Meta, items: list[Token]) -> s.Include:
        return s.Include(self._loc(meta), self._str(items[0]))

    # -- rate tables
    @v_args(meta=True)
    def rates(self, meta: Meta, items: list[Any]) -> s.RatesNode:
        return s.RatesNode(self._loc(meta), self._str(items[0]), tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def model(self, meta: Meta, items: list[Any]) -> s.ModelNode:
        aliases = tuple(i for i in items[1:] if isinstance(i, tuple))
        body = tuple(i for i in items[1:] if not isinstance(i, tuple))
        return s.ModelNode(self._loc(meta), self._str(items[0]), aliases, body, self._end(meta))

    def alias(self, items: list[Token]) -> tuple[str, Loc]:
        return (self._str(items[0]), self._loc(items[0]))

    @v_args(meta=True)
    def price(self, meta: Meta, items: list[Token]) -> s.Price:
        return s.Price(self._loc(meta), str(items[0]), self._money(items[1]), str(items[1]))

    @v_args(meta=True)
    def tier(self, meta: Meta, items: list[Any]) -> s.TierNode:
        return s.TierNode(self._loc(meta), self._count(items[0]), str(items[0]),
                          tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def dated(self, meta: Meta, items: list[Any]) -> s.DatedNode:
        return s.DatedNode(self._loc(meta), self._date(items[0]), tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def released(self, meta: Meta, items: list[Token]) -> s.Released:
        return s.Released(self._loc(meta), self._date(items[0]))

    @v_args(meta=True)
    def retires(self, meta: Meta, items: list[Token]) -> s.Retires:
        return s.Retires(self._loc(meta), self._date(items[0]))

    def _filter(self, items: list[Any], index: int) -> s.ForModels | s.ForReleased | None:
        if len(items) > index:
            found = items[index]
            assert isinstance(found, s.ForModels | s.ForReleased)
            return found
        return None

    @v_args(meta=True)
    def batch(self, meta: Meta, items: list[Any]) -> s.Batch:
        pct = str(items[0])
        return s.Batch(self._loc(meta), self._decimal(items[0], pct[:-1]), pct,
                       self._filter(items, 1))

    def _speed(self, kind: str, meta: Meta, items: list[Any]) -> s.SpeedMod:
        text = str(items[0])
        return s.SpeedMod(self._loc(meta), kind, self._decimal(items[0], text[:-1]), text,
                          self._filter(items, 1))

    @v_args(meta=True)
    def fast(self, meta: Meta, items: list[Any]) -> s.SpeedMod:
        return self._speed("fast", meta, items)

    @v_args(meta=True)
    def priority(self, meta: Meta, items: list[Any]) -> s.SpeedMod:
        return self._speed("priority", meta, items)

    @v_args(meta=True)
    def geo(self, meta: Meta, items: list[Any]) -> s.Geo:
        text = str(items[1])
        return s.Geo(self._loc(meta), self._str(items[0]), self._decimal(items[1], text[:-1]),
                     text, self._filter(items, 2))

    @v_args(meta=True)
    def for_models(self, meta: Meta, items: list[Token]) -> s.ForModels:
        return s.ForModels(self._loc(meta), self._strs(items))

    @v_args(meta=True)
    def for_released(self, meta: Meta, items: list[Token]) -> s.ForReleased:
        return s.ForReleased(self._loc(meta), self._date(items[0]))

    @v_args(meta=True)
    def tool(self, meta: Meta, items: list[Any]) -> s.Tool:
        name, money = items[0], items[1]
        rest = items[2:]
        allowance = rest.pop() if rest and isinstance(rest[-1], s.Allowance) else None
        unit = rest.pop()
        per_tok = rest[0] if rest else None
        per = self._count(per_tok) if per_tok is not None else Decimal(1)
        return s.Tool(self._loc(meta), str(name), self._money(money), str(money), per,
                      str(per_tok) if per_tok is not None else None, str(unit), allowance)

    @v_args(meta=True)
    def allowance(self, meta: Meta, items: list[Token]) -> s.Allowance:
        return s.Allowance(self._loc(meta), self._count(items[0]), str(items[0]), str(items[1]))

    @v_args(meta=True)
    def fallback(self, meta: Meta, items: list[Token]) -> s.Fallback:
        return s.Fallback(self._loc(meta), self._str(items[0]))

    # -- plans
    @v_args(meta=True)
    def plan(self, meta: Meta, items: list[Any]) -> s.PlanNode:
        return s.PlanNode(self._loc(meta), self._str(items[0]), tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def user_type(self, meta: Meta, items: list[Any]) -> s.UserTypeNode:
        return s.UserTypeNode(self._loc(meta), str(items[0]), tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def seat(self, meta: Meta, items: list[Token]) -> s.Seat:
        return s.Seat(self._loc(meta), self._money(items[0]), str(items[0]))

    @v_args(meta=True)
    def products(self, meta: Meta, items: list[Token]) -> s.Products:
        return s.Products(self._loc(meta), self._names(items))

    @v_args(meta=True)
    def addon(self, meta: Meta, items: list[Any]) -> s.AddonNode:
        return s.AddonNode(self._loc(meta), str(items[0]), tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def addon_for(self, meta: Meta, items: list[Token]) -> s.AddonFor:
        return s.AddonFor(self._loc(meta), self._names(items))

    # -- orgs
    @v_args(meta=True)
    def org(self, meta: Meta, items: list[Any]) -> s.OrgNode:
        return s.OrgNode(self._loc(meta), self._str(items[0]), tuple(items[1:]), self._end(meta))

    @v_args(meta=True)
    def org_plan(self, meta: Meta, items: list[Token]) -> s.OrgPlan:
        return s.OrgPlan(self._loc(meta), self._str(items[0]))

    @v_args(meta=True)
    def org_rates(self, meta: Meta, items: list[Token]) -> s.OrgRates:
        return s.OrgRates(self._loc(meta), self._str(items[0]))

    @v_args(meta=True)
    def timezone(self, meta: Meta, items: list[Token]) -> s.Timezone:
        return s.Timezone(self._loc(meta), self._str(items[0]))

    @v_args(meta=True)
    def org_limit(self, meta: Meta, items: list[s.Amount]) -> s.OrgLimit:
        return s.OrgLimit(self._loc(meta), items[0])

    @v_args(meta=True)
    def notify(self, meta: Meta, items: list[Token]) -> s.Notify:
        webhook = self._str(items[-1]) if items[-1].type == "STRING" else None
        pcts = [t for t in items if t.type == "PERCENT"]
        return s.Notify(self._loc(meta), tuple(
            (self._decimal(t, str(t)[:-1]), str(t), self._loc(t)) for t in pcts), webhook)

    @v_args(meta=True)
    def type_limit(self, meta: Meta, items: list[Any]) -> s.TypeLimit:
        return s.TypeLimit(self._loc(meta), str(items[0]), items[1])

    @v_args(meta=True)
    def default_limit(self, meta: Meta, items: list[s.Amount]) -> s.DefaultLimit:
        return s.DefaultLimit(self._loc(meta), items[0])

    @v_args(meta=True)
    def default_type(self, meta: Meta, items: list[Token]) -> s.DefaultType:
        return s.DefaultType(self._loc(meta), str(items[0]))

    @v_args(meta=True)
    def member(self, meta: Meta, items: list[Any]) -> s.Member:
        names = [i for i in items[1:] if isinstance(i, Token)]
        limits = tuple(i for i in items[1:] if isinstance(i, s.Amount))
        return s.Member(self._loc(meta), self._str(items[0]), str(names[0]), self._loc(names[0]),
                        self._names(names[1:]), limits)

    def member_limit(self, items: list[s.Amount]) -> s.Amount:
        return items[0]

    @v_args(meta=True)
    def money_amount(self, meta: Meta, items: list[Token]) -> s.Amount:
        return s.Amount(self._loc(meta), self._money(items[0]), str(items[0]), str(items[1]))

    @v_args(meta=True)
    def unlimited(self, meta: Meta, items: list[Token]) -> s.Amount:
        return s.Amount(self._loc(meta), None, "unlimited", "month")

    @v_args(meta=True)
    def shadow(self, meta: Meta, items: list[Token]) -> s.Shadow:
        return s.Shadow(self._loc(meta))

    @v_args(meta=True)
    def user_metrics(self, meta: Meta, items: list[Token]) -> s.UserMetrics:
        return s.UserMetrics(self._loc(meta))

    @v_args(meta=True)
    def grace(self, meta: Meta, items: list[Token]) -> s.Grace:
        return s.Grace(self._loc(meta), self._count(items[0]), str(items[0]))

    # -- tests
    @v_args(meta=True)
    def test(self, meta: Meta, items: list[Any]) -> s.TestNode:
        return s.TestNode(self._loc(meta), self._str(items[0]), tuple(items[1:]), self._end(meta))

    def _field(self, kind: str, meta: Meta, items: list[Token]) -> s.TestField:
        values = tuple(self._str(t) if t.type == "STRING" else str(t) for t in items)
        return s.TestField(self._loc(meta), kind, values)

    @v_args(meta=True)
    def t_org(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("org", meta, items)

    @v_args(meta=True)
    def t_user(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("user", meta, items)

    @v_args(meta=True)
    def t_product(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("product", meta, items)

    @v_args(meta=True)
    def t_model(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("model", meta, items)

    @v_args(meta=True)
    def t_at(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("at", meta, items)

    @v_args(meta=True)
    def t_usage(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("usage", meta, items)

    @v_args(meta=True)
    def t_tier(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("tier", meta, items)

    @v_args(meta=True)
    def t_speed(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("speed", meta, items)

    @v_args(meta=True)
    def t_geo(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("geo", meta, items)

    @v_args(meta=True)
    def t_clamp(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("allow_clamp", meta, items)

    @v_args(meta=True)
    def t_given(self, meta: Meta, items: list[Token]) -> s.TestField:
        return self._field("given", meta, items)

    @v_args(meta=True)
    def t_expect(self, meta: Meta, items: list[Token]) -> s.TestField:
        # Keep the keyword of optional parts so positions are unambiguous.
        values: list[str] = []
        for tok in items:
            if tok.type == "MONEY":
                values += ["cost", str(tok)]
            elif tok.type == "COUNT":
                values += ["max_output", str(tok)]
            else:
                values.append(str(tok))
        return s.TestField(self._loc(meta), "expect", tuple(values))
