"""``policy.fmt``: canonical, idempotent formatting that keeps meaning and comments."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy import syntax as s
from policy.compile import load, load_text
from policy.errors import PolicyError
from policy.fmt import canonical_money, format_text, same_tree
from policy.model import Policy
from policy.parse import parse_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.spend")) if (ROOT / "examples").is_dir() else []

SAMPLE = """\
# hello
rates "anthropic" {
  model "claude-sonnet-4-5" alias "claude-sonnet-4-5-20250929" {
    input $3 / MTok  output $15 / MTok
    prompt over 200k tokens { input $6 / MTok output $22.50 / MTok }
    from 2026-10-07 { cache_read $0.10 / MTok }
    released 2025-09-29
    retires 2026-11-30
  }
  batch 50% off
  fast 2x for "claude-sonnet-4-5"
  geo "us" 1.1x for models released >= 2026-02-05
  tool web_search $10 / 1000 requests
  tool code_execution $0.05 / hour, 1550 hours free / month per org
  fallback "claude-sonnet-4-5"
}
plan "enterprise" {
  user_type chat { seat $20 / month  products chat, file_creation }
  user_type chat_code { seat $20 / month  products chat, claude_code }
  addon hipaa { seat $5 / month  for chat }
}
org "acme" {
  plan "enterprise"  rates "anthropic"  timezone "Europe/Berlin"
  limit $50000 / month
  notify at 50%, 80%, 100%  webhook "https://hooks.example/spend"
  user_type chat limit $10,000 / month
  default user limit $500 / month
  default user_type chat
  member "alice@acme.com" chat_code limit $2,000 / month
  member "bob" chat hipaa
  member "carol" chat_code limit $100 / day limit unlimited
  shadow
}
test "t" {
  org "acme" user "alice@acme.com" product chat model "claude-sonnet-4-5" at 2026-11-15T10:00:00Z
  usage input 1000 output 4,000 web_search 2
  given user spent $1,999 reserved $1
  expect deny USER_LIMIT cost $0.105
}
"""

# The golden pair: every layout rule at once (comments of each kind, one-line
# blocks expanded, blank lines, money separators, separators `;`).
GOLDEN_IN = """\
# file header

# about the table
rates "r" {   # the table

  model "m" alias "m-1" {
    input $3 / MTok  output $15 / MTok   # base
    prompt over 200k tokens {                 # whole request at this tier
      input $6 / MTok  output $22.50 / MTok
      # before the closing brace
    }


    from 2026-10-07 { cache_read $0.10 / MTok }   # effective-dated change
    # own line, before released
      released   2025-09-29
  } # end of model
  batch 50% off ; fast 2x
  tool web_search $10 / 1000 requests
}
include "x.spend"
include "y.spend"  # y
plan "p" { user_type chat { seat $20000 / month  products chat, file_creation } }  # one line
org "o" {
  plan "p"; rates "r"
  limit $1000000.50 / month
  member "a" chat limit $2,000 / month     # a
  member "bob" chat                        # b
}
# trailing at end

# really the end
"""

GOLDEN_OUT = """\
# file header

# about the table
rates "r" {  # the table
  model "m" alias "m-1" {
    input $3 / MTok
    output $15 / MTok  # base
    prompt over 200k tokens {  # whole request at this tier
      input $6 / MTok
      output $22.50 / MTok
      # before the closing brace
    }

    from 2026-10-07 {  # effective-dated change
      cache_read $0.10 / MTok
    }
    # own line, before released
    released 2025-09-29
  }  # end of model
  batch 50% off
  fast 2x
  tool web_search $10 / 1000 requests
}

include "x.spend"
include "y.spend"  # y

plan "p" {  # one line
  user_type chat {
    seat $20,000 / month
    products chat, file_creation
  }
}

org "o" {
  plan "p"
  rates "r"
  limit $1,000,000.50 / month
  member "a" chat limit $2,000 / month  # a
  member "bob" chat                     # b
}
# trailing at end

# really the end
"""


def test_golden_pair() -> None:
    """The golden input formats to exactly the golden output."""
    assert format_text(GOLDEN_IN, "golden.spend") == GOLDEN_OUT


def test_golden_output_is_a_fixed_point() -> None:
    """Canonical text formats to itself."""
    assert format_text(GOLDEN_OUT, "golden.spend") == GOLDEN_OUT


def test_sample_is_idempotent_and_keeps_its_meaning() -> None:
    """Formatting twice changes nothing more, and the compiled policy is the same."""
    once = format_text(SAMPLE, "sample.spend")
    assert format_text(once, "sample.spend") == once
    assert same_tree(parse_text(SAMPLE, "a"), parse_text(once, "b"))
    assert _comparable(load_text(SAMPLE, "sample.spend")) == _comparable(
        load_text(once, "sample.spend"))


@pytest.mark.parametrize(
    ("written", "canonical"),
    [("$50000", "$50,000"), ("$50,000", "$50,000"), ("$22.50", "$22.50"), ("$0.10", "$0.10"),
     ("$1234567.125", "$1,234,567.125"), ("$0", "$0"), ("$007", "$7"), ("$999", "$999")])
def test_money_gets_thousands_separators_and_keeps_its_decimals(written: str,
                                                                canonical: str) -> None:
    """``$50000`` -> ``$50,000``; decimals stay exactly as written."""
    assert canonical_money(written) == canonical


def test_counts_percentages_and_multipliers_stay_as_written() -> None:
    """``200k``, ``4,000``, ``1000``, ``80%`` and ``1.1x`` are not rewritten."""
    text = ('rates "r" { model "m" { input $1 / MTok output $1 / MTok '
            "prompt over 200k tokens { input $2 / MTok } } geo \"eu\" 1.1x "
            "tool web_search $10 / 1000 requests }\n"
            'test "t" { usage input 4,000 output 200k }\n'
            'org "o" { notify at 80%, 100% }\n')
    out = format_text(text)
    for token in ("200k", "4,000", "1000 requests", "80%, 100%", "1.1x"):
        assert token in out


def test_blocks_are_always_multi_line() -> None:
    """Even an empty or one-statement block prints over several lines."""
    assert format_text('rates "r" {}\n') == 'rates "r" {\n}\n'
    assert format_text('plan "p" { addon h { for chat } }') == (
        'plan "p" {\n  addon h {\n    for chat\n  }\n}\n')


def test_one_blank_line_between_top_level_blocks_only() -> None:
    """Blocks get one blank line between them; consecutive includes keep none."""
    text = 'include "a"\ninclude "b"\nrates "r" {}\n\n\n\nplan "p" {}\n'
    assert format_text(text) == 'include "a"\ninclude "b"\n\nrates "r" {\n}\n\nplan "p" {\n}\n'


def test_blank_line_runs_inside_blocks_collapse_to_one() -> None:
    """Several blank lines between statements become one; none after ``{`` or before ``}``."""
    text = 'org "o" {\n\n  plan "p"\n\n\n\n  rates "r"\n\n}\n'
    assert format_text(text) == 'org "o" {\n  plan "p"\n\n  rates "r"\n}\n'


def test_every_comment_is_kept_in_order() -> None:
    """No comment is lost, however the statements around it are laid out."""
    out = format_text(GOLDEN_IN)
    assert [c.text for c in parse_text(out).comments] == [
        c.text for c in parse_text(GOLDEN_IN).comments]


def test_comment_after_semicolons_only_stays_on_its_own_line() -> None:
    """A line holding only ``;`` and a comment has no statement to attach to."""
    text = 'org "o" {\n  plan "p"\n  ; # note\n  rates "r"\n}\n'
    assert format_text(text) == 'org "o" {\n  plan "p"\n  # note\n  rates "r"\n}\n'


def test_hash_inside_a_string_is_not_a_comment() -> None:
    """``#`` inside quotes is part of the string."""
    text = 'org "o#1" { notify at 50% webhook "https://h.example/#x" }  # real\n'
    assert format_text(text) == (
        'org "o#1" {  # real\n  notify at 50% webhook "https://h.example/#x"\n}\n')


def test_escaped_quotes_in_strings_survive() -> None:
    """A string with ``\\"`` and ``\\\\`` prints back to the same value."""
    text = 'org "a \\"b\\" \\\\ c" {}\n'
    out = format_text(text)
    assert parse_text(out).body[0].name == 'a "b" \\ c'  # type: ignore[union-attr]
    assert format_text(out) == out


def test_invalid_input_raises_the_parse_diagnostics() -> None:
    """A file that does not parse raises PolicyError with parse_text's diagnostics."""
    bad = 'rates "r" {\n  model "m" { input 3 / MTok }\n}\n'
    with pytest.raises(PolicyError) as formatted:
        format_text(bad, "bad.spend")
    with pytest.raises(PolicyError) as parsed:
        parse_text(bad, "bad.spend")
    assert formatted.value.diagnostics == parsed.value.diagnostics
    assert formatted.value.diagnostics[0].loc.line == 2


def test_empty_and_comment_only_files() -> None:
    """An empty file stays empty; a comment-only file keeps its comments."""
    assert format_text("") == ""
    assert format_text("\n\n") == ""
    assert format_text("# a\n\n\n# b\n") == "# a\n\n# b\n"


def test_crlf_line_endings_become_lf() -> None:
    """Windows line endings are read and written back as ``\\n``."""
    assert format_text('org "o" {\r\n  shadow\r\n}\r\n') == 'org "o" {\n  shadow\n}\n'


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_file_is_idempotent_and_keeps_its_tree(path: Path) -> None:
    """Each examples/ file formats to a fixed point with the same syntax tree."""
    text = path.read_text(encoding="utf-8")
    once = format_text(text, str(path))
    assert format_text(once, str(path)) == once
    assert same_tree(parse_text(text), parse_text(once))
    assert [c.text for c in parse_text(once).comments] == [
        c.text for c in parse_text(text).comments]


@pytest.mark.skipif(not EXAMPLES, reason="examples/ is not there yet")
def test_formatted_examples_compile_to_the_same_policy(tmp_path: Path) -> None:
    """The whole examples/ set, formatted, loads into an equal compiled policy."""
    source = ROOT / "examples"
    copy = tmp_path / "examples"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.json", "*.yml", "*.yaml"))
    for path in copy.rglob("*.spend"):
        path.write_text(format_text(path.read_text(encoding="utf-8"), str(path)),
                        encoding="utf-8")
    try:
        original = load(source)
    except PolicyError:
        pytest.skip("examples/ does not load yet")
    assert _comparable(load(copy)) == _comparable(original)


def _comparable(policy: Policy) -> object:
    """A compiled policy minus what depends on layout (version hash, file names, locations)."""
    tests = tuple(same_tree_key(t) for t in policy.tests if isinstance(t, s.TestNode))
    return dataclasses.replace(policy, version="", files=(), tests=tests)


def same_tree_key(node: s.TestNode) -> object:
    """A test node with locations dropped."""
    return (node.name, tuple((f.kind, f.values) for f in node.body))


# ---------------------------------------------------------------- generated policies
_NAME = st.sampled_from(["chat", "chat_code", "hipaa", "x_1"])
_STR = st.sampled_from(['"acme"', '"claude-x"', '"a b"', '"https://h.example/#x"'])
_MONEY = st.builds(lambda whole, frac, sep: (f"${whole:,}" if sep else f"${whole}") + frac,
                   st.integers(0, 5_000_000), st.sampled_from(["", ".5", ".50", ".125"]),
                   st.booleans())
_COUNT = st.sampled_from(["1000", "4,000", "200k", "1m", "5"])
_DATE = st.sampled_from(["2026-10-07", "2025-01-31"])

Node = str | tuple[str, list["Node"]]


def _prices() -> st.SearchStrategy[list[Node]]:
    meter = st.sampled_from(["input", "output", "cache_write_5m", "cache_write_1h",
                             "cache_read"])
    return st.lists(st.builds(lambda m, p: f"{m} {p} / MTok", meter, _MONEY), max_size=3)


def _model() -> st.SearchStrategy[Node]:
    tier = st.builds(lambda c, ps: (f"prompt over {c} tokens", ps), _COUNT, _prices())
    dated = st.builds(lambda d, ps: (f"from {d}", ps), _DATE, _prices())
    extra = st.lists(st.one_of(tier, dated, st.builds(lambda d: f"released {d}", _DATE)),
                     max_size=2)
    return st.builds(lambda n, ps, ex: (f"model {n}", ps + ex), _STR, _prices(), extra)


_RATES_ITEM = st.one_of(
    _model(), st.just("batch 50% off"), st.just('fast 2x for "a", "b"'),
    st.just('geo "us" 1.1x for models released >= 2026-02-05'),
    st.builds(lambda m: f"tool web_search {m} / 1000 requests", _MONEY),
    st.just("tool code_execution $0.05 / hour, 1550 hours free / month per org"),
    st.builds(lambda n: f"fallback {n}", _STR))
_PLAN_ITEM = st.builds(
    lambda kind, n, m: (f"{kind} {n}", [f"seat {m} / month",
                                        "products chat, file_creation" if kind == "user_type"
                                        else "for chat"]),
    st.sampled_from(["user_type", "addon"]), _NAME, _MONEY)
_ORG_ITEM = st.one_of(
    st.builds(lambda n: f"plan {n}", _STR), st.builds(lambda m: f"limit {m} / month", _MONEY),
    st.just("limit unlimited"), st.just('notify at 50%, 80% webhook "https://h.example"'),
    st.builds(lambda n, m: f"user_type {n} limit {m} / month", _NAME, _MONEY),
    st.builds(lambda n, m: f'member "u@x" {n} limit {m} / day', _NAME, _MONEY),
    st.just("shadow"), st.just("late_usage grace 5 days"), st.just("default user_type chat"))
_TEST_ITEM = st.one_of(
    st.builds(lambda n: f"org {n}", _STR), st.just("at 2026-11-15T10:00:00Z"),
    st.builds(lambda a, b: f"usage input {a} web_search {b}", _COUNT, _COUNT),
    st.builds(lambda m, r: f"given user spent {m} reserved {r}", _MONEY, _MONEY),
    st.builds(lambda m: f"expect deny USER_LIMIT cost {m} max_output 5", _MONEY),
    st.just("allow_clamp"), st.just("tier batch"))
_TOP = st.one_of(
    st.builds(lambda n: f"include {n}", _STR),
    st.builds(lambda n, xs: (f"rates {n}", xs), _STR, st.lists(_RATES_ITEM, max_size=3)),
    st.builds(lambda n, xs: (f"plan {n}", xs), _STR, st.lists(_PLAN_ITEM, max_size=2)),
    st.builds(lambda n, xs: (f"org {n}", xs), _STR, st.lists(_ORG_ITEM, max_size=4)),
    st.builds(lambda n, xs: (f"test {n}", xs), _STR, st.lists(_TEST_ITEM, max_size=4)))


@st.composite
def _layout(draw: st.DrawFn) -> str:
    """A random but valid layout of generated statements, with comments sprinkled in."""
    counter = iter(range(10_000))

    def comment() -> str:
        return f"# c{next(counter)}"

    def flat(node: Node) -> str:
        if isinstance(node, str):
            return node
        header, children = node
        if header.startswith(("org ", "test ")):
            # A member (and so any org or test item) must end at ";" or a newline.
            return f"{header} {{ {''.join(flat(c) + '; ' for c in children)}}}"
        sep = draw(st.sampled_from([" ", "  ", "; "]))
        return f"{header} {{ {sep.join(flat(c) for c in children)} }}"

    def lines(node: Node, indent: int) -> list[str]:
        pad = " " * indent
        if isinstance(node, str) or draw(st.booleans()):
            return [pad + flat(node)]
        header, children = node
        body: list[str] = []
        for child in children:
            if draw(st.booleans()):
                body.append(" " * (indent + 2) + comment())
            child_lines = lines(child, indent + draw(st.sampled_from([1, 2, 4])))
            if draw(st.booleans()):
                child_lines[-1] += "   " + comment()
            if draw(st.booleans()):
                body.append("")
            body.extend(child_lines)
        return [pad + header + " {", *body, pad + "}"]

    out: list[str] = []
    for node in draw(st.lists(_TOP, max_size=4)):
        if draw(st.booleans()):
            out.append(comment())
        node_lines = lines(node, 0)
        if draw(st.booleans()):
            node_lines[-1] += "  " + comment()
        out.extend(node_lines)
        out.extend([""] * draw(st.integers(0, 2)))
    return "\n".join(out) + "\n"


@given(_layout())
def test_generated_policies_format_idempotently_and_keep_their_meaning(text: str) -> None:
    """Any valid layout formats to a fixed point with the same tree and the same comments."""
    once = format_text(text, "gen.spend")
    assert format_text(once, "gen.spend") == once
    assert same_tree(parse_text(text), parse_text(once))
    assert [c.text for c in parse_text(once).comments] == [
        c.text for c in parse_text(text).comments]
    for line in once.splitlines():
        assert line == line.rstrip()
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0
