"""Canonical formatting of ``.spend`` files: ``spendkeeper fmt``.

The text is printed back from the syntax tree, so there is exactly one layout
for a given tree (plus its comments):

- 2-space indent, one statement per line, ``{`` at the end of a block's
  header and ``}`` on its own line: a block is always multi-line;
- single spaces between tokens; money with thousands separators and its
  decimals as written (``$50,000``, ``$22.50``, ``$0.10``); counts,
  percentages and multipliers as written (``200k``, ``80%``, ``1.1x``);
- one blank line between top-level blocks; elsewhere a run of blank lines
  in the source is kept as one (never right after ``{`` or before ``}``);
- every comment is kept. A comment after code stays at the end of that
  code's line (after a one-line block, at the end of its header; comments of
  consecutive statements are aligned in one column); a comment
  on its own line stays on its own line before the next statement, at that
  statement's indent, and one before a ``}`` stays inside the block.

As black does, the result is parsed again and compared with the original
tree and comments; a formatter bug raises :class:`FormatError` rather than
writing a file whose meaning changed.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass
from decimal import Decimal

from policy import syntax as s
from policy.errors import Loc, PolicyError
from policy.parse import parse_text

__all__ = ["FormatError", "canonical_money", "format_text", "same_tree"]

INDENT = "  "
_MONEY = re.compile(r"\$(?P<whole>[\d,]+)(?P<frac>\.\d+)?")


class FormatError(RuntimeError):
    """The formatter produced text that does not mean what the input meant (a bug)."""


def canonical_money(text: str) -> str:
    """``$50000`` -> ``$50,000``; decimals stay as written (``$22.50``, ``$0.10``)."""
    match = _MONEY.fullmatch(text)
    if match is None:
        return text
    whole = int(match["whole"].replace(",", ""))
    return f"${whole:,}{match['frac'] or ''}"


def _q(value: str) -> str:
    """A string literal: the parser unescapes ``\\"`` and ``\\\\`` only."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _amount(amount: s.Amount) -> str:
    if amount.usd is None:
        return "unlimited"
    return f"{canonical_money(amount.text)} / {amount.window}"


def _filter(models: s.ForModels | s.ForReleased | None) -> str:
    if models is None:
        return ""
    if isinstance(models, s.ForReleased):
        return f" for models released >= {models.since.isoformat()}"
    return " for " + ", ".join(_q(name) for name, _ in models.names)


def _names(names: tuple[tuple[str, Loc], ...]) -> str:
    return ", ".join(name for name, _ in names)


_QUOTED_FIELDS = frozenset({"org", "user", "model", "geo"})
_BARE_FIELDS = frozenset({"product", "tier", "speed", "at"})


def _test_field(field: s.TestField) -> str:
    kind, values = field.kind, field.values
    if kind in _QUOTED_FIELDS:
        return f"{kind} {_q(values[0])}"
    if kind in _BARE_FIELDS:
        return f"{kind} {values[0]}"
    if kind == "allow_clamp":
        return "allow_clamp"
    if kind == "usage":
        return "usage " + " ".join(values)
    if kind == "given":
        text = f"given {values[0]} spent {canonical_money(values[1])}"
        return text + (f" reserved {canonical_money(values[2])}" if len(values) > 2 else "")
    if kind == "expect":
        return "expect " + " ".join(canonical_money(v) if v.startswith("$") else v
                                    for v in values)
    raise FormatError(f"{field.loc}: unknown test statement {kind!r}")  # pragma: no cover


def _text(stmt: object) -> str:
    """The one line a non-block statement prints as."""
    match stmt:
        case s.Include(path=path):
            return f"include {_q(path)}"
        case s.Price(meter=meter, text=text):
            return f"{meter} {canonical_money(text)} / MTok"
        case s.Released(date=date):
            return f"released {date.isoformat()}"
        case s.Retires(date=date):
            return f"retires {date.isoformat()}"
        case s.Batch(text=text, models=models):
            return f"batch {text} off{_filter(models)}"
        case s.SpeedMod(kind=kind, text=text, models=models):
            return f"{kind} {text}{_filter(models)}"
        case s.Geo(region=region, text=text, models=models):
            return f"geo {_q(region)} {text}{_filter(models)}"
        case s.Tool():
            per = f"{stmt.per_text} " if stmt.per_text is not None else ""
            line = f"tool {stmt.name} {canonical_money(stmt.price_text)} / {per}{stmt.unit}"
            if stmt.allowance is not None:
                allow = stmt.allowance
                line += f", {allow.quantity_text} {allow.unit} free / month per org"
            return line
        case s.Fallback(model=model):
            return f"fallback {_q(model)}"
        case s.Seat(text=text):
            return f"seat {canonical_money(text)} / month"
        case s.Products(names=names):
            return f"products {_names(names)}"
        case s.AddonFor(names=names):
            return f"for {_names(names)}"
        case s.OrgPlan(name=name):
            return f"plan {_q(name)}"
        case s.OrgRates(name=name):
            return f"rates {_q(name)}"
        case s.Timezone(name=name):
            return f"timezone {_q(name)}"
        case s.OrgLimit(amount=amount):
            return f"limit {_amount(amount)}"
        case s.Notify(percents=percents, webhook=webhook):
            line = "notify at " + ", ".join(text for _, text, _ in percents)
            return line + (f" webhook {_q(webhook)}" if webhook is not None else "")
        case s.TypeLimit(user_type=user_type, amount=amount):
            return f"user_type {user_type} limit {_amount(amount)}"
        case s.DefaultLimit(amount=amount):
            return f"default user limit {_amount(amount)}"
        case s.DefaultType(user_type=user_type):
            return f"default user_type {user_type}"
        case s.Member():
            parts = ["member", _q(stmt.user), stmt.user_type, *(a for a, _ in stmt.addons)]
            parts += [f"limit {_amount(a)}" for a in stmt.limits]
            return " ".join(parts)
        case s.Shadow():
            return "shadow"
        case s.UserMetrics():
            return "per_user_metrics"
        case s.Grace(text=text):
            return f"late_usage grace {text} days"
        case s.TestField():
            return _test_field(stmt)
    raise FormatError(f"cannot format {type(stmt).__name__}")  # pragma: no cover


_Block = tuple[str, tuple[object, ...], s.BlockEnd]


def _block(stmt: object) -> _Block | None:
    """A block statement's header (without ``{``), children and end; None for others."""
    match stmt:
        case s.RatesNode(name=name, body=body, end=end):
            return f"rates {_q(name)}", body, end
        case s.ModelNode(name=name, aliases=aliases, body=body, end=end):
            alias = "".join(f" alias {_q(a)}" for a, _ in aliases)
            return f"model {_q(name)}{alias}", body, end
        case s.TierNode(threshold_text=threshold, prices=prices, end=end):
            return f"prompt over {threshold} tokens", prices, end
        case s.DatedNode(date=date, body=body, end=end):
            return f"from {date.isoformat()}", body, end
        case s.PlanNode(name=name, body=body, end=end):
            return f"plan {_q(name)}", body, end
        case s.UserTypeNode(name=name, body=body, end=end):
            return f"user_type {name}", body, end
        case s.AddonNode(name=name, body=body, end=end):
            return f"addon {name}", body, end
        case s.OrgNode(name=name, body=body, end=end):
            return f"org {_q(name)}", body, end
        case s.TestNode(name=name, body=body, end=end):
            return f"test {_q(name)}", body, end
    return None


@dataclass(slots=True)
class _Line:
    """One printed line before comments and blank lines are placed."""

    depth: int
    text: str
    origin: int  # the source line it comes from
    kind: str  # "stmt", "open" or "close"
    header: int = -1  # for "close": the index of its "open" line
    top: int = -1  # for the first line of a top-level statement: its index
    top_block: bool = False  # ... and whether that statement is a block
    comment: str = ""  # a trailing comment


def _emit(stmt: object, depth: int, out: list[_Line]) -> None:
    """Append the lines of ``stmt`` and its children (iteratively, like the parser)."""
    stack: list[tuple[object, int] | _Line] = [(stmt, depth)]
    while stack:
        item = stack.pop()
        if isinstance(item, _Line):
            out.append(item)
            continue
        node, level = item
        block = _block(node)
        loc = getattr(node, "loc", None)
        origin = loc.line if isinstance(loc, Loc) else 0
        if block is None:
            out.append(_Line(level, _text(node), origin, "stmt"))
            continue
        header, children, end = block
        out.append(_Line(level, header + " {", origin, "open"))
        stack.append(_Line(level, "}", end.line, "close", header=len(out) - 1))
        stack.extend((child, level + 1) for child in reversed(children))


def _render(tree: s.FileNode, source: str) -> str:
    out: list[_Line] = []
    for index, stmt in enumerate(tree.body):
        first = len(out)
        _emit(stmt, 0, out)
        out[first].top = index
        out[first].top_block = _block(stmt) is not None
    origins = [line.origin for line in out]
    by_origin: dict[int, int] = {}
    for index, line in enumerate(out):
        by_origin[line.origin] = index  # the last line printed from each source line
    # Own-line comments, grouped by the index of the printed line they precede.
    before: dict[int, list[s.Comment]] = {}
    for comment in tree.comments:
        target = by_origin.get(comment.loc.line)
        if target is None:
            before.setdefault(bisect.bisect_right(origins, comment.loc.line), []).append(comment)
            continue
        line = out[target]
        if line.kind == "close" and out[line.header].origin == comment.loc.line:
            target = line.header  # after a one-line block: the comment is about the block
        out[target].comment = comment.text
    return _assemble(out, before, source.split("\n"))


def _assemble(out: list[_Line], before: dict[int, list[s.Comment]], source: list[str]) -> str:
    blank = [0]
    for source_line in source:
        blank.append(blank[-1] + (not source_line.strip()))

    def gap(after: int, upto: int) -> bool:
        """Whether the source has a blank line strictly between these line numbers."""
        return upto - after > 1 and blank[upto - 1] - blank[after] > 0

    printed: list[tuple[str, str, int]] = []  # (code, trailing comment, alignment group)
    prev_origin = 0
    prev_kind = ""
    previous_top_block = False

    def put(depth: int, text: str, origin: int, kind: str, forced: bool | None,
            comment: str = "") -> None:
        nonlocal prev_origin, prev_kind
        if printed and prev_kind != "open" and kind != "close" and (
                forced or (forced is None and gap(prev_origin, origin))):
            printed.append(("", "", -1))
        # Trailing comments align across a run of statements of one block only.
        printed.append((INDENT * depth + text, comment, depth if kind == "stmt" else -1))
        prev_origin, prev_kind = origin, kind

    for index in range(len(out) + 1):
        line = out[index] if index < len(out) else None
        starts_top = line is not None and line.top >= 0
        # A blank line between top-level blocks, before the comments that lead in.
        forced: bool | None = None
        if starts_top and line is not None and line.top > 0 and (
                line.top_block or previous_top_block):
            forced = True
        depth = 0 if line is None else line.depth + (line.kind == "close")
        for comment in before.get(index, []):
            put(depth, comment.text, comment.loc.line, "comment", forced)
            forced = None
        if line is None:
            break
        put(line.depth, line.text, line.origin, line.kind, forced, line.comment)
        if starts_top:
            previous_top_block = line.top_block
    return "".join(line + "\n" for line in _align(printed))


def _align(printed: list[tuple[str, str, int]]) -> list[str]:
    """Trailing comments of consecutive statements start in one column, as gofmt does."""
    lines: list[str] = []
    run: list[tuple[str, str]] = []
    group = -1

    def flush() -> None:
        width = max((len(code) for code, _ in run), default=0)
        lines.extend(f"{code.ljust(width)}  {comment}" for code, comment in run)
        run.clear()

    for code, comment, key in printed:
        if key != group or not comment:
            flush()
        group = key
        if comment and key >= 0:
            run.append((code, comment))
        else:
            lines.append(f"{code}  {comment}" if comment else code)
    flush()
    return lines


def _shape(value: object) -> object:
    """A node with locations dropped and money text canonical: what must not change."""
    if isinstance(value, Loc | s.BlockEnd):
        return None
    if isinstance(value, s.FileNode):
        return _shape(value.body)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, *(_shape(getattr(value, f.name))
                                        for f in dataclasses.fields(value)))
    if isinstance(value, tuple):
        return tuple(_shape(v) for v in value)
    if isinstance(value, str):
        return canonical_money(value)
    if isinstance(value, Decimal):
        return (value, str(value))
    return value


def same_tree(a: s.FileNode, b: s.FileNode) -> bool:
    """Whether two parsed files say the same thing (locations and layout aside)."""
    return _shape(a) == _shape(b)


def format_text(text: str, path: str = "<string>") -> str:
    """The canonical text of a policy file; raises :class:`PolicyError` if it does not parse."""
    tree = parse_text(text, path)
    result = _render(tree, text)
    try:
        again = parse_text(result, path)
    except PolicyError as exc:
        raise FormatError(f"{path}: formatted text does not parse (please report this bug):\n"
                          f"{exc.render()}") from None
    if not same_tree(tree, again):
        raise FormatError(f"{path}: formatting would change the policy; file left as is "
                          "(please report this bug)")
    if [c.text for c in tree.comments] != [c.text for c in again.comments]:
        raise FormatError(f"{path}: formatting would lose a comment; file left as is "
                          "(please report this bug)")
    return result
