"""Errors that golden files cannot hold: file modes, huge and deep inputs, limits.

Each test builds its policy in a temporary directory (and runs from there, so
file names in messages are short and stable) and asserts the exact text.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from policy.compile import MAX_ERRORS, MAX_INCLUDE_DEPTH, load, load_text
from policy.errors import PolicyError
from policy.parse import MAX_FILE_BYTES

_TABLE = 'rates "r" { model "m" { input $1 / MTok  output $5 / MTok } }\n'


def _error(call: object, *args: object) -> PolicyError:
    assert callable(call)
    with pytest.raises(PolicyError) as info:
        call(*args)
    return info.value


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory that is also the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_world_writable_file_is_refused(tmp_cwd: Path) -> None:
    """A policy file anyone may write is not loaded (insecure-file)."""
    path = tmp_cwd / "open.spend"
    path.write_text(_TABLE, encoding="utf-8")
    path.chmod(0o666)
    err = _error(load, "open.spend")
    assert err.render() == (
        "open.spend: insecure-file: open.spend is world-writable; refusing to load it "
        "(chmod o-w open.spend)\n1 error")


def test_world_writable_included_file_is_refused_at_the_include(tmp_cwd: Path) -> None:
    """The insecure-file error points at the include line that pulled the file in."""
    (tmp_cwd / "main.spend").write_text('include "t.spend"\n', encoding="utf-8")
    table = tmp_cwd / "t.spend"
    table.write_text(_TABLE, encoding="utf-8")
    table.chmod(0o646)
    err = _error(load, "main.spend")
    assert err.render() == (
        "main.spend:1:1: insecure-file: t.spend is world-writable; refusing to load it "
        '(chmod o-w t.spend)\n  include "t.spend"\n  ^\n1 error')


def test_oversized_file_is_refused_before_reading(tmp_cwd: Path) -> None:
    """A file over MAX_FILE_BYTES is refused by size (file-too-large), not parsed."""
    (tmp_cwd / "big.spend").write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    err = _error(load, "big.spend")
    assert err.render() == (
        f"big.spend: file-too-large: big.spend is {MAX_FILE_BYTES + 1:,} bytes; "
        f"the limit is {MAX_FILE_BYTES:,}\n1 error")


def test_oversized_text_is_refused_by_the_parser() -> None:
    """load_text applies the same bound to text (counted in characters)."""
    err = _error(load_text, "#" * (MAX_FILE_BYTES + 1), "big.spend")
    assert err.render() == (
        f"big.spend: file-too-large: policy file is {MAX_FILE_BYTES + 1:,} characters; "
        f"the limit is {MAX_FILE_BYTES:,}\n1 error")


@pytest.mark.parametrize(("prefix", "column"), [
    ("", 1), ('org "a" ', 10), ('rates "r" { model "m" ', 24)])
def test_deep_nesting_is_a_clean_syntax_error(prefix: str, column: int) -> None:
    """10^5 opening braces give one syntax error at the first bad brace, quickly.

    The grammar has no recursive blocks and the transformer is non-recursive, so
    no input can raise RecursionError; the elapsed time is printed, not asserted.
    """
    text = prefix + "{" * 100_000
    start = time.perf_counter()
    err = _error(load_text, text, "deep.spend")
    print(f"deep nesting rejected in {time.perf_counter() - start:.3f}s")
    assert len(err.diagnostics) == 1
    diag = err.diagnostics[0]
    assert diag.code == "syntax"
    assert diag.message == "unexpected '{'"
    assert (diag.loc.line, diag.loc.column) == (1, column)


def test_deeply_repeated_blocks_are_a_clean_syntax_error() -> None:
    """``org "a" {`` repeated 10^5 times fails at the second ``org``, not in recursion."""
    err = _error(load_text, 'org "a" {' * 100_000, "deep.spend")
    assert err.diagnostics[0].render().splitlines()[0] == (
        "deep.spend:1:10: syntax: unexpected 'org'")


def test_include_from_text_is_an_error() -> None:
    """A policy given as text has no directory, so it may not include files."""
    err = _error(load_text, 'include "x.spend"\n', "inline.spend")
    assert err.render() == (
        'inline.spend:1:1: include: includes need a policy file on disk\n'
        '  include "x.spend"\n  ^\n1 error')


def test_includes_nest_at_most_max_include_depth(tmp_cwd: Path) -> None:
    """A chain of includes deeper than MAX_INCLUDE_DEPTH is refused (include-depth)."""
    count = MAX_INCLUDE_DEPTH + 3
    for i in range(count):
        body = f'include "f{i + 1}.spend"\n' if i + 1 < count else _TABLE
        (tmp_cwd / f"f{i}.spend").write_text(body, encoding="utf-8")
    err = _error(load, "f0.spend")
    depth = MAX_INCLUDE_DEPTH + 1
    assert err.render() == (
        f"f{depth - 1}.spend:1:1: include-depth: includes nest deeper than {MAX_INCLUDE_DEPTH}\n"
        f'  include "f{depth}.spend"\n  ^\n1 error')


def test_include_chain_within_the_bound_loads(tmp_cwd: Path) -> None:
    """A chain of exactly MAX_INCLUDE_DEPTH includes is fine."""
    count = MAX_INCLUDE_DEPTH + 1
    for i in range(count):
        body = f'include "f{i + 1}.spend"\n' if i + 1 < count else _TABLE
        (tmp_cwd / f"f{i}.spend").write_text(body, encoding="utf-8")
    assert "r" in load("f0.spend").rate_tables


def test_a_file_included_twice_is_read_once(tmp_cwd: Path) -> None:
    """Diamond includes are not duplicates: each file is loaded once."""
    (tmp_cwd / "t.spend").write_text(_TABLE, encoding="utf-8")
    (tmp_cwd / "a.spend").write_text('include "t.spend"\n', encoding="utf-8")
    (tmp_cwd / "main.spend").write_text('include "a.spend"\ninclude "t.spend"\n',
                                        encoding="utf-8")
    policy = load("main.spend")
    assert sorted(policy.files) == ["a.spend", "main.spend", "t.spend"]


def test_missing_file_is_a_read_error(tmp_cwd: Path) -> None:
    """Naming a file that does not exist is a read error, not a crash."""
    err = _error(load, "nope.spend")
    assert err.render() == (
        "nope.spend: read: cannot read nope.spend: No such file or directory\n1 error")


def test_directory_without_policy_files(tmp_cwd: Path) -> None:
    """A directory with no .spend files is an error (no-files)."""
    (tmp_cwd / "empty").mkdir()
    err = _error(load, "empty")
    assert err.render() == "empty: no-files: no .spend files in empty\n1 error"


def test_errors_are_collected_across_files(tmp_cwd: Path) -> None:
    """Every file's problems are reported together, not just the first file's."""
    (tmp_cwd / "a.spend").write_text('org "a" { limit 5 / month }\n', encoding="utf-8")
    (tmp_cwd / "b.spend").write_text('plan "p" { user_type chat { } ', encoding="utf-8")
    err = _error(load, ".")
    assert [(d.loc.file, d.code) for d in err.diagnostics] == [
        ("a.spend", "syntax"), ("b.spend", "syntax")]


def test_at_most_max_errors_are_reported() -> None:
    """A policy with hundreds of problems reports the first MAX_ERRORS of them."""
    members = "".join(f'  member "u{i}" nosuch\n' for i in range(MAX_ERRORS + 50))
    text = (_TABLE + 'plan "p" { user_type chat { seat $1 / month  products chat } }\n'
            f'org "o" {{\n  plan "p"  rates "r"\n{members}}}\n')
    err = _error(load_text, text, "many.spend")
    assert len(err.diagnostics) == MAX_ERRORS
    assert err.render().endswith(f"\n{MAX_ERRORS} errors")


def test_error_render_format() -> None:
    """``file:line:col: code: message``, the source line, a caret under the column, notes."""
    text = _TABLE + 'rates "s" {\n  fallback "n"\n}\n'
    err = _error(load_text, text, "fmt.spend")
    assert err.render() == (
        'fmt.spend:3:3: unknown-model: unknown model "n"\n'
        '    fallback "n"\n'
        "    ^\n"
        "1 error")


def test_documented_error_example_is_real(tmp_cwd: Path) -> None:
    """The error example in docs/language.md is exactly what the checker prints."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "language.md").read_text("utf-8")
    command = "$ spendkeeper check acme.spend\n"
    before, after = doc.split(command)
    policy_text = before.rsplit("```\n", 3)[-3]  # the code block just before the command
    printed = after.split("\n$ echo")[0]
    (tmp_cwd / "acme.spend").write_text(policy_text, encoding="utf-8")
    err = _error(load, "acme.spend")
    assert err.render() == printed
